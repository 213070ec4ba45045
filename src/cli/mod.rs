//! Command-line front end: argument parsing and the subcommands.

mod analyze;
mod convert;
mod diff;
mod distill;
mod eval;
mod export;
mod features;
mod gpu_check;
mod import;
mod init_model;
mod moefy;
mod predict;
mod route;
mod train;

use clap::{Parser, Subcommand};
use routerscope::backend::{DeviceChoice, Engine};

#[derive(Parser, Debug)]
#[command(
    name = "routerscope",
    version,
    about = "Look inside vision Mixture-of-Experts routing"
)]
pub struct Cli {
    /// Without a subcommand the desktop viewer opens on the built-in models and sample images.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Open the desktop viewer (optionally on a checkpoint and images).
    #[cfg(feature = "app")]
    App(AppArgs),
    /// Apply one router to tensors in a safetensors file and write its dispatch and combine tensors.
    Route(route::RouteArgs),
    /// Classify images and summarise how every MoE layer routed their patches.
    Predict(predict::PredictArgs),
    /// Write a seeded random checkpoint of a named architecture.
    InitModel(init_model::InitModelArgs),
    /// Convert a vmoe checkpoint (index + msgpack shards) to a routerscope safetensors checkpoint.
    Convert(convert::ConvertArgs),
    /// Train a Fashion-MNIST ViT-MoE with one router (or `dense`), checkpointing every epoch.
    Train(train::TrainArgs),
    /// Test accuracy and routing statistics of a checkpoint on Fashion-MNIST.
    Eval(eval::EvalArgs),
    /// Routing figures (PNG, SVG) and their data (CSV, JSON) for images, with a run summary.
    Export(export::ExportArgs),
    /// Routing statistics, figures and the expert atlas over a dataset (a folder or Fashion-MNIST).
    Analyze(analyze::AnalyzeArgs),
    /// Import a pretrained dense ViT (timm, Hugging Face, a Flax .npz or any ONNX export) as a routerscope model.
    Import(import::ImportArgs),
    /// Turn a dense checkpoint's MLPs into MoE layers (MoEfication), calibrated on photos.
    Moefy(moefy::MoefyArgs),
    /// Train an MoE's layers (routers, experts) to reproduce its dense original's features
    /// under one router, on photos; every other weight frozen.
    Distill(distill::DistillArgs),
    /// Check the GPU backend on this machine's adapter: parity with the CPU, then CPU and GPU
    /// timings of the benchmark models with launch, pass and readback counts.
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Write every token's final features for images, under the model's routing or a what-if.
    Features(features::FeaturesArgs),
    /// Compare two routings of the same images (two traces or run snapshots): per MoE block the
    /// share of tokens whose top-1 expert and whose chosen set differ, and per-patch maps.
    Diff(diff::DiffArgs),
}

#[cfg(feature = "app")]
#[derive(clap::Args, Debug, Default)]
pub struct AppArgs {
    /// Checkpoint to open (.safetensors or a vmoe .index) in what-if mode.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Where the model runs: `auto` (a hardware GPU if there is one), `gpu` (any adapter,
    /// software ones included) or `cpu` [default: the last choice made in the app, else auto].
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// Images to open besides the sample gallery, a routing trace (`docs/trace-format.md`) to
    /// open with its own images, or a run (`docs/run-format.md`: its folder or `run.sqlite`) to
    /// open in the Timeline.
    images: Vec<std::path::PathBuf>,
}

impl Cli {
    /// Whether this opens the desktop viewer (no subcommand, or `app`).
    pub fn opens_app(&self) -> bool {
        match &self.command {
            None => true,
            #[cfg(feature = "app")]
            Some(Command::App(_)) => true,
            Some(_) => false,
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        return default_command();
    };
    match command {
        #[cfg(feature = "app")]
        Command::App(a) => {
            // A run opens the Timeline; a routing trace among the files is opened as the
            // "model" (its images with it).
            let (runs, files): (Vec<_>, Vec<_>) = a
                .images
                .into_iter()
                .partition(|p| routerscope::run::is_run(p));
            if runs.len() > 1 {
                anyhow::bail!("open one run at a time");
            }
            let (traces, images): (Vec<_>, Vec<_>) = files
                .into_iter()
                .partition(|p| routerscope::trace::is_trace_file(p));
            if traces.len() > 1 || (a.model.is_some() && !traces.is_empty()) {
                anyhow::bail!("open one checkpoint or one routing trace at a time");
            }
            let model = a.model.or_else(|| traces.into_iter().next());
            routerscope::app::run_app(images, model, a.device, runs.into_iter().next())
        }
        Command::Route(args) => route::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::InitModel(args) => init_model::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Analyze(args) => analyze::run(&args),
        Command::Import(args) => import::run(&args),
        Command::Moefy(args) => moefy::run(&args),
        Command::Distill(args) => distill::run(&args),
        Command::Features(args) => features::run(&args),
        Command::GpuCheck(args) => gpu_check::run(&args),
        Command::Diff(args) => diff::run(&args),
    }
}

/// `--precision`: how a written checkpoint stores its floats.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrecisionArg(pub routerscope::tensor_io::Precision);

impl std::str::FromStr for PrecisionArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use routerscope::tensor_io::Precision;
        match s {
            "f32" => Ok(Self(Precision::F32)),
            "f16" => Ok(Self(Precision::F16)),
            "bf16" => Ok(Self(Precision::BF16)),
            _ => Err(format!(
                "unknown precision `{s}` (expected f32, f16 or bf16)"
            )),
        }
    }
}

/// `H` or `HxW` in pixels.
pub(crate) fn parse_size(s: &str) -> anyhow::Result<[usize; 2]> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| (1..=16_384).contains(&n))
            .ok_or_else(|| anyhow::anyhow!("image size `{s}`: expected H or HxW, 1 to 16384 px"))
    };
    match s.split_once('x') {
        Some((h, w)) => Ok([parse(h)?, parse(w)?]),
        None => {
            let n = parse(s)?;
            Ok([n, n])
        }
    }
}

#[cfg(feature = "app")]
fn default_command() -> anyhow::Result<()> {
    routerscope::app::run_app(Vec::new(), None, None, None)
}

#[cfg(not(feature = "app"))]
fn default_command() -> anyhow::Result<()> {
    anyhow::bail!(
        "this routerscope was built without the desktop app (feature `app`); \
         give a subcommand (see `routerscope --help`)"
    )
}

/// Loads `path` on the device `choice` names, printing why the GPU is not used where it was
/// wanted.
pub(crate) fn load_engine(path: &std::path::Path, choice: DeviceChoice) -> anyhow::Result<Engine> {
    let (ctx, notice) = choice.headless();
    if let Some(n) = notice {
        eprintln!("routerscope: {n}");
    }
    let engine = Engine::load(path, ctx.as_ref())?;
    report_notice(&engine);
    Ok(engine)
}

/// Prints the engine's notice (a GPU that failed over to the CPU), if any.
pub(crate) fn report_notice(engine: &Engine) {
    if let Some(n) = engine.take_notice() {
        eprintln!("routerscope: {n}");
    }
}
