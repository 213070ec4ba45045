//! `routerscope import FILE`: a pretrained dense ViT (a timm state dict or a Hugging Face
//! checkpoint in safetensors, or an ONNX graph from any exporter) into a routerscope checkpoint.

use std::path::PathBuf;

use routerscope::import::big_vision::import_big_vision;
use routerscope::import::hf::import_hf;
use routerscope::import::onnx::import_onnx;
use routerscope::import::timm::import_timm;
use routerscope::import::{Format, WeightsOptions};
use routerscope::model::{Classifier, Gelu, save_checkpoint_as};

use super::PrecisionArg;

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The model file: a timm state dict or a Hugging Face transformers checkpoint
    /// (.safetensors, with the config.json / preprocessor_config.json beside it when there are
    /// any), a dense Flax ViT (.npz: big_vision, the original ViT, vmoe), or an ONNX file; its
    /// format is detected from its contents.
    #[arg(required_unless_present = "onnx", conflicts_with = "onnx")]
    file: Option<PathBuf>,
    /// An ONNX file (weights inside it or in the external data file beside it): the same as
    /// giving it as FILE.
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// The format, instead of detecting it (timm, hf for Hugging Face transformers, big-vision for
    /// a Flax ViT .npz from big_vision, the original ViT or vmoe, onnx).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Input size in pixels, `H` or `HxW`, a multiple of the patch size: the position embedding
    /// is resized to it bicubically, as timm and Hugging Face interpolate it [default: the size
    /// it was trained for; ONNX: the graph's input size, required for a graph of any size].
    #[arg(long)]
    image_size: Option<String>,
    /// Attention heads, where the file does not say (timm: config.json's, else its
    /// architecture's; Hugging Face: config.json's; ONNX: the graph's reshapes).
    #[arg(long)]
    heads: Option<usize>,
    /// The MLP's GELU, where the file does not say: erf (PyTorch's default) or tanh (Flax's,
    /// the .npz default).
    #[arg(long, value_enum)]
    gelu: Option<GeluArg>,
    /// The LayerNorm epsilon, where the file does not say (timm, DINOv2: 1e-6; Hugging Face
    /// ViT: 1e-12).
    #[arg(long)]
    eps: Option<f32>,
    /// How the head pools the tokens, where the file does not say: token (the CLS token) or
    /// avg (the mean of the patch tokens).
    #[arg(long, value_enum)]
    pool: Option<PoolArg>,
    /// Input normalisation mean, comma-separated per channel (timm: else config.json's
    /// pretrained_cfg, else ImageNet's; Hugging Face: preprocessor_config.json's; .npz: 0.5;
    /// ONNX: ImageNet's).
    #[arg(long, value_delimiter = ',')]
    mean: Vec<f32>,
    /// Input normalisation std, comma-separated per channel.
    #[arg(long, value_delimiter = ',')]
    std: Vec<f32>,
    /// How the checkpoint stores its tensors.
    #[arg(long, default_value = "f32")]
    precision: PrecisionArg,
    /// Output checkpoint (.safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum GeluArg {
    Erf,
    Tanh,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PoolArg {
    Token,
    Avg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Timm,
    Hf,
    BigVision,
    Onnx,
}

pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let Some(file) = args.file.as_ref().or(args.onnx.as_ref()) else {
        anyhow::bail!("give the model file to import");
    };
    let format = match (args.format, &args.onnx) {
        (Some(FormatArg::Timm), None) => Format::Timm,
        (Some(FormatArg::Hf), None) => Format::HuggingFace,
        (Some(FormatArg::BigVision), None) => Format::BigVision,
        (Some(FormatArg::Onnx), _) | (None, Some(_)) => Format::Onnx,
        (Some(_), Some(_)) => anyhow::bail!("--onnx names an ONNX file; drop --format"),
        (None, None) => Format::detect(file).map_err(anyhow::Error::msg)?,
    };
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "imported".into());
    let opts = weights_options(args, name)?;
    let (cfg, weights) = match format {
        Format::Onnx => import_onnx(file, &opts)?,
        Format::HuggingFace => import_hf(file, &opts)?,
        Format::BigVision => import_big_vision(file, &opts)?,
        Format::Timm => import_timm(file, &opts)?,
    };
    save_checkpoint_as(&args.out, &cfg, &weights, args.precision.0)?;
    let params: usize = weights.values().map(|t| t.data.len()).sum();
    println!(
        "{}: {} blocks, width {}, {} heads, MLP {}, patch {}x{}, {} tokens at {}x{}, {}, {:.1} M parameters -> {}",
        file.display(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.mlp_dim,
        cfg.patch_size[0],
        cfg.patch_size[1],
        cfg.seq_len(),
        cfg.image_size[0],
        cfg.image_size[1],
        if cfg.num_classes > 0 {
            format!("{} classes", cfg.num_classes)
        } else {
            "features".to_string()
        },
        params as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}

/// The flags an import takes.
fn weights_options(args: &ImportArgs, name: String) -> anyhow::Result<WeightsOptions> {
    if let Some(e) = args.eps
        && !(e > 0.0 && e < 0.1)
    {
        anyhow::bail!("--eps {e}: a LayerNorm epsilon is positive and small");
    }
    Ok(WeightsOptions {
        heads: args.heads,
        mean: (!args.mean.is_empty()).then(|| args.mean.clone()),
        std: (!args.std.is_empty()).then(|| args.std.clone()),
        gelu: args.gelu.map(|g| match g {
            GeluArg::Erf => Gelu::Erf,
            GeluArg::Tanh => Gelu::Tanh,
        }),
        eps: args.eps,
        pool: args.pool.map(|p| match p {
            PoolArg::Token => Classifier::Token,
            PoolArg::Avg => Classifier::Gap,
        }),
        image_size: args
            .image_size
            .as_deref()
            .map(super::parse_size)
            .transpose()?,
        name,
    })
}
