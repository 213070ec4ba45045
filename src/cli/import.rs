//! `routerscope import --onnx`: a dense ViT from ONNX (DINOv2 as Hugging Face exports it) into a
//! routerscope feature-model checkpoint.

use std::path::PathBuf;

use routerscope::model::onnx_import::{ImportOptions, import_onnx};
use routerscope::model::save_checkpoint_as;

use super::PrecisionArg;

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The ONNX file (weights inside it).
    #[arg(long)]
    onnx: PathBuf,
    /// Input size in pixels, `H` or `HxW` (the graph takes any multiple of the patch size; the
    /// position embedding is resized to it).
    #[arg(long, default_value = "224")]
    image_size: String,
    /// How the checkpoint stores its tensors.
    #[arg(long, default_value = "f32")]
    precision: PrecisionArg,
    /// Output checkpoint (.safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let image_size = super::parse_size(&args.image_size)?;
    let opts = ImportOptions {
        image_size,
        name: args
            .onnx
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "onnx".into()),
        ..ImportOptions::default()
    };
    let (cfg, weights) = import_onnx(&args.onnx, &opts)?;
    save_checkpoint_as(&args.out, &cfg, &weights, args.precision.0)?;
    let params: usize = weights.values().map(|t| t.data.len()).sum();
    println!(
        "{}: {} blocks, width {}, {} heads, MLP {}, patch {}x{}, {} tokens at {}x{}, {:.1} M parameters -> {}",
        args.onnx.display(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.mlp_dim,
        cfg.patch_size[0],
        cfg.patch_size[1],
        cfg.seq_len(),
        cfg.image_size[0],
        cfg.image_size[1],
        params as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}
