//! Small numeric kernels shared by the routers: softmax, top-k and priority order with the
//! reference tie rules, and seeded Gaussian noise.
//!
//! Tie rules matter (spec §2.0, §5.3): `jax.lax.top_k` returns equal values lower index first,
//! and Batch Priority Routing uses a stable argsort. All-equal rows (a zero token), bf16-like
//! logits and the zero entries of sparse plans hit these rules all the time.

use rand::Rng;
use rand_distr::StandardNormal;

/// Row-wise softmax of a row-major `[rows, cols]` matrix, as `jax.nn.softmax`:
/// `exp(x - max) / sum(exp(x - max))`.
pub fn softmax_rows(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    softmax_rows_in_place(&mut out, cols);
    out
}

/// In-place variant of [`softmax_rows`].
pub fn softmax_rows_in_place(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        softmax_in_place(row);
    }
}

/// Softmax of one vector, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = sum;
    for v in row.iter_mut() {
        *v /= inv;
    }
}

/// Indices of the `k` largest values, in descending order; equal values keep the lower index
/// first (the `jax.lax.top_k` rule). `k` is clamped to `values.len()`.
pub fn top_k_indices(values: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    let k = k.min(values.len());
    if k == 0 {
        return;
    }
    if k > 48 {
        // Large k (Expert Choice with big capacities): a stable sort is simpler and O(n log n).
        out.extend(0..values.len());
        out.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap_or(std::cmp::Ordering::Equal));
        out.truncate(k);
        return;
    }
    // Insertion into a short sorted buffer: a later index only overtakes strictly smaller values.
    for (i, &v) in values.iter().enumerate() {
        if out.len() == k {
            if !(v > values[out[k - 1]]) {
                continue;
            }
            out.pop();
        }
        let mut pos = out.len();
        while pos > 0 && values[out[pos - 1]] < v {
            pos -= 1;
        }
        out.insert(pos, i);
    }
}

/// Stable descending order of `priority` (BPR: `argsort(-top1)` with a stable sort).
pub fn stable_descending_order(priority: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..priority.len()).collect();
    order.sort_by(|&a, &b| {
        priority[b]
            .partial_cmp(&priority[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    order
}

/// Adds i.i.d. `N(0, std²)` noise to every entry.
pub fn add_gaussian_noise<R: Rng + ?Sized>(x: &mut [f32], std: f32, rng: &mut R) {
    for v in x.iter_mut() {
        let z: f32 = rng.sample(StandardNormal);
        *v += std * z;
    }
}

/// Rounds an f32 to the nearest bfloat16 (ties to even), returned as f32.
pub fn round_to_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7fff + lsb) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// Standard normal CDF Φ(x), via `erfc` so that the far tails stay accurate.
pub fn normal_cdf(x: f32) -> f32 {
    0.5 * libm::erfcf(-x / std::f32::consts::SQRT_2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn softmax_matches_spec_row() {
        let p = softmax_rows(&[1.2, -0.3, 0.5, 2.0], 4);
        let want = [0.25347, 0.05656, 0.12587, 0.56411];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 5e-6, "{p:?}");
        }
    }

    #[test]
    fn softmax_stays_finite_for_large_logits() {
        let p = softmax_rows(&[100.0, -100.0, 99.0, 100.0], 4);
        assert!(p.iter().all(|v| v.is_finite()));
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let mut out = Vec::new();
        top_k_indices(&[0.25, 0.25, 0.25, 0.25], 2, &mut out);
        assert_eq!(out, [0, 1]);
        top_k_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 3, &mut out);
        assert_eq!(out, [1, 2, 4]);
        top_k_indices(&[0.0, 0.0, 5.0, 0.0], 3, &mut out);
        assert_eq!(out, [2, 0, 1]);
        top_k_indices(&[1.0, 2.0], 5, &mut out);
        assert_eq!(out, [1, 0]);
    }

    #[test]
    fn top_k_large_k_uses_the_same_rule() {
        let values: Vec<f32> = (0..200).map(|i| ((i * 7) % 13) as f32).collect();
        let mut big = Vec::new();
        top_k_indices(&values, 100, &mut big);
        // Reference: stable sort by descending value.
        let mut want: Vec<usize> = (0..200).collect();
        want.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap());
        assert_eq!(big, want[..100]);
        let mut small = Vec::new();
        top_k_indices(&values, 40, &mut small);
        assert_eq!(small, want[..40]);
    }

    #[test]
    fn stable_order_keeps_equal_priorities_in_token_order() {
        assert_eq!(stable_descending_order(&[0.5, 0.9, 0.5, 0.9, 0.1]), [1, 3, 0, 2, 4]);
        // -0.0 and 0.0 compare equal, as in JAX's sort.
        assert_eq!(stable_descending_order(&[0.0, -0.0, 0.0]), [0, 1, 2]);
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_to_bf16(1.0), 1.0);
        // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_to_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_to_bf16(-2.5), -2.5);
    }

    #[test]
    fn normal_cdf_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!(normal_cdf(-10.0) > 0.0);
    }

    #[test]
    fn noise_is_reproducible() {
        let mut a = vec![0.0f32; 16];
        let mut b = vec![0.0f32; 16];
        add_gaussian_noise(&mut a, 0.5, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        add_gaussian_noise(&mut b, 0.5, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        assert_eq!(a, b);
        assert!(a.iter().any(|&v| v != 0.0));
    }
}
