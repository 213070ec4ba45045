//! End-to-end runs of `routerscope import`, `moefy` and `features`: outputs, determinism, and
//! one-line errors (never a partial output file) for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use routerscope::model::load_checkpoint;
use routerscope::tensor_io::TensorFile;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn routerscope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_routerscope"))
        .args(args)
        .output()
        .expect("run routerscope")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs and expects exit status 1 with one stderr line containing `needle`.
fn fails(args: &[&str], needle: &str) {
    let out = routerscope(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("routerscope: "))
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(lines[0].contains(needle), "{args:?}: {err}");
}

fn dense_fashion() -> PathBuf {
    root().join("assets/models/fashion-mnist-dense.safetensors")
}

/// A calibration folder with two Fashion-MNIST images (one in a subfolder) and one broken file.
fn calibration(dir: &Path) -> PathBuf {
    let cal = dir.join("cal");
    std::fs::create_dir_all(cal.join("sub")).unwrap();
    let imgs = root().join("assets/images");
    std::fs::copy(
        imgs.join("fmnist-00-ankle-boot-test0.png"),
        cal.join("a.png"),
    )
    .unwrap();
    std::fs::copy(
        imgs.join("fmnist-07-dress-test13.png"),
        cal.join("sub/b.png"),
    )
    .unwrap();
    std::fs::write(cal.join("broken.png"), b"\x89PNG not really").unwrap();
    cal
}

#[test]
fn moefy_makes_a_deterministic_moe_checkpoint_and_skips_broken_photos() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let run = |out: &Path| {
        routerscope(&[
            "moefy",
            "--model",
            s(&dense_fashion()),
            "--experts",
            "4",
            "--layers",
            "3,5",
            "--calibration",
            s(&cal),
            "--crops",
            "3",
            "--seed",
            "1",
            "--precision",
            "f16",
            "--out",
            s(out),
        ])
    };
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let out = run(&a);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("skipped") && err.contains("broken.png"),
        "{err}"
    );
    assert!(err.contains("6 crops of 2 photos (1 skipped)"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("block 3: activation mass") && text.contains("block 5"),
        "{text}"
    );
    assert!(run(&b).status.success());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let (cfg, w) = load_checkpoint(&a).unwrap();
    let moe = cfg.moe.unwrap();
    assert_eq!(
        (moe.layers, moe.num_experts, moe.expert_mlp_dim),
        (vec![3, 5], 4, Some(64))
    );
    assert!(w.contains_key("Encoder/encoderblock_3/Moe/bias"));
}

#[test]
fn moefy_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let out = dir.path().join("out.safetensors");
    let base = |experts: &str, layers: &str, model: &Path, cal: &Path| {
        vec![
            "moefy".to_string(),
            "--model".into(),
            s(model).into(),
            "--experts".into(),
            experts.into(),
            "--layers".into(),
            layers.into(),
            "--calibration".into(),
            s(cal).into(),
            "--out".into(),
            s(&out).into(),
        ]
    };
    let run = |v: Vec<String>, needle: &str| {
        let args: Vec<&str> = v.iter().map(String::as_str).collect();
        fails(&args, needle);
    };
    run(
        base("3", "3", &dense_fashion(), &cal),
        "3 experts do not split the 256 hidden units",
    );
    run(
        base("4", "9", &dense_fashion(), &cal),
        "layer 9 is beyond the model's 6 blocks",
    );
    let moe = root().join("assets/models/fashion-mnist-softmax-tc.safetensors");
    run(base("4", "3", &moe, &cal), "already has MoE layers");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    run(
        base("4", "3", &dense_fashion(), &empty),
        "no images in this folder",
    );
    run(
        base("4", "3", &dense_fashion(), &dir.path().join("nowhere")),
        "nowhere",
    );
    let only_broken = dir.path().join("broken");
    std::fs::create_dir(&only_broken).unwrap();
    std::fs::write(only_broken.join("x.jpg"), b"nope").unwrap();
    run(
        base("4", "3", &dense_fashion(), &only_broken),
        "no calibration images",
    );
    assert!(!out.exists());
}

#[test]
fn import_errors_name_the_problem_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let png = root().join("assets/images/photo-camera.png");
    fails(
        &["import", "--onnx", s(&png), "--out", s(&out)],
        "not an ONNX model",
    );
    fails(
        &[
            "import",
            "--onnx",
            s(&dir.path().join("no.onnx")),
            "--out",
            s(&out),
        ],
        "no.onnx",
    );
    fails(
        &["import", "--onnx", s(dir.path()), "--out", s(&out)],
        "is not a regular file",
    );
    let out2 = routerscope(&[
        "import",
        "--onnx",
        s(&png),
        "--precision",
        "f8",
        "--out",
        s(&out),
    ]);
    assert_eq!(out2.status.code(), Some(2));
    assert!(!out.exists());
}

#[test]
fn features_are_written_for_any_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.safetensors");
    let img = root().join("assets/images/fmnist-00-ankle-boot-test0.png");
    let photo = root().join("assets/images/photo-chelsea.png");
    let fashion = root().join("assets/models/fashion-mnist-softmax-ec.safetensors");
    let r = routerscope(&[
        "features",
        "--model",
        s(&fashion),
        "--device",
        "cpu",
        "--out",
        s(&out),
        s(&img),
        s(&img),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let t = TensorFile::open(&out).unwrap().f32("features", "").unwrap();
    assert_eq!(t.shape, [2, 50, 64]);
    let photo_model = root().join("assets/models/dinov2-s14-moe.safetensors");
    let r = routerscope(&[
        "features",
        "--model",
        s(&photo_model),
        "--k",
        "4",
        "--device",
        "cpu",
        "--out",
        s(&out),
        s(&photo),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let t = TensorFile::open(&out).unwrap().f32("features", "").unwrap();
    assert_eq!(t.shape, [1, 257, 384]);
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"xx").unwrap();
    let out2 = dir.path().join("g.safetensors");
    fails(
        &[
            "features",
            "--model",
            s(&fashion),
            "--device",
            "cpu",
            "--out",
            s(&out2),
            s(&bad),
        ],
        "bad.png",
    );
    assert!(!out2.exists());
}

/// Regressions of the hostile-input corpus: a directory or a device as the model says so, an
/// export width that would need a 33 GB raster is a usage error.
#[test]
fn non_files_and_huge_widths_are_refused() {
    let img = root().join("assets/images/fmnist-00-ankle-boot-test0.png");
    let dir = tempfile::tempdir().unwrap();
    fails(
        &[
            "predict",
            "--model",
            s(dir.path()),
            "--device",
            "cpu",
            s(&img),
        ],
        "is not a regular file (it is a directory)",
    );
    fails(
        &[
            "predict",
            "--model",
            "/dev/null",
            "--device",
            "cpu",
            s(&img),
        ],
        "/dev/null: is not a regular file",
    );
    let model = root().join("assets/models/fashion-mnist-softmax-tc.safetensors");
    let out = dir.path().join("out");
    let r = routerscope(&[
        "export",
        "--model",
        s(&model),
        "--width",
        "100000",
        "--out",
        s(&out),
        s(&img),
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("100000"));
    assert!(!out.exists());
}

/// A moefied Fashion-MNIST model (blocks 3 and 5, 4 experts) beside the calibration folder.
fn moefied_fashion(dir: &Path, cal: &Path) -> PathBuf {
    let out = dir.join("moe.safetensors");
    let run = routerscope(&[
        "moefy",
        "--model",
        s(&dense_fashion()),
        "--experts",
        "4",
        "--layers",
        "3,5",
        "--calibration",
        s(cal),
        "--crops",
        "2",
        "--router",
        "softmax-tc",
        "--k",
        "2",
        "--capacity-factor",
        "1.25",
        "--precision",
        "f16",
        "--out",
        s(&out),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

fn distill_args<'a>(
    dense: &'a Path,
    moe: &'a Path,
    cal: &'a Path,
    router: &'a str,
    out: &'a Path,
) -> Vec<&'a str> {
    vec![
        "distill",
        "--dense",
        s(dense),
        "--moe",
        s(moe),
        "--data",
        s(cal),
        "--router",
        router,
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--crops",
        "8",
        "--lr",
        "1e-3",
        "--precision",
        "f16",
        "--out",
        s(out),
    ]
}

/// `distill` trains only the MoE layers (every other tensor bit-identical), the same seed gives
/// the same file, `--overlay` stores only the MoE layers over the moefied base and loads to the
/// same model, and `--holdout` reports before and after.
#[test]
fn distill_trains_the_moe_layers_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let moe = moefied_fashion(dir.path(), &cal);
    let dense = dense_fashion();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    for (out, router) in [(&a, "softmax-ec"), (&b, "softmax-ec")] {
        let mut args = distill_args(&dense, &moe, &cal, router, out);
        args.extend(["--holdout", s(&cal)]);
        let run = routerscope(&args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{err}");
        assert!(err.contains("held out, before: patch cosine"), "{err}");
        let text = String::from_utf8_lossy(&run.stdout);
        assert!(text.contains("held out, after: patch cosine"), "{text}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let (cfg, w) = load_checkpoint(&a).unwrap();
    let (_, base) = load_checkpoint(&moe).unwrap();
    let m = cfg.moe.as_ref().unwrap();
    assert_eq!(m.router.kind.cli_name(), "softmax-ec");
    let mut trained = 0;
    for (name, t) in &w {
        if name.contains("/Moe/") {
            trained += usize::from(t.data != base[name].data);
        } else {
            assert_eq!(t.data, base[name].data, "{name} changed");
        }
    }
    assert!(trained > 0);
    let meta = TensorFile::open(&a).unwrap().metadata().unwrap();
    assert!(meta["routerscope.distill"].contains("\"steps_done\":6"));

    let over = dir.path().join("over.safetensors");
    let mut args = distill_args(&dense, &moe, &cal, "softmax-ec", &over);
    args.push("--overlay");
    assert!(routerscope(&args).status.success());
    assert!(std::fs::metadata(&over).unwrap().len() < std::fs::metadata(&a).unwrap().len() / 2);
    let (cfg2, w2) = load_checkpoint(&over).unwrap();
    assert_eq!(cfg2, cfg);
    assert!(w.iter().all(|(n, t)| w2[n].data == t.data));
    // The overlay runs on its own through the command line.
    let img = root().join("assets/images/fmnist-00-ankle-boot-test0.png");
    let run = routerscope(&["predict", "--model", s(&over), s(&img)]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn distill_errors_name_the_problem_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let moe = moefied_fashion(dir.path(), &cal);
    let dense = dense_fashion();
    let out = dir.path().join("out.safetensors");
    let with = |replace: &[(&str, &str)]| -> Vec<String> {
        let mut args: Vec<String> = distill_args(&dense, &moe, &cal, "softmax-tc", &out)
            .into_iter()
            .map(String::from)
            .collect();
        for (flag, value) in replace {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1] = value.to_string();
        }
        args
    };
    let check = |args: Vec<String>, needle: &str| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&refs, needle);
        assert!(!out.exists(), "{needle}: an output was written");
    };
    // A dense model the MoE was not made from (another architecture; other weights).
    let other = dir.path().join("other.safetensors");
    let cfg = routerscope::model::preset(
        "fashion-mnist",
        routerscope::routing::RouterKind::SoftmaxTokenChoice,
    )
    .unwrap();
    let mut dense_cfg = cfg.clone();
    dense_cfg.moe = None;
    routerscope::model::save_checkpoint(
        &other,
        &dense_cfg,
        &routerscope::model::random_weights(&dense_cfg, 4),
    )
    .unwrap();
    check(
        with(&[("--dense", s(&other))]),
        "not made from this dense model",
    );
    check(with(&[("--dense", s(&moe))]), "has MoE layers");
    // Routers the MoE cannot take.
    check(with(&[("--router", "soft")]), "sparse routers only");
    // Empty, missing and unreadable data folders.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    check(with(&[("--data", s(&empty))]), "no readable photos");
    check(
        with(&[("--data", s(&dir.path().join("missing")))]),
        "missing",
    );
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("a.png"), b"nope").unwrap();
    check(
        with(&[("--data", s(&junk))]),
        "no readable photos (1 unreadable)",
    );
    check(with(&[("--steps", "0")]), "--steps must be at least 1");
    let mut args = with(&[]);
    args.push("--capacity-factor=-1".into());
    check(args, "positive");
    let mut args = with(&[("--router", "softmax-ec")]);
    args.extend(["--k".into(), "2".into()]);
    check(args, "does not apply");
}

/// Ctrl-C finishes the step in progress, writes the checkpoint (complete, loadable, saying how
/// many steps it holds) and exits with 130.
#[test]
fn distill_interrupted_keeps_a_complete_checkpoint() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let moe = moefied_fashion(dir.path(), &cal);
    let dense = dense_fashion();
    let out = dir.path().join("out.safetensors");
    let mut args = distill_args(&dense, &moe, &cal, "sinkhorn-tc", &out);
    let i = args.iter().position(|a| *a == "--steps").unwrap();
    args[i + 1] = "1000000";
    args.extend(["--save-every", "0"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_routerscope"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("step 1/") {
            break;
        }
    }
    assert!(seen.contains("step 1/"), "{seen}");
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let rest = rest.join("\n");
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("stopped after step"), "{rest}");
    let (cfg, _) = load_checkpoint(&out).unwrap();
    assert_eq!(cfg.moe.unwrap().router.kind.cli_name(), "sinkhorn-tc");
    let meta = TensorFile::open(&out).unwrap().metadata().unwrap();
    assert!(
        meta["routerscope.distill"].contains("\"steps_done\":"),
        "{meta:?}"
    );
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "left behind: {name}");
    }
}

/// Whether this machine has a GPU adapter (with `ROUTERSCOPE_REQUIRE_GPU=1`, CI, it must).
fn has_gpu() -> bool {
    match routerscope::gpu::GpuContext::headless() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("ROUTERSCOPE_REQUIRE_GPU").as_deref() != Ok("1"),
                "ROUTERSCOPE_REQUIRE_GPU=1 but no GPU device: {e}"
            );
            eprintln!("no GPU adapter, skipped: {e}");
            false
        }
    }
}

/// `features` and `analyze` run the (distilled) photo model on the GPU with `--device gpu`: no
/// fallback notice, features within 1e-3 of the CPU run, and the same routing statistics.
#[test]
fn features_and_analyze_run_the_photo_model_on_the_gpu() {
    if !has_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("assets/models/dinov2-s14-softmax-tc.safetensors");
    let photos =
        ["photo-chelsea.png", "photo-coffee.png"].map(|p| root().join("assets/images").join(p));
    let mut features = Vec::new();
    for device in ["gpu", "cpu"] {
        let out = dir.path().join(format!("{device}.safetensors"));
        let r = routerscope(&[
            "features",
            "--model",
            s(&model),
            "--device",
            device,
            "--out",
            s(&out),
            s(&photos[0]),
            s(&photos[1]),
        ]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "{err}");
        if device == "gpu" {
            assert!(err.contains("device: GPU: "), "{err}");
            assert!(!err.contains("CPU"), "a fallback notice: {err}");
        }
        features.push(TensorFile::open(&out).unwrap().f32("features", "").unwrap());
    }
    assert_eq!(features[0].shape, [2, 257, 384]);
    let diff = features[0]
        .data
        .iter()
        .zip(&features[1].data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-3, "GPU vs CPU features: max |diff| {diff}");

    let data = dir.path().join("photos");
    std::fs::create_dir_all(&data).unwrap();
    for p in &photos {
        std::fs::copy(p, data.join(p.file_name().unwrap())).unwrap();
    }
    let mut stats = Vec::new();
    for device in ["gpu", "cpu"] {
        let out = dir.path().join(format!("analysis-{device}"));
        let r = routerscope(&[
            "analyze",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--device",
            device,
            "--out",
            s(&out),
        ]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "{err}");
        if device == "gpu" {
            assert!(err.contains("device: GPU: "), "{err}");
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("analysis.json")).unwrap()).unwrap();
        let layers = &json["runs"][0]["layers"];
        assert_eq!(layers.as_array().unwrap().len(), 2);
        stats.push(
            layers
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        l["tokens_per_position_expert"].clone(),
                        l["dropped_per_position"].clone(),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        stats[0], stats[1],
        "the GPU routes the photos as the CPU does"
    );
}
