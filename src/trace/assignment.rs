//! A group's routing rebuilt from what a trace logged: Soft MoE weights, dense dispatch and
//! combine tensors, or Token Choice picks. Each becomes the [`RoutingResult`] every view reads;
//! what the pieces do not say (a Token Choice rank order behind a dense dispatch, the requests
//! beyond capacity) is taken from what they do say and documented in `docs/trace-format.md`.

use crate::routing::{
    Assignment, AuxLosses, Choice, RouterFamily, RouterKind, RoutingResult, SoftAssignment,
    SparseAssignment,
};

/// Soft MoE from its `[n, e, p]` dispatch and combine weights (row-major, as the result stores
/// them); the slot logits are not logged and stay 0.
pub(crate) fn from_soft(
    dispatch: Vec<f32>,
    combine: Vec<f32>,
    n: usize,
    e: usize,
    p: usize,
) -> RoutingResult {
    RoutingResult {
        router: RouterKind::SoftMoe,
        num_tokens: n,
        num_experts: e,
        capacity: p,
        k: 1,
        capacity_tokens: n,
        assignment: Assignment::Soft(SoftAssignment {
            dispatch,
            combine,
            logits: vec![0.0; n * e * p],
        }),
        aux: AuxLosses::default(),
        solver: None,
    }
}

/// A sparse router from dense `[n, e, c]` dispatch (0/1) and combine tensors. Each token's
/// choices are its slots, ranked by gate (highest first). `probs` `[n, e]` (when logged) are the
/// scores and gates; otherwise the combine weights are.
#[allow(clippy::too_many_arguments)]
pub(crate) fn from_dense(
    kind: RouterKind,
    dispatch: &[f32],
    combine: &[f32],
    probs: Option<&[f32]>,
    n: usize,
    e: usize,
    c: usize,
) -> Result<RoutingResult, String> {
    let mut slot_token = vec![None; e * c];
    let mut slot_gate = vec![0.0f32; e * c];
    let mut per_token: Vec<Vec<Choice>> = vec![Vec::new(); n];
    let mut gate_matrix = vec![0.0f32; n * e];
    for t in 0..n {
        for j in 0..e {
            for s in 0..c {
                let at = (t * e + j) * c + s;
                let d = dispatch[at];
                if d == 0.0 {
                    continue;
                }
                if d != 1.0 {
                    return Err(format!(
                        "dispatch[{t}, {j}, {s}] is {d}: a sparse router's dispatch holds 0 or 1 \
                         (Soft MoE weights go in soft_dispatch)"
                    ));
                }
                if let Some(other) = slot_token[j * c + s] {
                    return Err(format!(
                        "dispatch: tokens {other} and {t} take the same slot {s} of expert {j}"
                    ));
                }
                slot_token[j * c + s] = Some(t as u32);
                slot_gate[j * c + s] = combine[at];
                gate_matrix[t * e + j] = combine[at];
                per_token[t].push(Choice {
                    expert: j as u32,
                    slot: Some(s as u32),
                    gate: combine[at],
                });
            }
        }
    }
    let mut choices = Vec::new();
    let mut choice_offsets = vec![0u32];
    let mut k = 1;
    for mut ch in per_token {
        if kind.family() == RouterFamily::TokenChoice {
            ch.sort_by(|a, b| b.gate.total_cmp(&a.gate).then(a.expert.cmp(&b.expert)));
        }
        k = k.max(ch.len());
        choices.extend(ch);
        choice_offsets.push(choices.len() as u32);
    }
    let requests: Vec<u32> = slot_token
        .chunks_exact(c)
        .map(|slots| slots.iter().filter(|t| t.is_some()).count() as u32)
        .collect();
    let gates = probs.map_or(gate_matrix, <[f32]>::to_vec);
    let k = if kind.family() == RouterFamily::TokenChoice {
        k.min(e)
    } else {
        1
    };
    Ok(RoutingResult {
        router: kind,
        num_tokens: n,
        num_experts: e,
        capacity: c,
        k,
        capacity_tokens: n * k,
        assignment: Assignment::Sparse(SparseAssignment {
            slot_token,
            slot_gate,
            choice_offsets,
            choices,
            requests,
            scores: gates.clone(),
            gates,
        }),
        aux: AuxLosses::default(),
        solver: None,
    })
}

/// Token Choice from its picks: `experts` and `gates` `[n, k]` in rank order, with either each
/// choice's `slot` (-1: dropped) or whether it was `kept`, or neither (all kept). Without slots,
/// kept choices fill their expert's slots in vmoe's order: all first choices in token order, then
/// all second choices. `capacity` is the logged one, else the fullest expert's count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn from_picks(
    kind: RouterKind,
    experts: &[i64],
    gates: &[f32],
    kept: Option<&[bool]>,
    slots: Option<&[i64]>,
    probs: Option<&[f32]>,
    capacity: Option<usize>,
    n: usize,
    e: usize,
    k: usize,
) -> Result<RoutingResult, String> {
    let mut requests = vec![0u32; e];
    for (at, &j) in experts.iter().enumerate() {
        if j < 0 || j as usize >= e {
            return Err(format!(
                "expert_index[{}, {}] is {j}: experts are 0..{}",
                at / k,
                at % k,
                e - 1
            ));
        }
        requests[j as usize] += 1;
    }
    if let Some(at) = gates.iter().position(|g| !g.is_finite()) {
        return Err(format!(
            "gates[{}, {}] is {}: gates must be finite",
            at / k,
            at % k,
            gates[at]
        ));
    }
    // The slot of every choice, `None` where dropped.
    let mut slot_of: Vec<Option<u32>> = vec![None; n * k];
    // Slots index an expert's buffer: below the capacity, or without one below the group's
    // requests (a slot beyond them can never be filled); checked before anything is sized by
    // them.
    let slot_limit = capacity.unwrap_or(n * k).min(n * k);
    match slots {
        Some(slots) => {
            for (at, &s) in slots.iter().enumerate() {
                if s >= slot_limit as i64 {
                    return Err(format!(
                        "slot[{}, {}] is {s}: beyond {} ({slot_limit} slots per expert)",
                        at / k,
                        at % k,
                        if capacity.is_some() {
                            "the logged capacity"
                        } else {
                            "the group's requests"
                        }
                    ));
                }
                if s >= 0 {
                    slot_of[at] = Some(s as u32);
                } else if s != -1 {
                    return Err(format!(
                        "slot[{}, {}] is {s}: a slot is -1 (dropped) or 0 and up",
                        at / k,
                        at % k
                    ));
                }
            }
        }
        None => {
            let mut fill = vec![0u32; e];
            for rank in 0..k {
                for t in 0..n {
                    let at = t * k + rank;
                    if kept.is_none_or(|kept| kept[at]) {
                        let j = experts[at] as usize;
                        slot_of[at] = Some(fill[j]);
                        fill[j] += 1;
                    }
                }
            }
        }
    }
    let fullest = slot_of
        .iter()
        .flatten()
        .map(|&s| s as usize + 1)
        .max()
        .unwrap_or(1);
    let c = capacity.unwrap_or(fullest).max(1);
    if fullest > c {
        return Err(format!(
            "{}: a kept choice takes slot {} but the logged capacity is {c} slots per expert",
            if slots.is_some() { "slot" } else { "kept" },
            fullest - 1
        ));
    }
    let mut slot_token = vec![None; e * c];
    let mut slot_gate = vec![0.0f32; e * c];
    let mut choices = Vec::with_capacity(n * k);
    let mut choice_offsets = Vec::with_capacity(n + 1);
    choice_offsets.push(0u32);
    let mut gate_matrix = vec![0.0f32; n * e];
    for t in 0..n {
        for rank in 0..k {
            let at = t * k + rank;
            let j = experts[at] as usize;
            if let Some(s) = slot_of[at] {
                let cell = &mut slot_token[j * c + s as usize];
                if let Some(other) = *cell {
                    return Err(format!(
                        "slot: tokens {other} and {t} both take slot {s} of expert {j}"
                    ));
                }
                *cell = Some(t as u32);
                slot_gate[j * c + s as usize] = gates[at];
            }
            gate_matrix[t * e + j] = gates[at];
            choices.push(Choice {
                expert: j as u32,
                slot: slot_of[at],
                gate: gates[at],
            });
        }
        choice_offsets.push(choices.len() as u32);
    }
    let gates = probs.map_or(gate_matrix, <[f32]>::to_vec);
    Ok(RoutingResult {
        router: kind,
        num_tokens: n,
        num_experts: e,
        capacity: c,
        k,
        capacity_tokens: n * k,
        assignment: Assignment::Sparse(SparseAssignment {
            slot_token,
            slot_gate,
            choice_offsets,
            choices,
            requests,
            scores: gates.clone(),
            gates,
        }),
        aux: AuxLosses::default(),
        solver: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Mode, RouterConfig, route_logits};

    /// A Token Choice routing rebuilt from its own picks (experts, gates, slots) or from its
    /// dense tensors is the routing itself.
    #[test]
    fn picks_and_dense_tensors_rebuild_the_routing() {
        let logits: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let cfg = RouterConfig {
            k: 2,
            ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
        };
        let r = route_logits(&logits, 10, 4, &cfg, Mode::Deterministic).unwrap();
        let s = r.sparse().unwrap();
        let experts: Vec<i64> = s.choices.iter().map(|c| c.expert as i64).collect();
        let gates: Vec<f32> = s.choices.iter().map(|c| c.gate).collect();
        let slots: Vec<i64> = s
            .choices
            .iter()
            .map(|c| c.slot.map_or(-1, i64::from))
            .collect();
        let kept: Vec<bool> = s.choices.iter().map(|c| c.slot.is_some()).collect();
        let from_slots = from_picks(
            r.router,
            &experts,
            &gates,
            None,
            Some(&slots),
            Some(&s.gates),
            Some(r.capacity),
            10,
            4,
            2,
        )
        .unwrap();
        assert_eq!(from_slots.assignment, r.assignment);
        let from_kept = from_picks(
            r.router,
            &experts,
            &gates,
            Some(&kept),
            None,
            Some(&s.gates),
            Some(r.capacity),
            10,
            4,
            2,
        )
        .unwrap();
        assert_eq!(from_kept.assignment, r.assignment, "vmoe's fill order");
        let dense = from_dense(
            r.router,
            &r.dispatch_dense(),
            &r.combine_dense(),
            Some(&s.gates),
            10,
            4,
            r.capacity,
        )
        .unwrap();
        assert_eq!(dense.stats().tokens_per_expert, r.stats().tokens_per_expert);
        assert_eq!(dense.stats().dropped_tokens, r.stats().dropped_tokens);
        assert_eq!(dense.dispatch_dense(), r.dispatch_dense());
        assert_eq!(dense.combine_dense(), r.combine_dense());
    }

    #[test]
    fn bad_picks_and_tensors_are_named() {
        let e = from_picks(
            RouterKind::SoftmaxTokenChoice,
            &[0, 4],
            &[0.5, 0.5],
            None,
            None,
            None,
            None,
            2,
            4,
            1,
        )
        .unwrap_err();
        assert!(e.contains("expert_index[1, 0] is 4"), "{e}");
        let e = from_picks(
            RouterKind::SoftmaxTokenChoice,
            &[0, 1],
            &[f32::NAN, 0.5],
            None,
            None,
            None,
            None,
            2,
            4,
            1,
        )
        .unwrap_err();
        assert!(e.contains("gates[0, 0] is NaN"), "{e}");
        let e = from_dense(
            RouterKind::SoftmaxExpertChoice,
            &[1.0, 1.0],
            &[0.5, 0.5],
            None,
            2,
            1,
            1,
        )
        .unwrap_err();
        assert!(e.contains("same slot"), "{e}");
    }
}
