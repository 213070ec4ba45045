//! `routerscope moefy`: a dense checkpoint's MLPs split into experts with fitted routers
//! (MoEfication), calibrated on a folder of photos.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use routerscope::import::load_any;
use routerscope::model::save_checkpoint_as;
use routerscope::moefy::{MoefyOptions, REPORT_K, calibration_crops, image_files, moefy};
use routerscope::routing::{RouterConfig, RouterFamily, RouterKind};

use super::PrecisionArg;

#[derive(clap::Args, Debug)]
pub struct MoefyArgs {
    /// The dense checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Experts per MoE layer (must divide the MLP width).
    #[arg(long)]
    experts: usize,
    /// Blocks (0-based) to turn into MoE layers, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<usize>,
    /// Folder of calibration photos (searched recursively).
    #[arg(long)]
    calibration: PathBuf,
    /// Random crops per calibration photo.
    #[arg(long, default_value_t = 8)]
    crops: usize,
    /// The router the checkpoint declares (any sparse router; its kernel is the fitted one).
    #[arg(long, default_value = "softmax-tc")]
    router: RouterKind,
    /// Experts per token of the declared router (Token Choice).
    #[arg(long, default_value_t = 2)]
    k: usize,
    /// Capacity factor of the declared router.
    #[arg(long, default_value_t = 1.0)]
    capacity_factor: f64,
    /// Seed of the crops, the token sample and the clustering.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Calibration tokens per layer used to cluster the hidden units.
    #[arg(long, default_value_t = 8192)]
    cluster_tokens: usize,
    /// How the checkpoint stores its tensors.
    #[arg(long, default_value = "f32")]
    precision: PrecisionArg,
    /// Output checkpoint (.safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &MoefyArgs) -> anyhow::Result<()> {
    let (cfg, weights) = load_any(&args.model)?;
    let mut router = RouterConfig::new(args.router);
    if args.router.family() == RouterFamily::TokenChoice {
        router.k = args.k;
    }
    router.capacity = routerscope::routing::CapacitySpec::Factor(args.capacity_factor);
    let opts = MoefyOptions {
        experts: args.experts,
        layers: args.layers.clone(),
        router,
        seed: args.seed,
        max_cluster_tokens: args.cluster_tokens,
    };
    routerscope::moefy::check(&cfg, &opts)?;
    let files = image_files(&args.calibration)?;
    if files.is_empty() {
        anyhow::bail!("{}: no images in this folder", args.calibration.display());
    }
    let (images, skipped) = calibration_crops(&files, &cfg, args.crops, args.seed);
    for (_, why) in &skipped {
        eprintln!("routerscope: skipped {why}");
    }
    eprintln!(
        "routerscope: calibration: {} crops of {} photos ({} skipped)",
        images.len(),
        files.len() - skipped.len(),
        skipped.len()
    );
    let bar = ProgressBar::new(1).with_style(
        ProgressStyle::with_template("{msg:28} {bar:30} {pos}/{len} [{elapsed}]")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let mut progress = |step: &str, done: usize, total: usize| {
        bar.set_message(step.to_string());
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let (moe_cfg, moe_weights, reports) = moefy(&cfg, weights, &images, &opts, &mut progress)?;
    bar.finish_and_clear();
    save_checkpoint_as(&args.out, &moe_cfg, &moe_weights, args.precision.0)?;
    for r in &reports {
        let cell = |v: &[f64]| {
            REPORT_K
                .iter()
                .zip(v)
                .map(|(k, m)| format!("top-{k} {:.1}%", 100.0 * m))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "block {}: activation mass in the router's experts {} (oracle {})",
            r.block,
            cell(&r.router_mass),
            cell(&r.oracle_mass)
        );
    }
    println!(
        "{} experts in blocks {:?} -> {}",
        args.experts,
        moe_cfg
            .moe
            .as_ref()
            .map(|m| m.layers.clone())
            .unwrap_or_default(),
        args.out.display()
    );
    Ok(())
}
