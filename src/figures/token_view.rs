//! What the viewer and the exporters draw for one image in one MoE layer, derived from a routing
//! record: per token its choices, whether it was dropped, its probabilities and the expert that
//! colours its patch; for Soft MoE its slot weights. Pure data, no UI.

use crate::model::GroupRecord;
use crate::routing::{Choice, RouterFamily, RouterKind, RoutingStats};

/// One token of the image.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRouting {
    /// Position in the image's sequence (0 is the CLS token when the model has one).
    pub index: usize,
    /// Sparse routers: Token Choice in rank order (dropped choices included, `slot: None`);
    /// Expert Choice in expert order (only the experts that picked the token).
    pub choices: Vec<Choice>,
    /// Reached no expert (its MoE output is 0).
    pub dropped: bool,
    /// Router probability per expert (Soft MoE: combine weight summed over the expert's slots).
    pub probs: Vec<f32>,
    /// The expert that colours the patch: the first kept choice (Token Choice), the picking
    /// expert with the largest gate (Expert Choice), the expert with the largest combine mass
    /// (Soft MoE); `None` when dropped.
    pub primary: Option<usize>,
}

/// Soft MoE weights restricted to one image's tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftImage {
    pub slots_per_expert: usize,
    /// `[tokens][e·p]`: each token's combine weights over all slots (sum 1).
    pub combine: Vec<Vec<f32>>,
    /// `[e·p][tokens]`: each slot's dispatch weights over this image's tokens (they sum to 1 over
    /// the whole routing group, so to less than 1 when the group holds several images).
    pub dispatch: Vec<Vec<f32>>,
}

/// The routing of one image in one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageRouting {
    pub router: RouterKind,
    pub num_experts: usize,
    pub capacity: usize,
    pub k: usize,
    pub tokens: Vec<TokenRouting>,
    /// Statistics of the whole routing group (which may hold several images).
    pub group_stats: RoutingStats,
    /// Images in the routing group.
    pub group_images: usize,
    pub soft: Option<SoftImage>,
}

impl ImageRouting {
    /// Image `image` of `record`'s group, whose images have `seq_len` tokens each.
    pub fn new(record: &GroupRecord, image: usize, seq_len: usize) -> Self {
        let r = &record.routing;
        let e = r.num_experts;
        let first = image * seq_len;
        let family = r.router.family();
        let tokens = (first..first + seq_len)
            .map(|i| {
                let choices = r.token_choices(i).to_vec();
                // Empty where the routing's source (a trace of picks) holds no probabilities.
                let probs = record
                    .probs
                    .get(i * e..(i + 1) * e)
                    .map_or_else(Vec::new, <[f32]>::to_vec);
                let kept: Vec<&Choice> = choices.iter().filter(|c| c.slot.is_some()).collect();
                let primary = match family {
                    RouterFamily::Soft => argmax(&probs),
                    RouterFamily::TokenChoice => kept.first().map(|c| c.expert as usize),
                    RouterFamily::ExpertChoice => kept
                        .iter()
                        .fold(None::<&Choice>, |best, c| match best {
                            Some(b) if b.gate >= c.gate => Some(b),
                            _ => Some(c),
                        })
                        .map(|c| c.expert as usize),
                };
                TokenRouting {
                    index: i - first,
                    dropped: family != RouterFamily::Soft && kept.is_empty(),
                    choices,
                    probs,
                    primary,
                }
            })
            .collect();
        let soft = r.soft().map(|s| {
            let slots = e * r.capacity;
            let combine = (first..first + seq_len)
                .map(|i| s.combine[i * slots..(i + 1) * slots].to_vec())
                .collect();
            let dispatch = (0..slots)
                .map(|slot| {
                    (first..first + seq_len)
                        .map(|i| s.dispatch[i * slots + slot])
                        .collect()
                })
                .collect();
            SoftImage {
                slots_per_expert: r.capacity,
                combine,
                dispatch,
            }
        });
        Self {
            router: r.router,
            num_experts: e,
            capacity: r.capacity,
            k: r.k,
            tokens,
            group_stats: r.stats(),
            group_images: record.num_images,
            soft,
        }
    }

    /// Tokens of this image each expert processes (Soft MoE: combine mass in tokens).
    pub fn tokens_per_expert(&self) -> Vec<f32> {
        let mut load = vec![0.0f32; self.num_experts];
        for t in &self.tokens {
            if self.soft.is_some() {
                for (l, p) in load.iter_mut().zip(&t.probs) {
                    *l += p;
                }
            } else {
                for c in t.choices.iter().filter(|c| c.slot.is_some()) {
                    load[c.expert as usize] += 1.0;
                }
            }
        }
        load
    }

    /// (token, expert) requests of this image per expert, overflow included (Token Choice).
    pub fn requests_per_expert(&self) -> Vec<usize> {
        let mut req = vec![0usize; self.num_experts];
        for t in &self.tokens {
            for c in &t.choices {
                req[c.expert as usize] += 1;
            }
        }
        req
    }

    /// Number of tokens of this image processed by exactly `m` experts, `m = 0..=e`.
    pub fn experts_per_token_histogram(&self) -> Vec<usize> {
        let mut h = vec![0usize; self.num_experts + 1];
        for t in &self.tokens {
            let m = if self.soft.is_some() {
                self.num_experts
            } else {
                t.choices.iter().filter(|c| c.slot.is_some()).count()
            };
            h[m.min(self.num_experts)] += 1;
        }
        h
    }

    pub fn dropped_count(&self) -> usize {
        self.tokens.iter().filter(|t| t.dropped).count()
    }
}

fn argmax(v: &[f32]) -> Option<usize> {
    v.iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &x)| match best {
            Some((_, b)) if b >= x => best,
            _ => Some((i, x)),
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RunOptions, VitMoe, random_weights};
    use crate::routing::{CapacitySpec, RouterConfig};

    fn run(kind: RouterKind, cf: f64, group: usize) -> (crate::model::ForwardOutput, usize) {
        let cfg = crate::model::preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
        let model = VitMoe::new(cfg.clone(), random_weights(&cfg, 2)).unwrap();
        let mut r = RouterConfig::new(kind);
        r.capacity = match kind {
            RouterKind::SoftMoe => CapacitySpec::Slots(1),
            _ => CapacitySpec::Factor(cf),
        };
        r.multiple_of = 1;
        let opts = RunOptions {
            group_images: group,
            ..RunOptions::from_config(&cfg).with_router(r)
        };
        let images: Vec<Vec<f32>> = (0..2)
            .map(|b| {
                (0..784)
                    .map(|i| ((i * 7 + b * 13) % 17) as f32 / 8.0 - 1.0)
                    .collect()
            })
            .collect();
        (model.forward(&images, &opts).unwrap(), cfg.seq_len())
    }

    #[test]
    fn token_view_agrees_with_the_group_record() {
        for kind in [
            RouterKind::SoftmaxTokenChoice,
            RouterKind::SoftmaxExpertChoice,
            RouterKind::SoftMoe,
        ] {
            let (out, s) = run(kind, 0.5, 2);
            let rec = &out.records[0].groups[0];
            let mut total = vec![0.0f32; 8];
            for image in 0..2 {
                let v = ImageRouting::new(rec, image, s);
                assert_eq!(v.tokens.len(), s);
                for (l, t) in total.iter_mut().zip(v.tokens_per_expert()) {
                    *l += t;
                }
                for t in &v.tokens {
                    let g = image * s + t.index;
                    assert_eq!(t.choices, rec.routing.token_choices(g));
                    if kind != RouterKind::SoftMoe {
                        assert_eq!(t.dropped, rec.routing.stats().dropped_tokens.contains(&g));
                    }
                    if let Some(p) = t.primary {
                        assert!(p < 8);
                    }
                }
            }
            if kind != RouterKind::SoftMoe {
                let want: Vec<f32> = rec
                    .routing
                    .stats()
                    .tokens_per_expert
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                assert_eq!(total, want, "{kind:?}");
            }
        }
    }

    #[test]
    fn low_capacity_token_choice_drops_tokens_and_marks_them() {
        let (out, s) = run(RouterKind::SoftmaxTokenChoice, 0.25, 1);
        let v = ImageRouting::new(&out.records[0].groups[0], 0, s);
        assert!(v.dropped_count() > 0);
        for t in v.tokens.iter().filter(|t| t.dropped) {
            assert!(t.primary.is_none());
            assert!(t.choices.iter().all(|c| c.slot.is_none()));
        }
    }
}
