//! Dataset routing analysis: one or more routers run over a whole dataset, streamed in batches,
//! reduced per MoE layer to counts by class, position and expert, load distributions, drops,
//! router entropy and an atlas of each expert's most strongly routed patches.
//!
//! The CLI (`routerscope analyze`) and the app's Dataset view both call [`analyze`]; it stops
//! between batches when asked and then returns what it has, marked partial.

pub mod atlas;
pub mod report;
pub mod source;
pub mod stats;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::model::{Forward, ModelConfig, ModelError, RunOptions, WhatIf};
use crate::routing::{ArgStyle, CapacitySpec, RouterConfig, RouterFamily, RouterKind};
use atlas::{AtlasEntry, AtlasExpert, TopN};
use source::DataSource;
use stats::{LayerAccumulator, LayerStats};

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Options(String),
}

/// How an analysis runs.
#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    /// One routing per router to analyse (the first is the main one); all share the group size.
    pub runs: Vec<RunOptions>,
    /// Patches kept per expert in the atlas.
    pub atlas_size: usize,
    /// At most this many of them from one image (0: no cap); see [`atlas`].
    pub atlas_per_image: usize,
    /// Tokens per forward batch (rounded to whole routing groups): bounds memory and how soon a
    /// stop request is honoured.
    pub batch_tokens: usize,
}

impl AnalyzeOptions {
    pub const DEFAULT_BATCH_TOKENS: usize = 8192;
}

/// The runs of one analysis: the main routing (`main` applied to the checkpoint's own) and
/// then each `compare` router, which takes the main one's k (Token Choice) and capacity factor
/// (sparse routers) so that all are compared at the same compute; duplicates are dropped.
pub fn router_runs(
    cfg: &ModelConfig,
    what: &str,
    main: &WhatIf,
    compare: &[RouterKind],
    style: ArgStyle,
) -> Result<Vec<RunOptions>, AnalysisError> {
    let model_err = |e: crate::model::ModelError| AnalysisError::Options(e.to_string());
    if cfg.moe.is_none() {
        return Err(AnalysisError::Options(format!(
            "{what} has no MoE layers: there is no routing to analyse"
        )));
    }
    let first = main.run_options(cfg, what, style).map_err(model_err)?;
    let base = first.routers.first().cloned();
    let mut runs = vec![first.clone()];
    for &kind in compare {
        let asked = WhatIf {
            router: Some(kind),
            ..WhatIf::default()
        };
        let Some(mut r) = asked.router(cfg, what, style).map_err(model_err)? else {
            continue;
        };
        if let Some(b) = &base {
            if kind.family() == RouterFamily::TokenChoice {
                r.k = b.experts_per_token();
            }
            if kind.family() != RouterFamily::Soft
                && let CapacitySpec::Factor(f) = b.capacity
            {
                r.capacity = CapacitySpec::Factor(f);
            }
        }
        let opts = RunOptions {
            group_images: first.group_images,
            ..RunOptions::from_config(cfg).with_router(r)
        };
        if !runs.contains(&opts) {
            runs.push(opts);
        }
    }
    Ok(runs)
}

/// What a run's router was.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouterSettings {
    /// The CLI name (`softmax-tc`, …).
    pub router: String,
    pub name: String,
    /// Experts per token (Token Choice; 1 otherwise).
    pub k: usize,
    pub capacity_factor: Option<f64>,
    /// Slots per expert, when fixed (Soft MoE: from the checkpoint).
    pub slots: Option<usize>,
    pub group_images: usize,
}

impl RouterSettings {
    pub fn new(r: &RouterConfig, group_images: usize) -> Self {
        let soft = r.kind.family() == RouterFamily::Soft;
        let (capacity_factor, slots) = match r.capacity {
            _ if soft => (None, None),
            CapacitySpec::Factor(f) => (Some(f), None),
            CapacitySpec::Slots(c) => (None, Some(c)),
        };
        Self {
            router: r.kind.cli_name().to_string(),
            name: r.kind.display_name().to_string(),
            k: r.experts_per_token(),
            capacity_factor,
            slots,
            group_images,
        }
    }

    /// `softmax-tc k=2 cf=1.25` style label.
    pub fn label(&self) -> String {
        let mut s = self.router.clone();
        if self.router.ends_with("-tc") {
            s += &format!(" k={}", self.k);
        }
        if let Some(f) = self.capacity_factor {
            s += &format!(" cf={}", crate::format::number(f));
        }
        if let Some(c) = self.slots {
            s += &format!(" c={c}");
        }
        s
    }
}

/// One MoE layer of one router: its statistics and its atlas.
#[derive(Clone, Debug, Serialize)]
pub struct LayerAnalysis {
    #[serde(flatten)]
    pub stats: LayerStats,
    pub atlas: Vec<AtlasExpert>,
}

/// The analysis of one router.
#[derive(Clone, Debug, Serialize)]
pub struct RouterRun {
    pub settings: RouterSettings,
    pub layers: Vec<LayerAnalysis>,
}

/// A compared router left out of an analysis, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SkippedRouter {
    pub settings: RouterSettings,
    pub reason: String,
}

/// An image that could not be read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Unreadable {
    pub image: String,
    pub error: String,
}

/// At most this many unreadable images are listed (all are counted).
pub const MAX_LISTED_UNREADABLE: usize = 100;

/// A finished (or stopped) analysis.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub model: String,
    pub data: String,
    pub classes: Vec<String>,
    /// Whether any image has a class (a folder with class subfolders, or IDX labels).
    pub labelled: bool,
    /// Images in the data (after `--limit`).
    pub images_in_data: usize,
    /// Images routed.
    pub images: usize,
    /// Stopped before the end: the statistics cover the images routed so far.
    pub partial: bool,
    pub unreadable_count: usize,
    pub unreadable: Vec<Unreadable>,
    /// Files of a data folder that are not images by their extension (not read).
    pub other_files: usize,
    /// Entries of a data folder passed over while listing it (a FIFO, socket or device, a
    /// broken or looping symbolic link): how many, and the first ones with why.
    pub passed_over_count: usize,
    pub passed_over: Vec<Unreadable>,
    /// Readable images left out at the end because they do not fill a routing group.
    pub left_out: usize,
    /// Patch grid `[rows, cols]`, tokens per image and whether token 0 is the CLS token.
    pub grid: [usize; 2],
    pub seq_len: usize,
    pub has_cls: bool,
    /// Learned tokens before the patches (CLS, distillation, registers).
    pub prefix_tokens: usize,
    /// The atlas rules: patches per expert, at most this many of one image (0: no cap), and the
    /// near-duplicate tolerance (mean absolute RGB difference, 0–255 levels).
    pub atlas_size: usize,
    pub atlas_per_image: usize,
    pub atlas_duplicate_tolerance: f32,
    pub runs: Vec<RouterRun>,
    /// Compared routers the checkpoint cannot run, left out.
    pub skipped: Vec<SkippedRouter>,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Progress of a run, after each batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Images read so far (routed or unreadable).
    pub done: usize,
    pub total: usize,
}

/// Runs every router of `opts` over `source` with `model`, batch by batch; `progress` is told
/// after each batch and a raised `stop` ends the run after the current one (the result is then
/// partial).
pub fn analyze(
    model: &dyn Forward,
    source: &DataSource,
    opts: &AnalyzeOptions,
    progress: &mut dyn FnMut(Progress),
    stop: &AtomicBool,
) -> Result<Analysis, AnalysisError> {
    let cfg = model.config();
    let moe = cfg.moe.as_ref().ok_or_else(|| {
        AnalysisError::Options(format!(
            "{} has no MoE layers: there is no routing to analyse",
            cfg.name
        ))
    })?;
    let first = opts
        .runs
        .first()
        .ok_or_else(|| AnalysisError::Options("no router to analyse".into()))?;
    let group = first.group_images.max(1);
    if opts.runs.iter().any(|r| r.group_images != group) {
        return Err(AnalysisError::Options(
            "every router of one analysis routes groups of the same size".into(),
        ));
    }
    if opts.atlas_size > atlas::MAX_ATLAS_SIZE {
        return Err(AnalysisError::Options(format!(
            "--atlas-size {} is beyond the limit of {}",
            opts.atlas_size,
            atlas::MAX_ATLAS_SIZE
        )));
    }
    // A compared router the checkpoint cannot run (Soft MoE on a sparse checkpoint, a sparse
    // router on a Soft MoE one) is left out with its reason; the main one must run.
    model
        .check_options(first, group)
        .map_err(|e| AnalysisError::Model(e.to_string()))?;
    let mut skipped = Vec::new();
    let runs_asked: Vec<&RunOptions> = (opts.runs.iter().enumerate())
        .filter(|(i, run)| match model.check_options(run, group) {
            Ok(()) => true,
            Err(e) if *i > 0 => {
                skipped.push(SkippedRouter {
                    settings: RouterSettings::new(&run.routers[0], run.group_images),
                    reason: e.to_string(),
                });
                false
            }
            Err(_) => true,
        })
        .map(|(_, r)| r)
        .collect();
    let start = Instant::now();
    let seq_len = cfg.seq_len();
    let has_cls = cfg.prefix().cls;
    let cls = cfg.prefix().count();
    let classes = source.classes().to_vec();
    let e = moe.num_experts;
    let per_batch = (opts.batch_tokens / seq_len.max(1))
        .clamp(1, 512)
        .max(group)
        / group
        * group;
    let mut acc: Vec<Vec<LayerAccumulator>> = runs_asked
        .iter()
        .map(|_| {
            moe.layers
                .iter()
                .map(|&b| LayerAccumulator::new(b, e, classes.len(), seq_len))
                .collect()
        })
        .collect();
    let mut heaps: Vec<Vec<Vec<TopN>>> = runs_asked
        .iter()
        .map(|_| {
            moe.layers
                .iter()
                .map(|_| {
                    (0..e)
                        .map(|_| {
                            TopN::with_rules(
                                opts.atlas_size,
                                opts.atlas_per_image,
                                atlas::POOL_FACTOR,
                            )
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let total = source.len();
    let mut next = 0;
    let mut routed = 0;
    let mut unreadable = Vec::new();
    let mut unreadable_count = 0;
    let mut left_out = 0;
    let mut partial = false;
    while next < total {
        if stop.load(Ordering::Relaxed) {
            partial = true;
            break;
        }
        let mut ids = Vec::with_capacity(per_batch);
        let mut inputs = Vec::with_capacity(per_batch);
        while next < total && ids.len() < per_batch {
            match source.input(next, cfg) {
                Ok(px) => {
                    ids.push(next);
                    inputs.push(px);
                }
                Err(err) => {
                    unreadable_count += 1;
                    if unreadable.len() < MAX_LISTED_UNREADABLE {
                        unreadable.push(Unreadable {
                            image: source.name(next),
                            error: err,
                        });
                    }
                }
            }
            next += 1;
        }
        // Only whole routing groups run (as in `eval`); at the end a remainder is left out.
        let whole = ids.len() / group * group;
        left_out += ids.len() - whole;
        ids.truncate(whole);
        inputs.truncate(whole);
        if !ids.is_empty() {
            let labels: Vec<usize> = ids.iter().map(|&i| source.label(i)).collect();
            let mut prev = None;
            for (r, &run) in runs_asked.iter().enumerate() {
                let out = match &prev {
                    None => model.forward_source(&ids, &inputs, run),
                    Some(p) => model.rerun(p, run),
                }
                .map_err(|e| match e {
                    ModelError::Source(m) => AnalysisError::Data(m),
                    e => AnalysisError::Model(e.to_string()),
                })?;
                for (l, rec) in out.records.iter().enumerate() {
                    let (layer, heap) = (&mut acc[r][l], &mut heaps[r][l]);
                    for g in &rec.groups {
                        let first = g.first_image;
                        let glabels = &labels[first..first + g.num_images];
                        layer.add(g, glabels, |m, token, j, score| {
                            if token >= cls {
                                heap[j].push(AtlasEntry {
                                    score,
                                    image: ids[first + m],
                                    token,
                                });
                            }
                        });
                    }
                }
                prev = Some(out);
            }
            routed += ids.len();
        }
        progress(Progress { done: next, total });
    }
    if routed == 0 {
        let why = if partial {
            "stopped before the first batch".to_string()
        } else if unreadable_count > 0 {
            format!(
                "none of the {unreadable_count} images could be read (first: {}: {})",
                unreadable
                    .first()
                    .map_or("", |u: &Unreadable| u.image.as_str()),
                unreadable.first().map_or("", |u| u.error.as_str())
            )
        } else {
            format!(
                "{} images do not fill one routing group of {group}",
                left_out
            )
        };
        return Err(AnalysisError::Data(format!(
            "{}: nothing was analysed: {why}",
            source.location().display()
        )));
    }
    let runs = runs_asked
        .iter()
        .zip(acc)
        .zip(heaps)
        .map(|((run, layers), heaps)| RouterRun {
            settings: RouterSettings::new(&run.routers[0], run.group_images),
            layers: layers
                .into_iter()
                .zip(heaps)
                .map(|(a, h)| LayerAnalysis {
                    stats: a.finish(),
                    atlas: atlas::build_atlas(source, h, opts.atlas_size, cfg.grid(), cls),
                })
                .collect(),
        })
        .collect();
    let seconds = start.elapsed().as_secs_f64();
    let labelled = classes.iter().any(|c| c != source::UNLABELLED);
    let (other_files, passed_over_count, passed_over) = match source {
        DataSource::Folder(f) => (
            f.other_files,
            f.skipped_count,
            f.skipped
                .iter()
                .map(|(p, why)| Unreadable {
                    image: p
                        .strip_prefix(&f.root)
                        .unwrap_or(p)
                        .to_string_lossy()
                        .into_owned(),
                    error: why.clone(),
                })
                .collect(),
        ),
        _ => (0, 0, Vec::new()),
    };
    Ok(Analysis {
        model: cfg.name.clone(),
        data: source.location().display().to_string(),
        classes,
        labelled,
        images_in_data: total,
        images: routed,
        partial,
        unreadable_count,
        unreadable,
        other_files,
        passed_over_count,
        passed_over,
        left_out,
        grid: cfg.grid(),
        seq_len,
        has_cls,
        prefix_tokens: cls,
        atlas_size: opts.atlas_size,
        atlas_per_image: opts.atlas_per_image,
        atlas_duplicate_tolerance: atlas::DUPLICATE_TOLERANCE,
        runs,
        skipped,
        seconds,
        images_per_second: routed as f64 / seconds.max(1e-9),
    })
}
