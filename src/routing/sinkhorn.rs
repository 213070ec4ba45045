//! Entropic OT plan between tokens and experts, as vmoe's KL-projection routers compute it
//! (ott-jax `sinkhorn`, kernel mode, ε = 1, fixed iteration count).
//!
//! Spec §2.0: row marginals 1 (each token's mass), column marginals n/e (equal expert load),
//! `K = exp(Z)`, each iteration updates `v` then `u`, zero denominators divide by 1, and
//! `maxiter` runs `10·floor(maxiter/10)` iterations (so 0 below 10).
//!
//! Float32 safety (spec §5.8): when the largest logit would overflow `exp`, one global constant is
//! subtracted first, which leaves every iterate's plan unchanged. If a kernel-mode denominator
//! still underflows to zero or an iterate stops being finite (logit spreads beyond ~80), the plan is
//! recomputed in the log domain, which has the same fixed point. The reference's zero-denominator
//! guard would return zero rows (or NaNs) there, routing those tokens by the tie rule alone; that
//! degenerate case is the one deliberate divergence. Ordinary logits never reach it.

use super::ops::dot;

/// Largest logit that `exp` takes safely in f32 (exp(88.7) overflows).
const EXP_SAFE_MAX: f32 = 80.0;

/// A Sinkhorn plan and how it was computed.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkhornPlan {
    /// Row-major `[n, e]` plan.
    pub plan: Vec<f32>,
    /// Iterations actually run (`10·floor(maxiter/10)`).
    pub iterations: usize,
    /// True when the log-domain fallback was needed.
    pub log_domain: bool,
}

/// Iterations OTT runs for `min_iterations == max_iterations == maxiter` (inner_iterations = 10).
pub fn sinkhorn_iterations(maxiter: usize) -> usize {
    10 * (maxiter / 10)
}

/// Sinkhorn plan of a row-major `[n, e]` logit matrix (similarity = logits, ε = 1).
pub fn sinkhorn_plan(logits: &[f32], n: usize, e: usize, maxiter: usize) -> SinkhornPlan {
    debug_assert_eq!(logits.len(), n * e);
    let iterations = sinkhorn_iterations(maxiter);
    let b = (n as f64 / e as f64) as f32;
    let global_max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let shift = if global_max > EXP_SAFE_MAX {
        global_max
    } else {
        0.0
    };
    let kernel: Vec<f32> = logits.iter().map(|&z| (z - shift).exp()).collect();

    if let Some(plan) = kernel_mode(&kernel, n, e, b, iterations) {
        return SinkhornPlan {
            plan,
            iterations,
            log_domain: false,
        };
    }
    SinkhornPlan {
        plan: log_domain(logits, n, e, b, iterations),
        iterations,
        log_domain: true,
    }
}

/// The reference's kernel-mode iterations; `None` when a denominator underflowed to zero or a
/// value went non-finite.
fn kernel_mode(kernel: &[f32], n: usize, e: usize, b: f32, iterations: usize) -> Option<Vec<f32>> {
    let mut u = vec![1.0f32; n];
    let mut v = vec![1.0f32; e];
    let mut col = vec![0.0f32; e];
    for _ in 0..iterations {
        // v = b / (Kᵀ u)
        col.iter_mut().for_each(|c| *c = 0.0);
        for (row, &ui) in kernel.chunks_exact(e).zip(&u) {
            for (c, &k) in col.iter_mut().zip(row) {
                *c += k * ui;
            }
        }
        for (vj, &c) in v.iter_mut().zip(&col) {
            if c == 0.0 || !c.is_finite() {
                return None;
            }
            *vj = b / c;
        }
        // u = a / (K v), a = 1
        for (row, ui) in kernel.chunks_exact(e).zip(u.iter_mut()) {
            let s = dot(row, &v);
            if s == 0.0 || !s.is_finite() {
                return None;
            }
            *ui = 1.0 / s;
        }
    }
    let mut plan = Vec::with_capacity(n * e);
    for (row, &ui) in kernel.chunks_exact(e).zip(&u) {
        plan.extend(row.iter().zip(&v).map(|(&k, &vj)| ui * k * vj));
    }
    plan.iter().all(|p| p.is_finite()).then_some(plan)
}

/// Log-domain Sinkhorn in f64: `g = log b − LSE_i(z + f)`, `f = −LSE_j(z + g)`.
fn log_domain(logits: &[f32], n: usize, e: usize, b: f32, iterations: usize) -> Vec<f32> {
    let z: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let mut f = vec![0.0f64; n];
    let mut g = vec![0.0f64; e];
    if iterations == 0 {
        // No balancing at all: exp(Z) up to one global factor.
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        return z.iter().map(|&x| (x - max).exp() as f32).collect();
    }
    let log_b = (b as f64).ln();
    let mut buf = vec![0.0f64; n.max(e)];
    for _ in 0..iterations {
        for j in 0..e {
            for i in 0..n {
                buf[i] = z[i * e + j] + f[i];
            }
            g[j] = log_b - log_sum_exp(&buf[..n]);
        }
        for i in 0..n {
            for j in 0..e {
                buf[j] = z[i * e + j] + g[j];
            }
            f[i] = -log_sum_exp(&buf[..e]);
        }
    }
    let mut plan = Vec::with_capacity(n * e);
    for i in 0..n {
        for j in 0..e {
            plan.push((z[i * e + j] + f[i] + g[j]).exp() as f32);
        }
    }
    plan
}

fn log_sum_exp(x: &[f64]) -> f64 {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + x.iter().map(|&v| (v - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::golden::{GOLDEN_LOGITS, GOLDEN_SINKHORN_PLAN};

    fn row_sums(p: &[f32], e: usize) -> Vec<f32> {
        p.chunks_exact(e).map(|r| r.iter().sum()).collect()
    }

    #[test]
    fn golden_plan_20_iterations() {
        let out = sinkhorn_plan(&GOLDEN_LOGITS, 8, 4, 20);
        assert_eq!(out.iterations, 20);
        assert!(!out.log_domain);
        for (i, (a, b)) in out.plan.iter().zip(GOLDEN_SINKHORN_PLAN).enumerate() {
            assert!((a - b).abs() < 6e-6, "entry {i}: {a} vs {b}");
        }
        for s in row_sums(&out.plan, 4) {
            assert!((s - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn iteration_count_follows_ott_blocks() {
        assert_eq!(sinkhorn_iterations(20), 20);
        assert_eq!(sinkhorn_iterations(29), 20);
        assert_eq!(sinkhorn_iterations(9), 0);
        assert_eq!(sinkhorn_iterations(0), 0);
        // Below 10 the plan is just exp(logits).
        let out = sinkhorn_plan(&GOLDEN_LOGITS, 8, 4, 5);
        for (p, z) in out.plan.iter().zip(GOLDEN_LOGITS) {
            assert!((p - z.exp()).abs() < 1e-6);
        }
    }

    #[test]
    fn global_shift_leaves_the_plan_unchanged() {
        let shifted: Vec<f32> = GOLDEN_LOGITS.iter().map(|z| z + 95.0).collect();
        let a = sinkhorn_plan(&GOLDEN_LOGITS, 8, 4, 20);
        let b = sinkhorn_plan(&shifted, 8, 4, 20);
        assert!(!b.log_domain);
        for (x, y) in a.plan.iter().zip(&b.plan) {
            assert!((x - y).abs() < 2e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn huge_spreads_fall_back_to_log_domain_and_stay_finite() {
        let mut z = GOLDEN_LOGITS.to_vec();
        for v in &mut z[..4] {
            *v -= 100.0;
        }
        for v in &mut z[4..8] {
            *v += 100.0;
        }
        let out = sinkhorn_plan(&z, 8, 4, 20);
        assert!(out.log_domain);
        assert!(out.plan.iter().all(|p| p.is_finite() && *p >= 0.0));
        for s in row_sums(&out.plan, 4) {
            assert!((s - 1.0).abs() < 1e-5, "{s}");
        }
    }

    #[test]
    fn underflowing_denominators_fall_back_to_log_domain() {
        // One expert, spread 170: exp(−56)·v underflows in f32 although no logit overflows.
        let z = [-56.25, 29.86, -96.5, 77.07, -49.3];
        let out = sinkhorn_plan(&z, 5, 1, 20);
        assert!(out.log_domain);
        for p in out.plan {
            assert!((p - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn log_domain_agrees_with_kernel_mode() {
        let kernel: Vec<f32> = GOLDEN_LOGITS.iter().map(|z| z.exp()).collect();
        let a = kernel_mode(&kernel, 8, 4, 2.0, 20).unwrap();
        let b = log_domain(&GOLDEN_LOGITS, 8, 4, 2.0, 20);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
    }
}
