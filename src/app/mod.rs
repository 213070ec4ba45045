//! The desktop viewer (eframe/egui). The UI thread only draws and reacts: decoding images,
//! opening checkpoints and running the model happen on the [`worker`] thread, whose replies wake
//! the UI.
//!
//! Files: the state and its changes (`state.rs`), the worker's replies (`replies.rs`), keyboard,
//! drops and dialogs (`input.rs`), export (`export.rs`), the window layout (`layout.rs`) and one
//! the Dataset view's state (`dataset.rs`), and one
//! file per panel in `panels/` (top bar, gallery, central view, comparison, details, dataset,
//! timeline), drawn with the widgets in [`views`]; a run's Timeline state is [`timeline`].

mod dataset;
mod export;
mod input;
mod layout;
mod panels;
mod replies;
pub mod runner;
pub mod settings;
mod state;
pub mod timeline;
pub mod views;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use image::DynamicImage;

use crate::backend::DeviceChoice;
use crate::gpu::GpuContext;
use crate::model::ModelConfig;
use settings::Settings;
use worker::{RunResult, Worker};

pub use export::ExportJob;

/// Patches per expert in the Dataset view's atlas.
pub fn dataset_atlas_size() -> usize {
    dataset::APP_ATLAS_SIZE
}

/// Storage key of the persisted settings.
pub const SETTINGS_KEY: &str = "routerscope.settings";

/// Image extensions the viewer opens.
pub use crate::model::IMAGE_EXTENSIONS;

struct ViewImage {
    id: u64,
    path: PathBuf,
    name: String,
    image: Arc<DynamicImage>,
    texture: egui::TextureHandle,
    thumbnail: egui::TextureHandle,
    /// Its index in the routing trace it came from.
    trace_index: Option<usize>,
}

struct CurrentModel {
    path: PathBuf,
    config: ModelConfig,
    trained: bool,
    /// Set when the "model" is a routing trace.
    trace: Option<runner::TraceSummary>,
}

enum DialogResult {
    Images(Vec<PathBuf>),
    Model(PathBuf),
    Exported(Result<PathBuf, String>),
    Dataset(PathBuf),
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
    /// Blocks done of the run in flight, once it takes long enough to report.
    run_progress: Option<(usize, usize)>,
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
    /// The Dataset view.
    pub dataset: dataset::DatasetView,
    /// The Timeline view of an open run.
    pub timeline: timeline::TimelineView,
    /// A patch to mark in the image view: (image id, token), set from the atlas.
    marked: Option<(u64, usize)>,
}

impl eframe::App for RouterscopeApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
    }
}

/// Opens the viewer window (on a run's Timeline when `run` is given).
pub fn run_app(
    images: Vec<PathBuf>,
    model: Option<PathBuf>,
    device: Option<DeviceChoice>,
    run: Option<PathBuf>,
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
            let mut app = RouterscopeApp::from_creation_context(cc, images, model, device);
            if let Some(r) = run {
                app.open_run(r, &cc.egui_ctx);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
