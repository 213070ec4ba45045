//! The outcome of routing one group: the dispatch and combine tensors of spec §1, in compact form,
//! with dense `[n, e, c]` views and the statistics the viewer plots.
//!
//! Sparse routers store who sits in each expert slot and, per token, every expert it asked for or
//! was picked by (Token Choice keeps dropped choices, so the viewer can mark them). Soft MoE stores
//! its two dense `[n, e·p]` weight matrices.

use super::RouterKind;

/// One (token, expert) pairing of a sparse router.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// Expert index.
    pub expert: u32,
    /// Slot in that expert's buffer, or `None` when the choice was dropped (over capacity).
    pub slot: Option<u32>,
    /// The combine gate `w[i, j]`; it reaches the token only when `slot` is `Some`.
    pub gate: f32,
}

impl Choice {
    /// The weight this choice contributes to the token's output (`Γ`).
    pub fn combine_weight(&self) -> f32 {
        if self.slot.is_some() { self.gate } else { 0.0 }
    }
}

/// Sparse routing: `D ∈ {0, 1}`, one token per slot, `Γ = D ⊙ w`.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseAssignment {
    /// `[e·c]`: the token in slot `(j, s)` at `j·c + s`, if any.
    pub slot_token: Vec<Option<u32>>,
    /// `[e·c]`: the combine weight of that slot (0 when empty).
    pub slot_gate: Vec<f32>,
    /// CSR offsets into `choices`, `n + 1` entries.
    pub choice_offsets: Vec<u32>,
    /// Per token: Token Choice in rank order (dropped ones included); Expert Choice in expert
    /// order (only the experts that picked the token).
    pub choices: Vec<Choice>,
    /// `[e]`: how many (token, expert) requests each expert received, including those beyond
    /// capacity (Token Choice); equal to the filled slots for Expert Choice.
    pub requests: Vec<u32>,
    /// `[n, e]`: the matrix the selection ranked (softmax, Sinkhorn plan or sparse OT plan).
    pub scores: Vec<f32>,
    /// `[n, e]`: the combine gate matrix `w` (softmax probabilities unless configured otherwise).
    pub gates: Vec<f32>,
}

/// Soft MoE: every slot is a convex combination of all tokens and vice versa.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftAssignment {
    /// `[n, e·p]`: column `(j, s)` is slot `(j, s)`'s weights over tokens (sums to 1 over tokens).
    pub dispatch: Vec<f32>,
    /// `[n, e·p]`: row `i` is token `i`'s weights over all slots (sums to 1 over slots).
    pub combine: Vec<f32>,
    /// `[n, e·p]`: the logits `scale·cos(x_i, μ_js)` both softmaxes came from.
    pub logits: Vec<f32>,
}

/// Compact routing of one group.
#[derive(Clone, Debug, PartialEq)]
pub enum Assignment {
    Sparse(SparseAssignment),
    Soft(SoftAssignment),
}

/// Auxiliary losses of spec §2.0 (per group). `None` where the router does not compute a term.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AuxLosses {
    pub importance: Option<f32>,
    pub load: Option<f32>,
    pub gshard: Option<f32>,
    /// Weighted sum of the computed terms.
    pub total: f32,
}

/// How an iterative solver ended (Sinkhorn or sparsity-constrained OT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SolverInfo {
    pub iterations: usize,
    /// SCOT: stopped early on the gradient-norm test.
    pub converged: bool,
    /// Sinkhorn: the log-domain fallback ran (see `sinkhorn`).
    pub log_domain: bool,
}

/// Routing of one group of `n` tokens to `e` experts with `c` slots each.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingResult {
    pub router: RouterKind,
    pub num_tokens: usize,
    pub num_experts: usize,
    /// Slots per expert `c` (Soft MoE: `p`).
    pub capacity: usize,
    /// Experts chosen per token (Token Choice `k`; 1 otherwise).
    pub k: usize,
    /// The `N` the capacity was computed from (`n·k` for Token Choice, `n` otherwise).
    pub capacity_tokens: usize,
    pub assignment: Assignment,
    pub aux: AuxLosses,
    pub solver: Option<SolverInfo>,
}

/// Derived statistics for plots and summaries.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingStats {
    pub capacity: usize,
    /// `e·c / N`: the capacity factor after rounding and padding.
    pub actual_capacity_factor: f64,
    /// Filled slots per expert (Soft MoE: `n`, every token reaches every slot).
    pub tokens_per_expert: Vec<usize>,
    /// Requests per expert, overflow included (Token Choice); equals `tokens_per_expert` otherwise.
    pub requests_per_expert: Vec<usize>,
    /// Tokens that reach no expert at all (their MoE output is 0).
    pub dropped_tokens: Vec<usize>,
    /// (token, expert) choices lost to capacity (Token Choice).
    pub dropped_choices: usize,
    /// Number of experts processing each token.
    pub experts_per_token: Vec<usize>,
    /// `hist[t]` = number of tokens processed by exactly `t` experts, `t = 0..=e`.
    pub experts_per_token_histogram: Vec<usize>,
}

impl RoutingResult {
    /// Total slots `e·c`.
    pub fn num_slots(&self) -> usize {
        self.num_experts * self.capacity
    }

    /// The sparse assignment, if this is a sparse router.
    pub fn sparse(&self) -> Option<&SparseAssignment> {
        match &self.assignment {
            Assignment::Sparse(s) => Some(s),
            Assignment::Soft(_) => None,
        }
    }

    /// The Soft MoE weights, if this is Soft MoE.
    pub fn soft(&self) -> Option<&SoftAssignment> {
        match &self.assignment {
            Assignment::Soft(s) => Some(s),
            Assignment::Sparse(_) => None,
        }
    }

    /// Choices of token `i` (empty for Soft MoE).
    pub fn token_choices(&self, i: usize) -> &[Choice] {
        match &self.assignment {
            Assignment::Sparse(s) => {
                &s.choices[s.choice_offsets[i] as usize..s.choice_offsets[i + 1] as usize]
            }
            Assignment::Soft(_) => &[],
        }
    }

    /// Per-token, per-expert probabilities for display: the combine gates of a sparse router, or a
    /// Soft MoE token's combine weight summed over each expert's slots. `[n, e]`.
    pub fn expert_probabilities(&self) -> Vec<f32> {
        match &self.assignment {
            Assignment::Sparse(s) => s.gates.clone(),
            Assignment::Soft(s) => {
                let (e, p) = (self.num_experts, self.capacity);
                s.combine
                    .chunks_exact(e * p)
                    .flat_map(|row| row.chunks_exact(p).map(|slots| slots.iter().sum::<f32>()))
                    .collect()
            }
        }
    }

    /// Dense dispatch tensor `D`, row-major `[n, e, c]`.
    pub fn dispatch_dense(&self) -> Vec<f32> {
        match &self.assignment {
            Assignment::Sparse(s) => self.sparse_dense(s, |_| 1.0),
            Assignment::Soft(s) => s.dispatch.clone(),
        }
    }

    /// Dense combine tensor `Γ`, row-major `[n, e, c]`.
    pub fn combine_dense(&self) -> Vec<f32> {
        match &self.assignment {
            Assignment::Sparse(s) => self.sparse_dense(s, |slot| s.slot_gate[slot]),
            Assignment::Soft(s) => s.combine.clone(),
        }
    }

    fn sparse_dense(&self, s: &SparseAssignment, value: impl Fn(usize) -> f32) -> Vec<f32> {
        let ec = self.num_slots();
        let mut out = vec![0.0f32; self.num_tokens * ec];
        for (slot, token) in s.slot_token.iter().enumerate() {
            if let Some(t) = token {
                out[*t as usize * ec + slot] = value(slot);
            }
        }
        out
    }

    /// Statistics of this routing.
    pub fn stats(&self) -> RoutingStats {
        let (n, e, c) = (self.num_tokens, self.num_experts, self.capacity);
        let actual_capacity_factor = (e * c) as f64 / self.capacity_tokens.max(1) as f64;
        match &self.assignment {
            Assignment::Sparse(s) => {
                let tokens_per_expert: Vec<usize> = s
                    .slot_token
                    .chunks_exact(c)
                    .map(|slots| slots.iter().filter(|t| t.is_some()).count())
                    .collect();
                let mut experts_per_token = Vec::with_capacity(n);
                let mut dropped_choices = 0;
                for i in 0..n {
                    let ch = self.token_choices(i);
                    let kept = ch.iter().filter(|c| c.slot.is_some()).count();
                    dropped_choices += ch.len() - kept;
                    experts_per_token.push(kept);
                }
                let dropped_tokens = (0..n)
                    .filter(|&i| experts_per_token[i] == 0)
                    .collect::<Vec<_>>();
                let mut hist = vec![0usize; e + 1];
                for &m in &experts_per_token {
                    hist[m.min(e)] += 1;
                }
                RoutingStats {
                    capacity: c,
                    actual_capacity_factor,
                    tokens_per_expert,
                    requests_per_expert: s.requests.iter().map(|&r| r as usize).collect(),
                    dropped_tokens,
                    dropped_choices,
                    experts_per_token,
                    experts_per_token_histogram: hist,
                }
            }
            Assignment::Soft(_) => {
                let mut hist = vec![0usize; e + 1];
                hist[e] = n;
                RoutingStats {
                    capacity: c,
                    actual_capacity_factor,
                    tokens_per_expert: vec![n; e],
                    requests_per_expert: vec![n; e],
                    dropped_tokens: Vec::new(),
                    dropped_choices: 0,
                    experts_per_token: vec![e; n],
                    experts_per_token_histogram: hist,
                }
            }
        }
    }
}
