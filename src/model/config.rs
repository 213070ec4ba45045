//! The architecture of a ViT-MoE checkpoint, stored as JSON in the safetensors metadata under
//! [`CONFIG_METADATA_KEY`] (the tensors alone do not say which blocks are MoE, which router was
//! trained, or how pixels were normalised).

use serde::{Deserialize, Serialize};

use super::ModelError;
use crate::routing::{CapacitySpec, RouterConfig, RouterFamily, RouterKind};

/// Metadata key holding the model configuration JSON.
pub const CONFIG_METADATA_KEY: &str = "routerscope.model_config";

/// How the image representation is pooled before the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Classifier {
    /// A learned CLS token prepended to the patches; the head reads position 0.
    Token,
    /// Global average pooling over the patch tokens (all tokens when there is no prefix token,
    /// as in vmoe; timm's `avg` leaves registers out too).
    Gap,
}

/// Pixel normalisation: pixels are first scaled to `[0, 1]`, then `(x - mean) / std` per channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// The GELU of the MLPs: vmoe's tanh approximation, or the exact erf form (PyTorch's default,
/// DINOv2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gelu {
    #[default]
    Tanh,
    Erf,
}

/// How a sparse MoE layer adds its experts' outputs back to a token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// Weighted by the router's gates (vmoe).
    #[default]
    Gated,
    /// Summed with weight 1, plus the layer's output bias `Moe/bias` once per token: the experts
    /// are parts of one dense MLP (MoEfication), so with every expert chosen the layer is that
    /// MLP. It belongs to the model: router, k and capacity what-ifs keep it. Soft MoE always
    /// mixes by its combine weights.
    Unit,
}

/// The MoE part: which blocks, how many experts, which router.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Encoder block indices (0-based) whose MLP is an MoE layer.
    pub layers: Vec<usize>,
    pub num_experts: usize,
    /// The router the checkpoint was trained with (Soft MoE: `capacity` must be `slots`).
    pub router: RouterConfig,
    /// Images per routing group (V-MoE trained with 8; one image is the viewer's default).
    #[serde(default = "one")]
    pub group_images: usize,
    /// Round tokens to bfloat16 before dispatch and expert outputs before combine (vmoe's
    /// `Bfloat16Dispatcher`, always on for its Soft MoE runs).
    #[serde(default)]
    pub bfloat16_dispatch: bool,
    /// How expert outputs are combined.
    #[serde(default)]
    pub combine: Combine,
    /// Hidden units per expert (default: the model's `mlp_dim`).
    #[serde(default)]
    pub expert_mlp_dim: Option<usize>,
}

impl MoeConfig {
    /// Hidden units of each expert MLP.
    pub fn expert_hidden(&self, mlp_dim: usize) -> usize {
        self.expert_mlp_dim.unwrap_or(mlp_dim)
    }
}

fn one() -> usize {
    1
}

/// A Vision Transformer with MoE blocks, as google-research/vmoe's `VisionTransformerMoe`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub name: String,
    /// `[height, width]` in pixels.
    pub image_size: [usize; 2],
    pub channels: usize,
    /// `[height, width]` of a patch.
    pub patch_size: [usize; 2],
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_dim: usize,
    pub classifier: Classifier,
    /// Optional `pre_logits` Dense + tanh before the head.
    #[serde(default)]
    pub representation_size: Option<usize>,
    /// Classes of the head; 0 for a feature model (no head: its result is the final LayerNorm
    /// output of every token).
    pub num_classes: usize,
    #[serde(default)]
    pub class_names: Vec<String>,
    pub normalization: Normalization,
    /// The MLP activation.
    #[serde(default)]
    pub gelu: Gelu,
    /// LayerScale (CaiT, DINOv2): a learned per-channel scale on each residual branch,
    /// `{block}/LayerScale_0/scale` after attention and `LayerScale_1/scale` after the MLP.
    #[serde(default)]
    pub layer_scale: bool,
    /// Whether a learned CLS token `cls` leads the tokens (default: exactly when the classifier
    /// reads it; timm's mean-pooled ViTs often keep one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cls_token: Option<bool>,
    /// A learned distillation token after the CLS token (DeiT), `dist` `[1, 1, d]`; a classifier
    /// reads it with its own head `head_dist` and averages the two heads' logits.
    #[serde(default, skip_serializing_if = "is_false")]
    pub distillation_token: bool,
    /// Learned register tokens after the class tokens (DINOv2 with registers), `registers`
    /// `[1, R, d]`: they take part in attention but are neither pooled nor shown as patches.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub register_tokens: usize,
    /// The final LayerNorm normalises the pooled vector (timm's `fc_norm`, with mean pooling)
    /// instead of every token; features are then the last block's output.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fc_norm: bool,
    /// The epsilon of every LayerNorm (1e-6: vmoe's, timm's and DINOv2's; Hugging Face's ViT
    /// uses 1e-12). Checkpoints omit it at the default.
    #[serde(
        default = "default_layer_norm_eps",
        skip_serializing_if = "is_default_eps"
    )]
    pub layer_norm_eps: f32,
    #[serde(default)]
    pub moe: Option<MoeConfig>,
}

/// vmoe's LayerNorm epsilon.
pub const DEFAULT_LAYER_NORM_EPS: f32 = 1e-6;

fn default_layer_norm_eps() -> f32 {
    DEFAULT_LAYER_NORM_EPS
}

fn is_default_eps(eps: &f32) -> bool {
    *eps == DEFAULT_LAYER_NORM_EPS
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The learned tokens before the patches, in this order: CLS, distillation, registers. Token
/// `i < count()` of an image is `name(i)`; token `count() + p` is patch `p`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixTokens {
    pub cls: bool,
    pub distillation: bool,
    pub registers: usize,
}

impl PrefixTokens {
    /// Only a CLS token (every vmoe model with `classifier: token`), or none.
    pub fn cls_only(cls: bool) -> Self {
        Self {
            cls,
            ..Self::default()
        }
    }

    pub fn count(&self) -> usize {
        usize::from(self.cls) + usize::from(self.distillation) + self.registers
    }

    /// The patch of token `index`, `None` for a prefix token.
    pub fn patch(&self, index: usize) -> Option<usize> {
        index.checked_sub(self.count())
    }

    /// What prefix token `i` is (`CLS`, `distillation`, `register 3`); `None` for a patch.
    pub fn name(&self, i: usize) -> Option<String> {
        let mut i = i;
        if self.cls {
            if i == 0 {
                return Some("CLS".into());
            }
            i -= 1;
        }
        if self.distillation {
            if i == 0 {
                return Some("distillation".into());
            }
            i -= 1;
        }
        (i < self.registers).then(|| format!("register {i}"))
    }
}

impl ModelConfig {
    /// Patches per image (`rows · cols`).
    pub fn num_patches(&self) -> usize {
        self.grid()[0] * self.grid()[1]
    }

    /// Patch grid `[rows, cols]`.
    pub fn grid(&self) -> [usize; 2] {
        [
            self.image_size[0] / self.patch_size[0],
            self.image_size[1] / self.patch_size[1],
        ]
    }

    /// Tokens per image entering the encoder (the prefix tokens, then the patches).
    pub fn seq_len(&self) -> usize {
        self.num_patches() + self.prefix().count()
    }

    /// The learned tokens before the patches.
    pub fn prefix(&self) -> PrefixTokens {
        PrefixTokens {
            cls: self
                .cls_token
                .unwrap_or(self.classifier == Classifier::Token),
            distillation: self.distillation_token,
            registers: self.register_tokens,
        }
    }

    /// Whether this is a feature model (no classifier head).
    pub fn is_feature_model(&self) -> bool {
        self.num_classes == 0
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Whether block `i` is an MoE block.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.layers.contains(&i))
    }

    /// The name of class `c` (its index when the checkpoint has no names).
    pub fn class_name(&self, c: usize) -> String {
        self.class_names
            .get(c)
            .cloned()
            .unwrap_or_else(|| format!("class {c}"))
    }

    /// Parses and validates the metadata JSON.
    pub fn from_json(json: &str) -> Result<Self, ModelError> {
        let cfg: Self = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("model configuration JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1e-1) {
            return bad(format!(
                "layer_norm_eps is {}: a LayerNorm epsilon is positive and small",
                self.layer_norm_eps
            ));
        }
        let [h, w] = self.image_size;
        let [ph, pw] = self.patch_size;
        if ph == 0 || pw == 0 || h == 0 || w == 0 || h % ph != 0 || w % pw != 0 {
            return bad(format!(
                "image size {h}x{w} must be a positive multiple of the patch size {ph}x{pw}"
            ));
        }
        if self.channels == 0 || self.hidden_size == 0 || self.mlp_dim == 0 || self.num_layers == 0
        {
            return bad("channels, hidden_size, mlp_dim and num_layers must be positive".into());
        }
        // Bounds before anything is sized from them (a hostile configuration would otherwise
        // wrap the patch count or allocate gigabytes of tensor specs before failing).
        if h.max(w) > 16_384 {
            return bad(format!(
                "image side {} is beyond the limit of 16384",
                h.max(w)
            ));
        }
        let limits = [
            ("channels", self.channels, 64),
            ("hidden_size", self.hidden_size, 65_536),
            ("num_layers", self.num_layers, 1_024),
            ("mlp_dim", self.mlp_dim, 1 << 20),
            ("num_classes", self.num_classes, 1 << 20),
            ("tokens per image", self.seq_len(), 1 << 20),
        ];
        if let Some((what, v, max)) = limits.iter().find(|(_, v, max)| v > max) {
            return bad(format!("{what} {v} is beyond the limit of {max}"));
        }
        if self.register_tokens > 4096 {
            return bad(format!(
                "register_tokens {} is beyond the limit of 4096",
                self.register_tokens
            ));
        }
        if self.classifier == Classifier::Token && !self.prefix().cls {
            return bad("classifier token reads a CLS token, but cls_token is false".into());
        }
        if self.distillation_token && self.classifier != Classifier::Token {
            return bad(
                "a distillation token follows a CLS token: classifier must be token".into(),
            );
        }
        if self.distillation_token && self.representation_size.is_some() {
            return bad("a distilled model (two heads) has no pre_logits layer".into());
        }
        if self.is_feature_model() && self.representation_size.is_some() {
            return bad("a feature model (num_classes 0) has no pre_logits layer".into());
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} must be divisible by num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        let n = &self.normalization;
        if n.mean.len() != self.channels || n.std.len() != self.channels {
            return bad(format!(
                "normalization needs {} means and stds (one per channel)",
                self.channels
            ));
        }
        if n.std.iter().any(|s| !(s.is_finite() && *s != 0.0))
            || n.mean.iter().any(|m| !m.is_finite())
        {
            return bad("normalization means must be finite and stds finite and non-zero".into());
        }
        if !self.class_names.is_empty() && self.class_names.len() != self.num_classes {
            return bad(format!(
                "{} class names for {} classes",
                self.class_names.len(),
                self.num_classes
            ));
        }
        if let Some(moe) = &self.moe {
            if moe.num_experts > 4096
                || moe.group_images > 4096
                || moe.expert_mlp_dim.is_some_and(|m| m > 1 << 20)
            {
                return bad(format!(
                    "moe.num_experts {} and moe.group_images {} must be at most 4096, \
                     moe.expert_mlp_dim {:?} at most 1048576",
                    moe.num_experts, moe.group_images, moe.expert_mlp_dim
                ));
            }
            if moe.num_experts == 0 || moe.group_images == 0 || moe.expert_mlp_dim == Some(0) {
                return bad(
                    "moe.num_experts, moe.group_images and moe.expert_mlp_dim must be positive"
                        .into(),
                );
            }
            if let Some(&l) = moe.layers.iter().find(|&&l| l >= self.num_layers) {
                return bad(format!(
                    "MoE layer {l} is beyond the {} blocks",
                    self.num_layers
                ));
            }
            if moe.router.kind == RouterKind::SoftMoe
                && !matches!(moe.router.capacity, CapacitySpec::Slots(p) if p > 0)
            {
                return bad(
                    "a Soft MoE checkpoint must give its slots per expert: router.capacity = \
                     {\"slots\": p}"
                        .into(),
                );
            }
            if moe.router.kind.family() == RouterFamily::TokenChoice
                && !(1..=moe.num_experts).contains(&moe.router.k)
            {
                return bad(format!(
                    "router k = {} for {} experts",
                    moe.router.k, moe.num_experts
                ));
            }
        }
        Ok(())
    }
}
