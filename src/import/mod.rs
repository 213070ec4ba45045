//! Importers of pretrained ViTs from other frameworks into routerscope checkpoints, one file per
//! format. So far: timm state dicts ([`timm`]) and Hugging Face checkpoints ([`hf`]) in
//! safetensors; the vmoe and ONNX readers still live in `model/` (`vmoe_format`, `onnx_import`).

pub mod hf;
pub mod timm;

use std::path::Path;

use serde_json::Value;

/// What the caller knows that a checkpoint's weights do not say (each importer documents where
/// it looks first).
#[derive(Clone, Debug, Default)]
pub struct WeightsOptions {
    /// Attention heads.
    pub heads: Option<usize>,
    /// Input normalisation per channel.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub name: String,
}

/// `given`, else the numbers at JSON `pointer` of `json`, else `fallback`.
pub(crate) fn stat_or(
    given: &Option<Vec<f32>>,
    json: Option<&Value>,
    pointer: &str,
    fallback: [f32; 3],
) -> Vec<f32> {
    given
        .clone()
        .or_else(|| {
            let v = json?.pointer(pointer)?.as_array()?;
            v.iter().map(|x| x.as_f64().map(|f| f as f32)).collect()
        })
        .unwrap_or_else(|| fallback.to_vec())
}

/// Names for a head of `k` classes that came without any: ImageNet-1k's for 1000, else
/// `class i`.
pub(crate) fn unnamed_classes(k: usize) -> Vec<String> {
    match k {
        1000 => crate::model::imagenet1k_classes(),
        k => (0..k).map(|i| format!("class {i}")).collect(),
    }
}

/// The formats `routerscope import` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Timm,
    HuggingFace,
    Onnx,
}

impl Format {
    /// The format of `path`, from its contents: ONNX by extension, a timm state dict by its
    /// tensor names.
    pub fn detect(path: &Path) -> Result<Self, String> {
        if path.extension().is_some_and(|e| e == "onnx") {
            return Ok(Format::Onnx);
        }
        let names = crate::tensor_io::TensorFile::open(path)
            .and_then(|f| f.names())
            .map_err(|e| e.to_string())?;
        if timm::is_timm_state_dict(&names) {
            return Ok(Format::Timm);
        }
        if hf::hf_root(&names).is_some() {
            return Ok(Format::HuggingFace);
        }
        Err(format!(
            "{}: not a format `routerscope import` reads (a timm or Hugging Face ViT in \
             safetensors, or ONNX); its tensors start {}",
            path.display(),
            names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        ))
    }
}
