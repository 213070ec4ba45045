//! End-to-end runs of `routerscope predict` on a seeded random checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{DynamicImage, ImageBuffer, Rgb};
use routerscope::model::{
    Classifier, ModelConfig, MoeConfig, Normalization, random_weights, save_checkpoint,
};
use routerscope::routing::{RouterConfig, RouterKind};

fn config() -> ModelConfig {
    ModelConfig {
        name: "tiny".into(),
        image_size: [16, 16],
        channels: 3,
        patch_size: [4, 4],
        hidden_size: 32,
        num_layers: 4,
        num_heads: 4,
        mlp_dim: 64,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: 7,
        gelu: Default::default(),
        layer_scale: false,
        class_names: (0..7).map(|i| format!("class-{i}")).collect(),
        normalization: Normalization {
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
        },
        layer_norm_eps: routerscope::model::DEFAULT_LAYER_NORM_EPS,
        cls_token: None,
        distillation_token: false,
        register_tokens: 0,
        fc_norm: false,
        moe: Some(MoeConfig {
            layers: vec![1, 3],
            num_experts: 4,
            router: RouterConfig::new(RouterKind::SoftmaxTokenChoice),
            group_images: 1,
            bfloat16_dispatch: false,
            combine: Default::default(),
            expert_mlp_dim: None,
        }),
    }
}

fn setup(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let cfg = config();
    let model = dir.join("model.safetensors");
    save_checkpoint(&model, &cfg, &random_weights(&cfg, 42)).unwrap();
    let images = (0..2)
        .map(|i| {
            let p = dir.join(format!("img{i}.png"));
            let img = ImageBuffer::from_fn(40, 30, |x, y| {
                Rgb([(x * 6 + i * 50) as u8, (y * 8) as u8, 100])
            });
            DynamicImage::ImageRgb8(img).save(&p).unwrap();
            p
        })
        .collect();
    (model, images)
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_routerscope"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn predict_prints_top5_and_routing_per_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (model, images) = setup(dir.path());
    let (m, a, b) = (
        model.to_str().unwrap(),
        images[0].to_str().unwrap(),
        images[1].to_str().unwrap(),
    );
    let out = run(&["predict", "--model", m, "--json", a, b]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let imgs = v["images"].as_array().unwrap();
    assert_eq!(imgs.len(), 2);
    for img in imgs {
        let top5 = img["top5"].as_array().unwrap();
        assert_eq!(top5.len(), 5);
        let p: Vec<f64> = top5
            .iter()
            .map(|t| t["probability"].as_f64().unwrap())
            .collect();
        assert!(p.windows(2).all(|w| w[0] >= w[1]));
        let layers = img["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0]["block"], 1);
        assert_eq!(layers[0]["router"], "softmax-tc");
        assert_eq!(layers[0]["tokens"], 17);
        // ceil(17/4) = 5, padded to 8.
        assert_eq!(layers[0]["capacity"], 8);
        let load: u64 = layers[0]["tokens_per_expert"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        let dropped = layers[0]["dropped_tokens"].as_array().unwrap().len() as u64;
        assert_eq!(load + dropped, 17);
    }

    let text = run(&[
        "predict",
        "--model",
        m,
        "--router",
        "softmax-ec",
        "--capacity-factor",
        "2",
        a,
    ]);
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("  1. class-"), "{text}");
    assert!(
        text.contains("block 3 (softmax-ec, group: this image): capacity 12"),
        "{text}"
    );

    let grouped = run(&[
        "predict",
        "--model",
        m,
        "--group-images",
        "2",
        "--json",
        a,
        b,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&grouped.stdout).unwrap();
    assert_eq!(v["images"][1]["layers"][0]["tokens"], 34);
    assert_eq!(v["images"][1]["layers"][0]["group_first_image"], 0);
}

#[test]
fn predict_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (model, images) = setup(dir.path());
    let (m, a) = (model.to_str().unwrap(), images[0].to_str().unwrap());
    // A checkpoint with only the sparse router's kernel.
    let cfg = config();
    let mut w = random_weights(&cfg, 1);
    w.retain(|name, _| !name.contains("Router/mu") && !name.contains("Router/scale"));
    let sparse_only = dir.path().join("sparse.safetensors");
    save_checkpoint(&sparse_only, &cfg, &w).unwrap();
    let bad = dir.path().join("notes.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec!["predict", "--model", m, a, bad.to_str().unwrap()],
            "notes.png",
        ),
        (
            vec!["predict", "--model", a, a],
            "not a valid safetensors file",
        ),
        (
            vec![
                "predict",
                "--model",
                sparse_only.to_str().unwrap(),
                "--router",
                "soft",
                a,
            ],
            "cannot be derived",
        ),
        (
            vec!["predict", "--model", m, "--group-images", "2", a],
            "cannot be split",
        ),
        (vec!["predict", "--model", m, "--k", "9", a], "k = 9"),
        (
            vec![
                "predict",
                "--model",
                m,
                "--router",
                "softmax-ec",
                "--k",
                "2",
                a,
            ],
            "--k does not apply to softmax-ec",
        ),
    ];
    for (args, needle) in cases {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.starts_with("error:") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_routerscope"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn top1(out: &std::process::Output) -> (String, Vec<f64>) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let probs = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["top5"].as_array().unwrap().clone())
        .map(|t| t["probability"].as_f64().unwrap())
        .collect();
    (v["device"].as_str().unwrap().to_string(), probs)
}

/// `--device gpu` runs on the GPU backend (the software Vulkan adapter in CI) and predicts what
/// `--device cpu` predicts; `--device cpu` says so.
#[test]
fn predict_on_gpu_matches_cpu() {
    let require = std::env::var("ROUTERSCOPE_REQUIRE_GPU").as_deref() == Ok("1");
    let dir = tempfile::tempdir().unwrap();
    let (model, images) = setup(dir.path());
    let (m, a, b) = (
        model.to_str().unwrap(),
        images[0].to_str().unwrap(),
        images[1].to_str().unwrap(),
    );
    let (cpu_dev, cpu) = top1(&run(&[
        "predict", "--model", m, "--device", "cpu", "--json", a, b,
    ]));
    assert!(cpu_dev.starts_with("CPU"), "{cpu_dev}");
    let out = run(&["predict", "--model", m, "--device", "gpu", "--json", a, b]);
    let (gpu_dev, gpu) = top1(&out);
    if !gpu_dev.starts_with("GPU") {
        assert!(!require, "no GPU: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    assert_eq!(cpu.len(), gpu.len());
    for (x, y) in cpu.iter().zip(&gpu) {
        assert!((x - y).abs() < 1e-3, "{x} vs {y}");
    }
}

/// Asking for a GPU where there is none (the Vulkan loader pointed at no driver) runs on the CPU
/// and says why on stderr; it does not fail.
#[test]
fn predict_without_an_adapter_falls_back_to_the_cpu_with_a_notice() {
    let dir = tempfile::tempdir().unwrap();
    let (model, images) = setup(dir.path());
    let (m, a) = (model.to_str().unwrap(), images[0].to_str().unwrap());
    let no_gpu = [
        ("WGPU_BACKEND", "vulkan"),
        ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
        ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
    ];
    let out = run_env(
        &["predict", "--model", m, "--device", "gpu", "--json", a],
        &no_gpu,
    );
    let (dev, probs) = top1(&out);
    assert!(dev.starts_with("CPU"), "{dev}");
    assert!(!probs.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("running on the CPU"), "{err}");
}

/// A reader that goes away (`routerscope predict --json … | head -c 0`) is not a crash: the
/// command ends quietly, killed by SIGPIPE (status 141 in a shell) or done (0), with no panic or
/// stack trace, for the JSON and the text output alike.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let (model, images) = setup(dir.path());
    let many: Vec<&str> = (0..40).map(|i| images[i % 2].to_str().unwrap()).collect();
    for json in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_routerscope"));
        cmd.args([
            "predict",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
        ]);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .args(&many)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the model has even loaded: every write then fails.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.code() == Some(0),
            "json {json}: {:?}: {err}",
            out.status
        );
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{err}"
        );
    }
}
