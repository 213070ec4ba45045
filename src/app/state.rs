//! The viewer's state changes: start-up, device choice, opening files, run requests, and what
//! the panels read back (the routing and prediction of the shown image).

use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::time::Instant;

use crate::app::settings::{ModelMode, Settings};
use crate::app::worker::{Job, RunRequest, Worker};
use crate::app::{RouterscopeApp, SETTINGS_KEY};
use crate::backend::DeviceChoice;
use crate::catalog::{self, ImageKind};
use crate::figures::ImageRouting;
use crate::gpu::GpuContext;
use crate::routing::RouterKind;

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
            run_progress: None,
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
            dataset: Default::default(),
            timeline: Default::default(),
            marked: None,
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
    pub(super) fn apply_device(&mut self) {
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

    pub(super) fn send(&mut self, job: Job) {
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
    pub(super) fn select_model_for_mode(&mut self) {
        let target = match self.settings.mode {
            // The router's own distilled photo model, else the moefied one as a what-if.
            ModelMode::Trained if self.shown_kind() == ImageKind::Photo => {
                catalog::photo_model_for(self.settings.router).unwrap_or_else(catalog::photo_model)
            }
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
    pub(super) fn request_run(&mut self) {
        let (Some(model), false) = (&self.model, self.images.is_empty()) else {
            return;
        };
        let current = self.settings.current_image.min(self.images.len() - 1);
        let (mut options, batch) =
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
        options.routers = options
            .routers
            .into_iter()
            .map(|r| self.routed_as_logged(r))
            .collect();
        self.latest_run += 1;
        self.run_started = Some(Instant::now());
        let images = batch
            .iter()
            .map(|&i| (self.images[i].id, self.images[i].image.clone()))
            .collect();
        let trace_ids = batch.iter().map(|&i| self.images[i].trace_index).collect();
        self.pending_batch = batch;
        let model_path = self
            .model
            .as_ref()
            .map(|m| m.path.clone())
            .unwrap_or_default();
        self.worker.send(Job::Run(RunRequest {
            id: self.latest_run,
            model: model_path.clone(),
            images,
            trace_ids,
            options,
        }));
        if self.settings.compare {
            self.request_compare(model_path, current);
        }
    }

    /// Asks for the shown image under every router.
    pub(super) fn request_compare(&mut self, model: PathBuf, current: usize) {
        let base = self.settings.router_config();
        let entries: Vec<(PathBuf, crate::routing::RouterConfig)> = match self.settings.mode {
            // Each router under its own distilled photo model (the moefied one where none is).
            ModelMode::Trained if self.shown_kind() == ImageKind::Photo => RouterKind::ALL
                .iter()
                .map(|&k| {
                    let path = catalog::photo_model_for(k).unwrap_or_else(catalog::photo_model);
                    (path, router_like(&base, k))
                })
                .collect(),
            ModelMode::Trained => catalog::TRAINED_ROUTERS
                .iter()
                .filter_map(|&k| {
                    let (path, _) = catalog::model_for(k).ok()?;
                    Some((path, router_like(&base, k)))
                })
                .collect(),
            ModelMode::WhatIf => RouterKind::ALL
                .iter()
                .map(|&k| (model.clone(), self.routed_as_logged(router_like(&base, k))))
                .collect(),
        };
        self.latest_compare += 1;
        self.in_flight += 1;
        self.worker.send(Job::Compare {
            id: self.latest_compare,
            entries,
            image: self.images[current].image.clone(),
            trace_index: self.images[current].trace_index,
        });
        self.compare_image = current;
    }

    /// `r`, or for a trace the logged router itself when `r` asks for its kind, k and the
    /// capacity it amounts to: the views then show the logged routing, not a what-if.
    pub(super) fn routed_as_logged(
        &self,
        r: crate::routing::RouterConfig,
    ) -> crate::routing::RouterConfig {
        match self.model.as_ref().and_then(|m| m.trace.as_ref()) {
            Some(t) => t.routed_as_logged(r),
            None => r,
        }
    }

    /// The trace the current "model" is, if it is one.
    pub fn trace_summary(&self) -> Option<&crate::app::runner::TraceSummary> {
        self.model.as_ref().and_then(|m| m.trace.as_ref())
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

    /// For a feature model: the last result's mean patch cosine against all experts.
    pub fn fidelity(&self) -> Option<f64> {
        self.result.as_ref().and_then(|r| r.fidelity)
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

    /// Which built-in models the shown image (or, in the Dataset view, the open dataset) runs
    /// under in trained mode (Fashion-MNIST before any image is loaded).
    pub fn shown_kind(&self) -> ImageKind {
        if self.dataset.shown
            && self.model.as_ref().is_none_or(|m| m.trace.is_none())
            && let Some(kind) = self.dataset.kind
        {
            return self.settings.family.for_dataset(kind);
        }
        match self.images.get(self.settings.current_image) {
            Some(img) => self.settings.family.for_image(&img.image),
            None => ImageKind::FashionMnist,
        }
    }

    /// Shows image `i` (clamped); in trained mode a photo after a Fashion-MNIST image (or the
    /// reverse) switches models.
    pub fn show_image(&mut self, i: usize) {
        if self.images.is_empty() {
            return;
        }
        let i = i.min(self.images.len() - 1);
        if i != self.settings.current_image {
            self.settings.current_image = i;
            self.select_model_for_mode();
        }
    }

    /// Selects a router as the controls do.
    pub fn select_router(&mut self, kind: RouterKind) {
        if self.settings.mode == ModelMode::Trained
            && self.shown_kind() == ImageKind::FashionMnist
            && catalog::builtin_model(kind).is_none()
        {
            self.run_error = Some(format!(
                "no built-in model was trained with {}; switch to what-if to route with it",
                kind.display_name()
            ));
            return;
        }
        self.settings.router = kind;
        self.select_model_for_mode();
    }
}

/// `base`'s k, capacity and solver settings for router `kind`.
pub(super) fn router_like(
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

fn cpu_label() -> String {
    format!(
        "CPU (candle, {} threads)",
        candle_core::utils::get_num_threads()
    )
}
