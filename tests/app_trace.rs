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
