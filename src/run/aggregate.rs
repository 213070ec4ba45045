//! What a run records per training step and MoE block, defined once: the sums a writer adds
//! each forward call to ([`LayerSums`], what the database stores) and the metrics a reader
//! derives from them ([`LayerMetrics`]). Sums add across calls (micro-batches, gradient
//! accumulation) and across ranks, so every metric of a step is exact for all its tokens.

use crate::routing::RoutingResult;
use crate::routing::ops::normalized_entropy;

/// One step's routing of one MoE block, summed over its forward calls (and ranks).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerSums {
    /// Forward calls logged.
    pub calls: u64,
    /// Tokens routed.
    pub tokens: u64,
    /// Tokens that reached no expert.
    pub dropped: u64,
    /// Per expert: the tokens it processed (after capacity).
    pub kept: Vec<u64>,
    /// Per expert: the choices made for it before capacity (Token Choice's requests; equal to
    /// `kept` for Expert Choice and Soft MoE).
    pub requests: Vec<u64>,
    /// Sum over tokens of the router entropy `H(p) / ln e`, and the tokens it covers (those
    /// whose router probabilities were logged or computed from logits).
    pub entropy_sum: f64,
    pub entropy_tokens: u64,
    /// Sum over tokens of the router z-loss `logsumexp(logits)²`, and the tokens it covers
    /// (those whose logits were logged).
    pub z_loss_sum: f64,
    pub z_loss_tokens: u64,
    /// Sums of the router's own auxiliary losses per routing group, over `aux_groups` groups.
    pub importance_sum: f64,
    pub load_sum: f64,
    pub aux_groups: u64,
}

/// The metrics of a step and block.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerMetrics {
    pub tokens: u64,
    /// Tokens that reached no expert, over the tokens.
    pub dropped_rate: f64,
    /// Coefficient of variation of the experts' kept tokens (population std / mean).
    pub load_cv: f64,
    /// `(max load − mean load) / mean load`.
    pub max_violation: f64,
    /// Mean normalised router entropy, when probabilities or logits were logged.
    pub router_entropy: Option<f64>,
    /// Experts that processed no token.
    pub dead_experts: usize,
    /// Mean router z-loss, when logits were logged.
    pub z_loss: Option<f64>,
    /// The largest share of the kept tokens one expert took, and that expert.
    pub top_share: f64,
    pub top_expert: usize,
    /// The router's auxiliary losses (mean per routing group), where it defines them.
    pub importance_loss: Option<f64>,
    pub load_loss: Option<f64>,
}

impl LayerSums {
    pub fn new(experts: usize) -> Self {
        Self {
            kept: vec![0; experts],
            requests: vec![0; experts],
            ..Self::default()
        }
    }

    pub fn experts(&self) -> usize {
        self.kept.len()
    }

    /// Adds another call's (or rank's) sums of the same block.
    pub fn add(&mut self, o: &LayerSums) {
        self.calls += o.calls;
        self.tokens += o.tokens;
        self.dropped += o.dropped;
        for (a, b) in self.kept.iter_mut().zip(&o.kept) {
            *a += b;
        }
        for (a, b) in self.requests.iter_mut().zip(&o.requests) {
            *a += b;
        }
        self.entropy_sum += o.entropy_sum;
        self.entropy_tokens += o.entropy_tokens;
        self.z_loss_sum += o.z_loss_sum;
        self.z_loss_tokens += o.z_loss_tokens;
        self.importance_sum += o.importance_sum;
        self.load_sum += o.load_sum;
        self.aux_groups += o.aux_groups;
    }

    /// Adds one routing group as routerscope routed it (`logits` / `probs` `[n, e]` where
    /// known, for the entropy and the z-loss).
    pub fn add_routing(
        &mut self,
        r: &RoutingResult,
        logits: Option<&[f32]>,
        probs: Option<&[f32]>,
    ) {
        let st = r.stats();
        self.calls += 1;
        self.tokens += r.num_tokens as u64;
        self.dropped += st.dropped_tokens.len() as u64;
        for (a, &b) in self.kept.iter_mut().zip(&st.tokens_per_expert) {
            *a += b as u64;
        }
        for (a, &b) in self.requests.iter_mut().zip(&st.requests_per_expert) {
            *a += b as u64;
        }
        if r.aux.importance.is_some() || r.aux.load.is_some() {
            self.importance_sum += f64::from(r.aux.importance.unwrap_or(0.0));
            self.load_sum += f64::from(r.aux.load.unwrap_or(0.0));
            self.aux_groups += 1;
        }
        self.add_router_outputs(logits, probs);
    }

    /// Adds one call whose picks the framework made: `experts` `[n, k]` in rank order and
    /// whether each was `kept` (default: all); checked against the experts.
    pub fn add_picks(
        &mut self,
        experts: &[i64],
        kept: Option<&[bool]>,
        k: usize,
        logits: Option<&[f32]>,
        probs: Option<&[f32]>,
    ) -> Result<(), String> {
        let e = self.experts();
        if k == 0 || !experts.len().is_multiple_of(k) {
            return Err(format!(
                "expert_index holds {} values, not a multiple of k = {k}",
                experts.len()
            ));
        }
        if kept.is_some_and(|kp| kp.len() != experts.len()) {
            return Err("kept must have expert_index's shape".into());
        }
        if let Some(at) = experts.iter().position(|&j| j < 0 || j as usize >= e) {
            return Err(format!(
                "expert_index[{}, {}] is {}: experts are 0..{}",
                at / k,
                at % k,
                experts[at],
                e - 1
            ));
        }
        let n = experts.len() / k;
        let mut kept_counts = vec![0u64; e];
        let mut dropped = 0u64;
        for t in 0..n {
            let mut any = false;
            for r in 0..k {
                let at = t * k + r;
                let j = experts[at] as usize;
                self.requests[j] += 1;
                if kept.is_none_or(|kp| kp[at]) {
                    kept_counts[j] += 1;
                    any = true;
                }
            }
            if !any {
                dropped += 1;
            }
        }
        for (a, b) in self.kept.iter_mut().zip(kept_counts) {
            *a += b;
        }
        self.calls += 1;
        self.tokens += n as u64;
        self.dropped += dropped;
        self.add_router_outputs(logits, probs);
        Ok(())
    }

    /// The entropy of the router's probabilities (`probs`, else the softmax of `logits`) and the
    /// z-loss of its logits.
    fn add_router_outputs(&mut self, logits: Option<&[f32]>, probs: Option<&[f32]>) {
        let e = self.experts();
        if e == 0 {
            return;
        }
        // Rows in fixed chunks (summed in order, so the sums do not depend on the threads),
        // on all cores for a large call.
        let chunk = 256 * e;
        let per_chunk = |f: &(dyn Fn(&[f32]) -> (f64, f64) + Sync), x: &[f32]| -> (f64, f64) {
            use rayon::prelude::*;
            let parts: Vec<(f64, f64)> = if x.len() >= 16 * chunk {
                x.par_chunks(chunk).map(f).collect()
            } else {
                x.chunks(chunk).map(f).collect()
            };
            parts
                .into_iter()
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        match (logits, probs) {
            (Some(x), None) => {
                let (h, z) = per_chunk(&|c: &[f32]| entropy_z_rows(c, e), x);
                let rows = (x.len() / e) as u64;
                self.entropy_sum += h;
                self.entropy_tokens += rows;
                self.z_loss_sum += z;
                self.z_loss_tokens += rows;
            }
            (x, Some(p)) => {
                let (h, _) = per_chunk(
                    &|c: &[f32]| (c.chunks_exact(e).map(normalized_entropy).sum(), 0.0),
                    p,
                );
                self.entropy_sum += h;
                self.entropy_tokens += (p.len() / e) as u64;
                if let Some(x) = x {
                    let (_, z) = per_chunk(
                        &|c: &[f32]| {
                            let z = c
                                .chunks_exact(e)
                                .map(|row| {
                                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                                    let s: f32 = row.iter().map(|&v| exp_nonpositive(v - m)).sum();
                                    let lse = f64::from(m) + f64::from(s).ln();
                                    lse * lse
                                })
                                .sum();
                            (0.0, z)
                        },
                        x,
                    );
                    self.z_loss_sum += z;
                    self.z_loss_tokens += (x.len() / e) as u64;
                }
            }
            (None, None) => {}
        }
    }

    /// The metrics these sums give.
    pub fn metrics(&self) -> LayerMetrics {
        let e = self.experts().max(1) as f64;
        let total: f64 = self.kept.iter().map(|&v| v as f64).sum();
        let mean = total / e;
        let var = self
            .kept
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / e;
        let (top_expert, top) =
            self.kept.iter().enumerate().fold(
                (0, 0u64),
                |best, (j, &v)| if v > best.1 { (j, v) } else { best },
            );
        let ratio = |num: f64, den: u64| (den > 0).then(|| num / den as f64);
        let aux = self.aux_groups;
        LayerMetrics {
            tokens: self.tokens,
            dropped_rate: ratio(self.dropped as f64, self.tokens).unwrap_or(0.0),
            load_cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
            max_violation: if mean > 0.0 {
                (top as f64 - mean) / mean
            } else {
                0.0
            },
            router_entropy: ratio(self.entropy_sum, self.entropy_tokens),
            dead_experts: self.kept.iter().filter(|&&v| v == 0).count(),
            z_loss: ratio(self.z_loss_sum, self.z_loss_tokens),
            top_share: if total > 0.0 { top as f64 / total } else { 0.0 },
            top_expert,
            importance_loss: ratio(self.importance_sum, aux),
            load_loss: ratio(self.load_sum, aux),
        }
    }
}

/// `(Σ normalised entropy, Σ z-loss)` over the rows of `e` logits in `c`, one exponential per
/// logit: with t = e^(x − max) and s = Σ t, logsumexp = max + ln s and
/// H(p) = ln s − Σ t·(x − max) / s. Compiled twice, the second for AVX2 (picked at run time):
/// the same operations in the same order, so both give the same bits.
fn entropy_z_rows(c: &[f32], e: usize) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has just been found to support AVX2.
        return unsafe { entropy_z_rows_avx2(c, e) };
    }
    entropy_z_rows_portable(c, e)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn entropy_z_rows_avx2(c: &[f32], e: usize) -> (f64, f64) {
    entropy_z_rows_portable(c, e)
}

#[inline(always)]
fn entropy_z_rows_portable(c: &[f32], e: usize) -> (f64, f64) {
    let ln_e = (e as f64).ln();
    let (mut h, mut z) = (0.0f64, 0.0f64);
    let (mut t, mut u) = (vec![0.0f32; e], vec![0.0f32; e]);
    for row in c.chunks_exact(e) {
        let m = row_max(row);
        let (s, w) = exp_sums(row, m, &mut t, &mut u);
        let ln_s = f64::from(s.ln());
        let lse = f64::from(m) + ln_s;
        z += lse * lse;
        if ln_e > 0.0 {
            h += ((ln_s - f64::from(w) / f64::from(s)) / ln_e).clamp(0.0, 1.0);
        }
    }
    (h, z)
}

/// Lanes of the vectorised row loops: independent accumulators, so that the sums need no
/// reassociation to use SIMD.
const LANES: usize = 8;

/// The largest value of a row (its NaN-free logits).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (chunks, rest) = row.as_chunks::<LANES>();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in rest {
        m = m.max(v);
    }
    m
}

/// `(Σ e^(x − m), Σ e^(x − m)·(x − m))` over a row whose maximum is `m`; `t` and `u` are
/// scratch of the row's length. The exponentials are taken in a loop of their own and summed
/// in another: fused, the loop does not vectorise (a third of the speed).
#[inline(always)]
fn exp_sums(row: &[f32], m: f32, t: &mut [f32], u: &mut [f32]) -> (f32, f32) {
    for ((t, u), &v) in t.iter_mut().zip(u.iter_mut()).zip(row) {
        let d = v - m;
        *t = exp_nonpositive(d);
        *u = *t * d;
    }
    (lane_sum(t), lane_sum(u))
}

/// The sum of `x` in `LANES` independent accumulators (vectorises without reassociating).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (chunks, rest) = x.as_chunks::<LANES>();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `e^x` for `x ≤ 0` (a logit minus its row's maximum), within about 1 ulp, branch-free so that
/// a row's loop vectorises (a run's metrics take one exponential per logit of every call):
/// `n = round(x·log2 e)` by the 1.5·2^23 trick, `r = x − n·ln 2` in two parts (Cody and Waite,
/// so that large `|x|` loses nothing), `e^r` by its degree-6 Taylor polynomial (`|r| ≤ 0.35`:
/// error below 1.3e-7), `2^n` through the exponent bits. Below −87 (where `e^x` leaves f32's
/// normal range) it gives `e^−87`, which no sum notices.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = if x < -87.0 { -87.0 } else { x };
    // `shifted` holds n in its low mantissa bits (n as an integer without a float-to-int
    // conversion, which would keep the loop from vectorising).
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let k = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(k.wrapping_add(127) << 23)
}

/// Little-endian `u32` counts, as the database stores them (a count beyond `u32` is an error:
/// no expert takes four billion tokens in one step).
pub fn counts_to_blob(v: &[u64]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(4 * v.len());
    for (j, &x) in v.iter().enumerate() {
        let x = u32::try_from(x).map_err(|_| format!("expert {j} has {x} tokens in one step"))?;
        out.extend(x.to_le_bytes());
    }
    Ok(out)
}

/// The counts of a blob of `experts` little-endian `u32`s.
pub fn counts_from_blob(b: &[u8], experts: usize) -> Option<Vec<u64>> {
    (b.len() == 4 * experts).then(|| {
        b.chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Mode, RouterConfig, RouterKind, route_logits};

    #[test]
    fn sums_of_calls_are_the_routing_of_each_call_added() {
        let logits: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 13) as f32 - 6.0) / 2.0)
            .collect();
        let cfg = RouterConfig {
            k: 2,
            ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
        };
        let r = route_logits(&logits, 16, 4, &cfg, Mode::Deterministic).unwrap();
        let st = r.stats();
        let mut s = LayerSums::new(4);
        s.add_routing(&r, Some(&logits), None);
        s.add_routing(&r, Some(&logits), None);
        assert_eq!(s.calls, 2);
        assert_eq!(s.tokens, 32);
        let kept: Vec<u64> = st.tokens_per_expert.iter().map(|&v| 2 * v as u64).collect();
        assert_eq!(s.kept, kept);
        assert_eq!(s.dropped, 2 * st.dropped_tokens.len() as u64);
        let m = s.metrics();
        assert!(m.router_entropy.is_some_and(|h| (0.0..=1.0).contains(&h)));
        assert!(m.z_loss.is_some_and(|z| z > 0.0));
        assert_eq!(m.importance_loss.map(|v| v as f32), r.aux.importance);
        // The framework's own picks count as they are.
        let mut p = LayerSums::new(4);
        p.add_picks(
            &[0, 1, 0, 2, 0, 3],
            Some(&[true, true, true, false, false, false]),
            2,
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            (p.kept.clone(), p.requests.clone()),
            (vec![2, 1, 0, 0], vec![3, 1, 1, 1])
        );
        assert_eq!((p.tokens, p.dropped), (3, 1));
        let m = p.metrics();
        assert_eq!(m.dead_experts, 2);
        assert!((m.top_share - 2.0 / 3.0).abs() < 1e-12);
        assert!(
            p.add_picks(&[4], None, 1, None, None)
                .unwrap_err()
                .contains("experts are 0..3")
        );
    }

    #[test]
    fn the_fast_exponential_is_exp_to_a_few_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let (a, b) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e30) >= 0.0);
    }

    #[test]
    fn entropy_and_z_loss_of_rows_match_a_direct_f64_computation() {
        for e in [1usize, 7, 8, 13, 64] {
            let c: Vec<f32> = (0..50 * e)
                .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1 + i % 3) as f32)
                .collect();
            let (mut h, mut z) = (0.0f64, 0.0f64);
            for row in c.chunks_exact(e) {
                let m = row.iter().map(|&v| f64::from(v)).fold(f64::MIN, f64::max);
                let s: f64 = row.iter().map(|&v| (f64::from(v) - m).exp()).sum();
                let lse = m + s.ln();
                z += lse * lse;
                if e > 1 {
                    let ent: f64 = row
                        .iter()
                        .map(|&v| {
                            let p = (f64::from(v) - lse).exp();
                            if p > 0.0 { -p * p.ln() } else { 0.0 }
                        })
                        .sum();
                    h += ent / (e as f64).ln();
                }
            }
            let (fh, fz) = entropy_z_rows(&c, e);
            assert!((fh - h).abs() < 1e-4 * 50.0, "e = {e}: entropy {fh} vs {h}");
            assert!(
                (fz - z).abs() < 1e-5 * z.max(1.0),
                "e = {e}: z-loss {fz} vs {z}"
            );
            assert_eq!(
                entropy_z_rows_portable(&c, e),
                (fh, fz),
                "e = {e}: paths differ"
            );
        }
    }

    #[test]
    fn counts_round_trip_through_blobs() {
        let b = counts_to_blob(&[0, 7, u64::from(u32::MAX)]).unwrap();
        assert_eq!(
            counts_from_blob(&b, 3).unwrap(),
            [0, 7, u64::from(u32::MAX)]
        );
        assert!(counts_from_blob(&b, 2).is_none());
        assert!(counts_to_blob(&[1 << 40]).is_err());
    }
}
