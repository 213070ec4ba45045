//! `routerscope analyze`: routing statistics, figures and the expert atlas over a dataset.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use routerscope::analysis::source::{DataSource, TraceSource};
use routerscope::analysis::{AnalyzeOptions, analyze, report, router_runs};
use routerscope::backend::DeviceChoice;
use routerscope::figures::Palette;
use routerscope::model::{Forward, WhatIf};
use routerscope::routing::{ArgStyle, RouterKind};
use routerscope::trace::TraceModel;
use routerscope::train::{DEFAULT_DATA_DIR, Split};

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// Model checkpoint (.safetensors or a vmoe `.index`).
    #[arg(long, required_unless_present_any = ["trace", "run"], conflicts_with_all = ["trace", "run"])]
    model: Option<PathBuf>,
    /// A routing trace (`docs/trace-format.md`) instead of a model and data: its images under
    /// the logged routing, or `--router`/`--k`/`--capacity-factor` as what-ifs on its logits.
    #[arg(long, conflicts_with_all = ["data", "split", "device", "run"])]
    trace: Option<PathBuf>,
    /// A run (`docs/run-format.md`): routing over training. Writes `layers.csv` (per step and
    /// block), `experts.csv` (per step, block and expert), `alerts.json` and per block the
    /// metrics over steps and an expert x step load heatmap.
    #[arg(long, conflicts_with_all = ["data", "split", "device", "router", "k", "capacity_factor",
        "group_images", "compare", "limit"])]
    run: Option<PathBuf>,
    /// Runs: a collapse is one expert taking more than this share of a block's kept tokens...
    #[arg(long, default_value_t = 0.5, requires = "run")]
    alert_collapse_share: f64,
    /// ...for this many logged steps in a row.
    #[arg(long, default_value_t = 10, requires = "run")]
    alert_collapse_steps: usize,
    /// Runs: a dead expert processes no token for this many logged steps in a row.
    #[arg(long, default_value_t = 10, requires = "run")]
    alert_dead_steps: usize,
    /// Runs: a drop alert is a dropped-token rate above this...
    #[arg(long, default_value_t = 0.1, requires = "run")]
    alert_drop_rate: f64,
    /// ...for this many logged steps in a row.
    #[arg(long, default_value_t = 10, requires = "run")]
    alert_drop_steps: usize,
    /// A folder of images (searched recursively; the first subfolder names the class, images
    /// directly in it are unlabelled) or a Fashion-MNIST IDX directory.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// Which IDX files of a Fashion-MNIST directory: test (`t10k-*`) or train.
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    split: String,
    /// Route with this router instead of the checkpoint's (a what-if on the same weights).
    #[arg(long)]
    router: Option<RouterKind>,
    /// Experts per token (Token Choice; the compared Token Choice routers take it too).
    #[arg(long)]
    k: Option<usize>,
    /// Capacity factor (sparse routers; the compared sparse routers take it too).
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Images per routing group [default: the checkpoint's].
    #[arg(long)]
    group_images: Option<usize>,
    /// Also analyse these routers (comma-separated), with figures side by side and a summary.
    #[arg(long, value_delimiter = ',')]
    compare: Vec<RouterKind>,
    /// Analyse the first N images only.
    #[arg(long)]
    limit: Option<usize>,
    /// Patches per expert in the atlas.
    #[arg(long, default_value_t = 16)]
    atlas_size: usize,
    /// At most N atlas patches of one image per expert (0: no cap); near-duplicate tiles (the
    /// patch's own pixels within 2 RGB levels of a kept one's) are skipped either way and listed
    /// in analysis.json.
    #[arg(long, default_value_t = routerscope::analysis::atlas::DEFAULT_PER_IMAGE)]
    atlas_per_image: usize,
    /// Width in pixels of the PNG figures (wider figures keep their own width).
    #[arg(long, default_value_t = 1200)]
    png_width: u32,
    /// Where the model runs: auto, gpu or cpu (as for `predict`).
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
}

/// What an analysis runs on: a model over data, or a trace over its own images.
enum Subject {
    Model(Box<routerscope::backend::Engine>),
    Trace(TraceModel),
}

impl Subject {
    fn forward(&self) -> &dyn Forward {
        match self {
            Subject::Model(m) => &**m,
            Subject::Trace(t) => t,
        }
    }
    fn device(&self) -> String {
        match self {
            Subject::Model(m) => m.device(),
            Subject::Trace(_) => "trace (no model runs)".into(),
        }
    }
}

pub fn run(args: &AnalyzeArgs) -> anyhow::Result<()> {
    report::check_output_dir(&args.out, ArgStyle::Cli)?;
    if let Some(run) = &args.run {
        return analyze_run(args, run);
    }
    let (subject, what) = match (&args.model, &args.trace) {
        (_, Some(t)) => (
            Subject::Trace(TraceModel::open(t)?),
            t.display().to_string(),
        ),
        (Some(m), None) => (
            Subject::Model(Box::new(super::load_engine(m, args.device)?)),
            m.display().to_string(),
        ),
        (None, None) => anyhow::bail!("give --model (with --data) or --trace"),
    };
    let cfg = subject.forward().config();
    let main = WhatIf {
        router: args.router,
        k: args.k,
        capacity_factor: args.capacity_factor,
        group_images: args.group_images,
    };
    let runs = router_runs(cfg, &what, &main, &args.compare, ArgStyle::Cli)?;
    let split = if args.split == "train" {
        Split::Train
    } else {
        Split::Test
    };
    let mut source = match &subject {
        Subject::Trace(t) => DataSource::Trace(TraceSource::new(t.trace().clone())),
        Subject::Model(_) => DataSource::open(&args.data, split, &cfg.class_names)?,
    };
    if let Some(n) = args.limit {
        source.truncate(n);
    }
    if let DataSource::Folder(f) = &source
        && f.other_files > 0
    {
        eprintln!(
            "routerscope: {}: {} files are not images by their extension and were not read",
            f.root.display(),
            f.other_files
        );
    }
    let opts = AnalyzeOptions {
        runs,
        atlas_size: args.atlas_size,
        atlas_per_image: args.atlas_per_image,
        batch_tokens: AnalyzeOptions::DEFAULT_BATCH_TOKENS,
    };
    eprintln!(
        "device: {} · {} images · {} router(s)",
        subject.device(),
        source.len(),
        opts.runs.len()
    );
    let bar = ProgressBar::new(source.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:32} {pos}/{len} images · {per_sec} · {elapsed_precise} elapsed, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let analysis = {
        let _stoppable = routerscope::runtime::StoppableRun::begin();
        analyze(
            subject.forward(),
            &source,
            &opts,
            &mut |p| bar.set_position(p.done as u64),
            routerscope::runtime::stop_flag(),
        )
    };
    bar.finish_and_clear();
    if let Subject::Model(m) = &subject {
        super::report_notice(m);
    }
    let analysis = analysis?;
    for k in &analysis.skipped {
        eprintln!(
            "routerscope: note: {} left out of the comparison: {}",
            k.settings.label(),
            k.reason
        );
    }
    for u in &analysis.passed_over {
        eprintln!("routerscope: passed over {}: {}", u.image, u.error);
    }
    if analysis.passed_over_count > analysis.passed_over.len() {
        eprintln!(
            "routerscope: … and {} more entries passed over",
            analysis.passed_over_count - analysis.passed_over.len()
        );
    }
    for u in &analysis.unreadable {
        eprintln!("routerscope: skipped {}: {}", u.image, u.error);
    }
    if analysis.unreadable_count > analysis.unreadable.len() {
        eprintln!(
            "routerscope: … and {} more unreadable images",
            analysis.unreadable_count - analysis.unreadable.len()
        );
    }
    let files = routerscope::figures::dataset::write_analysis(
        &analysis,
        &args.out,
        Palette::TolMuted,
        args.png_width,
    )
    .map_err(anyhow::Error::msg)
    .context("writing the analysis")?;
    println!(
        "{}: {} images analysed ({} unreadable, {} passed over, {} left out of a partial group) in {:.1} s, {:.1} images/s",
        analysis.model,
        analysis.images,
        analysis.unreadable_count,
        analysis.passed_over_count,
        analysis.left_out,
        analysis.seconds,
        analysis.images_per_second
    );
    for run in &analysis.runs {
        for l in &run.layers {
            println!(
                "  {} · block {}: dropped {:.2}%, load std {:.2} tokens/image, usage entropy {:.3}",
                run.settings.label(),
                l.stats.block,
                100.0 * l.stats.dropped_token_rate,
                l.stats.load_std,
                l.stats.usage_entropy
            );
        }
    }
    println!("wrote {} files to {}", files.len(), args.out.display());
    if analysis.partial {
        eprintln!(
            "routerscope: interrupted: the files cover the first {} images and are marked partial",
            analysis.images
        );
        std::process::exit(130);
    }
    Ok(())
}

/// `analyze --run`: the run's tables, alerts and figures.
fn analyze_run(args: &AnalyzeArgs, path: &std::path::Path) -> anyhow::Result<()> {
    use routerscope::run::alerts::AlertRules;
    let rules = AlertRules {
        collapse_share: args.alert_collapse_share,
        collapse_steps: args.alert_collapse_steps,
        dead_steps: args.alert_dead_steps,
        drop_rate: args.alert_drop_rate,
        drop_steps: args.alert_drop_steps,
    };
    if !(0.0..1.0).contains(&rules.collapse_share) || !(0.0..1.0).contains(&rules.drop_rate) {
        anyhow::bail!(
            "--alert-collapse-share {} and --alert-drop-rate {} are shares from 0 to 1",
            rules.collapse_share,
            rules.drop_rate
        );
    }
    let started = std::time::Instant::now();
    let run = routerscope::run::RunFile::open(path)?;
    let (a, files) =
        routerscope::figures::run::write_run_analysis(&run, rules, &args.out, args.png_width)
            .map_err(anyhow::Error::msg)?;
    println!(
        "{}: {} steps ({}–{}{}), {} MoE blocks, {} alerts in {:.1} s",
        path.display(),
        a.steps,
        a.first_step.map_or("-".into(), |s| s.to_string()),
        a.last_step.map_or("-".into(), |s| s.to_string()),
        if a.partial_steps > 0 {
            format!(
                ", {} partial: not every rank has committed them",
                a.partial_steps
            )
        } else {
            String::new()
        },
        a.series.len(),
        a.alerts.len(),
        started.elapsed().as_secs_f64()
    );
    for alert in &a.alerts {
        println!(
            "  alert {} · block {} · steps {}–{}: {}",
            alert.kind.name(),
            alert.block,
            alert.first_step,
            alert.last_step,
            alert.detail
        );
    }
    println!("wrote {} files to {}", files.len(), args.out.display());
    Ok(())
}
