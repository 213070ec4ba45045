//! The MoE layer of spec §1.2, given a routing and the experts: slot inputs `X̃ = Dᵀ X`, expert
//! outputs `Ỹ = f_j(X̃_j)`, token outputs `Y = Γ Ỹ`. The encoder block adds `Y` to the residual.
//!
//! Sparse routings gather and scatter through the compact slot table instead of multiplying dense
//! one-hot tensors; empty slots still run `f_j(0)` (as the reference does) but never reach a token.
//! `bfloat16` mirrors vmoe's `Bfloat16Dispatcher`: token data is rounded before dispatch and expert
//! outputs before combine, while the weights and the sums stay f32.

use super::RoutingError;
use super::ops::round_to_bf16;
use super::result::{Assignment, RoutingResult};

/// A set of experts that each map `rows` vectors of width `dim` to vectors of width `dim`.
pub trait Experts {
    fn num_experts(&self) -> usize;
    fn dim(&self) -> usize;
    /// Applies expert `expert` to row-major `[rows, dim]` `input`, writing `output` (same shape).
    fn apply(&self, expert: usize, input: &[f32], output: &mut [f32]);
}

/// Everything the layer computed, for inspection.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLayerOutput {
    /// `[e, c, d]`
    pub slot_inputs: Vec<f32>,
    /// `[e, c, d]`
    pub expert_outputs: Vec<f32>,
    /// `[n, d]` (before the residual add)
    pub token_outputs: Vec<f32>,
}

/// Runs the layer on tokens `x` `[n, d]`.
pub fn moe_layer(
    x: &[f32],
    routing: &RoutingResult,
    experts: &dyn Experts,
    bfloat16: bool,
) -> Result<MoeLayerOutput, RoutingError> {
    let (n, e, c) = (routing.num_tokens, routing.num_experts, routing.capacity);
    let d = experts.dim();
    if x.len() != n * d {
        return Err(RoutingError::Shape(format!(
            "x holds {} values, expected [{n}, {d}] for the routed group",
            x.len()
        )));
    }
    if experts.num_experts() != e {
        return Err(RoutingError::Shape(format!(
            "routing has {e} experts but the layer has {}",
            experts.num_experts()
        )));
    }
    let round = |v: f32| if bfloat16 { round_to_bf16(v) } else { v };
    let mut slot_inputs = vec![0.0f32; e * c * d];
    match &routing.assignment {
        Assignment::Sparse(s) => {
            for (slot, token) in s.slot_token.iter().enumerate() {
                if let Some(t) = token {
                    let src = &x[*t as usize * d..][..d];
                    for (o, &v) in slot_inputs[slot * d..][..d].iter_mut().zip(src) {
                        *o = round(v);
                    }
                }
            }
        }
        Assignment::Soft(s) => {
            for (xi, weights) in x.chunks_exact(d).zip(s.dispatch.chunks_exact(e * c)) {
                for (slot, &w) in weights.iter().enumerate() {
                    for (o, &v) in slot_inputs[slot * d..][..d].iter_mut().zip(xi) {
                        *o += w * round(v);
                    }
                }
            }
        }
    }
    let mut expert_outputs = vec![0.0f32; e * c * d];
    for j in 0..e {
        let range = j * c * d..(j + 1) * c * d;
        experts.apply(j, &slot_inputs[range.clone()], &mut expert_outputs[range]);
    }
    let combined: Vec<f32> = expert_outputs.iter().map(|&v| round(v)).collect();
    let mut token_outputs = vec![0.0f32; n * d];
    match &routing.assignment {
        Assignment::Sparse(_) => {
            for (i, out) in token_outputs.chunks_exact_mut(d).enumerate() {
                for ch in routing.token_choices(i) {
                    if let Some(s) = ch.slot {
                        let slot = ch.expert as usize * c + s as usize;
                        for (o, &y) in out.iter_mut().zip(&combined[slot * d..][..d]) {
                            *o += ch.gate * y;
                        }
                    }
                }
            }
        }
        Assignment::Soft(s) => {
            for (out, weights) in token_outputs
                .chunks_exact_mut(d)
                .zip(s.combine.chunks_exact(e * c))
            {
                for (slot, &w) in weights.iter().enumerate() {
                    for (o, &y) in out.iter_mut().zip(&combined[slot * d..][..d]) {
                        *o += w * y;
                    }
                }
            }
        }
    }
    Ok(MoeLayerOutput {
        slot_inputs,
        expert_outputs,
        token_outputs,
    })
}

/// ViT MLP experts `Dense(d→m) → GELU(tanh) → Dense(m→d)` with vmoe's stacked layouts:
/// `w0` `[e, d, m]`, `b0` `[e, m]`, `w1` `[e, m, d]`, `b1` `[e, d]`.
#[derive(Clone, Debug)]
pub struct MlpExperts {
    pub num_experts: usize,
    pub dim: usize,
    pub hidden: usize,
    pub w0: Vec<f32>,
    pub b0: Vec<f32>,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
}

/// GELU, tanh approximation (Flax's `nn.gelu` default).
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

impl Experts for MlpExperts {
    fn num_experts(&self) -> usize {
        self.num_experts
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn apply(&self, j: usize, input: &[f32], output: &mut [f32]) {
        let (d, m) = (self.dim, self.hidden);
        let w0 = &self.w0[j * d * m..][..d * m];
        let b0 = &self.b0[j * m..][..m];
        let w1 = &self.w1[j * m * d..][..m * d];
        let b1 = &self.b1[j * d..][..d];
        let mut h = vec![0.0f32; m];
        for (xr, yr) in input.chunks_exact(d).zip(output.chunks_exact_mut(d)) {
            h.copy_from_slice(b0);
            for (&a, wrow) in xr.iter().zip(w0.chunks_exact(m)) {
                for (hv, &w) in h.iter_mut().zip(wrow) {
                    *hv += a * w;
                }
            }
            yr.copy_from_slice(b1);
            for (&a, wrow) in h.iter().zip(w1.chunks_exact(d)) {
                let a = gelu_tanh(a);
                for (yv, &w) in yr.iter_mut().zip(wrow) {
                    *yv += a * w;
                }
            }
        }
    }
}
