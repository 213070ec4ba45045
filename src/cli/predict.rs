//! `routerscope predict`: class probabilities and a per-layer routing summary for images.

use std::path::PathBuf;

use anyhow::Context;
use routerscope::backend::DeviceChoice;
use routerscope::model::{WhatIf, load_image};
use routerscope::routing::{ArgStyle, RouterKind};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Model checkpoint: .safetensors with a routerscope model configuration, or the `.index` of
    /// a released vmoe V-MoE checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Route with this router instead of the checkpoint's (a what-if on the same weights).
    #[arg(long)]
    router: Option<RouterKind>,
    /// Experts per token (Token Choice routers).
    #[arg(long)]
    k: Option<usize>,
    /// Capacity factor (Soft MoE keeps the checkpoint's slots).
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Images per routing group [default: the checkpoint's, normally 1].
    #[arg(long)]
    group_images: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Where the model runs: auto (a hardware GPU if there is one, else the CPU), gpu (any
    /// adapter, software ones included; the CPU if none works) or cpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Image files (PNG, JPEG, GIF, BMP, WebP, TIFF).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(args: &PredictArgs) -> anyhow::Result<()> {
    let model = super::load_engine(&args.model, args.device)?;
    let opts = WhatIf {
        router: args.router,
        k: args.k,
        capacity_factor: args.capacity_factor,
        group_images: args.group_images,
    }
    .run_options(
        &model.config,
        &args.model.display().to_string(),
        ArgStyle::Cli,
    )?;
    let images = args
        .images
        .iter()
        .map(|p| load_image(p, &model.config))
        .collect::<Result<Vec<_>, _>>()?;
    let out = model.forward(&images, &opts).context("forward pass")?;
    super::report_notice(&model);

    let mut reports = Vec::new();
    for (i, path) in args.images.iter().enumerate() {
        let probs = &out.probs[i];
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let top5: Vec<_> = order
            .iter()
            .take(5)
            .map(|&c| json!({"class": c, "name": model.config.class_name(c), "probability": probs[c]}))
            .collect();
        let layers: Vec<_> = out
            .records
            .iter()
            .zip(&opts.routers)
            .map(|(rec, router)| {
                let g = i / opts.group_images;
                let group = &rec.groups[g];
                let st = group.routing.stats();
                json!({
                    "block": rec.block,
                    "router": router.kind.cli_name(),
                    "group_first_image": group.first_image,
                    "group_images": group.num_images,
                    "tokens": group.routing.num_tokens,
                    "capacity": st.capacity,
                    "actual_capacity_factor": st.actual_capacity_factor,
                    "tokens_per_expert": st.tokens_per_expert,
                    "dropped_tokens": st.dropped_tokens,
                })
            })
            .collect();
        reports.push(json!({"image": path.display().to_string(), "top5": top5, "layers": layers}));
    }

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"model": args.model.display().to_string(), "device": model.device(), "images": reports})
            )?
        );
        return Ok(());
    }
    eprintln!("device: {}", model.device());
    for r in &reports {
        println!("{}", r["image"].as_str().unwrap_or_default());
        if model.config.is_feature_model() {
            println!(
                "  feature model: no classes (`routerscope features` writes its token features)"
            );
        }
        for (rank, t) in r["top5"].as_array().into_iter().flatten().enumerate() {
            println!(
                "  {}. {:<24} {:.4}",
                rank + 1,
                t["name"].as_str().unwrap_or_default(),
                t["probability"].as_f64().unwrap_or_default()
            );
        }
        for l in r["layers"].as_array().into_iter().flatten() {
            let group = match l["group_images"].as_u64() {
                Some(1) => "this image".to_string(),
                n => format!(
                    "images {}..{}",
                    l["group_first_image"],
                    l["group_first_image"].as_u64().unwrap_or(0) + n.unwrap_or(0) - 1
                ),
            };
            println!(
                "  block {} ({}, group: {group}): capacity {} (factor {:.2}), tokens per expert {}, dropped {}",
                l["block"],
                l["router"].as_str().unwrap_or_default(),
                l["capacity"],
                l["actual_capacity_factor"].as_f64().unwrap_or_default(),
                l["tokens_per_expert"],
                l["dropped_tokens"].as_array().map_or(0, Vec::len),
            );
        }
    }
    Ok(())
}
