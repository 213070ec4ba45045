//! Writes seeded random weights shaped like a released V-MoE (or any preset) in vmoe's checkpoint
//! format, to measure loading and conversion at full size:
//! `cargo run --release --example write_vmoe_checkpoint -- PRESET PREFIX [SHARDS]`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use routerscope::import::vmoe_format::write_checkpoint;
use routerscope::model::{random_weights, vmoe_presets};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let names: Vec<String> = vmoe_presets().into_iter().map(|c| c.name).collect();
    let (Some(name), Some(prefix)) = (args.get(1), args.get(2)) else {
        anyhow::bail!(
            "usage: write_vmoe_checkpoint PRESET PREFIX [SHARDS]; presets: {}",
            names.join(", ")
        );
    };
    let shards: usize = args.get(3).map_or(Ok(4), |s| s.parse())?;
    let cfg = vmoe_presets()
        .into_iter()
        .find(|c| &c.name == name)
        .ok_or_else(|| anyhow::anyhow!("unknown preset `{name}`; presets: {}", names.join(", ")))?;
    let weights = random_weights(&cfg, 0);
    let arrays: BTreeMap<_, _> = weights
        .into_iter()
        .map(|(k, v)| (format!("params/{k}"), v))
        .collect();
    let params: usize = arrays.values().map(|t| t.data.len()).sum();
    // vmoe splits arrays into chunks of at most 256 MB.
    write_checkpoint(&PathBuf::from(prefix), &arrays, shards, 64 << 20, 16 << 20)?;
    println!(
        "{name}: {:.1} M parameters in {shards} shards at {prefix}",
        params as f64 / 1e6
    );
    Ok(())
}
