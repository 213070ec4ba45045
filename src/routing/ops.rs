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
/// The normalised entropy `H(p) / ln e` of one token's expert probabilities, in `[0, 1]` (0 for
/// a single expert): the router entropy the analysis and runs report.
pub fn normalized_entropy(row: &[f32]) -> f64 {
    let ln_e = (row.len() as f64).ln();
    if ln_e <= 0.0 {
        return 0.0;
    }
    let h: f64 = row
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -(p as f64) * (p as f64).ln())
        .sum();
    (h / ln_e).clamp(0.0, 1.0)
}

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
    for v in row.iter_mut() {
        *v = (*v - max).exp();
    }
    let sum = sum(row);
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// Sum with 8 independent accumulators: a sequential f32 sum is latency-bound (one add every
/// four cycles), and the reference's reduction order is not sequential either.
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut total =
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in rest {
        total += v;
    }
    total
}

/// Dot product with 8 independent accumulators (see [`sum`]).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut total =
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        total += x * y;
    }
    total
}

/// Indices of the `k` largest values, in descending order; equal values keep the lower index
/// first (the `jax.lax.top_k` rule). `k` is clamped to `values.len()`.
pub fn top_k_indices(values: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    let k = k.min(values.len());
    if k == 0 {
        return;
    }
    if k > 32 {
        // Large k (Expert Choice with big capacities): partial selection under the total order
        // (value descending, index ascending), then sort only the selected prefix.
        let before = |&a: &usize, &b: &usize| {
            values[b]
                .partial_cmp(&values[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        };
        out.extend(0..values.len());
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, before);
            out.truncate(k);
        }
        out.sort_unstable_by(before);
        return;
    }
    if k == 1 {
        // Argmax; `>` keeps the lower index on ties.
        let mut best = 0;
        for (i, &v) in values.iter().enumerate().skip(1) {
            if v > values[best] {
                best = i;
            }
        }
        out.push(best);
        return;
    }
    // Insertion into a short sorted buffer: a later index only overtakes strictly smaller values.
    // Once the buffer is full, whole chunks of 8 that cannot beat the current k-th value are
    // skipped with one branch-free test.
    let mut best: [(f32, usize); 32] = [(0.0, 0); 32];
    let mut len = 0usize;
    let insert = |v: f32, i: usize, best: &mut [(f32, usize); 32], len: &mut usize| {
        if *len == k {
            if v.partial_cmp(&best[k - 1].0) != Some(std::cmp::Ordering::Greater) {
                return;
            }
            *len -= 1;
        }
        let mut pos = *len;
        while pos > 0 && best[pos - 1].0 < v {
            best[pos] = best[pos - 1];
            pos -= 1;
        }
        best[pos] = (v, i);
        *len += 1;
    };
    let head = k.min(values.len());
    for (i, &v) in values[..head].iter().enumerate() {
        insert(v, i, &mut best, &mut len);
    }
    let mut start = head;
    for chunk in values[head..].chunks(8) {
        let threshold = best[k - 1].0;
        let mut any = false;
        for &v in chunk {
            any |= v > threshold;
        }
        if any {
            for (o, &v) in chunk.iter().enumerate() {
                insert(v, start + o, &mut best, &mut len);
            }
        }
        start += chunk.len();
    }
    out.extend(best[..len].iter().map(|&(_, i)| i));
}

/// [`top_k_indices`] for a vector that changed little since its top-k was `seed` (an iterative
/// solver's previous step): the seed fills the buffer, so a scan usually inserts nothing.
/// The result is the same as `top_k_indices`: ranking is by (value descending, index ascending),
/// a total order, so the insertion sequence cannot matter.
pub fn top_k_indices_seeded(values: &[f32], k: usize, seed: &[usize], out: &mut Vec<usize>) {
    let k = k.min(values.len());
    if seed.len() != k || k <= 2 {
        // Small k gains nothing from a seed (argmax and short insertions are already cheap).
        top_k_indices(values, k, out);
        return;
    }
    let beats = |a: (f32, usize), b: (f32, usize)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
    let mut best: Vec<(f32, usize)> = seed.iter().map(|&i| (values[i], i)).collect();
    best.sort_unstable_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
    });
    let mut start = 0;
    for chunk in values.chunks(8) {
        let threshold = best[k - 1].0;
        let mut any = false;
        for &v in chunk {
            any |= v >= threshold;
        }
        if any {
            for (o, &v) in chunk.iter().enumerate() {
                let cand = (v, start + o);
                if beats(cand, best[k - 1]) && !best.iter().any(|&(_, i)| i == cand.1) {
                    let pos = best.partition_point(|&b| beats(b, cand));
                    best.pop();
                    best.insert(pos, cand);
                }
            }
        }
        start += chunk.len();
    }
    out.clear();
    out.extend(best.iter().map(|&(_, i)| i));
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
        top_k_indices(&[1.0, 2.0, 2.0, -1.0], 1, &mut out);
        assert_eq!(out, [1]);
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
        top_k_indices(&values, 30, &mut small);
        assert_eq!(small, want[..30]);
    }

    #[test]
    fn seeded_top_k_equals_plain_top_k() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 7) as f32 * 0.5
        };
        for n in [1usize, 5, 17, 64, 300] {
            for k in [1usize, 2, 8, 40] {
                let values: Vec<f32> = (0..n).map(|_| next()).collect();
                let k = k.min(n);
                let mut plain = Vec::new();
                top_k_indices(&values, k, &mut plain);
                // Any seed of the right size, good or bad, gives the same answer.
                let seeds: [Vec<usize>; 2] = [(0..k).collect(), (n - k..n).rev().collect()];
                for seed in seeds {
                    let mut seeded = Vec::new();
                    top_k_indices_seeded(&values, k, &seed, &mut seeded);
                    assert_eq!(seeded, plain, "n {n} k {k} seed {seed:?}");
                }
            }
        }
    }

    #[test]
    fn stable_order_keeps_equal_priorities_in_token_order() {
        assert_eq!(
            stable_descending_order(&[0.5, 0.9, 0.5, 0.9, 0.1]),
            [1, 3, 0, 2, 4]
        );
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
