//! Expert-Choice selection (spec §2.0), shared by Softmax, Sinkhorn and sparsity-constrained
//! Expert Choice: every expert takes the `c` highest-scoring tokens of its column, ties to the
//! lower token index. Every slot is filled, even when the selected scores are zero.

use super::ops::top_k_indices;
use super::result::{Choice, SparseAssignment};

/// Selects `c ≤ n` tokens per expert. `scores` ranks; `gates` gives the combine weights.
pub fn expert_choice_selection(
    scores: Vec<f32>,
    gates: Vec<f32>,
    n: usize,
    e: usize,
    c: usize,
) -> SparseAssignment {
    debug_assert!(c <= n);
    let mut slot_token = vec![None; e * c];
    let mut column = vec![0.0f32; n];
    let mut top = Vec::with_capacity(c);
    for j in 0..e {
        for (i, v) in column.iter_mut().enumerate() {
            *v = scores[i * e + j];
        }
        top_k_indices(&column, c, &mut top);
        for (s, &i) in top.iter().enumerate() {
            slot_token[j * c + s] = Some(i as u32);
        }
    }
    expert_choice_assignment(slot_token, scores, gates, n, e, c)
}

/// The sparse assignment of an Expert Choice selection `slot_token` (`[e·c]`, every slot
/// filled): slot gates from `gates`, per-token choice lists in expert order.
pub fn expert_choice_assignment(
    slot_token: Vec<Option<u32>>,
    scores: Vec<f32>,
    gates: Vec<f32>,
    n: usize,
    e: usize,
    c: usize,
) -> SparseAssignment {
    let mut slot_gate = vec![0.0f32; e * c];
    let mut per_token = vec![0u32; n + 1];
    for (slot, token) in slot_token.iter().enumerate() {
        if let Some(i) = token {
            slot_gate[slot] = gates[*i as usize * e + slot / c];
            per_token[*i as usize + 1] += 1;
        }
    }
    // Per-token lists in expert order (CSR).
    for i in 0..n {
        per_token[i + 1] += per_token[i];
    }
    let mut fill = per_token.clone();
    let mut choices = vec![
        Choice {
            expert: 0,
            slot: None,
            gate: 0.0
        };
        e * c
    ];
    for j in 0..e {
        for s in 0..c {
            if let Some(i) = slot_token[j * c + s] {
                let at = &mut fill[i as usize];
                choices[*at as usize] = Choice {
                    expert: j as u32,
                    slot: Some(s as u32),
                    gate: slot_gate[j * c + s],
                };
                *at += 1;
            }
        }
    }
    SparseAssignment {
        slot_token,
        slot_gate,
        choice_offsets: per_token,
        choices,
        requests: vec![c as u32; e],
        scores,
        gates,
    }
}
