//! Every built-in model in `assets/models/` loads, classifies the committed Fashion-MNIST test
//! slice well, and routes by the rules: at most k experts per Token Choice token, at most c
//! tokens per expert, one token per slot, full Expert Choice slots, Soft MoE weights that are
//! distributions.

mod common;

use routerscope::model::{VitMoe, load_checkpoint};
use routerscope::routing::{Assignment, RouterFamily};
use routerscope::train::eval::evaluate;
use routerscope::train::{Dataset, Split};

#[test]
fn shipped_models_are_accurate_and_route_by_the_rules() {
    let slice = Dataset::load(&common::fixture_dir(), Split::Test).unwrap();
    for name in common::MODELS {
        let path = common::model_path(name);
        let (cfg, weights) = load_checkpoint(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(path.with_extension("md").is_file(), "{name}: no model card");
        match (&cfg.moe, name) {
            (None, "dense") => {}
            (Some(m), _) => assert_eq!(m.router.kind.cli_name(), name),
            (None, _) => panic!("{name} has no MoE layers"),
        }
        let model = VitMoe::new(cfg.clone(), weights).unwrap();
        let report = evaluate(&model, &slice, 250).unwrap();
        assert_eq!(report.images, slice.len());
        assert!(
            report.accuracy >= 0.83,
            "{name}: {:.1}% on the committed slice",
            100.0 * report.accuracy
        );

        // Routing invariants on the first 64 images, one group per image.
        let images: Vec<Vec<f32>> = (0..64)
            .map(|i| slice.normalized(i, 0.5, 0.5).collect())
            .collect();
        let out = model
            .forward(&images, &routerscope::model::RunOptions::from_config(&cfg))
            .unwrap();
        for layer in &out.records {
            for g in &layer.groups {
                let r = &g.routing;
                let (n, e, c) = (r.num_tokens, r.num_experts, r.capacity);
                match &r.assignment {
                    Assignment::Sparse(sp) => {
                        assert_eq!(sp.slot_token.len(), e * c);
                        let mut per_expert = vec![0usize; e];
                        let mut per_token = vec![0usize; n];
                        for (slot, t) in sp.slot_token.iter().enumerate() {
                            if let Some(t) = t {
                                per_expert[slot / c] += 1;
                                per_token[*t as usize] += 1;
                            }
                        }
                        assert!(per_expert.iter().all(|&v| v <= c), "{name}: over capacity");
                        match r.router.family() {
                            RouterFamily::TokenChoice => {
                                assert!(per_token.iter().all(|&v| v <= r.k), "{name}: > k experts");
                            }
                            _ => assert!(
                                sp.slot_token.iter().all(|t| t.is_some()),
                                "{name}: an Expert Choice slot is empty"
                            ),
                        }
                        // Each token is in each expert's buffer at most once.
                        for j in 0..e {
                            let mut seen = vec![false; n];
                            for t in sp.slot_token[j * c..(j + 1) * c].iter().flatten() {
                                assert!(!seen[*t as usize], "{name}: token twice in expert {j}");
                                seen[*t as usize] = true;
                            }
                        }
                    }
                    Assignment::Soft(s) => {
                        let slots = e * c;
                        for row in s.combine.chunks_exact(slots) {
                            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
                        }
                        for col in 0..slots {
                            let sum: f32 = (0..n).map(|i| s.dispatch[i * slots + col]).sum();
                            assert!((sum - 1.0).abs() < 1e-4, "{name}: slot {col} sums to {sum}");
                        }
                    }
                }
            }
        }
    }
}
