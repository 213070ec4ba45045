//! Runs (routing over training) end to end: runs written with the library's writer (as the
//! Python package writes them), read back and analysed by `routerscope analyze --run`: tables
//! equal to routing the logged logits, collapse flagged on the right block and steps, ranks
//! summed with unfinished steps marked partial, a reader following a growing run, churn between
//! snapshots, and bad runs refused with one error naming the file and the row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use routerscope::routing::{Mode, RouterConfig, RouterKind, route_logits};
use routerscope::run::{LayerSums, RunFile, RunSpec, RunWriter};
use serde_json::Value;

fn run_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_routerscope"))
        .args(args)
        .output()
        .expect("the routerscope binary runs")
}

/// A deterministic pseudo-random stream.
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

const E: usize = 4;
const N: usize = 64;

fn spec(rank: usize, world: usize) -> RunSpec {
    RunSpec {
        experts: E,
        model_name: "toy-moe".into(),
        classes: Vec::new(),
        rank,
        world_size: world,
    }
}

/// Writes `steps` steps of two blocks (1 and 3, two calls each of `N` tokens routed by Softmax
/// Token Choice); block 3's router collapses onto expert 2 from step `collapse_at`. Returns the
/// expected sums per (step, block).
fn write_run(
    dir: &Path,
    steps: i64,
    collapse_at: i64,
    seed: u64,
    s: &RunSpec,
) -> HashMap<(i64, usize), LayerSums> {
    let mut rng = Lcg(seed);
    let mut w = RunWriter::create(dir, s).expect("a new run");
    let cfg = RouterConfig::new(RouterKind::SoftmaxTokenChoice);
    let mut expected = HashMap::new();
    for step in 0..steps {
        w.step(step).expect("steps increase");
        for block in [1usize, 3] {
            let mut sum = LayerSums::new(E);
            for _call in 0..2 {
                let mut logits: Vec<f32> = (0..N * E).map(|_| rng.next()).collect();
                if block == 3 && step >= collapse_at {
                    for t in 0..N {
                        logits[t * E + 2] += 6.0;
                    }
                }
                let r = route_logits(&logits, N, E, &cfg, Mode::Deterministic).expect("routes");
                let mut one = LayerSums::new(E);
                one.add_routing(&r, Some(&logits), None);
                w.add(block, None, &one).expect("logged");
                sum.add(&one);
            }
            expected.insert((step, block), sum);
        }
    }
    w.close().expect("closed");
    expected
}

fn csv(path: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).expect("csv");
    let mut lines = text.lines();
    let head: Vec<String> = lines
        .next()
        .expect("header")
        .split(',')
        .map(String::from)
        .collect();
    lines
        .map(|l| {
            head.iter()
                .cloned()
                .zip(l.split(',').map(String::from))
                .collect()
        })
        .collect()
}

fn analyze(run: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "analyze",
        "--run",
        run.to_str().unwrap_or_default(),
        "--out",
        out.to_str().unwrap_or_default(),
    ];
    args.extend(extra);
    run_cli(&args)
}

#[test]
fn a_run_analyses_into_the_routing_of_its_logits_and_flags_the_collapse() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("toy.rsrun");
    let expected = write_run(&run, 40, 12, 7, &spec(0, 1));
    let out = dir.path().join("an");
    let o = analyze(&run, &out, &[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("40 steps (0–39)"), "{stdout}");
    // experts.csv: kept tokens and requests per (step, block, expert) equal the routing of the
    // logged logits summed over the step's calls.
    let experts = csv(&out.join("experts.csv"));
    assert_eq!(experts.len(), 40 * 2 * E);
    for row in &experts {
        let key = (row["step"].parse().unwrap(), row["block"].parse().unwrap());
        let j: usize = row["expert"].parse().unwrap();
        let want = &expected[&key];
        assert_eq!(
            row["tokens"],
            want.kept[j].to_string(),
            "{key:?} expert {j}"
        );
        assert_eq!(
            row["requests"],
            want.requests[j].to_string(),
            "{key:?} expert {j}"
        );
    }
    // layers.csv: the metrics of those sums.
    let layers = csv(&out.join("layers.csv"));
    assert_eq!(layers.len(), 80);
    for row in &layers {
        let key = (row["step"].parse().unwrap(), row["block"].parse().unwrap());
        let m = expected[&key].metrics();
        assert_eq!(row["tokens"], (2 * N).to_string());
        assert_eq!(row["dropped_rate"].parse::<f64>().unwrap(), m.dropped_rate);
        assert_eq!(row["load_cv"].parse::<f64>().unwrap(), m.load_cv);
        assert_eq!(
            row["max_violation"].parse::<f64>().unwrap(),
            m.max_violation
        );
        assert_eq!(row["dead_experts"], m.dead_experts.to_string());
        let h: f64 = row["router_entropy"].parse().unwrap();
        assert!((h - m.router_entropy.unwrap()).abs() < 1e-12);
        assert!(row["z_loss"].parse::<f64>().unwrap() > 0.0);
        assert_eq!(row["partial"], "0");
    }
    // The collapse of block 3 from step 12, and nothing on block 1.
    let alerts: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("alerts.json")).unwrap()).unwrap();
    let list = alerts["alerts"].as_array().expect("a list");
    let collapse: Vec<&Value> = list.iter().filter(|a| a["kind"] == "collapse").collect();
    assert_eq!(collapse.len(), 1, "{alerts}");
    assert_eq!(collapse[0]["block"], 3);
    assert_eq!(collapse[0]["first_step"], 12);
    assert_eq!(collapse[0]["last_step"], 39);
    assert!(list.iter().all(|a| a["block"] == 3), "{alerts}");
    for f in [
        "run_block1_metrics.svg",
        "run_block3_metrics.png",
        "run_block3_load.svg",
        "run_block1_load.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // A stricter rule moves the alert; a looser one drops it.
    let out2 = dir.path().join("an2");
    assert!(
        analyze(&run, &out2, &["--alert-collapse-steps", "100"])
            .status
            .success()
    );
    let alerts: Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("alerts.json")).unwrap()).unwrap();
    assert!(
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["kind"] != "collapse")
    );
}

#[test]
fn ranks_add_up_and_unfinished_steps_are_partial() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("ddp.rsrun");
    let a = write_run(&run, 10, 100, 1, &spec(0, 2));
    let b = write_run(&run, 7, 100, 2, &spec(1, 2));
    let file = RunFile::open(&run).expect("opens");
    assert!(file.is_complete(6) && !file.is_complete(7));
    let mut seen = 0;
    file.for_each_row(|step, block, sums, ranks| {
        let mut want = a[&(step, block)].clone();
        if let Some(x) = b.get(&(step, block)) {
            want.add(x);
        }
        assert_eq!(sums, &want, "step {step} block {block}");
        assert_eq!(ranks, if step < 7 { 2 } else { 1 });
        seen += 1;
        true
    })
    .expect("streams");
    assert_eq!(seen, 20);
    let out = dir.path().join("an");
    let o = analyze(&run, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("3 partial"));
    let partial: Vec<String> = csv(&out.join("layers.csv"))
        .into_iter()
        .filter(|r| r["partial"] == "1")
        .map(|r| r["step"].clone())
        .collect();
    assert_eq!(partial, ["7", "7", "8", "8", "9", "9"]);
}

#[test]
fn a_reader_follows_a_run_that_is_being_written() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("live.rsrun");
    let mut w = RunWriter::create(&run, &spec(0, 1)).expect("a new run");
    let mut one = LayerSums::new(E);
    one.add_picks(&[0, 1, 2, 3], None, 1, None, None).unwrap();
    w.step(0).unwrap();
    w.add(5, None, &one).unwrap();
    w.step(1).unwrap(); // commits step 0
    let mut r = RunFile::open(&run).expect("opens while written");
    assert_eq!(r.steps().len(), 1);
    w.add(5, None, &one).unwrap();
    w.step(2).unwrap();
    assert!(r.refresh().unwrap(), "step 1 is new");
    assert_eq!(r.steps().keys().copied().collect::<Vec<_>>(), [0, 1]);
    assert!(!r.refresh().unwrap(), "nothing new");
    // A resumed writer continues after the last committed step and refuses going back.
    drop(w);
    let mut w = RunWriter::create(&run, &spec(0, 1)).expect("resumes");
    assert_eq!(w.last_committed(), Some(1));
    assert!(
        w.step(1)
            .unwrap_err()
            .to_string()
            .contains("steps must increase")
    );
    w.step(5).unwrap();
    w.close().unwrap();
    assert!(r.refresh().unwrap());
    assert_eq!(r.steps().len(), 3);
    let e = RunWriter::create(
        &run,
        &RunSpec {
            experts: 8,
            ..spec(0, 1)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("4 experts") && e.contains("mix two runs"), "{e}");
}

/// Writes a one-layer snapshot trace (block 2) of two images of 4 tokens whose first choices are
/// `tops`.
fn snapshot(path: &Path, tops: &[i32; 8]) {
    use safetensors::tensor::{Dtype, TensorView};
    let meta = serde_json::json!({
        "format": "routerscope-trace", "version": 1, "num_experts": E,
        "images": [{"grid": [2, 2]}, {"grid": [2, 2]}],
        "layers": [{"block": 2, "router": {"kind": "softmax-tc", "k": 1},
                    "groups": [{"members": [[0, 0, 4]]}, {"members": [[1, 0, 4]]}]}]
    });
    let mut tensors = Vec::new();
    for g in 0..2 {
        let idx: Vec<u8> = tops[g * 4..g * 4 + 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let gates: Vec<u8> = [0.5f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((format!("layers/0/groups/{g}/expert_index"), Dtype::I32, idx));
        tensors.push((format!("layers/0/groups/{g}/gates"), Dtype::F32, gates));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, b)| (n.clone(), TensorView::new(*d, vec![4, 1], b).unwrap()))
        .collect();
    let m = HashMap::from([("routerscope.trace".to_string(), meta.to_string())]);
    safetensors::serialize_to_file(views, Some(m), path).unwrap();
}

#[test]
fn churn_is_the_share_of_probe_tokens_whose_top_expert_moved() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("snap.rsrun");
    let mut w = RunWriter::create(&run, &spec(0, 1)).expect("a new run");
    let mut one = LayerSums::new(E);
    one.add_picks(&[0, 1, 2, 3], None, 1, None, None).unwrap();
    for (step, tops) in [
        (0, [0, 1, 2, 3, 0, 1, 2, 3]),
        (5, [0, 1, 2, 3, 0, 1, 2, 0]),
        (10, [3, 3, 3, 3, 0, 1, 2, 0]),
    ] {
        w.step(step).unwrap();
        w.add(2, None, &one).unwrap();
        snapshot(&w.snapshot_path(step), &tops);
        w.record_snapshot(step).unwrap();
    }
    w.close().unwrap();
    let out = dir.path().join("an");
    let o = analyze(&run, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let churn: Vec<String> = csv(&out.join("layers.csv"))
        .into_iter()
        .map(|r| r["churn"].clone())
        .collect();
    assert_eq!(churn, ["", "0.125", "0.375"]);
    // A snapshot whose file is gone is one error naming it.
    std::fs::remove_file(run.join("snapshots/step-000000005.rstrace.safetensors")).unwrap();
    let o = analyze(&run, &dir.path().join("an2"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step-000000005") && err.contains("step 5"),
        "{err}"
    );
    assert!(!dir.path().join("an2").exists());
    // A truncated one too.
    let ten = std::fs::read(run.join("snapshots/step-000000010.rstrace.safetensors")).unwrap();
    std::fs::write(
        run.join("snapshots/step-000000005.rstrace.safetensors"),
        &ten[..ten.len() - 16],
    )
    .unwrap();
    let o = analyze(&run, &dir.path().join("an3"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step-000000005") && err.contains("truncated"),
        "{err}"
    );
    assert!(!dir.path().join("an3").exists());
}

/// Runs `analyze --run` on `run` and returns its one error line.
fn fails(run: &Path) -> String {
    let out = run.with_extension("out");
    let o = analyze(run, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{}: {err}", run.display());
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
    err
}

fn sql(db: &Path, statement: &str) {
    let c = rusqlite::Connection::open(db).expect("opens");
    c.execute_batch(statement).expect(statement);
}

#[test]
fn bad_runs_are_one_error_naming_the_file_and_the_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fresh = |name: &str| -> PathBuf {
        let run = dir.path().join(name);
        write_run(&run, 3, 100, 3, &spec(0, 1));
        run
    };
    let run = fresh("foreign.rsrun");
    std::fs::remove_file(run.join("run.sqlite")).unwrap();
    sql(&run.join("run.sqlite"), "CREATE TABLE t (x INTEGER);");
    assert!(fails(&run).contains("not a routerscope run database"));
    let run = fresh("junk.rsrun");
    std::fs::write(run.join("run.sqlite"), vec![7u8; 8192]).unwrap();
    let e = fails(&run);
    assert!(
        e.contains("run.sqlite") && e.contains("not an SQLite database"),
        "{e}"
    );
    let run = fresh("version.rsrun");
    sql(
        &run.join("run.sqlite"),
        "UPDATE meta SET value = '2' WHERE key = 'schema_version';",
    );
    assert!(fails(&run).contains("run schema version 2; this routerscope reads version 1"));
    let run = fresh("nan.rsrun");
    sql(
        &run.join("run.sqlite"),
        "UPDATE layers SET entropy_sum = 'nan' WHERE step = 1 AND block = 3;",
    );
    let e = fails(&run);
    assert!(
        e.contains("row (step 1, block 3)") && e.contains("entropy_sum"),
        "{e}"
    );
    let run = fresh("experts.rsrun");
    sql(
        &run.join("run.sqlite"),
        "UPDATE layers SET kept = x'0000' WHERE step = 2 AND block = 1;",
    );
    let e = fails(&run);
    assert!(
        e.contains("row (step 2, block 1)") && e.contains("4 little-endian u32"),
        "{e}"
    );
    let run = fresh("block.rsrun");
    sql(
        &run.join("run.sqlite"),
        "UPDATE layers SET block = 9 WHERE step = 0 AND block = 1;",
    );
    assert!(fails(&run).contains("row (step 0, block 9): a block missing from table `blocks`"));
    let run = fresh("order.rsrun");
    sql(&run.join("run.sqlite"), "DELETE FROM steps WHERE step = 1;");
    assert!(fails(&run).contains("row (step 1, block 1): its step is not in table `steps`"));
    let run = fresh("description.rsrun");
    sql(
        &run.join("run.sqlite"),
        "UPDATE meta SET value = '{\"format\": \"routerscope-run\", \"version\": 1, \"num_experts\": -4}' WHERE key = 'description';",
    );
    assert!(fails(&run).contains("`num_experts`: invalid value: integer `-4`"));
    // A folder that is not a run, and a FIFO as its database.
    let e = fails(dir.path());
    assert!(e.contains("run.sqlite"), "{e}");
    let run = fresh("fifo.rsrun");
    std::fs::remove_file(run.join("run.sqlite")).unwrap();
    let c = std::ffi::CString::new(run.join("run.sqlite").to_str().unwrap_or_default()).unwrap();
    // SAFETY: mkfifo on a fresh path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(fails(&run).contains("a FIFO"));
}

/// A trace of `images` images (a 3x3 grid and a CLS token, one group each) whose Token Choice
/// picks are `router`'s routing of the given logits.
fn picks_trace(path: &Path, logits: &[Vec<f32>], kind: RouterKind, grid: [usize; 2]) {
    use safetensors::tensor::{Dtype, TensorView};
    let tokens = grid[0] * grid[1] + 1;
    let cfg = RouterConfig {
        k: if kind.family() == routerscope::routing::RouterFamily::TokenChoice {
            2
        } else {
            1
        },
        ..RouterConfig::new(kind)
    };
    let mut tensors = Vec::new();
    let mut groups = Vec::new();
    for (i, x) in logits.iter().enumerate() {
        let r = route_logits(x, tokens, E, &cfg, Mode::Deterministic).expect("routes");
        let lg: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((
            format!("layers/0/groups/{i}/logits"),
            Dtype::F32,
            vec![tokens, E],
            lg,
        ));
        if kind.family() == routerscope::routing::RouterFamily::TokenChoice {
            // The picks in rank order, dropped ones included (slot -1).
            let s = r.sparse().expect("sparse");
            let idx: Vec<u8> = s
                .choices
                .iter()
                .flat_map(|c| (c.expert as i32).to_le_bytes())
                .collect();
            let gates: Vec<u8> = s
                .choices
                .iter()
                .flat_map(|c| c.gate.to_le_bytes())
                .collect();
            let slots: Vec<u8> = s
                .choices
                .iter()
                .flat_map(|c| c.slot.map_or(-1, |v| v as i32).to_le_bytes())
                .collect();
            let k = cfg.k;
            tensors.push((
                format!("layers/0/groups/{i}/expert_index"),
                Dtype::I32,
                vec![tokens, k],
                idx,
            ));
            tensors.push((
                format!("layers/0/groups/{i}/gates"),
                Dtype::F32,
                vec![tokens, k],
                gates,
            ));
            tensors.push((
                format!("layers/0/groups/{i}/slot"),
                Dtype::I32,
                vec![tokens, k],
                slots,
            ));
        } else {
            let c = r.capacity;
            let d: Vec<u8> = r
                .dispatch_dense()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let w: Vec<u8> = r
                .combine_dense()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            tensors.push((
                format!("layers/0/groups/{i}/dispatch"),
                Dtype::F32,
                vec![tokens, E, c],
                d,
            ));
            tensors.push((
                format!("layers/0/groups/{i}/combine"),
                Dtype::F32,
                vec![tokens, E, c],
                w,
            ));
        }
        groups.push(serde_json::json!({"members": [[i, 0, tokens]]}));
    }
    let meta = serde_json::json!({
        "format": "routerscope-trace", "version": 1, "num_experts": E,
        "images": (0..logits.len()).map(|_| serde_json::json!({"grid": grid, "cls_token": true}))
            .collect::<Vec<_>>(),
        "layers": [{"block": 4, "router": {"kind": kind.cli_name(), "k": cfg.k,
                    "capacity": route_logits(&logits[0], tokens, E, &cfg, Mode::Deterministic)
                        .expect("routes").capacity},
                    "groups": groups}],
    });
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("tensor"),
            )
        })
        .collect();
    let m = HashMap::from([("routerscope.trace".to_string(), meta.to_string())]);
    safetensors::serialize_to_file(views, Some(m), path).expect("written");
}

#[test]
fn diff_is_zero_on_the_same_routing_and_the_flip_rate_of_another_router() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Lcg(11);
    let tokens = 10;
    let logits: Vec<Vec<f32>> = (0..6)
        .map(|_| (0..tokens * E).map(|_| rng.next()).collect())
        .collect();
    let a = dir.path().join("a.rstrace.safetensors");
    let a2 = dir.path().join("a2.rstrace.safetensors");
    let b = dir.path().join("b.rstrace.safetensors");
    picks_trace(&a, &logits, RouterKind::SoftmaxTokenChoice, [3, 3]);
    picks_trace(&a2, &logits, RouterKind::SoftmaxTokenChoice, [3, 3]);
    picks_trace(&b, &logits, RouterKind::SoftmaxExpertChoice, [3, 3]);
    let diff = |x: &Path, y: &Path, out: &str| {
        let out = dir.path().join(out);
        let o = run_cli(&[
            "diff",
            x.to_str().unwrap_or_default(),
            y.to_str().unwrap_or_default(),
            "--out",
            out.to_str().unwrap_or_default(),
        ]);
        (o, out)
    };
    let (o, out) = diff(&a, &a2, "same");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("diff.json")).unwrap()).unwrap();
    assert_eq!(j["blocks"][0]["top1_differ"], 0);
    assert_eq!(j["blocks"][0]["set_differ"], 0);
    assert!(out.join("diff_image_00000.png").is_file());
    // Against Softmax Expert Choice on the same logits: the flip rate routing them implies.
    let mut want = 0;
    for x in &logits {
        let tc = route_logits(
            x,
            tokens,
            E,
            &RouterConfig {
                k: 2,
                ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
            },
            Mode::Deterministic,
        )
        .unwrap();
        let ec = route_logits(
            x,
            tokens,
            E,
            &RouterConfig::new(RouterKind::SoftmaxExpertChoice),
            Mode::Deterministic,
        )
        .unwrap();
        let (p, q) = (
            routerscope::trace::diff::token_picks(&tc),
            routerscope::trace::diff::token_picks(&ec),
        );
        want += p.top.iter().zip(&q.top).filter(|(u, v)| u != v).count();
    }
    let (o, out) = diff(&a, &b, "routers");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("diff.json")).unwrap()).unwrap();
    assert_eq!(j["blocks"][0]["top1_differ"], want);
    assert!(want > 0, "the routers disagree somewhere");
    assert_eq!(
        j["blocks"][0]["top1_differ_rate"].as_f64().unwrap(),
        want as f64 / (6 * tokens) as f64
    );
    // Other images (another grid) are one error, and nothing is written.
    let c = dir.path().join("c.rstrace.safetensors");
    let wide: Vec<Vec<f32>> = (0..6)
        .map(|_| (0..13 * E).map(|_| rng.next()).collect())
        .collect();
    picks_trace(&c, &wide, RouterKind::SoftmaxTokenChoice, [3, 4]);
    let (o, out) = diff(&a, &c, "other");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("patch grid") && err.contains("not the same images"),
        "{err}"
    );
    assert!(!out.exists());
}
