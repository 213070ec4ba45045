//! The ViT-MoE model the viewer runs: configuration, checkpoints (vmoe parameter names in
//! safetensors; other formats are read by `import`), image input, and the candle forward pass with per-layer routing records and
//! what-if re-runs.

mod config;
mod image_input;
mod kernels;
pub(crate) mod ops;
mod presets;
pub(crate) mod vit;
mod vmoe_presets;
mod weights;
mod what_if;

pub use config::{
    CONFIG_METADATA_KEY, Classifier, Combine, DEFAULT_LAYER_NORM_EPS, Gelu, ModelConfig, MoeConfig,
    Normalization, PrefixTokens,
};
pub use image_input::{
    IMAGE_EXTENSIONS, ImageListing, MAX_DECODE_BYTES, MAX_IMAGE_SIDE, MAX_LISTED_SKIPPED,
    decode_image, decode_image_bytes, list_images, load_image, preprocess,
};
pub use kernels::{erf, gelu, gelu_erf};
pub use presets::{FASHION_MNIST_CLASSES, PRESETS, preset, preset_router};
pub use vit::{
    BlockObserver, Forward, ForwardOutput, GroupRecord, MoeLayerRecord, RunOptions, VitMoe,
};
pub use vmoe_presets::{
    CIFAR10_CLASSES, VMOE_TRAINED_GROUP_IMAGES, imagenet1k_classes, match_vmoe_preset,
    vmoe_b16_benchmark, vmoe_presets,
};
pub use weights::{
    BASE_METADATA_KEY, BaseRef, FORMAT_METADATA_KEY, FORMAT_NAME, ModelWeights, TensorSpec,
    block_prefix, check_router_params, check_tensors, checkpoint_base, expected_tensors,
    load_checkpoint, random_weights, save_checkpoint, save_checkpoint_as, save_checkpoint_with,
    save_overlay,
};
pub use what_if::{WhatIf, check_k_applies};

use crate::routing::RoutingError;
use crate::tensor_io::TensorIoError;

/// Why a model could not be loaded or run; every message names the file, tensor or value.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    File(#[from] TensorIoError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Tensor(String),
    #[error("{0}")]
    Image(String),
    /// The data a run reads is bad (a routing trace's tensors, found as its groups are read).
    #[error("{0}")]
    Source(String),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The caller's observer stopped the run between two blocks (a newer request superseded it).
    #[error("stopped after block {0}: superseded")]
    Cancelled(usize),
    /// A failure of the backend that ran the model (for the GPU backend, its `GpuError`).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

impl VitMoe {
    /// Loads and validates a routerscope checkpoint (safetensors; `import::load_any` also reads
    /// vmoe checkpoints).
    pub fn load(path: &std::path::Path) -> Result<Self, ModelError> {
        let (cfg, weights) = load_checkpoint(path)?;
        Self::new(cfg, weights)
    }
}

#[cfg(test)]
pub(crate) mod tests;
