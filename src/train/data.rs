//! Fashion-MNIST in its IDX files (as the Debian package `dataset-fashion-mnist` installs them,
//! gzip-compressed or not): strict parsing with errors that name the file and the problem.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::TrainError;

/// Where `dataset-fashion-mnist` installs the files.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Images `[len, rows·cols]` as bytes (0 = background) and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn stem(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` as bytes, row-major.
    pub fn image(&self, i: usize) -> &[u8] {
        let px = self.rows * self.cols;
        &self.pixels[i * px..(i + 1) * px]
    }

    /// Image `i` scaled to `[0, 1]` and normalised with `mean`/`std`, as the model expects.
    pub fn normalized(&self, i: usize, mean: f32, std: f32) -> impl Iterator<Item = f32> + '_ {
        self.image(i)
            .iter()
            .map(move |&p| (p as f32 / 255.0 - mean) / std)
    }

    /// The first `n` examples.
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            rows: self.rows,
            cols: self.cols,
            pixels: self.pixels[..n * self.rows * self.cols].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// Loads `split` from `dir` (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    /// `t10k-…`).
    pub fn load(dir: &Path, split: Split) -> Result<Self, TrainError> {
        if !dir.is_dir() {
            return Err(TrainError::Data(format!(
                "{}: no such directory; install the Debian package `dataset-fashion-mnist` or pass \
                 --data DIR with the Fashion-MNIST IDX files",
                dir.display()
            )));
        }
        let images_path = find(dir, &format!("{}-images-idx3-ubyte", split.stem()))?;
        let labels_path = find(dir, &format!("{}-labels-idx1-ubyte", split.stem()))?;
        let (dims, pixels) = read_idx(&images_path, 3)?;
        let (ldims, labels) = read_idx(&labels_path, 1)?;
        if dims[0] != ldims[0] {
            return Err(TrainError::Data(format!(
                "{} has {} images but {} has {} labels",
                images_path.display(),
                dims[0],
                labels_path.display(),
                ldims[0]
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, l)| **l > 9) {
            return Err(TrainError::Data(format!(
                "{}: label {l} at index {i} is not a class 0..9",
                labels_path.display()
            )));
        }
        Ok(Dataset {
            rows: dims[1],
            cols: dims[2],
            pixels,
            labels,
        })
    }
}

/// `stem` or `stem.gz` in `dir`.
pub(crate) fn find(dir: &Path, stem: &str) -> Result<PathBuf, TrainError> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            TrainError::Data(format!(
                "{}: neither `{stem}` nor `{stem}.gz` exists",
                dir.display()
            ))
        })
}

/// The largest IDX payload read (raw or decompressed); Fashion-MNIST's largest file is 47 MB.
pub const MAX_IDX_BYTES: u64 = 512 << 20;

/// Reads an IDX file of unsigned bytes with `rank` dimensions: magic `0x00 0x00 0x08 rank`, then
/// `rank` big-endian u32 sizes, then exactly the data.
pub fn read_idx(path: &Path, rank: usize) -> Result<(Vec<usize>, Vec<u8>), TrainError> {
    read_idx_within(path, rank, MAX_IDX_BYTES)
}

fn read_idx_within(
    path: &Path,
    rank: usize,
    limit: u64,
) -> Result<(Vec<usize>, Vec<u8>), TrainError> {
    let err = |what: String| TrainError::Data(format!("{}: {what}", path.display()));
    let file = crate::files::open_regular(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let too_big = |n: String| err(format!("{n} is beyond the IDX limit of {} MB", limit >> 20));
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > limit {
        return Err(too_big(format!("{len} bytes")));
    }
    let mut raw = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, limit + 1), &mut raw)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if raw.len() as u64 > limit {
        return Err(too_big(format!("{} bytes", raw.len())));
    }
    let header = 4 + 4 * rank;
    let mut bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        // A small gzip can expand to gigabytes: the header is decompressed first, and the data
        // only up to the size it declares, into a buffer of exactly that size (growing one by
        // doubling would peak at twice the limit).
        let corrupt = |e: std::io::Error| err(format!("corrupt gzip stream: {e}"));
        let mut dec = flate2::read::GzDecoder::new(&raw[..]);
        let mut out = Vec::with_capacity(header);
        (&mut dec)
            .take(header as u64)
            .read_to_end(&mut out)
            .map_err(corrupt)?;
        if let Some(total) = declared_idx_len(&out, rank) {
            if total > limit {
                return Err(too_big(format!(
                    "its decompressed data ({total} bytes, as its header declares)"
                )));
            }
            out.reserve_exact(total as usize + 1 - out.len());
            dec.take(total + 1 - header as u64)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
        }
        out
    } else {
        raw
    };
    if bytes.len() < header {
        return Err(err(format!(
            "{} bytes is too short for an IDX header of rank {rank}",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(err(format!(
            "bad IDX magic {:02x} {:02x} (expected 00 00)",
            bytes[0], bytes[1]
        )));
    }
    if bytes[2] != 0x08 {
        return Err(err(format!(
            "IDX element type 0x{:02x}, expected 0x08 (unsigned byte)",
            bytes[2]
        )));
    }
    if bytes[3] as usize != rank {
        return Err(err(format!(
            "IDX rank {}, expected {rank}",
            bytes[3] as usize
        )));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes([0, 1, 2, 3].map(|k| bytes[4 + 4 * i + k])) as usize)
        .collect();
    let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let have = bytes.len() - header;
    let Some(_) = want.filter(|&w| w == have) else {
        let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
        return Err(err(format!(
            "dimensions {dims:?} need {want} data bytes but the file has {have} (truncated or \
             corrupt)"
        )));
    };
    // In place: a copy would hold the data twice.
    bytes.drain(..header);
    Ok((dims, bytes))
}

/// The whole length (header and data) an IDX header of rank `rank` declares, `None` when `head`
/// is not a complete unsigned-byte IDX header (the caller's checks then name what is wrong).
fn declared_idx_len(head: &[u8], rank: usize) -> Option<u64> {
    let header = 4 + 4 * rank;
    if head.len() < header || head[..3] != [0, 0, 0x08] || head[3] as usize != rank {
        return None;
    }
    (0..rank)
        .map(|i| {
            u64::from(u32::from_be_bytes(
                [0, 1, 2, 3].map(|k| head[4 + 4 * i + k]),
            ))
        })
        .try_fold(1u64, |a, d| a.checked_mul(d))
        .and_then(|data| data.checked_add(header as u64))
}

/// Writes an IDX file of unsigned bytes (for fixtures and tests).
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> std::io::Result<()> {
    let mut out = vec![0u8, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    crate::tensor_io::write_atomic(path, &out).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip that expands beyond the limit (a "zip bomb") is refused from the size its header
    /// declares, and one whose header declares little is read only that far; so is a raw file
    /// beyond the limit. None is held whole.
    #[test]
    fn payloads_beyond_the_limit_are_refused() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let gzip = |name: &str, len: u32, data: usize| {
            let path = dir.path().join(name);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            gz.write_all(&[0, 0, 8, 1]).unwrap();
            gz.write_all(&len.to_be_bytes()).unwrap();
            gz.write_all(&vec![0u8; data]).unwrap();
            std::fs::write(&path, gz.finish().unwrap()).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() < 1000);
            path
        };
        let bomb = gzip("bomb-idx1-ubyte.gz", 100_000, 100_000);
        let e = read_idx_within(&bomb, 1, 10_000).unwrap_err().to_string();
        assert!(
            e.contains("its decompressed data (100008 bytes, as its header declares) is beyond the IDX limit"),
            "{e}"
        );
        let liar = gzip("liar-idx1-ubyte.gz", 10, 100_000);
        let e = read_idx_within(&liar, 1, 10_000).unwrap_err().to_string();
        assert!(
            e.contains("need 10 data bytes but the file has 11"),
            "read one byte past the declared size, no further: {e}"
        );
        let fine = gzip("fine-idx1-ubyte.gz", 10, 10);
        assert_eq!(
            read_idx_within(&fine, 1, 10_000).unwrap(),
            (vec![10], vec![0; 10])
        );
        let bad = gzip("bad-idx1-ubyte.gz", 10, 3);
        let e = read_idx_within(&bad, 1, 10_000).unwrap_err().to_string();
        assert!(e.contains("the file has 3"), "{e}");
        let raw = dir.path().join("raw-idx1-ubyte");
        std::fs::write(&raw, vec![0u8; 20_000]).unwrap();
        let e = read_idx_within(&raw, 1, 10_000).unwrap_err().to_string();
        assert!(e.contains("20000 bytes is beyond the IDX limit"), "{e}");
    }

    #[test]
    fn reads_the_committed_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/datasets/fashion-mnist-slice");
        let test = Dataset::load(&dir, Split::Test).unwrap();
        assert_eq!((test.rows, test.cols), (28, 28));
        assert!(test.len() >= 500);
        assert!(test.labels.iter().all(|&l| l < 10));
        let train = Dataset::load(&dir, Split::Train).unwrap();
        assert!(train.len() >= 500);
    }

    #[test]
    fn corrupt_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        write_idx(
            &p.join("t10k-images-idx3-ubyte"),
            &[2, 28, 28],
            &[0; 2 * 784],
        )
        .unwrap();
        write_idx(&p.join("t10k-labels-idx1-ubyte"), &[3], &[1, 2, 3]).unwrap();
        let e = Dataset::load(p, Split::Test).unwrap_err().to_string();
        assert!(e.contains("2 images but") && e.contains("3 labels"), "{e}");

        // Truncated data.
        let mut bytes = std::fs::read(p.join("t10k-images-idx3-ubyte")).unwrap();
        bytes.truncate(100);
        std::fs::write(p.join("t10k-images-idx3-ubyte"), &bytes).unwrap();
        let e = Dataset::load(p, Split::Test).unwrap_err().to_string();
        assert!(
            e.contains("t10k-images-idx3-ubyte") && e.contains("truncated"),
            "{e}"
        );

        // Wrong magic / type / rank.
        std::fs::write(p.join("t10k-images-idx3-ubyte"), [1u8; 16]).unwrap();
        let e = Dataset::load(p, Split::Test).unwrap_err().to_string();
        assert!(e.contains("bad IDX magic"), "{e}");
        write_idx(&p.join("t10k-images-idx3-ubyte"), &[2, 784], &[0; 2 * 784]).unwrap();
        let e = Dataset::load(p, Split::Test).unwrap_err().to_string();
        assert!(e.contains("rank 2, expected 3"), "{e}");

        // Bad label, corrupt gzip, missing files and directory.
        write_idx(
            &p.join("t10k-images-idx3-ubyte"),
            &[2, 28, 28],
            &[0; 2 * 784],
        )
        .unwrap();
        write_idx(&p.join("t10k-labels-idx1-ubyte"), &[2], &[1, 12]).unwrap();
        let e = Dataset::load(p, Split::Test).unwrap_err().to_string();
        assert!(e.contains("label 12 at index 1"), "{e}");
        std::fs::remove_file(p.join("t10k-labels-idx1-ubyte")).unwrap();
        std::fs::write(p.join("t10k-labels-idx1-ubyte.gz"), [0x1f, 0x8b, 1, 2, 3]).unwrap();
        let e = Dataset::load(p, Split::Test).unwrap_err().to_string();
        assert!(e.contains("corrupt gzip"), "{e}");
        let e = Dataset::load(p, Split::Train).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte.gz"), "{e}");
        let e = Dataset::load(&p.join("nope"), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dataset-fashion-mnist"), "{e}");
    }
}
