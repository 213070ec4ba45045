//! `routerscope export`: routing figures (PNG, SVG) and their data (CSV, JSON) for every image,
//! headless, with a per-run summary. A bad image is reported and skipped; the exit status says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use routerscope::backend::{DeviceChoice, Engine};
use routerscope::figures::export::{FigurePanel, FigureSet, Format, default_stem};
use routerscope::figures::{ImageRouting, Palette};
use routerscope::files::StagedDir;
use routerscope::model::{ModelConfig, RunOptions, decode_image, preprocess};
use routerscope::moefy::{all_experts_options, mean_patch_cosine};
use routerscope::routing::{ArgStyle, CapacitySpec, RouterConfig, RouterKind};
use routerscope::trace::TraceModel;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Model checkpoint (.safetensors or a vmoe .index).
    #[arg(long, required_unless_present = "trace", conflicts_with = "trace")]
    model: Option<PathBuf>,
    /// A routing trace (`docs/trace-format.md`) instead of a model: its images under the logged
    /// routing; `--router`, `--k`, `--capacity-factor` and `--compare` re-route its logits.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// With --trace: the images to export (comma-separated indices) [default: all].
    #[arg(long, value_delimiter = ',', requires = "trace")]
    images: Vec<usize>,
    /// Where the model runs: auto (a hardware GPU if there is one, else the CPU), gpu (any
    /// adapter, software ones included; the CPU if none works) or cpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Router (default: the checkpoint's own).
    #[arg(long)]
    router: Option<RouterKind>,
    /// Experts per token (Token Choice routers).
    #[arg(long)]
    k: Option<usize>,
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Comma-separated routers to show side by side (what-ifs on the same weights).
    #[arg(long, value_delimiter = ',')]
    compare: Vec<RouterKind>,
    /// Comma-separated formats.
    #[arg(long, value_delimiter = ',', default_value = "png,svg,csv,json")]
    format: Vec<Format>,
    /// Width of the PNG figures in pixels (100 to 16384).
    #[arg(long, default_value_t = 1600, value_parser = clap::value_parser!(u32).range(100..=16384))]
    width: u32,
    /// Which MoE layer to draw (index into the MoE layers; default: all, side by side; with
    /// --compare: the first).
    #[arg(long)]
    layer: Option<usize>,
    #[arg(long)]
    out: PathBuf,
    /// Image files or directories of images (with --model).
    #[arg(required_unless_present = "trace", conflicts_with = "trace")]
    inputs: Vec<PathBuf>,
}

/// The images to export, each with the name its files get: the file name, or where two inputs
/// share one (`a/same.png`, `b/same.png`), the path below the input folder (`a_same.png`), and a
/// counter when even that repeats, so no export overwrites another.
fn images_in(inputs: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, PathBuf)> = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            found.extend(v.into_iter().map(|f| (f, p.clone())));
        } else {
            found.push((
                p.clone(),
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ));
        }
    }
    let file_name = |p: &Path| {
        p.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut count: HashMap<String, usize> = HashMap::new();
    for (f, _) in &found {
        *count.entry(file_name(f)).or_default() += 1;
    }
    let mut used: HashMap<String, usize> = HashMap::new();
    found
        .into_iter()
        .map(|(f, root)| {
            let mut name = file_name(&f);
            if count[&name] > 1 {
                // Disambiguate by the folder the file sits in (relative to its input).
                let parent = f.parent().unwrap_or(Path::new(""));
                let below = parent.strip_prefix(&root).unwrap_or(parent);
                let tag = below
                    .components()
                    .chain(root.file_name().map(std::path::Component::Normal))
                    .last()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !tag.is_empty() {
                    name = format!("{tag}_{name}");
                }
            }
            let n = used.entry(name.clone()).or_default();
            *n += 1;
            if *n > 1 {
                name = format!("{}-{n}", name);
            }
            (f, name)
        })
        .collect()
}

fn router_for(
    cfg: &ModelConfig,
    what: &str,
    args: &ExportArgs,
    kind: Option<RouterKind>,
) -> anyhow::Result<RouterConfig> {
    let moe = cfg
        .moe
        .as_ref()
        .with_context(|| format!("{what} has no MoE layers to draw"))?;
    let mut r = match kind {
        Some(k) if k != moe.router.kind => RouterConfig::new(k),
        _ => moe.router.clone(),
    };
    if r.kind == RouterKind::SoftMoe {
        r.capacity = CapacitySpec::Slots(1);
    } else if let Some(cf) = args.capacity_factor {
        r.capacity = CapacitySpec::Factor(cf);
    }
    if let Some(k) = args.k
        && r.kind.family() == routerscope::routing::RouterFamily::TokenChoice
    {
        r.k = k;
    } else if args.k.is_some() && args.compare.is_empty() {
        routerscope::model::check_k_applies(r.kind, ArgStyle::Cli)?;
    }
    Ok(r)
}

/// What the figures show: a model run on image files, or a trace's own images.
enum Subject {
    Model(Box<Engine>),
    Trace(TraceModel),
}

impl Subject {
    fn config(&self) -> &ModelConfig {
        match self {
            Subject::Model(m) => &m.config,
            Subject::Trace(t) => t.trace().config(),
        }
    }
}

/// One image to export: a file, or an image of the trace.
enum Item {
    File(PathBuf),
    TraceImage(usize),
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let (subject, model_name) = match (&args.model, &args.trace) {
        (_, Some(t)) => (
            Subject::Trace(TraceModel::open(t)?),
            t.display().to_string(),
        ),
        (Some(m), None) => (
            Subject::Model(Box::new(super::load_engine(m, args.device)?)),
            m.display().to_string(),
        ),
        (None, None) => anyhow::bail!("give --model and images, or --trace"),
    };
    routerscope::analysis::report::check_output_dir(&args.out, ArgStyle::Cli)?;
    let main_router = router_for(subject.config(), &model_name, args, args.router)?;
    let routers: Vec<RouterConfig> = if args.compare.is_empty() {
        vec![main_router.clone()]
    } else {
        args.compare
            .iter()
            .map(|&k| router_for(subject.config(), &model_name, args, Some(k)))
            .collect::<anyhow::Result<_>>()?
    };
    let cfg = subject.config().clone();
    let layers = cfg.moe.as_ref().map_or(0, |m| m.layers.len());
    if let Some(l) = args.layer.filter(|&l| l >= layers) {
        anyhow::bail!(
            "--layer {l}: the model has {layers} MoE layers (0..{})",
            layers - 1
        );
    }
    let images: Vec<(Item, String)> = match &subject {
        Subject::Model(_) => images_in(&args.inputs)
            .into_iter()
            .map(|(p, n)| (Item::File(p), n))
            .collect(),
        Subject::Trace(t) => {
            let n = t.trace().num_images();
            let ids: Vec<usize> = if args.images.is_empty() {
                (0..n).collect()
            } else {
                args.images.clone()
            };
            if let Some(&bad) = ids.iter().find(|&&i| i >= n) {
                anyhow::bail!("--images {bad}: the trace holds {n} images (0..{})", n - 1);
            }
            ids.into_iter()
                .map(|i| {
                    let name = t.trace().image_name(i);
                    (Item::TraceImage(i), format!("{i:05}-{name}"))
                })
                .collect()
        }
    };
    if images.is_empty() {
        anyhow::bail!("no image files in {:?}", args.inputs);
    }
    if let Subject::Trace(t) = &subject {
        // A what-if the trace cannot answer fails once, before any file is written.
        let base = RunOptions::from_config(&cfg);
        for r in &routers {
            t.check_options(&base.clone().with_router(r.clone()))?;
        }
    }
    // Everything is written into a staging folder beside `--out` and moved in at the end: a
    // run that fails (or is stopped) leaves `--out` as it was.
    let staged = StagedDir::new(&args.out)
        .with_context(|| format!("--out {}: cannot write there", args.out.display()))?;
    let bar = ProgressBar::new(images.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let e = cfg.moe.as_ref().map_or(0, |m| m.num_experts);
    // Summary accumulators: per (panel, expert) token sums, dropped and total tokens.
    let panels_per_image = if args.compare.is_empty() {
        args.layer.map_or(layers, |_| 1)
    } else {
        routers.len()
    };
    let mut load = vec![vec![0.0f64; e]; panels_per_image];
    let mut dropped = vec![0usize; panels_per_image];
    let mut tokens = vec![0usize; panels_per_image];
    let mut panel_names = vec![String::new(); panels_per_image];
    let mut done = 0usize;
    let mut skipped: Vec<String> = Vec::new();
    for (item, name) in &images {
        bar.set_message(name.clone());
        match export_one(
            &subject,
            item,
            name,
            &routers,
            args,
            &model_name,
            staged.path(),
        ) {
            Ok(panels) => {
                for (i, (name, r)) in panels.iter().enumerate() {
                    panel_names[i] = name.clone();
                    for (l, v) in load[i].iter_mut().zip(r.tokens_per_expert()) {
                        *l += v as f64;
                    }
                    dropped[i] += r.dropped_count();
                    tokens[i] += r.tokens.len();
                }
                done += 1;
            }
            Err(err) => {
                // The error names the file when it comes from reading it; say it once.
                let text = format!("{err:#}");
                let shown = match item {
                    Item::File(path) => path.display().to_string(),
                    Item::TraceImage(i) => format!("trace image {i}"),
                };
                let text = if text.starts_with(&shown) {
                    text
                } else {
                    format!("{shown}: {text}")
                };
                bar.suspend(|| eprintln!("skipped {text}"));
                skipped.push(text);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summary = json!({
        "model": model_name,
        "router": main_router,
        "images_exported": done,
        "images_skipped": skipped,
        "panels": panel_names.iter().enumerate().map(|(i, n)| json!({
            "panel": n,
            "mean_tokens_per_expert": load[i].iter().map(|v| v / done.max(1) as f64).collect::<Vec<_>>(),
            "dropped_token_rate": dropped[i] as f64 / tokens[i].max(1) as f64,
        })).collect::<Vec<_>>(),
    });
    routerscope::tensor_io::write_atomic(
        &staged.path().join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    staged
        .commit()
        .with_context(|| format!("--out {}: moving the files in", args.out.display()))?;
    let summary_path = args.out.join("summary.json");
    println!(
        "exported {done} images to {} (summary: {})",
        args.out.display(),
        summary_path.display()
    );
    for (i, n) in panel_names.iter().enumerate().filter(|_| done > 0) {
        let mean: Vec<String> = load[i]
            .iter()
            .map(|v| format!("{:.1}", v / done.max(1) as f64))
            .collect();
        println!(
            "  {n}: mean tokens per expert [{}], dropped {:.2}%",
            mean.join(" "),
            100.0 * dropped[i] as f64 / tokens[i].max(1) as f64
        );
    }
    if !skipped.is_empty() {
        anyhow::bail!(
            "{} of {} images were skipped (see above)",
            skipped.len(),
            images.len()
        );
    }
    Ok(())
}

/// Exports one image; returns its panels' names and routings for the summary.
fn export_one(
    subject: &Subject,
    item: &Item,
    image_name: &str,
    routers: &[RouterConfig],
    args: &ExportArgs,
    model_name: &str,
    out: &Path,
) -> anyhow::Result<Vec<(String, ImageRouting)>> {
    let cfg = subject.config();
    let moe = cfg.moe.as_ref().context("no MoE layers")?;
    let base = RunOptions::from_config(cfg);
    // The batch one run routes and where this image sits in it: the file alone, or the trace's
    // routing group that holds the image.
    let (image, pixels, batch, index, group_images) = match (subject, item) {
        (Subject::Model(_), Item::File(path)) => {
            let image = decode_image(path)?;
            let pixels = preprocess(&image, cfg)?;
            (image, vec![pixels], Vec::new(), 0, 1)
        }
        (Subject::Trace(t), Item::TraceImage(i)) => {
            let trace = t.trace();
            let g = trace.group_images();
            let first = i / g * g;
            let ids: Vec<usize> = (first..first + g).collect();
            (trace.image(*i)?, Vec::new(), ids, i - first, g)
        }
        _ => anyhow::bail!("internal: an image of another kind of subject"),
    };
    let mut panels = Vec::new();
    let mut prediction = Vec::new();
    let mut prev: Option<routerscope::model::ForwardOutput> = None;
    for r in routers {
        let opts = RunOptions {
            group_images,
            ..base.clone().with_router(r.clone())
        };
        let out = match (subject, &prev) {
            (Subject::Model(m), Some(p)) => m.rerun(p, &opts)?,
            (Subject::Model(m), None) => m.forward(&pixels, &opts)?,
            (Subject::Trace(t), _) => t.route_ids(&batch, &opts)?,
        };
        if prediction.is_empty() && !out.probs[index].is_empty() {
            let probs = &out.probs[index];
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            prediction = order
                .iter()
                .take(5)
                .map(|&c| (cfg.class_name(c), probs[c]))
                .collect();
        }
        let layers: Vec<usize> = match (args.layer, routers.len()) {
            (Some(l), _) => vec![l],
            (None, 1) => (0..moe.layers.len()).collect(),
            (None, _) => vec![0],
        };
        for l in layers {
            let rec = &out.records[l];
            let routing = ImageRouting::new(&rec.groups[0], index, cfg.seq_len());
            let title = if routers.len() > 1 {
                format!("{} · block {}", r.kind.display_name(), rec.block)
            } else {
                format!("block {}", rec.block)
            };
            panels.push(FigurePanel {
                title,
                block: rec.block,
                routing,
            });
        }
        prev = Some(out);
    }
    // A feature model's figure says how far this routing moves its representation.
    let fidelity = match (subject, &prev, routers.len()) {
        (Subject::Model(m), Some(out), 1) if cfg.is_feature_model() => {
            let all = m.rerun(out, &all_experts_options(cfg))?;
            let skip = cfg.seq_len() - cfg.num_patches();
            Some(mean_patch_cosine(
                &out.features,
                &all.features,
                cfg.hidden_size,
                skip,
            ))
        }
        _ => None,
    };
    let router = &routers[0];
    let title = if routers.len() > 1 {
        format!("{image_name} · {} · router comparison", short(model_name))
    } else {
        format!(
            "{image_name} · {} · {} (k = {}, {})",
            short(model_name),
            router.kind.display_name(),
            router.experts_per_token(),
            capacity_text(router)
        )
    };
    let title = match fidelity {
        Some(f) => format!("{title} · fidelity {f:.3} (mean patch cosine vs all experts)"),
        None => title,
    };
    let set = FigureSet {
        title,
        image_name,
        image: &image,
        grid: cfg.grid(),
        prefix: cfg.prefix(),
        palette: Palette::TolMuted,
        opacity: 0.55,
        panels: &panels,
        prediction,
        fidelity,
    };
    let mut stem = default_stem(image_name, model_name, router);
    if routers.len() > 1 {
        stem = format!(
            "{}__compare",
            stem.split("__").take(2).collect::<Vec<_>>().join("__")
        );
    }
    set.write(out, &stem, &args.format, args.width)
        .map_err(anyhow::Error::msg)?;
    Ok(panels.into_iter().map(|p| (p.title, p.routing)).collect())
}

fn short(model: &str) -> String {
    Path::new(model)
        .file_stem()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_string())
}

fn capacity_text(r: &RouterConfig) -> String {
    match r.capacity {
        CapacitySpec::Factor(f) if r.kind != RouterKind::SoftMoe => {
            format!("capacity factor {}", routerscope::format::number(f))
        }
        CapacitySpec::Slots(n) if r.kind != RouterKind::SoftMoe => format!("capacity {n}"),
        CapacitySpec::Slots(n) => format!("{n} slots per expert"),
        CapacitySpec::Factor(_) => "slots from mu".to_string(),
    }
}
