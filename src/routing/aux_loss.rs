//! Auxiliary load-balancing losses of V-MoE (spec §2.0): importance, load and GShard.
//! Each is per group; `cv²` uses the population standard deviation (ddof 0).

use super::ops::{normal_cdf, top_k_indices};

/// Squared coefficient of variation `(std / mean)²`.
fn cv_squared(x: &[f32]) -> f32 {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    var / (mean * mean)
}

/// Importance loss: `cv²` of `Σ_i probs[i, j]`, computed on the noise-free softmax.
pub fn importance_loss(probs: &[f32], e: usize) -> f32 {
    let mut importance = vec![0.0f32; e];
    for row in probs.chunks_exact(e) {
        for (acc, &p) in importance.iter_mut().zip(row) {
            *acc += p;
        }
    }
    cv_squared(&importance)
}

/// Load loss: `cv²` over experts of `mean_i (1 − Φ((θ_i − L_ij) / σ))`, where `θ_i` is token
/// `i`'s k-th largest noisy logit: the chance that expert `j` stays in the top-k if the noise were
/// drawn again.
pub fn load_loss(logits: &[f32], noisy_logits: &[f32], e: usize, k: usize, sigma: f32) -> f32 {
    let n = logits.len() / e;
    let mut load = vec![0.0f32; e];
    let mut top = Vec::with_capacity(k);
    for (row, noisy) in logits.chunks_exact(e).zip(noisy_logits.chunks_exact(e)) {
        top_k_indices(noisy, k, &mut top);
        let threshold = noisy[top[top.len() - 1]];
        for (acc, &l) in load.iter_mut().zip(row) {
            *acc += 1.0 - normal_cdf((threshold - l) / sigma);
        }
    }
    load.iter_mut().for_each(|v| *v /= n as f32);
    cv_squared(&load)
}

/// GShard loss: `e² · mean_j(f_j · m_j)` with `m_j` the mean gate and `f_j` the fraction of tokens
/// whose top-1 expert is `j`.
pub fn gshard_loss(gates: &[f32], e: usize) -> f32 {
    let n = gates.len() / e;
    let mut mean_gate = vec![0.0f32; e];
    let mut top1 = vec![0.0f32; e];
    let mut top = Vec::with_capacity(1);
    for row in gates.chunks_exact(e) {
        for (acc, &g) in mean_gate.iter_mut().zip(row) {
            *acc += g;
        }
        top_k_indices(row, 1, &mut top);
        top1[top[0]] += 1.0;
    }
    let nf = n as f32;
    let mean: f32 = mean_gate
        .iter()
        .zip(&top1)
        .map(|(m, f)| (m / nf) * (f / nf))
        .sum::<f32>()
        / e as f32;
    (e * e) as f32 * mean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_routing_has_zero_losses() {
        // Each expert gets the same importance and the same top-1 share.
        let probs = [0.7, 0.3, 0.3, 0.7];
        assert!(importance_loss(&probs, 2).abs() < 1e-7);
        assert!((gshard_loss(&probs, 2) - 2.0 * 2.0 * 0.5 * 0.5).abs() < 1e-6);
        let logits = [1.0, 0.0, 0.0, 1.0];
        assert!(load_loss(&logits, &logits, 2, 1, 0.5).abs() < 1e-7);
    }

    #[test]
    fn imbalance_is_penalised() {
        let probs = [0.9, 0.1, 0.8, 0.2];
        // importance = [1.7, 0.3], mean 1, std 0.7 -> 0.49
        assert!((importance_loss(&probs, 2) - 0.49).abs() < 1e-5);
        let logits = [2.0, 0.0, 2.0, 0.0];
        let l = load_loss(&logits, &logits, 2, 1, 0.5);
        assert!(l > 0.5, "{l}");
        // All tokens choose expert 0: f = [1, 0], m = [0.85, 0.15] -> 4 · mean(0.85, 0) = 1.7
        assert!((gshard_loss(&probs, 2) - 1.7).abs() < 1e-5);
    }
}
