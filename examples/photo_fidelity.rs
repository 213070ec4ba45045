//! The photo model's fidelity table: mean cosine similarity of the final patch features of a
//! moefied model against its dense original on held-out photos, for k in {1, 2, 4} and capacity
//! factor in {1, 1.25, 2}, under Softmax Token Choice, Sinkhorn Token Choice and Softmax Expert
//! Choice (Expert Choice at the same expert compute: capacity factor k·CF), with the tokens
//! dropped (reaching no expert in some MoE layer), in Markdown.
//!
//! `cargo run --release --example photo_fidelity -- DENSE.safetensors MOE.safetensors PHOTO...`

use routerscope::model::{RunOptions, VitMoe, load_image};
use routerscope::moefy::{all_experts_options, mean_patch_cosine};
use routerscope::routing::{CapacitySpec, RouterConfig, RouterKind};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dense, moe, photos @ ..] = &args[..] else {
        anyhow::bail!("usage: photo_fidelity DENSE MOE PHOTO...");
    };
    let dense = VitMoe::load(dense.as_ref())?;
    let model = VitMoe::load(moe.as_ref())?;
    let cfg = model.config.clone();
    let images = photos
        .iter()
        .map(|p| load_image(p.as_ref(), &cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let d = cfg.hidden_size;
    let skip = cfg.seq_len() - cfg.num_patches();
    let reference = dense.forward(&images, &RunOptions::from_config(&dense.config))?;
    let all = model.forward(&images, &all_experts_options(&cfg))?;
    println!(
        "all experts: mean patch cosine {:.6} ({} photos)\n",
        mean_patch_cosine(&all.features, &reference.features, d, skip),
        images.len()
    );
    println!("| router | k | capacity factor | mean patch cosine | tokens dropped |");
    println!("|---|---|---|---|---|");
    for kind in [
        RouterKind::SoftmaxTokenChoice,
        RouterKind::SinkhornTokenChoice,
        RouterKind::SoftmaxExpertChoice,
    ] {
        for k in [1, 2, 4] {
            for cf in [1.0, 1.25, 2.0] {
                let mut r = RouterConfig::new(kind);
                match kind {
                    RouterKind::SoftmaxExpertChoice => {
                        r.capacity = CapacitySpec::Factor(cf * k as f64);
                    }
                    _ => {
                        r.k = k;
                        r.capacity = CapacitySpec::Factor(cf);
                    }
                }
                let cf_text = match kind {
                    RouterKind::SoftmaxExpertChoice => format!("{} (= {k}·{cf})", cf * k as f64),
                    _ => format!("{cf}"),
                };
                let out =
                    match model.forward(&images, &RunOptions::from_config(&cfg).with_router(r)) {
                        Ok(out) => out,
                        Err(e) => {
                            println!("| {} | {k} | {cf_text} | — ({e}) | |", kind.cli_name());
                            continue;
                        }
                    };
                let cos = mean_patch_cosine(&out.features, &reference.features, d, skip);
                let (mut dropped, mut tokens) = (0usize, 0usize);
                for rec in &out.records {
                    for g in &rec.groups {
                        dropped += g.routing.stats().dropped_tokens.len();
                        tokens += g.routing.num_tokens;
                    }
                }
                println!(
                    "| {} | {k} | {cf_text} | {cos:.4} | {:.1}% |",
                    kind.cli_name(),
                    100.0 * dropped as f64 / tokens.max(1) as f64
                );
            }
        }
    }
    Ok(())
}
