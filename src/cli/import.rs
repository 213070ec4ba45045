//! `routerscope import FILE`: a pretrained dense ViT (a timm state dict, or ONNX as Hugging Face
//! exports DINOv2) into a routerscope checkpoint.

use std::path::PathBuf;

use routerscope::import::hf::import_hf;
use routerscope::import::timm::import_timm;
use routerscope::import::{Format, WeightsOptions};
use routerscope::model::onnx_import::{ImportOptions, import_onnx};
use routerscope::model::save_checkpoint_as;

use super::PrecisionArg;

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The model file: a timm state dict or a Hugging Face transformers checkpoint
    /// (.safetensors, with the config.json / preprocessor_config.json beside it when there are
    /// any), or an ONNX file; its format is detected from its contents.
    #[arg(required_unless_present = "onnx", conflicts_with = "onnx")]
    file: Option<PathBuf>,
    /// An ONNX file (weights inside it): the same as giving it as FILE.
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// The format, instead of detecting it (timm, hf for Hugging Face transformers, onnx).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Input size in pixels, `H` or `HxW`. ONNX: the graph takes any multiple of the patch size
    /// and the position embedding is resized to it [default: 224]. timm: the size the position
    /// embedding was trained for (the only one supported so far).
    #[arg(long)]
    image_size: Option<String>,
    /// Attention heads (timm: else config.json's, else its architecture's).
    #[arg(long)]
    heads: Option<usize>,
    /// Input normalisation mean, comma-separated per channel (timm: else config.json's
    /// pretrained_cfg, else ImageNet's).
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
pub enum FormatArg {
    Timm,
    Hf,
    Onnx,
}

pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let Some(file) = args.file.as_ref().or(args.onnx.as_ref()) else {
        anyhow::bail!("give the model file to import");
    };
    let format = match (args.format, &args.onnx) {
        (Some(FormatArg::Timm), None) => Format::Timm,
        (Some(FormatArg::Hf), None) => Format::HuggingFace,
        (Some(FormatArg::Onnx), _) | (None, Some(_)) => Format::Onnx,
        (Some(_), Some(_)) => anyhow::bail!("--onnx names an ONNX file; drop --format"),
        (None, None) => Format::detect(file).map_err(anyhow::Error::msg)?,
    };
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "imported".into());
    let (cfg, weights) = match format {
        Format::Onnx => {
            let image_size = super::parse_size(args.image_size.as_deref().unwrap_or("224"))?;
            let opts = ImportOptions {
                image_size,
                name,
                ..ImportOptions::default()
            };
            import_onnx(file, &opts)?
        }
        Format::HuggingFace => {
            let (cfg, weights) = import_hf(file, &weights_options(args, name))?;
            check_size(args.image_size.as_deref(), &cfg)?;
            (cfg, weights)
        }
        Format::Timm => {
            let (cfg, weights) = import_timm(file, &weights_options(args, name))?;
            check_size(args.image_size.as_deref(), &cfg)?;
            (cfg, weights)
        }
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

/// `--image-size` for a safetensors import: only the size the position embedding was trained
/// for, so far.
fn check_size(given: Option<&str>, cfg: &routerscope::model::ModelConfig) -> anyhow::Result<()> {
    if let Some(s) = given
        && super::parse_size(s)? != cfg.image_size
    {
        anyhow::bail!(
            "--image-size {s}: this model's position embedding is for {}x{}; resizing it is not \
             supported yet",
            cfg.image_size[0],
            cfg.image_size[1]
        );
    }
    Ok(())
}

/// The flags a safetensors import takes.
fn weights_options(args: &ImportArgs, name: String) -> WeightsOptions {
    WeightsOptions {
        heads: args.heads,
        mean: (!args.mean.is_empty()).then(|| args.mean.clone()),
        std: (!args.std.is_empty()).then(|| args.std.clone()),
        name,
    }
}
