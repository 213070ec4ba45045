//! google-research/vmoe's checkpoint format (the format of the released V-MoE checkpoints), read
//! and written as `shared/spec/vmoe-checkpoint.md` describes it: a msgpack index (`PREFIX.index`)
//! with one extension-type-8 leaf per array, and msgpack shards (`PREFIX.data-NNNNN-of-MMMMM`)
//! holding each array as chunks of 1-D ndarray pieces (extension type 1) plus the region they cover
//! (extension type 6 of type-5 slices).
//!
//! Reading streams the shards: each chunk's bytes go straight into its array's final f32 buffer,
//! so the weights are held once (plus one chunk in flight). Every chunk is checked against the
//! index (shard, region, dtype, size) and every array must be covered exactly.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rmpv::Value;

use crate::model::ModelError;
use crate::tensor_io::F32Tensor;

/// Marker key vmoe writes into every shard.
pub const SHARD_MARKER: &str = "__msgpack_array_chunk_a87ca2__";
/// Index version of the supported (V1) format.
pub const INDEX_VERSION: &str = "20220622";

const EXT_NDARRAY: i8 = 1;
const EXT_SHAPED_ARRAY: i8 = 4;
const EXT_SLICE: i8 = 5;
const EXT_SLICEND: i8 = 6;
const EXT_INDEX_INFO: i8 = 8;

/// One chunk of an array: the region it covers and the shard holding it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkInfo {
    pub region: Vec<(usize, usize)>,
    pub shard: usize,
}

/// One array of the checkpoint, as the index describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct VmoeLeaf {
    /// Path joined with `/` (e.g. `params/Encoder/encoder_norm/scale`).
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub chunks: Vec<ChunkInfo>,
}

/// A parsed index.
#[derive(Clone, Debug, PartialEq)]
pub struct VmoeIndex {
    pub prefix: PathBuf,
    pub shard_count: usize,
    /// Leaves in leaf-index order (depth-first, keys sorted).
    pub leaves: Vec<VmoeLeaf>,
}

impl VmoeIndex {
    /// Path of shard `i`.
    pub fn shard_path(&self, i: usize) -> PathBuf {
        shard_path(&self.prefix, i, self.shard_count)
    }

    /// Total bytes of all shards (for progress).
    pub fn data_bytes(&self) -> u64 {
        (0..self.shard_count)
            .filter_map(|i| std::fs::metadata(self.shard_path(i)).ok())
            .map(|m| m.len())
            .sum()
    }
}

fn shard_path(prefix: &Path, i: usize, count: usize) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(format!(".data-{i:05}-of-{count:05}"));
    PathBuf::from(s)
}

/// `PREFIX` from `PREFIX` or `PREFIX.index`.
pub fn checkpoint_prefix(path: &Path) -> PathBuf {
    match path.to_str().and_then(|s| s.strip_suffix(".index")) {
        Some(p) => PathBuf::from(p),
        None => path.to_owned(),
    }
}

fn index_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".index");
    PathBuf::from(s)
}

fn err(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tensor(format!("{}: {msg}", path.display()))
}

/// The payload of a value that must be extension `code` (a plain binary is accepted too).
fn ext_payload<'a>(v: &'a Value, code: i8, what: &str) -> Result<&'a [u8], String> {
    match v {
        Value::Ext(c, data) if *c == code => Ok(data),
        Value::Ext(c, _) => Err(format!("{what} has extension type {c}, expected {code}")),
        Value::Binary(data) => Ok(data),
        other => Err(format!(
            "{what} is {}, expected extension type {code}",
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary data",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension",
    }
}

/// How deep a msgpack value may nest (a vmoe parameter tree is about 6 levels; each level of
/// maps with string keys takes two of this budget in the decoder).
const MAX_DECODE_DEPTH: usize = 128;
/// The deepest parameter path and the longest key of an index.
const MAX_TREE_DEPTH: usize = 32;
const MAX_KEY_CHARS: usize = 256;

fn decode(bytes: &[u8], what: &str) -> Result<Value, String> {
    let mut cursor = bytes;
    rmpv::decode::read_value_with_max_depth(&mut cursor, MAX_DECODE_DEPTH).map_err(|e| {
        if matches!(e, rmpv::decode::Error::DepthLimitExceeded) {
            format!("{what}: nested deeper than {MAX_DECODE_DEPTH} levels")
        } else {
            format!("{what}: {e}")
        }
    })
}

fn as_usize(v: &Value, what: &str) -> Result<usize, String> {
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| format!("{what} is {}, expected a non-negative integer", kind(v)))
}

fn as_array<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], String> {
    v.as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| format!("{what} is {}, expected an array", kind(v)))
}

/// Parses a slicend payload (an array of type-5 slices `[start, stop, step]`) against `shape`.
fn parse_slicend(
    payload: &[u8],
    shape: &[usize],
    what: &str,
) -> Result<Vec<(usize, usize)>, String> {
    let v = decode(payload, what)?;
    let slices = as_array(&v, what)?;
    if slices.len() != shape.len() {
        return Err(format!(
            "{what} has {} slices for a {}-dimensional array",
            slices.len(),
            shape.len()
        ));
    }
    slices
        .iter()
        .zip(shape)
        .map(|(s, &dim)| {
            let triple = decode(ext_payload(s, EXT_SLICE, what)?, what)?;
            let t = as_array(&triple, what)?;
            if t.len() != 3 {
                return Err(format!(
                    "{what}: a slice has {} fields, expected 3",
                    t.len()
                ));
            }
            let start = if t[0].is_nil() {
                0
            } else {
                as_usize(&t[0], what)?
            };
            let stop = if t[1].is_nil() {
                dim
            } else {
                as_usize(&t[1], what)?
            };
            if !(t[2].is_nil() || t[2].as_u64() == Some(1)) {
                return Err(format!("{what}: strided slices are not supported"));
            }
            if start > stop || stop > dim {
                return Err(format!(
                    "{what}: slice {start}..{stop} outside an axis of {dim}"
                ));
            }
            Ok((start, stop))
        })
        .collect()
}

/// Reads `PREFIX.index` (also accepts the `.index` path itself).
pub fn read_index(path: &Path) -> Result<VmoeIndex, ModelError> {
    let prefix = checkpoint_prefix(path);
    let ipath = index_path(&prefix);
    let bytes = crate::files::read_regular(&ipath, MAX_INDEX_BYTES).map_err(|e| err(&ipath, e))?;
    let root = decode(&bytes, "index").map_err(|e| err(&ipath, e))?;
    let field = |k: &str| {
        root.as_map().and_then(|m| {
            m.iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v)
        })
    };
    if root.as_map().is_none() {
        return Err(err(
            &ipath,
            format!("the index is {}, expected a map", kind(&root)),
        ));
    }
    match field("version").and_then(Value::as_str) {
        Some(INDEX_VERSION) => {}
        Some(other) => {
            return Err(err(
                &ipath,
                format!("unsupported index version `{other}` (expected {INDEX_VERSION})"),
            ));
        }
        None => {
            return Err(err(
                &ipath,
                "old-format vmoe index (no version): it can only be read with the parameter tree \
                 known in advance; re-save it with a current vmoe",
            ));
        }
    }
    let shard_count = field("shard_count")
        .and_then(Value::as_u64)
        .ok_or_else(|| err(&ipath, "missing `shard_count`"))?;
    // Bounded before any shard name is formed or opened.
    if shard_count == 0 || shard_count > MAX_SHARDS {
        return Err(err(
            &ipath,
            format!("`shard_count` {shard_count} is outside 1..={MAX_SHARDS}"),
        ));
    }
    let shard_count = shard_count as usize;
    let tree = field("index").ok_or_else(|| err(&ipath, "missing `index` tree"))?;
    let mut leaves = Vec::new();
    walk(tree, String::new(), 0, &mut leaves).map_err(|e| err(&ipath, e))?;
    for leaf in &leaves {
        check_exact_cover(leaf).map_err(|e| err(&ipath, e))?;
        for c in &leaf.chunks {
            if c.shard >= shard_count {
                return Err(err(
                    &ipath,
                    format!(
                        "`{}` has a chunk in shard {} of {shard_count}",
                        leaf.name, c.shard
                    ),
                ));
            }
        }
    }
    Ok(VmoeIndex {
        prefix,
        shard_count,
        leaves,
    })
}

/// An index file at most (a released V-MoE's is under 1 MB).
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// The most shards an index may declare.
pub const MAX_SHARDS: u64 = 65_536;

/// Proves from the index alone that `leaf`'s chunks cover every element exactly once: a
/// bounded size, pairwise disjoint regions, and volumes that add up to the array.
fn check_exact_cover(leaf: &VmoeLeaf) -> Result<(), String> {
    let size = leaf
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= 1 << 36)
        .ok_or_else(|| format!("`{}` declares shape {:?}, too large", leaf.name, leaf.shape))?;
    let volume = |r: &[(usize, usize)]| r.iter().map(|(a, b)| b - a).product::<usize>();
    let total: usize = leaf.chunks.iter().map(|c| volume(&c.region)).sum();
    for (i, a) in leaf.chunks.iter().enumerate() {
        for b in &leaf.chunks[i + 1..] {
            let overlap = a
                .region
                .iter()
                .zip(&b.region)
                .all(|((a0, a1), (b0, b1))| a0.max(b0) < a1.min(b1));
            if overlap && !leaf.shape.is_empty() {
                return Err(format!(
                    "`{}`: chunks {:?} and {:?} overlap",
                    leaf.name, a.region, b.region
                ));
            }
        }
    }
    if total != size || (leaf.shape.is_empty() && leaf.chunks.len() != 1) {
        return Err(format!(
            "`{}`: its chunks cover {total} of its {size} values",
            leaf.name
        ));
    }
    Ok(())
}

/// Depth-first over the tree with sorted keys (JAX's flatten order), collecting leaves.
fn walk(v: &Value, path: String, depth: usize, leaves: &mut Vec<VmoeLeaf>) -> Result<(), String> {
    match v {
        Value::Map(_) if depth >= MAX_TREE_DEPTH => Err(format!(
            "index entry `{}…` nests deeper than {MAX_TREE_DEPTH} levels",
            path.chars().take(200).collect::<String>()
        )),
        Value::Map(entries) => {
            let mut items: Vec<(String, &Value)> = entries
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.as_str()
                            .ok_or_else(|| format!("non-string key under `{path}`"))?
                            .to_string(),
                        v,
                    ))
                })
                .collect::<Result<_, String>>()?;
            if let Some((k, _)) = items
                .iter()
                .find(|(k, _)| k.chars().count() > MAX_KEY_CHARS)
            {
                return Err(format!(
                    "a key under `{path}` is {} characters long (at most {MAX_KEY_CHARS}): `{}…`",
                    k.chars().count(),
                    k.chars().take(40).collect::<String>()
                ));
            }
            items.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, child) in items {
                let p = if path.is_empty() {
                    k
                } else {
                    format!("{path}/{k}")
                };
                walk(child, p, depth + 1, leaves)?;
            }
            Ok(())
        }
        Value::Ext(..) | Value::Binary(_) => {
            let what = format!("index entry `{path}`");
            let info = decode(ext_payload(v, EXT_INDEX_INFO, &what)?, &what)?;
            let parts = as_array(&info, &what)?;
            if parts.len() != 3 {
                return Err(format!("{what} has {} fields, expected 3", parts.len()));
            }
            let shaped = decode(ext_payload(&parts[0], EXT_SHAPED_ARRAY, &what)?, &what)?;
            let sa = as_array(&shaped, &what)?;
            let shape: Vec<usize> = as_array(sa.first().unwrap_or(&Value::Nil), &what)?
                .iter()
                .map(|d| as_usize(d, &what))
                .collect::<Result<_, _>>()?;
            let dtype = sa
                .get(1)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{what} has no dtype"))?
                .to_string();
            let slicends = as_array(&parts[1], &what)?;
            let shards = as_array(&parts[2], &what)?;
            if slicends.len() != shards.len() {
                return Err(format!(
                    "{what}: {} regions for {} shard ids",
                    slicends.len(),
                    shards.len()
                ));
            }
            let chunks = slicends
                .iter()
                .zip(shards)
                .map(|(s, id)| {
                    Ok(ChunkInfo {
                        region: parse_slicend(ext_payload(s, EXT_SLICEND, &what)?, &shape, &what)?,
                        shard: as_usize(id, &what)?,
                    })
                })
                .collect::<Result<_, String>>()?;
            leaves.push(VmoeLeaf {
                name: path,
                shape,
                dtype,
                chunks,
            });
            Ok(())
        }
        other => Err(format!(
            "index entry `{path}` is {}, expected a map or an index leaf",
            kind(other)
        )),
    }
}

fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "float32" => Some(4),
        "bfloat16" | "float16" => Some(2),
        _ => None,
    }
}

fn to_f32(bytes: &[u8], dtype: &str, out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        "float32" => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        "bfloat16" => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
        ),
        _ => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
}

/// A reader that counts bytes, for progress.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Reads every array of the checkpoint as f32, streaming the shards.
/// `progress(done_bytes, total_bytes)` is called after each chunk.
pub fn read_arrays(
    index: &VmoeIndex,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BTreeMap<String, F32Tensor>, ModelError> {
    let total = index.data_bytes();
    // The arrays' data must come from the shards: what the index declares is checked against
    // the shards' sizes before anything is allocated for it.
    // Each shard must hold at least the bytes of the chunks the index places in it (its msgpack
    // framing comes on top), so a truncated or empty shard is named with how much of it is there.
    let mut in_shard = vec![0u64; index.shard_count];
    for leaf in &index.leaves {
        let size = dtype_size(&leaf.dtype).unwrap_or(4) as u64;
        for c in &leaf.chunks {
            if let Some(b) = in_shard.get_mut(c.shard) {
                let n = (c.region.iter())
                    .map(|(a, b)| b.saturating_sub(*a) as u64)
                    .fold(1u64, u64::saturating_mul);
                *b = b.saturating_add(n.saturating_mul(size));
            }
        }
    }
    let mut shard_bytes = 0u64;
    for (shard, &needed) in in_shard.iter().enumerate() {
        let path = index.shard_path(shard);
        crate::tensor_io::check_regular_file(&path)
            .map_err(|e| err(&path, format!("missing or unreadable shard ({e})")))?;
        let have = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if have < needed {
            let pct = (have as f64 / needed as f64 * 100.0).floor();
            return Err(err(
                &path,
                format!(
                    "the shard holds {pct}% of its declared bytes ({have} of the {needed} bytes \
                     of array data the index places in it): truncated or empty"
                ),
            ));
        }
        shard_bytes += have;
    }
    let declared: u64 = (index.leaves.iter())
        .map(|l| {
            let n: u64 = l.shape.iter().map(|&d| d as u64).product();
            n.saturating_mul(dtype_size(&l.dtype).unwrap_or(4) as u64)
        })
        .fold(0u64, u64::saturating_add);
    if declared > shard_bytes {
        return Err(ModelError::Tensor(format!(
            "{}: the index declares {declared} bytes of arrays, but its {} shards hold only {shard_bytes}",
            index.prefix.display(),
            index.shard_count
        )));
    }
    let mut buffers: Vec<Vec<f32>> = Vec::with_capacity(index.leaves.len());
    for leaf in &index.leaves {
        if dtype_size(&leaf.dtype).is_none() {
            return Err(ModelError::Tensor(format!(
                "`{}` has dtype {}; only float32, bfloat16 and float16 arrays can be read",
                leaf.name, leaf.dtype
            )));
        }
        buffers.push(vec![0.0; leaf.shape.iter().product()]);
    }
    let mut covered = vec![0usize; index.leaves.len()];
    let mut seen: Vec<Vec<bool>> = (index.leaves.iter())
        .map(|l| vec![false; l.chunks.len()])
        .collect();
    let mut done = 0u64;
    for shard in 0..index.shard_count {
        let path = index.shard_path(shard);
        let file = crate::files::open_regular(&path)
            .map_err(|e| err(&path, format!("missing or unreadable shard ({e})")))?;
        let mut rd = Counting {
            inner: BufReader::with_capacity(1 << 20, file),
            read: 0,
        };
        read_shard(
            index,
            shard,
            &mut rd,
            &mut buffers,
            &mut covered,
            &mut seen,
            &mut |bytes| progress(done + bytes, total),
        )
        .map_err(|e| err(&path, e))?;
        done += rd.read;
    }
    let mut out = BTreeMap::new();
    for ((leaf, data), (&cov, read)) in index
        .leaves
        .iter()
        .zip(buffers)
        .zip(covered.iter().zip(&seen))
    {
        let n = read.iter().filter(|&&r| r).count();
        if n != leaf.chunks.len() || cov != data.len() {
            return Err(ModelError::Tensor(format!(
                "`{}`: the shards hold {n} of its {} chunks ({cov} of {} values)",
                leaf.name,
                leaf.chunks.len(),
                data.len()
            )));
        }
        out.insert(
            leaf.name.clone(),
            F32Tensor {
                shape: leaf.shape.clone(),
                data,
            },
        );
    }
    Ok(out)
}

fn rmp_err<E: std::fmt::Display>(e: E) -> String {
    format!("truncated or malformed msgpack ({e})")
}

#[allow(clippy::too_many_arguments)]
fn read_shard<R: Read>(
    index: &VmoeIndex,
    shard: usize,
    rd: &mut Counting<R>,
    buffers: &mut [Vec<f32>],
    covered: &mut [usize],
    seen: &mut [Vec<bool>],
    progress: &mut dyn FnMut(u64),
) -> Result<(), String> {
    let entries = rmp::decode::read_map_len(rd).map_err(rmp_err)?;
    let mut raw = Vec::new();
    let mut values = Vec::new();
    let mut saw_marker = false;
    for _ in 0..entries {
        let key = rmpv::decode::read_value(rd).map_err(rmp_err)?;
        let key = key
            .as_str()
            .ok_or("a shard key is not a string")?
            .to_string();
        if key == SHARD_MARKER {
            saw_marker = rmpv::decode::read_value(rd).map_err(rmp_err)?.as_bool() == Some(true);
            continue;
        }
        let li: usize = key
            .parse()
            .map_err(|_| format!("unexpected shard key `{key}`"))?;
        let leaf = index.leaves.get(li).ok_or_else(|| {
            format!(
                "shard holds array {li}, the index has {}",
                index.leaves.len()
            )
        })?;
        let item = dtype_size(&leaf.dtype).unwrap_or(4);
        let nchunks = rmp::decode::read_array_len(rd).map_err(rmp_err)?;
        for _ in 0..nchunks {
            if rmp::decode::read_array_len(rd).map_err(rmp_err)? != 2 {
                return Err(format!(
                    "a chunk of `{}` is not a [pieces, region] pair",
                    leaf.name
                ));
            }
            raw.clear();
            let pieces = rmp::decode::read_array_len(rd).map_err(rmp_err)?;
            for _ in 0..pieces {
                let meta = rmp::decode::read_ext_meta(rd).map_err(rmp_err)?;
                if meta.typeid != EXT_NDARRAY {
                    return Err(format!(
                        "a piece of `{}` has extension type {}, expected {EXT_NDARRAY} (ndarray)",
                        leaf.name, meta.typeid
                    ));
                }
                let start = rd.read;
                if rmp::decode::read_array_len(rd).map_err(rmp_err)? != 3 {
                    return Err(format!(
                        "a piece of `{}` is not [shape, dtype, data]",
                        leaf.name
                    ));
                }
                let piece_shape = rmpv::decode::read_value(rd).map_err(rmp_err)?;
                let dtype = rmpv::decode::read_value(rd).map_err(rmp_err)?;
                if dtype.as_str() != Some(leaf.dtype.as_str()) {
                    return Err(format!(
                        "a piece of `{}` has dtype {dtype}, the index says {}",
                        leaf.name, leaf.dtype
                    ));
                }
                let len = rmp::decode::read_bin_len(rd).map_err(rmp_err)? as usize;
                let elems = piece_shape
                    .as_array()
                    .and_then(|d| {
                        d.iter()
                            .try_fold(1usize, |a, v| a.checked_mul(v.as_u64()? as usize))
                    })
                    .ok_or_else(|| format!("a piece of `{}` has no valid shape", leaf.name))?;
                if elems.checked_mul(item) != Some(len) {
                    return Err(format!(
                        "a piece of `{}` has shape {piece_shape} but {len} bytes of {}",
                        leaf.name, leaf.dtype
                    ));
                }
                let limit = leaf.shape.iter().product::<usize>() * item;
                let at = raw.len();
                if at + len > limit {
                    return Err(format!(
                        "a piece of `{}` declares {len} bytes, more than the array holds ({limit})",
                        leaf.name
                    ));
                }
                // Read as it arrives (a declared length is not trusted with a zero-filled buffer).
                let got = std::io::Read::take(&mut *rd, len as u64)
                    .read_to_end(&mut raw)
                    .map_err(rmp_err)?;
                if got != len {
                    return Err(format!(
                        "a piece of `{}` is truncated ({got} of {len} bytes)",
                        leaf.name
                    ));
                }
                if rd.read - start != meta.size as u64 {
                    return Err(format!(
                        "a piece of `{}` disagrees with its extension size",
                        leaf.name
                    ));
                }
            }
            let meta = rmp::decode::read_ext_meta(rd).map_err(rmp_err)?;
            if meta.typeid != EXT_SLICEND {
                return Err(format!(
                    "the region of a chunk of `{}` has extension type {}, expected {EXT_SLICEND}",
                    leaf.name, meta.typeid
                ));
            }
            if meta.size > 1 << 16 {
                return Err(format!(
                    "the region of a chunk of `{}` declares {} bytes",
                    leaf.name, meta.size
                ));
            }
            let mut payload = vec![0u8; meta.size as usize];
            rd.read_exact(&mut payload).map_err(rmp_err)?;
            let region = parse_slicend(
                &payload,
                &leaf.shape,
                &format!("a chunk of `{}`", leaf.name),
            )?;
            let Some(ci) = leaf
                .chunks
                .iter()
                .position(|c| c.shard == shard && c.region == region)
            else {
                return Err(format!(
                    "a chunk of `{}` covers {region:?}, which the index does not list in shard {shard}",
                    leaf.name
                ));
            };
            if std::mem::replace(&mut seen[li][ci], true) {
                return Err(format!(
                    "a chunk of `{}` covering {region:?} appears twice",
                    leaf.name
                ));
            }
            let count: usize = region.iter().map(|(a, b)| b - a).product();
            if raw.len() != count * item {
                return Err(format!(
                    "a chunk of `{}` has {} bytes for a region of {count} {} values",
                    leaf.name,
                    raw.len(),
                    leaf.dtype
                ));
            }
            to_f32(&raw, &leaf.dtype, &mut values);
            place(&mut buffers[li], &leaf.shape, &region, &values);
            covered[li] += count;
            progress(rd.read);
        }
    }
    if !saw_marker {
        return Err(format!("not a vmoe shard (no `{SHARD_MARKER}` marker)"));
    }
    Ok(())
}

/// Copies a C-order chunk covering `region` into the C-order array of `shape`.
fn place(dst: &mut [f32], shape: &[usize], region: &[(usize, usize)], src: &[f32]) {
    if shape.is_empty() {
        dst[0] = src[0];
        return;
    }
    let nd = shape.len();
    let run = region[nd - 1].1 - region[nd - 1].0;
    if run == 0 {
        return;
    }
    let mut idx: Vec<usize> = region.iter().map(|r| r.0).collect();
    for piece in src.chunks_exact(run) {
        let mut off = 0;
        for (d, &i) in idx.iter().enumerate() {
            off = off * shape[d] + i;
        }
        dst[off..off + run].copy_from_slice(piece);
        // Next index over all axes but the last.
        for d in (0..nd - 1).rev() {
            idx[d] += 1;
            if idx[d] < region[d].1 {
                break;
            }
            idx[d] = region[d].0;
        }
    }
}

// ---- writing ----

fn enc(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, v);
    out
}

fn slicend_value(region: &[(usize, usize)]) -> Value {
    let slices = region
        .iter()
        .map(|&(a, b)| {
            Value::Ext(
                EXT_SLICE,
                enc(&Value::Array(vec![a.into(), b.into(), Value::Nil])),
            )
        })
        .collect();
    Value::Ext(EXT_SLICEND, enc(&Value::Array(slices)))
}

/// Splits `shape` into chunks along axis 0 of at most `max_values` values (at least one row).
fn plan_chunks(shape: &[usize], max_values: usize) -> Vec<Vec<(usize, usize)>> {
    if shape.is_empty() {
        return vec![Vec::new()];
    }
    let row: usize = shape[1..].iter().product::<usize>().max(1);
    let rows_per = (max_values / row).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let stop = (start + rows_per).min(shape[0]);
        let mut region = vec![(start, stop)];
        region.extend(shape[1..].iter().map(|&d| (0, d)));
        out.push(region);
        start = stop;
        if start >= shape[0] {
            break;
        }
    }
    out
}

/// Writes float32 arrays (names joined with `/`) as a vmoe checkpoint: `PREFIX.index` and
/// `shard_count` shards, each array split along its first axis into chunks of at most
/// `max_chunk_values` values (spread round-robin over the shards) and each chunk into 1-D pieces of
/// at most `max_piece_values`. Files are written through temporary names and renamed.
pub fn write_checkpoint(
    prefix: &Path,
    arrays: &BTreeMap<String, F32Tensor>,
    shard_count: usize,
    max_chunk_values: usize,
    max_piece_values: usize,
) -> Result<(), ModelError> {
    let shard_count = shard_count.max(1);
    // Leaf order = depth-first over sorted keys = sorted order of the joined paths' components.
    let mut names: Vec<&String> = arrays.keys().collect();
    names.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    let mut plans = Vec::new();
    let mut next = 0usize;
    for name in &names {
        let t = &arrays[*name];
        let chunks: Vec<ChunkInfo> = plan_chunks(&t.shape, max_chunk_values.max(1))
            .into_iter()
            .map(|region| {
                let c = ChunkInfo {
                    region,
                    shard: next % shard_count,
                };
                next += 1;
                c
            })
            .collect();
        plans.push(chunks);
    }
    // Index tree.
    let mut tree = Value::Map(Vec::new());
    for (name, chunks) in names.iter().zip(&plans) {
        let t = &arrays[*name];
        let shaped = Value::Ext(
            EXT_SHAPED_ARRAY,
            enc(&Value::Array(vec![
                Value::Array(t.shape.iter().map(|&d| d.into()).collect()),
                "float32".into(),
                false.into(),
                Value::Map(Vec::new()),
            ])),
        );
        let info = Value::Array(vec![
            shaped,
            Value::Array(chunks.iter().map(|c| slicend_value(&c.region)).collect()),
            Value::Array(chunks.iter().map(|c| c.shard.into()).collect()),
        ]);
        insert_path(&mut tree, name, Value::Ext(EXT_INDEX_INFO, enc(&info)));
    }
    let index = Value::Map(vec![
        ("shard_count".into(), shard_count.into()),
        ("index".into(), tree),
        ("version".into(), INDEX_VERSION.into()),
    ]);
    write_file(&index_path(prefix), |w| w.write_all(&enc(&index)))?;
    for shard in 0..shard_count {
        let path = shard_path(prefix, shard, shard_count);
        write_file(&path, |w| {
            let mine: Vec<usize> = (0..names.len())
                .filter(|&i| plans[i].iter().any(|c| c.shard == shard))
                .collect();
            rmp::encode::write_map_len(w, mine.len() as u32 + 1).map_err(std::io::Error::other)?;
            w.write_all(&enc(&SHARD_MARKER.into()))?;
            w.write_all(&enc(&true.into()))?;
            for li in mine {
                let t = &arrays[names[li]];
                w.write_all(&enc(&li.to_string().into()))?;
                let chunks: Vec<&ChunkInfo> =
                    plans[li].iter().filter(|c| c.shard == shard).collect();
                rmp::encode::write_array_len(w, chunks.len() as u32)
                    .map_err(std::io::Error::other)?;
                for c in chunks {
                    let values = extract(&t.data, &t.shape, &c.region);
                    rmp::encode::write_array_len(w, 2).map_err(std::io::Error::other)?;
                    let pieces: Vec<&[f32]> = if values.is_empty() {
                        vec![&values[..]]
                    } else {
                        values.chunks(max_piece_values.max(1)).collect()
                    };
                    rmp::encode::write_array_len(w, pieces.len() as u32)
                        .map_err(std::io::Error::other)?;
                    for p in pieces {
                        let mut head = Vec::new();
                        rmp::encode::write_array_len(&mut head, 3)
                            .map_err(std::io::Error::other)?;
                        head.extend(enc(&Value::Array(vec![p.len().into()])));
                        head.extend(enc(&"float32".into()));
                        rmp::encode::write_bin_len(&mut head, (p.len() * 4) as u32)
                            .map_err(std::io::Error::other)?;
                        rmp::encode::write_ext_meta(
                            w,
                            (head.len() + p.len() * 4) as u32,
                            EXT_NDARRAY,
                        )
                        .map_err(std::io::Error::other)?;
                        w.write_all(&head)?;
                        for v in p {
                            w.write_all(&v.to_le_bytes())?;
                        }
                    }
                    w.write_all(&enc(&slicend_value(&c.region)))?;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn extract(data: &[f32], shape: &[usize], region: &[(usize, usize)]) -> Vec<f32> {
    if shape.is_empty() {
        return data.to_vec();
    }
    // Chunks split only axis 0, so a region is one contiguous block.
    let row: usize = shape[1..].iter().product();
    data[region[0].0 * row..region[0].1 * row].to_vec()
}

fn insert_path(tree: &mut Value, path: &str, leaf: Value) {
    let mut node = tree;
    let parts: Vec<&str> = path.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Map(entries) = node else { return };
        let pos = match entries.iter().position(|(k, _)| k.as_str() == Some(part)) {
            Some(p) => p,
            None => {
                let child = if i + 1 == parts.len() {
                    Value::Nil
                } else {
                    Value::Map(Vec::new())
                };
                entries.push(((*part).into(), child));
                entries.len() - 1
            }
        };
        if i + 1 == parts.len() {
            entries[pos].1 = leaf;
            return;
        }
        node = &mut entries[pos].1;
    }
}

fn write_file(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), ModelError> {
    let tmp = crate::tensor_io::temporary_path(path)?;
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        body(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index whose tree is `tree` (raw msgpack), with a valid version and one shard.
    fn index_with_tree(dir: &Path, tree: &[u8]) -> PathBuf {
        let mut b = vec![0x83];
        for (k, v) in [("version", INDEX_VERSION), ("shard_count", "")] {
            b.push(0xa0 | k.len() as u8);
            b.extend(k.as_bytes());
            if v.is_empty() {
                b.push(0x01);
            } else {
                b.push(0xa0 | v.len() as u8);
                b.extend(v.as_bytes());
            }
        }
        b.extend([0xa5]);
        b.extend(b"index");
        b.extend(tree);
        let p = dir.join("ckpt.index");
        std::fs::write(&p, b).unwrap();
        p
    }

    /// A tree nested thousands of levels deep, or with a key of megabytes, is one error (it
    /// crashed `convert` once), found without recursing through it.
    #[test]
    fn deep_trees_and_huge_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for depth in [40, 1000, 100_000] {
            let mut tree = Vec::new();
            for _ in 0..depth {
                tree.extend([0x81, 0xa1, b'a']);
            }
            tree.push(0xc0);
            let e = read_index(&index_with_tree(dir.path(), &tree))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("ckpt.index") && e.contains("deeper than"),
                "{depth}: {e}"
            );
        }
        let mut tree = vec![0x81, 0xdb];
        tree.extend((1u32 << 20).to_be_bytes());
        tree.extend(vec![b'k'; 1 << 20]);
        tree.push(0xc0);
        let e = read_index(&index_with_tree(dir.path(), &tree))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1048576 characters long"), "{e}");
    }
}
