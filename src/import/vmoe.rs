//! Released vmoe checkpoints (msgpack, [`super::vmoe_format`]) as routerscope models: the
//! architecture comes from a configuration the caller gives, else from the released preset
//! whose tensor shapes match (`model::match_vmoe_preset`); names and shapes are checked before
//! any array is read.

use std::collections::BTreeMap;
use std::path::Path;

use super::vmoe_format::{read_arrays, read_index};
use crate::model::{ModelConfig, ModelError, ModelWeights, check_tensors, match_vmoe_preset};

/// Loads a vmoe checkpoint (`PREFIX` or `PREFIX.index`). Without `config`, the architecture is the
/// released preset whose shapes match, or an error asking for a configuration file.
pub fn load_vmoe(
    path: &Path,
    config: Option<ModelConfig>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let index = read_index(path)?;
    let keep = |name: &str| {
        index.leaves.iter().any(|l| l.name.starts_with("params/")) == name.starts_with("params/")
    };
    let shapes: BTreeMap<String, Vec<usize>> = index
        .leaves
        .iter()
        .filter(|l| keep(&l.name))
        .map(|l| {
            (
                l.name
                    .strip_prefix("params/")
                    .unwrap_or(&l.name)
                    .to_string(),
                l.shape.clone(),
            )
        })
        .collect();
    let cfg = match config {
        Some(cfg) => {
            cfg.validate()?;
            cfg
        }
        None => match_vmoe_preset(&shapes).ok_or_else(|| {
            let width = shapes
                .get("embedding/kernel")
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|| "none".into());
            ModelError::Config(format!(
                "{}: no released V-MoE preset matches these tensors (embedding/kernel {width}); \
                 describe the architecture in a JSON configuration (see docs/checkpoint-format.md)",
                path.display()
            ))
        })?,
    };
    // Check names and shapes before reading gigabytes.
    let placeholders: ModelWeights = shapes
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                crate::tensor_io::F32Tensor {
                    shape: s.clone(),
                    data: Vec::new(),
                },
            )
        })
        .collect();
    check_tensors(&cfg, placeholders, &path.display().to_string())?;
    let arrays: ModelWeights = read_arrays(&index, progress)?
        .into_iter()
        .filter(|(n, _)| keep(n))
        .collect();
    let weights = check_tensors(&cfg, arrays, &path.display().to_string())?;
    Ok((cfg, weights))
}
