//! End-to-end runs of `routerscope route`: outputs on the spec's worked example, and the one-line
//! errors for every kind of bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use routerscope::tensor_io::{OutTensor, TensorFile, write_f32_safetensors};
use safetensors::tensor::{Dtype, TensorView};

const LOGITS: [f32; 32] = [
    1.2, -0.3, 0.5, 2.0, 0.9, 0.1, -1.0, 0.4, -0.5, 1.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 2.2, 0.7,
    -0.4, 1.1, -1.3, 0.6, 1.8, -0.2, 0.3, 2.4, 0.9, -0.7, 0.8, -0.6, 0.2, 0.5,
];

fn routerscope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_routerscope"))
        .args(args)
        .output()
        .expect("run routerscope")
}

fn write(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) {
    let t: Vec<OutTensor> = tensors
        .iter()
        .map(|(n, s, d)| OutTensor {
            name: n,
            shape: s.clone(),
            data: d,
        })
        .collect();
    write_f32_safetensors(path, &t, HashMap::new()).unwrap();
}

fn logits_file(dir: &Path) -> PathBuf {
    let p = dir.join("logits.safetensors");
    write(&p, &[("logits", vec![8, 4], &LOGITS)]);
    p
}

fn run_ok(args: &[&str]) -> String {
    let out = routerscope(args);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects a failure with a single `error:` line containing `needle`.
fn run_err(args: &[&str], needle: &str) {
    let out = routerscope(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
}

#[test]
fn softmax_tc_writes_dispatch_combine_and_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let input = logits_file(dir.path());
    let output = dir.path().join("out.safetensors");
    let stdout = run_ok(&[
        "route",
        "--router",
        "softmax-tc",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--capacity-multiple-of",
        "1",
    ]);
    assert!(stdout.contains("2 tokens dropped"), "{stdout}");
    let f = TensorFile::open(&output).unwrap();
    assert_eq!(f.metadata().unwrap()["capacity"], "2");
    let d = f.f32("dispatch", "").unwrap();
    let g = f.f32("combine", "").unwrap();
    assert_eq!(d.shape, [8, 4, 2]);
    // Spec §6 vanilla k=1: t0 (3,0) t1 (0,0) t2 (1,0) t3 (0,1) t4 drop t5 (2,0) t6 (1,1) t7 drop.
    let want: [Option<(usize, usize)>; 8] = [
        Some((3, 0)),
        Some((0, 0)),
        Some((1, 0)),
        Some((0, 1)),
        None,
        Some((2, 0)),
        Some((1, 1)),
        None,
    ];
    for (i, w) in want.iter().enumerate() {
        let row = &d.data[i * 8..(i + 1) * 8];
        match w {
            Some((j, s)) => {
                assert_eq!(row[j * 2 + s], 1.0);
                assert_eq!(row.iter().sum::<f32>(), 1.0);
                assert!(g.data[i * 8 + j * 2 + s] > 0.0);
            }
            None => assert_eq!(row.iter().sum::<f32>(), 0.0),
        }
    }
    // Default capacity: ceil(8/4) = 2 padded to 4.
    run_ok(&[
        "route",
        "--router",
        "softmax-tc",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_eq!(
        TensorFile::open(&output).unwrap().metadata().unwrap()["capacity"],
        "4"
    );
}

#[test]
fn every_sparse_router_runs_with_its_options() {
    let dir = tempfile::tempdir().unwrap();
    let input = logits_file(dir.path());
    let output = dir.path().join("out.safetensors");
    let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());
    let runs: [&[&str]; 7] = [
        &[
            "--router",
            "softmax-tc",
            "--k",
            "2",
            "--batch-priority",
            "--capacity-factor",
            "1.5",
        ],
        &[
            "--router",
            "sinkhorn-tc",
            "--iterations",
            "30",
            "--capacity-rounding",
            "round",
        ],
        &["--router", "softmax-ec", "--capacity-multiple-of", "1"],
        &[
            "--router",
            "sinkhorn-ec",
            "--capacity-multiple-of",
            "1",
            "--train-seed",
            "4",
        ],
        &[
            "--router",
            "sparse-ec",
            "--adam-lr",
            "0.05",
            "--capacity-multiple-of",
            "1",
        ],
        &[
            "--router",
            "sparse-tc",
            "--iterations",
            "5",
            "--batch-priority",
        ],
        &[
            "--router",
            "softmax-ec",
            "--capacity-factor",
            "0.5",
            "--capacity-multiple-of",
            "0",
        ],
    ];
    for extra in runs {
        let mut args = vec!["route", "--input", i, "--output", o];
        args.extend_from_slice(extra);
        run_ok(&args);
        let f = TensorFile::open(&output).unwrap();
        let d = f.f32("dispatch", "").unwrap();
        let c: usize = f.metadata().unwrap()["capacity"].parse().unwrap();
        assert_eq!(d.shape, [8, 4, c], "{extra:?}");
    }
}

#[test]
fn soft_moe_from_x_mu_scale() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("soft.safetensors");
    let x = [1.0, 0.0, 2.0, 0.5, -1.0, 0.0, 0.0, 3.0, 1.0, -2.0, 0.5, 0.5];
    let mu = [1.0, -1.0, 0.0, 1.0, 1.0, 0.5];
    write(
        &input,
        &[
            ("x", vec![4, 3], &x),
            ("mu", vec![3, 2, 1], &mu),
            ("scale", vec![], &[1.0]),
        ],
    );
    let output = dir.path().join("out.safetensors");
    let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());
    run_ok(&["route", "--router", "soft", "--input", i, "--output", o]);
    let f = TensorFile::open(&output).unwrap();
    let d = f.f32("dispatch", "").unwrap();
    let c = f.f32("combine", "").unwrap();
    assert_eq!(d.shape, [4, 2, 1]);
    let want_d = [
        0.44436, 0.17026, 0.23608, 0.06961, 0.21520, 0.35608, 0.10437, 0.40405,
    ];
    let want_c = [
        0.72085, 0.27915, 0.77041, 0.22959, 0.37420, 0.62580, 0.20355, 0.79645,
    ];
    for (a, b) in d.data.iter().zip(want_d) {
        assert!((a - b).abs() < 1e-5);
    }
    for (a, b) in c.data.iter().zip(want_c) {
        assert!((a - b).abs() < 1e-5);
    }
    run_ok(&[
        "route",
        "--router",
        "soft",
        "--input",
        i,
        "--output",
        o,
        "--num-slots",
        "1",
    ]);
    run_err(
        &[
            "route",
            "--router",
            "soft",
            "--input",
            i,
            "--output",
            o,
            "--num-slots",
            "2",
        ],
        "mu has 1 slots",
    );
    run_err(
        &[
            "route",
            "--router",
            "soft",
            "--input",
            i,
            "--output",
            o,
            "--capacity-rounding",
            "ceil",
        ],
        "does not apply to soft",
    );
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = logits_file(dir.path());
    let out = dir.path().join("out.safetensors");
    let o = out.to_str().unwrap();
    let route = |input: &Path, extra: &[&str], needle: &str| {
        let mut args = vec![
            "route",
            "--router",
            "softmax-ec",
            "--input",
            input.to_str().unwrap(),
            "--output",
            o,
        ];
        args.extend_from_slice(extra);
        run_err(&args, needle);
    };

    route(
        &dir.path().join("absent.safetensors"),
        &[],
        "absent.safetensors",
    );

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    route(&garbage, &[], "not a valid safetensors file");

    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7]).unwrap();
    route(&truncated, &[], "not a valid safetensors file");

    let missing = dir.path().join("missing.safetensors");
    write(&missing, &[("weights", vec![8, 4], &LOGITS)]);
    route(&missing, &[], "missing tensor `logits` (f32 [n, e])");

    let rank1 = dir.path().join("rank1.safetensors");
    write(&rank1, &[("logits", vec![32], &LOGITS)]);
    route(
        &rank1,
        &[],
        "tensor `logits` has shape [32], expected [n, e]",
    );

    let mut nan = LOGITS;
    nan[9] = f32::NAN;
    let nan_file = dir.path().join("nan.safetensors");
    write(&nan_file, &[("logits", vec![8, 4], &nan)]);
    route(&nan_file, &[], "non-finite value (NaN) at index [2, 1]");

    let f64_file = dir.path().join("f64.safetensors");
    let data: Vec<u8> = LOGITS
        .iter()
        .flat_map(|v| (*v as f64).to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::F64, vec![8, 4], &data).unwrap();
    std::fs::write(
        &f64_file,
        safetensors::serialize([("logits", view)], None).unwrap(),
    )
    .unwrap();
    route(&f64_file, &[], "has dtype F64, expected F32");

    // Expert Choice cannot take more slots than tokens: ceil(8·5/4) = 10 > 8.
    route(&good, &["--capacity-factor", "5"], "exceeds the 8 tokens");
    route(
        &good,
        &["--capacity-factor", "0"],
        "capacity factor must be a positive",
    );
    route(&good, &["--k", "2"], "--k does not apply to softmax-ec");
    run_err(
        &[
            "route",
            "--router",
            "softmax-tc",
            "--k",
            "9",
            "--input",
            good.to_str().unwrap(),
            "--output",
            o,
        ],
        "k = 9 experts per token must be between 1 and the 4 experts",
    );
    run_err(
        &[
            "route",
            "--router",
            "softmax-ec",
            "--input",
            good.to_str().unwrap(),
            "--output",
            dir.path()
                .join("no/such/dir/out.safetensors")
                .to_str()
                .unwrap(),
        ],
        "out.safetensors",
    );
    // Nothing was written by the failed runs.
    assert!(!out.exists());
}

#[test]
fn unknown_router_is_a_usage_error() {
    let out = routerscope(&[
        "route", "--router", "top-2", "--input", "a", "--output", "b",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown router `top-2`"));
}

/// Built without the app, `routerscope` alone says so and how to go on, instead of opening a
/// window; `app` is no subcommand there.
#[cfg(not(feature = "app"))]
#[test]
fn without_the_app_feature_there_is_no_window_to_open() {
    let out = routerscope(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without the desktop app"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = routerscope(&["app"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap rejects an unknown subcommand"
    );
    // The command line itself is all there.
    let help = String::from_utf8_lossy(&routerscope(&["--help"]).stdout).into_owned();
    for sub in ["route", "predict", "export", "convert", "train", "eval"] {
        assert!(help.contains(sub), "{help}");
    }
}

/// Valid but enormous: 300,000 tokens under Expert Choice would need dense [n, e, c] outputs of
/// hundreds of GB. `route` says so before allocating them, and writes nothing.
#[test]
fn outputs_beyond_the_size_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n = 300_000;
    let logits: Vec<f32> = (0..n * 2).map(|i| (i % 7) as f32 * 0.1).collect();
    let input = dir.path().join("big.safetensors");
    write(&input, &[("logits", vec![n, 2], &logits)]);
    let output = dir.path().join("out.safetensors");
    let out = routerscope(&[
        "route",
        "--router",
        "softmax-tc",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("beyond the 2048 MB output limit"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!output.exists());
}
