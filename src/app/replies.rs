//! Handling the worker's replies: decoded images become textures, opened checkpoints become the
//! current model, finished runs and comparisons replace the shown ones (stale ones are dropped).

use std::time::{Duration, Instant};

use crate::app::settings::{GroupMode, LayerView, ModelMode};
use crate::app::worker::{DecodedImage, OpenedModel, Reply};
use crate::app::{CurrentModel, RouterscopeApp, ViewImage};
use crate::catalog;
use crate::routing::CapacitySpec;

impl RouterscopeApp {
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

    /// Blocks until the running dataset analysis has finished (tests, screenshots).
    pub fn wait_dataset(&mut self, ctx: &egui::Context, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.dataset.running.is_some() {
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

    pub(super) fn handle(&mut self, ctx: &egui::Context, reply: Reply) {
        match reply {
            Reply::Images(list) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.add_images(ctx, list);
            }
            Reply::ModelOpened(res) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let opening = self.opening.take();
                let user = opening.as_ref().is_some_and(|(_, u)| *u);
                match res {
                    Ok(opened) => self.model_opened(ctx, *opened, user),
                    Err(e) => {
                        let what = match &opening {
                            Some((p, _)) if crate::trace::is_trace_file(p) => "routing trace",
                            _ => "checkpoint",
                        };
                        self.errors.push(format!("cannot open {what}: {e}"));
                    }
                }
            }
            Reply::Ran(r) => {
                if r.id == self.latest_run {
                    self.run_started = None;
                    self.run_progress = None;
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
            Reply::RunProgress { id, done, total } => {
                if id == self.latest_run {
                    self.run_progress = Some((done, total));
                }
            }
            Reply::RunSuperseded { .. } => {}
            Reply::AnalysisProgress { id, done, total } => self.dataset_progressed(id, done, total),
            Reply::Analyzed { id, result } => self.dataset_finished(id, result),
            Reply::RunFailed { id, error } => {
                if id == self.latest_run {
                    self.run_started = None;
                    self.run_error = Some(error);
                }
            }
        }
    }

    /// Adds decoded images to the gallery (errors are reported) and shows the first new one.
    fn add_images(&mut self, ctx: &egui::Context, list: Vec<Result<DecodedImage, String>>) {
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
                    let is_sample =
                        d.path.starts_with(catalog::assets_dir()) || d.trace_index.is_some();
                    if let Some((_, token)) =
                        self.dataset.pending_mark.take_if(|(p, _)| *p == d.path)
                    {
                        self.marked = Some((id, token));
                    }
                    if !is_sample
                        && d.path.is_file()
                        && !self.settings.image_paths.contains(&d.path)
                    {
                        self.settings.image_paths.push(d.path.clone());
                    }
                    self.images.push(ViewImage {
                        id,
                        path: d.path,
                        name: d.name,
                        image: d.image,
                        texture,
                        thumbnail,
                        trace_index: d.trace_index,
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
            self.select_model_for_mode();
        }
    }

    /// A checkpoint or trace the worker opened becomes the current model. A trace brings its
    /// own images: they replace the gallery, and its logged router is selected.
    fn model_opened(&mut self, ctx: &egui::Context, opened: OpenedModel, user: bool) {
        let OpenedModel {
            path,
            config,
            trace,
            trace_images,
        } = opened;
        let trained = !catalog::is_random_stand_in(&path);
        if user || trace.is_some() {
            self.settings.mode = ModelMode::WhatIf;
            self.settings.model_path = Some(path.clone());
            if let Some(m) = &config.moe {
                self.settings.router = m.router.kind;
            }
        }
        let was_photo = self.model.as_ref().map(|m| m.config.is_feature_model());
        if let Some(t) = &trace {
            self.settings.k = t.own.k;
            self.settings.capacity_factor = t.own_capacity_factor;
            self.settings.group = GroupMode::AsTrained;
        } else if !user
            && (was_photo != Some(config.is_feature_model()) || config.is_feature_model())
        {
            // Switching between the Fashion-MNIST models and the photo models, or between the
            // distilled photo models (trained mode): start from the new checkpoint's own k and
            // capacity (each photo router was trained at its own).
            if let Some(r) = config.moe.as_ref().map(|m| &m.router)
                && (was_photo.is_some() || config.is_feature_model())
            {
                self.settings.k = r.k;
                if let CapacitySpec::Factor(cf) = r.capacity {
                    self.settings.capacity_factor = cf;
                }
            }
        }
        if let LayerView::One(i) = self.settings.layer {
            let layers = config.moe.as_ref().map_or(0, |m| m.layers.len());
            if i >= layers {
                self.settings.layer = LayerView::One(0);
            }
        }
        let is_trace = trace.is_some();
        self.model = Some(CurrentModel {
            path,
            config: *config,
            trained,
            trace,
        });
        self.run_error = None;
        if is_trace {
            self.images.clear();
            self.result = None;
            self.comparison = None;
            self.result_batch.clear();
            self.settings.current_image = 0;
            self.add_images(ctx, trace_images);
            // A trace whose images all failed to decode has nothing to show.
            if self.images.is_empty() {
                self.run_error = Some("the trace's images could not be shown".into());
            }
            return;
        }
        self.request_run();
    }
}
