//! Where an analysis reads its images: a folder searched recursively, whose first subfolder names
//! the class (torchvision's ImageFolder convention; images directly in it are unlabelled), or a
//! Fashion-MNIST IDX directory. Only file names are listed up front; pixels are read batch by
//! batch, so memory does not grow with the dataset (an IDX split is one file, read whole).

use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage};

use super::AnalysisError;
use crate::model::{ModelConfig, decode_image, preprocess};
use crate::train::{Dataset, Split};

/// The name of the images found directly in the data folder.
pub const UNLABELLED: &str = "(unlabelled)";

/// Extensions read as images (as the viewer opens).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff"];

/// The largest number of images a folder may hold for one analysis.
pub const MAX_FOLDER_IMAGES: usize = 2_000_000;

/// A dataset to analyse.
pub enum DataSource {
    Folder(FolderSource),
    Idx(IdxSource),
}

/// Image files under a root, with the class index of each (`classes` names them).
pub struct FolderSource {
    pub root: PathBuf,
    pub files: Vec<(PathBuf, usize)>,
    pub classes: Vec<String>,
    /// Files that are not images by their extension (not read).
    pub other_files: usize,
}

/// A Fashion-MNIST split.
pub struct IdxSource {
    pub dir: PathBuf,
    pub split: Split,
    pub data: Dataset,
    pub classes: Vec<String>,
}

impl DataSource {
    /// Opens `path`: an IDX directory when it holds the split's IDX files, else a folder of
    /// images. `class_names` name the IDX labels (the model's class names).
    pub fn open(path: &Path, split: Split, class_names: &[String]) -> Result<Self, AnalysisError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| AnalysisError::Data(format!("{}: {e}", path.display())))?;
        if !meta.is_dir() {
            return Err(AnalysisError::Data(format!(
                "{}: not a folder (give a folder of images or a Fashion-MNIST IDX directory)",
                path.display()
            )));
        }
        let stem = match split {
            Split::Train => "train-images-idx3-ubyte",
            Split::Test => "t10k-images-idx3-ubyte",
        };
        let has_idx = [path.join(stem), path.join(format!("{stem}.gz"))]
            .iter()
            .any(|p| p.is_file());
        if has_idx {
            let data =
                Dataset::load(path, split).map_err(|e| AnalysisError::Data(e.to_string()))?;
            let classes = (0..10)
                .map(|c| class_names.get(c).cloned().unwrap_or_else(|| c.to_string()))
                .collect();
            return Ok(DataSource::Idx(IdxSource {
                dir: path.to_path_buf(),
                split,
                data,
                classes,
            }));
        }
        FolderSource::scan(path).map(DataSource::Folder)
    }

    pub fn len(&self) -> usize {
        match self {
            DataSource::Folder(f) => f.files.len(),
            DataSource::Idx(d) => d.data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        match self {
            DataSource::Folder(f) => f.files.truncate(n),
            DataSource::Idx(d) => {
                if n < d.data.len() {
                    d.data = d.data.take(n);
                }
            }
        }
    }

    /// Class names; the label of image `i` is [`label`](Self::label).
    pub fn classes(&self) -> &[String] {
        match self {
            DataSource::Folder(f) => &f.classes,
            DataSource::Idx(d) => &d.classes,
        }
    }

    pub fn label(&self, i: usize) -> usize {
        match self {
            DataSource::Folder(f) => f.files[i].1,
            DataSource::Idx(d) => d.data.labels[i] as usize,
        }
    }

    /// What the report calls image `i`: its path below the root, or `t10k[i]`.
    pub fn name(&self, i: usize) -> String {
        match self {
            DataSource::Folder(f) => {
                let p = &f.files[i].0;
                p.strip_prefix(&f.root)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            }
            DataSource::Idx(d) => {
                let stem = match d.split {
                    Split::Train => "train",
                    Split::Test => "t10k",
                };
                format!("{stem}[{i}]")
            }
        }
    }

    /// The file of image `i`, if it is one.
    pub fn path(&self, i: usize) -> Option<&Path> {
        match self {
            DataSource::Folder(f) => Some(&f.files[i].0),
            DataSource::Idx(_) => None,
        }
    }

    /// Where the data came from.
    pub fn location(&self) -> &Path {
        match self {
            DataSource::Folder(f) => &f.root,
            DataSource::Idx(d) => &d.dir,
        }
    }

    /// Image `i` as stored (decoded, EXIF orientation applied).
    pub fn original(&self, i: usize) -> Result<DynamicImage, String> {
        match self {
            DataSource::Folder(f) => decode_image(&f.files[i].0).map_err(|e| e.to_string()),
            DataSource::Idx(d) => GrayImage::from_raw(
                d.data.cols as u32,
                d.data.rows as u32,
                d.data.image(i).to_vec(),
            )
            .map(DynamicImage::ImageLuma8)
            .ok_or_else(|| format!("{}: pixel buffer size", self.name(i))),
        }
    }

    /// Image `i` preprocessed for `cfg`.
    pub fn input(&self, i: usize, cfg: &ModelConfig) -> Result<Vec<f32>, String> {
        match self {
            DataSource::Idx(d)
                if [d.data.rows, d.data.cols] == cfg.image_size && cfg.channels == 1 =>
            {
                // As `eval` reads them: bytes / 255, normalised, no resampling.
                let (mean, std) = (cfg.normalization.mean[0], cfg.normalization.std[0]);
                Ok(d.data.normalized(i, mean, std).collect())
            }
            _ => {
                let img = self.original(i)?;
                preprocess(&img, cfg).map_err(|e| e.to_string())
            }
        }
    }
}

impl FolderSource {
    /// Lists the images under `root` (sorted by path); the first path component below `root`
    /// names the class of the images inside it.
    pub fn scan(root: &Path) -> Result<Self, AnalysisError> {
        let mut images: Vec<(PathBuf, Option<String>)> = Vec::new();
        let mut other_files = 0usize;
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d)
                .map_err(|e| AnalysisError::Data(format!("{}: {e}", d.display())))?;
            for entry in entries.flatten() {
                let p = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    Ok(t) if t.is_file() => {
                        let ext = p
                            .extension()
                            .and_then(|e| e.to_str())
                            .map(str::to_lowercase);
                        if !ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                            other_files += 1;
                            continue;
                        }
                        if images.len() >= MAX_FOLDER_IMAGES {
                            return Err(AnalysisError::Data(format!(
                                "{}: more than {MAX_FOLDER_IMAGES} images; analyse a subfolder \
                                 or pass --limit",
                                root.display()
                            )));
                        }
                        let rel = p.strip_prefix(root).unwrap_or(&p);
                        let mut parts = rel.components();
                        let first = parts.next();
                        let class = match (first, parts.next()) {
                            (Some(c), Some(_)) => {
                                Some(c.as_os_str().to_string_lossy().into_owned())
                            }
                            _ => None,
                        };
                        images.push((p, class));
                    }
                    _ => {}
                }
            }
        }
        if images.is_empty() {
            return Err(AnalysisError::Data(format!(
                "{}: no images found (searched recursively for {}{})",
                root.display(),
                IMAGE_EXTENSIONS.join(", "),
                if other_files > 0 {
                    format!("; {other_files} other files were not read")
                } else {
                    String::new()
                }
            )));
        }
        images.sort();
        let mut classes: Vec<String> = images.iter().filter_map(|(_, c)| c.clone()).collect();
        classes.sort();
        classes.dedup();
        let unlabelled = images.iter().any(|(_, c)| c.is_none());
        if unlabelled {
            classes.push(UNLABELLED.to_string());
        }
        let named = classes.len() - usize::from(unlabelled);
        let files = images
            .into_iter()
            .map(|(p, c)| {
                let idx = match c {
                    Some(c) => classes[..named].binary_search(&c).unwrap_or(0),
                    None => named,
                };
                (p, idx)
            })
            .collect();
        Ok(FolderSource {
            root: root.to_path_buf(),
            files,
            classes,
            other_files,
        })
    }
}
