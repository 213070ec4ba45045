//! Where an analysis reads its images: a folder searched recursively, whose first subfolder names
//! the class (torchvision's ImageFolder convention; images directly in it are unlabelled), or a
//! Fashion-MNIST IDX directory. Only file names are listed up front; pixels are read batch by
//! batch, so memory does not grow with the dataset (an IDX split is streamed image by image).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use image::{DynamicImage, GrayImage};

use super::AnalysisError;
use crate::model::{IMAGE_EXTENSIONS, ModelConfig, decode_image, list_images, preprocess};
use crate::train::Split;

/// The name of the images found directly in the data folder.
pub const UNLABELLED: &str = "(unlabelled)";

/// The largest number of images a folder may hold for one analysis.
pub const MAX_FOLDER_IMAGES: usize = 2_000_000;

/// A dataset to analyse.
pub enum DataSource {
    Folder(FolderSource),
    Idx(IdxSource),
    Trace(TraceSource),
}

/// The images a routing trace holds (their routing comes from the trace, see
/// `crate::trace::TraceModel`); labels from the trace, unlabelled images as [`UNLABELLED`].
pub struct TraceSource {
    pub trace: std::sync::Arc<crate::trace::TraceFile>,
    pub classes: Vec<String>,
    labels: Vec<usize>,
}

impl TraceSource {
    pub fn new(trace: std::sync::Arc<crate::trace::TraceFile>) -> Self {
        let mut classes = trace.class_names();
        let unlabelled = classes.len();
        let labels: Vec<usize> = (0..trace.num_images())
            .map(|i| trace.image_meta(i).label.unwrap_or(unlabelled))
            .collect();
        if labels.contains(&unlabelled) {
            classes.push(UNLABELLED.to_string());
        }
        Self {
            trace,
            classes,
            labels,
        }
    }
}

/// Image files under a root, with the class index of each (`classes` names them).
pub struct FolderSource {
    pub root: PathBuf,
    pub files: Vec<(PathBuf, usize)>,
    pub classes: Vec<String>,
    /// Files that are not images by their extension (not read).
    pub other_files: usize,
    /// Entries passed over while listing (special files, looping or broken links), with why:
    /// the first [`crate::model::MAX_LISTED_SKIPPED`], and how many in all.
    pub skipped: Vec<(PathBuf, String)>,
    pub skipped_count: usize,
}

/// A Fashion-MNIST split, read image by image from its IDX file (gzip-compressed or not):
/// only the labels are held, so memory does not grow with the split.
pub struct IdxSource {
    pub dir: PathBuf,
    pub split: Split,
    pub classes: Vec<String>,
    images: PathBuf,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
    /// The open image stream and the index of the next image in it.
    stream: Mutex<Option<(Box<dyn Read + Send>, usize)>>,
}

/// The largest IDX image side accepted.
const MAX_IDX_SIDE: usize = 4096;

impl IdxSource {
    fn open(dir: &Path, split: Split, class_names: &[String]) -> Result<Self, AnalysisError> {
        let stem = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let find = |name: String| {
            crate::train::data::find(dir, &name).map_err(|e| AnalysisError::Data(e.to_string()))
        };
        let images = find(format!("{stem}-images-idx3-ubyte"))?;
        let labels_path = find(format!("{stem}-labels-idx1-ubyte"))?;
        let (_, labels) = crate::train::data::read_idx(&labels_path, 1)
            .map_err(|e| AnalysisError::Data(e.to_string()))?;
        let err = |e: String| AnalysisError::Data(format!("{}: {e}", images.display()));
        let (mut reader, [n, rows, cols]) = open_images(&images).map_err(err)?;
        if n != labels.len() {
            return Err(err(format!(
                "{n} images but {} has {} labels",
                labels_path.display(),
                labels.len()
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, l)| **l > 9) {
            return Err(AnalysisError::Data(format!(
                "{}: label {l} at index {i} is not a class 0..9",
                labels_path.display()
            )));
        }
        // The whole stream is checked once (in constant memory): exactly n images, no more.
        let want = (n * rows * cols) as u64;
        let have = std::io::copy(&mut (&mut reader).take(want + 1), &mut std::io::sink())
            .map_err(|e| err(format!("corrupt data: {e}")))?;
        if have != want {
            return Err(err(format!(
                "dimensions [{n}, {rows}, {cols}] need {want} data bytes but the file has {have} \
                 (truncated or corrupt)"
            )));
        }
        // IDX files carry no names: a ten-class model's own, else Fashion-MNIST's (the format's
        // dataset here), never bare indices.
        let classes = match class_names.len() {
            10 => class_names.to_vec(),
            _ => crate::model::FASHION_MNIST_CLASSES
                .iter()
                .map(|c| c.to_string())
                .collect(),
        };
        Ok(IdxSource {
            dir: dir.to_path_buf(),
            split,
            classes,
            images,
            labels,
            rows,
            cols,
            stream: Mutex::new(None),
        })
    }

    /// The bytes of image `i` (row-major); sequential reads continue the open stream.
    fn pixels(&self, i: usize) -> Result<Vec<u8>, String> {
        let px = self.rows * self.cols;
        let mut guard = self
            .stream
            .lock()
            .map_err(|_| "IDX reader poisoned".to_string())?;
        if guard.as_ref().is_none_or(|(_, next)| *next > i) {
            let (r, _) = open_images(&self.images)?;
            *guard = Some((r, 0));
        }
        let Some((reader, next)) = guard.as_mut() else {
            return Err("IDX reader".into());
        };
        let skip = ((i - *next) * px) as u64;
        let result = (|| {
            std::io::copy(&mut reader.take(skip), &mut std::io::sink())?;
            let mut buf = vec![0u8; px];
            reader.read_exact(&mut buf)?;
            Ok::<_, std::io::Error>(buf)
        })();
        match result {
            Ok(buf) => {
                *next = i + 1;
                Ok(buf)
            }
            Err(e) => {
                *guard = None;
                Err(format!("{}: image {i}: {e}", self.images.display()))
            }
        }
    }
}

/// Opens an IDX image file past its header: `[count, rows, cols]`.
fn open_images(path: &Path) -> Result<(Box<dyn Read + Send>, [usize; 3]), String> {
    let mut file = BufReader::new(crate::files::open_regular(path).map_err(|e| e.to_string())?);
    let gz = file
        .fill_buf()
        .map_err(|e| e.to_string())?
        .starts_with(&[0x1f, 0x8b]);
    let mut r: Box<dyn Read + Send> = if gz {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(file)
    };
    let mut head = [0u8; 16];
    r.read_exact(&mut head)
        .map_err(|e| format!("too short for an IDX header of rank 3: {e}"))?;
    if head[..4] != [0, 0, 0x08, 3] {
        return Err(format!(
            "not an IDX file of rank-3 unsigned bytes (header {:02x} {:02x} {:02x} {:02x})",
            head[0], head[1], head[2], head[3]
        ));
    }
    let dim = |k: usize| u32::from_be_bytes([0, 1, 2, 3].map(|b| head[4 + 4 * k + b])) as usize;
    let dims = [dim(0), dim(1), dim(2)];
    if dims[1] == 0 || dims[2] == 0 || dims[1] > MAX_IDX_SIDE || dims[2] > MAX_IDX_SIDE {
        return Err(format!(
            "images of {}x{} pixels (1 to {MAX_IDX_SIDE} a side)",
            dims[1], dims[2]
        ));
    }
    Ok((r, dims))
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
            return IdxSource::open(path, split, class_names).map(DataSource::Idx);
        }
        FolderSource::scan(path).map(DataSource::Folder)
    }

    pub fn len(&self) -> usize {
        match self {
            DataSource::Folder(f) => f.files.len(),
            DataSource::Idx(d) => d.labels.len(),
            DataSource::Trace(t) => t.labels.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        match self {
            DataSource::Folder(f) => f.files.truncate(n),
            DataSource::Idx(d) => d.labels.truncate(n),
            DataSource::Trace(t) => t.labels.truncate(n),
        }
    }

    /// Class names; the label of image `i` is [`label`](Self::label).
    pub fn classes(&self) -> &[String] {
        match self {
            DataSource::Folder(f) => &f.classes,
            DataSource::Idx(d) => &d.classes,
            DataSource::Trace(t) => &t.classes,
        }
    }

    pub fn label(&self, i: usize) -> usize {
        match self {
            DataSource::Folder(f) => f.files[i].1,
            DataSource::Idx(d) => d.labels[i] as usize,
            DataSource::Trace(t) => t.labels[i],
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
            DataSource::Trace(t) => t.trace.image_name(i),
        }
    }

    /// The file of image `i`, if it is one.
    pub fn path(&self, i: usize) -> Option<&Path> {
        match self {
            DataSource::Folder(f) => Some(&f.files[i].0),
            DataSource::Idx(_) | DataSource::Trace(_) => None,
        }
    }

    /// Where the data came from.
    pub fn location(&self) -> &Path {
        match self {
            DataSource::Folder(f) => &f.root,
            DataSource::Idx(d) => &d.dir,
            DataSource::Trace(t) => t.trace.path(),
        }
    }

    /// Image `i` as stored (decoded, EXIF orientation applied).
    pub fn original(&self, i: usize) -> Result<DynamicImage, String> {
        match self {
            DataSource::Folder(f) => decode_image(&f.files[i].0).map_err(|e| e.to_string()),
            DataSource::Idx(d) => GrayImage::from_raw(d.cols as u32, d.rows as u32, d.pixels(i)?)
                .map(DynamicImage::ImageLuma8)
                .ok_or_else(|| format!("{}: pixel buffer size", self.name(i))),
            DataSource::Trace(t) => t.trace.image(i).map_err(|e| e.to_string()),
        }
    }

    /// Image `i` preprocessed for `cfg`.
    pub fn input(&self, i: usize, cfg: &ModelConfig) -> Result<Vec<f32>, String> {
        match self {
            // A trace's routing is read by image index; no pixels go through a model.
            DataSource::Trace(_) => Ok(Vec::new()),
            DataSource::Idx(d) if [d.rows, d.cols] == cfg.image_size && cfg.channels == 1 => {
                // As `eval` reads them: bytes / 255, normalised, no resampling.
                let (mean, std) = (cfg.normalization.mean[0], cfg.normalization.std[0]);
                Ok(d.pixels(i)?
                    .iter()
                    .map(|&p| (p as f32 / 255.0 - mean) / std)
                    .collect())
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
        let listing = list_images(root, MAX_FOLDER_IMAGES).map_err(|e| {
            AnalysisError::Data(format!("{e}; analyse a subfolder or pass --limit"))
        })?;
        let (other_files, skipped, skipped_count) =
            (listing.other_files, listing.skipped, listing.skipped_count);
        let images: Vec<(PathBuf, Option<String>)> = listing
            .files
            .into_iter()
            .map(|p| {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                let mut parts = rel.components();
                let class = match (parts.next(), parts.next()) {
                    (Some(c), Some(_)) => Some(c.as_os_str().to_string_lossy().into_owned()),
                    _ => None,
                };
                (p, class)
            })
            .collect();
        if images.is_empty() {
            return Err(AnalysisError::Data(format!(
                "{}: no images found (searched recursively for {}{}{})",
                root.display(),
                IMAGE_EXTENSIONS.join(", "),
                if other_files > 0 {
                    format!("; {other_files} other files were not read")
                } else {
                    String::new()
                },
                match skipped.first() {
                    Some((p, why)) => format!(
                        "; {skipped_count} entries were passed over (first: {}: {why})",
                        p.display()
                    ),
                    None => String::new(),
                }
            )));
        }
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
            skipped,
            skipped_count,
        })
    }
}
