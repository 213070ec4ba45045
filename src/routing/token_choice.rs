//! Token-Choice slotting (spec §2.0), shared by Softmax, Sinkhorn and sparsity-constrained Token
//! Choice: every token picks its top-k experts on a score matrix, and each expert accepts requests
//! in (rank, priority) order until its `c` slots are full. All first choices are placed before any
//! second choice; Batch Priority Routing orders tokens by their top-1 score (stable).

use super::ops::{stable_descending_order, top_k_indices};
use super::result::{Choice, SparseAssignment};

/// Slots tokens into experts. `scores` ranks (and, with BPR, prioritises); `gates` gives the
/// combine weights. Both are row-major `[n, e]`.
pub fn token_choice_slotting(
    scores: Vec<f32>,
    gates: Vec<f32>,
    n: usize,
    e: usize,
    k: usize,
    c: usize,
    batch_priority: bool,
) -> SparseAssignment {
    let mut chosen = Vec::with_capacity(n * k);
    let mut top = Vec::with_capacity(k);
    for row in scores.chunks_exact(e) {
        top_k_indices(row, k, &mut top);
        chosen.extend_from_slice(&top);
    }
    let order: Vec<usize> = if batch_priority {
        let top1: Vec<f32> = (0..n).map(|i| scores[i * e + chosen[i * k]]).collect();
        stable_descending_order(&top1)
    } else {
        (0..n).collect()
    };

    let mut slot_token = vec![None; e * c];
    let mut slot_gate = vec![0.0f32; e * c];
    let mut count = vec![0u32; e];
    let mut choices = vec![
        Choice {
            expert: 0,
            slot: None,
            gate: 0.0
        };
        n * k
    ];
    for rank in 0..k {
        for &i in &order {
            let j = chosen[i * k + rank];
            let s = count[j] as usize;
            count[j] += 1;
            let gate = gates[i * e + j];
            let slot = (s < c).then(|| {
                slot_token[j * c + s] = Some(i as u32);
                slot_gate[j * c + s] = gate;
                s as u32
            });
            choices[i * k + rank] = Choice {
                expert: j as u32,
                slot,
                gate,
            };
        }
    }
    SparseAssignment {
        slot_token,
        slot_gate,
        choice_offsets: (0..=n).map(|i| (i * k) as u32).collect(),
        choices,
        requests: count,
        scores,
        gates,
    }
}
