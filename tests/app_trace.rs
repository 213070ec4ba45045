//! The viewer on routing traces (egui_kittest, wgpu renderer): a trace written here from a
//! built-in model's own run opens with its images and shows exactly the model's routing; a
//! router switch is a what-if on the logged logits; a trace without logits says what it cannot
//! show; the Dataset view analyses the trace; a bad trace is one error and the state stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use routerscope::app::RouterscopeApp;
use routerscope::app::settings::Settings;
use routerscope::backend::Engine;
use routerscope::import::load_any;
use routerscope::model::{RunOptions, decode_image, preprocess};
use routerscope::routing::{Mode, RouterKind, route_logits};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

fn harness() -> Harness<'static, RouterscopeApp> {
    let wake = egui::Context::default();
    let mut app = RouterscopeApp::new(&wake, Settings::default());
    app.hide_timings = true;
    let mut h = Harness::builder()
        .with_size([1400.0, 900.0])
        .wgpu()
        .build_ui_state(|ui, app: &mut RouterscopeApp| app.show(ui), app);
    settle(&mut h);
    h
}

fn settle(h: &mut Harness<'static, RouterscopeApp>) {
    let ctx = h.ctx.clone();
    for _ in 0..4 {
        assert!(
            h.state_mut().wait_idle(&ctx, Duration::from_secs(120)),
            "worker did not finish"
        );
        h.run_steps(2);
    }
}

fn snapshot_options() -> SnapshotOptions {
    SnapshotOptions::new().max_failed_pixels(200)
}

fn sample_images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = routerscope::catalog::sample_images()
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("fmnist-"))
        })
        .collect();
    v.sort();
    v.truncate(4);
    v
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a trace of built-in model `name`'s own routing of four sample images (one group
/// each): pixels, and per MoE layer the logits (when `logits`) and the Token Choice picks.
fn model_trace(dir: &Path, name: &str, logits: bool) -> PathBuf {
    let model = routerscope::catalog::assets_dir().join(format!("models/{name}.safetensors"));
    let (cfg, weights) = load_any(&model).expect("the built-in model loads");
    let engine = Engine::new(cfg.clone(), weights, None).expect("CPU engine");
    let moe = cfg.moe.as_ref().expect("an MoE model");
    let (n, e) = (cfg.seq_len(), moe.num_experts);
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut images = Vec::new();
    let mut groups: Vec<Vec<serde_json::Value>> = vec![Vec::new(); moe.layers.len()];
    for (i, path) in sample_images().iter().enumerate() {
        let img = decode_image(path).expect("decodes");
        let px = preprocess(&img, &cfg).expect("preprocesses");
        let out = engine
            .forward(&[px], &RunOptions::from_config(&cfg))
            .expect("runs");
        let rgb = img.to_rgb8();
        tensors.push((
            format!("images/{i}"),
            Dtype::U8,
            vec![rgb.height() as usize, rgb.width() as usize, 3],
            rgb.into_raw(),
        ));
        images.push(json!({
            "grid": cfg.grid(), "cls_token": true,
            "name": path.file_name().map(|f| f.to_string_lossy().into_owned()),
        }));
        for (l, rec) in out.records.iter().enumerate() {
            let g = &rec.groups[0];
            let r = &g.routing;
            let p = |piece: &str| format!("layers/{l}/groups/{i}/{piece}");
            groups[l].push(json!({"members": [[i, 0, n]]}));
            if let Some(soft) = r.soft() {
                let slots = r.capacity;
                for (piece, w) in [
                    ("soft_dispatch", &soft.dispatch),
                    ("soft_combine", &soft.combine),
                ] {
                    tensors.push((p(piece), Dtype::F32, vec![n, e, slots], f32_bytes(w)));
                }
                continue;
            }
            let k = r.k;
            let (mut idx, mut gates, mut slots) = (Vec::new(), Vec::new(), Vec::new());
            for t in 0..n {
                for c in r.token_choices(t) {
                    idx.extend((c.expert as i32).to_le_bytes());
                    gates.push(c.gate);
                    slots.extend(c.slot.map_or(-1, |s| s as i32).to_le_bytes());
                }
            }
            tensors.push((p("expert_index"), Dtype::I32, vec![n, k], idx));
            tensors.push((p("gates"), Dtype::F32, vec![n, k], f32_bytes(&gates)));
            tensors.push((p("slot"), Dtype::I32, vec![n, k], slots));
            if logits {
                tensors.push((p("logits"), Dtype::F32, vec![n, e], f32_bytes(&g.logits)));
            }
        }
    }
    let capacity = engine
        .forward(
            &[preprocess(&decode_image(&sample_images()[0]).expect("decodes"), &cfg).expect("px")],
            &RunOptions::from_config(&cfg),
        )
        .expect("runs")
        .records[0]
        .groups[0]
        .routing
        .capacity;
    let meta = json!({
        "format": "routerscope-trace",
        "version": 1,
        "model_name": format!("{name} (trace)"),
        "num_experts": e,
        "classes": cfg.class_names,
        "images": images,
        "layers": moe.layers.iter().zip(groups).map(|(b, g)| json!({
            "block": b,
            "router": {"kind": moe.router.kind.cli_name(), "k": moe.router.k, "capacity": capacity},
            "groups": g,
        })).collect::<Vec<_>>(),
    });
    let path = dir.join(format!("{name}.rstrace.safetensors"));
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
    safetensors::serialize_to_file(views, Some(m), &path).expect("written");
    path
}

/// A fixed folder, so that the paths shown in snapshots do not change between runs.
fn fixed_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("routerscope-app-trace-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn a_trace_opens_with_its_images_and_shows_the_models_own_routing() {
    let dir = fixed_dir("open");
    let trace = model_trace(&dir, "fashion-mnist-softmax-tc", true);
    let mut h = harness();
    // The model's own view of the first sample image, to compare with.
    let want = h.state().image_routing(0).expect("routing").tokens;
    h.state_mut().open_model(trace.clone());
    settle(&mut h);
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    assert_eq!(app.model_path(), Some(trace.as_path()));
    assert_eq!(app.image_count(), 4, "the gallery holds the trace's images");
    let t = app.trace_summary().expect("a trace");
    assert_eq!((t.images, t.layers.len()), (4, 2));
    let got = app.image_routing(0).expect("routing of trace image 0");
    assert_eq!(got.router, RouterKind::SoftmaxTokenChoice);
    assert_eq!(
        got.tokens, want,
        "the trace shows exactly the model's routing"
    );
    assert!(app.prediction().is_none_or(|p| p.is_empty()));
    h.get_by_label_contains("Showing the logged routing");
    h.snapshot_options("trace_image_view", &snapshot_options());

    // Another router: a what-if on the logged logits, equal to routing them directly.
    h.state_mut().select_router(RouterKind::SoftmaxExpertChoice);
    settle(&mut h);
    let app = h.state();
    assert!(app.run_error().is_none(), "{:?}", app.run_error());
    let what_if = app.image_routing(0).expect("what-if routing");
    assert_eq!(what_if.router, RouterKind::SoftmaxExpertChoice);
    h.get_by_label_contains("What-if on the logged logits");
    let logits = {
        let model =
            routerscope::catalog::assets_dir().join("models/fashion-mnist-softmax-tc.safetensors");
        let (cfg, weights) = load_any(&model).expect("loads");
        let engine = Engine::new(cfg.clone(), weights, None).expect("engine");
        let img = decode_image(&sample_images()[0]).expect("decodes");
        let out = engine
            .forward(
                &[preprocess(&img, &cfg).expect("px")],
                &RunOptions::from_config(&cfg),
            )
            .expect("runs");
        out.records[0].groups[0].logits.clone()
    };
    let direct = route_logits(
        &logits,
        50,
        8,
        &h.state().settings.router_config(),
        Mode::Deterministic,
    )
    .expect("routes");
    for (t, tok) in what_if.tokens.iter().enumerate() {
        assert_eq!(tok.choices, direct.token_choices(t), "token {t}");
    }
}

#[test]
fn a_trace_without_logits_shows_its_routing_and_says_what_it_cannot() {
    let dir = fixed_dir("picks");
    let trace = model_trace(&dir, "fashion-mnist-softmax-tc", false);
    let mut h = harness();
    h.state_mut().open_model(trace);
    settle(&mut h);
    let r = h.state().image_routing(0).expect("the logged routing");
    assert!(
        r.tokens.iter().all(|t| t.probs.is_empty()),
        "no probabilities were logged"
    );
    h.get_by_label_contains("logged no router logits");
    h.state_mut()
        .select_router(RouterKind::SinkhornExpertChoice);
    settle(&mut h);
    let err = h.state().run_error().expect("a what-if needs logits");
    assert!(err.contains("logged no router logits"), "{err}");
    // The logged routing stays shown.
    assert_eq!(
        h.state().image_routing(0).expect("previous result").router,
        RouterKind::SoftmaxTokenChoice
    );
}

#[test]
fn the_dataset_view_analyses_a_trace() {
    let dir = fixed_dir("dataset");
    let trace = model_trace(&dir, "fashion-mnist-softmax-tc", true);
    let mut h = harness();
    let ctx = h.ctx.clone();
    h.state_mut().open_model(trace);
    settle(&mut h);
    h.state_mut().dataset.shown = true;
    h.run_steps(2);
    assert!(
        h.state_mut().wait_dataset(&ctx, Duration::from_secs(120)),
        "the analysis did not finish"
    );
    settle(&mut h);
    let a = h
        .state()
        .dataset_result()
        .expect("an analysis of the trace");
    assert_eq!(a.images, 4);
    assert_eq!(a.runs[0].layers.len(), 2);
    h.get_by_label_contains("the trace's own 4 images, under its logged routing");
    h.snapshot_options("trace_dataset", &snapshot_options());
}

#[test]
fn a_bad_trace_is_one_error_and_the_state_stays() {
    let dir = fixed_dir("bad");
    let trace = model_trace(&dir, "fashion-mnist-softmax-tc", true);
    let bytes = std::fs::read(&trace).expect("read");
    std::fs::write(&trace, &bytes[..bytes.len() - 64]).expect("truncate");
    let mut h = harness();
    let before = h.state().model_path().map(Path::to_path_buf);
    let images = h.state().image_count();
    h.state_mut().open_model(trace.clone());
    settle(&mut h);
    let app = h.state();
    assert_eq!(app.errors().len(), 1, "{:?}", app.errors());
    assert!(
        app.errors()[0].contains(&trace.display().to_string())
            && app.errors()[0].contains("truncated"),
        "{:?}",
        app.errors()
    );
    assert_eq!(app.model_path().map(Path::to_path_buf), before);
    assert_eq!(app.image_count(), images);
    assert!(app.image_routing(0).is_some());
}

#[test]
fn a_trace_compares_routers_and_exports_the_view() {
    use routerscope::figures::export::Format;
    let dir = fixed_dir("export");
    let trace = model_trace(&dir, "fashion-mnist-softmax-tc", true);
    let mut h = harness();
    h.state_mut().open_model(trace);
    settle(&mut h);
    let logged = h.state().image_routing(0).expect("the logged routing");
    h.state_mut().settings.compare = true;
    h.state_mut().select_router(RouterKind::SoftmaxTokenChoice);
    settle(&mut h);
    let job = h.state().export_job().expect("something to export");
    assert!(
        job.stem.starts_with("00000-fmnist-00-ankle-boot"),
        "{}",
        job.stem
    );
    let kinds: Vec<RouterKind> = job.panels.iter().map(|p| p.routing.router).collect();
    // Every sparse router re-routes the logged logits; Soft MoE cannot (no token vectors).
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    assert!(!kinds.contains(&RouterKind::SoftMoe));
    let own = job
        .panels
        .iter()
        .find(|p| p.routing.router == RouterKind::SoftmaxTokenChoice)
        .expect("the logged router's panel");
    assert_eq!(
        own.routing.tokens, logged.tokens,
        "its panel is the logged routing"
    );
    let out = tempfile::tempdir().expect("temp dir");
    for (format, name) in [
        (Format::Png, "f.png"),
        (Format::Svg, "f.svg"),
        (Format::Csv, "f.csv"),
    ] {
        job.write(&out.path().join(name), format, 900)
            .expect("exported");
    }
    assert_eq!(
        image::open(out.path().join("f.png")).expect("png").width(),
        900
    );
}

#[test]
fn a_soft_moe_trace_shows_the_models_slot_weights() {
    let dir = fixed_dir("soft");
    let trace = model_trace(&dir, "fashion-mnist-soft", false);
    let mut h = harness();
    h.state_mut().select_router(RouterKind::SoftMoe);
    settle(&mut h);
    let want = h.state().image_routing(0).expect("the model's routing");
    assert_eq!(want.router, RouterKind::SoftMoe);
    h.state_mut().open_model(trace);
    settle(&mut h);
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    let got = app.image_routing(0).expect("the trace's routing");
    assert_eq!(got.router, RouterKind::SoftMoe);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.soft, want.soft, "the slot weights are the logged ones");
}

/// A snapshot trace of the sample images (a 7x7 grid of 4x4-pixel patches and a CLS token, one
/// group each) whose first choices are `top(image, token)`.
use routerscope::model::FASHION_MNIST_CLASSES as FASHION_CLASSES;

/// The class of sample image `i` (the first four Fashion-MNIST samples by name).
fn probe_label(i: usize) -> Option<usize> {
    let name = sample_images()[i]
        .file_name()?
        .to_string_lossy()
        .to_string();
    FASHION_CLASSES
        .iter()
        .position(|c| name.contains(&c.to_lowercase().replace([' ', '/'], "-")))
}

fn probe_snapshot(path: &Path, top: impl Fn(usize, usize) -> i32) {
    let images: Vec<image::RgbImage> = sample_images()
        .iter()
        .map(|p| decode_image(p).expect("decodes").to_rgb8())
        .collect();
    let tokens = 50;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut groups = Vec::new();
    for (i, im) in images.iter().enumerate() {
        tensors.push((
            format!("images/{i}"),
            Dtype::U8,
            vec![im.height() as usize, im.width() as usize, 3],
            im.as_raw().clone(),
        ));
        let idx: Vec<u8> = (0..tokens).flat_map(|t| top(i, t).to_le_bytes()).collect();
        tensors.push((
            format!("layers/0/groups/{i}/expert_index"),
            Dtype::I32,
            vec![tokens, 1],
            idx,
        ));
        tensors.push((
            format!("layers/0/groups/{i}/gates"),
            Dtype::F32,
            vec![tokens, 1],
            f32_bytes(&[0.5; 50]),
        ));
        groups.push(json!({"members": [[i, 0, tokens]]}));
    }
    let meta = json!({
        "format": "routerscope-trace", "version": 1, "num_experts": 4,
        "classes": FASHION_CLASSES,
        "images": (0..images.len()).map(|i| json!({"grid": [7, 7], "cls_token": true,
            "name": format!("probe {i}"), "label": probe_label(i)})).collect::<Vec<_>>(),
        "layers": [{"block": 3, "router": {"kind": "softmax-tc", "k": 1}, "groups": groups}],
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

/// Writes `steps` steps (from `from`) of blocks 1 and 3 into `w`; block 3 collapses onto expert
/// 2 from step 20. A snapshot every 20 steps, each moving a few more patches to expert 2.
fn write_steps(w: &mut routerscope::run::RunWriter, from: i64, steps: i64) {
    use routerscope::run::LayerSums;
    for step in from..from + steps {
        w.step(step).expect("steps increase");
        for block in [1usize, 3] {
            let mut s = LayerSums::new(4);
            let picks: Vec<i64> = (0..64)
                .map(|t| {
                    if block == 3 && step >= 20 && t % 8 != 0 {
                        2
                    } else {
                        (t + step as usize) as i64 % 4
                    }
                })
                .collect();
            s.add_picks(&picks, None, 1, None, None).expect("picks");
            w.add(block, None, &s).expect("logged");
        }
        if step % 20 == 0 {
            let moved = (step / 20) as usize;
            probe_snapshot(&w.snapshot_path(step), |i, t| {
                if t % 7 < moved {
                    2
                } else {
                    ((t + i) % 4) as i32
                }
            });
            w.record_snapshot(step).expect("recorded");
        }
    }
}

fn new_run(dir: &Path) -> routerscope::run::RunWriter {
    routerscope::run::RunWriter::create(
        &dir.join("train.rsrun"),
        &routerscope::run::RunSpec {
            experts: 4,
            model_name: "toy-vit-moe".into(),
            classes: Vec::new(),
            rank: 0,
            world_size: 1,
        },
    )
    .expect("a new run")
}

#[test]
fn a_run_opens_in_the_timeline_with_its_alerts_and_the_snapshot_at_the_cursor() {
    let dir = fixed_dir("timeline");
    let mut w = new_run(&dir);
    write_steps(&mut w, 0, 60);
    w.close().expect("closed");
    let mut h = harness();
    let ctx = h.ctx.clone();
    h.state_mut().open_run(dir.join("train.rsrun"), &ctx);
    assert!(h.state_mut().wait_timeline(Duration::from_secs(60)));
    let app = h.state();
    assert!(app.timeline_error().is_none(), "{:?}", app.timeline_error());
    let d = app.timeline_data().expect("read");
    assert_eq!((d.steps, d.first, d.last), (60, Some(0), Some(59)));
    assert_eq!(d.snapshots, [0, 20, 40]);
    let collapse: Vec<_> = d
        .alerts
        .iter()
        .filter(|a| a.kind == routerscope::run::alerts::AlertKind::Collapse)
        .collect();
    assert_eq!(collapse.len(), 1, "{:?}", d.alerts);
    assert_eq!((collapse[0].block, collapse[0].first_step), (3, 20));
    // The cursor opens at the last step; the snapshot at or before it is step 40's.
    assert_eq!(app.timeline_cursor(), Some(59));
    assert_eq!(app.snapshot_at_cursor(), Some(40));
    // Block 3, the cursor moved to step 30: step 20's snapshot, compared with step 0's.
    h.state_mut().set_timeline_block(1);
    h.state_mut().set_timeline_cursor(30);
    h.state_mut().set_compare_previous(true);
    assert!(h.state_mut().wait_timeline(Duration::from_secs(60)));
    let snap = h.state().timeline_snapshot().expect("a snapshot");
    assert_eq!(snap.step, 20);
    assert_eq!(snap.previous.as_ref().map(|p| p.0), Some(0));
    let changed = snap.top[&3]
        .iter()
        .zip(&snap.previous.as_ref().expect("previous").1[&3])
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 0);
    h.run_steps(3);
    h.get_by_label_contains("alerts of block 3 (1)");
    h.get_by_label_contains("probe 0 · Ankle boot");
    h.get_by_label_contains("red outline: the patch's top expert differs from step 0's");
    h.snapshot_options("timeline", &snapshot_options());
    // A run that cannot be read is one error; the view keeps what it showed.
    let junk = dir.join("junk.rsrun");
    std::fs::create_dir_all(&junk).expect("dir");
    std::fs::write(junk.join("run.sqlite"), vec![7u8; 4096]).expect("junk");
    h.state_mut().open_run(junk, &ctx);
    assert!(h.state_mut().wait_timeline(Duration::from_secs(60)));
    let app = h.state();
    assert!(
        app.timeline_error()
            .is_some_and(|e| e.contains("not an SQLite database")),
        "{:?}",
        app.timeline_error()
    );
    assert_eq!(app.timeline_data().map(|d| d.steps), Some(60));
}

#[test]
fn the_timeline_follows_a_run_that_is_being_written() {
    let dir = fixed_dir("follow");
    let mut w = new_run(&dir);
    write_steps(&mut w, 0, 10);
    w.step(10).expect("commits step 9");
    let mut h = harness();
    let ctx = h.ctx.clone();
    h.state_mut().open_run(dir.join("train.rsrun"), &ctx);
    assert!(h.state_mut().wait_timeline(Duration::from_secs(60)));
    assert_eq!(h.state().timeline_data().and_then(|d| d.last), Some(9));
    h.state_mut().set_follow_latest(true);
    w.close().expect("commits step 10");
    let mut w = new_run(&dir);
    write_steps(&mut w, 11, 30);
    w.close().expect("closed");
    // New steps and snapshots appear within 2 s, polled off the UI thread.
    let start = std::time::Instant::now();
    while h.state().timeline_data().and_then(|d| d.last) != Some(40) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the timeline did not follow the run: {:?}",
            h.state().timeline_data().map(|d| d.last)
        );
        std::thread::sleep(Duration::from_millis(50));
        h.run_steps(1);
    }
    let app = h.state();
    assert_eq!(
        app.timeline_cursor(),
        Some(40),
        "following moves the cursor"
    );
    assert_eq!(
        app.timeline_data().map(|d| d.snapshots.clone()),
        Some(vec![0, 20, 40])
    );
}

/// The Timeline's frame time on a big run (`cargo run --release --example generate_run --
/// /tmp/big.rsrun 100000 12 64`, then `ROUTERSCOPE_BIG_RUN=/tmp/big.rsrun cargo test --release
/// --test app_trace -- --ignored timeline_frame_time`): the worst of 20 frames, every block.
#[test]
#[ignore]
fn timeline_frame_time_on_a_big_run() {
    let Some(path) = std::env::var_os("ROUTERSCOPE_BIG_RUN") else {
        return;
    };
    let mut h = harness();
    let ctx = h.ctx.clone();
    let start = std::time::Instant::now();
    h.state_mut().open_run(PathBuf::from(path), &ctx);
    assert!(h.state_mut().wait_timeline(Duration::from_secs(600)));
    let read = start.elapsed();
    let blocks = h.state().timeline_data().map_or(0, |d| d.series.len());
    let mut worst = 0.0f32;
    for i in 0..20 {
        h.state_mut().set_timeline_block(i % blocks.max(1));
        h.state_mut().set_timeline_cursor(5000 * i as i64);
        h.run_steps(1);
        worst = worst.max(h.state().frame_ms());
    }
    eprintln!(
        "read in {:.1} s; worst frame of 20: {worst:.1} ms ({blocks} blocks)",
        read.as_secs_f64()
    );
}
