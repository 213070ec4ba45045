//! Soft MoE weights (spec §2.6, vmoe `SoftRouter`): cosine similarity between l2-normalised
//! tokens and per-slot parameters `mu`, times a learned `scale`; dispatch is a softmax over tokens
//! (per slot), combine a softmax over all `e·p` slots (per token). Nothing is ever dropped.

use super::ops::softmax_in_place;
use super::result::SoftAssignment;

/// `eps` inside the square root of vmoe's `normalize`.
const NORM_EPS: f32 = 1e-6;

/// Soft MoE router parameters: `mu` is `[d, e, p]` row-major (vmoe's layout), `scale` a scalar.
#[derive(Clone, Copy, Debug)]
pub struct SoftRouterParams<'a> {
    pub mu: &'a [f32],
    pub dim: usize,
    pub num_experts: usize,
    pub num_slots: usize,
    pub scale: f32,
}

/// Router logits `Λ[i, (j, s)] = scale · ⟨x̂_i, μ̂_js⟩`, row-major `[n, e·p]`.
pub fn soft_logits(x: &[f32], n: usize, params: &SoftRouterParams<'_>) -> Vec<f32> {
    let d = params.dim;
    let ep = params.num_experts * params.num_slots;
    // vmoe multiplies the scale into whichever operand has fewer elements (`inputs.size < mu.size`).
    let scale_tokens = n * d < d * ep;
    assert!(
        x.len() >= n * d && params.mu.len() >= d * ep,
        "soft_logits: x or mu smaller than [n, d] / [d, e·p]"
    );
    // ⟨x̂_i, μ̂⟩ = ⟨x_i, μ̂⟩ / ‖x_i‖: the token norms scale the product's rows afterwards, so the
    // tokens are read twice and never copied.
    let inv_norm: Vec<f32> = x
        .chunks_exact(d)
        .map(|row| {
            // Eight independent accumulators: a single running sum is one dependent add per value.
            let m = 1.0 / (super::ops::dot(row, row) + NORM_EPS).sqrt();
            if scale_tokens { m * params.scale } else { m }
        })
        .collect();
    let mut mun = params.mu.to_vec();
    let mut inv = vec![0.0f32; ep];
    for row in mun.chunks_exact(ep) {
        for (acc, &v) in inv.iter_mut().zip(row) {
            *acc += v * v;
        }
    }
    for v in inv.iter_mut() {
        *v = 1.0 / (*v + NORM_EPS).sqrt();
    }
    for row in mun.chunks_exact_mut(ep) {
        for (v, &m) in row.iter_mut().zip(&inv) {
            *v *= m;
            if !scale_tokens {
                *v *= params.scale;
            }
        }
    }
    let mut logits = vec![0.0f32; n * ep];
    if n > 0 && d > 0 && ep > 0 {
        // One [n, d] × [d, e·p] matrix product on this thread (gemm's SIMD kernels, picked for
        // the CPU at run time).
        // SAFETY: `x` is [n, d], `mun` [d, ep] and `logits` [n, ep], all row-major and distinct.
        unsafe {
            gemm::gemm(
                n,
                ep,
                d,
                logits.as_mut_ptr(),
                1,
                ep as isize,
                false,
                x.as_ptr(),
                1,
                d as isize,
                mun.as_ptr(),
                1,
                ep as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
    for (row, &m) in logits.chunks_exact_mut(ep).zip(&inv_norm) {
        row.iter_mut().for_each(|v| *v *= m);
    }
    logits
}

/// Dispatch and combine weights from Soft MoE logits `[n, e·p]` (training noise, if any, already
/// added: `noise_std · N(0, 1)`, not divided by `e` unlike the sparse routers).
pub fn soft_weights(logits: Vec<f32>, n: usize, ep: usize) -> SoftAssignment {
    let mut combine = logits.clone();
    for row in combine.chunks_exact_mut(ep) {
        softmax_in_place(row);
    }
    // Softmax over tokens for every slot, computed row by row so the inner loops run over
    // contiguous slots.
    let mut col_max = vec![f32::NEG_INFINITY; ep];
    for row in logits.chunks_exact(ep) {
        for (m, &v) in col_max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    let mut dispatch = vec![0.0f32; n * ep];
    let mut col_sum = vec![0.0f32; ep];
    for (out, row) in dispatch.chunks_exact_mut(ep).zip(logits.chunks_exact(ep)) {
        for ((o, &v), &m) in out.iter_mut().zip(row).zip(&col_max) {
            *o = (v - m).exp();
        }
        for (s, &o) in col_sum.iter_mut().zip(out.iter()) {
            *s += o;
        }
    }
    for out in dispatch.chunks_exact_mut(ep) {
        for (o, &s) in out.iter_mut().zip(&col_sum) {
            *o /= s;
        }
    }
    SoftAssignment {
        dispatch,
        combine,
        logits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec §6 toy: n = 4, d = 3, e = 2, p = 1, scale = 1.
    #[test]
    fn golden_soft_moe_toy() {
        let x = [1.0, 0.0, 2.0, 0.5, -1.0, 0.0, 0.0, 3.0, 1.0, -2.0, 0.5, 0.5];
        // mu is [d, e, p] = [3, 2, 1]: columns (1, 0, 1) and (-1, 1, 0.5).
        let mu = [1.0, -1.0, 0.0, 1.0, 1.0, 0.5];
        let params = SoftRouterParams {
            mu: &mu,
            dim: 3,
            num_experts: 2,
            num_slots: 1,
            scale: 1.0,
        };
        let logits = soft_logits(&x, 4, &params);
        let want_logits = [
            0.94868, 0.0, 0.31623, -0.89443, 0.22361, 0.73786, -0.5, 0.86424,
        ];
        for (a, b) in logits.iter().zip(want_logits) {
            assert!((a - b).abs() < 1e-5, "{logits:?}");
        }
        let w = soft_weights(logits, 4, 2);
        let dispatch = [
            0.44436, 0.17026, 0.23608, 0.06961, 0.21520, 0.35608, 0.10437, 0.40405,
        ];
        let combine = [
            0.72085, 0.27915, 0.77041, 0.22959, 0.37420, 0.62580, 0.20355, 0.79645,
        ];
        for (a, b) in w.dispatch.iter().zip(dispatch) {
            assert!((a - b).abs() < 1e-5, "dispatch {:?}", w.dispatch);
        }
        for (a, b) in w.combine.iter().zip(combine) {
            assert!((a - b).abs() < 1e-5, "combine {:?}", w.combine);
        }
    }

    #[test]
    fn scale_placement_does_not_change_the_logits() {
        // n·d < d·e·p puts the scale on the tokens; otherwise on mu. Same maths.
        let x = [0.3, -0.2, 0.9, 1.5];
        let mu = [0.5, -1.0, 0.25, 2.0, 0.1, -0.3, 0.7, 0.0]; // d = 2, e = 2, p = 2
        let small = SoftRouterParams {
            mu: &mu,
            dim: 2,
            num_experts: 2,
            num_slots: 2,
            scale: 3.0,
        };
        let l1 = soft_logits(&x, 2, &small);
        let x_many: Vec<f32> = x.iter().cycle().take(2 * 6).copied().collect();
        let l2 = soft_logits(&x_many, 6, &small);
        for (a, b) in l1.iter().zip(&l2[..8]) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
