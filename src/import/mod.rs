//! Importers of pretrained ViTs from other frameworks into routerscope checkpoints, one file per
//! format: timm state dicts ([`timm`]) and Hugging Face checkpoints ([`hf`]) in safetensors or
//! in PyTorch's own zip format ([`pytorch`], its pickles read by [`pickle`] without running
//! code), dense
//! Flax ViTs as `.npz` ([`big_vision`]: big_vision, the original ViT, vmoe), and ONNX graphs from
//! any exporter ([`onnx`], its protobuf messages in [`onnx_proto`]), and vmoe's msgpack
//! V-MoE checkpoints ([`vmoe`], the format itself in [`vmoe_format`]); the position-embedding
//! resampling they share is [`resample`]. [`load_any`] opens a checkpoint of either kind the
//! viewer runs directly: routerscope safetensors or a vmoe `.index`.

pub mod big_vision;
pub mod hf;
pub mod onnx;
pub mod onnx_proto;
pub mod pickle;
pub mod pytorch;
pub mod resample;
pub mod timm;
pub mod vmoe;
pub mod vmoe_format;

use std::path::Path;

use serde_json::Value;

pub use vmoe::load_vmoe;

use crate::model::{
    Classifier, Gelu, ModelConfig, ModelError, ModelWeights, PrefixTokens, load_checkpoint,
};
use crate::tensor_io::{F32Tensor, TensorFile, TensorIoError};

/// A file of named tensors a state-dict importer reads: safetensors, or a PyTorch checkpoint
/// (`torch.save`'s zip format, told apart by its contents, whatever its name).
pub enum WeightsFile {
    Safetensors(TensorFile),
    PyTorch(pytorch::TorchFile),
}

impl WeightsFile {
    pub fn open(path: &Path) -> Result<Self, TensorIoError> {
        if pytorch::is_torch_zip(path) {
            pytorch::TorchFile::open(path).map(Self::PyTorch)
        } else {
            TensorFile::open(path).map(Self::Safetensors)
        }
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Result<Vec<String>, TensorIoError> {
        match self {
            Self::Safetensors(f) => f.names(),
            Self::PyTorch(f) => Ok(f.names()),
        }
    }

    /// Tensor `name` as f32, every value finite (`expected` describes it when it is missing).
    pub fn float(&self, name: &str, expected: &str) -> Result<F32Tensor, TensorIoError> {
        match self {
            Self::Safetensors(f) => f.float(name, expected),
            Self::PyTorch(f) => f.float(name, expected),
        }
    }
}

/// Whether `path` names a vmoe checkpoint (its `.index` file) rather than safetensors.
pub fn is_vmoe_checkpoint(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "index")
}

/// Loads a checkpoint of either format: safetensors, or a vmoe `.index` whose architecture is a
/// released preset or is described by a `PREFIX.config.json` beside it.
pub fn load_any(path: &Path) -> Result<(ModelConfig, ModelWeights), ModelError> {
    if is_vmoe_checkpoint(path) {
        let sidecar = vmoe_format::checkpoint_prefix(path).with_extension("config.json");
        let config = if sidecar.exists() {
            let json = crate::files::read_regular_string(&sidecar, 16 << 20)
                .map_err(|e| ModelError::Config(format!("{}: {e}", sidecar.display())))?;
            Some(
                ModelConfig::from_json(&json)
                    .map_err(|e| ModelError::Config(format!("{}: {e}", sidecar.display())))?,
            )
        } else {
            None
        };
        load_vmoe(path, config, &mut |_, _| {})
    } else {
        load_checkpoint(path)
    }
}

/// What the caller knows that a checkpoint's weights do not say (each importer documents where
/// it looks first).
#[derive(Clone, Debug, Default)]
pub struct WeightsOptions {
    /// Attention heads.
    pub heads: Option<usize>,
    /// Input normalisation per channel.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// The MLP activation, the LayerNorm epsilon and the pooling, where the file does not say.
    pub gelu: Option<Gelu>,
    pub eps: Option<f32>,
    pub pool: Option<Classifier>,
    /// The input size; the position embedding is resized to it (bicubic, as the source
    /// framework interpolates) when it differs from the trained one.
    pub image_size: Option<[usize; 2]>,
    pub name: String,
}

/// Lays out a source position embedding `pos` (`[1, T, d]`, `T` = the first `k` of the prefix
/// tokens, then a square grid of patches) as routerscope's `[1, P + patches, d]`: a prefix token
/// the source adds no position to (registers; timm's `no_embed_class` CLS) gets a zero row, the
/// same function. `k` is the first of the framework's possible `covered` counts that leaves a
/// square grid. Returns the rows and the grid side.
pub(crate) fn position_rows(
    pos: &F32Tensor,
    d: usize,
    prefix: PrefixTokens,
    covered: &[usize],
    what: &str,
) -> Result<(Vec<f32>, usize), String> {
    let t = pos.data.len() / d.max(1);
    if d == 0 || pos.shape != [1, t, d] {
        return Err(format!(
            "`{what}` has shape {:?}, expected [1, tokens, {d}]",
            pos.shape
        ));
    }
    let square = |n: usize| {
        let side = (n as f64).sqrt().round() as usize;
        (side > 0 && side * side == n).then_some(side)
    };
    let Some((k, side)) = covered
        .iter()
        .copied()
        .filter(|&k| k <= t)
        .find_map(|k| square(t - k).map(|s| (k, s)))
    else {
        return Err(format!(
            "`{what}` holds {t} positions: not {} prefix tokens and a square grid of patches",
            prefix.count()
        ));
    };
    let np = prefix.count();
    let mut rows = vec![0.0f32; (np + side * side) * d];
    rows[..k * d].copy_from_slice(&pos.data[..k * d]);
    rows[np * d..].copy_from_slice(&pos.data[k * d..]);
    Ok((rows, side))
}

/// Brings an imported model to `size` pixels: the patch rows of its position embedding are
/// resampled the way its framework does (`kind`), the prefix rows kept.
pub(crate) fn resize_input(
    cfg: &mut ModelConfig,
    weights: &mut ModelWeights,
    size: [usize; 2],
    kind: resample::Resample,
) -> Result<(), ModelError> {
    if size == cfg.image_size {
        return Ok(());
    }
    let [ph, pw] = cfg.patch_size;
    if size[0] == 0 || size[1] == 0 || !size[0].is_multiple_of(ph) || !size[1].is_multiple_of(pw) {
        return Err(ModelError::Config(format!(
            "--image-size {}x{} is not a positive multiple of the patch size {ph}x{pw}",
            size[0], size[1]
        )));
    }
    if size[0].max(size[1]) > 16_384 {
        return Err(ModelError::Config(format!(
            "--image-size {}x{} is beyond the limit of 16384",
            size[0], size[1]
        )));
    }
    let d = cfg.hidden_size;
    let np = cfg.prefix().count();
    let old = cfg.grid();
    let new = [size[0] / ph, size[1] / pw];
    let name = "Encoder/posembed_input/pos_embedding";
    let pos = weights
        .get_mut(name)
        .ok_or_else(|| ModelError::Config(format!("no `{name}` to resize")))?;
    let mut rows = pos.data[..np * d].to_vec();
    rows.extend(resample::resample(kind, &pos.data[np * d..], old, new, d));
    *pos = F32Tensor {
        shape: vec![1, np + new[0] * new[1], d],
        data: rows,
    };
    cfg.image_size = size;
    cfg.validate()
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
    BigVision,
    Onnx,
}

impl Format {
    /// The format of `path`, from its contents (whatever its name): a zip archive holding a
    /// `data.pkl` is a PyTorch checkpoint and any other zip a Flax `.npz`; a safetensors file or
    /// a PyTorch checkpoint is told apart by its tensor names (timm's or Hugging Face's); a
    /// protobuf starting with ModelProto's `ir_version` field is ONNX; the extension decides
    /// only for a file whose first bytes say nothing, so that the format's own reader reports
    /// what is wrong with it.
    pub fn detect(path: &Path) -> Result<Self, String> {
        use std::io::Read;
        let mut head = Vec::with_capacity(16);
        let file =
            crate::files::open_regular(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        file.take(16)
            .read_to_end(&mut head)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let ext = |e: &str| path.extension().is_some_and(|x| x.eq_ignore_ascii_case(e));
        let zip = head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06");
        if zip && !pytorch::is_torch_zip(path) {
            return Ok(Format::BigVision);
        }
        // torch.save's format before 1.6: a pickled magic number, then pickles and raw storages.
        if head.starts_with(&[0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20]) {
            return Err(format!(
                "{}: a PyTorch checkpoint in the format before PyTorch 1.6: re-save it with a \
                 current torch.save (the zip format is read)",
                path.display()
            ));
        }
        // safetensors: an 8-byte little-endian header length, then the JSON header.
        let safetensors = head.len() >= 9
            && head[8] == b'{'
            && u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8])) < len;
        if !safetensors && !zip {
            // ModelProto field 1 (`ir_version`, varint): tag byte 0x08; every exporter writes
            // it first.
            if head.first() == Some(&0x08) || ext("onnx") {
                return Ok(Format::Onnx);
            }
            if ext("npz") {
                return Ok(Format::BigVision);
            }
            if !ext("safetensors") {
                return Err(format!(
                    "{}: not a format `routerscope import` reads (a timm or Hugging Face ViT \
                     in safetensors or a PyTorch checkpoint, a Flax ViT .npz, or ONNX): it \
                     starts with bytes {:02x?}",
                    path.display(),
                    &head[..head.len().min(8)]
                ));
            }
        }
        let names = WeightsFile::open(path)
            .and_then(|f| f.names())
            .map_err(|e| e.to_string())?;
        if timm::is_timm_state_dict(&names) {
            return Ok(Format::Timm);
        }
        if hf::hf_root(&names).is_some() {
            return Ok(Format::HuggingFace);
        }
        Err(format!(
            "{}: not a format `routerscope import` reads (a timm or Hugging Face ViT state dict \
             in safetensors or a PyTorch checkpoint, a Flax ViT .npz, or ONNX): not a ViT, its \
             tensors start {}",
            path.display(),
            names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor_io::{OutTensor, write_f32_safetensors};

    #[test]
    fn formats_are_detected_from_contents_not_names() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        // A zip archive under any name is a Flax .npz.
        assert_eq!(
            Format::detect(&at("weights.bin", b"PK\x03\x04rest")),
            Ok(Format::BigVision)
        );
        // ONNX's first field (ir_version = 8) under a wrong extension.
        assert_eq!(
            Format::detect(&at("model.npz", &[0x08, 0x08, 0x12, 0x07])),
            Ok(Format::Onnx)
        );
        // A timm state dict named .onnx.
        let timm = dir.path().join("renamed.onnx");
        let data = [0.0f32; 4];
        let t = |name| OutTensor {
            name,
            shape: vec![4],
            data: &data,
        };
        write_f32_safetensors(
            &timm,
            &[t("patch_embed.proj.weight"), t("blocks.0.norm1.weight")],
            Default::default(),
        )
        .unwrap();
        assert_eq!(Format::detect(&timm), Ok(Format::Timm));
        // Bytes that say nothing: the extension picks the reader that reports the problem.
        assert_eq!(Format::detect(&at("empty.onnx", b"")), Ok(Format::Onnx));
        let e = Format::detect(&at("notes.txt", b"hello world")).unwrap_err();
        assert!(e.contains("notes.txt") && e.contains("68, 65, 6c"), "{e}");
        let e = Format::detect(&dir.path().join("missing.onnx")).unwrap_err();
        assert!(e.contains("missing.onnx"), "{e}");
    }
}
