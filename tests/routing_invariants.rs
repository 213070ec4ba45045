//! Property tests of the routing invariants on random shapes and logits (ties included), plus
//! differential checks of the slotting against a naive transcription of the spec's pseudo-code.

use proptest::prelude::*;
use routerscope::routing::{
    CapacityRounding, CapacitySpec, Mode, RouterConfig, RouterFamily, RouterKind, RoutingError,
    RoutingResult, ScotOptions, SoftRouterParams, route_logits, route_soft, scot_columns,
    sinkhorn_plan,
};

/// Logits with frequent exact ties (values on a coarse grid) or continuous values.
fn logits_strategy(n: usize, e: usize) -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        prop::collection::vec((-4i32..=4).prop_map(|v| v as f32 * 0.5), n * e),
        prop::collection::vec(-6.0f32..6.0, n * e),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    e: usize,
    k: usize,
    cf: f64,
    multiple_of: usize,
    rounding: CapacityRounding,
    bpr: bool,
    logits: Vec<f32>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1usize..40, 1usize..12)
        .prop_flat_map(|(n, e)| {
            (
                Just(n),
                Just(e),
                1..=e.min(3),
                prop_oneof![Just(1.0f64), 0.2f64..3.0],
                prop_oneof![Just(0usize), Just(1), Just(4)],
                prop_oneof![Just(CapacityRounding::Ceil), Just(CapacityRounding::Round)],
                any::<bool>(),
                logits_strategy(n, e),
            )
        })
        .prop_map(|(n, e, k, cf, multiple_of, rounding, bpr, logits)| Case {
            n,
            e,
            k,
            cf,
            multiple_of,
            rounding,
            bpr,
            logits,
        })
}

fn config(kind: RouterKind, c: &Case) -> RouterConfig {
    RouterConfig {
        k: c.k,
        capacity: CapacitySpec::Factor(c.cf),
        multiple_of: c.multiple_of,
        rounding: c.rounding,
        batch_priority: c.bpr,
        ..RouterConfig::new(kind)
    }
}

/// Spec §2.0 Token-Choice slotting, written as plainly as possible (full sorts, no buffers).
fn naive_token_choice(
    scores: &[f32],
    n: usize,
    e: usize,
    k: usize,
    c: usize,
    bpr: bool,
) -> Vec<Vec<(usize, Option<usize>)>> {
    let topk = |i: usize| {
        let mut idx: Vec<usize> = (0..e).collect();
        idx.sort_by(|&a, &b| scores[i * e + b].partial_cmp(&scores[i * e + a]).unwrap());
        idx.truncate(k);
        idx
    };
    let chosen: Vec<Vec<usize>> = (0..n).map(topk).collect();
    let mut order: Vec<usize> = (0..n).collect();
    if bpr {
        order.sort_by(|&a, &b| {
            let (pa, pb) = (scores[a * e + chosen[a][0]], scores[b * e + chosen[b][0]]);
            pb.partial_cmp(&pa).unwrap()
        });
    }
    let mut count = vec![0usize; e];
    let mut out = vec![vec![(0, None); k]; n];
    for t in 0..k {
        for &i in &order {
            let j = chosen[i][t];
            let s = count[j];
            count[j] += 1;
            out[i][t] = (j, (s < c).then_some(s));
        }
    }
    out
}

/// Spec §2.0 Expert-Choice selection with full stable sorts.
fn naive_expert_choice(scores: &[f32], n: usize, e: usize, c: usize) -> Vec<Vec<usize>> {
    (0..e)
        .map(|j| {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&a, &b| scores[b * e + j].partial_cmp(&scores[a * e + j]).unwrap());
            idx.truncate(c);
            idx
        })
        .collect()
}

fn check_sparse_invariants(r: &RoutingResult, k: usize) -> Result<(), TestCaseError> {
    let (n, e, c) = (r.num_tokens, r.num_experts, r.capacity);
    let s = r.sparse().unwrap();
    let dispatch = r.dispatch_dense();
    let combine = r.combine_dense();
    // No slot holds two tokens; each expert at most c tokens.
    for slot in 0..e * c {
        let held: f32 = (0..n).map(|i| dispatch[i * e * c + slot]).sum();
        prop_assert!(held <= 1.0);
    }
    for (j, &load) in r.stats().tokens_per_expert.iter().enumerate() {
        prop_assert!(load <= c, "expert {j} holds {load} > {c}");
    }
    for i in 0..n {
        // A token occupies at most one slot of a given expert.
        for j in 0..e {
            let held: f32 = (0..c).map(|sl| dispatch[i * e * c + j * c + sl]).sum();
            prop_assert!(held <= 1.0);
        }
        let ch = r.token_choices(i);
        if r.router.family() == RouterFamily::TokenChoice {
            prop_assert_eq!(ch.len(), k);
            let mut experts: Vec<u32> = ch.iter().map(|c| c.expert).collect();
            experts.sort();
            experts.dedup();
            prop_assert_eq!(experts.len(), k, "token {} picks an expert twice", i);
        }
        // combine = dispatch ⊙ gate
        for j in 0..e {
            for sl in 0..c {
                let at = i * e * c + j * c + sl;
                prop_assert_eq!(combine[at], dispatch[at] * s.gates[i * e + j]);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn token_choice_routers_obey_invariants_and_the_pseudo_code(case in case_strategy()) {
        for kind in [RouterKind::SoftmaxTokenChoice, RouterKind::SinkhornTokenChoice, RouterKind::SparseTokenChoice] {
            let r = route_logits(&case.logits, case.n, case.e, &config(kind, &case), Mode::Deterministic);
            let r = match r {
                Err(RoutingError::Capacity(_)) => {
                    // Only round-half-to-even can produce c < 1 for Token Choice.
                    prop_assert_eq!(case.rounding, CapacityRounding::Round);
                    continue;
                }
                other => other.unwrap(),
            };
            check_sparse_invariants(&r, case.k)?;
            let s = r.sparse().unwrap();
            let want = naive_token_choice(&s.scores, case.n, case.e, case.k, r.capacity, case.bpr);
            for (i, want_i) in want.iter().enumerate() {
                let got: Vec<(usize, Option<usize>)> = r
                    .token_choices(i)
                    .iter()
                    .map(|c| (c.expert as usize, c.slot.map(|s| s as usize)))
                    .collect();
                prop_assert_eq!(&got, want_i, "{:?} token {}", kind, i);
            }
        }
    }

    #[test]
    fn expert_choice_routers_fill_every_slot_with_distinct_tokens(case in case_strategy()) {
        for kind in [RouterKind::SoftmaxExpertChoice, RouterKind::SinkhornExpertChoice, RouterKind::SparseExpertChoice] {
            let cfg = config(kind, &case);
            let r = match route_logits(&case.logits, case.n, case.e, &cfg, Mode::Deterministic) {
                Err(RoutingError::Capacity(_)) => {
                    let c = (case.n as f64 * case.cf / case.e as f64).ceil() as usize;
                    prop_assert!(c > case.n || case.rounding == CapacityRounding::Round || case.multiple_of > 1);
                    continue;
                }
                other => other.unwrap(),
            };
            prop_assert!(r.capacity <= case.n);
            check_sparse_invariants(&r, 1)?;
            let s = r.sparse().unwrap();
            prop_assert!(s.slot_token.iter().all(|t| t.is_some()), "EC leaves no slot empty");
            let want = naive_expert_choice(&s.scores, case.n, case.e, r.capacity);
            for (j, w) in want.iter().enumerate() {
                let got: Vec<usize> = s.slot_token[j * r.capacity..(j + 1) * r.capacity]
                    .iter()
                    .map(|t| t.unwrap() as usize)
                    .collect();
                prop_assert_eq!(&got, w, "{:?} expert {}", kind, j);
            }
            let st = r.stats();
            prop_assert_eq!(st.experts_per_token_histogram.iter().sum::<usize>(), case.n);
            prop_assert_eq!(st.experts_per_token.iter().sum::<usize>(), case.e * r.capacity);
        }
    }

    #[test]
    fn sinkhorn_rows_sum_to_one(n in 1usize..60, e in 1usize..16, scale in prop_oneof![Just(1.0f32), Just(5.0), Just(100.0)], seed in any::<u64>()) {
        let logits: Vec<f32> = (0..n * e).map(|i| {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        }).collect();
        let out = sinkhorn_plan(&logits, n, e, 20);
        for row in out.plan.chunks_exact(e) {
            let s: f32 = row.iter().sum();
            prop_assert!(row.iter().all(|p| p.is_finite() && *p >= 0.0));
            prop_assert!((s - 1.0).abs() < 1e-4, "row sum {}", s);
        }
    }

    #[test]
    fn sparse_ot_plans_respect_the_cardinality(n in 1usize..50, e in 1usize..12, kappa in 1usize..8, logits in prop::collection::vec(-5.0f32..5.0, 50 * 12)) {
        let logits = &logits[..n * e];
        let mut probs = logits.to_vec();
        routerscope::routing::ops::softmax_rows_in_place(&mut probs, e);
        let b = (n as f64 / e as f64) as f32;
        // Expert Choice orientation: columns are experts, at most κ tokens each, mass n/e.
        let opts = ScotOptions { kappa, max_iterations: 20, adam_lr: 1e-2 };
        let out = scot_columns(&probs, n, e, (1.0, b), &opts);
        for j in 0..e {
            let col: Vec<f32> = (0..n).map(|i| out.plan[i * e + j]).collect();
            prop_assert!(col.iter().filter(|&&v| v != 0.0).count() <= kappa);
            prop_assert!(col.iter().all(|&v| v >= 0.0));
            prop_assert!((col.iter().sum::<f32>() - b).abs() < 1e-4 * b.max(1.0));
        }
        // Token Choice orientation (transposed): each token's row has ≤ κ nonzeros summing to 1.
        let mut t = vec![0.0f32; n * e];
        for i in 0..n { for j in 0..e { t[j * n + i] = probs[i * e + j]; } }
        let out = scot_columns(&t, e, n, (b, 1.0), &opts);
        for i in 0..n {
            let row: Vec<f32> = (0..e).map(|j| out.plan[j * n + i]).collect();
            prop_assert!(row.iter().filter(|&&v| v != 0.0).count() <= kappa);
            prop_assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn soft_moe_weights_are_convex(n in 1usize..30, d in 1usize..10, e in 1usize..6, p in 1usize..4, scale in -20.0f32..20.0, data in prop::collection::vec(-3.0f32..3.0, 30 * 10 + 10 * 6 * 4)) {
        let x = &data[..n * d];
        let mu = &data[300..300 + d * e * p];
        let params = SoftRouterParams { mu, dim: d, num_experts: e, num_slots: p, scale };
        let cfg = RouterConfig { capacity: CapacitySpec::Slots(p), ..RouterConfig::new(RouterKind::SoftMoe) };
        let r = route_soft(x, n, &params, &cfg, Mode::Deterministic).unwrap();
        let s = r.soft().unwrap();
        let ep = e * p;
        for slot in 0..ep {
            let sum: f32 = (0..n).map(|i| s.dispatch[i * ep + slot]).sum();
            prop_assert!((sum - 1.0).abs() < 1e-5, "slot {} dispatch sums to {}", slot, sum);
        }
        for row in s.combine.chunks_exact(ep) {
            prop_assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            prop_assert!(row.iter().all(|&v| v >= 0.0));
        }
    }

    #[test]
    fn every_router_stays_finite_for_logits_of_magnitude_100(case in case_strategy()) {
        let big: Vec<f32> = case.logits.iter().map(|v| v * 25.0).collect(); // up to ±150
        for kind in RouterKind::ALL.into_iter().filter(|k| *k != RouterKind::SoftMoe) {
            if let Ok(r) = route_logits(&big, case.n, case.e, &config(kind, &case), Mode::Deterministic) {
                let s = r.sparse().unwrap();
                prop_assert!(s.scores.iter().chain(&s.gates).all(|v| v.is_finite()), "{:?}", kind);
                prop_assert!(r.combine_dense().iter().all(|v| v.is_finite()));
            }
        }
    }
}
