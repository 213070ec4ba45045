//! End-to-end runs of `routerscope analyze --trace` and `export --trace` on traces written here
//! with the safetensors crate alone (as any language can): counts that equal routing the logged
//! logits directly, what-ifs under every sparse router, and bad traces that fail with one error
//! naming the tensor. The Python package's tests add round trips against the built-in models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use routerscope::routing::{Mode, RouterConfig, RouterKind, route_logits};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

const GRID: [usize; 2] = [4, 4];
const TOKENS: usize = 17; // 4x4 patches and a CLS token
const EXPERTS: usize = 4;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_routerscope"))
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("the routerscope binary runs")
}

/// A deterministic pseudo-random stream (no dependency on a RNG crate's stream).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
}

/// The pieces of a trace: tensors by name (dtype, shape, bytes) and the description.
struct Trace {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: Value,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `images` noise images of one MoE layer (block 2) with only router logits, one group each.
fn logits_trace(images: usize, seed: u64) -> (Trace, Vec<Vec<f32>>) {
    let mut rng = Lcg(seed);
    let mut tensors = Vec::new();
    let mut logits = Vec::new();
    let mut groups = Vec::new();
    for i in 0..images {
        let pixels: Vec<u8> = (0..16 * 16 * 3)
            .map(|_| (rng.next() * 60.0) as u8)
            .collect();
        tensors.push((format!("images/{i}"), Dtype::U8, vec![16, 16, 3], pixels));
        let x: Vec<f32> = (0..TOKENS * EXPERTS).map(|_| rng.next()).collect();
        tensors.push((
            format!("layers/0/groups/{i}/logits"),
            Dtype::F32,
            vec![TOKENS, EXPERTS],
            f32_bytes(&x),
        ));
        logits.push(x);
        groups.push(json!({"members": [[i, 0, TOKENS]]}));
    }
    let meta = json!({
        "format": "routerscope-trace",
        "version": 1,
        "model_name": "hand-made",
        "num_experts": EXPERTS,
        "classes": ["even", "odd"],
        "images": (0..images).map(|i| json!({
            "grid": GRID, "cls_token": true, "name": format!("noise-{i}"), "label": i % 2
        })).collect::<Vec<_>>(),
        "layers": [{"block": 2, "router": {"kind": "softmax-tc", "k": 1}, "groups": groups}],
    });
    (Trace { tensors, meta }, logits)
}

fn write(trace: &Trace, path: &Path) {
    let views: Vec<(String, TensorView<'_>)> = trace
        .tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("a consistent tensor"),
            )
        })
        .collect();
    let meta = HashMap::from([("routerscope.trace".to_string(), trace.meta.to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).expect("the trace is written");
}

fn analysis(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("analysis.json")).expect("analysis.json");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Tokens each expert kept over all groups, from one analysed layer.
fn expert_totals(layer: &Value) -> Vec<f64> {
    let mut out = vec![0.0; EXPERTS];
    for row in layer["tokens_per_class_expert"].as_array().expect("rows") {
        for (j, v) in row.as_array().expect("row").iter().enumerate() {
            out[j] += v.as_f64().expect("a count");
        }
    }
    out
}

#[test]
fn analyze_trace_counts_equal_routing_the_logged_logits_under_every_router() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (trace, logits) = logits_trace(6, 11);
    let path = dir.path().join("t.rstrace.safetensors");
    write(&trace, &path);
    let routers = [
        "softmax-tc",
        "sinkhorn-tc",
        "softmax-ec",
        "sinkhorn-ec",
        "sparse-ec",
    ];
    let out = dir.path().join("an");
    let o = run(&[
        "analyze",
        "--trace",
        path.to_str().unwrap_or_default(),
        "--compare",
        &routers[1..].join(","),
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = analysis(&out);
    assert_eq!(report["images"], 6);
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), routers.len());
    for (run, name) in runs.iter().zip(routers) {
        assert_eq!(run["settings"]["router"], name);
        let kind = RouterKind::ALL
            .into_iter()
            .find(|k| k.cli_name() == name)
            .expect("a router");
        let cfg = RouterConfig::new(kind);
        let mut want = vec![0.0; EXPERTS];
        let mut dropped = 0;
        for x in &logits {
            let r = route_logits(x, TOKENS, EXPERTS, &cfg, Mode::Deterministic).expect("routes");
            for i in 0..TOKENS {
                let kept: Vec<_> = r
                    .token_choices(i)
                    .iter()
                    .filter(|c| c.slot.is_some())
                    .collect();
                dropped += usize::from(kept.is_empty());
                for c in kept {
                    want[c.expert as usize] += 1.0;
                }
            }
        }
        let layer = &run["layers"][0];
        assert_eq!(expert_totals(layer), want, "{name}");
        let rate = layer["dropped_token_rate"].as_f64().unwrap_or(-1.0);
        assert!(
            (rate - dropped as f64 / (6 * TOKENS) as f64).abs() < 1e-12,
            "{name}"
        );
        // Logits are logged, so the router probabilities (and their entropy) are known.
        assert!(layer["router_entropy"]["mean"].is_number(), "{name}");
    }
}

#[test]
fn export_trace_writes_every_image_or_the_chosen_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (trace, _) = logits_trace(3, 5);
    let path = dir.path().join("t.rstrace.safetensors");
    write(&trace, &path);
    let p = path.to_str().unwrap_or_default();
    let all = dir.path().join("all");
    let o = run(&[
        "export",
        "--trace",
        p,
        "--out",
        all.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for ext in ["png", "svg", "csv", "json"] {
        let n = std::fs::read_dir(&all)
            .expect("out")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == ext))
            .count();
        // JSON: one per image and the summary.
        assert_eq!(n, if ext == "json" { 4 } else { 3 }, "{ext}");
    }
    let one = dir.path().join("one");
    let o = run(&[
        "export",
        "--trace",
        p,
        "--images",
        "1",
        "--router",
        "sinkhorn-ec",
        "--format",
        "csv",
        "--out",
        one.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<String> = std::fs::read_dir(&one)
        .expect("out")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".csv"))
        .collect();
    assert_eq!(names.len(), 1);
    assert!(
        names[0].starts_with("00001-noise-1") && names[0].contains("sinkhorn-ec"),
        "{names:?}"
    );
    let o = run(&[
        "export",
        "--trace",
        p,
        "--images",
        "3",
        "--out",
        one.to_str().unwrap_or_default(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--images 3: the trace holds 3 images"));
}

/// Runs `analyze --trace` on `trace` and returns its stderr, asserting that it failed without
/// a panic and wrote no analysis.
fn fails(trace: &Trace, name: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    write(trace, &path);
    let out = dir.path().join("an");
    let o = run(&[
        "analyze",
        "--trace",
        path.to_str().unwrap_or_default(),
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{name} was accepted");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(path.to_str().unwrap_or_default()), "{err}");
    // Nothing half-written: not even the output folder.
    assert!(!out.exists(), "{} was left behind", out.display());
    err
}

fn set_tensor(trace: &mut Trace, name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) {
    trace.tensors.retain(|t| t.0 != name);
    trace.tensors.push((name.into(), dtype, shape, bytes));
}

#[test]
fn bad_traces_fail_with_one_error_naming_the_tensor_or_entry() {
    let (base, _) = logits_trace(2, 3);
    let mut t = logits_trace(2, 3).0;
    set_tensor(
        &mut t,
        "layers/0/groups/1/logits",
        Dtype::F32,
        vec![TOKENS, 3],
        vec![0; TOKENS * 12],
    );
    assert!(fails(&t, "shape").contains("layers/0/groups/1/logits"));

    let mut t = logits_trace(2, 3).0;
    t.meta["images"][0]["grid"] = json!([5, 4]);
    assert!(fails(&t, "grid").contains("image 0"));

    let mut t = logits_trace(2, 3).0;
    let idx: Vec<u8> = (0..TOKENS).flat_map(|_| 4i32.to_le_bytes()).collect();
    set_tensor(
        &mut t,
        "layers/0/groups/0/expert_index",
        Dtype::I32,
        vec![TOKENS, 1],
        idx,
    );
    set_tensor(
        &mut t,
        "layers/0/groups/0/gates",
        Dtype::F32,
        vec![TOKENS, 1],
        f32_bytes(&[0.5; TOKENS]),
    );
    assert!(fails(&t, "index").contains("layers/0/groups/0/expert_index"));

    let mut t = logits_trace(2, 3).0;
    let mut x = vec![0.0f32; TOKENS * EXPERTS];
    x[7] = f32::NAN;
    set_tensor(
        &mut t,
        "layers/0/groups/1/logits",
        Dtype::F32,
        vec![TOKENS, EXPERTS],
        f32_bytes(&x),
    );
    let err = fails(&t, "nan");
    assert!(
        err.contains("layers/0/groups/1/logits") && err.contains("NaN"),
        "{err}"
    );

    let mut t = logits_trace(2, 3).0;
    t.meta["version"] = json!(7);
    assert!(fails(&t, "version").contains("version 7"));

    let mut t = logits_trace(2, 3).0;
    t.meta["layers"][0]["groups"][1]["members"] = json!([[9, 0, TOKENS]]);
    assert!(fails(&t, "member").contains("image 9"));

    let mut t = logits_trace(2, 3).0;
    t.tensors.retain(|x| x.0 != "layers/0/groups/0/logits");
    assert!(fails(&t, "empty-group").contains("group 0"));

    // The valid base passes, so each failure above is its defect's.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ok.rstrace.safetensors");
    write(&base, &path);
    let o = run(&[
        "analyze",
        "--trace",
        path.to_str().unwrap_or_default(),
        "--out",
        dir.path().join("an").to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_truncated_trace_names_the_file_and_does_not_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (trace, _) = logits_trace(2, 9);
    let path = dir.path().join("t.rstrace.safetensors");
    write(&trace, &path);
    let bytes = std::fs::read(&path).expect("read");
    for cut in [bytes.len() - 10, bytes.len() / 2, 12, 3, 0] {
        std::fs::write(&path, &bytes[..cut]).expect("write");
        let o = run(&[
            "analyze",
            "--trace",
            path.to_str().unwrap_or_default(),
            "--out",
            dir.path().join("an").to_str().unwrap_or_default(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "cut at {cut} was accepted");
        assert!(
            err.contains(path.to_str().unwrap_or_default()) && !err.contains("panicked"),
            "{err}"
        );
    }
}

/// Writes a trace whose tensors are declared in the header with their data left as a hole in a
/// sparse file (`set_len`): a file that claims gigabytes costs no disk, and only a reader that
/// bounds the description's numbers before it allocates can refuse it quickly.
fn write_sparse(path: &Path, meta: &Value, tensors: &[(&str, &str, Vec<usize>)]) {
    let width = |d: &str| match d {
        "F32" | "I32" => 4,
        "F16" | "BF16" => 2,
        "I64" => 8,
        _ => 1,
    };
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"routerscope.trace": meta.to_string()}),
    );
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let end = offset + shape.iter().product::<usize>() * width(dtype);
        header.insert(
            (*name).into(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = Value::Object(header).to_string();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text.as_bytes());
    std::fs::write(path, &bytes).expect("write");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.set_len((bytes.len() + offset) as u64).expect("sparse");
}

/// Runs `analyze --trace` on the file at `path`; asserts one error naming the file, no panic
/// and no output folder, and returns the error.
fn fails_at(path: &Path) -> String {
    let out = path.with_extension("out");
    let o = run(&[
        "analyze",
        "--trace",
        path.to_str().unwrap_or_default(),
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(path.to_str().unwrap_or_default()), "{err}");
    assert!(!out.exists(), "{} was left behind", out.display());
    err
}

/// Every number of a trace's description is bounded before it sizes an allocation or an index:
/// one case per cause found by the hostile-file corpus.
#[test]
fn hostile_trace_numbers_are_refused_before_anything_is_sized_by_them() {
    let check = |t: &Trace, name: &str, needles: &[&str]| {
        let err = fails(t, name);
        eprintln!("{name}: {}", err.trim());
        for n in needles {
            assert!(err.contains(n), "{name}: `{n}` not in: {err}");
        }
    };
    // A label outside the classes on a later image (the first image's is fine).
    let mut t = logits_trace(3, 3).0;
    t.meta["images"][2]["label"] = json!(5);
    check(&t, "later-label", &["image 2 has label 5", "2 classes"]);
    // A label of 10^9 without a class list.
    let mut t = logits_trace(2, 3).0;
    t.meta.as_object_mut().map(|m| m.remove("classes"));
    t.meta["images"][1]["label"] = json!(1_000_000_000u64);
    check(&t, "huge-label", &["label 1000000000", "below 100000"]);
    // Logged capacities of 10^9 and 2^62 (which overflowed experts x capacity to zero).
    for c in [1_000_000_000u64, 1 << 62] {
        let mut t = logits_trace(2, 3).0;
        t.meta["layers"][0]["router"]["capacity"] = json!(c);
        check(
            &t,
            "capacity",
            &[&format!("`capacity` is {c}"), "17 requests"],
        );
    }
    // A logged slot of 2^40 that would be taken as the capacity.
    let mut t = logits_trace(2, 3).0;
    t.meta["layers"][0]["router"] = json!({"kind": "softmax-tc"});
    for g in 0..2 {
        let p = |x: &str| format!("layers/0/groups/{g}/{x}");
        let ints = |v: Vec<i64>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>();
        set_tensor(
            &mut t,
            &p("expert_index"),
            Dtype::I64,
            vec![TOKENS, 1],
            ints(vec![0; TOKENS]),
        );
        set_tensor(
            &mut t,
            &p("gates"),
            Dtype::F32,
            vec![TOKENS, 1],
            f32_bytes(&[0.5; TOKENS]),
        );
        let mut slots: Vec<i64> = (0..TOKENS as i64).collect();
        slots[3] = 1 << 40;
        set_tensor(&mut t, &p("slot"), Dtype::I64, vec![TOKENS, 1], ints(slots));
    }
    check(&t, "slot", &["layers/0/groups/0/slot", "1099511627776"]);
    // A patch size of 0, a grid whose product overflows.
    let mut t = logits_trace(2, 3).0;
    t.meta["patch_size"] = json!([0, 4]);
    check(&t, "patch", &["`patch_size` [0, 4]"]);
    let mut t = logits_trace(2, 3).0;
    for i in 0..2 {
        t.meta["images"][i]["grid"] = json!([1u64 << 32, 1u64 << 32]);
    }
    check(&t, "grid", &["patch grid of 4294967296x4294967296"]);
    // k beyond the experts, a capacity factor that is not a number of slots.
    let mut t = logits_trace(2, 3).0;
    t.meta["layers"][0]["router"]["k"] = json!(1_000_000_000u64);
    check(&t, "k", &["router `k` is 1000000000 for 4 experts"]);
    let mut t = logits_trace(2, 3).0;
    t.meta["layers"][0]["router"]["capacity_factor"] = json!(-1.5);
    check(&t, "cf", &["`capacity_factor` is -1.5"]);
    let mut t = logits_trace(2, 3).0;
    t.meta["layers"][0]["router"]["capacity_factor"] = json!(1e300);
    check(&t, "cf-huge", &["capacity", "too large"]);
    // Messages that name the entry.
    let mut t = logits_trace(2, 3).0;
    t.meta["num_experts"] = json!(-4);
    check(
        &t,
        "experts",
        &["`num_experts`: invalid value: integer `-4`"],
    );
    let mut t = logits_trace(2, 3).0;
    t.meta["images"][1]["label"] = json!("cat");
    check(&t, "label-type", &["`images[1].label`: invalid type"]);
    let mut t = logits_trace(2, 3).0;
    set_tensor(
        &mut t,
        "layers/0/groups/1/gates",
        Dtype::F32,
        vec![TOKENS, 1],
        f32_bytes(&[0.5; TOKENS]),
    );
    check(
        &t,
        "gates",
        &["`layers/0/groups/1/gates` without `expert_index`"],
    );

    // Tensors that claim gigabytes (sparse files): images beyond the image limits, and one
    // group's logits within the token and expert limits but beyond a group's.
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut base, _) = logits_trace(1, 3);
    base.meta["layers"][0]["router"] = json!({"kind": "softmax-tc"});
    let logits = ("layers/0/groups/0/logits", "F32", vec![TOKENS, EXPERTS]);
    for (side, needle) in [
        (20_000usize, "at most 16384 pixels a side"),
        (16_000, "beyond the limit of 512 MB of pixels"),
    ] {
        let p = dir.path().join(format!("image-{side}.rstrace.safetensors"));
        write_sparse(
            &p,
            &base.meta,
            &[("images/0", "U8", vec![side, side, 3]), logits.clone()],
        );
        let e = fails_at(&p);
        assert!(e.contains("images/0") && e.contains(needle), "{e}");
    }
    let mut m = base.meta.clone();
    m["num_experts"] = json!(4096);
    m["images"][0]["grid"] = json!([1024, 1023]);
    let tokens = 1024 * 1023 + 1;
    m["layers"][0]["groups"][0]["members"] = json!([[0, 0, tokens]]);
    let p = dir.path().join("group.rstrace.safetensors");
    write_sparse(
        &p,
        &m,
        &[("layers/0/groups/0/logits", "F16", vec![tokens, 4096])],
    );
    let e = fails_at(&p);
    assert!(
        e.contains("layers/0/groups/0/logits") && e.contains("67108864 values"),
        "{e}"
    );
}

/// Files that are not regular files are refused at once, never opened so as to block.
#[test]
fn a_fifo_or_a_folder_given_as_a_trace_is_one_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("pipe.rstrace.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap_or_default()).expect("path");
    // SAFETY: mkfifo on a fresh path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let folder = dir.path().join("folder.rstrace.safetensors");
    std::fs::create_dir(&folder).expect("dir");
    for (p, what) in [(&fifo, "a FIFO"), (&folder, "a directory")] {
        let e = fails_at(p);
        assert!(e.contains(what), "{e}");
    }
}

/// Runs the command line with `args` and returns its exit status, stderr and peak resident
/// memory in kB (from `wait4` on this child alone).
fn run_measured(args: &[&str]) -> (i32, String, i64) {
    use std::io::Read;
    let mut child = Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the routerscope binary runs");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let mut status = 0;
    // SAFETY: wait4 on this test's own child, writing into the provided structs; std's
    // `Child` is not waited on afterwards.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    // Already reaped by wait4: std's wait only finds no such child.
    let _ = child.wait();
    (libc::WEXITSTATUS(status), err, usage.ru_maxrss)
}

/// The worst bad trace for memory: a description near the 100 MB limit (2 million images and a
/// group listing each) whose last image has a label outside its classes. It is refused within
/// bounded memory, and nothing is written.
#[test]
fn a_huge_bad_description_is_refused_in_bounded_memory() {
    let n = 2_000_000usize;
    let mut images = String::with_capacity(n * 30);
    let mut members = String::with_capacity(n * 14);
    for i in 0..n {
        let label = if i == n - 1 { 7 } else { i % 2 };
        images.push_str(&format!(r#"{{"grid":[1,1],"label":{label}}},"#));
        members.push_str(&format!("[{i},0,1],"));
    }
    images.pop();
    members.pop();
    let meta = format!(
        r#"{{"format":"routerscope-trace","version":1,"num_experts":2,"classes":["a","b"],"images":[{images}],"layers":[{{"block":0,"groups":[{{"members":[{members}]}}]}}]}}"#
    );
    drop((images, members));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("huge.rstrace.safetensors");
    let t = Trace {
        tensors: vec![(
            "layers/0/groups/0/logits".into(),
            Dtype::F32,
            vec![n, 2],
            vec![0; n * 8],
        )],
        meta: Value::Null,
    };
    let views = vec![(
        t.tensors[0].0.clone(),
        TensorView::new(t.tensors[0].1, t.tensors[0].2.clone(), &t.tensors[0].3).expect("view"),
    )];
    let m = HashMap::from([("routerscope.trace".to_string(), meta.clone())]);
    safetensors::serialize_to_file(views, Some(m), &path).expect("written");
    let out = dir.path().join("an");
    let (code, err, peak_kb) = run_measured(&[
        "analyze",
        "--trace",
        path.to_str().unwrap_or_default(),
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    eprintln!(
        "a {:.1} MB description: exit {code}, peak RSS {:.0} MB: {}",
        meta.len() as f64 / 1e6,
        peak_kb as f64 / 1024.0,
        err.trim()
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("image 1999999 has label 7"), "{err}");
    assert!(!out.exists());
    assert!(peak_kb < 1024 * 1024, "peak RSS {peak_kb} kB");
}
