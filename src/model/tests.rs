//! Model tests on small seeded random checkpoints made here.

use std::collections::HashMap;
use std::path::Path;

use super::*;
use crate::routing::{CapacitySpec, RouterConfig, RouterKind};
use crate::tensor_io::{F32Tensor, OutTensor, write_f32_safetensors};

pub(crate) fn tiny_config(router: RouterKind) -> ModelConfig {
    let mut r = RouterConfig::new(router);
    if router == RouterKind::SoftMoe {
        r.capacity = CapacitySpec::Slots(2);
    }
    ModelConfig {
        name: "tiny".into(),
        image_size: [8, 12],
        channels: 3,
        patch_size: [4, 4],
        hidden_size: 16,
        num_layers: 3,
        num_heads: 2,
        mlp_dim: 24,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: 5,
        gelu: Default::default(),
        layer_scale: false,
        class_names: (0..5).map(|i| format!("c{i}")).collect(),
        normalization: Normalization {
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
        },
        layer_norm_eps: crate::model::DEFAULT_LAYER_NORM_EPS,
        cls_token: None,
        distillation_token: false,
        register_tokens: 0,
        fc_norm: false,
        moe: Some(MoeConfig {
            layers: vec![1, 2],
            num_experts: 4,
            router: r,
            group_images: 1,
            bfloat16_dispatch: false,
            combine: Default::default(),
            expert_mlp_dim: None,
        }),
    }
}

fn images(cfg: &ModelConfig, count: usize, seed: u32) -> Vec<Vec<f32>> {
    let px = cfg.image_size[0] * cfg.image_size[1] * cfg.channels;
    (0..count)
        .map(|b| {
            (0..px)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761) ^ (seed + b as u32 * 7919)) % 1000) as f32
                        / 500.0
                        - 1.0
                })
                .collect()
        })
        .collect()
}

fn save(path: &Path, cfg: &ModelConfig, w: &ModelWeights) {
    save_checkpoint(path, cfg, w).unwrap();
}

#[test]
fn save_load_round_trip_and_forward_shapes() {
    let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    let w = random_weights(&cfg, 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save(&path, &cfg, &w);
    let (cfg2, w2) = load_checkpoint(&path).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(w2, w);
    let model = VitMoe::load(&path).unwrap();
    let out = model
        .forward(&images(&cfg, 3, 1), &RunOptions::from_config(&cfg))
        .unwrap();
    assert_eq!(out.probs.len(), 3);
    for p in &out.probs {
        assert_eq!(p.len(), 5);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.records[0].block, 1);
    let g = &out.records[1].groups;
    assert_eq!(g.len(), 3, "one group per image by default");
    assert_eq!(g[0].routing.num_tokens, cfg.seq_len());
    assert_eq!(g[0].probs.len(), cfg.seq_len() * 4);
    // Two images per group: the group holds 2·S tokens.
    let out = model
        .forward(
            &images(&cfg, 4, 1),
            &RunOptions {
                group_images: 2,
                ..RunOptions::from_config(&cfg)
            },
        )
        .unwrap();
    assert_eq!(out.records[0].groups.len(), 2);
    assert_eq!(out.records[0].groups[1].first_image, 2);
    assert_eq!(
        out.records[0].groups[0].routing.num_tokens,
        2 * cfg.seq_len()
    );
    let err = model
        .forward(
            &images(&cfg, 3, 1),
            &RunOptions {
                group_images: 2,
                ..RunOptions::from_config(&cfg)
            },
        )
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("3 images cannot be split"),
        "{err}"
    );
}

#[test]
fn params_prefix_is_accepted() {
    let cfg = tiny_config(RouterKind::SoftmaxExpertChoice);
    let w = random_weights(&cfg, 1);
    let prefixed: ModelWeights = w
        .iter()
        .map(|(k, v)| (format!("params/{k}"), v.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save(&path, &cfg, &prefixed);
    let (_, loaded) = load_checkpoint(&path).unwrap();
    assert_eq!(loaded, w);
}

fn load_err(cfg: &ModelConfig, w: &ModelWeights) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save(&path, cfg, w);
    load_checkpoint(&path)
        .expect_err("load should fail")
        .to_string()
}

#[test]
fn every_bad_tensor_is_named() {
    let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    let w = random_weights(&cfg, 3);

    let mut missing = w.clone();
    missing.remove("Encoder/encoderblock_2/Moe/Mlp/Dense_1/bias");
    let e = load_err(&cfg, &missing);
    assert!(
        e.contains(
            "missing tensor `Encoder/encoderblock_2/Moe/Mlp/Dense_1/bias` (expected f32 [4, 16])"
        ),
        "{e}"
    );

    let mut extra = w.clone();
    extra.insert(
        "Encoder/encoderblock_9/Mlp/Dense_0/kernel".into(),
        F32Tensor {
            shape: vec![1],
            data: vec![0.0],
        },
    );
    let e = load_err(&cfg, &extra);
    assert!(
        e.contains("unexpected tensor `Encoder/encoderblock_9/Mlp/Dense_0/kernel`"),
        "{e}"
    );

    let mut shape = w.clone();
    shape.insert(
        "head/kernel".into(),
        F32Tensor {
            shape: vec![16, 6],
            data: vec![0.0; 96],
        },
    );
    let e = load_err(&cfg, &shape);
    assert!(
        e.contains("tensor `head/kernel` has shape [16, 6], expected [16, 5]"),
        "{e}"
    );

    let mut nan = w.clone();
    nan.get_mut("cls").unwrap().data[3] = f32::NAN;
    let e = load_err(&cfg, &nan);
    assert!(
        e.contains("tensor `cls` has a non-finite value (NaN) at index [0, 0, 3]"),
        "{e}"
    );

    // A Softmax TC checkpoint must have its router kernel.
    let mut no_router = w.clone();
    no_router.remove("Encoder/encoderblock_1/Moe/Router/dense/kernel");
    let e = load_err(&cfg, &no_router);
    assert!(
        e.contains("missing tensor `Encoder/encoderblock_1/Moe/Router/dense/kernel`"),
        "{e}"
    );
}

#[test]
fn bad_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    let w = random_weights(&cfg, 3);
    let path = dir.path().join("m.safetensors");
    save(&path, &cfg, &w);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(
        VitMoe::load(&cut)
            .err()
            .unwrap()
            .to_string()
            .contains("not a valid safetensors file")
    );
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"PK\x03\x04 this is a zip").unwrap();
    assert!(
        VitMoe::load(&junk)
            .err()
            .unwrap()
            .to_string()
            .contains("not a valid safetensors file")
    );

    // No configuration in the metadata.
    let bare = dir.path().join("bare.safetensors");
    let t = &w["cls"];
    write_f32_safetensors(
        &bare,
        &[OutTensor {
            name: "cls",
            shape: t.shape.clone(),
            data: &t.data,
        }],
        HashMap::new(),
    )
    .unwrap();
    assert!(
        VitMoe::load(&bare)
            .err()
            .unwrap()
            .to_string()
            .contains("no model configuration")
    );

    // A wrong dtype.
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    let raw: Vec<Vec<u8>> = w
        .values()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let wide = vec![0u8; 16 * 8];
    for ((name, t), bytes) in w.iter().zip(&raw) {
        let view = if name == "embedding/bias" {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![16], &wide).unwrap()
        } else {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), bytes)
                .unwrap()
        };
        tensors.push((name.clone(), view));
    }
    let meta = HashMap::from([(CONFIG_METADATA_KEY.to_string(), cfg.to_json())]);
    let f64_file = dir.path().join("f64.safetensors");
    std::fs::write(
        &f64_file,
        safetensors::serialize(tensors, Some(meta)).unwrap(),
    )
    .unwrap();
    let e = VitMoe::load(&f64_file).err().unwrap().to_string();
    assert!(
        e.contains("tensor `embedding/bias` has dtype F64, expected F32 or F16 or BF16"),
        "{e}"
    );
}

/// Half-precision checkpoints (f16 and bf16) load widened to f32: the weights are the f32 ones
/// rounded to that precision, the file is about half the size, and the model runs. A value
/// beyond f16's range is refused by name, and nothing is written.
#[test]
fn half_precision_checkpoints_load_widened() {
    use crate::tensor_io::Precision;
    let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    let w = random_weights(&cfg, 4);
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("f32.safetensors");
    save_checkpoint(&full, &cfg, &w).unwrap();
    let full_len = std::fs::metadata(&full).unwrap().len();
    for (precision, round) in [
        (
            Precision::F16,
            (|v: f32| half::f16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (Precision::BF16, |v: f32| half::bf16::from_f32(v).to_f32()),
    ] {
        let path = dir.path().join(format!("{precision:?}.safetensors"));
        save_checkpoint_as(&path, &cfg, &w, precision).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(
            len * 10 < full_len * 6,
            "{precision:?}: {len} vs {full_len} bytes"
        );
        let (c, loaded) = load_checkpoint(&path).unwrap();
        assert_eq!(c, cfg);
        for (name, t) in &w {
            let got = &loaded[name];
            assert_eq!(got.shape, t.shape, "{name}");
            for (a, b) in got.data.iter().zip(&t.data) {
                assert_eq!(*a, round(*b), "{precision:?} {name}");
            }
        }
        let model = VitMoe::new(c, loaded).unwrap();
        let out = model
            .forward(&[vec![0.5; 8 * 12 * 3]], &RunOptions::from_config(&cfg))
            .unwrap();
        assert!(out.probs[0].iter().all(|p| p.is_finite()));
    }
    let mut big = w.clone();
    big.get_mut("embedding/bias").unwrap().data[3] = 70_000.0;
    let path = dir.path().join("big.safetensors");
    let e = save_checkpoint_as(&path, &cfg, &big, Precision::F16)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`embedding/bias`") && e.contains("beyond f16"),
        "{e}"
    );
    assert!(!path.exists());
}

#[test]
fn bad_configurations_are_errors() {
    // Sizes beyond the limits are refused before anything is sized from them (no wrap, no
    // gigabytes of tensor specs).
    let mut cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    cfg.image_size = [1 << 62, 1 << 62];
    cfg.patch_size = [1, 1];
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("image side 4611686018427387904 is beyond the limit"),
        "{e}"
    );
    let mut cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    cfg.num_layers = 1_000_000;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("num_layers 1000000 is beyond the limit of 1024"),
        "{e}"
    );
    let mut cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    cfg.patch_size = [3, 4];
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of the patch size")
    );
    let mut cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    cfg.moe.as_mut().unwrap().layers = vec![5];
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("MoE layer 5 is beyond")
    );
    let mut cfg = tiny_config(RouterKind::SoftMoe);
    cfg.moe.as_mut().unwrap().router.capacity = CapacitySpec::Factor(1.0);
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("slots per expert")
    );
    assert!(ModelConfig::from_json("{\"image_size\": 3}").is_err());
}

/// Runs `cfg` with block 1 dense vs. block 1 an MoE whose experts are all that same MLP.
fn dense_vs_identical_experts(router: RouterConfig) {
    let mut dense_cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    dense_cfg.moe = None;
    let dense_w = random_weights(&dense_cfg, 11);
    let mut moe_cfg = tiny_config(router.kind);
    let e = 4;
    moe_cfg.moe = Some(MoeConfig {
        layers: vec![1],
        num_experts: e,
        router: router.clone(),
        group_images: 1,
        bfloat16_dispatch: false,
        combine: Default::default(),
        expert_mlp_dim: None,
    });
    let mut moe_w = dense_w.clone();
    let b = "Encoder/encoderblock_1";
    for (i, leaf) in [
        "Dense_0/kernel",
        "Dense_0/bias",
        "Dense_1/kernel",
        "Dense_1/bias",
    ]
    .iter()
    .enumerate()
    {
        let t = moe_w.remove(&format!("{b}/Mlp/{leaf}")).unwrap();
        let mut shape = vec![e];
        shape.extend(&t.shape);
        let data = t.data.repeat(e);
        let _ = i;
        moe_w.insert(format!("{b}/Moe/Mlp/{leaf}"), F32Tensor { shape, data });
    }
    let router_w = random_weights(&moe_cfg, 5);
    moe_w.insert(
        format!("{b}/Moe/Router/dense/kernel"),
        router_w[&format!("{b}/Moe/Router/dense/kernel")].clone(),
    );
    let imgs = images(&dense_cfg, 2, 3);
    let dense = VitMoe::new(dense_cfg.clone(), dense_w)
        .unwrap()
        .forward(&imgs, &RunOptions::from_config(&dense_cfg))
        .unwrap();
    let moe = VitMoe::new(moe_cfg.clone(), moe_w)
        .unwrap()
        .forward(&imgs, &RunOptions::from_config(&moe_cfg))
        .unwrap();
    assert!(
        moe.records[0].groups[0]
            .routing
            .stats()
            .dropped_tokens
            .is_empty()
    );
    for (a, b) in dense.probs.iter().flatten().zip(moe.probs.iter().flatten()) {
        assert!((a - b).abs() < 1e-5, "{:?} vs {:?}", dense.probs, moe.probs);
    }
}

#[test]
fn identical_experts_with_room_for_every_token_give_the_dense_result() {
    // Token Choice with k = e: every token reaches every expert, gates sum to 1.
    let tc = RouterConfig {
        k: 4,
        capacity: CapacitySpec::Factor(1.0),
        multiple_of: 1,
        ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
    };
    dense_vs_identical_experts(tc);
    // Expert Choice with c = n: every expert takes every token.
    let ec = RouterConfig {
        capacity: CapacitySpec::Factor(4.0),
        multiple_of: 1,
        ..RouterConfig::new(RouterKind::SoftmaxExpertChoice)
    };
    dense_vs_identical_experts(ec);
}

#[test]
fn what_if_rerun_equals_a_full_forward() {
    for (from, to) in [
        (
            RouterKind::SoftmaxTokenChoice,
            RouterKind::SinkhornExpertChoice,
        ),
        (
            RouterKind::SoftmaxExpertChoice,
            RouterKind::SparseTokenChoice,
        ),
        (RouterKind::SinkhornTokenChoice, RouterKind::SoftMoe),
    ] {
        let cfg = tiny_config(from);
        let model = VitMoe::new(cfg.clone(), random_weights(&cfg, 21)).unwrap();
        let imgs = images(&cfg, 4, 9);
        let base = model
            .forward(&imgs, &RunOptions::from_config(&cfg))
            .unwrap();
        let mut router = RouterConfig::new(to);
        if to == RouterKind::SoftMoe {
            router.capacity = CapacitySpec::Slots(1);
        }
        let opts = RunOptions::from_config(&cfg).with_router(router);
        let full = model.forward(&imgs, &opts).unwrap();
        let what_if = model.rerun(&base, &opts).unwrap();
        assert_eq!(what_if.probs, full.probs, "{from:?} -> {to:?}");
        assert_eq!(what_if.records, full.records);
        // Only the last MoE layer changes: the first layer's record is reused.
        let mut last_only = RunOptions::from_config(&cfg);
        last_only.routers[1] = RouterConfig {
            capacity: CapacitySpec::Factor(0.5),
            ..last_only.routers[1].clone()
        };
        let full = model.forward(&imgs, &last_only).unwrap();
        let what_if = model.rerun(&base, &last_only).unwrap();
        assert_eq!(what_if.probs, full.probs);
        assert_eq!(what_if.records[0], base.records[0]);
        // Group size changes rerun everything.
        let grouped = RunOptions {
            group_images: 4,
            ..RunOptions::from_config(&cfg)
        };
        assert_eq!(
            model.rerun(&base, &grouped).unwrap().probs,
            model.forward(&imgs, &grouped).unwrap().probs
        );
    }
}

#[test]
fn soft_moe_needs_its_own_parameters() {
    let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    let mut w = random_weights(&cfg, 2);
    for b in [1, 2] {
        w.remove(&format!("Encoder/encoderblock_{b}/Moe/Router/mu"));
        w.remove(&format!("Encoder/encoderblock_{b}/Moe/Router/scale"));
    }
    let model = VitMoe::new(cfg.clone(), w).unwrap();
    let mut soft = RouterConfig::new(RouterKind::SoftMoe);
    soft.capacity = CapacitySpec::Slots(1);
    let e = model
        .forward(
            &images(&cfg, 1, 1),
            &RunOptions::from_config(&cfg).with_router(soft),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Soft MoE needs `Encoder/encoderblock_1/Moe/Router/mu`"),
        "{e}"
    );
    assert!(e.contains("cannot be derived"), "{e}");
    // Any other sparse router runs on the same kernel.
    let ec = RunOptions::from_config(&cfg)
        .with_router(RouterConfig::new(RouterKind::SparseExpertChoice));
    assert!(model.forward(&images(&cfg, 1, 1), &ec).is_ok());
}

#[test]
fn gap_classifier_and_pre_logits() {
    let mut cfg = tiny_config(RouterKind::SoftMoe);
    cfg.classifier = Classifier::Gap;
    cfg.representation_size = Some(8);
    cfg.moe.as_mut().unwrap().bfloat16_dispatch = true;
    let model = VitMoe::new(cfg.clone(), random_weights(&cfg, 4)).unwrap();
    let out = model
        .forward(&images(&cfg, 2, 5), &RunOptions::from_config(&cfg))
        .unwrap();
    assert_eq!(
        out.records[0].groups[0].routing.num_tokens,
        cfg.num_patches()
    );
    let soft = out.records[0].groups[0].routing.soft().unwrap();
    assert_eq!(soft.dispatch.len(), cfg.num_patches() * 4 * 2);
    assert!(out.probs.iter().flatten().all(|p| p.is_finite()));
}

/// An overlay holds some tensors and takes the rest from its base, checked by SHA-256.
#[test]
fn overlays_load_over_their_checked_base() {
    use crate::tensor_io::Precision;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    let w = random_weights(&cfg, 3);
    let base = dir.path().join("base.safetensors");
    save_checkpoint_as(&base, &cfg, &w, Precision::F16).unwrap();
    let (_, widened) = load_checkpoint(&base).unwrap();
    let moe = |n: &str| n.contains("/Moe/");
    // New MoE layers over the base's other weights, under another router.
    let mut trained = widened.clone();
    for (name, t) in trained.iter_mut().filter(|(n, _)| moe(n)) {
        t.data
            .iter_mut()
            .for_each(|v| *v = (*v * 0.5 + 0.25).clamp(-60000.0, 60000.0));
        assert!(!name.is_empty());
    }
    let mut cfg2 = cfg.clone();
    cfg2.moe.as_mut().unwrap().router = RouterConfig::new(RouterKind::SoftmaxExpertChoice);
    let overlay = dir.path().join("over.safetensors");
    let keep = |n: &str| moe(n);
    save_overlay(
        &overlay,
        &cfg2,
        &trained,
        Precision::F16,
        &base,
        &keep,
        HashMap::new(),
    )
    .unwrap();
    assert!(std::fs::metadata(&overlay).unwrap().len() < std::fs::metadata(&base).unwrap().len());
    let (c, got) = load_checkpoint(&overlay).unwrap();
    assert_eq!(c, cfg2);
    assert_eq!(got.len(), trained.len());
    for (name, t) in &got {
        let want = &trained[name];
        let tol = if moe(name) { 1e-3 } else { 0.0 };
        assert!(
            t.data
                .iter()
                .zip(&want.data)
                .all(|(a, b)| (a - b).abs() <= tol * (1.0 + b.abs())),
            "{name}"
        );
    }

    // A frozen tensor that differs from the base cannot be left to it.
    let mut off = trained.clone();
    off.get_mut("cls").unwrap().data[0] += 1.0;
    let e = save_overlay(
        &overlay.with_extension("x"),
        &cfg2,
        &off,
        Precision::F16,
        &base,
        &keep,
        HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`cls` differs from the base"), "{e}");
    // Not beside its base.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let e = save_overlay(
        &sub.join("o.safetensors"),
        &cfg2,
        &trained,
        Precision::F16,
        &base,
        &keep,
        HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("must sit beside its base"), "{e}");

    // A changed base is refused, naming both files.
    let bytes = std::fs::read(&base).unwrap();
    let mut changed = bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    std::fs::write(&base, &changed).unwrap();
    let e = load_checkpoint(&overlay).unwrap_err().to_string();
    assert!(
        e.contains("over.safetensors") && e.contains("base.safetensors") && e.contains("SHA-256"),
        "{e}"
    );
    // A missing base.
    std::fs::remove_file(&base).unwrap();
    let e = load_checkpoint(&overlay).unwrap_err().to_string();
    assert!(e.contains("needs its base model"), "{e}");
    std::fs::write(&base, &bytes).unwrap();
    assert!(load_checkpoint(&overlay).is_ok());

    // A base named by a path, and an overlay over an overlay.
    let hostile = |base_json: &str, name: &str| {
        let p = dir.path().join(name);
        let mut meta = HashMap::new();
        meta.insert(BASE_METADATA_KEY.to_string(), base_json.to_string());
        let kept: ModelWeights = trained
            .iter()
            .filter(|(n, _)| moe(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        save_checkpoint_with(&p, &cfg2, &kept, Precision::F32, meta).unwrap();
        load_checkpoint(&p).unwrap_err().to_string()
    };
    let e = hostile(
        r#"{"file": "../base.safetensors", "sha256": "00"}"#,
        "a.safetensors",
    );
    assert!(e.contains("not a plain file name"), "{e}");
    let e = hostile("not json", "b.safetensors");
    assert!(e.contains("bad `routerscope.base` metadata"), "{e}");
    let sha = crate::tensor_io::file_sha256(&overlay).unwrap();
    let e = hostile(
        &format!(r#"{{"file": "over.safetensors", "sha256": "{sha}"}}"#),
        "c.safetensors",
    );
    assert!(e.contains("is itself an overlay"), "{e}");

    // A base that is a FIFO (its open would block), /dev/zero (hashed forever) or a folder:
    // refused at once, naming the overlay and the base.
    #[cfg(unix)]
    {
        let sha = crate::tensor_io::file_sha256(&base).unwrap();
        let over_named = |file: &str, name: &str| {
            hostile(&format!(r#"{{"file": "{file}", "sha256": "{sha}"}}"#), name)
        };
        let fifo = dir.path().join("fifo.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a fresh path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = over_named("fifo.safetensors", "d.safetensors");
        assert!(e.contains("d.safetensors") && e.contains("a FIFO"), "{e}");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.safetensors")).unwrap();
        let e = over_named("zero.safetensors", "e.safetensors");
        assert!(
            e.contains("zero.safetensors") && e.contains("a device"),
            "{e}"
        );
        std::fs::create_dir(dir.path().join("dir.safetensors")).unwrap();
        let e = over_named("dir.safetensors", "f.safetensors");
        assert!(e.contains("a directory"), "{e}");
    }
}
