//! Dataset-level routing statistics of one MoE layer, accumulated group by group in memory that
//! does not depend on the number of images: counts per class and expert, per position and
//! expert, drops, the distribution of every expert's load over images (a histogram, so the
//! percentiles are exact for sparse routers without keeping per-image values), experts per
//! token, router entropy, and for Soft MoE each slot's dispatch mass over positions.
//!
//! Counting follows `routerscope eval`: a sparse router counts every kept (token, expert) choice;
//! Soft MoE counts combine mass (a token's combine weights summed over each expert's slots).

use serde::Serialize;

use crate::model::GroupRecord;
use crate::routing::Assignment;

/// Bins of the router-entropy histogram over `[0, 1]` (entropy / ln e).
pub const ENTROPY_BINS: usize = 20;
/// Soft MoE loads are fractional: the load histogram resolves 1/16 of a token.
const SOFT_BINS_PER_TOKEN: usize = 16;

/// One expert's load over the images: tokens it processed per image (Soft MoE: combine mass).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExpertLoad {
    pub expert: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub p5: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub p95: f64,
}

/// Normalised router entropy of each token (`H(p) / ln e` of its expert probabilities).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntropyHistogram {
    /// `counts[b]`: tokens with entropy in `[b, b + 1) / bins` (the last bin includes 1).
    pub counts: Vec<usize>,
    pub mean: f64,
}

/// The statistics of one MoE layer over the analysed images.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerStats {
    pub block: usize,
    pub router: String,
    /// Slots per expert `c` (Soft MoE: `p`) of the last group.
    pub capacity: usize,
    pub num_experts: usize,
    pub images: usize,
    pub tokens: usize,
    /// `[classes][experts]`: kept choices (Soft MoE: combine mass) of the class's tokens.
    pub tokens_per_class_expert: Vec<Vec<f64>>,
    /// `tokens_per_class_expert` with each row normalised to sum 1 (as `eval` reports it).
    pub class_expert_usage: Vec<Vec<f64>>,
    /// `[classes]`: tokens seen.
    pub tokens_per_class: Vec<usize>,
    /// `[classes]`: tokens that reached no expert.
    pub dropped_per_class: Vec<usize>,
    pub dropped_token_rate: f64,
    /// `[positions][experts]` (position 0 is the CLS token when the model has one).
    pub tokens_per_position_expert: Vec<Vec<f64>>,
    /// `[positions]`: dropped tokens at each position, over all images.
    pub dropped_per_position: Vec<usize>,
    /// Tokens per image each expert processed.
    pub load_per_expert: Vec<ExpertLoad>,
    /// `[t]`: tokens processed by exactly `t` experts, `t = 0..=e`.
    pub experts_per_token_histogram: Vec<usize>,
    /// `None` where the routing held no router probabilities (a trace of picks or dispatch
    /// weights without its logits).
    pub router_entropy: Option<EntropyHistogram>,
    /// Soft MoE: `[slots][positions]`, each slot's dispatch weight at each position, summed over
    /// images and divided by the number of groups (a slot's row sums to 1 over a group).
    pub soft_slot_dispatch_per_position: Option<Vec<Vec<f64>>>,
    /// Standard deviation over experts of their mean tokens per image.
    pub load_std: f64,
    /// Entropy of the experts' shares of all assignments, over `ln e` (1: uniform use).
    pub usage_entropy: f64,
}

/// Accumulates [`LayerStats`] group by group.
pub struct LayerAccumulator {
    block: usize,
    router: String,
    capacity: usize,
    e: usize,
    seq_len: usize,
    images: usize,
    groups: usize,
    tokens: usize,
    per_class: Vec<Vec<f64>>,
    tokens_per_class: Vec<usize>,
    dropped_per_class: Vec<usize>,
    per_position: Vec<Vec<f64>>,
    dropped_per_position: Vec<usize>,
    hist: Vec<usize>,
    entropy: Vec<usize>,
    entropy_sum: f64,
    entropy_tokens: usize,
    /// `[e][seq_len · bins_per_token + 1]`: images whose load on the expert falls in each bin.
    load_hist: Vec<Vec<u64>>,
    bins_per_token: usize,
    load_sum: Vec<f64>,
    load_sq: Vec<f64>,
    load_min: Vec<f64>,
    load_max: Vec<f64>,
    soft_slots: Option<Vec<Vec<f64>>>,
    /// Scratch `[images][e]` of the group in progress.
    image_load: Vec<f64>,
}

impl LayerAccumulator {
    pub fn new(block: usize, experts: usize, classes: usize, seq_len: usize) -> Self {
        Self {
            block,
            router: String::new(),
            capacity: 0,
            e: experts,
            seq_len,
            images: 0,
            groups: 0,
            tokens: 0,
            per_class: vec![vec![0.0; experts]; classes],
            tokens_per_class: vec![0; classes],
            dropped_per_class: vec![0; classes],
            per_position: vec![vec![0.0; experts]; seq_len],
            dropped_per_position: vec![0; seq_len],
            hist: vec![0; experts + 1],
            entropy: vec![0; ENTROPY_BINS],
            entropy_sum: 0.0,
            entropy_tokens: 0,
            load_hist: Vec::new(),
            bins_per_token: 1,
            load_sum: vec![0.0; experts],
            load_sq: vec![0.0; experts],
            load_min: vec![f64::INFINITY; experts],
            load_max: vec![f64::NEG_INFINITY; experts],
            soft_slots: None,
            image_load: Vec::new(),
        }
    }

    /// Adds one routing group whose images have the classes `labels` (tokens are image-major,
    /// `seq_len` per image). `visit(image in group, token in image, expert, score)` sees every
    /// kept pairing, for the atlas.
    pub fn add(
        &mut self,
        g: &GroupRecord,
        labels: &[usize],
        mut visit: impl FnMut(usize, usize, usize, f32),
    ) {
        let r = &g.routing;
        let (n, e, s) = (r.num_tokens, self.e, self.seq_len);
        debug_assert_eq!(n, labels.len() * s);
        if self.load_hist.is_empty() {
            self.bins_per_token = match r.assignment {
                Assignment::Sparse(_) => 1,
                Assignment::Soft(_) => SOFT_BINS_PER_TOKEN,
            };
            self.load_hist = vec![vec![0; s * self.bins_per_token + 1]; e];
        }
        self.router = r.router.cli_name().to_string();
        self.capacity = r.capacity;
        self.groups += 1;
        self.images += labels.len();
        self.tokens += n;
        self.image_load.clear();
        self.image_load.resize(labels.len() * e, 0.0);
        for i in 0..n {
            let m = i / s;
            let class = labels[m];
            self.tokens_per_class[class] += 1;
            let Some(row) = g.probs.get(i * e..(i + 1) * e) else {
                continue;
            };
            let h = crate::routing::ops::normalized_entropy(row);
            self.entropy_sum += h;
            self.entropy_tokens += 1;
            self.entropy[((h * ENTROPY_BINS as f64) as usize).min(ENTROPY_BINS - 1)] += 1;
        }
        match &r.assignment {
            Assignment::Sparse(sp) => {
                for i in 0..n {
                    let (m, pos) = (i / s, i % s);
                    let class = labels[m];
                    let mut kept = 0;
                    for ch in r.token_choices(i).iter().filter(|c| c.slot.is_some()) {
                        let j = ch.expert as usize;
                        kept += 1;
                        self.per_class[class][j] += 1.0;
                        self.per_position[pos][j] += 1.0;
                        self.image_load[m * e + j] += 1.0;
                        // Token Choice ranks by the gate; Expert Choice by its score matrix
                        // (softmax, Sinkhorn plan or sparse OT plan).
                        let score = match r.router.family() {
                            crate::routing::RouterFamily::TokenChoice => ch.gate,
                            _ => sp.scores[i * e + j],
                        };
                        visit(m, pos, j, score);
                    }
                    if kept == 0 {
                        self.dropped_per_class[class] += 1;
                        self.dropped_per_position[pos] += 1;
                    }
                    self.hist[kept.min(e)] += 1;
                }
            }
            Assignment::Soft(soft) => {
                let probs = r.expert_probabilities();
                for i in 0..n {
                    let (m, pos) = (i / s, i % s);
                    let class = labels[m];
                    for j in 0..e {
                        let w = probs[i * e + j] as f64;
                        self.per_class[class][j] += w;
                        self.per_position[pos][j] += w;
                        self.image_load[m * e + j] += w;
                        visit(m, pos, j, probs[i * e + j]);
                    }
                }
                self.hist[e] += n;
                let slots = r.num_slots();
                let acc = self
                    .soft_slots
                    .get_or_insert_with(|| vec![vec![0.0; s]; slots]);
                if acc.len() == slots {
                    for i in 0..n {
                        let row = &soft.dispatch[i * slots..(i + 1) * slots];
                        for (a, &w) in acc.iter_mut().zip(row) {
                            a[i % s] += w as f64;
                        }
                    }
                }
            }
        }
        let last = self.load_hist.first().map_or(0, |h| h.len() - 1);
        for m in 0..labels.len() {
            for j in 0..e {
                let v = self.image_load[m * e + j];
                self.load_sum[j] += v;
                self.load_sq[j] += v * v;
                self.load_min[j] = self.load_min[j].min(v);
                self.load_max[j] = self.load_max[j].max(v);
                let bin = ((v * self.bins_per_token as f64).round().max(0.0) as usize).min(last);
                self.load_hist[j][bin] += 1;
            }
        }
    }

    pub fn finish(self) -> LayerStats {
        let e = self.e;
        let images = self.images.max(1) as f64;
        let t = self.tokens.max(1) as f64;
        let dropped: usize = self.dropped_per_class.iter().sum();
        let load_per_expert: Vec<ExpertLoad> = (0..e)
            .map(|j| {
                let mean = self.load_sum[j] / images;
                let var = (self.load_sq[j] / images - mean * mean).max(0.0);
                let q = |p: f64| {
                    self.load_hist.get(j).map_or(0.0, |h| {
                        quantile(h, self.images, p) / self.bins_per_token as f64
                    })
                };
                let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
                ExpertLoad {
                    expert: j,
                    mean,
                    std: var.sqrt(),
                    min: finite(self.load_min[j]),
                    max: finite(self.load_max[j]),
                    p5: q(0.05),
                    p25: q(0.25),
                    p50: q(0.5),
                    p75: q(0.75),
                    p95: q(0.95),
                }
            })
            .collect();
        let means: Vec<f64> = load_per_expert.iter().map(|l| l.mean).collect();
        let avg = means.iter().sum::<f64>() / e.max(1) as f64;
        let load_std =
            (means.iter().map(|m| (m - avg).powi(2)).sum::<f64>() / e.max(1) as f64).sqrt();
        let total: f64 = means.iter().sum();
        let usage_entropy = if e > 1 && total > 0.0 {
            let h: f64 = means
                .iter()
                .map(|m| m / total)
                .filter(|&p| p > 0.0)
                .map(|p| -p * p.ln())
                .sum();
            h / (e as f64).ln()
        } else {
            0.0
        };
        let groups = self.groups.max(1) as f64;
        LayerStats {
            block: self.block,
            router: self.router,
            capacity: self.capacity,
            num_experts: e,
            images: self.images,
            tokens: self.tokens,
            class_expert_usage: self
                .per_class
                .iter()
                .map(|row| {
                    let s: f64 = row.iter().sum();
                    row.iter().map(|v| v / s.max(1e-12)).collect()
                })
                .collect(),
            tokens_per_class_expert: self.per_class,
            tokens_per_class: self.tokens_per_class,
            dropped_per_class: self.dropped_per_class,
            dropped_token_rate: dropped as f64 / t,
            tokens_per_position_expert: self.per_position,
            dropped_per_position: self.dropped_per_position,
            load_per_expert,
            experts_per_token_histogram: self.hist,
            router_entropy: (self.entropy_tokens > 0).then(|| EntropyHistogram {
                counts: self.entropy,
                mean: self.entropy_sum / self.entropy_tokens as f64,
            }),
            soft_slot_dispatch_per_position: self.soft_slots.map(|slots| {
                slots
                    .into_iter()
                    .map(|row| row.into_iter().map(|v| v / groups).collect())
                    .collect()
            }),
            load_std,
            usage_entropy,
        }
    }
}

/// The `p`-quantile (linear between order statistics, as numpy's default) of `n` values given
/// as counts per integer bin.
fn quantile(hist: &[u64], n: usize, p: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let h = (n - 1) as f64 * p;
    let (lo, hi) = (h.floor() as u64, h.ceil() as u64);
    let at = |rank: u64| {
        let mut seen = 0u64;
        for (bin, &c) in hist.iter().enumerate() {
            seen += c;
            if seen > rank {
                return bin as f64;
            }
        }
        hist.len().saturating_sub(1) as f64
    };
    let (a, b) = (at(lo), at(hi));
    a + (h - lo as f64) * (b - a)
}

#[cfg(test)]
mod tests {
    use super::quantile;

    /// Against numpy.percentile's default (linear) on small integer samples.
    #[test]
    fn quantiles_match_linear_interpolation_of_order_statistics() {
        let values = [3usize, 0, 7, 7, 2, 9, 4];
        let mut hist = vec![0u64; 10];
        for &v in &values {
            hist[v] += 1;
        }
        let mut sorted = values.to_vec();
        sorted.sort();
        for p in [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0] {
            let h = (sorted.len() - 1) as f64 * p;
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            let want =
                sorted[lo] as f64 + (h - lo as f64) * (sorted[hi] as f64 - sorted[lo] as f64);
            assert!(
                (quantile(&hist, values.len(), p) - want).abs() < 1e-12,
                "p {p}"
            );
        }
        assert_eq!(quantile(&hist, 7, 0.5), 4.0);
    }
}
