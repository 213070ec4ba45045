//! Safetensors in and out: every read is checked (file, tensor, dtype, shape, finite values) and
//! every write is atomic (a temporary file in the destination folder, then a rename), so a failed
//! or interrupted write never leaves a half-written file behind.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};

/// What went wrong with a tensor file, always naming the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a valid safetensors file ({reason})")]
    Format { path: PathBuf, reason: String },
    /// A file of another tensor format (a PyTorch checkpoint) that is not valid.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: cannot write ({reason})")]
    Write { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{name}` ({expected})")]
    Missing {
        path: PathBuf,
        name: String,
        expected: String,
    },
    #[error("{path}: tensor `{name}` has dtype {found}, expected {expected}")]
    Dtype {
        path: PathBuf,
        name: String,
        found: String,
        expected: String,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{path}: tensor `{name}` has {value} at index {index:?}, beyond f16's range (±65504)")]
    BeyondF16 {
        path: PathBuf,
        name: String,
        value: f32,
        index: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has a non-finite value ({value}) at index {index:?}")]
    NonFinite {
        path: PathBuf,
        name: String,
        value: f32,
        index: Vec<usize>,
    },
}

/// The SHA-256 of a file's bytes, in lower-case hex (read in blocks, never whole).
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = crate::files::open_regular(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks that `path` is a regular file before it is opened as an input: opening a FIFO blocks
/// forever, and a directory or device gives an unhelpful OS error ("No such device"). Readers
/// open with [`crate::files::open_regular`], which also checks the opened handle.
pub fn check_regular_file(path: &Path) -> std::io::Result<()> {
    crate::files::check_regular(path)
}

/// A float32 tensor read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// An opened, header-validated safetensors file, memory-mapped so that decoding a tensor is the
/// only copy of its data.
pub struct TensorFile {
    path: PathBuf,
    bytes: memmap2::Mmap,
}

impl TensorFile {
    /// Maps and validates the file (header, offsets) without decoding tensors.
    pub fn open(path: &Path) -> Result<Self, TensorIoError> {
        let io = |err| TensorIoError::Io {
            path: path.to_owned(),
            err,
        };
        let handle = crate::files::open_regular(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this value. A file truncated by another
        // process while mapped would fault; checkpoints are not edited in place by this program,
        // and everything it writes goes through a temporary file and a rename.
        let bytes = unsafe { memmap2::Mmap::map(&handle) }.map_err(io)?;
        let file = Self {
            path: path.to_owned(),
            bytes,
        };
        file.parsed()?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn parsed(&self) -> Result<SafeTensors<'_>, TensorIoError> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| TensorIoError::Format {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// Tensor names in the file, sorted.
    pub fn names(&self) -> Result<Vec<String>, TensorIoError> {
        let mut names: Vec<String> = self
            .parsed()?
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }

    /// The free-form `__metadata__` map of the header.
    pub fn metadata(&self) -> Result<HashMap<String, String>, TensorIoError> {
        let (_, meta) =
            SafeTensors::read_metadata(&self.bytes).map_err(|e| TensorIoError::Format {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> Result<bool, TensorIoError> {
        Ok(self.parsed()?.tensor(name).is_ok())
    }

    /// Reads tensor `name` as f32, checking dtype and that every value is finite.
    /// `expected` describes the tensor for the "missing" message (e.g. "f32 [n, e]").
    pub fn f32(&self, name: &str, expected: &str) -> Result<F32Tensor, TensorIoError> {
        self.read_float(name, expected, &[Dtype::F32])
    }

    /// Reads tensor `name` stored as f32, f16 or bf16, widened to f32 (exactly: every half value
    /// is an f32), checking that every value is finite.
    pub fn float(&self, name: &str, expected: &str) -> Result<F32Tensor, TensorIoError> {
        self.read_float(name, expected, &[Dtype::F32, Dtype::F16, Dtype::BF16])
    }

    fn read_float(
        &self,
        name: &str,
        expected: &str,
        dtypes: &[Dtype],
    ) -> Result<F32Tensor, TensorIoError> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|_| TensorIoError::Missing {
            path: self.path.clone(),
            name: name.into(),
            expected: expected.into(),
        })?;
        if !dtypes.contains(&view.dtype()) {
            let names: Vec<String> = dtypes.iter().map(|d| format!("{d:?}")).collect();
            return Err(TensorIoError::Dtype {
                path: self.path.clone(),
                name: name.into(),
                found: format!("{:?}", view.dtype()),
                expected: names.join(" or "),
            });
        }
        let shape = view.shape().to_vec();
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        self.release(bytes);
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return Err(TensorIoError::NonFinite {
                path: self.path.clone(),
                name: name.into(),
                value: data[at],
                index: unravel(at, &shape),
            });
        }
        Ok(F32Tensor { shape, data })
    }

    /// Drops the mapped pages of a decoded tensor from this process (the data now lives in its
    /// `Vec`), so loading a large checkpoint never holds it twice.
    fn release(&self, bytes: &[u8]) {
        let base = self.bytes.as_ptr() as usize;
        let page = 4096;
        let start = (bytes.as_ptr() as usize - base).div_ceil(page) * page;
        let end = (bytes.as_ptr() as usize - base + bytes.len()) / page * page;
        if end > start {
            // SAFETY: the mapping is read-only and file-backed; after MADV_DONTNEED a later access
            // would simply read the pages from the file again. Nothing here keeps references into
            // the released range past this point (the bytes were copied into the tensor).
            let _ = unsafe {
                self.bytes.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// A shape error for tensor `name` of this file.
    pub fn shape_error(
        &self,
        name: &str,
        found: &[usize],
        expected: impl Into<String>,
    ) -> TensorIoError {
        TensorIoError::Shape {
            path: self.path.clone(),
            name: name.into(),
            found: found.to_vec(),
            expected: expected.into(),
        }
    }
}

pub(crate) fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    index
}

/// A tensor to write: name, shape and f32 data (row-major).
pub struct OutTensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// How floats are stored in a written file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    /// IEEE half precision (rounded to nearest even; finite values beyond ±65504 become ±inf and
    /// are refused).
    F16,
    /// bfloat16 (f32's range, 8 bits of mantissa).
    BF16,
}

/// Borrowed f32 data for safetensors' streaming writer, little-endian in the chosen precision.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
    precision: Precision,
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        match self.precision {
            Precision::F32 => Dtype::F32,
            Precision::F16 => Dtype::F16,
            Precision::BF16 => Dtype::BF16,
        }
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        match self.precision {
            Precision::F32 if cfg!(target_endian = "little") => {
                Cow::Borrowed(bytemuck::cast_slice(self.data))
            }
            Precision::F32 => Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            Precision::F16 => Cow::Owned(
                (self.data.iter())
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            Precision::BF16 => Cow::Owned(
                (self.data.iter())
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
        }
    }
    fn data_len(&self) -> usize {
        match self.precision {
            Precision::F32 => self.data.len() * 4,
            Precision::F16 | Precision::BF16 => self.data.len() * 2,
        }
    }
}

/// Writes f32 tensors and string metadata as safetensors, atomically, streaming the data (no
/// copy of the tensors is made).
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<(), TensorIoError> {
    write_safetensors(path, tensors, metadata, Precision::F32)
}

/// As [`write_f32_safetensors`], storing the floats in `precision`; a value that does not fit
/// (beyond f16's range) is an error naming the tensor, and nothing is written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: HashMap<String, String>,
    precision: Precision,
) -> Result<(), TensorIoError> {
    for t in tensors {
        if precision == Precision::F16
            && let Some(at) = t
                .data
                .iter()
                .position(|v| v.abs() > f32::from(half::f16::MAX))
        {
            return Err(TensorIoError::BeyondF16 {
                path: path.to_owned(),
                name: t.name.into(),
                value: t.data[at],
                index: unravel(at, &t.shape),
            });
        }
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(TensorIoError::Write {
                path: path.to_owned(),
                reason: format!(
                    "tensor `{}`: shape {:?} does not hold {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                ),
            });
        }
    }
    let views: Vec<(&str, F32View<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name,
                F32View {
                    shape: &t.shape,
                    data: t.data,
                    precision,
                },
            )
        })
        .collect();
    let tmp = temporary_path(path)?;
    let _pending = Pending::new(&tmp);
    let result = serialize_sorted(&views, &metadata, &tmp)
        .map_err(|reason| TensorIoError::Write {
            path: path.to_owned(),
            reason,
        })
        .and_then(|()| {
            readable_by_all(&tmp)
                .and_then(|()| fs::File::open(&tmp))
                .and_then(|f| f.sync_all())
                .and_then(|()| fs::rename(&tmp, path))
                .map_err(|err| TensorIoError::Io {
                    path: path.to_owned(),
                    err,
                })
        });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The safetensors layout with a reproducible header: metadata keys sorted and tensors in the
/// given order, so the same tensors always give the same bytes (safetensors' own writer takes the
/// metadata as a `HashMap`, whose order changes from run to run).
fn serialize_sorted(
    views: &[(&str, F32View<'_>)],
    metadata: &HashMap<String, String>,
    path: &Path,
) -> Result<(), String> {
    use safetensors::View;
    use serde_json::{Map, Value, json};
    let mut header = Map::new();
    if !metadata.is_empty() {
        let sorted: std::collections::BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), json!(sorted));
    }
    let mut offset = 0usize;
    for (name, v) in views {
        let end = offset + v.data_len();
        let entry = json!({
            "dtype": format!("{:?}", v.dtype()),
            "shape": v.shape(),
            "data_offsets": [offset, end],
        });
        if header.insert((*name).to_string(), entry).is_some() {
            return Err(format!("tensor `{name}` is given twice"));
        }
        offset = end;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).map_err(|e| e.to_string())?;
    // The data starts 8-byte aligned, as safetensors' writer pads it.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let io = |e: std::io::Error| e.to_string();
    let mut out = std::io::BufWriter::new(fs::File::create(path).map_err(io)?);
    out.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(text.as_bytes()).map_err(io)?;
    for (_, v) in views {
        out.write_all(&v.data()).map_err(io)?;
    }
    out.into_inner().map(drop).map_err(|e| e.to_string())
}

/// safetensors creates its file owner-only (0600); a saved model is an ordinary document.
fn readable_by_all(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Temporary files being written now, removed by [`remove_pending_temporaries`] (the command
/// line calls it on Ctrl-C).
static PENDING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes every temporary file a write in progress has made (for an interrupt handler).
pub fn remove_pending_temporaries() {
    remove_pending_where(|_| true);
}

/// Removes (and forgets) the registered temporary files `which` selects.
fn remove_pending_where(which: impl Fn(&Path) -> bool) {
    if let Ok(mut pending) = PENDING.lock() {
        pending.retain(|p| {
            if which(p) {
                let _ = fs::remove_file(p);
                false
            } else {
                true
            }
        });
    }
}

/// Registers `tmp` while it is written; the guard unregisters it.
struct Pending(PathBuf);

impl Pending {
    fn new(tmp: &Path) -> Self {
        if let Ok(mut p) = PENDING.lock() {
            p.push(tmp.to_path_buf());
        }
        Self(tmp.to_path_buf())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut p) = PENDING.lock() {
            p.retain(|x| *x != self.0);
        }
    }
}

/// A temporary file name beside `path` (same folder, so the final rename is atomic).
pub(crate) fn temporary_path(path: &Path) -> Result<PathBuf, TensorIoError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| TensorIoError::Io {
        path: path.to_owned(),
        err: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let stem = format!(".{}.tmp-", file_name.to_string_lossy());
    remove_stale_temporaries(&dir, &stem);
    Ok(dir.join(format!("{stem}{}", std::process::id())))
}

/// Removes `{stem}{pid}` files beside a destination whose process is gone (a run killed with
/// SIGKILL, or interrupted, cannot clean up; the next write to the same path does).
fn remove_stale_temporaries(dir: &Path, stem: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(stem))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() as i32 && !process_alive(pid) {
            let _ = fs::remove_file(e.path());
        }
    }
}

pub(crate) fn process_alive(pid: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TensorIoError> {
    let tmp = temporary_path(path)?;
    let _pending = Pending::new(&tmp);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|err| TensorIoError::Io {
        path: path.to_owned(),
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let data = [1.0f32, -2.5, 3.25, 0.0, 5.0, 6.0];
        let meta = HashMap::from([("capacity".to_string(), "2".to_string())]);
        write_f32_safetensors(
            &path,
            &[OutTensor {
                name: "a",
                shape: vec![2, 3],
                data: &data,
            }],
            meta,
        )
        .unwrap();
        let f = TensorFile::open(&path).unwrap();
        assert_eq!(f.names().unwrap(), ["a"]);
        assert_eq!(f.metadata().unwrap()["capacity"], "2");
        let t = f.f32("a", "f32 [2, 3]").unwrap();
        assert_eq!(t.shape, [2, 3]);
        assert_eq!(t.data, data);
        let err = f.f32("b", "f32 [n, e]").err().unwrap().to_string();
        assert!(err.contains("missing tensor `b` (f32 [n, e])"), "{err}");
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn non_finite_values_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let data = [1.0f32, 2.0, f32::INFINITY, 0.0];
        write_f32_safetensors(
            &path,
            &[OutTensor {
                name: "x",
                shape: vec![2, 2],
                data: &data,
            }],
            HashMap::new(),
        )
        .unwrap();
        let err = TensorFile::open(&path)
            .unwrap()
            .f32("x", "")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.ends_with("tensor `x` has a non-finite value (inf) at index [1, 0]"),
            "{err}"
        );
    }

    #[test]
    fn garbage_and_truncation_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        fs::write(&path, b"definitely not safetensors").unwrap();
        assert!(matches!(
            TensorFile::open(&path),
            Err(TensorIoError::Format { .. })
        ));
        let good = dir.path().join("good.safetensors");
        let data = [1.0f32; 16];
        write_f32_safetensors(
            &good,
            &[OutTensor {
                name: "x",
                shape: vec![16],
                data: &data,
            }],
            HashMap::new(),
        )
        .unwrap();
        let bytes = fs::read(&good).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(matches!(
            TensorFile::open(&path),
            Err(TensorIoError::Format { .. })
        ));
        assert!(matches!(
            TensorFile::open(&dir.path().join("absent.safetensors")),
            Err(TensorIoError::Io { .. })
        ));
    }

    #[test]
    fn unwritable_destination_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/out.safetensors");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("out.safetensors"), "{err}");
        let t = [OutTensor {
            name: "x",
            shape: vec![1],
            data: &[1.0],
        }];
        let e = write_f32_safetensors(&path, &t, HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("out.safetensors: cannot write (") && !e.contains("not a valid"),
            "{e}"
        );
    }

    /// An interrupt removes the temporary files of writes in progress.
    #[test]
    fn pending_temporaries_are_removed_on_interrupt() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(".x.tmp-1");
        fs::write(&tmp, b"half").unwrap();
        let guard = Pending::new(&tmp);
        // Only this test's file: other tests' writes run beside it in this process, and the
        // list is global (`remove_pending_temporaries` is this with every file selected).
        remove_pending_where(|p| p == tmp);
        assert!(!tmp.exists());
        drop(guard);
    }

    /// A temporary file left by a killed run (its process is gone) is removed by the next write
    /// to the same destination.
    #[test]
    fn stale_temporary_files_are_cleaned_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        // Pid 2^22 + 1 is above Linux's pid_max default range; no such process.
        let stale = dir.path().join(".out.bin.tmp-4194305");
        fs::write(&stale, b"half").unwrap();
        write_atomic(&path, b"whole").unwrap();
        assert!(!stale.exists());
        assert_eq!(fs::read(&path).unwrap(), b"whole");
    }
}
