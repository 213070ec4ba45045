//! The dense building blocks of the GPU model, uploaded from checkpoint weights: a linear layer,
//! LayerNorm, stacked MLPs (one per expert in an MoE layer) and the residual add of a branch
//! that LayerScale or a bias finishes, each with the launches that compute it.

use super::kernels::{Activation, Kernel, Matmul, flat_groups, row_groups, upload};
use super::recorder::Recorder;
use crate::model::{ModelConfig, ModelError, ModelWeights};

pub(crate) fn get<'a>(weights: &'a ModelWeights, name: &str) -> Result<&'a [f32], ModelError> {
    weights
        .get(name)
        .map(|t| t.data.as_slice())
        .ok_or_else(|| ModelError::Tensor(format!("missing tensor `{name}`")))
}

pub(crate) struct Linear {
    pub w: wgpu::Buffer,
    pub b: wgpu::Buffer,
    pub fan_in: usize,
    pub fan_out: usize,
}

impl Linear {
    pub fn load(
        device: &wgpu::Device,
        weights: &ModelWeights,
        prefix: &str,
        fan_in: usize,
        fan_out: usize,
    ) -> Result<Self, ModelError> {
        let w = get(weights, &format!("{prefix}/kernel"))?;
        let b = get(weights, &format!("{prefix}/bias"))?;
        Self::from_parts(device, prefix, w, b, fan_in, fan_out)
    }

    pub fn from_parts(
        device: &wgpu::Device,
        label: &str,
        w: &[f32],
        b: &[f32],
        fan_in: usize,
        fan_out: usize,
    ) -> Result<Self, ModelError> {
        if w.len() != fan_in * fan_out || b.len() != fan_out {
            return Err(ModelError::Tensor(format!(
                "`{label}`: kernel has {} values and bias {}, expected {fan_in}x{fan_out} and {fan_out}",
                w.len(),
                b.len()
            )));
        }
        Ok(Self {
            w: upload(device, label, w),
            b: upload(device, label, b),
            fan_in,
            fan_out,
        })
    }

    /// `out (+)= act(x @ W + b)` for `rows` rows.
    pub fn encode(
        &self,
        rec: &mut Recorder<'_>,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        rows: usize,
        act: Activation,
        accumulate: bool,
    ) {
        let mut mm = Matmul::plain(rows, self.fan_in, self.fan_out)
            .with_bias()
            .act(act);
        mm.accumulate = accumulate;
        rec.matmul(mm, x, &self.w, Some(&self.b), out);
    }
}

pub(crate) struct LayerNorm {
    scale: wgpu::Buffer,
    bias: wgpu::Buffer,
    d: usize,
    eps: f32,
}

impl LayerNorm {
    pub fn load(
        device: &wgpu::Device,
        weights: &ModelWeights,
        prefix: &str,
        d: usize,
        eps: f32,
    ) -> Result<Self, ModelError> {
        let scale = get(weights, &format!("{prefix}/scale"))?;
        let bias = get(weights, &format!("{prefix}/bias"))?;
        if scale.len() != d || bias.len() != d {
            return Err(ModelError::Tensor(format!(
                "`{prefix}`: expected {d} scales and biases"
            )));
        }
        Ok(Self {
            scale: upload(device, prefix, scale),
            bias: upload(device, prefix, bias),
            d,
            eps,
        })
    }

    pub fn encode(&self, rec: &mut Recorder<'_>, x: &wgpu::Buffer, y: &wgpu::Buffer, rows: usize) {
        rec.launch(
            Kernel::LayerNorm,
            &[rows as u32, self.d as u32, self.eps.to_bits(), 0],
            &[x, &self.scale, &self.bias, y],
            row_groups(rows),
        );
    }
}

/// `num` stacked `Dense_0 → GELU → Dense_1` MLPs of `hidden` units each.
pub(crate) struct Mlp {
    pub w0: wgpu::Buffer,
    pub b0: wgpu::Buffer,
    pub w1: wgpu::Buffer,
    pub b1: wgpu::Buffer,
    pub dim: usize,
    pub hidden: usize,
    act: Activation,
}

impl Mlp {
    /// The MLPs under `prefix`, with `hidden` units (the model's `mlp_dim`, or an MoE layer's
    /// narrower `expert_mlp_dim`) and the model's GELU.
    pub fn load(
        device: &wgpu::Device,
        weights: &ModelWeights,
        prefix: &str,
        num: usize,
        hidden: usize,
        cfg: &ModelConfig,
    ) -> Result<Self, ModelError> {
        let (d, m) = (cfg.hidden_size, hidden);
        let part = |name: &str, len: usize| -> Result<wgpu::Buffer, ModelError> {
            let full = format!("{prefix}/{name}");
            let data = get(weights, &full)?;
            if data.len() != len {
                return Err(ModelError::Tensor(format!(
                    "`{full}` has {} values, expected {len}",
                    data.len()
                )));
            }
            Ok(upload(device, &full, data))
        };
        Ok(Self {
            w0: part("Dense_0/kernel", num * d * m)?,
            b0: part("Dense_0/bias", num * m)?,
            w1: part("Dense_1/kernel", num * m * d)?,
            b1: part("Dense_1/bias", num * d)?,
            dim: d,
            hidden: m,
            act: cfg.gelu.into(),
        })
    }

    /// `out (+)= MLP_j(x_j)` over `outer × num` batches of `rows` rows; `x` is
    /// `[outer, num, rows, d]`, MLP `j` serves batch `(·, j)`. `hidden` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        rec: &mut Recorder<'_>,
        x: &wgpu::Buffer,
        hidden: &wgpu::Buffer,
        out: &wgpu::Buffer,
        outer: usize,
        num: usize,
        rows: usize,
        accumulate: bool,
    ) {
        let (d, m) = (self.dim, self.hidden);
        let up = Matmul {
            outer,
            inner: num,
            a_so: num * rows * d,
            a_si: rows * d,
            b_si: d * m,
            c_so: num * rows * m,
            c_si: rows * m,
            bias_si: m,
            ..Matmul::plain(rows, d, m).with_bias().act(self.act)
        };
        rec.matmul(up, x, &self.w0, Some(&self.b0), hidden);
        let mut down = Matmul {
            outer,
            inner: num,
            a_so: num * rows * m,
            a_si: rows * m,
            b_si: m * d,
            c_so: num * rows * d,
            c_si: rows * d,
            bias_si: d,
            ..Matmul::plain(rows, m, d).with_bias()
        };
        down.accumulate = accumulate;
        rec.matmul(down, hidden, &self.w1, Some(&self.b1), out);
    }
}

/// `x += (a + bias) · scale` per channel over `rows` rows of `d` (`shaders/residual.wgsl`): a
/// branch finished by LayerScale (`scale`) or a unit-combine MoE layer's bias, or both.
pub(crate) fn add_branch(
    rec: &mut Recorder<'_>,
    a: &wgpu::Buffer,
    scale: Option<&wgpu::Buffer>,
    bias: Option<&wgpu::Buffer>,
    x: &wgpu::Buffer,
    rows: usize,
    d: usize,
) {
    let flags = u32::from(bias.is_some()) | (u32::from(scale.is_some()) << 1);
    let unused = &rec.ctx.kernels.dummy;
    let (scale, bias) = (scale.unwrap_or(unused), bias.unwrap_or(unused));
    rec.launch(
        Kernel::AddBranch,
        &[(rows * d) as u32, d as u32, flags, 0],
        &[a, scale, bias, x],
        flat_groups(rows * d),
    );
}
