//! `routerscope features`: every token's final LayerNorm output, for any model, under its own
//! routing or a what-if.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use routerscope::backend::DeviceChoice;
use routerscope::model::{WhatIf, load_image};
use routerscope::routing::{ArgStyle, RouterKind};
use routerscope::tensor_io::{OutTensor, write_f32_safetensors};

#[derive(clap::Args, Debug)]
pub struct FeaturesArgs {
    /// Model checkpoint (.safetensors or a vmoe .index).
    #[arg(long)]
    model: PathBuf,
    /// Route with this router instead of the checkpoint's.
    #[arg(long)]
    router: Option<RouterKind>,
    /// Experts per token (Token Choice routers).
    #[arg(long)]
    k: Option<usize>,
    /// Capacity factor.
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Where the model runs: auto, gpu or cpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Output: `features` f32 [images, tokens, d] (token 0 is the CLS token when the model has
    /// one), written atomically.
    #[arg(long)]
    out: PathBuf,
    /// Image files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(args: &FeaturesArgs) -> anyhow::Result<()> {
    let model = super::load_engine(&args.model, args.device)?;
    let cfg = &model.config;
    let opts = WhatIf {
        router: args.router,
        k: args.k,
        capacity_factor: args.capacity_factor,
        group_images: None,
    }
    .run_options(cfg, &args.model.display().to_string(), ArgStyle::Cli)?;
    let images = args
        .images
        .iter()
        .map(|p| load_image(p, cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let out = model.forward(&images, &opts).context("forward pass")?;
    super::report_notice(&model);
    let data: Vec<f32> = out.features.concat();
    let shape = vec![images.len(), cfg.seq_len(), cfg.hidden_size];
    let meta = HashMap::from([
        ("model".to_string(), args.model.display().to_string()),
        (
            "images".to_string(),
            (args.images.iter())
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        (
            "cls_token".to_string(),
            (cfg.seq_len() > cfg.num_patches()).to_string(),
        ),
    ]);
    write_f32_safetensors(
        &args.out,
        &[OutTensor {
            name: "features",
            shape: shape.clone(),
            data: &data,
        }],
        meta,
    )?;
    eprintln!("device: {}", model.device());
    println!("features {shape:?} -> {}", args.out.display());
    Ok(())
}
