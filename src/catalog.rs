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

/// The built-in photo model: DINOv2-S/14, moefied (a feature model), untrained as an MoE; the
/// base of the distilled ones.
pub fn photo_model() -> PathBuf {
    assets_dir()
        .join("models")
        .join("dinov2-s14-moe.safetensors")
}

/// Routers with a distilled photo model (`scripts/make-photo-models.sh`).
pub const PHOTO_ROUTERS: [RouterKind; 5] = [
    RouterKind::SoftmaxTokenChoice,
    RouterKind::SinkhornTokenChoice,
    RouterKind::SoftmaxExpertChoice,
    RouterKind::SinkhornExpertChoice,
    RouterKind::SparseExpertChoice,
];

/// The photo model distilled under `kind` (only its MoE layers, over [`photo_model`]), if there
/// is one and it is present.
pub fn photo_model_for(kind: RouterKind) -> Option<PathBuf> {
    PHOTO_ROUTERS
        .contains(&kind)
        .then(|| photo_model_path(kind))
        .filter(|p| p.is_file())
}

fn photo_model_path(kind: RouterKind) -> PathBuf {
    assets_dir()
        .join("models")
        .join(format!("dinov2-s14-{}.safetensors", kind.cli_name()))
}

/// The built-in models by name: `fashion-mnist-<router>` for the six trained routers,
/// `fashion-mnist-dense`, `photo` (the DINOv2-S/14 MoE) and `photo-<router>` for the five
/// distilled ones.
pub fn builtin_models() -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = TRAINED_ROUTERS
        .iter()
        .map(|k| {
            (
                format!("fashion-mnist-{}", k.cli_name()),
                model_path(k.cli_name()),
            )
        })
        .collect();
    v.push(("fashion-mnist-dense".into(), dense_model()));
    v.push(("photo".into(), photo_model()));
    for k in PHOTO_ROUTERS {
        v.push((format!("photo-{}", k.cli_name()), photo_model_path(k)));
    }
    v
}

/// The path of the built-in model called `name` (see [`builtin_models`]).
pub fn builtin_model_named(name: &str) -> Option<PathBuf> {
    builtin_models()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
}

/// Which built-in models an image opens under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImageKind {
    /// A 28×28 grey image: the Fashion-MNIST models.
    FashionMnist,
    /// Anything else: the photo model.
    Photo,
}

impl ImageKind {
    /// The rule: 28×28 grey images are Fashion-MNIST images, everything else is a photo.
    pub fn of(img: &image::DynamicImage) -> Self {
        // Size first: only a 28×28 image needs its pixels looked at.
        if img.width() != 28 || img.height() != 28 {
            return Self::Photo;
        }
        let grey = matches!(
            img.color(),
            image::ColorType::L8
                | image::ColorType::L16
                | image::ColorType::La8
                | image::ColorType::La16
        ) || {
            let rgb = img.to_rgb8();
            rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2])
        };
        if grey {
            Self::FashionMnist
        } else {
            Self::Photo
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::FashionMnist => "Fashion-MNIST models",
            Self::Photo => "photo model (DINOv2-S/14 MoE)",
        }
    }
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

/// The built-in dataset: the first 1,000 Fashion-MNIST test images (and 512 training images) as
/// IDX files, for the Dataset view.
pub fn fashion_mnist_slice() -> PathBuf {
    assets_dir().join("datasets/fashion-mnist-slice")
}

/// The built-in photo dataset: the gallery photos and more public-domain / CC0 pictures from
/// registry packages, one subfolder per subject (`assets/datasets/photos/README.md`).
pub fn photo_dataset() -> PathBuf {
    assets_dir().join("datasets/photos")
}

/// Which built-in models a dataset runs under, by the rule for images: a Fashion-MNIST IDX
/// directory and a folder whose first image is a 28×28 grey one under the Fashion-MNIST models,
/// anything else under the photo model. Only a bounded corner of a folder is looked at (the
/// first image in sorted order within [`DATASET_PEEK`] entries, by its header unless it is
/// 28×28), so a huge folder does not stall the caller.
pub fn dataset_kind(path: &Path) -> ImageKind {
    let idx = ["t10k", "train"].iter().any(|stem| {
        let f = format!("{stem}-images-idx3-ubyte");
        path.join(&f).is_file() || path.join(format!("{f}.gz")).is_file()
    });
    if idx {
        return ImageKind::FashionMnist;
    }
    let mut budget = DATASET_PEEK;
    first_image_kind(path, 3, &mut budget).unwrap_or(ImageKind::Photo)
}

/// Folder entries [`dataset_kind`] looks at, at most.
pub const DATASET_PEEK: usize = 256;

fn first_image_kind(dir: &Path, depth: usize, budget: &mut usize) -> Option<ImageKind> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .take(*budget)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    *budget = budget.saturating_sub(entries.len());
    entries.sort();
    for p in &entries {
        let is_image = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| crate::model::IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()));
        if is_image {
            let Ok(file) = crate::files::open_regular(p) else {
                continue;
            };
            let Ok(dims) =
                image::ImageReader::new(std::io::BufReader::new(file)).with_guessed_format()
            else {
                continue;
            };
            match dims.into_dimensions() {
                Ok((28, 28)) => {
                    if let Ok(img) = crate::model::decode_image(p) {
                        return Some(ImageKind::of(&img));
                    }
                }
                Ok(_) => return Some(ImageKind::Photo),
                Err(_) => {}
            }
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| first_image_kind(p, depth - 1, budget))
}

/// The full Fashion-MNIST test set where the Debian package is installed, else the slice.
pub fn fashion_mnist_test_set() -> PathBuf {
    let full = Path::new(crate::train::DEFAULT_DATA_DIR);
    if full.join("t10k-images-idx3-ubyte.gz").is_file()
        || full.join("t10k-images-idx3-ubyte").is_file()
    {
        full.to_path_buf()
    } else {
        fashion_mnist_slice()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_grey_images_are_fashion_mnist_and_the_rest_photos() {
        let grey = image::DynamicImage::ImageLuma8(image::GrayImage::new(28, 28));
        assert_eq!(ImageKind::of(&grey), ImageKind::FashionMnist);
        let grey_rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            28,
            28,
            image::Rgb([7, 7, 7]),
        ));
        assert_eq!(ImageKind::of(&grey_rgb), ImageKind::FashionMnist);
        let colour = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            28,
            28,
            image::Rgb([7, 8, 7]),
        ));
        assert_eq!(ImageKind::of(&colour), ImageKind::Photo);
        let big_grey = image::DynamicImage::ImageLuma8(image::GrayImage::new(56, 56));
        assert_eq!(ImageKind::of(&big_grey), ImageKind::Photo);
    }

    #[test]
    fn datasets_follow_the_rule_for_images() {
        assert_eq!(
            dataset_kind(&fashion_mnist_slice()),
            ImageKind::FashionMnist
        );
        assert_eq!(dataset_kind(&photo_dataset()), ImageKind::Photo);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(dataset_kind(dir.path()), ImageKind::Photo, "empty");
        std::fs::create_dir_all(dir.path().join("a/deeper")).unwrap();
        std::fs::write(dir.path().join("a/notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("a/0-broken.png"), "not a png").unwrap();
        image::GrayImage::new(28, 28)
            .save(dir.path().join("a/deeper/1.png"))
            .unwrap();
        assert_eq!(dataset_kind(dir.path()), ImageKind::FashionMnist);
        image::RgbImage::new(40, 30)
            .save(dir.path().join("a/1.png"))
            .unwrap();
        assert_eq!(dataset_kind(dir.path()), ImageKind::Photo);
    }

    /// Every photo of the built-in dataset is credited in its README, and it holds photos only.
    #[test]
    fn the_photo_dataset_lists_a_licence_for_every_photo() {
        let readme = std::fs::read_to_string(photo_dataset().join("README.md")).unwrap();
        let source = crate::analysis::source::FolderSource::scan(&photo_dataset()).unwrap();
        assert!(source.files.len() >= 18, "{}", source.files.len());
        assert_eq!(source.other_files, 1, "only the README is not a photo");
        assert!(
            !source
                .classes
                .iter()
                .any(|c| c == crate::analysis::source::UNLABELLED)
        );
        for (p, _) in &source.files {
            let rel = p
                .strip_prefix(photo_dataset())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert!(
                readme.contains(&format!("`{rel}`")),
                "{rel} has no licence line"
            );
            let img = crate::model::decode_image(p).unwrap();
            assert!(img.width().max(img.height()) <= 256, "{rel}");
            assert_eq!(ImageKind::of(&img), ImageKind::Photo, "{rel}");
        }
    }
}
