//! Comparing a GPU run with the CPU reference: class probabilities, the expert assignments of
//! every token (a differing assignment is excused only where the scores that decided it tie within
//! float error), and Soft MoE weights.

use crate::model::ForwardOutput;
use crate::routing::{RouterFamily, RoutingResult};

/// Scores closer than this (probabilities and plans lie in [0, 1]) count as a tie.
pub const TIE_EPS: f32 = 1e-5;

/// How far a GPU output is from the CPU one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParityReport {
    /// Largest |p_gpu − p_cpu| over all class probabilities.
    pub max_prob_diff: f32,
    /// Tokens routed (layers × groups × tokens) by the sparse routers.
    pub tokens: usize,
    /// Tokens whose experts or kept/dropped status differ, where the deciding scores tie.
    pub tie_mismatches: usize,
    /// Tokens that differ with no tie to explain it: a bug.
    pub mismatches: usize,
    /// Largest difference of a Soft MoE dispatch or combine weight, or of a sparse score.
    pub max_weight_diff: f32,
}

impl ParityReport {
    pub fn merge(&mut self, o: &ParityReport) {
        self.max_prob_diff = self.max_prob_diff.max(o.max_prob_diff);
        self.tokens += o.tokens;
        self.tie_mismatches += o.tie_mismatches;
        self.mismatches += o.mismatches;
        self.max_weight_diff = self.max_weight_diff.max(o.max_weight_diff);
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Compares two outputs of the same images and options.
pub fn compare(cpu: &ForwardOutput, gpu: &ForwardOutput) -> ParityReport {
    let mut r = ParityReport::default();
    if cpu.probs.len() != gpu.probs.len() || cpu.records.len() != gpu.records.len() {
        r.max_prob_diff = f32::INFINITY;
        r.mismatches = usize::MAX / 2;
        return r;
    }
    for (a, b) in cpu.probs.iter().zip(&gpu.probs) {
        r.max_prob_diff = r.max_prob_diff.max(max_diff(a, b));
    }
    for (la, lb) in cpu.records.iter().zip(&gpu.records) {
        for (ga, gb) in la.groups.iter().zip(&lb.groups) {
            r.merge(&compare_routing(&ga.routing, &gb.routing));
        }
    }
    r
}

/// Compares the routing of one group.
pub fn compare_routing(cpu: &RoutingResult, gpu: &RoutingResult) -> ParityReport {
    let mut r = ParityReport::default();
    if (cpu.num_tokens, cpu.num_experts, cpu.capacity, cpu.router)
        != (gpu.num_tokens, gpu.num_experts, gpu.capacity, gpu.router)
    {
        r.mismatches = cpu.num_tokens.max(1);
        return r;
    }
    if let (Some(a), Some(b)) = (cpu.soft(), gpu.soft()) {
        r.max_weight_diff =
            max_diff(&a.dispatch, &b.dispatch).max(max_diff(&a.combine, &b.combine));
        return r;
    }
    let (Some(a), Some(b)) = (cpu.sparse(), gpu.sparse()) else {
        r.mismatches = cpu.num_tokens.max(1);
        return r;
    };
    let (n, e, c) = (cpu.num_tokens, cpu.num_experts, cpu.capacity);
    r.tokens = n;
    r.max_weight_diff = max_diff(&a.scores, &b.scores);
    let tc = cpu.router.family() == RouterFamily::TokenChoice;
    let s = &a.scores;
    // Boundary scores of every expert column (Expert Choice): the c-th and (c+1)-th best.
    let boundary: Vec<(f32, f32)> = (0..e)
        .map(|j| {
            let mut col: Vec<f32> = (0..n).map(|i| s[i * e + j]).collect();
            col.sort_by(|x, y| y.total_cmp(x));
            (
                col[c.min(n) - 1],
                col.get(c).copied().unwrap_or(f32::NEG_INFINITY),
            )
        })
        .collect();
    let top1 = |i: usize| {
        (0..e)
            .map(|j| s[i * e + j])
            .fold(f32::NEG_INFINITY, f32::max)
    };
    let mut expert_ties = false;
    let mut kept_only = Vec::new();
    for i in 0..n {
        let (ca, cb) = (cpu.token_choices(i), gpu.token_choices(i));
        let experts = |ch: &[crate::routing::Choice]| {
            let mut v: Vec<u32> = ch.iter().map(|c| c.expert).collect();
            v.sort_unstable();
            v
        };
        let kept = |ch: &[crate::routing::Choice]| {
            let mut v: Vec<(u32, bool)> = ch.iter().map(|c| (c.expert, c.slot.is_some())).collect();
            v.sort_unstable();
            v
        };
        if kept(ca) == kept(cb) {
            continue;
        }
        if experts(ca) != experts(cb) {
            let (ea, eb) = (experts(ca), experts(cb));
            let differ: Vec<u32> = ea
                .iter()
                .filter(|j| !eb.contains(j))
                .chain(eb.iter().filter(|j| !ea.contains(j)))
                .copied()
                .collect();
            let tie = if tc {
                // A differing expert scores within TIE_EPS of one the other side picked.
                differ.iter().any(|&j| {
                    ea.iter().chain(&eb).any(|&o| {
                        o != j && (s[i * e + j as usize] - s[i * e + o as usize]).abs() <= TIE_EPS
                    })
                })
            } else {
                differ.iter().all(|&j| {
                    let v = s[i * e + j as usize];
                    let (lo, hi) = boundary[j as usize];
                    (v - lo).abs() <= TIE_EPS || (v - hi).abs() <= TIE_EPS
                })
            };
            if tie {
                expert_ties = true;
                r.tie_mismatches += 1;
            } else {
                r.mismatches += 1;
            }
        } else {
            kept_only.push(i);
        }
    }
    // Same experts, different kept/dropped: a capacity cascade from a tie elsewhere in the group,
    // or a tie in the Batch Priority order.
    for i in kept_only {
        let bpr_tie = (0..n).any(|t| t != i && (top1(t) - top1(i)).abs() <= TIE_EPS);
        if expert_ties || bpr_tie {
            r.tie_mismatches += 1;
        } else {
            r.mismatches += 1;
        }
    }
    r
}
