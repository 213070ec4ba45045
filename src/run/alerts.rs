//! Alerts over a run, per MoE block and never averaged over blocks: **collapse** (one expert
//! takes more than a share of the block's kept tokens for N logged steps in a row), **dead
//! experts** (an expert processes no token for N steps in a row) and **drops** (the dropped-token
//! rate stays above a rate for N steps in a row). Fed the rows in step order, as the reader
//! streams them.

use std::collections::BTreeMap;

use serde::Serialize;

use super::aggregate::LayerSums;

/// The thresholds (command-line flags, with these defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlertRules {
    /// Collapse: the top expert's share of the kept tokens above this...
    pub collapse_share: f64,
    /// ...for this many logged steps in a row.
    pub collapse_steps: usize,
    /// Dead: an expert with no tokens for this many logged steps in a row.
    pub dead_steps: usize,
    /// Drops: a dropped-token rate above this...
    pub drop_rate: f64,
    /// ...for this many logged steps in a row.
    pub drop_steps: usize,
}

impl Default for AlertRules {
    fn default() -> Self {
        Self {
            collapse_share: 0.5,
            collapse_steps: 10,
            dead_steps: 10,
            drop_rate: 0.1,
            drop_steps: 10,
        }
    }
}

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    Collapse,
    DeadExperts,
    Drops,
}

impl AlertKind {
    /// The name `alerts.json` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Collapse => "collapse",
            Self::DeadExperts => "dead_experts",
            Self::Drops => "drops",
        }
    }
}

/// One alert: a block and the steps it held over.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub block: usize,
    pub first_step: i64,
    pub last_step: i64,
    pub detail: String,
    /// The expert it is about (collapse, dead experts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert: Option<usize>,
}

/// A streak of steps: its start, its last step, its length, and the largest value seen.
#[derive(Clone, Copy, Debug)]
struct Streak {
    first: i64,
    last: i64,
    len: usize,
    peak: f64,
}

#[derive(Clone, Debug, Default)]
struct BlockState {
    collapse: Option<(usize, Streak)>,
    /// Per expert, its streak of steps without tokens.
    dead: Vec<Option<Streak>>,
    drops: Option<Streak>,
}

/// Collects alerts from rows fed in step order.
#[derive(Clone, Debug)]
pub struct AlertTracker {
    rules: AlertRules,
    blocks: BTreeMap<usize, BlockState>,
    alerts: Vec<Alert>,
}

fn extend(s: &mut Option<Streak>, step: i64, value: f64) {
    match s {
        Some(st) => {
            st.last = step;
            st.len += 1;
            st.peak = st.peak.max(value);
        }
        None => {
            *s = Some(Streak {
                first: step,
                last: step,
                len: 1,
                peak: value,
            })
        }
    }
}

impl AlertTracker {
    pub fn new(rules: AlertRules) -> Self {
        Self {
            rules,
            blocks: BTreeMap::new(),
            alerts: Vec::new(),
        }
    }

    /// One step's sums of `block` (steps of a block in increasing order).
    pub fn observe(&mut self, step: i64, block: usize, sums: &LayerSums) {
        self.observe_with(step, block, sums, &sums.metrics());
    }

    /// As [`AlertTracker::observe`], with the sums' metrics already computed.
    pub fn observe_with(
        &mut self,
        step: i64,
        block: usize,
        sums: &LayerSums,
        m: &super::aggregate::LayerMetrics,
    ) {
        let r = self.rules;
        let state = self.blocks.entry(block).or_default();
        // Collapse: the same top expert above the share.
        let collapsing = m.top_share > r.collapse_share;
        match &mut state.collapse {
            Some((expert, st)) if collapsing && *expert == m.top_expert => {
                st.last = step;
                st.len += 1;
                st.peak = st.peak.max(m.top_share);
            }
            _ => {
                if let Some((expert, st)) = state.collapse.take() {
                    Self::close_collapse(&mut self.alerts, r, block, expert, st);
                }
                if collapsing {
                    state.collapse = Some((
                        m.top_expert,
                        Streak {
                            first: step,
                            last: step,
                            len: 1,
                            peak: m.top_share,
                        },
                    ));
                }
            }
        }
        // Dead experts, each on its own.
        if state.dead.len() < sums.kept.len() {
            state.dead.resize(sums.kept.len(), None);
        }
        for (j, (&kept, streak)) in sums.kept.iter().zip(&mut state.dead).enumerate() {
            if kept == 0 {
                extend(streak, step, 0.0);
            } else if let Some(st) = streak.take() {
                Self::close_dead(&mut self.alerts, r, block, j, st);
            }
        }
        // Drops.
        if m.dropped_rate > r.drop_rate {
            extend(&mut state.drops, step, m.dropped_rate);
        } else if let Some(st) = state.drops.take() {
            Self::close_drops(&mut self.alerts, r, block, st);
        }
    }

    fn close_collapse(
        out: &mut Vec<Alert>,
        r: AlertRules,
        block: usize,
        expert: usize,
        st: Streak,
    ) {
        if st.len >= r.collapse_steps {
            out.push(Alert {
                kind: AlertKind::Collapse,
                block,
                first_step: st.first,
                last_step: st.last,
                detail: format!(
                    "expert {expert} took more than {:.0}% of block {block}'s kept tokens for {} \
                     logged steps in a row (up to {:.1}%)",
                    100.0 * r.collapse_share,
                    st.len,
                    100.0 * st.peak
                ),
                expert: Some(expert),
            });
        }
    }

    fn close_dead(out: &mut Vec<Alert>, r: AlertRules, block: usize, expert: usize, st: Streak) {
        if st.len >= r.dead_steps {
            out.push(Alert {
                kind: AlertKind::DeadExperts,
                block,
                first_step: st.first,
                last_step: st.last,
                detail: format!(
                    "expert {expert} of block {block} processed no token for {} logged steps in a \
                     row",
                    st.len
                ),
                expert: Some(expert),
            });
        }
    }

    fn close_drops(out: &mut Vec<Alert>, r: AlertRules, block: usize, st: Streak) {
        if st.len >= r.drop_steps {
            out.push(Alert {
                kind: AlertKind::Drops,
                block,
                first_step: st.first,
                last_step: st.last,
                detail: format!(
                    "block {block} dropped more than {:.1}% of its tokens for {} logged steps in a \
                     row (up to {:.1}%)",
                    100.0 * r.drop_rate,
                    st.len,
                    100.0 * st.peak
                ),
                expert: None,
            });
        }
    }

    /// The alerts, streaks still open at the end included, ordered by block, first step, kind.
    pub fn finish(mut self) -> Vec<Alert> {
        let r = self.rules;
        for (block, state) in std::mem::take(&mut self.blocks) {
            if let Some((expert, st)) = state.collapse {
                Self::close_collapse(&mut self.alerts, r, block, expert, st);
            }
            for (j, st) in state.dead.into_iter().enumerate() {
                if let Some(st) = st {
                    Self::close_dead(&mut self.alerts, r, block, j, st);
                }
            }
            if let Some(st) = state.drops {
                Self::close_drops(&mut self.alerts, r, block, st);
            }
        }
        let mut alerts = self.alerts;
        alerts.sort_by_key(|a| (a.block, a.first_step, a.kind as u8, a.expert));
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(kept: &[u64], tokens: u64, dropped: u64) -> LayerSums {
        LayerSums {
            calls: 1,
            tokens,
            dropped,
            kept: kept.to_vec(),
            requests: kept.to_vec(),
            ..LayerSums::default()
        }
    }

    #[test]
    fn streaks_of_collapse_dead_experts_and_drops_are_flagged_per_block() {
        let mut t = AlertTracker::new(AlertRules {
            collapse_steps: 3,
            dead_steps: 3,
            drop_steps: 2,
            ..AlertRules::default()
        });
        for step in 0..10 {
            // Block 1 is healthy; block 3 collapses onto expert 2 from step 4 on, expert 0 is
            // dead from step 2 to 6, and drops 30% at steps 7 and 8.
            t.observe(step, 1, &sums(&[10, 10, 10, 10], 40, 0));
            let collapsed = step >= 4;
            let kept = if collapsed {
                [if step > 6 { 1 } else { 0 }, 5, 30, 5]
            } else if step >= 2 {
                [0, 14, 12, 14]
            } else {
                [10, 10, 10, 10]
            };
            let dropped = if step == 7 || step == 8 { 12 } else { 0 };
            t.observe(step, 3, &sums(&kept, 40, dropped));
        }
        let a = t.finish();
        assert!(a.iter().all(|a| a.block == 3), "{a:?}");
        let collapse: Vec<_> = a.iter().filter(|a| a.kind == AlertKind::Collapse).collect();
        assert_eq!(collapse.len(), 1);
        assert_eq!((collapse[0].first_step, collapse[0].last_step), (4, 9));
        assert_eq!(collapse[0].expert, Some(2));
        let dead: Vec<_> = a
            .iter()
            .filter(|a| a.kind == AlertKind::DeadExperts)
            .collect();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].first_step, dead[0].last_step, dead[0].expert),
            (2, 6, Some(0))
        );
        let drops: Vec<_> = a.iter().filter(|a| a.kind == AlertKind::Drops).collect();
        assert_eq!((drops[0].first_step, drops[0].last_step), (7, 8));
    }
}
