//! Training the built-in models: one small ViT-MoE per router on Fashion-MNIST (candle autograd),
//! and their evaluation with routing statistics over the test set.

pub mod data;
pub mod distill;
pub mod eval;
pub mod net;
pub mod ops;
pub mod optim;
pub mod trainer;

pub use data::{DEFAULT_DATA_DIR, Dataset, Split};
pub use trainer::{EpochReport, TrainOptions, TrainState, Trainer, state_path};

/// Why training or evaluation failed; messages name the file, tensor or value.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Model(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error(transparent)]
    Routing(#[from] crate::routing::RoutingError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

#[cfg(test)]
mod tests;
