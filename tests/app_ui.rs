//! The viewer end to end with egui_kittest on the wgpu renderer (lavapipe in CI): snapshots of
//! the main view under three routers, a router switch changing the overlay, bad files leaving the
//! state as it was, keyboard navigation, and opening a vmoe `.index` directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use routerscope::app::RouterscopeApp;
use routerscope::app::settings::{GroupMode, ModelMode, Settings};
use routerscope::backend::DeviceChoice;
use routerscope::gpu::GpuContext;
use routerscope::import::vmoe_format::write_checkpoint;
use routerscope::model::{preset, random_weights};
use routerscope::routing::RouterKind;

fn harness(settings: Settings) -> Harness<'static, RouterscopeApp> {
    let wake = egui::Context::default();
    let mut app = RouterscopeApp::new(&wake, settings);
    app.hide_timings = true;
    let mut h = Harness::builder()
        .with_size([1400.0, 900.0])
        .wgpu()
        .build_ui_state(|ui, app: &mut RouterscopeApp| app.show(ui), app);
    settle(&mut h);
    h
}

/// Waits for the worker, then draws until the frame is stable.
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

fn settings(router: RouterKind) -> Settings {
    Settings {
        router,
        ..Settings::default()
    }
}

fn snapshot_options() -> SnapshotOptions {
    // Text antialiasing may differ by a few pixels between Mesa versions.
    SnapshotOptions::new().max_failed_pixels(200)
}

/// The main view of the first sample image under `kind`, checked and snapshotted as `name`.
fn main_view(kind: RouterKind, name: &str) {
    let mut h = harness(settings(kind));
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    assert!(app.image_count() >= 12);
    let r = app.image_routing(0).expect("routing of the shown image");
    assert_eq!(r.router, kind);
    assert_eq!(r.tokens.len(), 50);
    assert!(app.prediction().is_some());
    h.snapshot_options(name, &snapshot_options());
}

#[test]
fn main_view_softmax_token_choice() {
    main_view(RouterKind::SoftmaxTokenChoice, "main_softmax_tc");
}

#[test]
fn main_view_softmax_expert_choice() {
    main_view(RouterKind::SoftmaxExpertChoice, "main_softmax_ec");
}

#[test]
fn main_view_soft_moe() {
    main_view(RouterKind::SoftMoe, "main_soft_moe");
}

#[test]
fn switching_the_router_changes_the_overlay() {
    let mut h = harness(Settings {
        mode: ModelMode::WhatIf,
        ..settings(RouterKind::SoftmaxTokenChoice)
    });
    let before_img = h.render().expect("render");
    let before = h.state().image_routing(0).unwrap();
    h.state_mut().select_router(RouterKind::SoftmaxExpertChoice);
    settle(&mut h);
    let after = h.state().image_routing(0).unwrap();
    assert_eq!(after.router, RouterKind::SoftmaxExpertChoice);
    assert_ne!(before.tokens, after.tokens);
    let after_img = h.render().expect("render");
    assert_ne!(
        before_img.as_raw(),
        after_img.as_raw(),
        "the overlay did not change"
    );
    // Keyboard: router 3 is Softmax Expert Choice already; 1 goes back to Token Choice.
    h.key_press(egui::Key::Num1);
    h.run_steps(1);
    settle(&mut h);
    assert_eq!(
        h.state().image_routing(0).unwrap().router,
        RouterKind::SoftmaxTokenChoice
    );
}

#[test]
fn bad_image_and_bad_checkpoint_show_errors_and_keep_the_state() {
    // A fixed folder: the error messages name the files, and the snapshot must not change.
    let dir = std::env::temp_dir().join("routerscope-app-ui-bad-files");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut h = harness(settings(RouterKind::SoftmaxTokenChoice));
    let images = h.state().image_count();
    let model = h.state().model_path().unwrap().to_path_buf();
    let routing = h.state().image_routing(0).unwrap();

    let bad_image = dir.join("broken.png");
    std::fs::write(&bad_image, b"this is not a PNG").unwrap();
    h.state_mut().open_images(vec![bad_image]);
    settle(&mut h);
    let errs = h.state().errors().to_vec();
    assert!(errs.iter().any(|e| e.contains("broken.png")), "{errs:?}");
    assert_eq!(h.state().image_count(), images);
    assert_eq!(h.state().image_routing(0).unwrap(), routing);

    let bad_model = dir.join("broken.safetensors");
    std::fs::write(&bad_model, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage").unwrap();
    h.state_mut().open_model(bad_model);
    settle(&mut h);
    let errs = h.state().errors().to_vec();
    assert!(
        errs.iter().any(|e| e.contains("broken.safetensors")),
        "{errs:?}"
    );
    assert_eq!(h.state().model_path().unwrap(), model);
    assert_eq!(h.state().image_routing(0).unwrap(), routing);
    h.snapshot_options("error_state", &snapshot_options());
}

#[test]
fn arrow_keys_step_through_images() {
    let mut h = harness(settings(RouterKind::SoftmaxTokenChoice));
    assert_eq!(h.state().settings.current_image, 0);
    h.key_press(egui::Key::ArrowRight);
    h.run_steps(1);
    settle(&mut h);
    assert_eq!(h.state().settings.current_image, 1);
    assert!(h.state().image_routing(0).is_some());
    h.key_press(egui::Key::ArrowLeft);
    h.run_steps(1);
    assert_eq!(h.state().settings.current_image, 0);
}

/// A vmoe checkpoint opens as it is (index + shards, architecture from `PREFIX.config.json`),
/// and routing groups of the trained size are available.
#[test]
fn opens_a_vmoe_index_and_routes_groups_as_trained() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
    if let Some(m) = &mut cfg.moe {
        m.group_images = 4;
    }
    let weights = random_weights(&cfg, 9);
    let arrays: BTreeMap<String, _> = weights
        .into_iter()
        .map(|(n, t)| (format!("params/{n}"), t))
        .collect();
    let prefix = dir.path().join("vmoe_ckpt");
    write_checkpoint(&prefix, &arrays, 2, 5000, 4096).unwrap();
    std::fs::write(prefix.with_extension("config.json"), cfg.to_json()).unwrap();
    let index = prefix.with_extension("index");

    let mut h = harness(settings(RouterKind::SoftmaxTokenChoice));
    h.state_mut().open_model(index.clone());
    settle(&mut h);
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    assert_eq!(h.state().model_path(), Some(Path::new(&index)));
    assert_eq!(h.state().settings.mode, ModelMode::WhatIf);
    let single = h.state().image_routing(0).unwrap();
    assert_eq!(single.group_images, 1);

    h.state_mut().settings.group = GroupMode::AsTrained;
    h.state_mut().show_image(5);
    settle(&mut h);
    let grouped = h.state().image_routing(0).unwrap();
    assert_eq!(grouped.group_images, 4);
    // 4 images × 50 tokens share the capacity: c = ceil(200/8) = 25, padded to 28.
    assert_eq!(grouped.capacity, 28);
}

/// The app exports what it shows: PNG at the chosen width, SVG with every patch, CSV per token,
/// under a default name recording image, model, router, k and capacity factor.
#[test]
fn exports_the_current_view() {
    use routerscope::figures::export::Format;
    let dir = tempfile::tempdir().unwrap();
    let h = harness(settings(RouterKind::SinkhornExpertChoice));
    let job = h.state().export_job().expect("something to export");
    assert!(
        job.stem
            .starts_with("fmnist-00-ankle-boot-test0__fashion-mnist-sinkhorn-ec"),
        "{}",
        job.stem
    );
    assert!(job.stem.ends_with("sinkhorn-ec_k1_cf1"), "{}", job.stem);
    let png = dir.path().join("f.png");
    job.write(&png, Format::Png, 1234).unwrap();
    assert_eq!(image::open(&png).unwrap().width(), 1234);
    let svg = dir.path().join("f.svg");
    job.write(&svg, Format::Svg, 0).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    assert_eq!(
        doc.descendants()
            .filter(|n| n.attribute("class") == Some("patch"))
            .count(),
        49
    );
    let csv = dir.path().join("f.csv");
    job.write(&csv, Format::Csv, 0).unwrap();
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 51);
    // An unwritable destination is an error, not a panic.
    assert!(
        job.write(&dir.path().join("no/such/dir/f.svg"), Format::Svg, 0)
            .is_err()
    );
}

/// Router comparison in the app: the shown image under each trained model's router, side by
/// side, and exported as one figure.
#[test]
fn compares_routers_side_by_side() {
    let mut h = harness(Settings {
        compare: true,
        ..settings(RouterKind::SoftmaxTokenChoice)
    });
    settle(&mut h);
    let job = h.state().export_job().unwrap();
    let titles: Vec<&str> = job.panels.iter().map(|p| p.title.as_str()).collect();
    assert_eq!(titles.len(), 6, "{titles:?}");
    assert!(titles[5].starts_with("Soft MoE"), "{titles:?}");
    let kinds: Vec<RouterKind> = job.panels.iter().map(|p| p.routing.router).collect();
    assert!(kinds.contains(&RouterKind::SparseExpertChoice));
    h.snapshot_options("compare_routers", &snapshot_options());
}

/// The app with device GPU on the renderer's own wgpu device (as eframe's in the real app).
fn gpu_harness(router: RouterKind) -> Harness<'static, RouterscopeApp> {
    let rs = egui_kittest::wgpu::create_render_state(
        egui_kittest::wgpu::default_wgpu_setup(),
        Default::default(),
    );
    let gpu = GpuContext::shared(&rs.adapter, rs.device.clone(), rs.queue.clone())
        .expect("the renderer's device runs the kernels");
    let wake = egui::Context::default();
    let s = Settings {
        device: DeviceChoice::Gpu,
        ..settings(router)
    };
    let mut app = RouterscopeApp::with_gpu(&wake, s, Ok(gpu));
    app.hide_timings = true;
    let mut h = Harness::builder()
        .with_size([1400.0, 900.0])
        .renderer(egui_kittest::wgpu::WgpuTestRenderer::from_render_state(rs))
        .build_ui_state(|ui, app: &mut RouterscopeApp| app.show(ui), app);
    settle(&mut h);
    h
}

/// The app computes on the renderer's own wgpu device (as eframe's in the real app): the label
/// names the adapter, and the routing and prediction equal the CPU run's. Switching to the CPU
/// runs there; asking for a GPU the app was not given says so and stays on the CPU.
#[test]
fn computes_on_the_renderers_wgpu_device() {
    let mut h = gpu_harness(RouterKind::SoftmaxExpertChoice);
    let app = h.state();
    assert!(
        app.device_label().starts_with("GPU: "),
        "{}",
        app.device_label()
    );
    assert!(app.device_notice().is_none());
    let on_gpu = app.image_routing(0).expect("routing");
    let gpu_probs = app.prediction().expect("prediction").to_vec();

    h.state_mut().set_device(DeviceChoice::Cpu);
    settle(&mut h);
    let app = h.state();
    assert!(
        app.device_label().starts_with("CPU"),
        "{}",
        app.device_label()
    );
    let on_cpu = app.image_routing(0).expect("routing");
    for (a, b) in on_gpu.tokens.iter().zip(&on_cpu.tokens) {
        let slots = |t: &routerscope::figures::TokenRouting| -> Vec<(u32, Option<u32>)> {
            t.choices.iter().map(|c| (c.expert, c.slot)).collect()
        };
        assert_eq!(slots(a), slots(b), "token {}", a.index);
        for (x, y) in a.choices.iter().zip(&b.choices) {
            assert!((x.gate - y.gate).abs() < 1e-4);
        }
        for (x, y) in a.probs.iter().zip(&b.probs) {
            assert!((x - y).abs() < 1e-4);
        }
    }
    for (x, y) in gpu_probs.iter().zip(app.prediction().expect("prediction")) {
        assert!((x - y).abs() < 1e-3, "{x} vs {y}");
    }
}

/// The photo model on the GPU (the renderer's device): the label names the adapter with no
/// "GPU not used" notice, the live fidelity readout comes from the GPU run and equals the CPU's
/// within 1e-4, and the Dataset view's analysis runs on the GPU too.
#[test]
fn the_photo_model_runs_on_the_gpu_with_its_fidelity_readout() {
    let mut h = gpu_harness(RouterKind::SoftmaxTokenChoice);
    let chelsea = sample_index(&h, "photo-chelsea.png");
    h.state_mut().show_image(chelsea);
    settle(&mut h);
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    assert!(
        app.model_path()
            .unwrap()
            .ends_with("dinov2-s14-softmax-tc.safetensors")
    );
    assert!(
        app.device_label().starts_with("GPU: "),
        "{}",
        app.device_label()
    );
    assert!(app.device_notice().is_none(), "{:?}", app.device_notice());
    h.get_by_label_contains("GPU: ");
    assert!(h.query_by_label("GPU not used").is_none());
    let on_gpu = h.state().fidelity().expect("a fidelity readout");

    let dir = tempfile::tempdir().unwrap();
    for name in ["photo-chelsea.png", "photo-coffee.png"] {
        std::fs::copy(
            routerscope::catalog::assets_dir().join("images").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    h.state_mut().open_dataset(dir.path().to_path_buf());
    let ctx = h.ctx.clone();
    assert!(h.state_mut().wait_dataset(&ctx, Duration::from_secs(300)));
    let app = h.state();
    assert_eq!(app.dataset_result().expect("an analysis").images, 2);
    assert!(
        app.dataset_device().is_some_and(|d| d.starts_with("GPU: ")),
        "{:?}",
        app.dataset_device()
    );

    h.state_mut().set_device(DeviceChoice::Cpu);
    settle(&mut h);
    let app = h.state();
    assert!(app.device_label().starts_with("CPU"));
    let on_cpu = app.fidelity().expect("a fidelity readout");
    assert!(
        (on_gpu - on_cpu).abs() <= 1e-4,
        "fidelity on the GPU {on_gpu} vs the CPU {on_cpu}"
    );
}

#[test]
fn asking_for_a_gpu_the_app_does_not_have_says_so() {
    let wake = egui::Context::default();
    let s = Settings {
        device: DeviceChoice::Gpu,
        ..settings(RouterKind::SoftmaxTokenChoice)
    };
    let mut app = RouterscopeApp::with_gpu(&wake, s, Err("the window renders with glow".into()));
    app.hide_timings = true;
    let mut h = Harness::builder()
        .with_size([1400.0, 900.0])
        .wgpu()
        .build_ui_state(|ui, app: &mut RouterscopeApp| app.show(ui), app);
    settle(&mut h);
    let app = h.state();
    assert!(app.device_label().starts_with("CPU"));
    let notice = app.device_notice().expect("a notice");
    assert!(
        notice.contains("glow") && notice.contains("running on the CPU"),
        "{notice}"
    );
    assert!(app.prediction().is_some());
}

/// The index of sample image `name` in the gallery.
fn sample_index(h: &Harness<'static, RouterscopeApp>, name: &str) -> usize {
    let samples = routerscope::catalog::sample_images();
    let pos = samples.iter().position(|p| p.ends_with(name));
    assert!(pos.is_some() && pos.unwrap() < h.state().image_count());
    pos.unwrap()
}

/// A photo opens under the photo model distilled for the router (trained mode, "by image"):
/// 16×16 patches + CLS, its top-2 routing, and the fidelity readout instead of classes; the
/// comparison shows each router under its own model; the moefied base follows every what-if (k);
/// the export carries the readout, and a Fashion-MNIST image switches back to the Fashion-MNIST
/// model.
#[test]
fn photos_open_under_the_photo_model_with_a_live_fidelity_readout() {
    let mut h = harness(settings(RouterKind::SoftmaxTokenChoice));
    let chelsea = sample_index(&h, "photo-chelsea.png");
    h.state_mut().show_image(chelsea);
    settle(&mut h);
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    assert!(
        app.model_path()
            .unwrap()
            .ends_with("dinov2-s14-softmax-tc.safetensors")
    );
    assert_eq!(app.settings.k, 2);
    assert!((app.settings.capacity_factor - 1.25).abs() < 1e-9);
    let r = app.image_routing(0).expect("routing of the photo");
    assert_eq!(r.tokens.len(), 257);
    // Against the dense model (the base's all-experts run), not the distilled experts' sum.
    let distilled = app.fidelity().expect("a fidelity readout");
    assert!((0.85..1.0).contains(&distilled), "{distilled}");
    h.snapshot_options("main_photo", &snapshot_options());
    let job = h.state().export_job().unwrap();
    assert!(job.title.contains("fidelity"), "{}", job.title);
    assert!(job.fidelity.is_some());

    // Another router: its own distilled model, with the capacity it was trained at.
    h.state_mut()
        .select_router(RouterKind::SinkhornExpertChoice);
    settle(&mut h);
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    assert!(
        app.model_path()
            .unwrap()
            .ends_with("dinov2-s14-sinkhorn-ec.safetensors")
    );
    let ec = app.fidelity().expect("a fidelity readout");
    assert!((0.85..1.0).contains(&ec), "{ec}");

    // The router comparison of a photo runs each router under its own distilled model (the
    // moefied base for the routers without one).
    h.state_mut().settings.compare = true;
    h.state_mut().select_router(RouterKind::SoftmaxTokenChoice);
    settle(&mut h);
    let job = h.state().export_job().unwrap();
    assert_eq!(
        job.panels.len(),
        6,
        "every router but Soft MoE (no mu) on the photo models"
    );
    assert!(job.panels.iter().all(|p| p.routing.tokens.len() == 257));
    h.state_mut().settings.compare = false;

    // The moefied base as a what-if: more experts per token, closer to the dense model.
    h.state_mut()
        .open_model(routerscope::catalog::photo_model());
    settle(&mut h);
    h.state_mut().show_image(chelsea);
    h.state_mut().select_router(RouterKind::SoftmaxTokenChoice);
    settle(&mut h);
    let top2 = h.state().fidelity().unwrap();
    h.state_mut().settings.k = 8;
    h.state_mut().select_router(RouterKind::SoftmaxTokenChoice);
    settle(&mut h);
    let all = h.state().fidelity().unwrap();
    assert!(
        all > top2 && all > 0.99 && top2 < distilled,
        "{all} vs {top2}"
    );
    h.state_mut().settings.mode = routerscope::app::settings::ModelMode::Trained;
    h.state_mut().settings.k = 2;

    h.state_mut().show_image(0);
    settle(&mut h);
    let app = h.state();
    assert!(
        app.model_path()
            .unwrap()
            .ends_with("fashion-mnist-softmax-tc.safetensors")
    );
    assert_eq!(app.settings.k, 1);
    assert!(app.fidelity().is_none() && app.prediction().is_some());
}

/// The rule can be overridden: with "Fashion-MNIST" a photo runs under the clothing models.
#[test]
fn the_model_family_can_be_forced() {
    use routerscope::app::settings::ModelFamily;
    let mut h = harness(Settings {
        family: ModelFamily::FashionMnist,
        ..settings(RouterKind::SoftmaxTokenChoice)
    });
    let coffee = sample_index(&h, "photo-coffee.png");
    h.state_mut().show_image(coffee);
    settle(&mut h);
    assert!(
        h.state()
            .model_path()
            .unwrap()
            .ends_with("fashion-mnist-softmax-tc.safetensors")
    );
}

/// The photo model over the built-in Fashion-MNIST slice: the load axis fits every box, whisker
/// and the capacity line (the experts pinned at capacity included), and the classes are the
/// dataset's own Fashion-MNIST names, not indices.
#[test]
fn the_dataset_view_of_the_photo_model_fits_every_box_and_names_the_classes() {
    // What-if mode: the opened (moefied, undistilled) photo model stays on Fashion-MNIST data.
    let mut h = harness(Settings {
        mode: ModelMode::WhatIf,
        ..settings(RouterKind::SoftmaxTokenChoice)
    });
    let ctx = h.ctx.clone();
    h.state_mut()
        .open_model(routerscope::catalog::photo_model());
    settle(&mut h);
    h.state_mut()
        .open_dataset(routerscope::catalog::fashion_mnist_slice());
    assert!(h.state_mut().wait_dataset(&ctx, Duration::from_secs(600)));
    settle(&mut h);
    let a = h.state().dataset_result().expect("an analysis");
    assert_eq!(a.images, 1000);
    assert_eq!(a.classes, routerscope::model::FASHION_MNIST_CLASSES);
    let run = &a.runs[0];
    for la in &run.layers {
        let st = &la.stats;
        let cap = st.capacity as f64 / run.settings.group_images as f64;
        let top = routerscope::app::views::dataset_plots::load_axis_top(st, Some(cap));
        assert!(
            top > cap,
            "block {}: capacity {cap} above the axis {top}",
            st.block
        );
        for l in &st.load_per_expert {
            assert!(l.max < top && l.p95 < top && l.p75 < top, "{l:?} vs {top}");
        }
    }
    // Block 9, where the two busiest experts sit at capacity.
    assert!(
        run.layers[0]
            .stats
            .load_per_expert
            .iter()
            .filter(|l| l.p25 >= run.layers[0].stats.capacity as f64)
            .count()
            >= 1
    );
    h.snapshot_options("dataset_photo_slice", &snapshot_options());
}

/// The Dataset view on the built-in Fashion-MNIST slice: the heatmap (snapshot), an expert's
/// atlas on click, an atlas patch opening its image with the patch marked, and Export.
#[test]
fn the_dataset_view_analyses_the_built_in_slice() {
    let mut h = harness(settings(RouterKind::SoftmaxTokenChoice));
    let ctx = h.ctx.clone();
    h.state_mut()
        .open_dataset(routerscope::catalog::fashion_mnist_slice());
    h.run_steps(2);
    assert!(
        h.state().dataset_progress().is_some(),
        "no analysis started"
    );
    assert!(
        h.state_mut().wait_dataset(&ctx, Duration::from_secs(300)),
        "the analysis did not finish"
    );
    settle(&mut h);
    let a = h.state().dataset_result().expect("an analysis");
    assert_eq!(a.images, 1000);
    assert!(!a.partial);
    assert_eq!(a.classes.len(), 10);
    assert!(h.state().dataset_expert().is_none());
    h.snapshot_options("dataset_slice", &snapshot_options());

    h.get_by_label("show expert 3").click();
    h.run_steps(3);
    assert_eq!(h.state().dataset_expert(), Some(3));
    h.snapshot_options("dataset_atlas", &snapshot_options());
    let first = h.get_all_by_label_contains("atlas patch of").count();
    assert_eq!(first, routerscope::app::dataset_atlas_size());
    let patch = {
        let a = h.state().dataset_result().unwrap();
        a.runs[0].layers[0].atlas[3].patches[0].clone()
    };
    h.get_all_by_label_contains("atlas patch of")
        .next()
        .unwrap()
        .click();
    h.run_steps(2);
    settle(&mut h);
    assert!(!h.state().dataset.shown, "the image view is back");
    assert_eq!(
        h.state().marked_patch(),
        Some((patch.name.clone(), patch.token)),
        "the opened image shows the atlas patch"
    );
    let r = h
        .state()
        .image_routing(0)
        .expect("routing of the opened image");
    assert_eq!(r.tokens.len(), 50);

    let dir = tempfile::tempdir().unwrap();
    let files = h.state().export_dataset_to(dir.path()).unwrap();
    assert!(files.iter().any(|f| f.ends_with("analysis.json")));
    assert!(dir.path().join("atlas_block3.png").is_file());
}

/// The built-in photo set runs under the router's photo model by the built-in rule and says so;
/// opening the Fashion-MNIST slice then switches to the Fashion-MNIST models, and the photos
/// come back under the photo model.
#[test]
fn the_built_in_photo_set_runs_under_the_photo_model() {
    use routerscope::catalog::{self, ImageKind};
    let mut h = harness(settings(RouterKind::SoftmaxTokenChoice));
    let ctx = h.ctx.clone();
    assert!(
        h.state()
            .model_path()
            .unwrap()
            .ends_with("fashion-mnist-softmax-tc.safetensors")
    );
    h.state_mut().open_dataset(catalog::photo_dataset());
    assert_eq!(h.state().dataset_kind(), Some(ImageKind::Photo));
    settle(&mut h);
    assert!(h.state_mut().wait_dataset(&ctx, Duration::from_secs(600)));
    settle(&mut h);
    let photo = catalog::photo_model_for(RouterKind::SoftmaxTokenChoice).unwrap();
    assert_eq!(h.state().model_path(), Some(photo.as_path()));
    let a = h.state().dataset_result().expect("an analysis");
    assert_eq!(a.images, 19);
    assert_eq!(a.unreadable.len(), 0);
    let folders: Vec<String> = [
        "animals",
        "microscopy",
        "objects",
        "people",
        "scenes",
        "space",
        "text",
        "textures",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(a.classes, folders);
    h.get_by_label_contains("the built-in rule: a dataset of photos runs under the photo model");
    assert!(
        h.get_all_by_label_contains("model: dinov2-s14-softmax-tc.safetensors")
            .next()
            .is_some()
    );
    h.snapshot_options("dataset_photos", &snapshot_options());

    h.state_mut().open_dataset(catalog::fashion_mnist_slice());
    assert_eq!(h.state().dataset_kind(), Some(ImageKind::FashionMnist));
    settle(&mut h);
    assert!(h.state_mut().wait_dataset(&ctx, Duration::from_secs(600)));
    settle(&mut h);
    assert!(
        h.state()
            .model_path()
            .unwrap()
            .ends_with("fashion-mnist-softmax-tc.safetensors")
    );
    assert_eq!(h.state().dataset_result().unwrap().images, 1000);
    h.get_by_label_contains("the built-in rule: Fashion-MNIST data runs under the");
}

/// "compare routers side by side" in the Dataset view runs every router over the dataset on
/// the one checkpoint: a summary row and a heatmap per router, Soft MoE (which a sparse
/// checkpoint cannot run) left out with a note, and a click on a row shows that router's details.
#[test]
fn the_dataset_view_shows_routers_side_by_side() {
    let mut h = harness(Settings {
        compare: true,
        ..settings(RouterKind::SoftmaxTokenChoice)
    });
    let ctx = h.ctx.clone();
    h.state_mut()
        .open_dataset(routerscope::catalog::fashion_mnist_slice());
    settle(&mut h);
    assert!(h.state_mut().wait_dataset(&ctx, Duration::from_secs(600)));
    settle(&mut h);
    let a = h.state().dataset_result().expect("an analysis");
    let routers: Vec<&str> = a.runs.iter().map(|r| r.settings.router.as_str()).collect();
    assert_eq!(
        routers,
        [
            "softmax-tc",
            "sinkhorn-tc",
            "softmax-ec",
            "sinkhorn-ec",
            "sparse-ec",
            "sparse-tc"
        ]
    );
    assert!(
        a.runs
            .iter()
            .all(|r| r.layers.len() == a.runs[0].layers.len())
    );
    // The same compute: every sparse router at the main one's capacity factor.
    let cf = a.runs[0].settings.capacity_factor;
    assert!(a.runs.iter().all(|r| r.settings.capacity_factor == cf));
    assert_eq!(a.skipped.len(), 1);
    assert_eq!(a.skipped[0].settings.router, "soft");
    // Expert Choice drops differently from Token Choice: the rows are not copies.
    let drops: Vec<f64> = (a.runs.iter())
        .map(|r| r.layers[0].stats.dropped_token_rate)
        .collect();
    assert!(drops.iter().any(|&d| d != drops[0]), "{drops:?}");
    let ec = a.runs[3].settings.label();
    h.get_by_label_contains("soft left out of the comparison:");
    h.get_by_label_contains("6 routers side by side");
    assert_eq!(h.state().dataset_run(), 0);
    h.snapshot_options("dataset_routers", &snapshot_options());

    h.get_by_label(&ec).click();
    h.run_steps(3);
    assert_eq!(h.state().dataset_run(), 3);
    h.get_by_label(&format!("details: {ec}"));
    // Below the fold: scrolled to, as a user would.
    h.get_by_label("show expert 2").scroll_to_me();
    h.run_steps(3);
    h.get_by_label("show expert 2").click();
    h.run_steps(3);
    assert_eq!(h.state().dataset_expert(), Some(2));
    let atlas = &h.state().dataset_result().unwrap().runs[3].layers[0].atlas[2];
    let first = atlas.patches.first().map(|p| p.name.clone());
    if let Some(name) = first {
        h.get_all_by_label_contains(&format!("atlas patch of {name}"))
            .next()
            .expect("the selected router's atlas");
    }
}

/// Cancel stops the run between batches (its partial result is shown) while the UI keeps
/// drawing; a router change supersedes a running analysis.
#[test]
fn cancelling_a_dataset_run_keeps_the_ui_responsive() {
    let mut h = harness(Settings {
        mode: ModelMode::WhatIf,
        ..settings(RouterKind::SoftmaxTokenChoice)
    });
    let ctx = h.ctx.clone();
    // A folder of larger images (slow to decode) so the run is still going when cancelled.
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("0000.png");
    image::RgbImage::from_fn(512, 512, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 9])
    })
    .save(&first)
    .unwrap();
    for i in 1..2000 {
        std::fs::hard_link(&first, dir.path().join(format!("{i:04}.png"))).unwrap();
    }
    h.state_mut().open_dataset(dir.path().to_path_buf());
    let start = std::time::Instant::now();
    let progressed = |h: &mut Harness<'static, RouterscopeApp>| {
        while h.state().dataset_progress().is_none_or(|(d, _)| d == 0) {
            h.step();
            std::thread::sleep(Duration::from_millis(20));
            assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        }
    };
    progressed(&mut h);
    // A router change supersedes the running analysis: a new run starts from the first image.
    h.state_mut().select_router(RouterKind::SoftmaxExpertChoice);
    h.run_steps(2);
    assert!(h.state().dataset_progress().is_some_and(|(d, _)| d < 2000));
    progressed(&mut h);
    let frame = std::time::Instant::now();
    h.get_by_label("Cancel").click();
    h.run_steps(2);
    assert!(
        frame.elapsed() < Duration::from_secs(2),
        "the UI blocked for {:?}",
        frame.elapsed()
    );
    assert!(h.state_mut().wait_dataset(&ctx, Duration::from_secs(60)));
    h.run_steps(2);
    assert!(h.state().dataset_progress().is_none(), "still running");
    let a = h.state().dataset_result().expect("the partial result");
    assert!(
        a.partial && a.images > 0 && a.images < 2000,
        "{} images",
        a.images
    );
    assert_eq!(a.runs[0].settings.router, "softmax-ec");
    assert!(h.state().dataset_error().is_none());
}
