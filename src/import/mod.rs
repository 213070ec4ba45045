//! Importers of pretrained ViTs from other frameworks into routerscope checkpoints, one file per
//! format. So far: timm state dicts ([`timm`]) and Hugging Face checkpoints ([`hf`]) in
//! safetensors; the vmoe and ONNX readers still live in `model/` (`vmoe_format`, `onnx_import`).

pub mod hf;
pub mod timm;

use std::path::Path;

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
