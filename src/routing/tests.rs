//! The worked examples of spec §6, end to end through the public entry points.

use super::golden::{GOLDEN_LOGITS, GOLDEN_SOFTMAX};
use super::*;
use rand::SeedableRng;

fn cfg(kind: RouterKind, k: usize, bpr: bool) -> RouterConfig {
    RouterConfig {
        k,
        batch_priority: bpr,
        multiple_of: 1,
        ..RouterConfig::new(kind)
    }
}

fn route(kind: RouterKind, k: usize, bpr: bool) -> RoutingResult {
    route_logits(
        &GOLDEN_LOGITS,
        8,
        4,
        &cfg(kind, k, bpr),
        Mode::Deterministic,
    )
    .unwrap()
}

/// Per token, per rank: (expert, slot) with `None` for dropped.
fn tc(r: &RoutingResult) -> Vec<Vec<(u32, Option<u32>)>> {
    (0..r.num_tokens)
        .map(|i| {
            r.token_choices(i)
                .iter()
                .map(|c| (c.expert, c.slot))
                .collect()
        })
        .collect()
}

/// Per expert: tokens in slot order.
fn ec(r: &RoutingResult) -> Vec<Vec<u32>> {
    let s = r.sparse().unwrap();
    s.slot_token
        .chunks(r.capacity)
        .map(|slots| slots.iter().map(|t| t.unwrap()).collect())
        .collect()
}

fn k1(pairs: [(u32, Option<u32>); 8]) -> Vec<Vec<(u32, Option<u32>)>> {
    pairs.iter().map(|&p| vec![p]).collect()
}

const X: Option<u32> = None;

#[test]
fn softmax_tc_k1_vanilla() {
    let r = route(RouterKind::SoftmaxTokenChoice, 1, false);
    assert_eq!(r.capacity, 2);
    let want = [
        (3, Some(0)),
        (0, Some(0)),
        (1, Some(0)),
        (0, Some(1)),
        (0, X),
        (2, Some(0)),
        (1, Some(1)),
        (0, X),
    ];
    assert_eq!(tc(&r), k1(want));
    let st = r.stats();
    assert_eq!(st.dropped_tokens, [4, 7]);
    assert_eq!(st.tokens_per_expert, [2, 2, 1, 1]);
    assert_eq!(st.requests_per_expert, [4, 2, 1, 1]);
    assert_eq!(st.actual_capacity_factor, 1.0);
}

#[test]
fn softmax_tc_k1_batch_priority() {
    let r = route(RouterKind::SoftmaxTokenChoice, 1, true);
    let want = [
        (3, Some(0)),
        (0, Some(1)),
        (1, Some(1)),
        (0, X),
        (0, Some(0)),
        (2, Some(0)),
        (1, Some(0)),
        (0, X),
    ];
    assert_eq!(tc(&r), k1(want));
}

#[test]
fn softmax_tc_k2_vanilla_and_bpr() {
    let r = route(RouterKind::SoftmaxTokenChoice, 2, false);
    assert_eq!(r.capacity, 4);
    let s = |e, s| (e, Some(s));
    let want = vec![
        vec![s(3, 0), (0, X)],
        vec![s(0, 0), s(3, 1)],
        vec![s(1, 0), s(2, 1)],
        vec![s(0, 1), s(1, 2)],
        vec![s(0, 2), s(3, 2)],
        vec![s(2, 0), s(1, 3)],
        vec![s(1, 1), s(2, 2)],
        vec![s(0, 3), s(3, 3)],
    ];
    assert_eq!(tc(&r), want);
    let r = route(RouterKind::SoftmaxTokenChoice, 2, true);
    let want = vec![
        vec![s(3, 0), (0, X)],
        vec![s(0, 1), s(3, 2)],
        vec![s(1, 1), s(2, 2)],
        vec![s(0, 3), s(1, 3)],
        vec![s(0, 0), s(3, 1)],
        vec![s(2, 0), s(1, 2)],
        vec![s(1, 0), s(2, 1)],
        vec![s(0, 2), s(3, 3)],
    ];
    assert_eq!(tc(&r), want);
    // Gates are the raw softmax probabilities, never renormalised.
    let ch = r.token_choices(1);
    assert!((ch[0].gate - 0.45343).abs() < 1e-5 && (ch[1].gate - 0.27502).abs() < 1e-5);
}

#[test]
fn softmax_ec() {
    let r = route(RouterKind::SoftmaxExpertChoice, 1, false);
    assert_eq!(ec(&r), [[4, 1], [6, 2], [5, 3], [0, 7]]);
    let st = r.stats();
    assert!(st.dropped_tokens.is_empty());
    assert_eq!(st.experts_per_token, [1; 8]);
}

#[test]
fn sinkhorn_tc_vanilla_and_bpr() {
    let r = route(RouterKind::SinkhornTokenChoice, 1, false);
    let want = [
        (3, Some(0)),
        (0, Some(0)),
        (1, Some(0)),
        (2, Some(0)),
        (0, Some(1)),
        (2, Some(1)),
        (1, Some(1)),
        (0, X),
    ];
    assert_eq!(tc(&r), k1(want));
    assert_eq!(r.solver.unwrap().iterations, 20);
    // Combine weights are the softmax at the chosen pairs.
    for i in 0..8 {
        let ch = r.token_choices(i)[0];
        assert!((ch.gate - GOLDEN_SOFTMAX[i * 4 + ch.expert as usize]).abs() < 1e-5);
    }
    let r = route(RouterKind::SinkhornTokenChoice, 1, true);
    let want = [
        (3, Some(0)),
        (0, Some(1)),
        (1, Some(1)),
        (2, Some(1)),
        (0, Some(0)),
        (2, Some(0)),
        (1, Some(0)),
        (0, X),
    ];
    assert_eq!(tc(&r), k1(want));
}

#[test]
fn sinkhorn_ec() {
    let r = route(RouterKind::SinkhornExpertChoice, 1, false);
    assert_eq!(ec(&r), [[4, 1], [6, 2], [5, 3], [0, 7]]);
}

#[test]
fn sparse_ec_selection_order_and_gates() {
    let r = route(RouterKind::SparseExpertChoice, 1, false);
    assert_eq!(ec(&r), [[1, 4], [2, 6], [5, 3], [7, 0]]);
    let s = r.sparse().unwrap();
    // Combine with the softmax (not the plan).
    for (slot, t) in s.slot_token.iter().enumerate() {
        let (t, j) = (t.unwrap() as usize, slot / 2);
        assert!((s.slot_gate[slot] - GOLDEN_SOFTMAX[t * 4 + j]).abs() < 1e-5);
    }
    assert_eq!(r.solver.unwrap().iterations, 20);
}

#[test]
fn sparse_tc_hard_assignment() {
    let r = route(RouterKind::SparseTokenChoice, 1, false);
    let want = [3, 0, 1, 2, 0, 2, 1, 3];
    for (i, &j) in want.iter().enumerate() {
        let ch = r.token_choices(i);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].expert, j);
        assert!(ch[0].slot.is_some(), "token {i} dropped");
    }
}

#[test]
fn soft_moe_toy_through_route_soft() {
    let x = [1.0, 0.0, 2.0, 0.5, -1.0, 0.0, 0.0, 3.0, 1.0, -2.0, 0.5, 0.5];
    let mu = [1.0, -1.0, 0.0, 1.0, 1.0, 0.5];
    let params = SoftRouterParams {
        mu: &mu,
        dim: 3,
        num_experts: 2,
        num_slots: 1,
        scale: 1.0,
    };
    let config = RouterConfig {
        capacity: CapacitySpec::Slots(1),
        ..RouterConfig::new(RouterKind::SoftMoe)
    };
    let r = route_soft(&x, 4, &params, &config, Mode::Deterministic).unwrap();
    let d = r.dispatch_dense();
    assert!((d[0] - 0.44436).abs() < 1e-5 && (d[7] - 0.40405).abs() < 1e-5);
    let c = r.combine_dense();
    assert!((c[0] - 0.72085).abs() < 1e-5 && (c[7] - 0.79645).abs() < 1e-5);
    // With a capacity factor, p = round(4·1/2) = 2 does not match mu's single slot.
    let by_factor = RouterConfig::new(RouterKind::SoftMoe);
    assert!(matches!(
        route_soft(&x, 4, &params, &by_factor, Mode::Deterministic),
        Err(RoutingError::Shape(_))
    ));
}

#[test]
fn dense_views_agree_with_the_compact_form() {
    let r = route(RouterKind::SoftmaxTokenChoice, 2, false);
    let d = r.dispatch_dense();
    let g = r.combine_dense();
    assert_eq!(d.len(), 8 * 4 * 4);
    // Token 0's rank-1 choice: expert 3, slot 0.
    assert_eq!(d[3 * 4], 1.0);
    assert!((g[3 * 4] - GOLDEN_SOFTMAX[3]).abs() < 1e-5);
    // Its dropped rank-2 choice leaves no trace.
    assert_eq!(d[..4].iter().sum::<f32>(), 0.0);
    assert_eq!(d.iter().sum::<f32>(), 15.0);
}

#[test]
fn expert_choice_rejects_capacity_above_group_size() {
    let config = RouterConfig {
        capacity: CapacitySpec::Factor(5.0),
        ..cfg(RouterKind::SoftmaxExpertChoice, 1, false)
    };
    let err = route_logits(&GOLDEN_LOGITS, 8, 4, &config, Mode::Deterministic).unwrap_err();
    assert!(matches!(err, RoutingError::Capacity(_)), "{err}");
    // Token Choice accepts it (the extra slots stay empty).
    let config = RouterConfig {
        kind: RouterKind::SoftmaxTokenChoice,
        ..config
    };
    assert!(route_logits(&GOLDEN_LOGITS, 8, 4, &config, Mode::Deterministic).is_ok());
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let c = cfg(RouterKind::SoftmaxTokenChoice, 1, false);
    let mut nan = GOLDEN_LOGITS;
    nan[13] = f32::NAN;
    let err = route_logits(&nan, 8, 4, &c, Mode::Deterministic).unwrap_err();
    assert_eq!(
        err.to_string(),
        "non-finite input: logits has a non-finite value NaN at [3, 1]"
    );
    assert!(route_logits(&GOLDEN_LOGITS, 8, 3, &c, Mode::Deterministic).is_err());
    let k5 = cfg(RouterKind::SoftmaxTokenChoice, 5, false);
    assert!(route_logits(&GOLDEN_LOGITS, 8, 4, &k5, Mode::Deterministic).is_err());
    let k0 = cfg(RouterKind::SoftmaxTokenChoice, 0, false);
    assert!(route_logits(&GOLDEN_LOGITS, 8, 4, &k0, Mode::Deterministic).is_err());
    let soft = RouterConfig::new(RouterKind::SoftMoe);
    assert!(route_logits(&GOLDEN_LOGITS, 8, 4, &soft, Mode::Deterministic).is_err());
    assert!(route_logits(&[], 0, 4, &c, Mode::Deterministic).is_err());
}

#[test]
fn training_mode_is_seeded_and_adds_losses() {
    let c = cfg(RouterKind::SoftmaxTokenChoice, 1, false);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let a = route_logits(&GOLDEN_LOGITS, 8, 4, &c, Mode::Train(&mut rng)).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let b = route_logits(&GOLDEN_LOGITS, 8, 4, &c, Mode::Train(&mut rng)).unwrap();
    assert_eq!(a, b);
    assert!(a.aux.importance.is_some() && a.aux.load.is_some());
    assert!(a.aux.total > 0.0);
    // Noisy gates differ from the clean softmax.
    let g = &a.sparse().unwrap().gates;
    assert!(
        g.iter()
            .zip(GOLDEN_SOFTMAX)
            .any(|(x, y)| (x - y).abs() > 1e-4)
    );
    // Inference has no load loss.
    let d = route(RouterKind::SoftmaxTokenChoice, 1, false);
    assert!(d.aux.importance.is_some() && d.aux.load.is_none());
}

#[test]
fn sinkhorn_tc_combines_with_the_clean_softmax_even_in_training() {
    let c = cfg(RouterKind::SinkhornTokenChoice, 1, false);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let r = route_logits(&GOLDEN_LOGITS, 8, 4, &c, Mode::Train(&mut rng)).unwrap();
    for (g, s) in r.sparse().unwrap().gates.iter().zip(GOLDEN_SOFTMAX) {
        assert!((g - s).abs() < 1e-5);
    }
    // Sinkhorn EC uses the noisy softmax.
    let c = cfg(RouterKind::SinkhornExpertChoice, 1, false);
    let r = route_logits(&GOLDEN_LOGITS, 8, 4, &c, Mode::Train(&mut rng)).unwrap();
    let g = &r.sparse().unwrap().gates;
    assert!(
        g.iter()
            .zip(GOLDEN_SOFTMAX)
            .any(|(x, y)| (x - y).abs() > 1e-4)
    );
}

#[test]
fn sparse_routers_never_add_noise() {
    let c = cfg(RouterKind::SparseExpertChoice, 1, false);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let r = route_logits(&GOLDEN_LOGITS, 8, 4, &c, Mode::Train(&mut rng)).unwrap();
    assert_eq!(r, route(RouterKind::SparseExpertChoice, 1, false));
}

#[test]
fn all_zero_logits_route_by_the_tie_rules() {
    let z = [0.0f32; 32];
    let r = route_logits(
        &z,
        8,
        4,
        &cfg(RouterKind::SoftmaxTokenChoice, 2, false),
        Mode::Deterministic,
    )
    .unwrap();
    // Every token asks experts 0 then 1; capacity 4 keeps the first four tokens' requests.
    for i in 0..8 {
        let ch = r.token_choices(i);
        assert_eq!((ch[0].expert, ch[1].expert), (0, 1));
        assert_eq!(ch[0].slot, (i < 4).then_some(i as u32));
    }
    let r = route_logits(
        &z,
        8,
        4,
        &cfg(RouterKind::SoftmaxExpertChoice, 1, false),
        Mode::Deterministic,
    )
    .unwrap();
    assert_eq!(ec(&r), [[0, 1], [0, 1], [0, 1], [0, 1]]);
}

#[test]
fn moe_layer_matches_the_dense_einsums() {
    struct Affine;
    impl Experts for Affine {
        fn num_experts(&self) -> usize {
            4
        }
        fn dim(&self) -> usize {
            2
        }
        fn apply(&self, j: usize, input: &[f32], output: &mut [f32]) {
            for (o, i) in output.iter_mut().zip(input) {
                *o = (j as f32 + 1.0) * i + 0.5;
            }
        }
    }
    let x: Vec<f32> = (0..16).map(|v| v as f32 * 0.25 - 1.0).collect();
    for kind in [
        RouterKind::SoftmaxTokenChoice,
        RouterKind::SoftmaxExpertChoice,
    ] {
        let r = route(kind, 2, false);
        let out = moe_layer(&x, &r, &Affine, false).unwrap();
        let (dd, gg) = (r.dispatch_dense(), r.combine_dense());
        let (e, c, d) = (4, r.capacity, 2);
        // X̃ = Dᵀ X, Ỹ = f(X̃), Y = Γ Ỹ
        let mut xt = vec![0.0f32; e * c * d];
        for i in 0..8 {
            for slot in 0..e * c {
                for k in 0..d {
                    xt[slot * d + k] += dd[i * e * c + slot] * x[i * d + k];
                }
            }
        }
        assert_eq!(out.slot_inputs, xt);
        let mut y = vec![0.0f32; 8 * d];
        for i in 0..8 {
            for slot in 0..e * c {
                for k in 0..d {
                    let j = slot / c;
                    y[i * d + k] +=
                        gg[i * e * c + slot] * ((j as f32 + 1.0) * xt[slot * d + k] + 0.5);
                }
            }
        }
        for (a, b) in out.token_outputs.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
        // Dropped tokens (token 0's second choice) get nothing from that expert; empty slots run
        // f(0) = 0.5 but never reach a token.
        if kind == RouterKind::SoftmaxTokenChoice {
            assert!(out.expert_outputs.contains(&0.5));
        }
    }
}

/// Cross-checked with jaxopt + optax (the reference's solver stack): 5 tokens, 15 experts,
/// capacity 1, so b = 1/3 and three selections sum to exactly 1 in f32. The gradient must be
/// summed before `a` is subtracted (zero, not a one-ulp residue that Adam would turn into a full
/// step), and optax's `1 − β` constants are rounded from double precision.
#[test]
fn sparse_ec_matches_the_reference_solver_where_the_gradient_vanishes() {
    let bits: [u32; 75] = [
        0x3d901890, 0xbdc49c82, 0xbeeb1f0d, 0x3effebe5, 0x3dc8cab0, 0xbe496687, 0x3efda777,
        0x3e9ce886, 0xbe6201fc, 0xbf564eac, 0xbe18d9fc, 0xbf156617, 0x3e4f27ee, 0x3f10ca71,
        0x3f4b9800, 0xbe541572, 0x3edf842c, 0xbe832aed, 0x3cb9fca7, 0x3f0ed6f5, 0x3d63656b,
        0x3e8dab13, 0x3f0fa407, 0xbe128c49, 0x3eb98b97, 0x3fa22080, 0x3da20efb, 0xbce72c8b,
        0x3ed0cb04, 0xbde02786, 0x3ec5a6f3, 0x3e9d2ee9, 0xbe429efa, 0xbd12c458, 0x3eeec446,
        0xbe87b259, 0xbf581851, 0xbf74c290, 0x3e078d4c, 0xbed8165b, 0xbf28c8da, 0xbf45f1d6,
        0xbdcce3fa, 0xbd32a32b, 0x3e87d031, 0x3e00d99a, 0x3f685126, 0x3f024648, 0x3b24e534,
        0x3f0cb265, 0x3e436698, 0xbf258892, 0x3ea315b9, 0x3f1cb988, 0xbe4a6233, 0x3e467f62,
        0xbd2a8ced, 0x3ed1b5c3, 0x3e4ef784, 0x3f492a70, 0xbf29b9bc, 0x3f76d95c, 0x3d23485d,
        0xbdb842f9, 0xbeaab89c, 0x3e45f01a, 0x3ed15667, 0x3e9e3432, 0xbd65c27b, 0xbf62431e,
        0xbd24b9db, 0xbe755918, 0xbcb25127, 0xbf0d2032, 0x3c23aa7d,
    ];
    let logits: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let cfg = RouterConfig {
        multiple_of: 1,
        ..RouterConfig::new(RouterKind::SparseExpertChoice)
    };
    let r = route_logits(&logits, 5, 15, &cfg, Mode::Deterministic).unwrap();
    assert_eq!(r.capacity, 1);
    // jaxopt's plan: the token holding each expert's single nonzero.
    let reference = [2, 4, 3, 0, 2, 4, 4, 1, 2, 1, 1, 3, 2, 0, 0];
    let chosen: Vec<u32> = r
        .sparse()
        .unwrap()
        .slot_token
        .iter()
        .map(|t| t.unwrap())
        .collect();
    assert_eq!(chosen, reference);
    // The gradient reached exactly zero: the solver stopped after 19 updates, as jaxopt did.
    assert_eq!(r.solver.unwrap().iterations, 19);
    assert!(r.solver.unwrap().converged);
}

/// Solver iterations are bounded (a checkpoint or `--iterations` asking for 10^9 would run for
/// minutes): beyond the limit is an error naming it; at the limit the solve runs.
#[test]
fn solver_iterations_are_capped() {
    for kind in [
        RouterKind::SinkhornTokenChoice,
        RouterKind::SinkhornExpertChoice,
        RouterKind::SparseExpertChoice,
    ] {
        let mut c = cfg(kind, 1, false);
        c.max_iterations = 1_000_000_000;
        let e = route_logits(&GOLDEN_LOGITS, 8, 4, &c, Mode::Deterministic)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1000000000 solver iterations is beyond the limit of 10000"),
            "{e}"
        );
        c.max_iterations = MAX_SOLVER_ITERATIONS;
        assert!(route_logits(&GOLDEN_LOGITS, 8, 4, &c, Mode::Deterministic).is_ok());
    }
}

/// The same worked examples as data (`tests/fixtures/routing-golden.json`), which the Python
/// package's tests also route: both must agree with the spec, and with each other.
#[test]
fn the_shared_golden_fixture_holds() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/routing-golden.json")).unwrap();
    let logits: Vec<f32> = doc["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(logits, GOLDEN_LOGITS);
    let cases = doc["sparse_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let kind: RouterKind = case["router"].as_str().unwrap().parse().unwrap();
        let o = &case["options"];
        let mut cfg = cfg(
            kind,
            o["k"].as_u64().unwrap_or(1) as usize,
            o["batch_priority"].as_bool().unwrap_or(false),
        );
        if kind.family() != RouterFamily::TokenChoice {
            cfg.k = 1;
        }
        let r = route_logits(&logits, 8, 4, &cfg, Mode::Deterministic).unwrap();
        assert_eq!(
            r.capacity as u64,
            case["capacity"].as_u64().unwrap(),
            "{name}"
        );
        if let Some(choices) = case["choices"].as_array() {
            let want: Vec<Vec<(u32, Option<u32>)>> = choices
                .iter()
                .map(|t| {
                    t.as_array()
                        .unwrap()
                        .iter()
                        .map(|c| {
                            (
                                c[0].as_u64().unwrap() as u32,
                                c[1].as_u64().map(|s| s as u32),
                            )
                        })
                        .collect()
                })
                .collect();
            assert_eq!(tc(&r), want, "{name}");
        }
        if let Some(slots) = case["expert_slots"].as_array() {
            let want: Vec<Vec<u32>> = slots
                .iter()
                .map(|e| {
                    e.as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect();
            assert_eq!(ec(&r), want, "{name}");
        }
        if let Some(top) = case["top_experts"].as_array() {
            for (i, j) in top.iter().enumerate() {
                let ch = r.token_choices(i);
                assert_eq!(ch[0].expert as u64, j.as_u64().unwrap(), "{name} token {i}");
            }
        }
        let st = r.stats();
        let list = |key: &str| -> Option<Vec<usize>> {
            case[key]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect())
        };
        if let Some(d) = list("dropped") {
            assert_eq!(st.dropped_tokens, d, "{name}");
        }
        if let Some(t) = list("tokens_per_expert") {
            assert_eq!(st.tokens_per_expert, t, "{name}");
        }
        if let Some(t) = list("requests_per_expert") {
            assert_eq!(st.requests_per_expert, t, "{name}");
        }
        if let Some(it) = case["solver_iterations"].as_u64() {
            assert_eq!(r.solver.unwrap().iterations as u64, it, "{name}");
        }
    }
}
