//! Comparing a GPU run with the CPU reference.
//!
//! The two backends compute the hidden states in a different float order, so router logits
//! differ by float error. A token whose experts (or kept/dropped status) differ counts as a *tie*
//! when that float error explains it: the CPU router, given the GPU's own logits, routes the token
//! exactly as the GPU did (so the GPU router kernels decided correctly, and only a decision within
//! float error of its boundary flipped), or the scores that decided it are within [`TIE_EPS`]. An
//! image touched by a tie in one MoE layer legitimately differs downstream (later layers and its
//! class probabilities); those are counted apart. Anything else is a mismatch: a bug.

use std::collections::BTreeSet;

use crate::model::ForwardOutput;
use crate::routing::{Choice, Mode, RouterFamily, RoutingResult, route_logits};

/// Scores closer than this (probabilities and plans lie in [0, 1]) count as a tie.
pub const TIE_EPS: f32 = 1e-5;

/// How far a GPU output is from the CPU one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParityReport {
    /// Largest |p_gpu − p_cpu| over the class probabilities of images no tie touched.
    pub max_prob_diff: f32,
    /// The same over images a tie touched (their routing legitimately differs).
    pub max_prob_diff_tied: f32,
    /// Images compared, and those a tie touched.
    pub images: usize,
    pub images_with_ties: usize,
    /// Tokens routed (layers × groups × tokens) by the sparse routers.
    pub tokens: usize,
    /// Tokens whose experts or kept/dropped status differ because of a tie (or downstream of one).
    pub tie_mismatches: usize,
    /// Tokens that differ with no tie to explain it: a bug.
    pub mismatches: usize,
    /// Largest |Δ| of a router logit, and of a sparse score or a Soft MoE dispatch/combine
    /// weight, over groups no earlier tie touched.
    pub max_logit_diff: f32,
    pub max_weight_diff: f32,
    /// Largest |Δ| of a final feature, and largest 1 − cosine between a token's two feature
    /// vectors, over images no tie touched.
    pub max_feature_diff: f32,
    pub max_feature_cosine_gap: f64,
}

impl ParityReport {
    pub fn merge(&mut self, o: &ParityReport) {
        self.max_prob_diff = self.max_prob_diff.max(o.max_prob_diff);
        self.max_prob_diff_tied = self.max_prob_diff_tied.max(o.max_prob_diff_tied);
        self.images += o.images;
        self.images_with_ties += o.images_with_ties;
        self.tokens += o.tokens;
        self.tie_mismatches += o.tie_mismatches;
        self.mismatches += o.mismatches;
        self.max_logit_diff = self.max_logit_diff.max(o.max_logit_diff);
        self.max_weight_diff = self.max_weight_diff.max(o.max_weight_diff);
        self.max_feature_diff = self.max_feature_diff.max(o.max_feature_diff);
        self.max_feature_cosine_gap = self.max_feature_cosine_gap.max(o.max_feature_cosine_gap);
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

/// A token's (expert, kept) pairs, order-free.
fn kept(ch: &[Choice]) -> Vec<(u32, bool)> {
    let mut v: Vec<(u32, bool)> = ch.iter().map(|c| (c.expert, c.slot.is_some())).collect();
    v.sort_unstable();
    v
}

/// Compares two outputs of the same images and options (CPU first) of a model of width `dim`
/// (its `hidden_size`: the length of one token's features).
pub fn compare(cpu: &ForwardOutput, gpu: &ForwardOutput, dim: usize) -> ParityReport {
    let mut r = ParityReport::default();
    if cpu.probs.len() != gpu.probs.len()
        || cpu.records.len() != gpu.records.len()
        || cpu.features.len() != gpu.features.len()
    {
        r.max_prob_diff = f32::INFINITY;
        r.mismatches = usize::MAX / 2;
        return r;
    }
    let mut tied_images = BTreeSet::new();
    for (li, (la, lb)) in cpu.records.iter().zip(&gpu.records).enumerate() {
        let router = &cpu.options.routers[li];
        let mut newly_tied = BTreeSet::new();
        for (ga, gb) in la.groups.iter().zip(&lb.groups) {
            let (a, b) = (&ga.routing, &gb.routing);
            let images = ga.first_image..ga.first_image + ga.num_images;
            let tainted = images.clone().any(|i| tied_images.contains(&i));
            if !tainted {
                r.max_logit_diff = r.max_logit_diff.max(max_diff(&ga.logits, &gb.logits));
            }
            if (a.num_tokens, a.num_experts, a.capacity, a.router)
                != (b.num_tokens, b.num_experts, b.capacity, b.router)
            {
                r.mismatches += a.num_tokens.max(1);
                continue;
            }
            if let (Some(sa), Some(sb)) = (a.soft(), b.soft()) {
                if !tainted {
                    let d = max_diff(&sa.dispatch, &sb.dispatch)
                        .max(max_diff(&sa.combine, &sb.combine));
                    r.max_weight_diff = r.max_weight_diff.max(d);
                }
                continue;
            }
            let (Some(sa), Some(sb)) = (a.sparse(), b.sparse()) else {
                r.mismatches += a.num_tokens.max(1);
                continue;
            };
            if !tainted {
                r.max_weight_diff = r.max_weight_diff.max(max_diff(&sa.scores, &sb.scores));
            }
            let n = a.num_tokens;
            let per_image = n / ga.num_images.max(1);
            r.tokens += n;
            let differing: Vec<usize> = (0..n)
                .filter(|&i| kept(a.token_choices(i)) != kept(b.token_choices(i)))
                .collect();
            if differing.is_empty() {
                continue;
            }
            // The CPU router on the GPU's logits: what the GPU should have decided.
            let replay =
                route_logits(&gb.logits, n, a.num_experts, router, Mode::Deterministic).ok();
            let near_tie = score_ties(a, &differing);
            for i in differing {
                let image = ga.first_image + i / per_image.max(1);
                let explained = tied_images.contains(&image)
                    || near_tie.contains(&i)
                    || replay
                        .as_ref()
                        .is_some_and(|rp| kept(rp.token_choices(i)) == kept(b.token_choices(i)));
                if explained {
                    r.tie_mismatches += 1;
                    newly_tied.insert(image);
                } else {
                    r.mismatches += 1;
                }
            }
        }
        tied_images.extend(newly_tied);
    }
    r.images = cpu.probs.len();
    r.images_with_ties = tied_images.len();
    for (i, (a, b)) in cpu.probs.iter().zip(&gpu.probs).enumerate() {
        let d = max_diff(a, b);
        if tied_images.contains(&i) {
            r.max_prob_diff_tied = r.max_prob_diff_tied.max(d);
        } else {
            r.max_prob_diff = r.max_prob_diff.max(d);
        }
    }
    for (i, (a, b)) in cpu.features.iter().zip(&gpu.features).enumerate() {
        if tied_images.contains(&i) {
            continue;
        }
        r.max_feature_diff = r.max_feature_diff.max(max_diff(a, b));
        if dim > 0 && a.len() == b.len() {
            for (x, y) in a.chunks_exact(dim).zip(b.chunks_exact(dim)) {
                r.max_feature_cosine_gap = r.max_feature_cosine_gap.max(1.0 - cosine(x, y));
            }
        }
    }
    r
}

/// Cosine similarity in f64 (1 for two zero vectors).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 && bb == 0.0 {
        return 1.0;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}

/// Of the `differing` tokens, those whose deciding CPU scores tie within [`TIE_EPS`]: a Token
/// Choice token with two of its candidate experts that close, an Expert Choice token at an
/// expert's selection boundary.
fn score_ties(cpu: &RoutingResult, differing: &[usize]) -> BTreeSet<usize> {
    let Some(sp) = cpu.sparse() else {
        return BTreeSet::new();
    };
    let (n, e, c) = (cpu.num_tokens, cpu.num_experts, cpu.capacity);
    let s = &sp.scores;
    let mut out = BTreeSet::new();
    if cpu.router.family() == RouterFamily::TokenChoice {
        for &i in differing {
            let mut row: Vec<f32> = s[i * e..(i + 1) * e].to_vec();
            row.sort_by(|x, y| y.total_cmp(x));
            if row
                .windows(2)
                .take(cpu.k)
                .any(|w| (w[0] - w[1]).abs() <= TIE_EPS)
            {
                out.insert(i);
            }
        }
    } else {
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
        for &i in differing {
            if (0..e).any(|j| {
                let v = s[i * e + j];
                (v - boundary[j].0).abs() <= TIE_EPS || (v - boundary[j].1).abs() <= TIE_EPS
            }) {
                out.insert(i);
            }
        }
    }
    out
}
