//! Checkpoints: the tensors a configuration implies (vmoe's Flax parameter paths joined with `/`),
//! strict loading from safetensors, atomic saving, and seeded random initialisation for tests and
//! for running the viewer before any model is trained.
//!
//! Loading accepts names with or without vmoe's leading `params/`, and rejects missing,
//! unexpected, mis-shaped, non-f32 and non-finite tensors with the tensor's name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::ModelError;
use super::config::{CONFIG_METADATA_KEY, Combine, ModelConfig};
use crate::routing::{CapacitySpec, RouterFamily, RouterKind};
use crate::tensor_io::{F32Tensor, OutTensor, Precision, TensorFile, write_safetensors};

/// The tensors of a model by canonical name (no `params/` prefix).
pub type ModelWeights = BTreeMap<String, F32Tensor>;

/// Metadata key naming the checkpoint format.
pub const FORMAT_METADATA_KEY: &str = "routerscope.format";
pub const FORMAT_NAME: &str = "routerscope.vit_moe.v1";

/// Metadata key of an overlay checkpoint's base, `{"file": NAME, "sha256": HEX}`: the file holds
/// only some tensors (a distilled model's MoE layers) and takes the rest from the file NAME beside
/// it, whose SHA-256 must be HEX.
pub const BASE_METADATA_KEY: &str = "routerscope.base";

/// The base an overlay checkpoint names.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BaseRef {
    pub file: String,
    pub sha256: String,
}

impl BaseRef {
    /// The base file beside `overlay`, checked: a plain file name, a regular file holding a
    /// valid safetensors header (checked before its bytes are hashed, so that a FIFO, a device
    /// or a file whose size does not match its header is refused at once), with the SHA-256
    /// the overlay recorded.
    fn resolve(&self, overlay: &Path) -> Result<(std::path::PathBuf, TensorFile), ModelError> {
        let plain = !self.file.is_empty()
            && self.file != "."
            && self.file != ".."
            && !self.file.contains(['/', '\\']);
        if !plain {
            return Err(ModelError::Config(format!(
                "{}: its base `{}` is not a plain file name (a base must sit beside the overlay)",
                overlay.display(),
                self.file
            )));
        }
        let path = overlay
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&self.file);
        // The error names the base file.
        let file = TensorFile::open(&path).map_err(|e| {
            ModelError::Config(format!("{}: needs its base model: {e}", overlay.display()))
        })?;
        let sha = crate::tensor_io::file_sha256(&path).map_err(|e| {
            ModelError::Config(format!(
                "{}: needs its base model {}: {e}",
                overlay.display(),
                path.display()
            ))
        })?;
        if !sha.eq_ignore_ascii_case(&self.sha256) {
            return Err(ModelError::Config(format!(
                "{}: its base {} has SHA-256 {sha}, but the overlay was made over {} (the base \
                 file was changed or replaced)",
                overlay.display(),
                path.display(),
                self.sha256
            )));
        }
        Ok((path, file))
    }
}

/// A tensor the configuration expects: its shape (`None` = any size) and whether it must exist.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<Option<usize>>,
    pub required: bool,
}

impl TensorSpec {
    fn new(name: String, shape: &[usize]) -> Self {
        Self {
            name,
            shape: shape.iter().map(|&d| Some(d)).collect(),
            required: true,
        }
    }

    fn matches(&self, shape: &[usize]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(a, b)| a.is_none_or(|a| a == *b))
    }

    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| d.map_or("*".into(), |d| d.to_string()))
            .collect();
        format!("[{}]", dims.join(", "))
    }
}

/// Block prefix of encoder block `i`.
pub fn block_prefix(i: usize) -> String {
    format!("Encoder/encoderblock_{i}")
}

/// Every tensor `cfg` implies, in a stable order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (d, m) = (cfg.hidden_size, cfg.mlp_dim);
    let (heads, hd) = (cfg.num_heads, cfg.head_dim());
    let [ph, pw] = cfg.patch_size;
    let mut v = vec![
        TensorSpec::new("embedding/kernel".into(), &[ph, pw, cfg.channels, d]),
        TensorSpec::new("embedding/bias".into(), &[d]),
        TensorSpec::new(
            "Encoder/posembed_input/pos_embedding".into(),
            &[1, cfg.seq_len(), d],
        ),
        TensorSpec::new("Encoder/encoder_norm/scale".into(), &[d]),
        TensorSpec::new("Encoder/encoder_norm/bias".into(), &[d]),
    ];
    if cfg.prefix().cls {
        v.push(TensorSpec::new("cls".into(), &[1, 1, d]));
    }
    if cfg.distillation_token {
        v.push(TensorSpec::new("dist".into(), &[1, 1, d]));
    }
    if cfg.register_tokens > 0 {
        v.push(TensorSpec::new(
            "registers".into(),
            &[1, cfg.register_tokens, d],
        ));
    }
    for i in 0..cfg.num_layers {
        let b = block_prefix(i);
        for ln in ["LayerNorm_0", "LayerNorm_1"] {
            v.push(TensorSpec::new(format!("{b}/{ln}/scale"), &[d]));
            v.push(TensorSpec::new(format!("{b}/{ln}/bias"), &[d]));
        }
        for p in ["query", "key", "value"] {
            v.push(TensorSpec::new(
                format!("{b}/SelfAttention/{p}/kernel"),
                &[d, heads, hd],
            ));
            v.push(TensorSpec::new(
                format!("{b}/SelfAttention/{p}/bias"),
                &[heads, hd],
            ));
        }
        v.push(TensorSpec::new(
            format!("{b}/SelfAttention/out/kernel"),
            &[heads, hd, d],
        ));
        v.push(TensorSpec::new(format!("{b}/SelfAttention/out/bias"), &[d]));
        if cfg.layer_scale {
            v.push(TensorSpec::new(format!("{b}/LayerScale_0/scale"), &[d]));
            v.push(TensorSpec::new(format!("{b}/LayerScale_1/scale"), &[d]));
        }
        match cfg.moe.as_ref().filter(|moe| moe.layers.contains(&i)) {
            None => {
                v.push(TensorSpec::new(format!("{b}/Mlp/Dense_0/kernel"), &[d, m]));
                v.push(TensorSpec::new(format!("{b}/Mlp/Dense_0/bias"), &[m]));
                v.push(TensorSpec::new(format!("{b}/Mlp/Dense_1/kernel"), &[m, d]));
                v.push(TensorSpec::new(format!("{b}/Mlp/Dense_1/bias"), &[d]));
            }
            Some(moe) => {
                let e = moe.num_experts;
                let m = moe.expert_hidden(m);
                let soft = moe.router.kind == RouterKind::SoftMoe;
                // The trained router's parameters are required; the other family's are optional
                // (present, they enable what-ifs across families).
                let mut dense = TensorSpec::new(format!("{b}/Moe/Router/dense/kernel"), &[d, e]);
                dense.required = !soft;
                let p = match (soft, moe.router.capacity) {
                    (true, CapacitySpec::Slots(p)) => Some(p),
                    _ => None,
                };
                let mu = TensorSpec {
                    name: format!("{b}/Moe/Router/mu"),
                    shape: vec![Some(d), Some(e), p],
                    required: soft,
                };
                let scale = TensorSpec {
                    name: format!("{b}/Moe/Router/scale"),
                    shape: vec![],
                    required: soft,
                };
                v.extend([dense, mu, scale]);
                v.push(TensorSpec::new(
                    format!("{b}/Moe/Mlp/Dense_0/kernel"),
                    &[e, d, m],
                ));
                v.push(TensorSpec::new(
                    format!("{b}/Moe/Mlp/Dense_0/bias"),
                    &[e, m],
                ));
                v.push(TensorSpec::new(
                    format!("{b}/Moe/Mlp/Dense_1/kernel"),
                    &[e, m, d],
                ));
                v.push(TensorSpec::new(
                    format!("{b}/Moe/Mlp/Dense_1/bias"),
                    &[e, d],
                ));
                if moe.combine == Combine::Unit {
                    v.push(TensorSpec::new(format!("{b}/Moe/bias"), &[d]));
                }
            }
        }
    }
    if cfg.is_feature_model() {
        return v;
    }
    let mut head_in = d;
    if let Some(r) = cfg.representation_size {
        v.push(TensorSpec::new("pre_logits/kernel".into(), &[d, r]));
        v.push(TensorSpec::new("pre_logits/bias".into(), &[r]));
        head_in = r;
    }
    v.push(TensorSpec::new(
        "head/kernel".into(),
        &[head_in, cfg.num_classes],
    ));
    v.push(TensorSpec::new("head/bias".into(), &[cfg.num_classes]));
    if cfg.distillation_token {
        v.push(TensorSpec::new(
            "head_dist/kernel".into(),
            &[head_in, cfg.num_classes],
        ));
        v.push(TensorSpec::new("head_dist/bias".into(), &[cfg.num_classes]));
    }
    v
}

/// Reads a checkpoint: its configuration (metadata JSON) and every tensor, strictly checked.
pub fn load_checkpoint(path: &Path) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let file = TensorFile::open(path)?;
    let meta = file.metadata()?;
    let json = meta.get(CONFIG_METADATA_KEY).ok_or_else(|| {
        ModelError::Config(format!(
            "{}: no model configuration (metadata key `{CONFIG_METADATA_KEY}`)",
            path.display()
        ))
    })?;
    let cfg = ModelConfig::from_json(json)
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    let specs = expected_tensors(&cfg);
    let mut tensors = ModelWeights::new();
    for name in file.names()? {
        // Unknown names are reported by `check_tensors`; decode only what could be valid.
        let canonical = name.strip_prefix("params/").unwrap_or(&name);
        let t = match specs.iter().find(|s| s.name == canonical) {
            Some(spec) => file.float(&name, &spec.shape_text())?,
            None => F32Tensor {
                shape: Vec::new(),
                data: Vec::new(),
            },
        };
        tensors.insert(name, t);
    }
    if let Some(base) = meta.get(BASE_METADATA_KEY) {
        let base: BaseRef = serde_json::from_str(base).map_err(|e| {
            ModelError::Config(format!(
                "{}: bad `{BASE_METADATA_KEY}` metadata: {e}",
                path.display()
            ))
        })?;
        let (base_path, file) = base.resolve(path)?;
        if file.metadata()?.contains_key(BASE_METADATA_KEY) {
            return Err(ModelError::Config(format!(
                "{}: its base {} is itself an overlay; a base must hold every tensor",
                path.display(),
                base_path.display()
            )));
        }
        for name in file.names()? {
            let canonical = name.strip_prefix("params/").unwrap_or(&name).to_string();
            if tensors.contains_key(&canonical) || tensors.contains_key(&name) {
                continue;
            }
            if let Some(spec) = specs.iter().find(|s| s.name == canonical) {
                tensors.insert(canonical, file.float(&name, &spec.shape_text())?);
            }
        }
    }
    let weights = check_tensors(&cfg, tensors, &path.display().to_string())?;
    Ok((cfg, weights))
}

/// The base file an overlay checkpoint at `path` names (beside it), or `None` for a complete
/// checkpoint or a file that cannot be read (loading it reports why).
pub fn checkpoint_base(path: &Path) -> Option<std::path::PathBuf> {
    let meta = TensorFile::open(path).ok()?.metadata().ok()?;
    let base: BaseRef = serde_json::from_str(meta.get(BASE_METADATA_KEY)?).ok()?;
    Some(
        path.parent()
            .unwrap_or_else(|| Path::new("."))
            .join(base.file),
    )
}

/// Writes `weights` as an overlay over the checkpoint `base` (which must sit in the same folder
/// as `path`): only the tensors `keep` selects are stored; every other one must equal the base's
/// bit for bit (after widening), so that loading the overlay gives exactly `weights`.
pub fn save_overlay(
    path: &Path,
    cfg: &ModelConfig,
    weights: &ModelWeights,
    precision: Precision,
    base: &Path,
    keep: &dyn Fn(&str) -> bool,
    mut extra: HashMap<String, String>,
) -> Result<(), ModelError> {
    let dir = |p: &Path| {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        std::fs::canonicalize(parent.unwrap_or_else(|| Path::new(".")))
            .map_err(|e| ModelError::Config(format!("{}: {e}", p.display())))
    };
    if dir(path)? != dir(base)? {
        return Err(ModelError::Config(format!(
            "an overlay must sit beside its base: {} is not in the folder of {}",
            path.display(),
            base.display()
        )));
    }
    let (_, base_weights) = load_checkpoint(base)?;
    for (name, t) in weights.iter().filter(|(n, _)| !keep(n)) {
        let same = base_weights.get(name).is_some_and(|b| {
            b.shape == t.shape
                && b.data
                    .iter()
                    .zip(&t.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        });
        if !same {
            return Err(ModelError::Tensor(format!(
                "`{name}` differs from the base {}: it cannot be left to the base",
                base.display()
            )));
        }
    }
    let file = base
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let sha256 = crate::tensor_io::file_sha256(base)
        .map_err(|e| ModelError::Config(format!("{}: {e}", base.display())))?;
    let record = serde_json::to_string(&BaseRef { file, sha256 })
        .map_err(|e| ModelError::Config(e.to_string()))?;
    extra.insert(BASE_METADATA_KEY.to_string(), record);
    let kept: ModelWeights = weights
        .iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    save_checkpoint_with(path, cfg, &kept, precision, extra)
}

/// Checks tensors (names with or without `params/`) against what `cfg` implies: no unexpected or
/// missing tensor, every shape right, every value finite. Returns them under canonical names.
pub fn check_tensors(
    cfg: &ModelConfig,
    tensors: ModelWeights,
    source: &str,
) -> Result<ModelWeights, ModelError> {
    let specs = expected_tensors(cfg);
    let mut weights = ModelWeights::new();
    for (name, t) in tensors {
        let canonical = name.strip_prefix("params/").unwrap_or(&name).to_string();
        let Some(spec) = specs.iter().find(|s| s.name == canonical) else {
            return Err(ModelError::Tensor(format!(
                "{source}: unexpected tensor `{name}` (not part of this {}-block configuration)",
                cfg.num_layers
            )));
        };
        if !spec.matches(&t.shape) {
            return Err(ModelError::Tensor(format!(
                "{source}: tensor `{name}` has shape {:?}, expected {}",
                t.shape,
                spec.shape_text()
            )));
        }
        if let Some(at) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Tensor(format!(
                "{source}: tensor `{name}` has a non-finite value ({}) at flat index {at}",
                t.data[at]
            )));
        }
        weights.insert(canonical, t);
    }
    if let Some(spec) = specs
        .iter()
        .find(|s| s.required && !weights.contains_key(&s.name))
    {
        return Err(ModelError::Tensor(format!(
            "{source}: missing tensor `{}` (expected f32 {})",
            spec.name,
            spec.shape_text()
        )));
    }
    Ok(weights)
}

/// Writes a checkpoint atomically, with its configuration in the metadata.
pub fn save_checkpoint(
    path: &Path,
    cfg: &ModelConfig,
    weights: &ModelWeights,
) -> Result<(), ModelError> {
    save_checkpoint_as(path, cfg, weights, Precision::F32)
}

/// As [`save_checkpoint`], storing the tensors in `precision` (half precision halves the file;
/// loading widens them back to f32).
pub fn save_checkpoint_as(
    path: &Path,
    cfg: &ModelConfig,
    weights: &ModelWeights,
    precision: Precision,
) -> Result<(), ModelError> {
    save_checkpoint_with(path, cfg, weights, precision, HashMap::new())
}

/// As [`save_checkpoint_as`], with more metadata entries (provenance, a base file).
pub fn save_checkpoint_with(
    path: &Path,
    cfg: &ModelConfig,
    weights: &ModelWeights,
    precision: Precision,
    extra: HashMap<String, String>,
) -> Result<(), ModelError> {
    let tensors: Vec<OutTensor<'_>> = weights
        .iter()
        .map(|(name, t)| OutTensor {
            name,
            shape: t.shape.clone(),
            data: &t.data,
        })
        .collect();
    let mut meta = extra;
    meta.insert(CONFIG_METADATA_KEY.to_string(), cfg.to_json());
    meta.insert(FORMAT_METADATA_KEY.to_string(), FORMAT_NAME.to_string());
    write_safetensors(path, &tensors, meta, precision)?;
    Ok(())
}

/// Seeded random weights (LeCun-normal kernels, zero biases, unit LayerNorms). Besides the
/// configured router's parameters, both router families' are included (Soft MoE with one slot per
/// expert when the configured router is sparse), so every what-if works.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> ModelWeights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut weights = ModelWeights::new();
    for spec in expected_tensors(cfg) {
        let shape: Vec<usize> = spec.shape.iter().map(|d| d.unwrap_or(1)).collect();
        let len: usize = shape.iter().product();
        let leaf = spec.name.rsplit('/').next().unwrap_or("");
        let data: Vec<f32> = if leaf == "bias" || spec.name == "cls" {
            vec![0.0; len]
        } else if leaf == "scale" {
            vec![1.0; len]
        } else {
            let fan_in = fan_in(&spec.name, &shape);
            let std = if spec.name.ends_with("pos_embedding") {
                0.02
            } else {
                (1.0 / fan_in as f32).sqrt()
            };
            (0..len)
                .map(|_| std * rng.sample::<f32, _>(StandardNormal))
                .collect()
        };
        weights.insert(spec.name, F32Tensor { shape, data });
    }
    weights
}

/// Input width of a kernel in the Flax layouts used here.
fn fan_in(name: &str, shape: &[usize]) -> usize {
    match shape {
        [ph, pw, c, _] => ph * pw * c,
        _ if name.ends_with("out/kernel") => shape[0] * shape[1],
        [_, d, _] if name.contains("/Moe/Mlp/") => *d,
        [d, ..] => *d,
        [] => 1,
    }
}

/// Whether a router of `kind` can run on these MoE-block weights; the error says what is missing.
pub fn check_router_params(
    has: impl Fn(&str) -> bool,
    block: usize,
    kind: RouterKind,
) -> Result<(), ModelError> {
    let b = block_prefix(block);
    let needed: &[&str] = match kind.family() {
        RouterFamily::Soft => &["Moe/Router/mu", "Moe/Router/scale"],
        _ => &["Moe/Router/dense/kernel"],
    };
    for n in needed {
        if !has(&format!("{b}/{n}")) {
            return Err(ModelError::Config(format!(
                "{} needs `{b}/{n}`, which this checkpoint does not have{}",
                kind.display_name(),
                if kind == RouterKind::SoftMoe {
                    " (Soft MoE's mu and scale cannot be derived from a sparse router's kernel)"
                } else {
                    " (a Soft MoE checkpoint has no token-to-expert router kernel)"
                }
            )));
        }
    }
    Ok(())
}
