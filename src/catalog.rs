//! The built-in content: the seven Fashion-MNIST checkpoints (one per router plus the dense
//! baseline) in `assets/models/`, and the sample images in `assets/images/`.

use std::path::{Path, PathBuf};

use crate::model::{preset, random_weights, save_checkpoint};
use crate::routing::RouterKind;

/// The assets directory: `$ROUTERSCOPE_ASSETS`, or the repository's `assets/`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("ROUTERSCOPE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

/// Routers with a built-in trained checkpoint (the six of the routers paper).
pub const TRAINED_ROUTERS: [RouterKind; 6] = [
    RouterKind::SoftmaxTokenChoice,
    RouterKind::SinkhornTokenChoice,
    RouterKind::SoftmaxExpertChoice,
    RouterKind::SinkhornExpertChoice,
    RouterKind::SparseExpertChoice,
    RouterKind::SoftMoe,
];

/// The built-in checkpoint trained with `kind`, if there is one.
pub fn builtin_model(kind: RouterKind) -> Option<PathBuf> {
    TRAINED_ROUTERS
        .contains(&kind)
        .then(|| model_path(kind.cli_name()))
}

/// The dense baseline.
pub fn dense_model() -> PathBuf {
    model_path("dense")
}

fn model_path(name: &str) -> PathBuf {
    assets_dir()
        .join("models")
        .join(format!("fashion-mnist-{name}.safetensors"))
}

/// A checkpoint for `kind` that exists: the built-in one, or else (before the models are trained
/// or when the assets are missing) a seeded random model of the same architecture, written once
/// to the temporary directory. The flag says whether it is trained.
pub fn model_for(kind: RouterKind) -> Result<(PathBuf, bool), String> {
    if let Some(p) = builtin_model(kind).filter(|p| p.is_file()) {
        return Ok((p, true));
    }
    let cfg = preset("fashion-mnist", kind).ok_or("no fashion-mnist preset")?;
    let path = random_dir().join(format!(
        "fashion-mnist-{}-random.safetensors",
        kind.cli_name()
    ));
    if !path.is_file() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        save_checkpoint(&path, &cfg, &random_weights(&cfg, 0)).map_err(|e| e.to_string())?;
    }
    Ok((path, false))
}

/// Where [`model_for`] writes its untrained stand-ins.
fn random_dir() -> PathBuf {
    std::env::temp_dir().join("routerscope-random")
}

/// Whether `path` is one of [`model_for`]'s untrained stand-ins.
pub fn is_random_stand_in(path: &Path) -> bool {
    path.starts_with(random_dir())
}

/// The sample images, sorted by name (Fashion-MNIST test images first, then photos).
pub fn sample_images() -> Vec<PathBuf> {
    let dir = assets_dir().join("images");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    v.sort();
    v
}
