//! Fused, differentiable candle ops for training: tanh-GELU, softmax over the last axis and
//! LayerNorm's normalisation. Composed from candle's element-wise ops each would take 5–10 passes,
//! allocations and `powf`/`tanh` calls per element in both directions; these take one pass each
//! way (a third of the training step's time before).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::model::{erf, gelu, gelu_erf};

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op} needs a contiguous tensor")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// Rows per rayon task: enough work to amortise the scheduling.
fn chunk_rows(d: usize) -> usize {
    (16_384 / d.max(1)).max(1)
}

/// `out[row] = f(a[row], b[row], out[row])` over rows of `d` values of two same-shape tensors,
/// in parallel chunks of rows (the backward passes below).
fn map_row_pairs(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    op: &str,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let a = contiguous(s1, l1, op)?;
    let b = contiguous(s2, l2, op)?;
    let d = last_dim(l1);
    let mut out = vec![0.0f32; a.len()];
    let n = d * chunk_rows(d);
    out.par_chunks_mut(n)
        .zip(a.par_chunks(n).zip(b.par_chunks(n)))
        .for_each(|(o, (a, b))| {
            for ((o, a), b) in o
                .chunks_exact_mut(d)
                .zip(a.chunks_exact(d))
                .zip(b.chunks_exact(d))
            {
                f(a, b, o);
            }
        });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// `f(x)` element by element, in parallel chunks (the GELU forwards).
fn map_elements(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl Fn(f32) -> f32 + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous(s, l, op)?;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(16_384)
        .zip(x.par_chunks(16_384))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v)));
    Ok((CpuStorage::F32(out), l.shape().clone()))
}

/// `f(x, g)` element by element over two same-shape tensors (the GELU backwards).
fn map_element_pairs(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    op: &str,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous(s1, l1, op)?;
    let g = contiguous(s2, l2, op)?;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(16_384)
        .zip(x.par_chunks(16_384).zip(g.par_chunks(16_384)))
        .for_each(|(o, (x, g))| {
            for ((o, &v), &gv) in o.iter_mut().zip(x).zip(g) {
                *o = f(v, gv);
            }
        });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// `gelu(x)` (tanh approximation).
pub struct Gelu;

/// `grad · gelu'(x)`.
struct GeluGrad;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "train-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_elements(s, l, "gelu", gelu)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "train-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        const C: f32 = 0.797_884_6; // sqrt(2/π)
        map_element_pairs(s1, l1, s2, l2, "gelu-grad", |v, gv| {
            // gelu = x·σ(2u), u = C(x + 0.044715x³); tanh u = 2σ(2u) − 1.
            let u = C * (v + 0.044_715 * v * v * v);
            let sig = 1.0 / (1.0 + (-2.0 * u).exp());
            let t = 2.0 * sig - 1.0;
            let du = C * (1.0 + 3.0 * 0.044_715 * v * v);
            gv * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du)
        })
    }
}

/// `gelu_erf(x)`: the exact GELU with the inference path's erf (DINOv2's MLPs).
pub struct GeluErf;

/// `grad · (Φ(x) + x·φ(x))`.
struct GeluErfGrad;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "train-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_elements(s, l, "gelu-erf", gelu_erf)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad)?,
        ))
    }
}

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "train-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        map_element_pairs(s1, l1, s2, l2, "gelu-erf-grad", |v, gv| {
            let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            gv * (cdf + v * INV_SQRT_2PI * (-0.5 * v * v).exp())
        })
    }
}

/// Softmax over the last axis.
pub struct Softmax;

/// `y ⊙ (g − Σ g⊙y)` per row, from `(y, g)`.
struct SoftmaxGrad;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "train-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "softmax")?;
        let d = last_dim(l);
        let mut out = x.to_vec();
        out.par_chunks_mut(d * chunk_rows(d))
            .for_each(|c| crate::routing::ops::softmax_rows_in_place(c, d));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            res.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "train-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs(s1, l1, s2, l2, "softmax-grad", |y, g, o| {
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((o, &yv), &gv) in o.iter_mut().zip(y).zip(g) {
                *o = yv * (gv - dot);
            }
        })
    }
}

/// `(x − mean)/sqrt(var + eps)` over the last axis (the affine part stays in candle).
pub struct Normalize {
    pub eps: f32,
}

/// `rstd·(g − mean(g) − y·mean(g⊙y))` per row, from `(x, g)`.
struct NormalizeGrad {
    eps: f32,
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "train-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "normalize")?;
        let d = last_dim(l);
        let mut out = vec![0.0f32; x.len()];
        let n = d * chunk_rows(d);
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let (mean, rstd) = row_stats(x, self.eps);
                    for (o, &v) in o.iter_mut().zip(x) {
                        *o = (v - mean) * rstd;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &NormalizeGrad { eps: self.eps },
        )?))
    }
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "train-normalize-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs(s1, l1, s2, l2, "normalize-grad", |x, g, o| {
            let (mean, rstd) = row_stats(x, self.eps);
            let inv_d = 1.0 / x.len() as f32;
            let g_mean = g.iter().sum::<f32>() * inv_d;
            let gy_mean = x
                .iter()
                .zip(g)
                .map(|(&v, &gv)| (v - mean) * rstd * gv)
                .sum::<f32>()
                * inv_d;
            for ((o, &v), &gv) in o.iter_mut().zip(x).zip(g) {
                let y = (v - mean) * rstd;
                *o = rstd * (gv - g_mean - y * gy_mean);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};

    use super::*;

    /// Each fused op's value and gradient equal candle's composed reference.
    #[test]
    fn fused_ops_match_composed_candle_ops() {
        let data: Vec<f32> = (0..6 * 10)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 4.0)
            .collect();
        let w: Vec<f32> = (0..6 * 10)
            .map(|i| ((i * 11 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let w = Tensor::from_vec(w, (6, 10), &Device::Cpu).unwrap();
        type Reference = fn(&Tensor) -> Tensor;
        let cases: [(&str, Reference, Reference); 4] = [
            (
                "gelu",
                |x| x.apply_op1(Gelu).unwrap(),
                |x| x.gelu().unwrap(),
            ),
            (
                "gelu-erf",
                |x| x.apply_op1(GeluErf).unwrap(),
                |x| x.gelu_erf().unwrap(),
            ),
            (
                "softmax",
                |x| x.apply_op1(Softmax).unwrap(),
                |x| {
                    let e = x.exp().unwrap();
                    e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
                },
            ),
            (
                "normalize",
                |x| x.apply_op1(Normalize { eps: 1e-6 }).unwrap(),
                |x| {
                    let m = x.mean_keepdim(D::Minus1).unwrap();
                    let c = x.broadcast_sub(&m).unwrap();
                    let v = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                    c.broadcast_div(&(v + 1e-6).unwrap().sqrt().unwrap())
                        .unwrap()
                },
            ),
        ];
        for (name, fused, reference) in cases {
            let mut results = Vec::new();
            for f in [fused, reference] {
                let x = Var::from_tensor(
                    &Tensor::from_vec(data.clone(), (6, 10), &Device::Cpu).unwrap(),
                )
                .unwrap();
                let y = f(x.as_tensor());
                let loss = (&y * &w).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let gx: Vec<f32> = g
                    .get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                results.push((yv, gx));
            }
            for (a, b) in results[0].0.iter().zip(&results[1].0) {
                assert!((a - b).abs() < 1e-4, "{name} value {a} vs {b}");
            }
            for (a, b) in results[0].1.iter().zip(&results[1].1) {
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "{name} gradient {a} vs {b}"
                );
            }
        }
    }
}
