//! Fused row-wise candle ops: LayerNorm (Flax semantics) and softmax over the last axis, each one
//! pass over a contiguous f32 tensor instead of the eight element-wise candle ops (and their
//! allocations and thread-pool round trips) that composing them would take.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

fn rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], usize)> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op} needs a contiguous tensor")))?;
    let data = &storage.as_slice::<f32>()?[start..end];
    let last = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    Ok((data, last))
}

/// LayerNorm over the last axis as Flax computes it: `var = max(0, E[x²] − E[x]²)`, then
/// `(x − mean)·rsqrt(var + eps)·scale + bias`.
pub struct LayerNormOp<'a> {
    pub scale: &'a [f32],
    pub bias: &'a [f32],
    pub eps: f32,
}

impl CustomOp1 for LayerNormOp<'_> {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, d) = rows(storage, layout, "layer-norm")?;
        if d != self.scale.len() || d != self.bias.len() {
            return Err(candle_core::Error::Msg(format!(
                "layer-norm over {d} features with {} scales and {} biases",
                self.scale.len(),
                self.bias.len()
            )));
        }
        let out = layer_norm_rows(x, self.scale, self.bias, self.eps);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// LayerNorm of every row of `x` (rows of `scale.len()` values), as [`LayerNormOp`].
pub fn layer_norm_rows(x: &[f32], scale: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let d = scale.len().max(1);
    let mut out = vec![0.0f32; x.len()];
    let inv_d = 1.0 / d as f32;
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = crate::routing::ops::sum(row) * inv_d;
        let mean_sq = crate::routing::ops::dot(row, row) * inv_d;
        let var = (mean_sq - mean * mean).max(0.0);
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &v), &s), &b) in o.iter_mut().zip(row).zip(scale).zip(bias) {
            *o = (v - mean) * inv * s + b;
        }
    }
    out
}

/// Softmax over the last axis (max-subtracted).
pub struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, d) = rows(storage, layout, "softmax")?;
        let mut out = x.to_vec();
        crate::routing::ops::softmax_rows_in_place(&mut out, d);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
