//! ViTs from ONNX, from any exporter: the weights are found by the graph's structure, not by
//! names. The residual stream is followed from the token sequence that enters the first
//! LayerNorm: each block is a LayerNorm (the op, or its ReduceMean/Sub/Pow/Sqrt/Div
//! decomposition), linears (MatMul with a constant weight, plus a constant bias, or Gemm) that
//! read it, a Softmax attention whose query, key and value are told apart by where they enter
//! its two MatMuls (or a fused QKV projection split in timm's q, k, v order), an output
//! projection (optionally scaled: LayerScale) added back to the stream, and an MLP whose
//! activation is GELU (one op, or its Erf or Tanh arithmetic). The token sequence is taken apart
//! into the patch Conv, the prefix tokens (CLS, distillation, registers) and the position
//! embedding, resized the way the graph's own `Resize` does. After the last block come the final
//! norm, the pooling (a token, or the mean of the patch tokens, with `fc_norm`) and the heads.
//! What the graph does not say (normalisation, image size of a dynamic graph) comes from the
//! options; a graph that does not have this shape is an error naming the node where it departs.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::WeightsOptions;
use super::onnx_proto::{self, AttributeProto, ModelProto, NodeProto, TensorProto};
use super::resample::{self, Resample};
use crate::model::{
    Classifier, Gelu, ModelConfig, ModelError, ModelWeights, Normalization, PrefixTokens,
    block_prefix, check_tensors,
};
use crate::tensor_io::F32Tensor;

/// The options of an ONNX import: heads where the graph's reshapes do not say them, the input
/// normalisation (ImageNet's by default: it happens outside the graph), the image size of a graph
/// that takes any.
pub type OnnxOptions = WeightsOptions;

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Ops that move or rescale a tensor without mixing tokens: followed when tracing a value from
/// the QKV projections to the attention's MatMuls.
const PASS: &[&str] = &[
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Cast",
    "Identity",
    "Slice",
    "Split",
    "Gather",
    "Mul",
    "Div",
    "Flatten",
    "Dropout",
];

fn err(m: impl Into<String>) -> ModelError {
    ModelError::Config(m.into())
}

/// Reads the ONNX file at `path` (external data beside it) and imports the ViT in it.
pub fn import_onnx(
    path: &Path,
    opts: &OnnxOptions,
) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let model = onnx_proto::read_model(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let at = |e| match e {
        ModelError::Config(m) => err(format!("{}: {m}", path.display())),
        other => other,
    };
    let (mut cfg, mut weights) = import_model(&model, dir, opts).map_err(at)?;
    if let Some(size) = opts.image_size {
        // A static graph at another size: PyTorch's bicubic, as `F.interpolate` resizes.
        super::resize_input(&mut cfg, &mut weights, size, Resample::Bicubic).map_err(at)?;
    }
    Ok((cfg, weights))
}

/// A LayerNorm found in the graph: the value it reads and the one it writes.
struct Norm {
    input: String,
    output: String,
    scale: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

/// A linear layer `y = x·W + b` with `W` as `[fan_in, fan_out]`.
struct Linear {
    input: String,
    output: String,
    w: Vec<f32>,
    fan_in: usize,
    fan_out: usize,
    b: Vec<f32>,
    at: String,
}

/// One pre-norm transformer block as found.
struct Block {
    norm1: Norm,
    qkv: [Linear; 3],
    out: Linear,
    ls1: Option<Vec<f32>>,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    ls2: Option<Vec<f32>>,
    gelu: Gelu,
    heads: Option<usize>,
    output: String,
}

/// One row of the token sequence entering the first block: a patch or a learned token (with
/// the id of the constant it came from), plus the position row added to it, if any.
struct Token {
    row: Row,
    pos: Option<Vec<f32>>,
}

#[derive(Clone)]
enum Row {
    Patch(usize),
    Param { group: usize, value: Vec<f32> },
}

/// The patch embedding Conv.
struct Patches {
    w: F32Tensor,
    b: Vec<f32>,
}

/// A residual `Add`: its output, the linear layer ending the branch, the branch's LayerScale.
type Residual = (String, Linear, Option<Vec<f32>>);

/// After the last block: the final norm, whether it acts after the pooling (`fc_norm`), the
/// heads with the tokens they read.
type Tail = (Norm, bool, Vec<(Pool, Linear)>);

/// How a head reads the final tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pool {
    Token(usize),
    Mean(usize, usize),
}

struct Graph<'a> {
    nodes: &'a [NodeProto],
    inits: HashMap<&'a str, &'a TensorProto>,
    producer: HashMap<&'a str, usize>,
    users: HashMap<&'a str, Vec<usize>>,
    shapes: HashMap<&'a str, Vec<Option<usize>>>,
    outputs: HashSet<&'a str>,
    /// Values computed from the image (the rest are constants or shape arithmetic).
    dynamic: HashSet<&'a str>,
    image: &'a str,
    dir: &'a Path,
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

fn attr_int(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).and_then(|a| a.i)
}

fn attr_text(n: &NodeProto, name: &str) -> String {
    attr(n, name)
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default()
}

impl<'a> Graph<'a> {
    fn new(model: &'a ModelProto, dir: &'a Path) -> Result<Self, ModelError> {
        let g = model
            .graph
            .as_ref()
            .ok_or_else(|| err("the model has no graph"))?;
        let inits: HashMap<&str, &TensorProto> = g
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
            .collect();
        let images: Vec<&str> = g
            .input
            .iter()
            .filter_map(|i| i.name.as_deref())
            .filter(|n| !inits.contains_key(n))
            .collect();
        let [image] = images[..] else {
            return Err(err(format!(
                "the graph takes {} inputs ({}); a ViT takes one image batch",
                images.len(),
                images.join(", ")
            )));
        };
        let mut producer = HashMap::new();
        let mut users: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut dynamic = HashSet::from([image]);
        for (i, n) in g.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                producer.insert(o.as_str(), i);
            }
            for v in n.input.iter().filter(|v| !v.is_empty()) {
                users.entry(v.as_str()).or_default().push(i);
            }
            // Nodes are in topological order (an ONNX rule), so one pass marks every value
            // computed from the image; `Shape` gives shape arithmetic, not image content.
            let op = n.op_type.as_deref().unwrap_or("");
            if op != "Shape" && n.input.iter().any(|v| dynamic.contains(v.as_str())) {
                dynamic.extend(n.output.iter().map(String::as_str));
            }
        }
        let shapes = g
            .value_info
            .iter()
            .chain(&g.input)
            .chain(&g.output)
            .filter_map(|v| Some((v.name.as_deref()?, v.dims()?)))
            .collect();
        Ok(Self {
            nodes: &g.node,
            inits,
            producer,
            users,
            shapes,
            outputs: g.output.iter().filter_map(|o| o.name.as_deref()).collect(),
            dynamic,
            image,
            dir,
        })
    }

    fn op(&self, i: usize) -> &'a str {
        self.nodes[i].op_type.as_deref().unwrap_or("")
    }

    /// `node `name` (Op)`, for messages.
    fn label(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let name = n
            .name
            .as_deref()
            .filter(|s| !s.is_empty())
            .or(n.output.first().map(String::as_str))
            .unwrap_or("?");
        format!("node `{name}` ({})", self.op(i))
    }

    fn is_alias(&self, i: usize) -> bool {
        matches!(self.op(i), "Identity" | "Dropout")
    }

    /// `v` with Identity and Dropout nodes looked through.
    fn source<'b>(&'b self, mut v: &'b str) -> &'b str {
        for _ in 0..self.nodes.len() + 1 {
            match self.producer.get(v) {
                Some(&i) if self.is_alias(i) => match self.nodes[i].input.first() {
                    Some(x) => v = x,
                    None => break,
                },
                _ => break,
            }
        }
        v
    }

    fn same(&self, a: &str, b: &str) -> bool {
        self.source(a) == self.source(b)
    }

    /// The node that computes `v` (Identity looked through).
    fn made_by(&self, v: &str) -> Option<usize> {
        self.producer.get(self.source(v)).copied()
    }

    /// The nodes that read `v`, through Identity nodes.
    fn uses(&self, v: &str) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack = vec![v.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) {
                continue;
            }
            for &i in self.users.get(v.as_str()).into_iter().flatten() {
                if self.is_alias(i) {
                    stack.extend(self.nodes[i].output.first().cloned());
                } else if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out.sort_unstable();
        out
    }

    fn is_dynamic(&self, v: &str) -> bool {
        self.dynamic.contains(v)
    }

    /// The constant tensor `v` is, when it is an initializer or a `Constant` node's value.
    fn proto(&self, v: &str) -> Option<std::borrow::Cow<'a, TensorProto>> {
        let v = self.source(v);
        if let Some(t) = self.inits.get(v) {
            return Some(std::borrow::Cow::Borrowed(*t));
        }
        let i = *self.producer.get(v)?;
        let n = &self.nodes[i];
        if self.op(i) != "Constant" {
            return None;
        }
        if let Some(t) = attr(n, "value").and_then(|a| a.t.as_ref()) {
            return Some(std::borrow::Cow::Borrowed(t));
        }
        let float = |data: Vec<f32>, dims: Vec<i64>| TensorProto {
            dims,
            data_type: Some(onnx_proto::FLOAT),
            float_data: data,
            ..Default::default()
        };
        let int = |data: Vec<i64>, dims: Vec<i64>| TensorProto {
            dims,
            data_type: Some(onnx_proto::INT64),
            int64_data: data,
            ..Default::default()
        };
        let a = |k: &str| attr(n, k);
        let t = if let Some(f) = a("value_float").and_then(|a| a.f) {
            float(vec![f], vec![])
        } else if let Some(a) = a("value_floats") {
            float(a.floats.clone(), vec![a.floats.len() as i64])
        } else if let Some(i) = a("value_int").and_then(|a| a.i) {
            int(vec![i], vec![])
        } else if let Some(a) = a("value_ints") {
            int(a.ints.clone(), vec![a.ints.len() as i64])
        } else {
            return None;
        };
        Some(std::borrow::Cow::Owned(t))
    }

    /// `v` as a float constant: an initializer, a `Constant`, or one seen through `Cast`,
    /// `Transpose`, `Reshape`, `Squeeze`, `Unsqueeze` or `Flatten` of one.
    fn floats(&self, v: &str) -> Result<Option<F32Tensor>, ModelError> {
        if self.is_dynamic(self.source(v)) {
            return Ok(None);
        }
        if let Some(t) = self.proto(v) {
            let float = [
                onnx_proto::FLOAT,
                onnx_proto::FLOAT16,
                onnx_proto::BFLOAT16,
                onnx_proto::DOUBLE,
            ];
            if !float.contains(&t.data_type.unwrap_or(0)) {
                return Ok(None);
            }
            return onnx_proto::decode_float(&t, self.source(v), self.dir).map(Some);
        }
        let Some(i) = self.made_by(v) else {
            return Ok(None);
        };
        let n = &self.nodes[i];
        let Some(x) = n.input.first() else {
            return Ok(None);
        };
        match self.op(i) {
            "Cast" => self.floats(x),
            "Transpose" => {
                let Some(t) = self.floats(x)? else {
                    return Ok(None);
                };
                let perm: Vec<usize> = match attr(n, "perm") {
                    Some(a) => a.ints.iter().map(|&p| p as usize).collect(),
                    None => (0..t.shape.len()).rev().collect(),
                };
                Ok(transpose(&t, &perm))
            }
            "Reshape" | "Squeeze" | "Unsqueeze" | "Flatten" => {
                // The data keeps its order; only the meaning of the shape changes, and every
                // use below reads the values with a width it knows.
                let Some(t) = self.floats(x)? else {
                    return Ok(None);
                };
                let len = t.data.len();
                Ok(Some(F32Tensor {
                    shape: vec![len],
                    data: t.data,
                }))
            }
            _ => Ok(None),
        }
    }

    /// `v` as an integer constant (shapes, axes, indices), also a `Concat` of such.
    fn ints(&self, v: &str) -> Option<Vec<i64>> {
        if let Some(t) = self.proto(v) {
            return onnx_proto::decode_ints(&t, v, self.dir).ok();
        }
        let i = self.made_by(v)?;
        match self.op(i) {
            "Concat" => {
                let mut out = Vec::new();
                for x in &self.nodes[i].input {
                    out.extend(self.ints(x)?);
                }
                Some(out)
            }
            "Unsqueeze" | "Squeeze" | "Cast" | "Reshape" => self.ints(&self.nodes[i].input[0]),
            _ => None,
        }
    }

    /// A shape operand as far as it is constant: `None` entries are computed at run time.
    fn partial_shape(&self, v: &str) -> Option<Vec<Option<i64>>> {
        if let Some(s) = self.ints(v) {
            return Some(s.into_iter().map(Some).collect());
        }
        let i = self.made_by(v)?;
        if self.op(i) != "Concat" {
            return None;
        }
        let mut out = Vec::new();
        for x in &self.nodes[i].input {
            match self.ints(x) {
                Some(s) => out.extend(s.into_iter().map(Some)),
                None => out.push(None),
            }
        }
        Some(out)
    }

    /// A constant vector of `d` values (`[d]`, `[1, 1, d]`, ...).
    fn vector(&self, v: &str, d: usize) -> Result<Option<Vec<f32>>, ModelError> {
        Ok(self
            .floats(v)?
            .filter(|t| t.data.len() == d)
            .map(|t| t.data))
    }

    /// The LayerNorm that reads `x`, if one does.
    fn norm_reading(&self, x: &str) -> Result<Option<Norm>, ModelError> {
        for i in self.uses(x) {
            let n = &self.nodes[i];
            if !n.input.first().is_some_and(|v| self.same(v, x)) {
                continue;
            }
            match self.op(i) {
                "LayerNormalization" => {
                    let axis = attr_int(n, "axis").unwrap_or(-1);
                    if axis != -1 && axis != 2 {
                        return Err(err(format!(
                            "{} normalises over axis {axis}, not the features",
                            self.label(i)
                        )));
                    }
                    let scale = match n.input.get(1) {
                        Some(s) => self.floats(s)?,
                        None => None,
                    }
                    .ok_or_else(|| err(format!("{} has no constant scale", self.label(i))))?;
                    let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                        Some(b) => self.vector(b, scale.data.len())?.ok_or_else(|| {
                            err(format!("{} has no constant bias", self.label(i)))
                        })?,
                        None => vec![0.0; scale.data.len()],
                    };
                    let eps = attr(n, "epsilon").and_then(|a| a.f).unwrap_or(1e-5);
                    return Ok(Some(Norm {
                        input: x.to_string(),
                        output: n.output[0].clone(),
                        scale: scale.data,
                        bias,
                        eps,
                    }));
                }
                "ReduceMean" => {
                    if let Some(norm) = self.decomposed_norm(x, i)? {
                        return Ok(Some(norm));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// `(x - mean(x)) / sqrt(mean((x - mean)^2) + eps) * scale + bias`, from its first
    /// `ReduceMean` (node `mean`).
    fn decomposed_norm(&self, x: &str, mean: usize) -> Result<Option<Norm>, ModelError> {
        let m = &self.nodes[mean].output[0];
        let Some(sub) = self.uses(m).into_iter().find(|&j| {
            self.op(j) == "Sub"
                && self.nodes[j].input.len() == 2
                && self.same(&self.nodes[j].input[0], x)
                && self.same(&self.nodes[j].input[1], m)
        }) else {
            return Ok(None);
        };
        let centred = &self.nodes[sub].output[0];
        let Some(div) = self
            .uses(centred)
            .into_iter()
            .find(|&j| self.op(j) == "Div" && self.same(&self.nodes[j].input[0], centred))
        else {
            return Ok(None);
        };
        let Some(sqrt) = self.made_by(&self.nodes[div].input[1]) else {
            return Ok(None);
        };
        let Some(add) = (self.op(sqrt) == "Sqrt")
            .then(|| self.made_by(&self.nodes[sqrt].input[0]))
            .flatten()
            .filter(|&a| self.op(a) == "Add")
        else {
            return Ok(None);
        };
        let mut eps = None;
        for v in &self.nodes[add].input {
            if let Some(t) = self.floats(v)?.filter(|t| t.data.len() == 1) {
                eps = Some(t.data[0]);
            }
        }
        let Some(eps) = eps else { return Ok(None) };
        let normed = &self.nodes[div].output[0];
        let affine = |v: &str, op: &str| -> Result<Option<(Vec<f32>, String)>, ModelError> {
            for j in self.uses(v) {
                let n = &self.nodes[j];
                if self.op(j) != op || n.input.len() != 2 {
                    continue;
                }
                let other = if self.same(&n.input[0], v) {
                    &n.input[1]
                } else {
                    &n.input[0]
                };
                if let Some(t) = self.floats(other)? {
                    return Ok(Some((t.data, n.output[0].clone())));
                }
            }
            Ok(None)
        };
        let Some((scale, scaled)) = affine(normed, "Mul")? else {
            return Ok(None);
        };
        let Some((bias, output)) = affine(&scaled, "Add")? else {
            return Ok(None);
        };
        if bias.len() != scale.len() {
            return Ok(None);
        }
        Ok(Some(Norm {
            input: x.to_string(),
            output,
            scale,
            bias,
            eps,
        }))
    }

    /// The linear layer node `i` starts when it reads `x` (MatMul by a constant, with the
    /// constant bias added after it, or Gemm).
    fn linear_at(&self, i: usize, x: &str) -> Result<Option<Linear>, ModelError> {
        let n = &self.nodes[i];
        if n.input.len() < 2 || !self.same(&n.input[0], x) {
            return Ok(None);
        }
        match self.op(i) {
            "MatMul" => {
                let Some(w) = self.floats(&n.input[1])? else {
                    return Ok(None);
                };
                let [fan_in, fan_out] = w.shape[..] else {
                    return Ok(None);
                };
                let mut output = n.output[0].clone();
                let mut b = vec![0.0; fan_out];
                let uses = self.uses(&output);
                if let [add] = uses[..]
                    && self.op(add) == "Add"
                    && self.nodes[add].input.len() == 2
                {
                    let a = &self.nodes[add];
                    let other = if self.same(&a.input[0], &output) {
                        &a.input[1]
                    } else {
                        &a.input[0]
                    };
                    if let Some(bias) = self.vector(other, fan_out)? {
                        b = bias;
                        output = a.output[0].clone();
                    }
                }
                Ok(Some(Linear {
                    input: x.to_string(),
                    output,
                    w: w.data,
                    fan_in,
                    fan_out,
                    b,
                    at: self.label(i),
                }))
            }
            "Gemm" => {
                let Some(w) = self.floats(&n.input[1])? else {
                    return Ok(None);
                };
                let [r, c] = w.shape[..] else { return Ok(None) };
                let one = |k: &str| attr(n, k).and_then(|a| a.f).unwrap_or(1.0);
                if attr_int(n, "transA").unwrap_or(0) != 0 || one("alpha") != 1.0 {
                    return Err(err(format!(
                        "{}: a Gemm with transA or alpha other than 1 is not supported",
                        self.label(i)
                    )));
                }
                let (w, fan_in, fan_out) = match attr_int(n, "transB").unwrap_or(0) {
                    0 => (w.data, r, c),
                    _ => (transpose2(&w.data, r, c), c, r),
                };
                let b = match n.input.get(2).filter(|v| !v.is_empty()) {
                    Some(v) => {
                        let b = self.vector(v, fan_out)?.ok_or_else(|| {
                            err(format!(
                                "{} has no constant [{fan_out}] bias",
                                self.label(i)
                            ))
                        })?;
                        let beta = one("beta");
                        b.into_iter().map(|v| v * beta).collect()
                    }
                    None => vec![0.0; fan_out],
                };
                Ok(Some(Linear {
                    input: x.to_string(),
                    output: n.output[0].clone(),
                    w,
                    fan_in,
                    fan_out,
                    b,
                    at: self.label(i),
                }))
            }
            _ => Ok(None),
        }
    }

    fn linears_reading(&self, x: &str) -> Result<Vec<Linear>, ModelError> {
        let mut out = Vec::new();
        for i in self.uses(x) {
            out.extend(self.linear_at(i, x)?);
        }
        Ok(out)
    }

    /// The linear layer whose output is `v`.
    fn linear_making(&self, v: &str) -> Result<Option<Linear>, ModelError> {
        let Some(i) = self.made_by(v) else {
            return Ok(None);
        };
        let n = &self.nodes[i];
        let start = match self.op(i) {
            "Gemm" | "MatMul" => Some(i),
            "Add" if n.input.len() == 2 => n
                .input
                .iter()
                .filter_map(|x| self.made_by(x))
                .find(|&j| self.op(j) == "MatMul"),
            _ => None,
        };
        let Some(start) = start else { return Ok(None) };
        let x = self.nodes[start].input[0].clone();
        Ok(self
            .linear_at(start, &x)?
            .filter(|l| self.same(&l.output, v)))
    }

    /// `v` = `other · gamma` with a constant `[d]` gamma (LayerScale), else `v` itself.
    fn layer_scale(&self, v: &str, d: usize) -> Result<(Option<Vec<f32>>, String), ModelError> {
        if let Some(i) = self.made_by(v)
            && self.op(i) == "Mul"
            && self.nodes[i].input.len() == 2
        {
            let n = &self.nodes[i];
            for (a, b) in [(0, 1), (1, 0)] {
                if let Some(g) = self.vector(&n.input[a], d)? {
                    return Ok((Some(g), n.input[b].clone()));
                }
            }
        }
        Ok((None, v.to_string()))
    }

    /// The residual `Add(s, branch)` where the branch ends in a linear layer (and LayerScale).
    fn residual(&self, s: &str, d: usize) -> Result<Option<Residual>, ModelError> {
        for i in self.uses(s) {
            let n = &self.nodes[i];
            if self.op(i) != "Add" || n.input.len() != 2 {
                continue;
            }
            let other = if self.same(&n.input[0], s) {
                &n.input[1]
            } else {
                &n.input[0]
            };
            if !self.is_dynamic(self.source(other)) {
                continue;
            }
            let (ls, inner) = self.layer_scale(other, d)?;
            if let Some(l) = self.linear_making(&inner)? {
                return Ok(Some((n.output[0].clone(), l, ls)));
            }
        }
        Ok(None)
    }

    /// Follows `v` forward through [`PASS`] ops to the MatMul it enters: (node, input slot).
    fn enters_matmul(&self, v: &str) -> Option<(usize, usize)> {
        let mut stack = vec![v.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) || seen.len() > 256 {
                continue;
            }
            for i in self.uses(&v) {
                let n = &self.nodes[i];
                if self.op(i) == "MatMul" {
                    let slot = n.input.iter().position(|x| self.same(x, &v))?;
                    return Some((i, slot));
                }
                if PASS.contains(&self.op(i)) {
                    // Only through the data input (a scale or shape operand is not data).
                    if n.input.iter().position(|x| self.same(x, &v)) == Some(0)
                        || matches!(self.op(i), "Mul" | "Div")
                    {
                        stack.extend(n.output.iter().cloned());
                    }
                }
            }
        }
        None
    }

    /// Whether `v` comes from a Softmax through [`PASS`] ops (attention weights).
    fn after_softmax(&self, v: &str) -> bool {
        let mut stack = vec![v.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) || seen.len() > 256 {
                continue;
            }
            let Some(i) = self.made_by(&v) else { continue };
            if self.op(i) == "Softmax" {
                return true;
            }
            if PASS.contains(&self.op(i)) || self.op(i) == "Where" {
                stack.extend(
                    self.nodes[i]
                        .input
                        .iter()
                        .filter(|x| self.is_dynamic(self.source(x)))
                        .cloned(),
                );
            }
        }
        false
    }

    /// The head count the first `Reshape` after a query (or fused QKV) projection reads:
    /// its shape ends `[heads, head_dim]` (either may be -1 or computed).
    fn heads_after(&self, v: &str, d: usize) -> Option<usize> {
        let mut stack = vec![v.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) || seen.len() > 64 {
                continue;
            }
            for i in self.uses(&v) {
                let n = &self.nodes[i];
                if self.op(i) == "Reshape" {
                    let shape = self.partial_shape(n.input.get(1)?)?;
                    let [.., a, b] = shape[..] else { return None };
                    let pos = |x: Option<i64>| x.filter(|&x| x > 0).map(|x| x as usize);
                    return match (pos(a), pos(b)) {
                        (Some(h), Some(hd)) if h * hd == d => Some(h),
                        (None, Some(hd)) if d.is_multiple_of(hd) => Some(d / hd),
                        (Some(h), None) if d.is_multiple_of(h) => Some(h),
                        _ => None,
                    };
                }
                if matches!(self.op(i), "Mul" | "Div" | "Cast" | "Transpose") {
                    stack.extend(n.output.iter().cloned());
                }
            }
        }
        None
    }

    /// The activation between an MLP's two linears: GELU as one op or its arithmetic.
    fn activation(&self, from: &str, to: &str, block: usize) -> Result<Gelu, ModelError> {
        let mut stack = vec![to.to_string()];
        let mut seen = HashSet::new();
        let mut found = None;
        while let Some(v) = stack.pop() {
            let v = self.source(&v).to_string();
            if self.same(&v, from) || !self.is_dynamic(&v) || !seen.insert(v.clone()) {
                continue;
            }
            let Some(i) = self.producer.get(v.as_str()).copied() else {
                continue;
            };
            if seen.len() > 64 {
                break;
            }
            let n = &self.nodes[i];
            match self.op(i) {
                "Erf" => found = Some(Gelu::Erf),
                "Tanh" => found = Some(Gelu::Tanh),
                "Gelu" => {
                    found = Some(match attr_text(n, "approximate").as_str() {
                        "tanh" => Gelu::Tanh,
                        _ => Gelu::Erf,
                    })
                }
                "Mul" | "Add" | "Div" | "Pow" | "Sqrt" | "Cast" | "Constant" => {}
                _ => {
                    return Err(err(format!(
                        "block {block}: the MLP activation has {}, which is not GELU (a Gelu op, \
                         or its Erf or Tanh arithmetic): unsupported",
                        self.label(i)
                    )));
                }
            }
            stack.extend(n.input.iter().cloned());
        }
        found.ok_or_else(|| {
            err(format!(
                "block {block}: no GELU (Gelu, Erf or Tanh) between the MLP's two linears"
            ))
        })
    }
}

/// A row-major `[r, c]` matrix transposed to `[c, r]`.
fn transpose2(w: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = w[i * c + j];
        }
    }
    out
}

/// An N-d transpose by `perm`, `None` when the permutation does not fit the shape.
fn transpose(t: &F32Tensor, perm: &[usize]) -> Option<F32Tensor> {
    let rank = t.shape.len();
    let mut sorted = perm.to_vec();
    sorted.sort_unstable();
    if perm.len() != rank || sorted != (0..rank).collect::<Vec<_>>() {
        return None;
    }
    let shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
    let mut strides = vec![1usize; rank];
    for k in (0..rank.saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * t.shape[k + 1];
    }
    let mut data = Vec::with_capacity(t.data.len());
    let mut idx = vec![0usize; rank];
    for _ in 0..t.data.len() {
        let src: usize = (0..rank).map(|k| idx[k] * strides[perm[k]]).sum();
        data.push(t.data[src]);
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Some(F32Tensor { shape, data })
}

/// Imports the ViT of `model`, whose external data files lie in `dir` (see the module docs).
pub fn import_model(
    model: &ModelProto,
    dir: &Path,
    opts: &OnnxOptions,
) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let g = Graph::new(model, dir)?;
    let census = || {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for i in 0..g.nodes.len() {
            match counts.iter_mut().find(|c| c.0 == g.op(i)) {
                Some(c) => c.1 += 1,
                None => counts.push((g.op(i), 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
            .iter()
            .take(8)
            .map(|(o, n)| format!("{o}×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The stream enters the first LayerNorm computed from the image.
    let mut first = None;
    for (i, n) in g.nodes.iter().enumerate() {
        let Some(x) = n.input.first().filter(|x| g.is_dynamic(g.source(x))) else {
            continue;
        };
        if matches!(g.op(i), "LayerNormalization" | "ReduceMean")
            && let Some(norm) = g.norm_reading(x)?
        {
            first = Some(norm.input);
            break;
        }
    }
    let s0 = first.ok_or_else(|| {
        err(format!(
            "no LayerNorm in the graph: not a ViT (its ops: {})",
            census()
        ))
    })?;

    // The token sequence: patches, prefix tokens and positions.
    let mut patches = None;
    let mut groups = 0;
    let grid = image_grid(&g, opts)?;
    let tokens = embed(&g, &s0, &mut patches, &mut groups, grid)?;
    let Some((patch, ph, pw, c)) = patches else {
        return Err(err(format!(
            "the tokens entering the first block (`{s0}`) hold no patch-embedding Conv"
        )));
    };
    let d = patch.b.len();
    let n_patches = grid[0] * grid[1];
    let np = tokens.len().checked_sub(n_patches).ok_or_else(|| {
        err(format!(
            "{} tokens enter the first block, fewer than the {n_patches} patches",
            tokens.len()
        ))
    })?;
    for (k, t) in tokens.iter().enumerate() {
        let ok = match t.row {
            Row::Patch(p) => k >= np && p == k - np,
            Row::Param { .. } => k < np,
        };
        if !ok {
            return Err(err(format!(
                "the token sequence is not prefix tokens followed by the {n_patches} patches in \
                 order (row {k})"
            )));
        }
    }
    let patch_pos: Vec<bool> = tokens[np..].iter().map(|t| t.pos.is_some()).collect();
    if patch_pos.iter().any(|&p| p) && !patch_pos.iter().all(|&p| p) {
        return Err(err("some patches get a position embedding and others none"));
    }

    // The blocks.
    let mut blocks: Vec<Block> = Vec::new();
    let mut s = s0.clone();
    while let Some(b) = block(&g, &s, d, blocks.len())? {
        s = b.output.clone();
        blocks.push(b);
    }
    if blocks.is_empty() {
        return Err(err(format!(
            "no transformer block reads the tokens `{s0}` (a LayerNorm, attention and a residual \
             Add): not a ViT (its ops: {})",
            census()
        )));
    }

    // The final norm, the pooling and the heads.
    let total = tokens.len();
    let (norm, fc_norm, heads) = tail(&g, &s, d, np, total)?;
    let pool = match heads.first().map(|h| h.0) {
        Some(Pool::Mean(..)) => Classifier::Gap,
        _ => Classifier::Token,
    };
    let first_group = |k: usize| match &tokens[k].row {
        Row::Param { group, .. } => Some(*group),
        Row::Patch(_) => None,
    };
    let group_len = |k: usize| {
        (k..np)
            .take_while(|&j| first_group(j) == first_group(k))
            .count()
    };
    let cls = np > 0 && group_len(0) == 1;
    let distillation = heads.iter().any(|h| h.0 == Pool::Token(1));
    if distillation && !(cls && np >= 2 && group_len(1) == 1) {
        return Err(err(
            "a head reads token 1, which is not a single distillation token after the CLS token",
        ));
    }
    if pool == Classifier::Token && !heads.is_empty() && !cls {
        return Err(err("a head reads token 0, which is not a CLS token"));
    }
    let prefix = PrefixTokens {
        cls,
        distillation,
        registers: np - usize::from(cls) - usize::from(distillation),
    };

    // What the graph says must agree with the options.
    let gelu = blocks[0].gelu;
    let eps = blocks[0].norm1.eps;
    let mut graph_heads = None;
    let mut mlp_dim = 0;
    for (i, b) in blocks.iter().enumerate() {
        if b.gelu != gelu {
            return Err(err(format!("block {i} uses another GELU than block 0")));
        }
        for n in [&b.norm1, &b.norm2] {
            if (n.eps - eps).abs() > eps * 1e-3 {
                return Err(err(format!(
                    "block {i} has a LayerNorm eps {} while block 0 has {eps}",
                    n.eps
                )));
            }
        }
        if let Some(h) = b.heads {
            if graph_heads.is_some_and(|g| g != h) {
                return Err(err(format!(
                    "block {i} splits into {h} heads, block 0 into others"
                )));
            }
            graph_heads = Some(h);
        }
        if b.ls1.is_some() != blocks[0].ls1.is_some() || b.ls2.is_some() != b.ls1.is_some() {
            return Err(err(format!(
                "block {i} has LayerScale where block 0 has not, or the reverse"
            )));
        }
        if mlp_dim != 0 && b.fc1.fan_out != mlp_dim {
            return Err(err(format!(
                "block {i}'s MLP is {} wide, block 0's {mlp_dim}",
                b.fc1.fan_out
            )));
        }
        mlp_dim = b.fc1.fan_out;
    }
    let heads_n = match (graph_heads, opts.heads) {
        (Some(g), Some(o)) if g != o => {
            return Err(err(format!(
                "the graph splits attention into {g} heads; --heads {o} disagrees"
            )));
        }
        (Some(h), _) | (None, Some(h)) => h,
        (None, None) => {
            return Err(err(
                "the graph's reshapes do not say how many attention heads there are: give --heads",
            ));
        }
    };
    if heads_n == 0 || d % heads_n != 0 {
        return Err(err(format!("{heads_n} heads do not divide the width {d}")));
    }
    if let Some(o) = opts.gelu.filter(|&o| o != gelu) {
        return Err(err(format!(
            "the graph's GELU is {gelu:?}; --gelu {o:?} disagrees"
        )));
    }
    let final_eps = norm.eps;
    if (final_eps - eps).abs() > eps * 1e-3 {
        return Err(err(format!(
            "the final LayerNorm has eps {final_eps}, the blocks' {eps}"
        )));
    }
    if let Some(o) = opts.eps.filter(|&o| (o - eps).abs() > eps * 1e-3) {
        return Err(err(format!(
            "the graph's LayerNorm eps is {eps}; --eps {o} disagrees"
        )));
    }
    if let Some(o) = opts.pool.filter(|&o| !heads.is_empty() && o != pool) {
        return Err(err(format!(
            "the graph pools with {pool:?}; --pool {o:?} disagrees"
        )));
    }
    let pool = match heads.is_empty() {
        true => opts.pool.unwrap_or(pool),
        false => pool,
    };

    // The checkpoint.
    let mut w = ModelWeights::new();
    let mut put = |n: String, shape: Vec<usize>, data: Vec<f32>| {
        w.insert(n, F32Tensor { shape, data });
    };
    put(
        "embedding/kernel".into(),
        vec![ph, pw, c, d],
        super::timm::patch_kernel(&patch.w.data, [d, c, ph, pw]),
    );
    put("embedding/bias".into(), vec![d], patch.b);
    let value = |k: usize| match &tokens[k].row {
        Row::Param { value, .. } => value.clone(),
        Row::Patch(_) => Vec::new(),
    };
    let mut k = 0;
    if cls {
        put("cls".into(), vec![1, 1, d], value(0));
        k += 1;
    }
    if distillation {
        put("dist".into(), vec![1, 1, d], value(1));
        k += 1;
    }
    if prefix.registers > 0 {
        let regs: Vec<f32> = (k..np).flat_map(value).collect();
        put("registers".into(), vec![1, prefix.registers, d], regs);
    }
    let pos: Vec<f32> = tokens
        .iter()
        .flat_map(|t| t.pos.clone().unwrap_or_else(|| vec![0.0; d]))
        .collect();
    put(
        "Encoder/posembed_input/pos_embedding".into(),
        vec![1, total, d],
        pos,
    );
    let hd = d / heads_n;
    let layer_scale = blocks[0].ls1.is_some();
    for (i, b) in blocks.into_iter().enumerate() {
        let dst = block_prefix(i);
        put(format!("{dst}/LayerNorm_0/scale"), vec![d], b.norm1.scale);
        put(format!("{dst}/LayerNorm_0/bias"), vec![d], b.norm1.bias);
        put(format!("{dst}/LayerNorm_1/scale"), vec![d], b.norm2.scale);
        put(format!("{dst}/LayerNorm_1/bias"), vec![d], b.norm2.bias);
        if let (Some(l1), Some(l2)) = (b.ls1, b.ls2) {
            put(format!("{dst}/LayerScale_0/scale"), vec![d], l1);
            put(format!("{dst}/LayerScale_1/scale"), vec![d], l2);
        }
        for (part, l) in ["query", "key", "value"].into_iter().zip(b.qkv) {
            put(
                format!("{dst}/SelfAttention/{part}/kernel"),
                vec![d, heads_n, hd],
                l.w,
            );
            put(
                format!("{dst}/SelfAttention/{part}/bias"),
                vec![heads_n, hd],
                l.b,
            );
        }
        put(
            format!("{dst}/SelfAttention/out/kernel"),
            vec![heads_n, hd, d],
            b.out.w,
        );
        put(format!("{dst}/SelfAttention/out/bias"), vec![d], b.out.b);
        put(
            format!("{dst}/Mlp/Dense_0/kernel"),
            vec![d, mlp_dim],
            b.fc1.w,
        );
        put(format!("{dst}/Mlp/Dense_0/bias"), vec![mlp_dim], b.fc1.b);
        put(
            format!("{dst}/Mlp/Dense_1/kernel"),
            vec![mlp_dim, d],
            b.fc2.w,
        );
        put(format!("{dst}/Mlp/Dense_1/bias"), vec![d], b.fc2.b);
    }
    put("Encoder/encoder_norm/scale".into(), vec![d], norm.scale);
    put("Encoder/encoder_norm/bias".into(), vec![d], norm.bias);
    let mut classes = 0;
    for (p, l) in heads {
        let name = match p {
            Pool::Token(1) => "head_dist",
            _ => "head",
        };
        if classes != 0 && l.fan_out != classes {
            return Err(err(format!(
                "the two heads give {} and {classes} classes",
                l.fan_out
            )));
        }
        classes = l.fan_out;
        put(format!("{name}/kernel"), vec![d, classes], l.w);
        put(format!("{name}/bias"), vec![classes], l.b);
    }
    let layers = w
        .keys()
        .filter(|k| k.ends_with("/LayerNorm_0/scale"))
        .count();
    let cfg = ModelConfig {
        name: opts.name.clone(),
        image_size: [grid[0] * ph, grid[1] * pw],
        channels: c,
        patch_size: [ph, pw],
        hidden_size: d,
        num_layers: layers,
        num_heads: heads_n,
        mlp_dim,
        classifier: pool,
        representation_size: None,
        num_classes: classes,
        class_names: super::unnamed_classes(classes),
        normalization: Normalization {
            mean: opts.mean.clone().unwrap_or_else(|| IMAGENET_MEAN.to_vec()),
            std: opts.std.clone().unwrap_or_else(|| IMAGENET_STD.to_vec()),
        },
        gelu,
        layer_scale,
        layer_norm_eps: eps,
        cls_token: (prefix.cls != (pool == Classifier::Token)).then_some(prefix.cls),
        distillation_token: prefix.distillation,
        register_tokens: prefix.registers,
        fc_norm,
        moe: None,
    };
    cfg.validate()?;
    let weights = check_tensors(&cfg, w, "the imported model")?;
    Ok((cfg, weights))
}

/// The patch grid: from the graph's static input shape, else `--image-size`.
fn image_grid(g: &Graph<'_>, opts: &OnnxOptions) -> Result<[usize; 2], ModelError> {
    let conv = g
        .uses(g.image)
        .into_iter()
        .flat_map(|i| match g.op(i) {
            "Cast" => g.uses(&g.nodes[i].output[0]),
            _ => vec![i],
        })
        .find(|&i| g.op(i) == "Conv")
        .ok_or_else(|| {
            err(format!(
                "no Conv reads the image input `{}`: not a ViT's patch embedding",
                g.image
            ))
        })?;
    let kernel = attr(&g.nodes[conv], "kernel_shape")
        .map(|a| a.ints.clone())
        .unwrap_or_default();
    let [kh, kw] = kernel[..] else {
        return Err(err(format!(
            "{} has kernel {kernel:?}, not a 2-d patch",
            g.label(conv)
        )));
    };
    let size = match g.shapes.get(g.image).map(|s| s[..].to_vec()) {
        Some(s) if s.len() == 4 && s[2].is_some() && s[3].is_some() => {
            [s[2].unwrap_or(0), s[3].unwrap_or(0)]
        }
        _ => opts
            .image_size
            .ok_or_else(|| err("the graph takes images of any size: give --image-size"))?,
    };
    let (kh, kw) = (kh.max(1) as usize, kw.max(1) as usize);
    if size[0] % kh != 0 || size[1] % kw != 0 || size[0] == 0 || size[1] == 0 {
        return Err(err(format!(
            "the image size {}x{} is not a multiple of the {kh}x{kw} patches",
            size[0], size[1]
        )));
    }
    Ok([size[0] / kh, size[1] / kw])
}

/// The token rows of `v`, the sequence entering the first block, built from the patch Conv,
/// learned tokens, `Concat`s, `Slice`s over tokens and added positions.
fn embed(
    g: &Graph<'_>,
    v: &str,
    patches: &mut Option<(Patches, usize, usize, usize)>,
    groups: &mut usize,
    grid: [usize; 2],
) -> Result<Vec<Token>, ModelError> {
    let mut v = g.source(v);
    // A learned token broadcast over the batch (a batch of one image: the same values).
    while let Some(i) = g
        .made_by(v)
        .filter(|&i| matches!(g.op(i), "Expand" | "Tile"))
    {
        v = g.source(&g.nodes[i].input[0]);
    }
    if !g.is_dynamic(v) {
        let t = g.floats(v)?.ok_or_else(|| {
            err(format!(
                "the token sequence holds `{v}`, which is not a float constant"
            ))
        })?;
        return Ok(params(t, groups));
    }
    let Some(i) = g.made_by(v) else {
        return Err(err(format!("the token sequence is the graph input `{v}`")));
    };
    let n = &g.nodes[i];
    let unexpected = || {
        err(format!(
            "the tokens entering the first block come from {}, which is not a patch embedding, a \
             learned token, a Concat of them or an added position embedding",
            g.label(i)
        ))
    };
    match g.op(i) {
        "Concat" => {
            let axis = attr_int(n, "axis").unwrap_or(0);
            if axis != 1 && axis != -2 {
                return Err(unexpected());
            }
            let mut out = Vec::new();
            for x in &n.input {
                out.extend(embed(g, x, patches, groups, grid)?);
            }
            Ok(out)
        }
        "Add" if n.input.len() == 2 => {
            let (t, p) = match (
                g.is_dynamic(g.source(&n.input[0])),
                g.is_dynamic(g.source(&n.input[1])),
            ) {
                (true, false) => (&n.input[0], &n.input[1]),
                (false, true) => (&n.input[1], &n.input[0]),
                _ => return Err(unexpected()),
            };
            let mut rows = embed(g, t, patches, groups, grid)?;
            let d = match (patches.as_ref(), rows.first().map(|r| &r.row)) {
                (Some(p), _) => p.0.b.len(),
                (None, Some(Row::Param { value, .. })) => value.len(),
                _ => return Err(unexpected()),
            };
            let only_patches = rows.iter().all(|r| matches!(r.row, Row::Patch(_)));
            let pos = position(g, p, rows.len(), d, grid, only_patches)?;
            for (r, p) in rows.iter_mut().zip(pos.chunks_exact(d.max(1))) {
                match &mut r.pos {
                    Some(old) => old.iter_mut().zip(p).for_each(|(a, b)| *a += b),
                    None => r.pos = Some(p.to_vec()),
                }
            }
            Ok(rows)
        }
        "Expand" | "Tile" => {
            let t = g.floats(&n.input[0])?.ok_or_else(unexpected)?;
            Ok(params(t, groups))
        }
        "Slice" => {
            let int = |k: usize| n.input.get(k).and_then(|x| g.ints(x));
            let (starts, ends) = (int(1), int(2));
            let (Some([start]), Some([end])) = (starts.as_deref(), ends.as_deref()) else {
                return Err(unexpected());
            };
            let axes = int(3).unwrap_or_else(|| vec![0]);
            let steps = int(4).unwrap_or_else(|| vec![1]);
            if !(axes == [1] || axes == [-2]) || steps != [1] {
                return Err(unexpected());
            }
            let rows = embed(g, &n.input[0], patches, groups, grid)?;
            let len = rows.len() as i64;
            let at = |x: i64| (if x < 0 { x + len } else { x }).clamp(0, len) as usize;
            let (a, b) = (at(*start), at(*end));
            Ok(rows
                .into_iter()
                .enumerate()
                .filter(|(k, _)| (a..b).contains(k))
                .map(|(_, r)| r)
                .collect())
        }
        "Transpose" | "Reshape" | "Flatten" => {
            let conv = patch_conv(g, i).ok_or_else(unexpected)?;
            let nc = &g.nodes[conv];
            let w = g
                .floats(&nc.input[1])?
                .ok_or_else(|| err(format!("{} has no constant weight", g.label(conv))))?;
            let [d, c, ph, pw] = w.shape[..] else {
                return Err(err(format!(
                    "{}'s weight has shape {:?}, expected [d, channels, ph, pw]",
                    g.label(conv),
                    w.shape
                )));
            };
            let ints = |k: &str| attr(nc, k).map(|a| a.ints.clone());
            if ints("strides").unwrap_or_default() != [ph as i64, pw as i64]
                || ints("pads").is_some_and(|p| p.iter().any(|&x| x != 0))
                || attr_int(nc, "group").unwrap_or(1) != 1
                || ints("dilations").is_some_and(|p| p.iter().any(|&x| x != 1))
            {
                return Err(err(format!(
                    "{} is not a patch embedding (strides equal to its {ph}x{pw} kernel, no \
                     padding, one group)",
                    g.label(conv)
                )));
            }
            let b = match nc.input.get(2).filter(|x| !x.is_empty()) {
                Some(x) => g
                    .vector(x, d)?
                    .ok_or_else(|| err(format!("{} has no constant [{d}] bias", g.label(conv))))?,
                None => vec![0.0; d],
            };
            if patches.is_some() {
                return Err(err("the tokens hold two patch embeddings"));
            }
            *patches = Some((Patches { w, b }, ph, pw, c));
            Ok((0..grid[0] * grid[1])
                .map(|p| Token {
                    row: Row::Patch(p),
                    pos: None,
                })
                .collect())
        }
        _ => Err(unexpected()),
    }
}

/// Learned tokens from a `[1, k, d]` constant, one group.
fn params(t: F32Tensor, groups: &mut usize) -> Vec<Token> {
    let d = *t.shape.last().unwrap_or(&1);
    *groups += 1;
    t.data
        .chunks_exact(d.max(1))
        .map(|r| Token {
            row: Row::Param {
                group: *groups,
                value: r.to_vec(),
            },
            pos: None,
        })
        .collect()
}

/// The Conv under `[1, d, h, w] → [1, h·w, d]` (Reshape/Flatten then Transpose `[0, 2, 1]`, or
/// Transpose `[0, 2, 3, 1]` then Reshape/Flatten), from that node.
fn patch_conv(g: &Graph<'_>, i: usize) -> Option<usize> {
    let n = &g.nodes[i];
    let perm = |j: usize| attr(&g.nodes[j], "perm").map(|a| a.ints.clone());
    let inner = g.made_by(&n.input[0])?;
    match g.op(i) {
        "Transpose" if perm(i)? == [0, 2, 1] && matches!(g.op(inner), "Reshape" | "Flatten") => {
            let conv = g.made_by(&g.nodes[inner].input[0])?;
            (g.op(conv) == "Conv").then_some(conv)
        }
        "Reshape" | "Flatten" if g.op(inner) == "Transpose" && perm(inner)? == [0, 2, 3, 1] => {
            let conv = g.made_by(&g.nodes[inner].input[0])?;
            (g.op(conv) == "Conv").then_some(conv)
        }
        _ => None,
    }
}

/// The position rows (`rows × d`) the image-independent value `p` adds: a constant, a `Concat`
/// of parts, or a table resized by the graph's `Resize` (cubic, as PyTorch's bicubic).
fn position(
    g: &Graph<'_>,
    p: &str,
    rows: usize,
    d: usize,
    grid: [usize; 2],
    only_patches: bool,
) -> Result<Vec<f32>, ModelError> {
    if let Some(t) = g.floats(p)? {
        if t.data.len() == rows * d {
            return Ok(t.data);
        }
        return Err(err(format!(
            "the position embedding `{}` holds {} values, the {rows} tokens need {}",
            g.source(p),
            t.data.len(),
            rows * d
        )));
    }
    let i = g.made_by(p).ok_or_else(|| {
        err(format!(
            "the position embedding `{p}` is not computed in the graph"
        ))
    })?;
    let n = &g.nodes[i];
    if g.op(i) == "Concat" {
        let mut fixed = 0;
        let mut open = None;
        for x in &n.input {
            match g.floats(x)? {
                Some(t) => fixed += t.data.len() / d.max(1),
                None if open.is_none() => open = Some(x),
                None => {
                    return Err(err(format!(
                        "{}: a position embedding of two computed parts",
                        g.label(i)
                    )));
                }
            }
        }
        let mut out = Vec::new();
        for x in &n.input {
            match g.floats(x)? {
                Some(t) => out.extend(t.data),
                None => out.extend(position(g, x, rows.saturating_sub(fixed), d, grid, true)?),
            }
        }
        return Ok(out);
    }
    // A table reshaped, resized and reshaped back: find its constant and the Resize.
    let mut stack = vec![p.to_string()];
    let mut seen = HashSet::new();
    let mut tables = Vec::new();
    let mut resizes = Vec::new();
    while let Some(v) = stack.pop() {
        let v = g.source(&v).to_string();
        if !seen.insert(v.clone()) || seen.len() > 512 {
            continue;
        }
        if let Some(t) = g
            .floats(&v)?
            .filter(|t| t.data.len() >= d && t.data.len() % d.max(1) == 0)
        {
            tables.push((v, t));
            continue;
        }
        let Some(j) = g.made_by(&v) else { continue };
        if matches!(g.op(j), "Shape" | "Constant") {
            continue;
        }
        if g.op(j) == "Resize" {
            resizes.push(j);
        }
        // Only the data input carries the table; the others are sizes and scales.
        let data_only = matches!(
            g.op(j),
            "Resize" | "Reshape" | "Slice" | "Expand" | "Gather"
        );
        let inputs = &g.nodes[j].input;
        let take = if data_only {
            &inputs[..1.min(inputs.len())]
        } else {
            &inputs[..]
        };
        stack.extend(take.iter().cloned());
    }
    let [(name, table)] = &tables[..] else {
        return Err(err(format!(
            "cannot tell the position embedding from {}: {} constant tables feed it",
            g.label(i),
            tables.len()
        )));
    };
    let n_rows = table.data.len() / d;
    let side = (n_rows as f64).sqrt().round() as usize;
    let want = grid[0] * grid[1];
    if !only_patches || rows != want || side * side != n_rows {
        return Err(err(format!(
            "the position embedding from `{name}` ({n_rows} rows) does not cover the {rows} tokens \
             it is added to"
        )));
    }
    if [side, side] == grid {
        return Ok(table.data.clone());
    }
    let [r] = resizes[..] else {
        return Err(err(format!(
            "the position table `{name}` is {side}x{side} but {} Resize nodes bring it to the {}x{} \
             grid",
            resizes.len(),
            grid[0],
            grid[1]
        )));
    };
    let rn = &g.nodes[r];
    let mode = attr_text(rn, "mode");
    let transform = attr_text(rn, "coordinate_transformation_mode");
    let coeff = attr(rn, "cubic_coeff_a").and_then(|a| a.f).unwrap_or(-0.75);
    let antialias = attr_int(rn, "antialias").unwrap_or(0);
    if mode != "cubic"
        || !matches!(transform.as_str(), "half_pixel" | "pytorch_half_pixel")
        || (coeff + 0.75).abs() > 1e-6
        || antialias != 0
    {
        return Err(err(format!(
            "{} resizes the position table with mode `{mode}`, coordinates `{transform}`, \
             cubic_coeff_a {coeff}, antialias {antialias}: only PyTorch's bicubic (cubic, \
             half_pixel, -0.75, no antialias) is supported",
            g.label(r)
        )));
    }
    Ok(resample::resample(
        Resample::Bicubic,
        &table.data,
        [side, side],
        grid,
        d,
    ))
}

/// One block at stream value `s`, `None` when `s` does not start one (the final norm).
fn block(g: &Graph<'_>, s: &str, d: usize, i: usize) -> Result<Option<Block>, ModelError> {
    let Some(norm1) = g.norm_reading(s)? else {
        return Ok(None);
    };
    let Some((h, out, ls1)) = g.residual(s, d)? else {
        return Ok(None);
    };
    let check = |l: &Linear, fi: usize, fo: usize, what: &str| {
        if l.fan_in == fi && l.fan_out == fo {
            Ok(())
        } else {
            Err(err(format!(
                "block {i}: the {what} ({}) is {}x{}, expected {fi}x{fo}",
                l.at, l.fan_in, l.fan_out
            )))
        }
    };
    if norm1.scale.len() != d {
        return Err(err(format!(
            "block {i}: its first LayerNorm has {} features, the width is {d}",
            norm1.scale.len()
        )));
    }
    check(&out, d, d, "attention output projection")?;
    if !g.after_softmax(&out.input) && !attention_behind(g, &out.input) {
        return Err(err(format!(
            "block {i}: no Softmax attention before {}",
            out.at
        )));
    }
    let mut lins = g.linears_reading(&norm1.output)?;
    let heads_from = lins.first().map(|l| l.output.clone());
    let qkv: [Linear; 3] = match lins.len() {
        1 => {
            let l = lins.remove(0);
            check(&l, d, 3 * d, "fused QKV projection")?;
            // timm's fused layout: the output columns are q, then k, then v.
            let part = |p: usize| Linear {
                input: l.input.clone(),
                output: l.output.clone(),
                w: l.w
                    .chunks_exact(3 * d)
                    .flat_map(|row| row[p * d..(p + 1) * d].to_vec())
                    .collect(),
                fan_in: d,
                fan_out: d,
                b: l.b[p * d..(p + 1) * d].to_vec(),
                at: l.at.clone(),
            };
            [part(0), part(1), part(2)]
        }
        3 => {
            let mut roles: [Option<Linear>; 3] = [None, None, None];
            for l in lins {
                check(&l, d, d, "query, key or value projection")?;
                let (mm, slot) = g.enters_matmul(&l.output).ok_or_else(|| {
                    err(format!(
                        "block {i}: {} does not reach an attention MatMul",
                        l.at
                    ))
                })?;
                let other = &g.nodes[mm].input[1 - slot.min(1)];
                let role = if g.after_softmax(other) {
                    2
                } else if slot == 0 {
                    0
                } else {
                    1
                };
                if roles[role].is_some() {
                    return Err(err(format!(
                        "block {i}: cannot tell query, key and value apart ({} repeats a role)",
                        l.at
                    )));
                }
                roles[role] = Some(l);
            }
            let [Some(q), Some(k), Some(v)] = roles else {
                return Err(err(format!("block {i}: query, key or value missing")));
            };
            [q, k, v]
        }
        n => {
            return Err(err(format!(
                "block {i}: {n} linear layers read its first LayerNorm; a ViT block has a fused \
                 QKV or separate query, key and value projections"
            )));
        }
    };
    let heads = heads_from.and_then(|v| g.heads_after(&v, d));
    let norm2 = g.norm_reading(&h)?.ok_or_else(|| {
        err(format!(
            "block {i}: no LayerNorm reads the attention residual `{h}`"
        ))
    })?;
    let (output, fc2, ls2) = g
        .residual(&h, d)?
        .ok_or_else(|| err(format!("block {i}: no MLP residual Add after `{h}`")))?;
    let mut fc1s = g.linears_reading(&norm2.output)?;
    if fc1s.len() != 1 {
        return Err(err(format!(
            "block {i}: {} linear layers read its second LayerNorm, expected the MLP's first",
            fc1s.len()
        )));
    }
    let fc1 = fc1s.remove(0);
    check(&fc1, d, fc1.fan_out, "first MLP layer")?;
    check(&fc2, fc1.fan_out, d, "second MLP layer")?;
    let gelu = g.activation(&fc1.output, &fc2.input, i)?;
    Ok(Some(Block {
        norm1,
        qkv,
        out,
        ls1,
        norm2,
        fc1,
        fc2,
        ls2,
        gelu,
        heads,
        output,
    }))
}

/// Whether a MatMul fed by a Softmax lies behind `v` (through reshapes).
fn attention_behind(g: &Graph<'_>, v: &str) -> bool {
    let mut stack = vec![v.to_string()];
    let mut seen = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v.clone()) || seen.len() > 64 {
            continue;
        }
        let Some(i) = g.made_by(&v) else { continue };
        if g.op(i) == "MatMul" {
            return g.nodes[i].input.iter().any(|x| g.after_softmax(x));
        }
        if PASS.contains(&g.op(i)) {
            stack.extend(g.nodes[i].input.first().cloned());
        }
    }
    false
}

/// After the last block at `s`: the final norm, whether it is timm's `fc_norm` (after the
/// pooling), and the heads with the tokens they read.
fn tail(g: &Graph<'_>, s: &str, d: usize, np: usize, total: usize) -> Result<Tail, ModelError> {
    let pooled = |v: &str| -> Result<Vec<(Pool, String)>, ModelError> {
        let mut out = Vec::new();
        for i in g.uses(v) {
            let n = &g.nodes[i];
            let axes = |k: usize| {
                n.input
                    .get(k)
                    .and_then(|x| g.ints(x))
                    .or_else(|| attr(n, "axes").map(|a| a.ints.clone()))
            };
            match g.op(i) {
                "Gather" if matches!(attr_int(n, "axis"), Some(1) | Some(-2)) => {
                    if let Some([t]) = n.input.get(1).and_then(|x| g.ints(x)).as_deref() {
                        let t = if *t < 0 { *t + total as i64 } else { *t };
                        out.push((Pool::Token(t.max(0) as usize), n.output[0].clone()));
                    }
                }
                "Slice" => {
                    let int = |k: usize| n.input.get(k).and_then(|x| g.ints(x));
                    let (starts, ends) = (int(1), int(2));
                    let (Some([a]), Some([b])) = (starts.as_deref(), ends.as_deref()) else {
                        continue;
                    };
                    let at = |x: i64| {
                        (if x < 0 { x + total as i64 } else { x }).clamp(0, total as i64) as usize
                    };
                    if !matches!(int(3).as_deref(), Some([1]) | Some([-2])) {
                        continue;
                    }
                    let (a, b) = (at(*a), at(*b));
                    let o = &n.output[0];
                    match g.uses(o).into_iter().find(|&j| g.op(j) == "ReduceMean") {
                        Some(j) => out.push((Pool::Mean(a, b), g.nodes[j].output[0].clone())),
                        None if b == a + 1 => out.push((Pool::Token(a), o.clone())),
                        None => {}
                    }
                }
                "ReduceMean" if matches!(axes(1).as_deref(), Some([1]) | Some([-2])) => {
                    out.push((Pool::Mean(0, total), n.output[0].clone()));
                }
                _ => {}
            }
        }
        Ok(out)
    };
    // A pooled value's head, through reshapes; `None` for a features output.
    let head_of = |v: &str| -> Result<Option<Linear>, ModelError> {
        let mut v = v.to_string();
        for _ in 0..8 {
            let uses = g.uses(&v);
            for &i in &uses {
                if let Some(l) = g.linear_at(i, &v)? {
                    return Ok(Some(l));
                }
            }
            match uses
                .iter()
                .find(|&&i| matches!(g.op(i), "Squeeze" | "Reshape" | "Flatten"))
            {
                Some(&i) => v = g.nodes[i].output[0].clone(),
                None => return Ok(None),
            }
        }
        Ok(None)
    };
    let check_pool = |p: Pool| match p {
        Pool::Token(t) if t <= 1 => Ok(()),
        Pool::Mean(a, b) if (a, b) == (np, total) || (np == 0 && (a, b) == (0, total)) => Ok(()),
        Pool::Token(t) => Err(err(format!(
            "a head reads token {t}: only tokens 0 and 1 are class tokens"
        ))),
        Pool::Mean(a, b) => Err(err(format!(
            "a head averages tokens {a}..{b}; only the mean of the patch tokens ({np}..{total}) is \
             supported"
        ))),
    };
    let mut heads = Vec::new();
    if let Some(norm) = g.norm_reading(s)? {
        if norm.scale.len() != d {
            return Err(err("the final LayerNorm does not have the model width"));
        }
        for (p, v) in pooled(&norm.output)? {
            if let Some(l) = head_of(&v)? {
                check_pool(p)?;
                heads.push((p, l));
            } else if g.norm_reading(&v)?.is_some() {
                return Err(err(
                    "a LayerNorm both before and after the pooling: timm uses one or the other",
                ));
            }
        }
        return finish(norm, false, heads, d);
    }
    for (p, v) in pooled(s)? {
        if let Some(norm) = g.norm_reading(&v)? {
            check_pool(p)?;
            if let Some(l) = head_of(&norm.output)? {
                heads.push((p, l));
            }
            if norm.scale.len() != d {
                return Err(err("the pooled LayerNorm does not have the model width"));
            }
            return finish(norm, true, heads, d);
        }
    }
    let next: Vec<String> = g.uses(s).into_iter().map(|i| g.label(i)).collect();
    Err(err(format!(
        "after the last block (`{s}`) comes no final LayerNorm{}: {}",
        if g.outputs.contains(s) {
            " (it is a graph output)"
        } else {
            ""
        },
        if next.is_empty() {
            "nothing".to_string()
        } else {
            next.join(", ")
        }
    )))
}

fn finish(
    norm: Norm,
    fc_norm: bool,
    heads: Vec<(Pool, Linear)>,
    d: usize,
) -> Result<Tail, ModelError> {
    for (_, l) in &heads {
        if l.fan_in != d {
            return Err(err(format!(
                "the head {} reads {} features, not the model width {d} (a head on concatenated \
                 tokens is not supported)",
                l.at, l.fan_in
            )));
        }
    }
    if heads.len() > 2 || (heads.len() == 2 && heads[0].0 == heads[1].0) {
        return Err(err(format!("{} heads on the final tokens", heads.len())));
    }
    let mut heads = heads;
    heads.sort_by_key(|h| match h.0 {
        Pool::Token(t) => t,
        Pool::Mean(..) => 0,
    });
    if heads.len() == 2 && heads[1].0 != Pool::Token(1) {
        return Err(err("two heads, but not on the CLS and distillation tokens"));
    }
    Ok((norm, fc_norm, heads))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::import::onnx_proto::{GraphProto, StringStringEntryProto, ValueInfoProto};

    fn import_err(bytes: &[u8], dir: &Path) -> String {
        let path = dir.join("m.onnx");
        std::fs::write(&path, bytes).unwrap();
        import_onnx(&path, &OnnxOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn files_that_are_not_onnx_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = import_err(b"\xff\xff\xff\xff not a protobuf", dir.path());
        assert!(e.contains("m.onnx: not an ONNX model (protobuf"), "{e}");
        let e = import_err(&ModelProto::default().encode_to_vec(), dir.path());
        assert!(e.contains("the model has no graph"), "{e}");
        let e = import_onnx(dir.path(), &OnnxOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a regular file"), "{e}");
    }

    /// An initializer whose external data points outside the model's folder is refused before
    /// anything is opened; one asking for more bytes than its shape holds too.
    #[test]
    fn external_data_must_stay_beside_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |k: &str, v: &str| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v.into()),
        };
        let t = |location: &str, length: &str| TensorProto {
            dims: vec![2, 2],
            data_type: Some(onnx_proto::FLOAT),
            name: Some("w".into()),
            data_location: Some(1),
            external_data: vec![entry("location", location), entry("length", length)],
            ..Default::default()
        };
        let e = onnx_proto::decode_float(&t("../../etc/passwd", "16"), "w", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain path inside"), "{e}");
        let e = onnx_proto::decode_float(&t("/etc/passwd", "16"), "w", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain path inside"), "{e}");
        let e = onnx_proto::decode_float(&t("w.bin", "1000000"), "w", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("1000000 bytes, its shape needs 16"), "{e}");
        std::fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
        let ok = onnx_proto::decode_float(&t("w.bin", "16"), "w", dir.path()).unwrap();
        assert_eq!(ok.data, [0.0; 4]);
        // A folder, a FIFO (whose open would wait for a writer forever) and a device as the
        // data file: one error each, at once.
        std::fs::create_dir(dir.path().join("d.bin")).unwrap();
        let e = onnx_proto::decode_float(&t("d.bin", "16"), "w", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.bin") && e.contains("a directory"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("f.bin");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo on a fresh path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = onnx_proto::decode_float(&t("f.bin", "16"), "w", dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.contains("f.bin") && e.contains("a FIFO"), "{e}");
            std::os::unix::fs::symlink("/dev/zero", dir.path().join("z.bin")).unwrap();
            let e = onnx_proto::decode_float(&t("z.bin", "16"), "w", dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.contains("a device"), "{e}");
        }
    }

    /// A graph with no LayerNorm names its ops; one with two image inputs says so.
    #[test]
    fn graphs_without_a_vit_say_what_they_hold() {
        let dir = tempfile::tempdir().unwrap();
        let input = |n: &str| ValueInfoProto {
            name: Some(n.into()),
            ..Default::default()
        };
        let relu = NodeProto {
            input: vec!["x".into()],
            output: vec!["y".into()],
            op_type: Some("Relu".into()),
            ..Default::default()
        };
        let model = |inputs: Vec<ValueInfoProto>| ModelProto {
            graph: Some(GraphProto {
                node: vec![relu.clone()],
                input: inputs,
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = import_err(&model(vec![input("x")]).encode_to_vec(), dir.path());
        assert!(e.contains("not a ViT") && e.contains("Relu×1"), "{e}");
        let e = import_err(
            &model(vec![input("x"), input("z")]).encode_to_vec(),
            dir.path(),
        );
        assert!(e.contains("takes 2 inputs (x, z)"), "{e}");
    }

    #[test]
    fn transposes_follow_their_permutation() {
        let t = F32Tensor {
            shape: vec![2, 3],
            data: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        };
        let u = transpose(&t, &[1, 0]).unwrap();
        assert_eq!(u.shape, [3, 2]);
        assert_eq!(u.data, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(u.data, transpose2(&t.data, 2, 3));
        assert!(transpose(&t, &[0, 0]).is_none());
        let cube = F32Tensor {
            shape: vec![2, 1, 3],
            data: (0..6).map(|v| v as f32).collect(),
        };
        let p = transpose(&cube, &[2, 0, 1]).unwrap();
        assert_eq!(p.shape, [3, 2, 1]);
        assert_eq!(p.data, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }
}
