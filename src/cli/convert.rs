//! `routerscope convert --from-vmoe PREFIX`: a vmoe checkpoint (index + msgpack shards) to a
//! routerscope safetensors checkpoint, streaming, with progress on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use routerscope::import::load_vmoe;
use routerscope::model::{ModelConfig, save_checkpoint};

/// A model configuration is a few kilobytes (ImageNet-21k's class names: under 1 MB).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// vmoe checkpoint: PREFIX (or PREFIX.index) of PREFIX.index and PREFIX.data-*-of-*.
    #[arg(long)]
    from_vmoe: PathBuf,
    /// Architecture as JSON (docs/checkpoint-format.md); default: the released V-MoE preset whose
    /// tensor shapes match.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output checkpoint (.safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => {
            let json = routerscope::files::read_regular_string(p, MAX_CONFIG_BYTES)
                .with_context(|| format!("{}", p.display()))?;
            Some(ModelConfig::from_json(&json).with_context(|| format!("{}", p.display()))?)
        }
        None => None,
    };
    let start = Instant::now();
    let mut last = 0u64;
    let mut printed = false;
    let mut progress = |done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if pct >= last + 5 || pct == 100 {
            last = pct;
            printed = true;
            eprint!(
                "\rreading vmoe checkpoint: {pct:3}% ({} of {} MB)",
                done >> 20,
                total >> 20
            );
            let _ = std::io::stderr().flush();
        }
    };
    let loaded = load_vmoe(&args.from_vmoe, config, &mut progress);
    if printed {
        // End the progress line, so that an error starts a line of its own.
        eprintln!();
    }
    let (cfg, weights) = loaded?;
    save_checkpoint(&args.out, &cfg, &weights)?;
    let params: usize = weights.values().map(|t| t.data.len()).sum();
    println!(
        "{} ({} tensors, {:.1} M parameters) -> {} in {:.1} s",
        cfg.name,
        weights.len(),
        params as f64 / 1e6,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
