//! The Dataset view's state: which dataset, the analysis running on the worker (progress,
//! cancel, superseded when the model or routing changes) and the last result, and opening an
//! atlas patch's image in the image view.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::analysis::AnalyzeOptions;
use crate::app::settings::GroupMode;
use crate::app::worker::{AnalyzeRequest, DatasetResult, Job};
use crate::app::{DialogResult, RouterscopeApp};
use crate::model::RunOptions;

/// Patches per expert in the app's atlas.
pub const APP_ATLAS_SIZE: usize = 12;

/// What an analysis depends on: model, data and routing (the main router first, then the
/// compared ones when routers are shown side by side).
pub(super) type DatasetKey = (PathBuf, PathBuf, Vec<RunOptions>);

pub(super) struct Running {
    pub id: u64,
    pub key: DatasetKey,
    pub cancel: Arc<AtomicBool>,
    pub done: usize,
    pub total: usize,
    pub started: Instant,
}

/// The Dataset view's state.
#[derive(Default)]
pub struct DatasetView {
    /// The central panel shows the Dataset view (else the image view).
    pub shown: bool,
    pub(super) data: Option<PathBuf>,
    /// Which built-in models the open dataset runs under by the rule (trained mode).
    pub(super) kind: Option<crate::catalog::ImageKind>,
    pub(super) running: Option<Running>,
    pub(super) latest: u64,
    pub(super) result: Option<Box<DatasetResult>>,
    pub(super) result_key: Option<DatasetKey>,
    /// Cancelled by the user: not restarted until the key changes or the user asks.
    pub(super) paused_key: Option<DatasetKey>,
    pub(super) error: Option<String>,
    pub(super) layer: usize,
    /// The run (router) whose details are shown, when routers are side by side.
    pub(super) run: usize,
    pub(super) expert: Option<usize>,
    /// Atlas textures of the shown result, by (run, layer, expert).
    pub(super) textures: HashMap<(usize, usize, usize), Vec<Option<egui::TextureHandle>>>,
    /// The token to mark on the dataset image being opened.
    pub(super) pending_mark: Option<(PathBuf, usize)>,
}

impl RouterscopeApp {
    /// Shows the Dataset view on `data` (a folder of images or a Fashion-MNIST IDX directory)
    /// and starts its analysis.
    pub fn open_dataset(&mut self, data: PathBuf) {
        let before = self.shown_kind();
        self.dataset.kind = Some(crate::catalog::dataset_kind(&data));
        self.dataset.data = Some(data);
        self.dataset.paused_key = None;
        self.dataset.error = None;
        self.switch_dataset_view(true, before);
    }

    /// Shows the Dataset view (or the image view); in trained mode the view's data picks the
    /// built-in models, as an image does.
    pub fn show_dataset_view(&mut self, shown: bool) {
        if self.dataset.shown == shown && !shown {
            return;
        }
        let before = self.shown_kind();
        self.switch_dataset_view(shown, before);
    }

    /// Shows or hides the Dataset view, given the kind of data shown before the change.
    fn switch_dataset_view(&mut self, shown: bool, before: crate::catalog::ImageKind) {
        self.dataset.shown = shown;
        // Only a change of kind changes the model; the same model keeps its image run as it is.
        if self.settings.mode == crate::app::settings::ModelMode::Trained
            && (self.shown_kind() != before || self.model.is_none())
        {
            self.select_model_for_mode();
        }
        self.maintain_dataset();
    }

    /// The kind of data the open dataset is, by the built-in models' rule.
    pub fn dataset_kind(&self) -> Option<crate::catalog::ImageKind> {
        self.dataset.kind
    }

    /// Whether an analysis is running, and its progress `(done, total)`.
    pub fn dataset_progress(&self) -> Option<(usize, usize)> {
        self.dataset.running.as_ref().map(|r| (r.done, r.total))
    }

    /// The shown analysis, if any.
    pub fn dataset_result(&self) -> Option<&crate::analysis::Analysis> {
        self.dataset.result.as_ref().map(|r| &r.analysis)
    }

    /// Where the shown analysis ran ("GPU: …" or "CPU (…)").
    pub fn dataset_device(&self) -> Option<&str> {
        self.dataset.result.as_ref().map(|r| r.device.as_str())
    }

    pub fn dataset_error(&self) -> Option<&str> {
        self.dataset.error.as_deref()
    }

    /// The expert whose atlas is shown.
    pub fn dataset_expert(&self) -> Option<usize> {
        self.dataset.expert
    }

    /// The run (index into the analysis's runs) whose details are shown.
    pub fn dataset_run(&self) -> usize {
        self.dataset.run
    }

    /// The patch marked in the image view (from an atlas click): the shown image's name and the
    /// token, when the shown image is the marked one.
    pub fn marked_patch(&self) -> Option<(String, usize)> {
        let (id, token) = self.marked?;
        let img = self.images.get(self.settings.current_image)?;
        (img.id == id).then(|| (img.name.clone(), token))
    }

    /// Stops the running analysis after its current batch; its partial result is shown.
    pub fn cancel_dataset(&mut self) {
        if let Some(r) = &self.dataset.running {
            r.cancel.store(true, Ordering::Relaxed);
            self.dataset.paused_key = Some(r.key.clone());
        }
    }

    /// The analysis the current model and routing call for.
    fn dataset_key(&self) -> Option<DatasetKey> {
        let model = self.model.as_ref()?;
        // A trace is its own dataset.
        let data = match &model.trace {
            Some(_) => model.path.clone(),
            None => self.dataset.data.clone()?,
        };
        let cfg = &model.config;
        cfg.moe.as_ref()?;
        let main = self.routed_as_logged(self.settings.router_config());
        let mut opts = RunOptions::from_config(cfg).with_router(main.clone());
        if self.settings.group == GroupMode::Single {
            opts.group_images = 1;
        }
        let mut runs = vec![opts.clone()];
        if self.settings.compare {
            // Every other router re-routes the same checkpoint at the main router's k and
            // capacity, as `analyze --compare` does; Soft MoE keeps the checkpoint's own slots.
            // Those the checkpoint cannot run are left out by the analysis with their reason.
            let own = RunOptions::from_config(cfg).routers.first().cloned();
            for &kind in crate::routing::RouterKind::ALL.iter() {
                let r = match &own {
                    Some(o) if o.kind == kind && kind == crate::routing::RouterKind::SoftMoe => {
                        o.clone()
                    }
                    _ => super::state::router_like(&main, kind),
                };
                let run = RunOptions {
                    group_images: opts.group_images,
                    ..RunOptions::from_config(cfg).with_router(self.routed_as_logged(r))
                };
                if !runs.contains(&run) && run.routers.first().map(|r| r.kind) != Some(main.kind) {
                    runs.push(run);
                }
            }
        }
        Some((model.path.clone(), data, runs))
    }

    /// Starts (or supersedes) the analysis when the shown view needs a different one.
    pub(super) fn maintain_dataset(&mut self) {
        // A model being opened (the dataset's own, say) comes first.
        if !self.dataset.shown || self.opening.is_some() {
            return;
        }
        let Some(key) = self.dataset_key() else {
            return;
        };
        let current = self
            .dataset
            .running
            .as_ref()
            .map(|r| &r.key)
            .or(self.dataset.result_key.as_ref());
        if current == Some(&key) || self.dataset.paused_key.as_ref() == Some(&key) {
            return;
        }
        if let Some(r) = self.dataset.running.take() {
            // Superseded: it stops after its current batch and its reply is dropped.
            r.cancel.store(true, Ordering::Relaxed);
        }
        self.dataset.latest += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let (model, data, runs) = key.clone();
        self.dataset.running = Some(Running {
            id: self.dataset.latest,
            key,
            cancel: cancel.clone(),
            done: 0,
            total: 0,
            started: Instant::now(),
        });
        self.dataset.error = None;
        self.worker.send(Job::Analyze(AnalyzeRequest {
            id: self.dataset.latest,
            model,
            data,
            options: AnalyzeOptions {
                runs,
                atlas_size: APP_ATLAS_SIZE,
                atlas_per_image: crate::analysis::atlas::DEFAULT_PER_IMAGE,
                batch_tokens: AnalyzeOptions::DEFAULT_BATCH_TOKENS,
            },
            cancel,
        }));
    }

    pub(super) fn dataset_progressed(&mut self, id: u64, done: usize, total: usize) {
        if let Some(r) = self.dataset.running.as_mut().filter(|r| r.id == id) {
            r.done = done;
            r.total = total;
        }
    }

    pub(super) fn dataset_finished(&mut self, id: u64, result: Result<Box<DatasetResult>, String>) {
        let Some(running) = self.dataset.running.take_if(|r| r.id == id) else {
            return;
        };
        match result {
            Ok(r) => {
                let layers = r.analysis.runs.first().map_or(0, |x| x.layers.len());
                self.dataset.layer = self.dataset.layer.min(layers.saturating_sub(1));
                let e = r
                    .analysis
                    .runs
                    .first()
                    .and_then(|x| x.layers.first())
                    .map_or(0, |l| l.stats.num_experts);
                if self.dataset.expert.is_some_and(|j| j >= e) {
                    self.dataset.expert = None;
                }
                // The same router stays selected when it is still among the runs.
                let shown = (self.dataset.result.as_ref())
                    .and_then(|old| old.analysis.runs.get(self.dataset.run))
                    .map(|x| x.settings.router.clone());
                self.dataset.run = shown
                    .and_then(|name| {
                        (r.analysis.runs.iter()).position(|x| x.settings.router == name)
                    })
                    .unwrap_or(0);
                self.dataset.textures.clear();
                self.dataset.result = Some(r);
                self.dataset.result_key = Some(running.key);
            }
            Err(e) => self.dataset.error = Some(e),
        }
    }

    /// Opens image `index` of the shown analysis's dataset in the image view, marking `token`.
    pub fn open_dataset_image(&mut self, index: usize, token: usize) {
        let Some(r) = &self.dataset.result else {
            return;
        };
        let source = r.source.clone();
        // A trace's images are known by their index in it (they share the trace's path).
        let (path, found) = match &*source {
            crate::analysis::source::DataSource::Trace(t) => (
                t.trace.path().to_path_buf(),
                self.images
                    .iter()
                    .position(|im| im.trace_index == Some(index)),
            ),
            _ => {
                let path = match source.path(index) {
                    Some(p) => p.to_path_buf(),
                    None => source.location().join(source.name(index)),
                };
                let found = self.images.iter().position(|im| im.path == path);
                (path, found)
            }
        };
        self.show_dataset_view(false);
        if let Some(i) = found {
            self.marked = Some((self.images[i].id, token));
            self.show_image(i);
            return;
        }
        self.dataset.pending_mark = Some((path, token));
        self.send(Job::OpenDatasetImage { source, index });
    }

    /// Writes the shown analysis's JSON, CSV tables and figures into `dir`.
    pub fn export_dataset_to(&self, dir: &Path) -> Result<Vec<PathBuf>, String> {
        let r = self
            .dataset
            .result
            .as_ref()
            .ok_or("no dataset analysis to export yet")?;
        write_dataset_export(&r.analysis, dir, self.settings.palette, self.export_width)
    }

    /// Asks for a folder and exports the shown analysis there, off the UI thread.
    pub(super) fn pick_dataset_export(&self, ctx: &egui::Context) {
        let Some(r) = &self.dataset.result else {
            return;
        };
        let analysis = r.analysis.clone();
        let (palette, width) = (self.settings.palette, self.export_width);
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            if let Some(dir) = pollster::block_on(rfd::AsyncFileDialog::new().pick_folder()) {
                let dir = dir.path().to_path_buf();
                let res = write_dataset_export(&analysis, &dir, palette, width).map(|_| dir);
                let _ = tx.send(DialogResult::Exported(res));
                ctx.request_repaint();
            }
        });
    }

    pub(super) fn pick_dataset_folder(&self, ctx: &egui::Context) {
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            if let Some(dir) = pollster::block_on(rfd::AsyncFileDialog::new().pick_folder()) {
                let _ = tx.send(DialogResult::Dataset(dir.path().to_path_buf()));
                ctx.request_repaint();
            }
        });
    }
}

fn write_dataset_export(
    a: &crate::analysis::Analysis,
    dir: &Path,
    palette: crate::figures::Palette,
    width: u32,
) -> Result<Vec<PathBuf>, String> {
    crate::analysis::report::check_output_dir(dir, crate::routing::ArgStyle::Cli)
        .map_err(|e| e.to_string())?;
    crate::figures::dataset::write_analysis(a, dir, palette, width)
}
