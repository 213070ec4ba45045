//! What can go wrong on the GPU backend. Every GPU failure leads to the CPU fallback
//! (`crate::backend`); a bad input found by the checks both backends share does not.

use crate::model::ModelError;
use crate::routing::RoutingError;

/// Why the GPU backend could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    #[error("GPU device request failed: {0}")]
    Device(String),
    #[error("the GPU adapter `{adapter}` cannot run the kernels: {why}")]
    Unsupported { adapter: String, why: String },
    #[error("GPU device lost: {0}")]
    Lost(String),
    #[error("GPU command failed: {0}")]
    Command(String),
    /// The model does not fit this device, or a run broke down (a missing readback, a workspace
    /// poisoned by an earlier failure).
    #[error("{0}")]
    Failed(String),
    /// A bad input or checkpoint, found by the validation both backends share: not a GPU
    /// failure, so there is nothing to fall back for.
    #[error(transparent)]
    Input(#[from] ModelError),
}

impl From<RoutingError> for GpuError {
    fn from(e: RoutingError) -> Self {
        Self::Input(e.into())
    }
}

impl From<GpuError> for ModelError {
    /// A bad input stays what it was; a GPU failure becomes the model's backend error.
    fn from(e: GpuError) -> Self {
        match e {
            GpuError::Input(m) => m,
            other => ModelError::Backend(Box::new(other)),
        }
    }
}
