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
