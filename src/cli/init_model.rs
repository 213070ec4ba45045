//! `routerscope init-model`: a seeded random checkpoint of a named architecture (for benchmarks,
//! tests, and the viewer before trained models exist).

use std::path::PathBuf;

use anyhow::Context;
use routerscope::model::{PRESETS, preset, random_weights, save_checkpoint};
use routerscope::routing::RouterKind;

#[derive(clap::Args, Debug)]
pub struct InitModelArgs {
    /// Architecture: fashion-mnist or vit-s16.
    #[arg(long, default_value = "fashion-mnist")]
    preset: String,
    /// Router the checkpoint is configured with.
    #[arg(long, default_value = "softmax-tc")]
    router: RouterKind,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output checkpoint (.safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &InitModelArgs) -> anyhow::Result<()> {
    let cfg = preset(&args.preset, args.router).with_context(|| {
        format!(
            "unknown preset `{}` (expected one of {})",
            args.preset,
            PRESETS.join(", ")
        )
    })?;
    save_checkpoint(&args.out, &cfg, &random_weights(&cfg, args.seed))?;
    println!(
        "{} (random weights, seed {}) -> {}",
        cfg.name,
        args.seed,
        args.out.display()
    );
    Ok(())
}
