//! The compute thread: the UI sends jobs (decode images, open a checkpoint, run the model) and
//! never waits; replies come back through a channel and wake the UI with `request_repaint`.
//!
//! Runs are coalesced (only the newest queued run is computed) and a run on the same model and
//! images as the previous one is a what-if: [`Engine::rerun`] restarts at the first MoE layer
//! whose routing changed. Models run on the GPU device the app hands over (eframe's own), or on
//! the CPU; a GPU failure switches to the CPU and the next reply carries the notice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::Instant;

use image::DynamicImage;

use crate::analysis::source::{DataSource, TraceSource};
use crate::analysis::{Analysis, AnalyzeOptions};
use crate::app::runner::{Runner, TraceSummary};
use crate::gpu::GpuContext;
use crate::model::{Forward, ForwardOutput, ModelConfig, RunOptions, decode_image, preprocess};
use crate::moefy::{all_experts_options, mean_patch_cosine};
use crate::routing::RouterConfig;

/// A decoded image and its display copies.
pub struct DecodedImage {
    pub path: PathBuf,
    pub name: String,
    pub image: Arc<DynamicImage>,
    /// RGBA at most 512 px on the long side, for the main view.
    pub display: egui::ColorImage,
    /// RGBA at most 64 px on the long side, for the gallery.
    pub thumbnail: egui::ColorImage,
    /// The image's index in the routing trace it came from.
    pub trace_index: Option<usize>,
}

/// The most images of a trace the gallery holds (whole routing groups); the Dataset view
/// analyses all of them.
pub const TRACE_GALLERY_IMAGES: usize = 256;

/// An opened checkpoint or trace.
pub struct OpenedModel {
    pub path: PathBuf,
    pub config: Box<ModelConfig>,
    pub trace: Option<TraceSummary>,
    /// A trace's first images (at most [`TRACE_GALLERY_IMAGES`]), for the gallery.
    pub trace_images: Vec<Result<DecodedImage, String>>,
}

/// A model run for the viewer.
pub struct RunRequest {
    pub id: u64,
    pub model: PathBuf,
    /// Images in batch order, with stable ids (the what-if cache key).
    pub images: Vec<(u64, Arc<DynamicImage>)>,
    /// Per image, its index in the trace when the model is a trace (which routes only its own
    /// images, by index).
    pub trace_ids: Vec<Option<usize>>,
    pub options: RunOptions,
}

pub enum Job {
    /// Run models on this GPU from now on (`None`: the CPU); cached models are rebuilt.
    SetDevice(Box<Option<GpuContext>>),
    DecodeImages(Vec<PathBuf>),
    OpenModel(PathBuf),
    Run(RunRequest),
    /// A dataset analysis, computed on its own thread so that image runs go on meanwhile; it
    /// reports progress and stops between batches once `cancel` is raised.
    Analyze(AnalyzeRequest),
    /// Image `index` of a dataset, to open in the image view.
    OpenDatasetImage {
        source: Arc<DataSource>,
        index: usize,
    },
    /// One image under several (checkpoint, router) pairs, each routed alone.
    Compare {
        id: u64,
        entries: Vec<(PathBuf, RouterConfig)>,
        image: Arc<DynamicImage>,
        trace_index: Option<usize>,
    },
}

/// A dataset analysis for the Dataset view.
pub struct AnalyzeRequest {
    pub id: u64,
    pub model: PathBuf,
    /// A folder of images or a Fashion-MNIST IDX directory (its test split).
    pub data: PathBuf,
    pub options: AnalyzeOptions,
    pub cancel: Arc<AtomicBool>,
}

/// A finished (or cancelled, then partial) dataset analysis.
pub struct DatasetResult {
    pub id: u64,
    pub model: PathBuf,
    pub analysis: Analysis,
    pub source: Arc<DataSource>,
    /// Where it ran ("GPU: …" or "CPU (candle, …)"), as the image runs say.
    pub device: String,
}

/// One panel of a comparison: the router and its run (or why it could not run).
pub type CompareEntry = (RouterConfig, Result<(ModelConfig, ForwardOutput), String>);

/// The outcome of a run.
pub struct RunResult {
    pub id: u64,
    pub model: PathBuf,
    pub config: ModelConfig,
    pub image_ids: Vec<u64>,
    pub output: ForwardOutput,
    /// Wall time of the forward (or what-if) computation.
    pub millis: f64,
    /// Recomputed from a cached earlier layer (what-if) rather than from the pixels.
    pub what_if: bool,
    /// Where it ran ("GPU: …" or "CPU (candle, …)").
    pub device: String,
    /// Why the GPU was not used, when it failed during this run.
    pub notice: Option<String>,
    /// For a feature model with MoE layers: the mean cosine similarity of the final patch
    /// features against the same images with every expert chosen (the dense model).
    pub fidelity: Option<f64>,
}

pub enum Reply {
    Images(Vec<Result<DecodedImage, String>>),
    ModelOpened(Result<Box<OpenedModel>, String>),
    Ran(Box<RunResult>),
    RunFailed {
        id: u64,
        error: String,
    },
    /// A run on a large model is at block `done` of `total` (sent once it takes over 100 ms).
    RunProgress {
        id: u64,
        done: usize,
        total: usize,
    },
    /// A newer run request stopped this one between two blocks.
    RunSuperseded {
        id: u64,
    },
    Compared {
        id: u64,
        entries: Vec<CompareEntry>,
    },
    AnalysisProgress {
        id: u64,
        done: usize,
        total: usize,
    },
    Analyzed {
        id: u64,
        result: Result<Box<DatasetResult>, String>,
    },
}

/// The UI side of the worker.
pub struct Worker {
    jobs: Sender<Job>,
    replies: Receiver<Reply>,
    /// The newest run id sent: a run in progress with an older id stops at its next block.
    latest_run: Arc<AtomicU64>,
}

impl Worker {
    /// Starts the thread; `wake` is called after every reply (the app passes `request_repaint`).
    pub fn spawn(wake: impl Fn() + Send + Sync + 'static) -> Self {
        let (jobs, job_rx) = channel();
        let (reply_tx, replies) = channel();
        let wake: Wake = Arc::new(wake);
        let latest_run = Arc::new(AtomicU64::new(0));
        let latest = latest_run.clone();
        std::thread::Builder::new()
            .name("routerscope-worker".into())
            .spawn(move || worker_loop(&job_rx, &reply_tx, &wake, &latest))
            .map(|_| ())
            .unwrap_or_else(|e| tracing_fallback(&e.to_string()));
        Self {
            jobs,
            replies,
            latest_run,
        }
    }

    pub fn send(&self, job: Job) {
        if let Job::Run(r) = &job {
            // Before the job is queued, so the run in progress sees it at its next block.
            self.latest_run.fetch_max(r.id, Ordering::SeqCst);
        }
        // The thread only ends with the app; a send error means it panicked, already reported.
        let _ = self.jobs.send(job);
    }

    pub fn try_recv(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }

    /// Blocks until a reply arrives (tests and headless use).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Reply> {
        self.replies.recv_timeout(timeout).ok()
    }
}

fn tracing_fallback(err: &str) {
    eprintln!("routerscope: cannot start the compute thread: {err}");
}

/// What a fidelity reference depends on: model, image ids, group size.
type ReferenceKey = (PathBuf, Vec<u64>, usize);

struct Cache {
    gpu: Option<GpuContext>,
    models: HashMap<PathBuf, Arc<Runner>>,
    last: Option<(PathBuf, Vec<u64>, ForwardOutput)>,
    /// The all-experts features of the last fidelity reference.
    reference: Option<(ReferenceKey, Vec<Vec<f32>>)>,
}

type Wake = Arc<dyn Fn() + Send + Sync>;

fn worker_loop(jobs: &Receiver<Job>, replies: &Sender<Reply>, wake: &Wake, latest: &AtomicU64) {
    let mut cache = Cache {
        gpu: None,
        models: HashMap::new(),
        last: None,
        reference: None,
    };
    while let Ok(first) = jobs.recv() {
        // Coalesce: of the runs queued now, only the newest matters.
        let mut batch = vec![first];
        loop {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        let last_run = batch.iter().rposition(|j| matches!(j, Job::Run(_)));
        let last_compare = batch.iter().rposition(|j| matches!(j, Job::Compare { .. }));
        for (i, job) in batch.into_iter().enumerate() {
            let reply = match job {
                Job::Run(_) if Some(i) != last_run => continue,
                Job::Compare { .. } if Some(i) != last_compare => continue,
                Job::Compare {
                    id,
                    entries,
                    image,
                    trace_index,
                } => Reply::Compared {
                    id,
                    entries: compare(&mut cache, entries, &image, trace_index),
                },
                Job::Run(req) => {
                    let progress = |r: Reply| {
                        let _ = replies.send(r);
                        wake();
                    };
                    run(&mut cache, req, &progress, latest)
                }
                Job::DecodeImages(paths) => {
                    Reply::Images(paths.iter().map(|p| decode(p)).collect())
                }
                Job::OpenModel(path) => Reply::ModelOpened(open_model(&mut cache, &path)),
                Job::Analyze(req) => match model(&mut cache, &req.model) {
                    Ok(m) => {
                        spawn_analysis(m, req, replies.clone(), wake.clone());
                        continue;
                    }
                    Err(error) => Reply::Analyzed {
                        id: req.id,
                        result: Err(error),
                    },
                },
                Job::OpenDatasetImage { source, index } => {
                    Reply::Images(vec![decode_dataset_image(&source, index)])
                }
                Job::SetDevice(gpu) => {
                    cache.gpu = *gpu;
                    cache.models.clear();
                    cache.last = None;
                    cache.reference = None;
                    continue;
                }
            };
            if replies.send(reply).is_err() {
                return;
            }
            wake();
        }
    }
}

fn open_model(cache: &mut Cache, path: &Path) -> Result<Box<OpenedModel>, String> {
    let model = model(cache, path)?;
    let trace_images = match model.trace() {
        Some(t) => {
            let t = t.trace();
            let g = t.group_images().max(1);
            let n = t.num_images().min(TRACE_GALLERY_IMAGES.max(g) / g * g);
            (0..n)
                .map(|i| {
                    let image = t.image(i).map_err(|e| e.to_string())?;
                    Ok(decoded(
                        t.path().to_path_buf(),
                        format!("{i:05}-{}", t.image_name(i)),
                        image,
                        Some(i),
                    ))
                })
                .collect()
        }
        None => Vec::new(),
    };
    Ok(Box::new(OpenedModel {
        path: path.to_path_buf(),
        config: Box::new(model.config().clone()),
        trace: model.trace_summary(),
        trace_images,
    }))
}

fn model(cache: &mut Cache, path: &Path) -> Result<Arc<Runner>, String> {
    if let Some(m) = cache.models.get(path) {
        return Ok(m.clone());
    }
    let m = Arc::new(Runner::open(path, cache.gpu.as_ref())?);
    // Keep a handful of checkpoints (the seven built-ins fit easily).
    if cache.models.len() >= 8 {
        cache.models.clear();
    }
    cache.models.insert(path.to_path_buf(), m.clone());
    Ok(m)
}

/// Runs `req`, telling `progress` block by block once it takes longer than 100 ms, and stopping
/// between blocks when a newer run has been requested (`latest`).
fn run(cache: &mut Cache, req: RunRequest, progress: &dyn Fn(Reply), latest: &AtomicU64) -> Reply {
    let fail = |error: String| Reply::RunFailed { id: req.id, error };
    let m = match model(cache, &req.model) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let ids: Vec<u64> = req.images.iter().map(|(id, _)| *id).collect();
    let start = Instant::now();
    let reusable = cache
        .last
        .as_ref()
        .filter(|(p, i, _)| *p == req.model && *i == ids);
    let id = req.id;
    let mut observe = |done: usize, total: usize| {
        if start.elapsed() > std::time::Duration::from_millis(100) {
            progress(Reply::RunProgress { id, done, total });
        }
        latest.load(Ordering::SeqCst) <= id
    };
    let (result, what_if) = match reusable {
        Some((_, _, prev)) => (m.rerun_observed(prev, &req.options, &mut observe), true),
        None if m.trace().is_some() => {
            let ids: Option<Vec<usize>> = req.trace_ids.iter().copied().collect();
            match ids {
                Some(ids) if ids.len() == req.images.len() => {
                    (m.forward_source(&ids, &[], &req.options), false)
                }
                _ => {
                    return fail(
                        "a routing trace routes only its own images: show one of the trace's \
                         images (or open a checkpoint to run these)"
                            .into(),
                    );
                }
            }
        }
        None => {
            let pixels: Result<Vec<Vec<f32>>, String> = req
                .images
                .iter()
                .map(|(_, img)| preprocess(img, m.config()).map_err(|e| e.to_string()))
                .collect();
            match pixels {
                Ok(p) => (m.forward_observed(&p, &req.options, &mut observe), false),
                Err(e) => return fail(e),
            }
        }
    };
    let output = match result {
        Ok(o) => o,
        Err(crate::model::ModelError::Cancelled(_)) => return Reply::RunSuperseded { id },
        Err(e) => return fail(e.to_string()),
    };
    let millis = start.elapsed().as_secs_f64() * 1e3;
    let fidelity = fidelity(cache, &m, &req, &ids, &output);
    cache.last = Some((req.model.clone(), ids.clone(), output.clone()));
    Reply::Ran(Box::new(RunResult {
        id: req.id,
        model: req.model,
        config: m.config().clone(),
        image_ids: ids,
        output,
        millis,
        what_if,
        device: m.device(),
        notice: m.take_notice(),
        fidelity,
    }))
}

/// How far this run's routing moves a feature model's representation: mean patch cosine against
/// the all-experts run of the same images (computed once per model, images and group, as a
/// what-if from `output`), which for a moefied model is its dense original. A distilled overlay's
/// experts no longer sum to the dense MLP, so its reference is the all-experts run of its base
/// (the moefied model it was distilled from, with the same frozen weights). `None` for
/// classifiers, dense models, or when the reference fails.
fn fidelity(
    cache: &mut Cache,
    m: &Runner,
    req: &RunRequest,
    ids: &[u64],
    output: &ForwardOutput,
) -> Option<f64> {
    let cfg = m.config();
    if !cfg.is_feature_model() || cfg.moe.is_none() || m.trace().is_some() {
        return None;
    }
    let base = crate::model::checkpoint_base(&req.model);
    let key = (
        base.clone().unwrap_or_else(|| req.model.clone()),
        ids.to_vec(),
        req.options.group_images,
    );
    if cache.reference.as_ref().is_none_or(|(k, _)| *k != key) {
        let reference = match base {
            Some(base) => {
                let b = model(cache, &base).ok()?;
                let all = RunOptions {
                    group_images: req.options.group_images,
                    ..all_experts_options(b.config())
                };
                b.forward(&output.inputs, &all).ok()?
            }
            None => {
                let all = RunOptions {
                    group_images: req.options.group_images,
                    ..all_experts_options(cfg)
                };
                m.rerun(output, &all).ok()?
            }
        };
        cache.reference = Some((key, reference.features));
    }
    let (_, reference) = cache.reference.as_ref()?;
    let skip = cfg.seq_len() - cfg.num_patches();
    Some(mean_patch_cosine(
        &output.features,
        reference,
        cfg.hidden_size,
        skip,
    ))
}

fn compare(
    cache: &mut Cache,
    entries: Vec<(PathBuf, RouterConfig)>,
    image: &DynamicImage,
    trace_index: Option<usize>,
) -> Vec<CompareEntry> {
    let mut prev: Option<(PathBuf, ForwardOutput)> = None;
    entries
        .into_iter()
        .map(|(path, router)| {
            let result = (|| {
                let m = model(cache, &path)?;
                let opts = RunOptions {
                    group_images: 1,
                    ..RunOptions::from_config(m.config()).with_router(router.clone())
                };
                let out = match (prev.as_ref().filter(|(p, _)| *p == path), m.trace()) {
                    (Some((_, o)), _) => m.rerun(o, &opts),
                    (None, Some(t)) => {
                        let i = trace_index
                            .ok_or("a routing trace routes only its own images".to_string())?;
                        t.route_ids(&[i], &opts)
                    }
                    (None, None) => {
                        let px = preprocess(image, m.config()).map_err(|e| e.to_string())?;
                        m.forward(&[px], &opts)
                    }
                }
                .map_err(|e| e.to_string())?;
                prev = Some((path.clone(), out.clone()));
                Ok((m.config().clone(), out))
            })();
            (router, result)
        })
        .collect()
}

/// Runs the analysis on a thread of its own; progress and the result come back as replies.
fn spawn_analysis(m: Arc<Runner>, req: AnalyzeRequest, replies: Sender<Reply>, wake: Wake) {
    let fail_tx = replies.clone();
    let fail_wake = wake.clone();
    let id = req.id;
    let spawned = std::thread::Builder::new()
        .name("routerscope-analysis".into())
        .spawn(move || {
            let result = (|| {
                // A trace is its own dataset.
                let source = match m.trace() {
                    Some(t) => DataSource::Trace(TraceSource::new(t.trace().clone())),
                    None => DataSource::open(
                        &req.data,
                        crate::train::Split::Test,
                        &m.config().class_names,
                    )
                    .map_err(|e| e.to_string())?,
                };
                let mut progress = |p: crate::analysis::Progress| {
                    let _ = replies.send(Reply::AnalysisProgress {
                        id: req.id,
                        done: p.done,
                        total: p.total,
                    });
                    wake();
                };
                let analysis = crate::analysis::analyze(
                    m.as_ref(),
                    &source,
                    &req.options,
                    &mut progress,
                    &req.cancel,
                )
                .map_err(|e| e.to_string())?;
                Ok(Box::new(DatasetResult {
                    id: req.id,
                    model: req.model.clone(),
                    analysis,
                    source: Arc::new(source),
                    device: m.device(),
                }))
            })();
            let _ = replies.send(Reply::Analyzed { id: req.id, result });
            wake();
        });
    if let Err(e) = spawned {
        let _ = fail_tx.send(Reply::Analyzed {
            id,
            result: Err(format!("cannot start the analysis thread: {e}")),
        });
        fail_wake();
    }
}

fn decode_dataset_image(source: &DataSource, index: usize) -> Result<DecodedImage, String> {
    if index >= source.len() {
        return Err(format!("the dataset has no image {index}"));
    }
    if let Some(p) = source.path(index) {
        return decode(p);
    }
    let image = source.original(index)?;
    let name = source.name(index);
    Ok(match source {
        DataSource::Trace(t) => decoded(
            t.trace.path().to_path_buf(),
            format!("{index:05}-{name}"),
            image,
            Some(index),
        ),
        _ => decoded(source.location().join(&name), name, image, None),
    })
}

fn decoded(
    path: PathBuf,
    name: String,
    image: DynamicImage,
    trace_index: Option<usize>,
) -> DecodedImage {
    DecodedImage {
        path,
        name,
        display: color_image(&image, 512),
        thumbnail: color_image(&image, 64),
        image: Arc::new(image),
        trace_index,
    }
}

fn decode(path: &Path) -> Result<DecodedImage, String> {
    let image = decode_image(path).map_err(|e| e.to_string())?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(decoded(path.to_path_buf(), name, image, None))
}

/// RGBA copy at most `side` px on the long side (small images are kept as they are; the view
/// scales them up with nearest-neighbour sampling).
pub fn color_image(img: &DynamicImage, side: u32) -> egui::ColorImage {
    let img = if img.width().max(img.height()) > side {
        img.resize(side, side, image::imageops::FilterType::Triangle)
    } else {
        img.clone()
    };
    let rgba = img.to_rgba8();
    egui::ColorImage::from_rgba_unmultiplied(
        [rgba.width() as usize, rgba.height() as usize],
        rgba.as_raw(),
    )
}
