//! ONNX's protobuf messages, only the fields the importer reads (declared with prost's derive),
//! and the decoding of their tensors: float32/16, bfloat16 and float64 as f32, int32/64 as i64,
//! inside the file or in an external data file beside it (`location`, `offset`, `length`, each
//! checked against the file before anything is read).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use crate::model::ModelError;
use crate::tensor_io::F32Tensor;

/// The ONNX files the importer opens at most (the weights of a ViT-g are 4.4 GB in f32).
pub const MAX_ONNX_BYTES: u64 = 8 << 30;

/// The elements one tensor may hold (2^31: a 46k x 46k matrix).
const MAX_ELEMENTS: usize = 1 << 31;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, optional, tag = "1")]
    pub ir_version: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub producer_name: Option<String>,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorTypeProto {
    #[prost(int32, optional, tag = "1")]
    pub elem_type: Option<i32>,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<DimensionProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DimensionProto {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub op_type: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub s: Option<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    #[prost(int32, optional, tag = "14")]
    pub data_location: Option<i32>,
}

/// ONNX `TensorProto.DataType` values the importer reads.
pub const FLOAT: i32 = 1;
pub const INT32: i32 = 6;
pub const INT64: i32 = 7;
pub const FLOAT16: i32 = 10;
pub const DOUBLE: i32 = 11;
pub const BFLOAT16: i32 = 16;

fn err(m: impl Into<String>) -> ModelError {
    ModelError::Config(m.into())
}

/// Reads and decodes the ONNX file at `path` (size-checked first).
pub fn read_model(path: &Path) -> Result<ModelProto, ModelError> {
    let at = |m: String| err(format!("{}: {m}", path.display()));
    let bytes = crate::files::read_regular(path, MAX_ONNX_BYTES).map_err(|e| {
        at(if e.kind() == std::io::ErrorKind::InvalidData {
            format!("{e} (the limit for ONNX files)")
        } else {
            e.to_string()
        })
    })?;
    <ModelProto as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| at(format!("not an ONNX model (protobuf: {e})")))
}

/// The tensor's shape, checked: no negative dimension, at most [`MAX_ELEMENTS`] elements.
pub fn shape_of(t: &TensorProto, name: &str) -> Result<(Vec<usize>, usize), ModelError> {
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&v| usize::try_from(v))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            err(format!(
                "tensor `{name}` has a negative dimension in {:?}",
                t.dims
            ))
        })?;
    let len = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| err(format!("tensor `{name}` of shape {shape:?} is too large")))?;
    Ok((shape, len))
}

/// The bytes of a tensor stored outside the model file: `location` (a relative path inside the
/// model's folder), `offset` and `length`, checked against that file before reading.
fn external_bytes(
    t: &TensorProto,
    name: &str,
    dir: &Path,
    want: usize,
) -> Result<Vec<u8>, ModelError> {
    let entry = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key.as_deref() == Some(k))
            .and_then(|e| e.value.as_deref())
    };
    let location = entry("location").ok_or_else(|| {
        err(format!(
            "tensor `{name}` is external but names no `location`"
        ))
    })?;
    let rel = Path::new(location);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(err(format!(
            "tensor `{name}`: external data location `{location}` is not a plain path inside \
             the model's folder"
        )));
    }
    let number = |k: &str| -> Result<u64, ModelError> {
        entry(k).map_or(Ok(0), |v| {
            v.parse().map_err(|_| {
                err(format!(
                    "tensor `{name}`: external `{k}` is `{v}`, not a number"
                ))
            })
        })
    };
    let offset = number("offset")?;
    let length = match entry("length") {
        Some(_) => number("length")?,
        None => want as u64,
    };
    if length != want as u64 {
        return Err(err(format!(
            "tensor `{name}`: its external data is {length} bytes, its shape needs {want}"
        )));
    }
    let file = dir.join(rel);
    let mut f = crate::files::open_regular(&file).map_err(|e| {
        err(format!(
            "tensor `{name}` is stored in `{}`, which cannot be opened ({e}); keep the data file \
             beside the model",
            file.display()
        ))
    })?;
    let size = f
        .metadata()
        .map_err(|e| err(format!("{}: {e}", file.display())))?
        .len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(err(format!(
            "tensor `{name}`: bytes {offset}..{} of `{}` are past its end ({size} bytes): the \
             data file is truncated or belongs to another model",
            offset.saturating_add(length),
            file.display()
        )));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| err(format!("{}: {e}", file.display())))?;
    let mut buf = vec![0u8; want];
    f.read_exact(&mut buf)
        .map_err(|e| err(format!("{}: {e}", file.display())))?;
    Ok(buf)
}

/// The raw little-endian bytes of `t` (`width` bytes per element), inside or beside the file.
fn raw<'a>(
    t: &'a TensorProto,
    name: &str,
    dir: &Path,
    len: usize,
    width: usize,
) -> Result<Option<std::borrow::Cow<'a, [u8]>>, ModelError> {
    let want = len * width;
    if t.data_location == Some(1) {
        return external_bytes(t, name, dir, want).map(|b| Some(b.into()));
    }
    match &t.raw_data {
        Some(r) if r.len() == want => Ok(Some(r.as_slice().into())),
        Some(r) => Err(err(format!(
            "tensor `{name}` of shape {:?} holds {} bytes, expected {want}",
            t.dims,
            r.len()
        ))),
        None => Ok(None),
    }
}

/// `t` as f32 (float32, float16, bfloat16 or float64 data), every value finite.
pub fn decode_float(t: &TensorProto, name: &str, dir: &Path) -> Result<F32Tensor, ModelError> {
    let (shape, len) = shape_of(t, name)?;
    let dtype = t.data_type.unwrap_or(0);
    let count = |n: usize| -> Result<(), ModelError> {
        if n == len {
            Ok(())
        } else {
            Err(err(format!(
                "tensor `{name}` of shape {shape:?} holds {n} values, expected {len}"
            )))
        }
    };
    let data: Vec<f32> = match dtype {
        FLOAT => match raw(t, name, dir, len, 4)? {
            Some(b) => b
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            None => {
                count(t.float_data.len())?;
                t.float_data.clone()
            }
        },
        FLOAT16 | BFLOAT16 => {
            let widen = |bits: u16| match dtype {
                FLOAT16 => half::f16::from_bits(bits).to_f32(),
                _ => half::bf16::from_bits(bits).to_f32(),
            };
            match raw(t, name, dir, len, 2)? {
                Some(b) => b
                    .chunks_exact(2)
                    .map(|b| widen(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
                None => {
                    // Without raw data, 16-bit values sit in int32_data, one per entry.
                    count(t.int32_data.len())?;
                    t.int32_data.iter().map(|&v| widen(v as u16)).collect()
                }
            }
        }
        DOUBLE => match raw(t, name, dir, len, 8)? {
            Some(b) => b
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            None => {
                count(t.double_data.len())?;
                t.double_data.iter().map(|&v| v as f32).collect()
            }
        },
        other => {
            return Err(err(format!(
                "tensor `{name}` has ONNX data type {other}, not a float type (1, 10, 11, 16)"
            )));
        }
    };
    if let Some(at) = data.iter().position(|v| !v.is_finite()) {
        return Err(err(format!(
            "tensor `{name}` has a non-finite value ({}) at flat index {at}",
            data[at]
        )));
    }
    Ok(F32Tensor { shape, data })
}

/// `t` as integers (int64 or int32 data), for shapes, axes and indices; small tensors only.
pub fn decode_ints(t: &TensorProto, name: &str, dir: &Path) -> Result<Vec<i64>, ModelError> {
    let (_, len) = shape_of(t, name)?;
    if len > 1 << 16 {
        return Err(err(format!("integer tensor `{name}` has {len} values")));
    }
    match t.data_type.unwrap_or(0) {
        INT64 => match raw(t, name, dir, len, 8)? {
            Some(b) => Ok(b
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect()),
            None => Ok(t.int64_data.clone()),
        },
        INT32 => match raw(t, name, dir, len, 4)? {
            Some(b) => Ok(b
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect()),
            None => Ok(t.int32_data.iter().map(|&v| i64::from(v)).collect()),
        },
        other => Err(err(format!(
            "tensor `{name}` has ONNX data type {other}, not an integer type (6, 7)"
        ))),
    }
}

impl ValueInfoProto {
    /// The static dimensions, `None` for a symbolic one.
    pub fn dims(&self) -> Option<Vec<Option<usize>>> {
        let shape = self.r#type.as_ref()?.tensor_type.as_ref()?.shape.as_ref()?;
        Some(
            shape
                .dim
                .iter()
                .map(|d| {
                    d.dim_value
                        .and_then(|v| usize::try_from(v).ok())
                        .filter(|&v| v > 0)
                })
                .collect(),
        )
    }
}
