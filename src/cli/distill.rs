//! `routerscope distill`: an MoE's layers trained to reproduce its dense original's features
//! under one router (see `train::distill`), with a progress bar, a checkpoint every
//! `--save-every` steps and on Ctrl-C, and the fidelity before and after on held-out photos.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use routerscope::import::load_any;
use routerscope::model::{
    ModelConfig, ModelWeights, VitMoe, check_k_applies, save_checkpoint_with, save_overlay,
};
use routerscope::routing::{CapacitySpec, RouterConfig, RouterFamily, RouterKind};
use routerscope::train::distill::{DistillOptions, Distiller, Fidelity, fidelity, read_photos};

use super::PrecisionArg;

/// Metadata key of what a distilled checkpoint records about its making.
pub const DISTILL_METADATA_KEY: &str = "routerscope.distill";

#[derive(clap::Args, Debug)]
pub struct DistillArgs {
    /// The dense model the MoE was made from (its features are the target).
    #[arg(long)]
    dense: PathBuf,
    /// The MoE checkpoint to start from (every weight outside its MoE layers stays as it is).
    #[arg(long)]
    moe: PathBuf,
    /// Folder of training photos (searched recursively).
    #[arg(long)]
    data: PathBuf,
    /// Folder of held-out photos: fidelity, dropped tokens and usage entropy are measured on
    /// them before and after.
    #[arg(long)]
    holdout: Option<PathBuf>,
    /// The router to train under (any sparse router).
    #[arg(long)]
    router: RouterKind,
    /// Experts per token (Token Choice) [default: 2].
    #[arg(long)]
    k: Option<usize>,
    /// Capacity factor [default: 1.25 for Token Choice; 2.5 for Expert Choice: the same
    /// expert buffers as top-2 Token Choice at 1.25, k·CF].
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Optimizer updates.
    #[arg(long)]
    steps: usize,
    /// Crops per update.
    #[arg(long, default_value_t = DistillOptions::default().batch_size)]
    batch_size: usize,
    /// Augmented crops drawn from the photos, run through the frozen blocks once.
    #[arg(long, default_value_t = DistillOptions::default().crops)]
    crops: usize,
    /// Peak learning rate (AdamW, linear warm-up, cosine decay).
    #[arg(long, default_value_t = DistillOptions::default().peak_lr)]
    lr: f64,
    /// Seed of the crops, the batches and the router noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the checkpoint every this many steps (and at the end, and on Ctrl-C).
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// The model's name in the checkpoint [default: the MoE's, with the router appended].
    #[arg(long)]
    name: Option<String>,
    /// Store only the MoE layers, over the `--moe` file as the base (named with its SHA-256 in
    /// the metadata, checked on load); the output must sit beside it.
    #[arg(long)]
    overlay: bool,
    /// How the checkpoint stores its tensors.
    #[arg(long, default_value = "f32")]
    precision: PrecisionArg,
    /// Output checkpoint (.safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
}

fn router_from(args: &DistillArgs) -> anyhow::Result<RouterConfig> {
    let kind = args.router;
    if kind == RouterKind::SoftMoe {
        anyhow::bail!("--router soft: distillation trains the sparse routers only");
    }
    let mut r = RouterConfig::new(kind);
    let tc = kind.family() == RouterFamily::TokenChoice;
    if let Some(k) = args.k {
        check_k_applies(kind, routerscope::routing::ArgStyle::Cli)?;
        if k == 0 {
            anyhow::bail!("--k must be at least 1");
        }
        r.k = k;
    } else if tc {
        r.k = 2;
    }
    let cf = args.capacity_factor.unwrap_or(if tc { 1.25 } else { 2.5 });
    if !(cf.is_finite() && cf > 0.0) {
        anyhow::bail!("--capacity-factor must be a positive number, got {cf}");
    }
    r.capacity = CapacitySpec::Factor(cf);
    if kind == RouterKind::SoftmaxTokenChoice {
        // The V-MoE paper configs' auxiliary loss weights (λ = 0.01 split in two).
        r.loss_weights.importance = 0.005;
        r.loss_weights.load = 0.005;
    }
    Ok(r)
}

fn show(f: &Fidelity) -> String {
    format!(
        "patch cosine {:.4}, dropped {:.1}%, usage entropy {:.3}",
        f.patch_cosine,
        100.0 * f.dropped,
        f.usage_entropy
    )
}

pub fn run(args: &DistillArgs) -> anyhow::Result<()> {
    let router = router_from(args)?;
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    let dense = load_any(&args.dense).with_context(|| format!("{}", args.dense.display()))?;
    let moe = load_any(&args.moe).with_context(|| format!("{}", args.moe.display()))?;
    let (photos, skipped) = read_photos(&args.data)?;
    for (f, why) in &skipped {
        eprintln!("routerscope: skipped {}: {why}", f.display());
    }
    let holdout = match &args.holdout {
        Some(dir) => {
            let (photos, _) = read_photos(dir)?;
            photos
                .iter()
                .map(|p| routerscope::model::preprocess(p, &moe.0))
                .collect::<Result<Vec<_>, _>>()?
        }
        None => Vec::new(),
    };
    let options = DistillOptions {
        steps: args.steps,
        batch_size: args.batch_size,
        crops: args.crops,
        seed: args.seed,
        peak_lr: args.lr,
        ..DistillOptions::default()
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", moe.0.name, router.kind.cli_name()));
    let dense_model = VitMoe::new(dense.0.clone(), dense.1.clone())?;
    let before = match holdout.is_empty() {
        true => None,
        false => Some(fidelity(
            &dense_model,
            &VitMoe::new(moe.0.clone(), moe.1.clone())?,
            &router,
            &holdout,
        )?),
    };
    if let Some(b) = &before {
        eprintln!("routerscope: held out, before: {}", show(b));
    }

    let bar = ProgressBar::new(args.crops as u64).with_style(
        ProgressStyle::with_template("{msg:24} {bar:30} {pos}/{len} [{elapsed} < {eta}]")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    bar.set_message("frozen blocks");
    let mut distiller = Distiller::new(
        dense,
        moe,
        router.clone(),
        &photos,
        options.clone(),
        &mut |d, _| bar.set_position(d as u64),
    )?;
    bar.set_length(args.steps as u64);
    bar.set_position(0);
    bar.reset_eta();

    let save = |d: &Distiller, after: Option<&Fidelity>| -> anyhow::Result<()> {
        let (mut cfg, weights): (ModelConfig, ModelWeights) = d.model()?;
        cfg.name = name.clone();
        let record = serde_json::json!({
            "dense": args.dense.file_name().map(|n| n.to_string_lossy().to_string()),
            "moe": args.moe.file_name().map(|n| n.to_string_lossy().to_string()),
            "router": router.kind.cli_name(),
            "steps_done": d.step,
            "options": options,
            "holdout_before": before,
            "holdout_after": after,
        });
        let meta = HashMap::from([(DISTILL_METADATA_KEY.to_string(), record.to_string())]);
        if args.overlay {
            let keep = |n: &str| n.contains("/Moe/");
            save_overlay(
                &args.out,
                &cfg,
                &weights,
                args.precision.0,
                &args.moe,
                &keep,
                meta,
            )?;
        } else {
            save_checkpoint_with(&args.out, &cfg, &weights, args.precision.0, meta)?;
        }
        Ok(())
    };

    let _stoppable = routerscope::runtime::StoppableRun::begin();
    let stop = routerscope::runtime::stop_flag();
    let (mut loss_avg, mut fid_avg) = (f64::NAN, f64::NAN);
    while distiller.step < args.steps {
        let r = distiller.step()?;
        let mix = |avg: f64, v: f64| if avg.is_nan() { v } else { 0.9 * avg + 0.1 * v };
        loss_avg = mix(loss_avg, r.loss);
        fid_avg = mix(fid_avg, r.fidelity);
        bar.set_position(r.step as u64);
        bar.set_message(format!("loss {loss_avg:.4} cos {fid_avg:.4}"));
        if bar.is_hidden() && (r.step % 25 == 0 || r.step == 1) {
            eprintln!(
                "routerscope: step {}/{}: loss {loss_avg:.4}, batch cosine {fid_avg:.4}, \
                 dropped {:.1}%, {:.2} s/step",
                r.step,
                args.steps,
                100.0 * r.dropped,
                r.seconds
            );
        }
        let stopping = stop.load(std::sync::atomic::Ordering::SeqCst);
        if stopping || (args.save_every > 0 && r.step % args.save_every == 0) {
            save(&distiller, None)?;
        }
        if stopping {
            bar.finish_and_clear();
            eprintln!(
                "routerscope: stopped after step {} of {}; {} holds it",
                r.step,
                args.steps,
                args.out.display()
            );
            // Interrupted, as a shell expects (128 + SIGINT), with the checkpoint complete.
            std::process::exit(130);
        }
    }
    bar.finish_and_clear();
    let after = if holdout.is_empty() {
        None
    } else {
        let (cfg, weights) = distiller.model()?;
        Some(fidelity(
            &dense_model,
            &VitMoe::new(cfg, weights)?,
            &router,
            &holdout,
        )?)
    };
    save(&distiller, after.as_ref())?;
    if let Some(a) = &after {
        println!("held out, after: {}", show(a));
    }
    println!(
        "{} steps of {} crops ({} in the pool) under {} -> {} (train loss {loss_avg:.4}, \
         batch cosine {fid_avg:.4})",
        args.steps,
        args.batch_size,
        args.crops,
        router.kind.cli_name(),
        args.out.display()
    );
    Ok(())
}
