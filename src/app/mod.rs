//! The desktop viewer (eframe/egui). The UI thread only draws and reacts: decoding images,
//! opening checkpoints and running the model happen on the [`worker`] thread, whose replies wake
//! the UI. One file per panel in [`views`].

pub mod catalog;
pub mod settings;
pub mod views;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use image::DynamicImage;

use crate::figures::export::{FigurePanel, FigureSet, Format, default_stem};
use crate::figures::{ImageRouting, Palette};
use crate::model::{Classifier, ModelConfig, is_vmoe_checkpoint};
use crate::routing::{RouterFamily, RouterKind};
use settings::{LayerView, ModelMode, Settings};
use views::patch_grid::{GridStyle, patch_grid};
use worker::{Job, Reply, RunRequest, RunResult, Worker};

use crate::backend::DeviceChoice;
use crate::gpu::GpuContext;

/// Storage key of the persisted settings.
pub const SETTINGS_KEY: &str = "routerscope.settings";

/// Image extensions the viewer opens.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff"];

struct ViewImage {
    id: u64,
    path: PathBuf,
    name: String,
    image: Arc<DynamicImage>,
    texture: egui::TextureHandle,
    thumbnail: egui::TextureHandle,
}

struct CurrentModel {
    path: PathBuf,
    config: ModelConfig,
    trained: bool,
}

enum DialogResult {
    Images(Vec<PathBuf>),
    Model(PathBuf),
    Exported(Result<PathBuf, String>),
}

/// What an export needs, owned so the save dialog and rendering run off the UI thread.
pub struct ExportJob {
    pub title: String,
    pub image_name: String,
    pub image: Arc<DynamicImage>,
    pub grid: [usize; 2],
    pub has_cls: bool,
    pub palette: Palette,
    pub opacity: f32,
    pub panels: Vec<FigurePanel>,
    pub prediction: Vec<(String, f32)>,
    pub stem: String,
}

impl ExportJob {
    /// Renders `format` and writes it atomically to `path`.
    pub fn write(&self, path: &Path, format: Format, png_width: u32) -> Result<(), String> {
        let set = FigureSet {
            title: self.title.clone(),
            image_name: &self.image_name,
            image: &self.image,
            grid: self.grid,
            has_cls: self.has_cls,
            palette: self.palette,
            opacity: self.opacity,
            panels: &self.panels,
            prediction: self.prediction.clone(),
        };
        let bytes = set.render(format, png_width)?;
        crate::tensor_io::write_atomic(path, &bytes).map_err(|e| e.to_string())
    }
}

/// The viewer's state.
pub struct RouterscopeApp {
    pub settings: Settings,
    /// Show timings as "—" (snapshot tests need identical frames).
    pub hide_timings: bool,
    worker: Worker,
    images: Vec<ViewImage>,
    next_image_id: u64,
    model: Option<CurrentModel>,
    /// The model being opened and whether the user asked for it (then its router is selected).
    opening: Option<(PathBuf, bool)>,
    result: Option<Box<RunResult>>,
    /// Loaded-image indices of the batch `result` was computed on.
    result_batch: Vec<usize>,
    /// Loaded-image indices of the batch of the run in flight.
    pending_batch: Vec<usize>,
    latest_run: u64,
    run_started: Option<Instant>,
    /// Why the last requested run could not run (shown while the previous result stays).
    run_error: Option<String>,
    /// Errors from opening files, newest last.
    errors: Vec<String>,
    highlight: Option<usize>,
    dialogs: (Sender<DialogResult>, Receiver<DialogResult>),
    frame_ms: f32,
    /// Replies pending from the worker (image decodes and model opens in flight).
    in_flight: usize,
    /// The last successful action worth telling (an export's destination).
    notice: Option<String>,
    /// Width in pixels of exported PNG figures.
    pub export_width: u32,
    latest_compare: u64,
    compare_image: usize,
    /// The comparison of the shown image, when enabled: `(image index, entries)`.
    comparison: Option<(usize, Vec<worker::CompareEntry>)>,
    /// eframe's wgpu device, when it renders with wgpu and the device can run the kernels, or
    /// why there is none.
    gpu: Result<GpuContext, String>,
    /// Where the last run ran.
    device_label: String,
    /// Why the GPU is not used although the device choice asked for it.
    device_notice: Option<String>,
}

impl RouterscopeApp {
    /// Starts the worker (on the CPU) and asks it for the sample images, the user's images and
    /// the model.
    pub fn new(ctx: &egui::Context, settings: Settings) -> Self {
        Self::with_gpu(
            ctx,
            settings,
            Err("no GPU device was given to the app".into()),
        )
    }

    /// As [`new`](Self::new), computing on `gpu` when the settings' device choice allows
    /// (`Err`: why there is no GPU device, shown if the user asks for one).
    pub fn with_gpu(
        ctx: &egui::Context,
        settings: Settings,
        gpu: Result<GpuContext, String>,
    ) -> Self {
        let wake_ctx = ctx.clone();
        let worker = Worker::spawn(move || wake_ctx.request_repaint());
        let mut app = Self {
            settings,
            hide_timings: false,
            worker,
            images: Vec::new(),
            next_image_id: 0,
            model: None,
            opening: None,
            result: None,
            result_batch: Vec::new(),
            pending_batch: Vec::new(),
            latest_run: 0,
            run_started: None,
            run_error: None,
            errors: Vec::new(),
            highlight: None,
            dialogs: channel(),
            frame_ms: 0.0,
            in_flight: 0,
            notice: None,
            export_width: 2000,
            latest_compare: 0,
            compare_image: 0,
            comparison: None,
            gpu,
            device_label: cpu_label(),
            device_notice: None,
        };
        app.apply_device();
        let mut paths = catalog::sample_images();
        paths.extend(
            app.settings
                .image_paths
                .iter()
                .filter(|p| p.is_file())
                .cloned(),
        );
        app.send(Job::DecodeImages(paths));
        app.select_model_for_mode();
        app
    }

    /// The eframe entry: restores settings, shares eframe's wgpu device for compute, and opens
    /// `images` (and `model`) given on the command line.
    pub fn from_creation_context(
        cc: &eframe::CreationContext<'_>,
        images: Vec<PathBuf>,
        model: Option<PathBuf>,
        device: Option<DeviceChoice>,
    ) -> Self {
        let mut settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, SETTINGS_KEY))
            .unwrap_or_default();
        if let Some(d) = device {
            settings.device = d;
        }
        let gpu = match &cc.wgpu_render_state {
            Some(rs) => GpuContext::shared(&rs.adapter, rs.device.clone(), rs.queue.clone())
                .map_err(|e| e.to_string()),
            None => Err("the window does not render with wgpu, so there is no GPU device".into()),
        };
        let mut app = Self::with_gpu(&cc.egui_ctx, settings, gpu);
        if !images.is_empty() {
            app.open_images(images);
        }
        if let Some(m) = model {
            app.open_model(m);
        }
        app
    }

    /// Tells the worker which device to run on, per the settings' choice.
    fn apply_device(&mut self) {
        let choice = self.settings.device;
        let gpu = self.gpu.as_ref().ok().filter(|g| choice.uses(g)).cloned();
        self.device_label = match &gpu {
            Some(g) => format!("GPU: {}", g.describe()),
            None => cpu_label(),
        };
        self.device_notice = match (&self.gpu, choice) {
            (Err(why), DeviceChoice::Gpu) => Some(format!("{why}; running on the CPU")),
            _ => None,
        };
        // Not counted as in flight: the worker sends no reply.
        self.worker.send(Job::SetDevice(Box::new(gpu)));
    }

    fn send(&mut self, job: Job) {
        if !matches!(job, Job::Run(_)) {
            self.in_flight += 1;
        }
        self.worker.send(job);
    }

    /// Opens images (decoded on the worker; failures are reported, the rest are added).
    pub fn open_images(&mut self, paths: Vec<PathBuf>) {
        self.send(Job::DecodeImages(paths));
    }

    /// Opens a checkpoint (.safetensors or a vmoe `.index`); on success it becomes the what-if
    /// model with its own router selected, on failure the current model stays.
    pub fn open_model(&mut self, path: PathBuf) {
        self.opening = Some((path.clone(), true));
        self.send(Job::OpenModel(path));
    }

    /// The model the current mode asks for.
    fn select_model_for_mode(&mut self) {
        let target = match self.settings.mode {
            ModelMode::Trained => match catalog::model_for(self.settings.router) {
                Ok((p, _)) => p,
                Err(e) => {
                    self.errors.push(e);
                    return;
                }
            },
            ModelMode::WhatIf => match (&self.settings.model_path, &self.model) {
                (Some(p), _) => p.clone(),
                (None, Some(m)) => m.path.clone(),
                (None, None) => match catalog::model_for(self.settings.router) {
                    Ok((p, _)) => p,
                    Err(e) => {
                        self.errors.push(e);
                        return;
                    }
                },
            },
        };
        if self.model.as_ref().is_some_and(|m| m.path == target) {
            self.request_run();
            return;
        }
        if self.opening.as_ref().is_some_and(|(p, _)| *p == target) {
            return;
        }
        self.opening = Some((target.clone(), false));
        self.send(Job::OpenModel(target));
    }

    /// Sends a run for the current settings, model and image.
    fn request_run(&mut self) {
        let (Some(model), false) = (&self.model, self.images.is_empty()) else {
            return;
        };
        let current = self.settings.current_image.min(self.images.len() - 1);
        let (options, batch) =
            match self
                .settings
                .run_plan(&model.config, self.images.len(), current)
            {
                Ok(p) => p,
                Err(e) => {
                    self.run_error = Some(e);
                    return;
                }
            };
        self.latest_run += 1;
        self.run_started = Some(Instant::now());
        let images = batch
            .iter()
            .map(|&i| (self.images[i].id, self.images[i].image.clone()))
            .collect();
        self.pending_batch = batch;
        let model_path = model.path.clone();
        self.worker.send(Job::Run(RunRequest {
            id: self.latest_run,
            model: model_path.clone(),
            images,
            options,
        }));
        if self.settings.compare {
            self.request_compare(model_path, current);
        }
    }

    /// Asks for the shown image under every router.
    fn request_compare(&mut self, model: PathBuf, current: usize) {
        let base = self.settings.router_config();
        let entries: Vec<(PathBuf, crate::routing::RouterConfig)> = match self.settings.mode {
            ModelMode::Trained => catalog::TRAINED_ROUTERS
                .iter()
                .filter_map(|&k| {
                    let (path, _) = catalog::model_for(k).ok()?;
                    Some((path, router_like(&base, k)))
                })
                .collect(),
            ModelMode::WhatIf => RouterKind::ALL
                .iter()
                .map(|&k| (model.clone(), router_like(&base, k)))
                .collect(),
        };
        self.latest_compare += 1;
        self.in_flight += 1;
        self.worker.send(Job::Compare {
            id: self.latest_compare,
            entries,
            image: self.images[current].image.clone(),
        });
        self.compare_image = current;
    }

    /// Handles every reply that has arrived.
    pub fn poll_worker(&mut self, ctx: &egui::Context) {
        while let Some(reply) = self.worker.try_recv() {
            self.handle(ctx, reply);
        }
    }

    /// Blocks until the worker has answered everything sent so far (tests, screenshots).
    pub fn wait_idle(&mut self, ctx: &egui::Context, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.in_flight > 0 || self.run_started.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.worker.recv_timeout(left) {
                Some(r) => self.handle(ctx, r),
                None => return false,
            }
        }
        true
    }

    fn handle(&mut self, ctx: &egui::Context, reply: Reply) {
        match reply {
            Reply::Images(list) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let had = self.images.len();
                for item in list {
                    match item {
                        Ok(d) => {
                            let id = self.next_image_id;
                            self.next_image_id += 1;
                            let texture = ctx.load_texture(
                                format!("image-{id}"),
                                d.display,
                                egui::TextureOptions::NEAREST,
                            );
                            let thumbnail = ctx.load_texture(
                                format!("thumb-{id}"),
                                d.thumbnail,
                                egui::TextureOptions::LINEAR,
                            );
                            let is_sample = d.path.starts_with(catalog::assets_dir());
                            if !is_sample && !self.settings.image_paths.contains(&d.path) {
                                self.settings.image_paths.push(d.path.clone());
                            }
                            self.images.push(ViewImage {
                                id,
                                path: d.path,
                                name: d.name,
                                image: d.image,
                                texture,
                                thumbnail,
                            });
                        }
                        Err(e) => self.errors.push(format!("cannot open image: {e}")),
                    }
                }
                if self.images.len() > had {
                    if had > 0 {
                        // Show the first newly opened image.
                        self.settings.current_image = had;
                    }
                    self.request_run();
                }
            }
            Reply::ModelOpened(res) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let user = self.opening.take().is_some_and(|(_, u)| u);
                match res {
                    Ok((path, config)) => {
                        let trained = !catalog::is_random_stand_in(&path);
                        if user {
                            self.settings.mode = ModelMode::WhatIf;
                            self.settings.model_path = Some(path.clone());
                            if let Some(m) = &config.moe {
                                self.settings.router = m.router.kind;
                            }
                        }
                        if let LayerView::One(i) = self.settings.layer {
                            let layers = config.moe.as_ref().map_or(0, |m| m.layers.len());
                            if i >= layers {
                                self.settings.layer = LayerView::One(0);
                            }
                        }
                        self.model = Some(CurrentModel {
                            path,
                            config: *config,
                            trained,
                        });
                        self.run_error = None;
                        self.request_run();
                    }
                    Err(e) => self.errors.push(format!("cannot open checkpoint: {e}")),
                }
            }
            Reply::Ran(r) => {
                if r.id == self.latest_run {
                    self.run_started = None;
                    self.run_error = None;
                    self.result_batch = std::mem::take(&mut self.pending_batch);
                    self.device_label = r.device.clone();
                    if let Some(n) = &r.notice {
                        self.device_notice = Some(n.clone());
                    }
                    self.result = Some(r);
                }
            }
            Reply::Compared { id, entries } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                if id == self.latest_compare {
                    self.comparison = Some((self.compare_image, entries));
                }
            }
            Reply::RunFailed { id, error } => {
                if id == self.latest_run {
                    self.run_started = None;
                    self.run_error = Some(error);
                }
            }
        }
    }

    /// The routing view of the shown image in MoE layer `layer` of the last result.
    pub fn image_routing(&self, layer: usize) -> Option<ImageRouting> {
        let r = self.result.as_ref()?;
        let current = self.settings.current_image;
        let pos = self.result_batch.iter().position(|&i| i == current)?;
        let rec = r.output.records.get(layer)?;
        let group = rec
            .groups
            .iter()
            .find(|g| (g.first_image..g.first_image + g.num_images).contains(&pos))?;
        Some(ImageRouting::new(
            group,
            pos - group.first_image,
            r.config.seq_len(),
        ))
    }

    /// Class probabilities of the shown image in the last result.
    pub fn prediction(&self) -> Option<&[f32]> {
        let r = self.result.as_ref()?;
        let pos = self
            .result_batch
            .iter()
            .position(|&i| i == self.settings.current_image)?;
        r.output.probs.get(pos).map(|v| v.as_slice())
    }

    /// The errors shown to the user, oldest first.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Where the last run ran ("GPU: …" or "CPU (candle, …)").
    pub fn device_label(&self) -> &str {
        &self.device_label
    }

    /// Why the GPU is not used although the device choice asked for it.
    pub fn device_notice(&self) -> Option<&str> {
        self.device_notice.as_deref()
    }

    /// Changes the compute device choice (as the controls do).
    pub fn set_device(&mut self, choice: DeviceChoice) {
        self.settings.device = choice;
        self.apply_device();
        self.request_run();
    }

    /// Why the current routing could not run, if it could not.
    pub fn run_error(&self) -> Option<&str> {
        self.run_error.as_deref()
    }

    pub fn model_path(&self) -> Option<&Path> {
        self.model.as_ref().map(|m| m.path.as_path())
    }

    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    /// Shows image `i` (clamped).
    pub fn show_image(&mut self, i: usize) {
        if self.images.is_empty() {
            return;
        }
        let i = i.min(self.images.len() - 1);
        if i != self.settings.current_image {
            self.settings.current_image = i;
            self.request_run();
        }
    }

    /// Selects a router as the controls do.
    pub fn select_router(&mut self, kind: RouterKind) {
        if self.settings.mode == ModelMode::Trained && catalog::builtin_model(kind).is_none() {
            self.run_error = Some(format!(
                "no built-in model was trained with {}; switch to what-if to route with it",
                kind.display_name()
            ));
            return;
        }
        self.settings.router = kind;
        self.select_model_for_mode();
    }

    fn handle_input(&mut self, ctx: &egui::Context) {
        let (dropped, keys) = ctx.input(|i| {
            let keys: Vec<egui::Key> = i
                .events
                .iter()
                .filter_map(|e| match e {
                    egui::Event::Key {
                        key,
                        pressed: true,
                        modifiers,
                        ..
                    } if !modifiers.ctrl && !modifiers.command => Some(*key),
                    _ => None,
                })
                .collect();
            (i.raw.dropped_files.clone(), keys)
        });
        if ctx.egui_wants_keyboard_input() {
            // A text field has focus: keys are typing.
        } else {
            for key in keys {
                match key {
                    egui::Key::ArrowRight => self.show_image(self.settings.current_image + 1),
                    egui::Key::ArrowLeft => {
                        self.show_image(self.settings.current_image.saturating_sub(1))
                    }
                    egui::Key::W => {
                        self.settings.mode = match self.settings.mode {
                            ModelMode::Trained => ModelMode::WhatIf,
                            ModelMode::WhatIf => ModelMode::Trained,
                        };
                        self.select_model_for_mode();
                    }
                    k => {
                        if let Some(i) = (0..RouterKind::ALL.len())
                            .find(|&i| views::controls::router_key(i) == k)
                        {
                            self.select_router(RouterKind::ALL[i]);
                        }
                    }
                }
            }
        }
        let mut images = Vec::new();
        for f in dropped {
            let path = f.path().to_path_buf();
            if path.as_os_str().is_empty() {
                continue;
            }
            if is_checkpoint(&path) {
                self.open_model(path);
            } else {
                images.push(path);
            }
        }
        if !images.is_empty() {
            self.open_images(images);
        }
        while let Ok(d) = self.dialogs.1.try_recv() {
            match d {
                DialogResult::Images(p) => self.open_images(p),
                DialogResult::Model(p) => self.open_model(p),
                DialogResult::Exported(Ok(p)) => {
                    self.notice = Some(format!("saved {}", p.display()))
                }
                DialogResult::Exported(Err(e)) => self.errors.push(format!("export failed: {e}")),
            }
        }
    }

    /// The figure of what is shown now: the shown image in the selected MoE layer(s).
    pub fn export_job(&self) -> Option<ExportJob> {
        let model = self.model.as_ref()?;
        let cfg = &model.config;
        let moe = cfg.moe.as_ref()?;
        let img = self.images.get(self.settings.current_image)?;
        let layers: Vec<usize> = match self.settings.layer {
            LayerView::One(i) => vec![i.min(moe.layers.len().saturating_sub(1))],
            LayerView::All => (0..moe.layers.len()).collect(),
        };
        let compared = self
            .comparison
            .as_ref()
            .filter(|(i, _)| self.settings.compare && *i == self.settings.current_image);
        let panels: Vec<FigurePanel> = match compared {
            Some((_, entries)) => entries
                .iter()
                .filter_map(|(router, res)| {
                    let (c, out) = res.as_ref().ok()?;
                    let rec = out.records.get(layers[0])?;
                    Some(FigurePanel {
                        title: format!("{} · block {}", router.kind.display_name(), rec.block),
                        block: rec.block,
                        routing: ImageRouting::new(&rec.groups[0], 0, c.seq_len()),
                    })
                })
                .collect(),
            None => layers
                .iter()
                .filter_map(|&l| {
                    self.image_routing(l).map(|routing| FigurePanel {
                        title: format!("block {}", moe.layers[l]),
                        block: moe.layers[l],
                        routing,
                    })
                })
                .collect(),
        };
        if panels.is_empty() {
            return None;
        }
        let router = self
            .result
            .as_ref()
            .and_then(|r| r.output.options.routers.first().cloned())
            .unwrap_or_else(|| self.settings.router_config());
        let model_name = model.path.display().to_string();
        let mut prediction: Vec<(String, f32)> = self
            .prediction()
            .map(|p| {
                p.iter()
                    .enumerate()
                    .map(|(c, &v)| (cfg.class_name(c), v))
                    .collect()
            })
            .unwrap_or_default();
        prediction.sort_by(|a, b| b.1.total_cmp(&a.1));
        prediction.truncate(5);
        let model_stem = model
            .path
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        Some(ExportJob {
            title: format!(
                "{} · {} · {}",
                img.name,
                model_stem,
                router.kind.display_name()
            ),
            image_name: img.name.clone(),
            image: img.image.clone(),
            grid: cfg.grid(),
            has_cls: cfg.classifier == Classifier::Token,
            palette: self.settings.palette,
            opacity: self.settings.opacity,
            panels,
            prediction,
            stem: default_stem(&img.name, &model_name, &router),
        })
    }

    fn export(&mut self, ctx: &egui::Context, format: Format) {
        let Some(job) = self.export_job() else {
            self.errors
                .push("nothing to export yet: open an image and a model".into());
            return;
        };
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        let width = self.export_width;
        std::thread::spawn(move || {
            let ext = format.extension();
            let dialog = rfd::AsyncFileDialog::new()
                .set_file_name(format!("{}.{ext}", job.stem))
                .add_filter(ext, &[ext]);
            if let Some(file) = pollster::block_on(dialog.save_file()) {
                let path = file.path().to_path_buf();
                let result = job.write(&path, format, width).map(|()| path);
                let _ = tx.send(DialogResult::Exported(result));
                ctx.request_repaint();
            }
        });
    }

    fn pick_images(&self, ctx: &egui::Context) {
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let dialog = rfd::AsyncFileDialog::new().add_filter("images", &IMAGE_EXTENSIONS);
            if let Some(files) = pollster::block_on(dialog.pick_files()) {
                let _ = tx.send(DialogResult::Images(
                    files.iter().map(|f| f.path().to_path_buf()).collect(),
                ));
                ctx.request_repaint();
            }
        });
    }

    fn pick_model(&self, ctx: &egui::Context) {
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let dialog =
                rfd::AsyncFileDialog::new().add_filter("checkpoints", &["safetensors", "index"]);
            if let Some(file) = pollster::block_on(dialog.pick_file()) {
                let _ = tx.send(DialogResult::Model(file.path().to_path_buf()));
                ctx.request_repaint();
            }
        });
    }

    /// Draws the whole viewer into `ui` (the eframe entry and the UI tests call this).
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let start = Instant::now();
        let ctx = ui.ctx().clone();
        self.poll_worker(&ctx);
        self.handle_input(&ctx);

        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::bottom("gallery").show(ui, |ui| self.gallery(ui));
        egui::Panel::left("controls")
            .default_size(290.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    let group = match self.settings.group {
                        settings::GroupMode::Single => 1,
                        settings::GroupMode::AllImages => self.images.len(),
                        settings::GroupMode::AsTrained => self
                            .model
                            .as_ref()
                            .and_then(|m| m.config.moe.as_ref())
                            .map_or(1, |m| m.group_images),
                    };
                    let mode_before = self.settings.mode;
                    let router_before = self.settings.router;
                    let change = views::controls::controls(
                        ui,
                        &mut self.settings,
                        self.model.as_ref().map(|m| &m.config),
                        group,
                    );
                    if change.device {
                        self.apply_device();
                        self.request_run();
                    }
                    if self.settings.mode != mode_before || self.settings.router != router_before {
                        if self.settings.mode == ModelMode::WhatIf
                            && mode_before == ModelMode::Trained
                        {
                            self.settings.model_path = self.model.as_ref().map(|m| m.path.clone());
                        }
                        self.select_model_for_mode();
                    } else if change.rerun {
                        self.request_run();
                    }
                });
            });
        egui::Panel::right("details")
            .default_size(330.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.details(ui));
            });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::both().show(ui, |ui| self.central(ui));
        });
        self.frame_ms = start.elapsed().as_secs_f32() * 1e3;
        if self.run_started.is_some() || self.in_flight > 0 {
            // Keep the spinner turning while the worker computes.
            ctx.request_repaint_after(Duration::from_millis(50));
        }
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if ui.button("Open images…").on_hover_text("or drop image files on the window").clicked() {
                self.pick_images(ui.ctx());
            }
            if ui
                .button("Open checkpoint…")
                .on_hover_text(".safetensors (routerscope) or a vmoe checkpoint's .index file; or drop it on the window")
                .clicked()
            {
                self.pick_model(ui.ctx());
            }
            ui.menu_button("Export…", |ui| {
                ui.add(egui::Slider::new(&mut self.export_width, 400..=6000).text("PNG width (px)"));
                for (format, label) in [
                    (Format::Png, "figure as PNG…"),
                    (Format::Svg, "figure as SVG (vector)…"),
                    (Format::Csv, "data as CSV (one row per token)…"),
                    (Format::Json, "data as JSON (tokens, experts, Soft MoE matrices)…"),
                ] {
                    if ui.button(label).clicked() {
                        self.export(ui.ctx(), format);
                        ui.close();
                    }
                }
            });
            ui.separator();
            match &self.model {
                Some(m) => {
                    let name = m.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                    ui.label(format!("model: {name}"));
                    if !m.trained {
                        ui.colored_label(egui::Color32::from_rgb(230, 160, 60), "(untrained random weights)");
                    }
                    let mode = match self.settings.mode {
                        ModelMode::Trained => "trained for this router",
                        ModelMode::WhatIf => "what-if: routing swapped on these weights",
                    };
                    ui.label(format!("· {mode}"));
                }
                None => {
                    ui.label("no model loaded");
                }
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                let ms = |v: f64| if self.hide_timings { "—".to_string() } else { format!("{v:.1}") };
                ui.label(format!("frame {} ms", ms(self.frame_ms as f64)));
                ui.separator();
                ui.label(format!("device: {}", self.device_label));
                if let Some(n) = &self.device_notice {
                    ui.colored_label(egui::Color32::from_rgb(230, 160, 60), "GPU not used").on_hover_text(n);
                }
                ui.separator();
                if let Some(r) = &self.result {
                    ui.label(format!(
                        "last update {} ms{}",
                        ms(r.millis),
                        if r.what_if { " (what-if from the first changed MoE layer)" } else { "" }
                    ));
                }
                if self.run_started.is_some_and(|t| t.elapsed() > Duration::from_millis(100)) || self.in_flight > 0 {
                    ui.add(egui::Spinner::new());
                }
            });
        });
    }

    fn gallery(&mut self, ui: &mut egui::Ui) {
        let mut clicked = None;
        egui::ScrollArea::horizontal().show(ui, |ui| {
            ui.horizontal(|ui| {
                for (i, img) in self.images.iter().enumerate() {
                    let selected = i == self.settings.current_image;
                    let resp = ui
                        .add(
                            egui::Image::new((img.thumbnail.id(), egui::vec2(48.0, 48.0)))
                                .sense(egui::Sense::click())
                                .bg_fill(if selected {
                                    ui.visuals().selection.bg_fill
                                } else {
                                    egui::Color32::TRANSPARENT
                                }),
                        )
                        .on_hover_text(img.path.display().to_string());
                    if selected {
                        ui.painter().rect_stroke(
                            resp.rect.expand(2.0),
                            2.0,
                            egui::Stroke::new(2.0, ui.visuals().selection.stroke.color),
                            egui::StrokeKind::Outside,
                        );
                    }
                    if resp.clicked() {
                        clicked = Some(i);
                    }
                }
            });
        });
        if let Some(i) = clicked {
            self.show_image(i);
        }
    }

    fn central(&mut self, ui: &mut egui::Ui) {
        for e in self.errors.iter().rev().take(3) {
            ui.colored_label(egui::Color32::from_rgb(240, 90, 80), format!("Error: {e}"));
        }
        if !self.errors.is_empty() && ui.small_button("dismiss errors").clicked() {
            self.errors.clear();
        }
        if let Some(n) = &self.notice {
            ui.colored_label(egui::Color32::from_rgb(120, 200, 120), n);
        }
        if let Some(e) = &self.run_error {
            ui.colored_label(
                egui::Color32::from_rgb(240, 160, 60),
                format!("unavailable: {e} (showing the previous result)"),
            );
        }
        let Some(model) = &self.model else {
            ui.label("Opening the model…");
            return;
        };
        let Some(img) = self.images.get(self.settings.current_image) else {
            ui.label("Open an image to see its routing.");
            return;
        };
        let cfg = &model.config;
        let Some(moe) = &cfg.moe else {
            ui.label(format!(
                "{}: this model has no MoE layers (the dense baseline); nothing is routed.",
                img.name
            ));
            return;
        };
        let has_cls = cfg.classifier == Classifier::Token;
        let layers: Vec<usize> = match self.settings.layer {
            LayerView::One(i) => vec![i.min(moe.layers.len().saturating_sub(1))],
            LayerView::All => (0..moe.layers.len()).collect(),
        };
        let views: Vec<(usize, ImageRouting)> = layers
            .iter()
            .filter_map(|&l| self.image_routing(l).map(|r| (l, r)))
            .collect();
        ui.horizontal(|ui| {
            ui.heading(&img.name);
            if let Some(v) = views.first() {
                ui.label(format!(
                    "· {} · {} experts · {} tokens per image",
                    v.1.router.display_name(),
                    v.1.num_experts,
                    v.1.tokens.len()
                ));
            }
        });
        if views.is_empty() {
            ui.label("Computing…");
            return;
        }
        let avail = ui.available_width();
        let side = if views.len() == 1 {
            (avail - 10.0).clamp(200.0, 460.0)
        } else {
            ((avail - 20.0) / views.len() as f32 - 10.0).clamp(140.0, 360.0)
        };
        let style = GridStyle {
            opacity: self.settings.opacity,
            palette: self.settings.palette,
            show_second_choices: self.settings.show_second_choices,
            highlight: self.highlight,
        };
        if self.settings.compare {
            self.comparison_view(ui, img, has_cls, &style, layers[0]);
        }
        ui.horizontal_top(|ui| {
            for (l, v) in &views {
                ui.vertical(|ui| {
                    ui.label(format!("MoE block {}", moe.layers[*l]));
                    patch_grid(ui, &img.texture, v, cfg.grid(), has_cls, &style, side);
                });
            }
        });
        if let Some(j) = legend(
            ui,
            moe.num_experts,
            self.settings.palette,
            self.highlight,
            views[0].1.router.family(),
        ) {
            self.highlight = if self.highlight == Some(j) {
                None
            } else {
                Some(j)
            };
        }
        if let Some(soft) = &views[0].1.soft {
            ui.separator();
            views::soft_slots::slot_heatmaps(
                ui,
                soft,
                moe.num_experts,
                cfg.grid(),
                has_cls,
                self.settings.palette,
                avail.min(520.0),
            );
            let ent = views::soft_slots::combine_entropy(soft);
            let mean = ent.iter().sum::<f32>() / ent.len().max(1) as f32;
            ui.label(format!(
                "combine weights per patch: normalised entropy over the {} slots (light: reads from few slots, dark: from many; mean {mean:.2})",
                soft.combine.first().map_or(0, |r| r.len())
            ));
            views::soft_slots::entropy_map(ui, &ent, cfg.grid(), has_cls, 180.0);
        }
    }

    /// The shown image under every router, MoE layer `layer`.
    fn comparison_view(
        &self,
        ui: &mut egui::Ui,
        img: &ViewImage,
        has_cls: bool,
        style: &GridStyle,
        layer: usize,
    ) {
        let Some((image, entries)) = self
            .comparison
            .as_ref()
            .filter(|(i, _)| *i == self.settings.current_image)
        else {
            ui.label("Comparing routers…");
            return;
        };
        debug_assert_eq!(*image, self.settings.current_image);
        ui.label(format!(
            "Router comparison, MoE layer {} (each panel routed alone):",
            layer + 1
        ));
        let cols = ((ui.available_width() / 210.0).floor() as usize).max(1);
        egui::Grid::new("comparison")
            .num_columns(cols)
            .show(ui, |ui| {
                for (n, (router, res)) in entries.iter().enumerate() {
                    ui.vertical(|ui| {
                        ui.set_width(200.0);
                        ui.strong(router.kind.display_name());
                        match res {
                            Ok((cfg, out)) => match out.records.get(layer) {
                                Some(rec) => {
                                    let r = ImageRouting::new(&rec.groups[0], 0, cfg.seq_len());
                                    patch_grid(
                                        ui,
                                        &img.texture,
                                        &r,
                                        cfg.grid(),
                                        has_cls,
                                        style,
                                        190.0,
                                    );
                                    ui.label(format!(
                                        "dropped {} of {}",
                                        r.dropped_count(),
                                        r.tokens.len()
                                    ));
                                }
                                None => {
                                    ui.label("no such MoE layer");
                                }
                            },
                            Err(e) => {
                                ui.colored_label(
                                    egui::Color32::from_rgb(240, 160, 60),
                                    format!("unavailable: {e}"),
                                );
                            }
                        }
                    });
                    if n % cols == cols - 1 {
                        ui.end_row();
                    }
                }
            });
        ui.separator();
    }

    fn details(&mut self, ui: &mut egui::Ui) {
        ui.heading("Prediction");
        let cfg = self.model.as_ref().map(|m| m.config.clone());
        match (self.prediction(), &cfg) {
            (Some(p), Some(cfg)) => views::prediction::prediction(ui, p, |c| cfg.class_name(c)),
            _ => {
                ui.label("—");
            }
        }
        ui.separator();
        ui.heading("Expert load");
        let layer = match self.settings.layer {
            LayerView::One(i) => i,
            LayerView::All => 0,
        };
        if let Some(r) = self.image_routing(layer) {
            if let Some(j) = views::load_plot::load_plot(ui, &r, self.settings.palette, 170.0) {
                self.highlight = if self.highlight == Some(j) {
                    None
                } else {
                    Some(j)
                };
            }
            if let Some(h) = self.highlight {
                ui.label(format!("highlighting expert {h} (click again to clear)"));
            }
            if r.router.family() == RouterFamily::Soft {
                ui.label(
                    "Soft MoE drops nothing: every token reaches every slot with some weight.",
                );
            }
        }
    }
}

/// The expert legend; returns the clicked expert.
fn legend(
    ui: &mut egui::Ui,
    e: usize,
    palette: Palette,
    highlight: Option<usize>,
    family: RouterFamily,
) -> Option<usize> {
    let mut clicked = None;
    ui.horizontal_wrapped(|ui| {
        ui.label("experts:");
        for j in 0..e {
            views::swatch(ui, palette.expert(j));
            let resp = ui
                .selectable_label(highlight == Some(j), format!("{j}"))
                .on_hover_text("click to highlight this expert's tokens");
            if resp.clicked() {
                clicked = Some(j);
            }
        }
        if family != RouterFamily::Soft {
            views::dropped_swatch(ui);
            ui.colored_label(
                views::color(crate::figures::DROPPED, 1.0),
                "dropped / picked by no expert",
            );
        }
        match family {
            RouterFamily::TokenChoice => {
                ui.label("· inner square: 2nd choice");
            }
            RouterFamily::ExpertChoice => {
                ui.label("· stripes ×n: picked by n experts");
            }
            RouterFamily::Soft => {
                ui.label("· colour: expert with the largest combine weight");
            }
        }
    });
    clicked
}

/// `base`'s k, capacity and solver settings for router `kind`.
fn router_like(
    base: &crate::routing::RouterConfig,
    kind: RouterKind,
) -> crate::routing::RouterConfig {
    let mut r = crate::routing::RouterConfig::new(kind);
    r.k = base.k;
    r.capacity = match kind {
        RouterKind::SoftMoe => crate::routing::CapacitySpec::Slots(1),
        _ => match base.capacity {
            crate::routing::CapacitySpec::Slots(_) => crate::routing::CapacitySpec::Factor(1.0),
            c => c,
        },
    };
    r.rounding = base.rounding;
    r.multiple_of = base.multiple_of;
    r.batch_priority = base.batch_priority;
    r.max_iterations = base.max_iterations;
    r
}

fn is_checkpoint(path: &Path) -> bool {
    is_vmoe_checkpoint(path) || path.extension().is_some_and(|e| e == "safetensors")
}

impl eframe::App for RouterscopeApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
    }
}

/// Opens the viewer window.
pub fn run_app(
    images: Vec<PathBuf>,
    model: Option<PathBuf>,
    device: Option<DeviceChoice>,
) -> anyhow::Result<()> {
    let mut options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1400.0, 860.0])
            .with_title("routerscope")
            .with_drag_and_drop(true),
        ..Default::default()
    };
    // Ask for the adapter's own limits: eframe's defaults on wgpu's GL backend (WebGL2 limits)
    // allow no compute workgroups, and the model computes on this device.
    let mut setup = eframe::egui_wgpu::WgpuSetupCreateNew::without_display_handle();
    setup.device_descriptor = std::sync::Arc::new(|a: &eframe::egui_wgpu::wgpu::Adapter| {
        crate::gpu::device_descriptor(a)
    });
    options.wgpu_options.wgpu_setup = eframe::egui_wgpu::WgpuSetup::CreateNew(setup);
    eframe::run_native(
        "routerscope",
        options,
        Box::new(move |cc| {
            Ok(Box::new(RouterscopeApp::from_creation_context(
                cc, images, model, device,
            )))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}

fn cpu_label() -> String {
    format!(
        "CPU (candle, {} threads)",
        candle_core::utils::get_num_threads()
    )
}
