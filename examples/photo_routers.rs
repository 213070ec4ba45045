//! The photo models' comparison table: for each sparse router, the moefied DINOv2 (a what-if
//! under that router) and its distilled model, on held-out photos, at k = 1 and 2 (Token Choice
//! at capacity factor 1.25; Expert Choice at the same expert buffers, capacity factor k·1.25): mean patch cosine to the dense model, tokens dropped, usage
//! entropy. Markdown on stdout.
//!
//! `cargo run --release --example photo_routers -- DENSE.safetensors HOLDOUT_DIR`

use routerscope::catalog::{PHOTO_ROUTERS, photo_model, photo_model_for};
use routerscope::model::{VitMoe, preprocess};
use routerscope::routing::{CapacitySpec, RouterConfig, RouterFamily};
use routerscope::train::distill::{fidelity, read_photos};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dense, holdout] = &args[..] else {
        anyhow::bail!("usage: photo_routers DENSE HOLDOUT_DIR");
    };
    let dense = VitMoe::load(dense.as_ref())?;
    let base = VitMoe::load(&photo_model())?;
    let (photos, _) = read_photos(holdout.as_ref())?;
    let images = photos
        .iter()
        .map(|p| preprocess(p, &base.config))
        .collect::<Result<Vec<_>, _>>()?;
    println!("{} held-out photos, 256 patches each\n", images.len());
    println!(
        "| router | k | capacity factor | patch cosine before → after | dropped before → after | usage entropy before → after |"
    );
    println!("|---|---|---|---|---|---|");
    for kind in PHOTO_ROUTERS {
        let Some(path) = photo_model_for(kind) else {
            println!("| {} | | | (no distilled model) | | |", kind.cli_name());
            continue;
        };
        let distilled = VitMoe::load(&path)?;
        for k in [1usize, 2] {
            let mut r = distilled
                .config
                .moe
                .as_ref()
                .map(|m| m.router.clone())
                .unwrap_or_else(|| RouterConfig::new(kind));
            let cf = if kind.family() == RouterFamily::TokenChoice {
                r.k = k;
                1.25
            } else {
                k as f64 * 1.25
            };
            r.capacity = CapacitySpec::Factor(cf);
            let b = fidelity(&dense, &base, &r, &images)?;
            let a = fidelity(&dense, &distilled, &r, &images)?;
            println!(
                "| {} | {k} | {cf} | {:.3} → **{:.3}** | {:.1}% → **{:.1}%** | {:.3} → **{:.3}** |",
                kind.cli_name(),
                b.patch_cosine,
                a.patch_cosine,
                100.0 * b.dropped,
                100.0 * a.dropped,
                b.usage_entropy,
                a.usage_entropy
            );
        }
    }
    Ok(())
}
