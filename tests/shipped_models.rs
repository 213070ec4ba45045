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

/// Every distilled photo model loads over its base (SHA-256 checked), keeps the base's weights
/// outside its MoE layers, declares its own router, and on the held-out gallery photos (256 px
/// copies of photos it never trained on) stays close to the dense model: its base's all-experts
/// run.
#[test]
fn distilled_photo_models_load_over_their_base_and_are_faithful() {
    use routerscope::catalog::{PHOTO_ROUTERS, photo_model, photo_model_for};
    use routerscope::moefy::all_experts_options;
    use routerscope::train::distill::fidelity;
    let (base_cfg, base_w) = load_checkpoint(&photo_model()).unwrap();
    let base = VitMoe::new(base_cfg.clone(), base_w.clone()).unwrap();
    let held_out = [
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "camera.png",
        "horse.png",
        "flower.jpg",
    ];
    let images: Vec<Vec<f32>> = held_out
        .iter()
        .map(|f| {
            let p = common::root()
                .join("assets/images")
                .join(format!("photo-{f}"));
            routerscope::model::load_image(&p, &base_cfg).unwrap()
        })
        .collect();
    // The dense reference: the moefied base with every expert chosen.
    let dense_out = base
        .forward(&images, &all_experts_options(&base_cfg))
        .unwrap();
    for kind in PHOTO_ROUTERS {
        let path = photo_model_for(kind).unwrap_or_else(|| panic!("no photo model for {kind:?}"));
        let (cfg, w) = load_checkpoint(&path).unwrap();
        let m = cfg.moe.as_ref().unwrap();
        assert_eq!(m.router.kind, kind);
        assert_eq!(cfg.name, format!("dinov2-s14-{}", kind.cli_name()));
        for (name, t) in &w {
            if !name.contains("/Moe/") {
                assert_eq!(
                    t.data, base_w[name].data,
                    "{kind:?}: `{name}` differs from the base"
                );
            }
        }
        let model = VitMoe::new(cfg.clone(), w).unwrap();
        let out = model
            .forward(&images, &routerscope::model::RunOptions::from_config(&cfg))
            .unwrap();
        let d = cfg.hidden_size;
        let cos = routerscope::moefy::mean_patch_cosine(&out.features, &dense_out.features, d, 1);
        assert!(cos >= 0.9, "{kind:?}: mean patch cosine {cos:.4}");
        let f = fidelity(
            &base_dense_stand_in(&base_cfg, &base_w),
            &model,
            &m.router,
            &images,
        )
        .unwrap();
        assert!(
            (f.patch_cosine - cos).abs() < 1e-4,
            "{} vs {cos}",
            f.patch_cosine
        );
        assert!(
            f.usage_entropy >= 0.9,
            "{kind:?}: usage entropy {:.3}",
            f.usage_entropy
        );
        if m.router.kind.family() == RouterFamily::TokenChoice {
            assert!(
                f.dropped <= 0.08,
                "{kind:?}: {:.1}% dropped",
                100.0 * f.dropped
            );
        }
    }
}

/// The base as a dense model: its MoE layers folded back into the dense MLPs they came from
/// (the experts' hidden units side by side, the shared bias as the output bias).
fn base_dense_stand_in(
    cfg: &routerscope::model::ModelConfig,
    w: &routerscope::model::ModelWeights,
) -> VitMoe {
    use routerscope::tensor_io::F32Tensor;
    let moe = cfg.moe.as_ref().unwrap();
    let (d, e) = (cfg.hidden_size, moe.num_experts);
    let h = moe.expert_hidden(cfg.mlp_dim);
    let mut dense_cfg = cfg.clone();
    dense_cfg.moe = None;
    let mut dw = w.clone();
    dw.retain(|n, _| !n.contains("/Moe/"));
    for &b in &moe.layers {
        let p = format!("Encoder/encoderblock_{b}");
        let k0 = &w[&format!("{p}/Moe/Mlp/Dense_0/kernel")].data; // [e, d, h]
        let b0 = &w[&format!("{p}/Moe/Mlp/Dense_0/bias")].data; // [e, h]
        let k1 = &w[&format!("{p}/Moe/Mlp/Dense_1/kernel")].data; // [e, h, d]
        let mut w0 = vec![0.0f32; d * e * h];
        for j in 0..e {
            for i in 0..d {
                for u in 0..h {
                    w0[i * e * h + j * h + u] = k0[(j * d + i) * h + u];
                }
            }
        }
        let t = |shape: Vec<usize>, data: Vec<f32>| F32Tensor { shape, data };
        dw.insert(format!("{p}/Mlp/Dense_0/kernel"), t(vec![d, e * h], w0));
        dw.insert(format!("{p}/Mlp/Dense_0/bias"), t(vec![e * h], b0.clone()));
        dw.insert(
            format!("{p}/Mlp/Dense_1/kernel"),
            t(vec![e * h, d], k1.clone()),
        );
        dw.insert(
            format!("{p}/Mlp/Dense_1/bias"),
            w[&format!("{p}/Moe/bias")].clone(),
        );
    }
    VitMoe::new(dense_cfg, dw).unwrap()
}
