//! What several end-to-end tests share: the shipped models and where the repository lies.

use std::path::PathBuf;

/// The built-in models in `assets/models/`, by router (and the dense baseline).
pub const MODELS: [&str; 7] = [
    "softmax-tc",
    "sinkhorn-tc",
    "softmax-ec",
    "sinkhorn-ec",
    "sparse-ec",
    "soft",
    "dense",
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The checkpoint of built-in model `name`.
pub fn model_path(name: &str) -> PathBuf {
    root().join(format!("assets/models/fashion-mnist-{name}.safetensors"))
}

/// The committed Fashion-MNIST test slice.
pub fn fixture_dir() -> PathBuf {
    root().join("assets/datasets/fashion-mnist-slice")
}
