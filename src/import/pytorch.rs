//! PyTorch checkpoints as `torch.save` writes them since 1.6 (`.bin`, `.pth`, `.pt`): a zip
//! archive holding `ARCHIVE/data.pkl` (the pickled object) and one record `ARCHIVE/data/KEY` per
//! storage. The pickle is read by [`super::pickle`], which never runs pickled code; the state
//! dict is the pickled dict of tensors itself, or the one under `state_dict`, `model`,
//! `model_state_dict` or `module` of a training checkpoint's dict. Tensors are read from their
//! storage records in bounded pieces, every view checked against the record's size first.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Mutex;

use super::pickle::{self, StorageDtype, TensorRef, Value};
use crate::tensor_io::{F32Tensor, TensorIoError};

/// The most entries of the archive.
const MAX_ENTRIES: usize = 1 << 20;
/// Keys of a training checkpoint under which a state dict is looked for, in this order.
pub const STATE_DICT_KEYS: [&str; 4] = ["state_dict", "model", "model_state_dict", "module"];
/// Bytes read at a time from a storage record.
const READ_PIECE: usize = 1 << 20;

/// Whether the zip archive at `path` is a PyTorch checkpoint (it holds a `*/data.pkl`).
pub fn is_torch_zip(path: &Path) -> bool {
    let Ok(file) = crate::files::open_regular(path) else {
        return false;
    };
    zip::ZipArchive::new(std::io::BufReader::new(file))
        .map(|z| data_pkl(&z).is_some())
        .unwrap_or(false)
}

/// The archive's `data.pkl` entry and its folder (`archive/`).
fn data_pkl<R: Read + Seek>(z: &zip::ZipArchive<R>) -> Option<(String, String)> {
    z.file_names()
        .flatten()
        .find(|n| {
            n.strip_suffix("data.pkl").is_some_and(|dir| {
                dir.is_empty() || (dir.ends_with('/') && dir.matches('/').count() == 1)
            })
        })
        .map(|n| {
            let dir = n.trim_end_matches("data.pkl").to_string();
            (n.into_owned(), dir)
        })
}

/// A tensor of the state dict, with its shape and stride as plain numbers (no `Rc`, so the
/// file can move between threads).
#[derive(Clone, Debug)]
struct Entry {
    record: String,
    dtype: StorageDtype,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
    contiguous: bool,
}

/// An opened PyTorch checkpoint: its state dict's tensors, read on demand.
pub struct TorchFile {
    path: PathBuf,
    zip: Mutex<zip::ZipArchive<std::io::BufReader<std::fs::File>>>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl TorchFile {
    /// Opens the archive, reads its pickle and checks every tensor against its storage record.
    pub fn open(path: &Path) -> Result<Self, TensorIoError> {
        let bad = |reason: String| TensorIoError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let file = crate::files::open_regular(path).map_err(|err| TensorIoError::Io {
            path: path.to_owned(),
            err,
        })?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| bad(format!("not a PyTorch (zip) checkpoint: {e}")))?;
        if zip.len() > MAX_ENTRIES {
            return Err(bad(format!(
                "{} archive entries, beyond the limit of {MAX_ENTRIES}",
                zip.len()
            )));
        }
        let (pkl_name, dir) = data_pkl(&zip).ok_or_else(|| {
            bad("a zip archive without `data.pkl`: not a PyTorch checkpoint".into())
        })?;
        if let Ok(mut order) = zip.by_name(&format!("{dir}byteorder")) {
            let mut text = String::new();
            let _ = order.by_ref().take(16).read_to_string(&mut text);
            if text.trim() != "little" {
                return Err(bad(format!(
                    "byte order `{}`: only little-endian checkpoints are read",
                    text.trim()
                )));
            }
        }
        let pkl = {
            let mut entry = zip
                .by_name(&pkl_name)
                .map_err(|e| bad(format!("`{pkl_name}`: {e}")))?;
            if entry.size() > pickle::MAX_PICKLE_BYTES as u64 {
                return Err(bad(format!(
                    "`{pkl_name}` is {} bytes, beyond the limit of {}",
                    entry.size(),
                    pickle::MAX_PICKLE_BYTES
                )));
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .by_ref()
                .take(pickle::MAX_PICKLE_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| bad(format!("`{pkl_name}`: {e}")))?;
            bytes
        };
        let root = pickle::unpickle(&pkl).map_err(|e| bad(format!("`{pkl_name}`: {e}")))?;
        drop(pkl);
        let dict = state_dict(&root).map_err(bad)?;
        let mut tensors = BTreeMap::new();
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        for (key, value) in dict {
            let Value::Tensor(t) = value else {
                continue;
            };
            let record = format!("{dir}data/{}", t.storage.key);
            let size = match sizes.get(&record) {
                Some(&s) => s,
                None => {
                    let s = zip.by_name(&record).map(|f| f.size()).map_err(|_| {
                        bad(format!("tensor `{key}`: no storage record `{record}`"))
                    })?;
                    sizes.insert(record.clone(), s);
                    s
                }
            };
            let need = (t.storage.numel as u64).checked_mul(t.storage.dtype.size() as u64);
            if need.is_none_or(|n| n > size) {
                return Err(bad(format!(
                    "tensor `{key}`: its storage `{record}` declares {} elements of {} bytes but \
                     holds {size} bytes",
                    t.storage.numel,
                    t.storage.dtype.size()
                )));
            }
            tensors.insert(key, entry_of(&t, record));
        }
        // `DistributedDataParallel` saves every name under `module.`.
        if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module.")) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (k["module.".len()..].to_string(), v))
                .collect();
        }
        Ok(Self {
            path: path.to_owned(),
            zip: Mutex::new(zip),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state dict's tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Tensor `name` as f32 (float32, float16, bfloat16 exactly; float64 rounded to nearest),
    /// every value finite.
    pub fn float(&self, name: &str, expected: &str) -> Result<F32Tensor, TensorIoError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| TensorIoError::Missing {
                path: self.path.clone(),
                name: name.into(),
                expected: expected.into(),
            })?;
        let width = e.dtype.size();
        let convert: fn(&[u8]) -> f32 = match e.dtype {
            StorageDtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::F64 => {
                |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
            other => {
                return Err(TensorIoError::Dtype {
                    path: self.path.clone(),
                    name: name.into(),
                    found: format!("{other:?}"),
                    expected: "a float tensor (F32, F16, BF16 or F64)".into(),
                });
            }
        };
        let numel: usize = e.shape.iter().product();
        // The elements from the first to the last the view touches (checked when opened).
        let span = if numel == 0 {
            0
        } else {
            1 + e
                .shape
                .iter()
                .zip(&e.stride)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
        };
        let io = |err: std::io::Error| TensorIoError::Invalid {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: reading `{}`: {err}", e.record),
        };
        let mut values = Vec::with_capacity(span);
        {
            let mut zip = self.zip.lock().unwrap_or_else(|p| p.into_inner());
            let mut read_span = |r: &mut dyn Read| -> std::io::Result<()> {
                let mut buf = vec![0u8; READ_PIECE.min(span * width).max(width)];
                let mut left = span * width;
                while left > 0 {
                    let take = left.min(buf.len() / width * width);
                    r.read_exact(&mut buf[..take])?;
                    values.extend(buf[..take].chunks_exact(width).map(convert));
                    left -= take;
                }
                Ok(())
            };
            let start = (e.offset * width) as u64;
            match zip.by_name_seek(&e.record) {
                Ok(mut f) => {
                    f.seek(SeekFrom::Start(start)).map_err(io)?;
                    read_span(&mut f).map_err(io)?;
                }
                // A compressed record (an archive re-zipped by hand): skipped up to the view.
                Err(_) => {
                    let mut f = zip.by_name(&e.record).map_err(|z| io(z.into()))?;
                    std::io::copy(&mut f.by_ref().take(start), &mut std::io::sink()).map_err(io)?;
                    read_span(&mut f).map_err(io)?;
                }
            }
        }
        let data = if e.contiguous {
            values
        } else {
            gather(&values, &e.shape, &e.stride)
        };
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return Err(TensorIoError::NonFinite {
                path: self.path.clone(),
                name: name.into(),
                value: data[at],
                index: crate::tensor_io::unravel(at, &e.shape),
            });
        }
        Ok(F32Tensor {
            shape: e.shape.clone(),
            data,
        })
    }
}

fn entry_of(t: &Rc<TensorRef>, record: String) -> Entry {
    Entry {
        record,
        dtype: t.storage.dtype,
        offset: t.offset,
        shape: t.shape.clone(),
        stride: t.stride.clone(),
        contiguous: t.is_contiguous(),
    }
}

/// The row-major elements of a strided view of `span` (which starts at the view's offset).
fn gather(span: &[f32], shape: &[usize], stride: &[usize]) -> Vec<f32> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at: usize = index.iter().zip(stride).map(|(i, s)| i * s).sum();
        out.push(span[at]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

/// The state dict in `root`: a dict of tensors, or one under a training checkpoint's
/// [`STATE_DICT_KEYS`]. Returns its `(name, value)` pairs.
fn state_dict(root: &Value) -> Result<Vec<(String, Value)>, String> {
    let pairs = root.dict_pairs().ok_or_else(|| {
        "the pickle holds no dict: a state dict (torch.save(model.state_dict(), path)) is read"
            .to_string()
    })?;
    let is_state_dict = |pairs: &[(Value, Value)]| {
        pairs.iter().any(|(_, v)| matches!(v, Value::Tensor(_)))
            && pairs.iter().all(|(k, _)| k.as_str().is_some())
    };
    let named = |pairs: Vec<(Value, Value)>| {
        pairs
            .into_iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v)))
            .collect()
    };
    if is_state_dict(&pairs) {
        return Ok(named(pairs));
    }
    for key in STATE_DICT_KEYS {
        if let Some(inner) = pairs
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .and_then(|(_, v)| v.dict_pairs())
            && is_state_dict(&inner)
        {
            return Ok(named(inner));
        }
    }
    let keys: Vec<String> = pairs
        .iter()
        .take(8)
        .map(|(k, _)| k.as_str().map_or_else(|| "?".into(), |s| format!("`{s}`")))
        .collect();
    Err(format!(
        "no state dict: the pickled dict holds {} (tensors by name, or a dict of them under `{}`, \
         are read)",
        if keys.is_empty() {
            "nothing".to_string()
        } else {
            keys.join(", ")
        },
        STATE_DICT_KEYS.join("`, `")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A torch.save-style archive of `pkl` and the storage records `data`.
    pub(crate) fn archive(path: &Path, pkl: &[u8], data: &[(&str, Vec<u8>)]) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pkl).unwrap();
        z.start_file("archive/byteorder", opts).unwrap();
        z.write_all(b"little").unwrap();
        for (k, bytes) in data {
            z.start_file(format!("archive/data/{k}"), opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn tensors_read_through_their_views() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.pth");
        let data = floats(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // [2, 3] row-major.
        let pkl = pickle::tests::state_dict_pickle(b"K\x02K\x03\x86", b"K\x03K\x01\x86", 6);
        archive(&p, &pkl, &[("0", data.clone())]);
        assert!(is_torch_zip(&p));
        let f = TorchFile::open(&p).unwrap();
        assert_eq!(f.names(), ["w"]);
        assert_eq!(
            f.float("w", "").unwrap().data,
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        // Its transpose [3, 2] with stride [1, 3].
        let pkl = pickle::tests::state_dict_pickle(b"K\x03K\x02\x86", b"K\x01K\x03\x86", 6);
        archive(&p, &pkl, &[("0", data.clone())]);
        let t = TorchFile::open(&p).unwrap().float("w", "").unwrap();
        assert_eq!(t.shape, [3, 2]);
        assert_eq!(t.data, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        // A record shorter than its storage declares.
        archive(&p, &pkl, &[("0", data[..20].to_vec())]);
        let e = TorchFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("holds 20 bytes") && e.contains("w.pth"), "{e}");
        // No record at all.
        archive(&p, &pkl, &[]);
        let e = TorchFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("no storage record `archive/data/0`"), "{e}");
        // Not a dict of tensors.
        archive(&p, b"\x80\x02K\x05.", &[]);
        let e = TorchFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("holds no dict"), "{e}");
    }

    #[test]
    fn strided_views_gather_row_major() {
        let span: Vec<f32> = (0..12).map(|i| i as f32).collect();
        // Every other column of a [2, 6] matrix: shape [2, 3], stride [6, 2].
        assert_eq!(
            gather(&span, &[2, 3], &[6, 2]),
            [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
    }
}
