//! `routerscope import` of pretrained ViTs against their own frameworks: tiny-width timm ViT, DeiT
//! (no QKV bias) and DINOv2 (LayerScale), and Hugging Face ViTForImageClassification (LayerNorm
//! eps 1e-12, named labels) and Dinov2Model, with random weights, their features and logits
//! computed by timm / transformers (`scripts/make_import_references.py`, committed under
//! `tests/fixtures/import/`); the importers' errors on files they cannot read; moefy on an import.

use std::path::{Path, PathBuf};
use std::process::Command;

use routerscope::import::big_vision::{BigVisionOptions, import_big_vision};
use routerscope::import::hf::{HfOptions, import_hf};
use routerscope::import::onnx::{OnnxOptions, import_onnx};
use routerscope::import::timm::{TimmOptions, import_timm};
use routerscope::model::{Classifier, Gelu, ModelConfig, ModelError, ModelWeights};
use routerscope::model::{RunOptions, VitMoe, preprocess};
use routerscope::tensor_io::TensorFile;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(name)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

type Imported = Result<(ModelConfig, ModelWeights), ModelError>;

fn matches_timm(name: &str) -> ModelConfig {
    matches_reference(name, "", |p| import_timm(p, &TimmOptions::default()))
}

fn matches_hf(name: &str) -> ModelConfig {
    matches_reference(name, "", |p| import_hf(p, &HfOptions::default()))
}

/// The options asking for `side`×`side` pixels.
fn sized(side: usize) -> TimmOptions {
    TimmOptions {
        image_size: Some([side, side]),
        ..TimmOptions::default()
    }
}

/// Imports fixture `name`, runs it on the reference input (`{tag}pixels`) and compares with the
/// source framework's outputs (`{tag}features`, `{tag}logits`).
fn matches_reference(name: &str, tag: &str, import: impl Fn(&Path) -> Imported) -> ModelConfig {
    matches_reference_of(name, &fixture(name).join("model.safetensors"), tag, import)
}

/// As [`matches_reference`], importing `checkpoint` (the same weights in another file).
fn matches_reference_of(
    name: &str,
    checkpoint: &Path,
    tag: &str,
    import: impl Fn(&Path) -> Imported,
) -> ModelConfig {
    let dir = fixture(name);
    let (cfg, weights) = import(checkpoint).expect("the checkpoint imports");
    let reference = TensorFile::open(&dir.join("reference.safetensors")).expect("reference");
    let names = reference.names().expect("names");
    let pixels = {
        let st = std::fs::read(dir.join("reference.safetensors")).expect("read");
        let st = safetensors::SafeTensors::deserialize(&st).expect("safetensors");
        let v = st.tensor(&format!("{tag}pixels")).expect("pixels");
        let [h, w, _] = v.shape()[..] else {
            panic!("pixels shape {:?}", v.shape())
        };
        image::DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w as u32, h as u32, v.data().to_vec()).expect("rgb"),
        )
    };
    let model = VitMoe::new(cfg.clone(), weights).expect("a model");
    let out = model
        .forward(
            &[preprocess(&pixels, &cfg).expect("pixels")],
            &RunOptions::from_config(&cfg),
        )
        .expect("forward");
    let features = reference
        .f32(&format!("{tag}features"), "[tokens, d]")
        .expect("features");
    let fd = max_diff(&out.features[0], &features.data);
    assert!(
        fd < 1e-4,
        "{name}: features differ from the reference by {fd}"
    );
    if names.iter().any(|n| *n == format!("{tag}logits")) {
        let logits = reference
            .f32(&format!("{tag}logits"), "[classes]")
            .expect("logits");
        let d = max_diff(&out.probs[0], &softmax(&logits.data));
        assert!(
            d < 1e-5,
            "{name}: class probabilities differ from the reference by {d}"
        );
        assert_eq!(cfg.num_classes, logits.data.len());
    }
    eprintln!(
        "{name}: {} blocks, width {}, {} heads: features within {fd:e} of the reference",
        cfg.num_layers, cfg.hidden_size, cfg.num_heads
    );
    cfg
}

#[test]
fn a_hugging_face_vit_classifier_imports_and_matches_transformers() {
    let cfg = matches_hf("hf-vit");
    assert_eq!(cfg.layer_norm_eps, 1e-12);
    assert_eq!(cfg.class_names, ["cat", "dog", "bird"]);
    assert_eq!(cfg.normalization.mean, [0.5; 3]);
}

#[test]
fn a_hugging_face_dinov2_imports_and_matches_transformers() {
    let cfg = matches_hf("hf-dinov2");
    assert!(cfg.layer_scale && cfg.num_classes == 0);
}

#[test]
fn a_timm_vit_imports_and_matches_timm() {
    matches_timm("timm-vit");
}

#[test]
fn a_timm_deit_without_qkv_bias_imports_and_matches_timm() {
    matches_timm("timm-deit");
}

#[test]
fn a_timm_dinov2_with_layer_scale_imports_and_matches_timm() {
    matches_timm("timm-dinov2");
}

#[test]
fn a_timm_distilled_deit_imports_with_both_heads_and_resizes_like_timm() {
    let cfg = matches_timm("timm-deit-distilled");
    assert!(cfg.distillation_token && cfg.seq_len() == 2 + 36);
    // timm's `set_input_size(40)`: the 6×6 position table resampled bicubically to 10×10.
    let cfg = matches_reference("timm-deit-distilled", "resized_", |p| {
        import_timm(p, &sized(40))
    });
    assert_eq!((cfg.image_size, cfg.seq_len()), ([40, 40], 2 + 100));
}

#[test]
fn a_timm_dinov2_with_registers_imports_and_matches_timm() {
    let cfg = matches_timm("timm-dinov2-reg");
    assert_eq!((cfg.register_tokens, cfg.seq_len()), (4, 1 + 4 + 4));
    assert_eq!(cfg.prefix().name(3).as_deref(), Some("register 2"));
}

#[test]
fn a_timm_vit_with_mean_pooling_and_fc_norm_imports_and_matches_timm() {
    let cfg = matches_timm("timm-vit-avg");
    assert!(cfg.fc_norm && cfg.classifier == routerscope::model::Classifier::Gap);
    assert_eq!(cfg.register_tokens, 2);
}

#[test]
fn a_timm_vit_without_cls_token_imports_and_resizes_like_timm() {
    let cfg = matches_timm("timm-vit-nocls");
    assert_eq!(cfg.seq_len(), 16);
    let cfg = matches_reference("timm-vit-nocls", "resized_", |p| import_timm(p, &sized(48)));
    assert_eq!(cfg.seq_len(), 36);
    let e = import_timm(
        &fixture("timm-vit-nocls").join("model.safetensors"),
        &sized(50),
    )
    .expect_err("50 is not a multiple of the patch size 8")
    .to_string();
    assert!(
        e.contains("--image-size 50x50 is not a positive multiple of the patch size 8x8"),
        "{e}"
    );
}

#[test]
fn a_hugging_face_dinov2_with_registers_imports_and_resizes_like_transformers() {
    let cfg = matches_hf("hf-dinov2-reg");
    assert_eq!((cfg.register_tokens, cfg.seq_len()), (3, 1 + 3 + 4));
    // Its embeddings interpolate the position table to the input (bicubic) on every call.
    let cfg = matches_reference("hf-dinov2-reg", "resized_", |p| import_hf(p, &sized(56)));
    assert_eq!(cfg.seq_len(), 1 + 3 + 16);
}

#[test]
fn a_hugging_face_deit_with_teacher_imports_and_matches_transformers() {
    let cfg = matches_hf("hf-deit");
    assert!(cfg.distillation_token && cfg.num_classes == 4);
    assert_eq!(cfg.normalization.mean, [0.485, 0.456, 0.406]);
}

/// The timm ViT fixture with `change` applied to its tensors, in `dir` (with its config.json
/// unless `config` is false).
fn altered(
    dir: &Path,
    config: bool,
    change: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let names: &[&str] = if config { &["config.json"] } else { &[] };
    rewritten("timm-vit", dir, names, change)
}

/// Fixture `name`'s tensors with `change` applied, written to `dir/model.safetensors` with the
/// fixture's files `configs` beside them (and no others).
fn rewritten(
    name: &str,
    dir: &Path,
    configs: &[&str],
    change: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let src = fixture(name);
    let file = TensorFile::open(&src.join("model.safetensors")).expect("open");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .names()
        .expect("names")
        .into_iter()
        .map(|n| {
            let t = file.f32(&n, "").expect("f32");
            (n, t.shape, t.data)
        })
        .collect();
    change(&mut tensors);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("view");
            (n.clone(), v)
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).expect("write");
    for json in ["config.json", "preprocessor_config.json"] {
        let _ = std::fs::remove_file(dir.join(json));
    }
    for json in configs {
        std::fs::copy(src.join(json), dir.join(json)).expect("config");
    }
    path
}

fn import_error(path: &Path, heads: Option<usize>) -> String {
    let opts = TimmOptions {
        heads,
        ..TimmOptions::default()
    };
    match import_timm(path, &opts) {
        Ok(_) => panic!("{} imported", path.display()),
        Err(e) => e.to_string(),
    }
}

/// PyTorch checkpoints (`torch.save`'s zip format) written by timm and transformers from the
/// safetensors fixtures' weights (`scripts/make_pytorch_references.py`) import as those do.
#[test]
fn pytorch_checkpoints_import_and_match_their_frameworks() {
    let pt = |p: &str| fixture("pt").join(p);
    // timm's save_for_hf(safe_serialization=False): pytorch_model.bin + config.json.
    matches_reference_of("timm-vit", &pt("timm-vit/pytorch_model.bin"), "", |p| {
        import_timm(p, &TimmOptions::default())
    });
    // torch.save(model.state_dict(), "vit.pth") with nothing beside it.
    let e = import_error(&pt("timm-dinov2-reg/vit.pth"), None);
    assert!(e.contains("give --heads"), "{e}");
    matches_reference_of("timm-dinov2-reg", &pt("timm-dinov2-reg/vit.pth"), "", |p| {
        import_timm(
            p,
            &TimmOptions {
                heads: Some(4),
                ..TimmOptions::default()
            },
        )
    });
    // A training checkpoint: the state dict under "model", beside an optimizer's state.
    matches_reference_of(
        "timm-deit-distilled",
        &pt("timm-deit-distilled/checkpoint.pth.tar"),
        "",
        |p| import_timm(p, &TimmOptions::default()),
    );
    // transformers' save_pretrained(safe_serialization=False).
    matches_reference_of("hf-vit", &pt("hf-vit/pytorch_model.bin"), "", |p| {
        import_hf(p, &HfOptions::default())
    });
    matches_reference_of("hf-dinov2", &pt("hf-dinov2/pytorch_model.bin"), "", |p| {
        import_hf(p, &HfOptions::default())
    });
    // Told apart from an .npz (both are zip archives) whatever the name.
    use routerscope::import::Format;
    assert_eq!(
        Format::detect(&pt("hf-vit/pytorch_model.bin")),
        Ok(Format::HuggingFace)
    );
    assert_eq!(
        Format::detect(&pt("timm-deit-distilled/checkpoint.pth.tar")),
        Ok(Format::Timm)
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let renamed = dir.path().join("weights.npz");
    std::fs::copy(pt("timm-vit/pytorch_model.bin"), &renamed).expect("copy");
    assert_eq!(Format::detect(&renamed), Ok(Format::Timm));
}

/// A pickle that holds anything but tensors and plain containers is refused by name without
/// being run; a ResNet is not a ViT; the format before PyTorch 1.6 is named.
#[test]
fn pickles_with_code_or_other_models_are_refused_unrun() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hostile = fixture("pt/hostile");
    let import = |name: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_routerscope"))
            .current_dir(dir.path())
            .arg("import")
            .arg(hostile.join(name))
            .arg("--out")
            .arg(dir.path().join("out.safetensors"))
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(name) && !err.contains("panicked"), "{err}");
        assert!(!dir.path().join("out.safetensors").exists());
        err
    };
    let e = import("custom-class.pth");
    assert!(e.contains("`__main__.Net`") && e.contains("refused"), "{e}");
    let e = import("os-system.pth");
    assert!(
        e.contains("`posix.system`") && e.contains("never run"),
        "{e}"
    );
    assert!(
        !dir.path().join("routerscope-pwned").exists(),
        "the pickled os.system ran"
    );
    let e = import("resnet.pth");
    assert!(e.contains("not a ViT") && e.contains("bn1.bias"), "{e}");
    let e = import("legacy.pth");
    assert!(e.contains("before PyTorch 1.6"), "{e}");
    // Through the importer directly (the same message).
    let e = import_error(&hostile.join("os-system.pth"), None);
    assert!(e.contains("`posix.system`"), "{e}");
}

#[test]
fn bad_timm_state_dicts_are_one_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = altered(dir.path(), true, |t| {
        t.retain(|(n, _, _)| !n.starts_with("blocks.0."))
    });
    let e = import_error(&p, None);
    assert!(
        e.contains("block 1 has weights") && e.contains("missing"),
        "{e}"
    );

    let p = altered(dir.path(), true, |t| {
        t.retain(|(n, _, _)| n != "blocks.1.mlp.fc2.bias")
    });
    let e = import_error(&p, None);
    assert!(e.contains("blocks.1.mlp.fc2.bias"), "{e}");

    let p = altered(dir.path(), true, |_| {});
    let e = import_error(&p, Some(5));
    assert!(e.contains("5 heads do not divide the width 24"), "{e}");

    // Four registers, but positions for the CLS token and the patches only: no timm layout.
    let p = altered(dir.path(), true, |t| {
        t.push(("reg_token".into(), vec![1, 4, 24], vec![0.0; 96]))
    });
    let e = import_error(&p, None);
    assert!(
        e.contains("pos_embed") && e.contains("not 5 prefix tokens"),
        "{e}"
    );

    let p = altered(dir.path(), true, |t| {
        t.push(("reg_token".into(), vec![1, 4, 20], vec![0.0; 80]))
    });
    let e = import_error(&p, None);
    assert!(e.contains("`reg_token` has shape [1, 4, 20]"), "{e}");

    let p = altered(dir.path(), true, |t| {
        t.push(("dist_token".into(), vec![1, 1, 24], vec![0.0; 24]))
    });
    let e = import_error(&p, None);
    assert!(e.contains("pos_embed"), "{e}");

    let sub = dir.path().join("noconfig");
    std::fs::create_dir_all(&sub).expect("dir");
    let p = altered(&sub, false, |_| {});
    let e = import_error(&p, None);
    assert!(e.contains("give --heads"), "{e}");
    import_timm(
        &p,
        &TimmOptions {
            heads: Some(3),
            ..TimmOptions::default()
        },
    )
    .expect("with --heads it imports");

    let p = altered(dir.path(), true, |t| {
        t.retain(|(n, _, _)| n != "patch_embed.proj.weight")
    });
    let e = import_error(&p, None);
    assert!(e.contains("not a timm ViT state dict"), "{e}");
}

#[test]
fn the_cli_imports_a_timm_file_and_predicts_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("vit.safetensors");
    let bin = env!("CARGO_BIN_EXE_routerscope");
    let model = fixture("timm-vit").join("model.safetensors");
    let o = Command::new(bin)
        .args([
            "import",
            model.to_str().unwrap_or_default(),
            "--out",
            out.to_str().unwrap_or_default(),
        ])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 blocks, width 24, 3 heads"));
    let img = dir.path().join("x.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([10, 200, 30]))
        .save(&img)
        .expect("png");
    let o = Command::new(bin)
        .args([
            "predict",
            "--model",
            out.to_str().unwrap_or_default(),
            img.to_str().unwrap_or_default(),
        ])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A file that is no ViT: one error, no output.
    let not = dir.path().join("other.safetensors");
    let o = Command::new(bin)
        .args([
            "import",
            out.to_str().unwrap_or_default(),
            "--out",
            not.to_str().unwrap_or_default(),
        ])
        .output()
        .expect("runs");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a format `routerscope import` reads"));
    assert!(!not.exists());
}

#[test]
fn moefy_on_an_imported_timm_vit_with_every_expert_is_the_dense_model() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (dense_path, moe_path) = (
        dir.path().join("vit.safetensors"),
        dir.path().join("moe.safetensors"),
    );
    let bin = env!("CARGO_BIN_EXE_routerscope");
    let model = fixture("timm-vit").join("model.safetensors");
    let calibration = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/images");
    for args in [
        vec![
            "import",
            model.to_str().unwrap_or_default(),
            "--out",
            dense_path.to_str().unwrap_or_default(),
        ],
        vec![
            "moefy",
            "--model",
            dense_path.to_str().unwrap_or_default(),
            "--experts",
            "4",
            "--layers",
            "0,1",
            "--calibration",
            calibration.to_str().unwrap_or_default(),
            "--out",
            moe_path.to_str().unwrap_or_default(),
        ],
    ] {
        let o = Command::new(bin).args(&args).output().expect("runs");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let dense = VitMoe::load(&dense_path).expect("dense");
    let moe = VitMoe::load(&moe_path).expect("moe");
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])
    }));
    let px = preprocess(&img, &dense.config).expect("pixels");
    let a = dense
        .forward(
            std::slice::from_ref(&px),
            &RunOptions::from_config(&dense.config),
        )
        .expect("dense run");
    let b = moe
        .forward(&[px], &routerscope::moefy::all_experts_options(&moe.config))
        .expect("moe run");
    let d = max_diff(&a.features[0], &b.features[0]);
    assert!(d < 1e-4, "every expert differs from the dense model by {d}");
    assert!(max_diff(&a.probs[0], &b.probs[0]) < 1e-5);
}

/// The Hugging Face ViT fixture with `change` applied to its tensors, in `dir` (with its JSON
/// configs unless `configs` is false).
fn altered_hf(
    dir: &Path,
    configs: bool,
    change: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let names: &[&str] = if configs {
        &["config.json", "preprocessor_config.json"]
    } else {
        &[]
    };
    rewritten("hf-vit", dir, names, change)
}

fn hf_error(path: &Path) -> String {
    match import_hf(path, &HfOptions::default()) {
        Ok(_) => panic!("{} imported", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_hugging_face_checkpoints_are_one_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = altered_hf(dir.path(), true, |t| {
        t.retain(|(n, _, _)| !n.starts_with("vit.encoder.layer.0."))
    });
    let e = hf_error(&p);
    assert!(
        e.contains("layer 1 has weights") && e.contains("missing"),
        "{e}"
    );

    let p = altered_hf(dir.path(), true, |t| {
        t.push((
            "vit.embeddings.register_tokens".into(),
            vec![1, 4, 24],
            vec![0.0; 96],
        ))
    });
    let e = hf_error(&p);
    assert!(
        e.contains("register tokens") && e.contains("Dinov2WithRegisters"),
        "{e}"
    );

    let p = altered_hf(dir.path(), true, |t| {
        for x in t.iter_mut().filter(|x| x.0 == "classifier.weight") {
            x.1 = vec![3, 48];
            x.2 = vec![0.0; 144];
        }
    });
    let e = hf_error(&p);
    assert!(e.contains("CLS token and the mean patch token"), "{e}");

    let p = altered_hf(dir.path(), false, |_| {});
    let e = hf_error(&p);
    assert!(e.contains("give --heads"), "{e}");
    let (cfg, _) = import_hf(
        &p,
        &HfOptions {
            heads: Some(3),
            ..HfOptions::default()
        },
    )
    .expect("with --heads it imports");
    // Without config.json the defaults hold: ViT's LayerNorm eps and 0.5 normalisation.
    assert_eq!((cfg.layer_norm_eps, cfg.normalization.std[0]), (1e-12, 0.5));

    let p = altered_hf(dir.path(), true, |t| {
        t.retain(|(n, _, _)| n != "vit.encoder.layer.1.output.dense.bias")
    });
    let e = hf_error(&p);
    assert!(e.contains("vit.encoder.layer.1.output.dense.bias"), "{e}");
}

/// Imports the ONNX fixture `name` (normalised with `mean_std`) and compares it with PyTorch.
fn matches_onnx(name: &str, mean_std: f32) -> ModelConfig {
    let opts = OnnxOptions {
        mean: (mean_std != 0.0).then(|| vec![mean_std; 3]),
        std: (mean_std != 0.0).then(|| vec![mean_std; 3]),
        ..OnnxOptions::default()
    };
    matches_reference(name, "", |p| {
        import_onnx(&p.with_file_name("model.onnx"), &opts)
    })
}

#[test]
fn a_legacy_onnx_export_of_a_timm_vit_imports_and_matches_pytorch() {
    // Fused QKV, LayerNormalization ops, Erf GELU, a Gemm head.
    let cfg = matches_onnx("onnx-timm-vit-legacy", 0.5);
    assert_eq!(
        (cfg.num_heads, cfg.num_classes, cfg.gelu),
        (3, 5, Gelu::Erf)
    );
}

#[test]
fn a_dynamo_onnx_export_of_a_distilled_deit_with_external_data_matches_pytorch() {
    // No QKV bias, Tanh GELU arithmetic, two heads averaged, weights in model.onnx.data.
    assert!(
        fixture("onnx-timm-deit-dynamo")
            .join("model.onnx.data")
            .is_file()
    );
    let cfg = matches_onnx("onnx-timm-deit-dynamo", 0.0);
    assert!(cfg.distillation_token && cfg.prefix().cls);
    assert_eq!((cfg.num_heads, cfg.gelu), (2, Gelu::Tanh));
}

#[test]
fn a_dynamo_onnx_export_of_dinov2_with_registers_matches_pytorch() {
    // Opset 20: one Gelu op; LayerScale; four registers without positions.
    let cfg = matches_onnx("onnx-timm-dinov2-reg-dynamo", 0.0);
    assert!(cfg.layer_scale && cfg.num_classes == 0);
    assert_eq!(cfg.register_tokens, 4);
}

#[test]
fn a_legacy_onnx_export_of_an_avg_pooled_vit_with_fc_norm_matches_pytorch() {
    let cfg = matches_onnx("onnx-timm-vit-avg-legacy", 0.5);
    assert!(cfg.fc_norm && cfg.classifier == Classifier::Gap);
    assert_eq!(cfg.register_tokens, 2);
}

#[test]
fn an_opset_14_onnx_export_of_a_hugging_face_vit_matches_transformers() {
    // LayerNorm decomposed (ReduceMean, Sub, Pow, Sqrt, Div), separate q/k/v projections whose
    // head reshapes say `-1` heads, eps 1e-12.
    let cfg = matches_onnx("onnx-hf-vit-legacy14", 0.5);
    assert_eq!((cfg.num_heads, cfg.layer_norm_eps), (3, 1e-12));
}

#[test]
fn an_onnx_export_of_hugging_face_dinov2_resizes_its_positions_like_the_graph() {
    // transformers always interpolates DINOv2's position table: a Resize node in the graph.
    let cfg = matches_onnx("onnx-hf-dinov2-legacy", 0.0);
    assert!(cfg.layer_scale);
}

fn onnx_error(path: &Path, opts: &OnnxOptions) -> String {
    match import_onnx(path, opts) {
        Ok(_) => panic!("{} imported", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn onnx_graphs_the_importer_cannot_take_are_one_clear_error() {
    let none = OnnxOptions::default();
    let e = onnx_error(&fixture("onnx-bad-relu").join("model.onnx"), &none);
    assert!(
        e.contains("block 0")
            && e.contains("(Relu)")
            && e.contains("/blocks/blocks.0/mlp/act/Relu"),
        "{e}"
    );
    let e = onnx_error(&fixture("onnx-bad-resnet").join("model.onnx"), &none);
    assert!(e.contains("not a ViT") && e.contains("Conv"), "{e}");
    let vit = fixture("onnx-timm-vit-legacy").join("model.onnx");
    let e = onnx_error(
        &vit,
        &OnnxOptions {
            heads: Some(5),
            ..OnnxOptions::default()
        },
    );
    assert!(e.contains("3 heads") && e.contains("--heads 5"), "{e}");
    let e = onnx_error(
        &vit,
        &OnnxOptions {
            gelu: Some(Gelu::Tanh),
            ..OnnxOptions::default()
        },
    );
    assert!(e.contains("--gelu"), "{e}");

    // External data: missing, then cut short.
    let dir = tempfile::tempdir().expect("temp dir");
    let src = fixture("onnx-timm-deit-dynamo");
    let model = dir.path().join("model.onnx");
    std::fs::copy(src.join("model.onnx"), &model).expect("copy");
    let e = onnx_error(&model, &none);
    assert!(
        e.contains("model.onnx.data") && e.contains("cannot be opened"),
        "{e}"
    );
    let data = std::fs::read(src.join("model.onnx.data")).expect("data");
    std::fs::write(dir.path().join("model.onnx.data"), &data[..data.len() / 2]).expect("write");
    let e = onnx_error(&model, &none);
    assert!(e.contains("past its end"), "{e}");
}

#[test]
fn the_cli_imports_onnx_by_content_and_leaves_no_file_on_a_bad_graph() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_routerscope");
    let out = dir.path().join("deit.safetensors");
    let model = fixture("onnx-timm-deit-dynamo").join("model.onnx");
    let o = Command::new(bin)
        .args(["import", model.to_str().unwrap_or_default(), "--out"])
        .arg(&out)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 blocks, width 24, 2 heads"));
    let (cfg, _) = routerscope::model::load_checkpoint(&out).expect("loads");
    assert!(cfg.distillation_token);

    let bad = dir.path().join("bad.safetensors");
    let relu = fixture("onnx-bad-relu").join("model.onnx");
    let o = Command::new(bin)
        .args([
            "import",
            "--onnx",
            relu.to_str().unwrap_or_default(),
            "--out",
        ])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Relu") && err.lines().count() <= 3, "{err}");
    assert!(!bad.exists());
}

fn matches_flax(name: &str) -> ModelConfig {
    matches_reference(name, "", |p| {
        import_big_vision(&p.with_file_name("model.npz"), &BigVisionOptions::default())
    })
}

#[test]
fn an_original_vit_npz_imports_and_matches_timms_own_loader() {
    // `Transformer/encoderblock_N/MultiHeadDotProductAttention_1`, a CLS token, tanh GELU.
    let cfg = matches_flax("bv-vit");
    assert_eq!(
        (cfg.num_heads, cfg.gelu, cfg.classifier),
        (3, Gelu::Tanh, Classifier::Token)
    );
    assert_eq!(cfg.normalization.mean, [0.5; 3]);
}

#[test]
fn a_scanned_big_vision_npz_with_mean_pooling_matches_timms_own_loader() {
    let cfg = matches_flax("bv-big-vision-gap");
    assert_eq!((cfg.num_heads, cfg.classifier), (2, Classifier::Gap));
    assert!(!cfg.prefix().cls);
}

#[test]
fn bad_flax_checkpoints_are_one_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = std::fs::read(fixture("bv-vit").join("model.npz")).expect("npz");
    let rewrite = |name: &str, keep: &dyn Fn(&str) -> bool| -> PathBuf {
        let mut zin = zip::ZipArchive::new(std::io::Cursor::new(src.clone())).expect("zip");
        let p = dir.path().join(name);
        let mut zout = zip::ZipWriter::new(std::fs::File::create(&p).expect("create"));
        for i in 0..zin.len() {
            let mut f = zin.by_index(i).expect("entry");
            let n = f.name().expect("name").to_string();
            if keep(&n) {
                zout.start_file(n, zip::write::SimpleFileOptions::default())
                    .expect("start");
                std::io::copy(&mut f, &mut zout).expect("copy");
            }
        }
        zout.finish().expect("finish");
        p
    };
    let bad = |p: &Path| match import_big_vision(p, &BigVisionOptions::default()) {
        Ok(_) => panic!("{} imported", p.display()),
        Err(e) => e.to_string(),
    };
    let p = rewrite("noblock0.npz", &|n| {
        !n.starts_with("Transformer/encoderblock_0/")
    });
    let e = bad(&p);
    assert!(
        e.contains("no encoder blocks") || e.contains("block 1 has weights"),
        "{e}"
    );
    let p = rewrite("nofc2.npz", &|n| {
        n != "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias.npy"
    });
    let e = bad(&p);
    assert!(e.contains("encoderblock_1/MlpBlock_3/Dense_1/bias"), "{e}");
    let p = rewrite("nokernel.npz", &|n| n != "embedding/kernel.npy");
    assert!(bad(&p).contains("not a Flax ViT"));
    let cut = dir.path().join("cut.npz");
    std::fs::write(&cut, &src[..src.len() / 2]).expect("write");
    assert!(bad(&cut).contains("not an .npz (zip) archive"));
}
