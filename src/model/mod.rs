//! The ViT-MoE model the viewer runs: configuration, checkpoints (vmoe parameter names in
//! safetensors), image input, and the candle forward pass with per-layer routing records and
//! what-if re-runs.

mod config;
mod image_input;
mod kernels;
mod ops;
mod presets;
mod vit;
mod weights;

pub use config::{CONFIG_METADATA_KEY, Classifier, ModelConfig, MoeConfig, Normalization};
pub use image_input::{
    MAX_DECODE_BYTES, MAX_IMAGE_SIDE, decode_image, decode_image_bytes, load_image, preprocess,
};
pub use presets::{FASHION_MNIST_CLASSES, PRESETS, preset, preset_router};
pub use vit::{ForwardOutput, GroupRecord, MoeLayerRecord, RunOptions, VitMoe};
pub use weights::{
    FORMAT_METADATA_KEY, FORMAT_NAME, ModelWeights, TensorSpec, block_prefix, check_router_params,
    expected_tensors, load_checkpoint, random_weights, save_checkpoint,
};

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
    #[error("routing: {0}")]
    Routing(#[from] RoutingError),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}

impl VitMoe {
    /// Loads and validates a checkpoint file.
    pub fn load(path: &std::path::Path) -> Result<Self, ModelError> {
        let (cfg, weights) = load_checkpoint(path)?;
        Self::new(cfg, weights)
    }
}

#[cfg(test)]
mod tests;
