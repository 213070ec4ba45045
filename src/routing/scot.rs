//! Sparsity-constrained optimal transport ("SCOT"), as vmoe's k-sparse projection routers solve
//! it: jaxopt's semi-dual with a top-κ sparse max per column, minimised by Adam.
//!
//! Spec §2.0: `F(α) = Σ_j b_j·M_j(α + Σ[:, j]) − ⟨α, a⟩`, gradient `Σ_j b_j·p*_j − a` with
//! `p*_j = SparseSimplexProj((α + Σ[:, j]) / b_j, κ)`; Adam (optax defaults, lr 1e-2), α₀ = 0,
//! at most `maxiter` updates, stopping after an update whose pre-update gradient norm was ≤ 1e-3;
//! plan `P[:, j] = b_j·p*_j(α_final)`. The plan is loose on purpose: 20 small steps leave row sums
//! visibly off 1, and that is the reference behaviour (spec §5.9).

use super::ops::{top_k_indices, top_k_indices_seeded};

/// jaxopt's default tolerance on the gradient norm.
pub const SCOT_TOL: f32 = 1e-3;
const ADAM_B1: f32 = 0.9;
const ADAM_B2: f32 = 0.999;
const ADAM_EPS: f32 = 1e-8;
// optax forms `1 − decay` in Python (double precision) before it meets the f32 moments: 0.1 and
// 0.001 rounded once, not `1 − 0.9f32` (one ulp off, which 20 Adam steps amplify).
const ONE_MINUS_B1: f32 = 0.1;
const ONE_MINUS_B2: f32 = 0.001;

/// A sparse plan and how the solver ended.
#[derive(Clone, Debug, PartialEq)]
pub struct ScotPlan {
    /// Row-major plan with the orientation of the input similarity.
    pub plan: Vec<f32>,
    /// Adam updates applied.
    pub iterations: usize,
    /// Whether the gradient-norm test stopped the solver before `maxiter`.
    pub converged: bool,
}

/// Solver settings: at most `kappa` nonzeros per column, `max_iterations` Adam steps of size
/// `adam_lr` (vmoe: 20 and 1e-2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScotOptions {
    pub kappa: usize,
    pub max_iterations: usize,
    pub adam_lr: f32,
}

/// Column-sparse plan of a row-major `[m, q]` similarity matrix with uniform marginals
/// `(a, b)`: every row should carry `a`, every column carries exactly `b`.
pub fn scot_columns(
    sim: &[f32],
    m: usize,
    q: usize,
    marginals: (f32, f32),
    opts: &ScotOptions,
) -> ScotPlan {
    debug_assert_eq!(sim.len(), m * q);
    let (a, b) = marginals;
    let ScotOptions {
        kappa,
        max_iterations: maxiter,
        adam_lr,
    } = *opts;
    // Column-major copy, so that each column's sparse max reads contiguous memory.
    let mut cols = vec![0.0f32; m * q];
    for (i, row) in sim.chunks_exact(q).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            cols[j * m + i] = v;
        }
    }
    let mut solver = Projector::new(m, q, kappa);
    let mut alpha = vec![0.0f32; m];
    let mut mom1 = vec![0.0f32; m];
    let mut mom2 = vec![0.0f32; m];
    let mut grad = vec![0.0f32; m];
    let mut iterations = 0;
    let mut converged = false;
    while iterations < maxiter.max(1) {
        // ∇F(α) = (Σ_j b·p*_j) − a, summed over columns first and `a` subtracted last, as the
        // reference's autodiff does: with b = n/e the column sum often lands exactly on `a`, and
        // a residue of one ulp there would become a full-size Adam step (Adam divides by |g|).
        grad.iter_mut().for_each(|g| *g = 0.0);
        for j in 0..q {
            solver.project_column(j, &cols[j * m..(j + 1) * m], &alpha, b);
            for (&i, &p) in solver.support.iter().zip(&solver.values) {
                grad[i] += b * p;
            }
        }
        grad.iter_mut().for_each(|g| *g -= a);
        let norm = grad.iter().map(|g| g * g).sum::<f32>().sqrt();
        iterations += 1;
        let t = iterations as i32;
        let bc1 = 1.0 - ADAM_B1.powi(t);
        let bc2 = 1.0 - ADAM_B2.powi(t);
        for i in 0..m {
            let g = grad[i];
            mom1[i] = ONE_MINUS_B1 * g + ADAM_B1 * mom1[i];
            mom2[i] = ONE_MINUS_B2 * (g * g) + ADAM_B2 * mom2[i];
            let m_hat = mom1[i] / bc1;
            let v_hat = mom2[i] / bc2;
            alpha[i] += -adam_lr * (m_hat / (v_hat.sqrt() + ADAM_EPS));
        }
        if norm <= SCOT_TOL {
            converged = true;
            break;
        }
    }
    let mut plan = vec![0.0f32; m * q];
    for j in 0..q {
        solver.project_column(j, &cols[j * m..(j + 1) * m], &alpha, b);
        for (&i, &p) in solver.support.iter().zip(&solver.values) {
            plan[i * q + j] = b * p;
        }
    }
    ScotPlan {
        plan,
        iterations,
        converged,
    }
}

/// Scratch space for the sparse simplex projection of one column, plus each column's previous
/// top-κ: α moves little per Adam step, so it seeds the next top-κ search.
struct Projector {
    column: Vec<f32>,
    top: Vec<usize>,
    support: Vec<usize>,
    values: Vec<f32>,
    previous: Vec<Vec<usize>>,
    kappa: usize,
}

impl Projector {
    fn new(m: usize, q: usize, kappa: usize) -> Self {
        Self {
            column: vec![0.0; m],
            top: Vec::with_capacity(kappa),
            support: Vec::with_capacity(kappa),
            values: Vec::with_capacity(kappa),
            previous: vec![Vec::new(); q],
            kappa,
        }
    }

    /// Projects `(α + column) / scale` onto the κ-sparse simplex; leaves the nonzero entries in
    /// `support`/`values`.
    fn project_column(&mut self, j: usize, column: &[f32], alpha: &[f32], scale: f32) {
        for ((x, &al), &s) in self.column.iter_mut().zip(alpha).zip(column) {
            *x = (al + s) / scale;
        }
        top_k_indices_seeded(&self.column, self.kappa, &self.previous[j], &mut self.top);
        self.previous[j].clone_from(&self.top);
        simplex_on_top(&self.column, &self.top, &mut self.values);
        self.support.clear();
        let mut w = 0;
        for r in 0..self.top.len() {
            if self.values[r] > 0.0 {
                self.support.push(self.top[r]);
                self.values[w] = self.values[r];
                w += 1;
            }
        }
        self.values.truncate(w);
    }
}

/// Euclidean projection onto the probability simplex restricted to at most `kappa` nonzeros
/// (jaxopt `projection_sparse_simplex`, Kyrillidis et al. 2013). Writes the indices of the κ
/// largest entries to `top` (top-k order) and their projected values to `values` (some may be 0).
pub fn sparse_simplex_projection(
    x: &[f32],
    kappa: usize,
    top: &mut Vec<usize>,
    values: &mut Vec<f32>,
) {
    top_k_indices(x, kappa, top);
    simplex_on_top(x, top, values);
}

/// The simplex projection of the entries `x[top]` (already in top-k order).
fn simplex_on_top(x: &[f32], top: &[usize], values: &mut Vec<f32>) {
    values.clear();
    // ρ = #{r : 1/r + v_r − C_r/r > 0}, evaluated in the reference's operation order.
    let mut cumsum = 0.0f32;
    let mut rho = 0usize;
    let mut c_rho = 0.0f32;
    for (r, &i) in top.iter().enumerate() {
        let v = x[i];
        cumsum += v;
        let ind = (r + 1) as f32;
        if 1.0 / ind + (v - cumsum / ind) > 0.0 {
            rho += 1;
        }
        values.push(v);
    }
    if rho == 0 {
        // Cannot happen for finite inputs (r = 1 always qualifies); keep the output well defined.
        values.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    // C_ρ: cumulative sum of the ρ largest (the condition holds on a prefix).
    for &v in &values[..rho] {
        c_rho += v;
    }
    let rho_f = rho as f32;
    for v in values.iter_mut() {
        *v = (1.0 / rho_f + (*v - c_rho / rho_f)).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::golden::{GOLDEN_LOGITS, GOLDEN_SOFTMAX};
    use crate::routing::ops::softmax_rows;

    fn project(x: &[f32], k: usize) -> Vec<f32> {
        let (mut top, mut values) = (Vec::new(), Vec::new());
        sparse_simplex_projection(x, k, &mut top, &mut values);
        let mut out = vec![0.0; x.len()];
        for (&i, &v) in top.iter().zip(&values) {
            out[i] = v;
        }
        out
    }

    #[test]
    fn projection_examples() {
        assert_eq!(project(&[0.5, 0.2, 0.9], 1), [0.0, 0.0, 1.0]);
        let p = project(&[0.5, 0.5, 0.0], 2);
        assert_eq!(p, [0.5, 0.5, 0.0]);
        let p = project(&[2.0, 0.0, 0.1, 1.9], 3);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[0] - 0.55).abs() < 1e-6 && (p[3] - 0.45).abs() < 1e-6 && p[2] == 0.0);
        // Already on the simplex stays put.
        let p = project(&[0.2, 0.3, 0.5], 3);
        assert!((p[0] - 0.2).abs() < 1e-6 && (p[2] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn golden_scot_ec_plan() {
        let s = softmax_rows(&GOLDEN_LOGITS, 4);
        for (a, b) in s.iter().zip(GOLDEN_SOFTMAX) {
            assert!((a - b).abs() < 5e-6);
        }
        let opts = ScotOptions {
            kappa: 2,
            max_iterations: 20,
            adam_lr: 1e-2,
        };
        let out = scot_columns(&s, 8, 4, (1.0, 2.0), &opts);
        let want: [(usize, usize, f32); 8] = [
            (1, 0, 1.01011),
            (4, 0, 0.98989),
            (2, 1, 1.00958),
            (6, 1, 0.99042),
            (3, 2, 0.95298),
            (5, 2, 1.04702),
            (0, 3, 0.99489),
            (7, 3, 1.00511),
        ];
        let mut expected = [0.0f32; 32];
        for (i, j, v) in want {
            expected[i * 4 + j] = v;
        }
        for (idx, (a, b)) in out.plan.iter().zip(expected).enumerate() {
            assert!(
                (a - b).abs() < 2e-5,
                "entry ({}, {}): {a} vs {b}",
                idx / 4,
                idx % 4
            );
        }
        for j in 0..4 {
            let col: f32 = (0..8).map(|i| out.plan[i * 4 + j]).sum();
            assert!((col - 2.0).abs() < 1e-5);
        }
    }

    #[test]
    fn golden_scot_tc_plan_is_the_hard_assignment() {
        let s = softmax_rows(&GOLDEN_LOGITS, 4);
        // Transpose to e × n: tokens become columns with marginal 1, experts rows with n/e.
        let mut st = vec![0.0f32; 32];
        for i in 0..8 {
            for j in 0..4 {
                st[j * 8 + i] = s[i * 4 + j];
            }
        }
        let opts = ScotOptions {
            kappa: 1,
            max_iterations: 20,
            adam_lr: 1e-2,
        };
        let out = scot_columns(&st, 4, 8, (2.0, 1.0), &opts);
        let want = [3, 0, 1, 2, 0, 2, 1, 3];
        for (i, &j) in want.iter().enumerate() {
            for jj in 0..4 {
                let v = out.plan[jj * 8 + i];
                assert_eq!(v, if jj == j { 1.0 } else { 0.0 }, "token {i} expert {jj}");
            }
        }
    }
}
