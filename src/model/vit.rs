//! The ViT-MoE forward pass on candle (CPU), as vmoe's `VisionTransformerMoe`: patch embedding,
//! optional CLS token, learned position embedding, pre-LayerNorm blocks (eps 1e-6, Flax's one-pass
//! variance), multi-head self-attention, tanh-GELU MLPs or MoE layers, final LayerNorm, token or
//! average pooling, optional `pre_logits`, linear head.
//!
//! MoE layers route with `crate::routing` (one call per group of `group_images` consecutive
//! images), run every expert on exactly its `c` slots in one batched matmul, and combine back. The
//! residual stream entering each MoE sublayer is kept, so a router what-if re-runs only from the
//! first MoE layer whose routing changed ([`VitMoe::rerun`]).

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::config::{Classifier, Combine, ModelConfig};
use super::kernels::{StackedMlp, Strided, gemm_strided, softmax_rows_fast};
use super::ops::{LayerNormOp, SoftmaxLastDim, layer_norm_rows};
use super::weights::{ModelWeights, block_prefix, check_router_params};
use crate::routing::ops::{round_to_bf16, softmax_rows};
use crate::routing::{
    CapacitySpec, Mode, RouterConfig, RouterFamily, RoutingResult, SoftRouterParams, route_logits,
    route_soft,
};

/// Moves tensor `name` out of `weights` into candle (one copy of the weights, never two).
fn tensor(weights: &mut ModelWeights, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
    let t = weights
        .remove(name)
        .ok_or_else(|| ModelError::Tensor(format!("missing tensor `{name}`")))?;
    Ok(Tensor::from_vec(t.data, shape, &Device::Cpu)?)
}

struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn load(
        weights: &mut ModelWeights,
        prefix: &str,
        fan_in: usize,
        fan_out: usize,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            w: tensor(weights, &format!("{prefix}/kernel"), &[fan_in, fan_out])?,
            b: tensor(weights, &format!("{prefix}/bias"), &[fan_out])?,
        })
    }

    /// `x @ W + b` over the last axis of any-rank `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let dims = x.dims().to_vec();
        let last = dims[dims.len() - 1];
        let rows = x.elem_count() / last;
        let y = x
            .reshape((rows, last))?
            .matmul(&self.w)?
            .broadcast_add(&self.b)?;
        let mut out = dims;
        let n = out.len();
        out[n - 1] = self.w.dim(1)?;
        Ok(y.reshape(out)?)
    }
}

struct LayerNorm {
    scale: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(weights: &mut ModelWeights, prefix: &str, eps: f32) -> Result<Self, ModelError> {
        Ok(Self {
            scale: take(weights, &format!("{prefix}/scale"))?,
            bias: take(weights, &format!("{prefix}/bias"))?,
            eps,
        })
    }

    /// Flax: `var = max(0, E[x²] − E[x]²)`, `(x − mean)·rsqrt(var + eps)·scale + bias`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let op = LayerNormOp {
            scale: &self.scale,
            bias: &self.bias,
            eps: self.eps,
        };
        Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
    }

    /// The same on rows of a slice.
    fn rows(&self, x: &[f32]) -> Vec<f32> {
        layer_norm_rows(x, &self.scale, &self.bias, self.eps)
    }
}

/// Softmax over the last axis (max-subtracted).
fn softmax_last(x: &Tensor) -> Result<Tensor, ModelError> {
    Ok(x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)?)
}

/// Multi-head self-attention with the query, key and value projections fused into one
/// `[d, 3·h·hd]` matrix (one matmul), and every (image, head) pair's `softmax(q kᵀ) v` as its own
/// task reading the fused output in place (no transposes, both cores busy even for one image).
struct Attention {
    /// `[d, 3·h·hd]`: each row is the query, key and value kernels' rows side by side.
    wqkv: Vec<f32>,
    bqkv: Vec<f32>,
    /// `[h·hd, d]`.
    wout: Vec<f32>,
    bout: Vec<f32>,
    dim: usize,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(
        weights: &mut ModelWeights,
        prefix: &str,
        cfg: &ModelConfig,
    ) -> Result<Self, ModelError> {
        let (d, h, hd) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim());
        let w = h * hd;
        // Flax kernels [d, heads, head_dim] and [heads, head_dim, d] are plain matrices row-major.
        let mut part = |p: &str, what: &str| take(weights, &format!("{prefix}/{p}/{what}"));
        let (q, k, v) = (
            part("query", "kernel")?,
            part("key", "kernel")?,
            part("value", "kernel")?,
        );
        let (qb, kb, vb) = (
            part("query", "bias")?,
            part("key", "bias")?,
            part("value", "bias")?,
        );
        let mut wqkv = Vec::with_capacity(d * 3 * w);
        for r in 0..d {
            for m in [&q, &k, &v] {
                wqkv.extend_from_slice(&m[r * w..(r + 1) * w]);
            }
        }
        Ok(Self {
            wqkv,
            bqkv: [qb, kb, vb].concat(),
            wout: part("out", "kernel")?,
            bout: part("out", "bias")?,
            dim: d,
            heads: h,
            head_dim: hd,
        })
    }

    /// Attention over `x` `[b, s, d]` row-major.
    fn forward_rows(&self, x: &[f32], b: usize, s: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let (d, h, hd) = (self.dim, self.heads, self.head_dim);
        let (w, w3) = (h * hd, 3 * h * hd);
        let small = b * s * d * w3 < super::kernels::PARALLEL_MIN_MACS;
        let threads = if small {
            1
        } else {
            rayon::current_num_threads()
        };
        let mut qkv = vec![0.0f32; b * s * w3];
        gemm_strided(
            &mut qkv,
            Strided::rows(w3),
            x,
            Strided::rows(d),
            &self.wqkv,
            Strided::rows(w3),
            [b * s, d, w3],
            threads,
        );
        // As `x / √hd` in candle: a multiplication by the f32 of the reciprocal.
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        for row in qkv.chunks_exact_mut(w3) {
            for (v, &bias) in row.iter_mut().zip(&self.bqkv) {
                *v += bias;
            }
            for v in &mut row[..w] {
                *v *= scale;
            }
        }
        let head = |t: usize| {
            let (img, head) = (t / h, t % h);
            let at = |part: usize| &qkv[img * s * w3 + part * w + head * hd..];
            let mut scores = vec![0.0f32; s * s];
            gemm_strided(
                &mut scores,
                Strided::rows(s),
                at(0),
                Strided::rows(w3),
                at(1),
                Strided::transposed(w3),
                [s, hd, s],
                1,
            );
            softmax_rows_fast(&mut scores, s);
            let mut o = vec![0.0f32; s * hd];
            gemm_strided(
                &mut o,
                Strided::rows(hd),
                &scores,
                Strided::rows(s),
                at(2),
                Strided::rows(w3),
                [s, s, hd],
                1,
            );
            o
        };
        let heads: Vec<Vec<f32>> = if small {
            (0..b * h).map(head).collect()
        } else {
            (0..b * h).into_par_iter().map(head).collect()
        };
        let mut ctx = vec![0.0f32; b * s * w];
        for (t, o) in heads.iter().enumerate() {
            let (img, head) = (t / h, t % h);
            for (i, row) in o.chunks_exact(hd).enumerate() {
                let dst = (img * s + i) * w + head * hd;
                ctx[dst..dst + hd].copy_from_slice(row);
            }
        }
        let mut y = vec![0.0f32; b * s * d];
        gemm_strided(
            &mut y,
            Strided::rows(d),
            &ctx,
            Strided::rows(w),
            &self.wout,
            Strided::rows(d),
            [b * s, w, d],
            threads,
        );
        for row in y.chunks_exact_mut(d) {
            for (v, &bias) in row.iter_mut().zip(&self.bout) {
                *v += bias;
            }
        }
        y
    }
}

/// Moves tensor `name` out of `weights` as a flat vector.
fn take(weights: &mut ModelWeights, name: &str) -> Result<Vec<f32>, ModelError> {
    weights
        .remove(name)
        .map(|t| t.data)
        .ok_or_else(|| ModelError::Tensor(format!("missing tensor `{name}`")))
}

/// `Dense_0 → GELU → Dense_1` weights under `prefix` (`{prefix}/Dense_0/kernel`, ...), stacked over
/// `num` MLPs (1 for a dense block, `e` for the experts).
fn load_mlps(
    weights: &mut ModelWeights,
    prefix: &str,
    num: usize,
    hidden: usize,
    cfg: &ModelConfig,
) -> Result<StackedMlp, ModelError> {
    Ok(StackedMlp {
        num,
        dim: cfg.hidden_size,
        hidden,
        act: cfg.gelu,
        w0: take(weights, &format!("{prefix}/Dense_0/kernel"))?,
        b0: take(weights, &format!("{prefix}/Dense_0/bias"))?,
        w1: take(weights, &format!("{prefix}/Dense_1/kernel"))?,
        b1: take(weights, &format!("{prefix}/Dense_1/bias"))?,
    })
}

/// `x += a` (times the LayerScale `[d]`, when given, as `a · scale` first).
fn add_branch(x: &mut [f32], a: &[f32], scale: Option<&[f32]>) {
    match scale {
        None => x.iter_mut().zip(a).for_each(|(x, &a)| *x += a),
        Some(ls) => {
            for (xr, ar) in x.chunks_exact_mut(ls.len()).zip(a.chunks_exact(ls.len())) {
                for ((x, &a), &l) in xr.iter_mut().zip(ar).zip(ls) {
                    *x += a * l;
                }
            }
        }
    }
}

/// Soft MoE router parameters kept on the CPU side for `route_soft`.
struct SoftParams {
    mu: Vec<f32>,
    slots: usize,
    scale: f32,
}

/// An MoE layer: router parameters and `e` stacked expert MLPs.
struct MoeLayer {
    block: usize,
    num_experts: usize,
    /// `[d, e]` row-major.
    router_kernel: Option<Vec<f32>>,
    soft: Option<SoftParams>,
    experts: StackedMlp,
    /// `Some(bias)` under [`Combine::Unit`]: the layer's output bias, added once per token.
    unit_bias: Option<Vec<f32>>,
}

/// Routing of one group in one MoE layer, for the viewer.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRecord {
    /// Index of the group's first image in the batch.
    pub first_image: usize,
    pub num_images: usize,
    /// Sparse routers: router logits `[n, e]`; Soft MoE: slot logits `[n, e·p]`.
    pub logits: Vec<f32>,
    /// Per-token expert probabilities `[n, e]` (softmax of the logits; Soft MoE: combine weight
    /// summed over each expert's slots).
    pub probs: Vec<f32>,
    pub routing: RoutingResult,
}

/// All groups of one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLayerRecord {
    /// Encoder block index.
    pub block: usize,
    pub groups: Vec<GroupRecord>,
}

/// How MoE layers route in a run: one router per MoE layer (order of `config.moe.layers`) and the
/// group size in images.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    pub routers: Vec<RouterConfig>,
    pub group_images: usize,
}

impl RunOptions {
    /// The checkpoint's own routing.
    pub fn from_config(cfg: &ModelConfig) -> Self {
        match &cfg.moe {
            Some(m) => Self {
                routers: vec![m.router.clone(); m.layers.len()],
                group_images: m.group_images,
            },
            None => Self {
                routers: Vec::new(),
                group_images: 1,
            },
        }
    }

    /// The first MoE layer whose routing differs from `prev` (every layer when the group size
    /// changed), or `None` when nothing changed: where a what-if resumes.
    pub fn first_change_from(&self, prev: &RunOptions) -> Option<usize> {
        if self.group_images != prev.group_images {
            return Some(0);
        }
        self.routers
            .iter()
            .zip(&prev.routers)
            .position(|(a, b)| a != b)
    }

    /// The same router for every MoE layer.
    pub fn with_router(mut self, router: RouterConfig) -> Self {
        self.routers.iter_mut().for_each(|r| *r = router.clone());
        self
    }
}

/// Result of a forward pass, with what a what-if needs to resume.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// `[B][classes]` class probabilities (empty per image for a feature model).
    pub probs: Vec<Vec<f32>>,
    /// `[B][S·d]` the final LayerNorm output of every token (token 0 is the CLS token when the
    /// model has one): a feature model's result, the representation of any model.
    pub features: Vec<Vec<f32>>,
    /// One record per MoE layer.
    pub records: Vec<MoeLayerRecord>,
    pub options: RunOptions,
    /// The preprocessed images, for a backend that cannot resume from `resume`.
    pub(crate) inputs: Arc<[Vec<f32>]>,
    /// Residual stream entering each MoE sublayer (after that block's attention), `[B, S, d]`,
    /// where the backend that produced this output keeps it.
    pub(crate) resume: Resume,
}

/// Where a what-if resumes from: the candle tensors of this model, or the state of another
/// backend that computed the output (opaque here: that backend owns its type and downcasts it).
#[derive(Clone)]
pub(crate) enum Resume {
    /// Not yet known: a run in progress on another backend.
    Pending,
    Cpu(Vec<Tensor>),
    Backend(Arc<dyn Any + Send + Sync>),
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pending => f.write_str("Pending"),
            Self::Cpu(saved) => f.debug_tuple("Cpu").field(&saved.len()).finish(),
            Self::Backend(_) => f.write_str("Backend(..)"),
        }
    }
}

impl ForwardOutput {
    /// Whether the candle model computed this output (else another backend did).
    pub fn on_cpu(&self) -> bool {
        matches!(self.resume, Resume::Cpu(_))
    }

    /// The resume state of the backend that computed this output, if it is a `T`.
    pub(crate) fn backend_state<T: Any>(&self) -> Option<&T> {
        match &self.resume {
            Resume::Backend(state) => state.downcast_ref(),
            Resume::Pending | Resume::Cpu(_) => None,
        }
    }
}

enum Ffn {
    Dense(StackedMlp),
    Moe(MoeLayer),
}

struct EncoderBlock {
    ln0: LayerNorm,
    attn: Attention,
    ln1: LayerNorm,
    ffn: Ffn,
    /// LayerScale of the attention and the MLP branch, `[d]` each.
    layer_scale: Option<(Vec<f32>, Vec<f32>)>,
}

/// Checks that `opts` can run on a model with `config` whose checkpoint has the parameters
/// `has_param` names: one router per MoE layer, parameters for each router, a group size
/// dividing the batch.
pub(crate) fn check_run_options(
    config: &ModelConfig,
    has_param: impl Fn(&str) -> bool,
    opts: &RunOptions,
    batch: usize,
) -> Result<(), ModelError> {
    let layers = config
        .moe
        .as_ref()
        .map(|m| m.layers.clone())
        .unwrap_or_default();
    if opts.routers.len() != layers.len() {
        return Err(ModelError::Config(format!(
            "{} router settings for {} MoE layers",
            opts.routers.len(),
            layers.len()
        )));
    }
    if opts.group_images == 0 || !batch.is_multiple_of(opts.group_images) {
        return Err(ModelError::Config(format!(
            "{batch} images cannot be split into routing groups of {} images",
            opts.group_images
        )));
    }
    for (block, router) in layers.iter().zip(&opts.routers) {
        check_router_params(&has_param, *block, router.kind)?;
    }
    Ok(())
}

/// Anything that runs the ViT-MoE forward pass: this candle model, or a backend built on top of
/// the model layer (the GPU model, the engine that picks a device).
pub trait Forward {
    fn config(&self) -> &ModelConfig;
    /// Whether `opts` can run on a batch of `batch` images here (one router per MoE layer, each
    /// router's parameters in the checkpoint, whole groups), before any image is run.
    fn check_options(&self, opts: &RunOptions, batch: usize) -> Result<(), ModelError> {
        let _ = (opts, batch);
        Ok(())
    }
    fn forward(&self, images: &[Vec<f32>], opts: &RunOptions) -> Result<ForwardOutput, ModelError>;
    /// [`forward`](Self::forward) on images `ids` of the data source they came from: a routing
    /// trace routes the images it holds by index; a model runs the pixels.
    fn forward_source(
        &self,
        ids: &[usize],
        images: &[Vec<f32>],
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        let _ = ids;
        self.forward(images, opts)
    }
    /// `prev`'s images under other routing options; a backend that can resume from `prev`'s
    /// saved state starts at the first MoE layer that changed.
    fn rerun(&self, prev: &ForwardOutput, opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        self.forward(&prev.inputs, opts)
    }
    /// [`forward`](Self::forward), telling `observe` after each encoder block; a backend that can
    /// stop between blocks does so when it returns `false` ([`ModelError::Cancelled`]).
    fn forward_observed(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        let _ = observe;
        self.forward(images, opts)
    }
    /// [`rerun`](Self::rerun) with an observer, as [`forward_observed`](Self::forward_observed).
    fn rerun_observed(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        let _ = observe;
        self.rerun(prev, opts)
    }
}

/// Told `(blocks done, blocks this run computes)` after each encoder block; `false` stops the run.
pub type BlockObserver<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

impl Forward for VitMoe {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn check_options(&self, opts: &RunOptions, batch: usize) -> Result<(), ModelError> {
        VitMoe::check_options(self, opts, batch)
    }
    fn forward(&self, images: &[Vec<f32>], opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        VitMoe::forward(self, images, opts)
    }
    fn rerun(&self, prev: &ForwardOutput, opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        VitMoe::rerun(self, prev, opts)
    }
    fn forward_observed(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        VitMoe::forward_observed(self, images, opts, observe)
    }
    fn rerun_observed(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        VitMoe::rerun_observed(self, prev, opts, observe)
    }
}

/// A loaded ViT-MoE.
pub struct VitMoe {
    pub config: ModelConfig,
    /// Names of the checkpoint's tensors (which routers' parameters exist).
    param_names: BTreeSet<String>,
    embedding: Linear,
    /// The prefix tokens (CLS, distillation, registers) `[1, P, d]`, `None` without any.
    prefix: Option<Tensor>,
    pos_embedding: Tensor,
    blocks: Vec<EncoderBlock>,
    encoder_norm: LayerNorm,
    pre_logits: Option<Linear>,
    /// The classifier; `None` for a feature model.
    head: Option<Linear>,
    /// DeiT's second head, on the distillation token.
    head_dist: Option<Linear>,
}

impl VitMoe {
    /// Builds the model from validated weights (see `weights::load_checkpoint`).
    pub fn new(config: ModelConfig, mut weights: ModelWeights) -> Result<Self, ModelError> {
        config.validate()?;
        let param_names: BTreeSet<String> = weights.keys().cloned().collect();
        let weights = &mut weights;
        let cfg = &config;
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let [ph, pw] = cfg.patch_size;
        let patch_in = ph * pw * cfg.channels;
        let embedding = Linear::load(weights, "embedding", patch_in, d)?;
        let mut prefix = Vec::new();
        if cfg.prefix().cls {
            prefix.push(tensor(weights, "cls", &[1, 1, d])?);
        }
        if cfg.distillation_token {
            prefix.push(tensor(weights, "dist", &[1, 1, d])?);
        }
        if cfg.register_tokens > 0 {
            prefix.push(tensor(weights, "registers", &[1, cfg.register_tokens, d])?);
        }
        let prefix = match prefix.is_empty() {
            true => None,
            false => Some(Tensor::cat(&prefix, 1)?),
        };
        let pos_embedding = tensor(
            weights,
            "Encoder/posembed_input/pos_embedding",
            &[1, cfg.seq_len(), d],
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = block_prefix(i);
            let ffn = match cfg.moe.as_ref().filter(|moe| moe.layers.contains(&i)) {
                None => Ffn::Dense(load_mlps(
                    weights,
                    &format!("{b}/Mlp"),
                    1,
                    cfg.mlp_dim,
                    cfg,
                )?),
                Some(moe) => {
                    let e = moe.num_experts;
                    let kernel_name = format!("{b}/Moe/Router/dense/kernel");
                    let router_kernel = match weights.contains_key(&kernel_name) {
                        true => Some(take(weights, &kernel_name)?),
                        false => None,
                    };
                    let soft = match (
                        weights.remove(&format!("{b}/Moe/Router/mu")),
                        weights.remove(&format!("{b}/Moe/Router/scale")),
                    ) {
                        (Some(mu), Some(scale)) => Some(SoftParams {
                            slots: mu.shape[2],
                            mu: mu.data,
                            scale: scale.data[0],
                        }),
                        _ => None,
                    };
                    let unit_bias = match moe.combine {
                        Combine::Unit => Some(take(weights, &format!("{b}/Moe/bias"))?),
                        Combine::Gated => None,
                    };
                    Ffn::Moe(MoeLayer {
                        block: i,
                        num_experts: e,
                        router_kernel,
                        soft,
                        experts: load_mlps(
                            weights,
                            &format!("{b}/Moe/Mlp"),
                            e,
                            moe.expert_hidden(cfg.mlp_dim),
                            cfg,
                        )?,
                        unit_bias,
                    })
                }
            };
            let layer_scale = match cfg.layer_scale {
                true => Some((
                    take(weights, &format!("{b}/LayerScale_0/scale"))?,
                    take(weights, &format!("{b}/LayerScale_1/scale"))?,
                )),
                false => None,
            };
            blocks.push(EncoderBlock {
                ln0: LayerNorm::load(weights, &format!("{b}/LayerNorm_0"), eps)?,
                attn: Attention::load(weights, &format!("{b}/SelfAttention"), cfg)?,
                ln1: LayerNorm::load(weights, &format!("{b}/LayerNorm_1"), eps)?,
                ffn,
                layer_scale,
            });
        }
        let encoder_norm = LayerNorm::load(weights, "Encoder/encoder_norm", eps)?;
        let (pre_logits, head_in) = match cfg.representation_size {
            Some(r) => (Some(Linear::load(weights, "pre_logits", d, r)?), r),
            None => (None, d),
        };
        let head = match cfg.is_feature_model() {
            true => None,
            false => Some(Linear::load(weights, "head", head_in, cfg.num_classes)?),
        };
        let head_dist = match cfg.distillation_token && !cfg.is_feature_model() {
            true => Some(Linear::load(
                weights,
                "head_dist",
                head_in,
                cfg.num_classes,
            )?),
            false => None,
        };
        Ok(Self {
            config,
            param_names,
            embedding,
            prefix,
            pos_embedding,
            blocks,
            encoder_norm,
            pre_logits,
            head,
            head_dist,
        })
    }

    /// Checks that `opts` can run on this checkpoint: one router per MoE layer, parameters for each
    /// router present, a group size dividing the batch.
    pub fn check_options(&self, opts: &RunOptions, batch: usize) -> Result<(), ModelError> {
        check_run_options(&self.config, |n| self.param_names.contains(n), opts, batch)
    }

    /// Full forward pass of `images` `[B, H, W, C]` (normalised pixels, see `image_input`).
    pub fn forward(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        self.forward_observed(images, opts, &mut |_, _| true)
    }

    /// [`forward`](Self::forward), telling `observe` after each block and stopping when it says so.
    pub fn forward_observed(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        let b = images.len();
        if b == 0 {
            return Err(ModelError::Config("no images to run".into()));
        }
        self.check_options(opts, b)?;
        let x = self.embed(images)?;
        let mut out = ForwardOutput {
            probs: Vec::new(),
            features: Vec::new(),
            records: Vec::new(),
            options: opts.clone(),
            inputs: images.into(),
            resume: Resume::Cpu(Vec::new()),
        };
        self.encode_from(x, 0, false, &mut out, observe)?;
        Ok(out)
    }

    /// Patch embedding, CLS token and position embedding of `images`: the encoder's input
    /// `[B, S, d]`.
    fn embed(&self, images: &[Vec<f32>]) -> Result<Tensor, ModelError> {
        let cfg = &self.config;
        let b = images.len();
        let [h, w] = cfg.image_size;
        let [ph, pw] = cfg.patch_size;
        let [gh, gw] = cfg.grid();
        let c = cfg.channels;
        let px = h * w * c;
        if let Some((i, img)) = images.iter().enumerate().find(|(_, img)| img.len() != px) {
            return Err(ModelError::Image(format!(
                "image {i} has {} values, expected {h}x{w}x{c} = {px}",
                img.len()
            )));
        }
        let flat: Vec<f32> = images.concat();
        let x = Tensor::from_vec(flat, (b, gh, ph, gw, pw, c), &Device::Cpu)?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b, gh * gw, ph * pw * c))?;
        let mut x = self.embedding.forward(&x)?;
        if let Some(prefix) = &self.prefix {
            let p = prefix.dim(1)?;
            x = Tensor::cat(&[&prefix.broadcast_as((b, p, cfg.hidden_size))?, &x], 1)?;
        }
        Ok(x.broadcast_add(&self.pos_embedding)?)
    }

    /// The MLP inputs (`LN_1` outputs, `[B·S, d]` row-major) of the dense blocks `blocks` for
    /// `images`: what MoEfication clusters and fits its routers on. Every block up to the last
    /// one asked for must be dense.
    pub fn mlp_inputs(
        &self,
        images: &[Vec<f32>],
        blocks: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let last = blocks.iter().copied().max().unwrap_or(0);
        if last >= self.blocks.len() {
            return Err(ModelError::Config(format!(
                "block {last} is beyond the {} blocks",
                self.blocks.len()
            )));
        }
        let mut found = vec![Vec::new(); blocks.len()];
        self.dense_prefix(
            images,
            last + 1,
            "is already an MoE layer; MLP inputs are taken from dense blocks",
            &mut |i, y| {
                for (slot, _) in blocks.iter().enumerate().filter(|(_, b)| **b == i) {
                    found[slot] = y.to_vec();
                }
            },
        )?;
        Ok(found)
    }

    /// The residual stream entering block `block` (`[B, S, d]` row-major) for `images`: what
    /// distillation trains on when every block before it is dense and frozen.
    pub fn block_inputs(&self, images: &[Vec<f32>], block: usize) -> Result<Vec<f32>, ModelError> {
        if block > self.blocks.len() {
            return Err(ModelError::Config(format!(
                "block {block} is beyond the {} blocks",
                self.blocks.len()
            )));
        }
        self.dense_prefix(
            images,
            block,
            "is an MoE layer; block inputs are taken after dense blocks only",
            &mut |_, _| {},
        )
    }

    /// Runs the first `n` blocks, which must be dense (else "block i {moe_error}"), on `images`,
    /// telling `on_mlp_input` each block's `LN_1` output; returns the residual stream after them.
    fn dense_prefix(
        &self,
        images: &[Vec<f32>],
        n: usize,
        moe_error: &str,
        on_mlp_input: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>, ModelError> {
        if images.is_empty() {
            return Err(ModelError::Config("no images to run".into()));
        }
        let x = self.embed(images)?;
        let (b, sq, _) = x.dims3()?;
        let mut x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (i, block) in self.blocks.iter().enumerate().take(n) {
            let Ffn::Dense(mlp) = &block.ffn else {
                return Err(ModelError::Config(format!("block {i} {moe_error}")));
            };
            let scale = |which: usize| {
                block.layer_scale.as_ref().map(|l| {
                    if which == 0 {
                        l.0.as_slice()
                    } else {
                        l.1.as_slice()
                    }
                })
            };
            let a = block.attn.forward_rows(&block.ln0.rows(&x), b, sq);
            add_branch(&mut x, &a, scale(0));
            let y = block.ln1.rows(&x);
            on_mlp_input(i, &y);
            let delta = mlp.forward(&y, b * sq);
            add_branch(&mut x, &delta, scale(1));
        }
        Ok(x)
    }

    /// Re-runs `prev` with new routing options, starting at the first MoE layer whose router (or
    /// the group size) changed; equal to a full [`forward`](Self::forward) with `opts`.
    pub fn rerun(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        self.rerun_observed(prev, opts, &mut |_, _| true)
    }

    /// [`rerun`](Self::rerun), telling `observe` after each block and stopping when it says so.
    pub fn rerun_observed(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        let batch = prev.probs.len();
        self.check_options(opts, batch)?;
        let Some(first) = opts.first_change_from(&prev.options) else {
            return Ok(ForwardOutput {
                options: opts.clone(),
                ..prev.clone()
            });
        };
        let Resume::Cpu(saved) = &prev.resume else {
            // Computed by another backend: start over here from the same images.
            return self.forward_observed(&prev.inputs, opts, observe);
        };
        let block = prev.records[first].block;
        let mut out = ForwardOutput {
            probs: Vec::new(),
            features: Vec::new(),
            records: prev.records[..first].to_vec(),
            options: opts.clone(),
            inputs: prev.inputs.clone(),
            resume: Resume::Cpu(saved[..first].to_vec()),
        };
        self.encode_from(saved[first].clone(), block, true, &mut out, observe)?;
        Ok(out)
    }

    /// Runs blocks `start..` (skipping the attention half of `start` when `resume_at_moe`), the
    /// head, and fills `out`.
    fn encode_from(
        &self,
        x: Tensor,
        start: usize,
        resume_at_moe: bool,
        out: &mut ForwardOutput,
        observe: BlockObserver<'_>,
    ) -> Result<(), ModelError> {
        let todo = self.blocks.len() - start;
        let (b, sq, d) = x.dims3()?;
        let mut x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (i, block) in self.blocks.iter().enumerate().skip(start) {
            if !(resume_at_moe && i == start) {
                let a = block.attn.forward_rows(&block.ln0.rows(&x), b, sq);
                add_branch(
                    &mut x,
                    &a,
                    block.layer_scale.as_ref().map(|l| l.0.as_slice()),
                );
            }
            let y = block.ln1.rows(&x);
            let delta = match &block.ffn {
                Ffn::Dense(mlp) => mlp.forward(&y, b * sq),
                Ffn::Moe(moe) => {
                    let li = out.records.len();
                    if let Resume::Cpu(saved) = &mut out.resume {
                        saved.push(Tensor::from_vec(x.clone(), (b, sq, d), &Device::Cpu)?);
                    }
                    let router = &out.options.routers[li];
                    let (delta, record) =
                        self.moe_forward(moe, &y, [b, sq, d], router, out.options.group_images)?;
                    out.records.push(record);
                    delta
                }
            };
            add_branch(
                &mut x,
                &delta,
                block.layer_scale.as_ref().map(|l| l.1.as_slice()),
            );
            if !observe(i + 1 - start, todo) {
                return Err(ModelError::Cancelled(i));
            }
        }
        let x = Tensor::from_vec(x, (b, sq, d), &Device::Cpu)?;
        let cfg = &self.config;
        // timm's `fc_norm`: the tokens leave the encoder unnormalised, the pooled vector is.
        let x = match cfg.fc_norm {
            true => x,
            false => self.encoder_norm.forward(&x)?,
        };
        let b = x.dim(0)?;
        out.features = x.flatten_from(1)?.to_vec2()?;
        let Some(head) = &self.head else {
            out.probs = vec![Vec::new(); b];
            return Ok(());
        };
        let np = cfg.prefix().count();
        let pool = |x: &Tensor| -> Result<Tensor, ModelError> {
            let pooled = match cfg.classifier {
                Classifier::Token => x.narrow(1, 0, 1)?.squeeze(1)?,
                Classifier::Gap => x.narrow(1, np, sq - np)?.mean(1)?,
            };
            Ok(match cfg.fc_norm {
                true => self.encoder_norm.forward(&pooled)?,
                false => pooled,
            })
        };
        let pooled = pool(&x)?;
        let pooled = match &self.pre_logits {
            Some(p) => p.forward(&pooled)?.tanh()?,
            None => pooled,
        };
        let mut logits = head.forward(&pooled)?;
        if let Some(hd) = &self.head_dist {
            // DeiT at inference: the mean of the CLS head and the distillation-token head.
            let dist = x.narrow(1, 1, 1)?.squeeze(1)?;
            let dist = match cfg.fc_norm {
                true => self.encoder_norm.forward(&dist)?,
                false => dist,
            };
            logits = ((logits + hd.forward(&dist)?)? * 0.5)?;
        }
        out.probs = softmax_last(&logits)?.to_dtype(DType::F32)?.to_vec2()?;
        Ok(())
    }

    /// One MoE sublayer on `y = LN_1(x)` `[B, S, d]`: route every group, run the experts on their
    /// slots, combine.
    fn moe_forward(
        &self,
        moe: &MoeLayer,
        y_vec: &[f32],
        [b, s, d]: [usize; 3],
        router: &RouterConfig,
        group_images: usize,
    ) -> Result<(Vec<f32>, MoeLayerRecord), ModelError> {
        let e = moe.num_experts;
        let n = group_images * s;
        let groups = b / group_images;
        let bf16 = self
            .config
            .moe
            .as_ref()
            .is_some_and(|m| m.bfloat16_dispatch);
        let soft = router.kind.family() == RouterFamily::Soft;

        let mut records = Vec::with_capacity(groups);
        if soft {
            let params = moe.soft.as_ref().ok_or_else(|| {
                ModelError::Config(format!("block {}: no Soft MoE parameters", moe.block))
            })?;
            let cfg = RouterConfig {
                capacity: CapacitySpec::Slots(params.slots),
                ..router.clone()
            };
            let sp = SoftRouterParams {
                mu: &params.mu,
                dim: d,
                num_experts: e,
                num_slots: params.slots,
                scale: params.scale,
            };
            for g in 0..groups {
                let xg = &y_vec[g * n * d..(g + 1) * n * d];
                let routing = route_soft(xg, n, &sp, &cfg, Mode::Deterministic)?;
                let logits = routing.soft().map(|s| s.logits.clone()).unwrap_or_default();
                let probs = routing.expert_probabilities();
                records.push(GroupRecord {
                    first_image: g * group_images,
                    num_images: group_images,
                    logits,
                    probs,
                    routing,
                });
            }
        } else {
            let kernel = moe.router_kernel.as_ref().ok_or_else(|| {
                ModelError::Config(format!("block {}: no router kernel", moe.block))
            })?;
            let mut logits = vec![0.0f32; b * s * e];
            gemm_strided(
                &mut logits,
                Strided::rows(e),
                y_vec,
                Strided::rows(d),
                kernel,
                Strided::rows(e),
                [b * s, d, e],
                rayon::current_num_threads(),
            );
            for g in 0..groups {
                let lg = logits[g * n * e..(g + 1) * n * e].to_vec();
                let routing = route_logits(&lg, n, e, router, Mode::Deterministic)?;
                let probs = softmax_rows(&lg, e);
                records.push(GroupRecord {
                    first_image: g * group_images,
                    num_images: group_images,
                    logits: lg,
                    probs,
                    routing,
                });
            }
        }

        // Slot inputs [e, groups·c, d]: expert j's slots of every group, group-major.
        let c = records[0].routing.capacity;
        let round = |v: f32| if bf16 { round_to_bf16(v) } else { v };
        let mut slots = vec![0.0f32; e * groups * c * d];
        for (g, rec) in records.iter().enumerate() {
            let xg = &y_vec[g * n * d..(g + 1) * n * d];
            let at = |j: usize, sl: usize| (j * groups * c + g * c + sl) * d;
            if let Some(sp) = rec.routing.sparse() {
                for (slot, token) in sp.slot_token.iter().enumerate() {
                    if let Some(t) = token {
                        let (j, sl) = (slot / c, slot % c);
                        let dst = at(j, sl);
                        for (o, &v) in slots[dst..dst + d]
                            .iter_mut()
                            .zip(&xg[*t as usize * d..][..d])
                        {
                            *o = round(v);
                        }
                    }
                }
            } else if let Some(sw) = rec.routing.soft() {
                for (xi, weights) in xg.chunks_exact(d).zip(sw.dispatch.chunks_exact(e * c)) {
                    for (slot, &wgt) in weights.iter().enumerate() {
                        let dst = at(slot / c, slot % c);
                        for (o, &v) in slots[dst..dst + d].iter_mut().zip(xi) {
                            *o += wgt * round(v);
                        }
                    }
                }
            }
        }
        let expert_out = moe.experts.forward(&slots, groups * c);

        let mut combined = vec![0.0f32; b * s * d];
        for (g, rec) in records.iter().enumerate() {
            let at = |j: usize, sl: usize| (j * groups * c + g * c + sl) * d;
            let out_g = &mut combined[g * n * d..(g + 1) * n * d];
            if rec.routing.sparse().is_some() {
                for (i, out) in out_g.chunks_exact_mut(d).enumerate() {
                    for ch in rec.routing.token_choices(i) {
                        if let Some(sl) = ch.slot {
                            let src = at(ch.expert as usize, sl as usize);
                            let gate = if moe.unit_bias.is_some() {
                                1.0
                            } else {
                                ch.gate
                            };
                            for (o, &v) in out.iter_mut().zip(&expert_out[src..src + d]) {
                                *o += gate * round(v);
                            }
                        }
                    }
                }
            } else if let Some(sw) = rec.routing.soft() {
                for (out, weights) in out_g
                    .chunks_exact_mut(d)
                    .zip(sw.combine.chunks_exact(e * c))
                {
                    for (slot, &wgt) in weights.iter().enumerate() {
                        let src = at(slot / c, slot % c);
                        for (o, &v) in out.iter_mut().zip(&expert_out[src..src + d]) {
                            *o += wgt * round(v);
                        }
                    }
                }
            }
        }
        if let Some(bias) = &moe.unit_bias {
            for out in combined.chunks_exact_mut(d) {
                out.iter_mut().zip(bias).for_each(|(o, &b)| *o += b);
            }
        }
        Ok((
            combined,
            MoeLayerRecord {
                block: moe.block,
                groups: records,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random_weights;
    use crate::model::tests::tiny_config;
    use crate::routing::{MlpExperts, RouterKind, moe_layer};

    /// The batched gather / expert matmul / combine equals the plain per-group MoE layer of the
    /// routing core, for sparse routers with drops, Expert Choice, Soft MoE and 2-image groups.
    #[test]
    fn batched_moe_matches_the_routing_core_layer() {
        let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
        let w = random_weights(&cfg, 8);
        let model = VitMoe::new(cfg.clone(), w.clone()).unwrap();
        let Ffn::Moe(moe) = &model.blocks[1].ffn else {
            panic!("block 1 is MoE")
        };
        let (b, s, d, e, m) = (4, cfg.seq_len(), cfg.hidden_size, 4, cfg.mlp_dim);
        let y_vec: Vec<f32> = (0..b * s * d)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let get = |n: &str| {
            w[&format!("Encoder/encoderblock_1/Moe/Mlp/{n}")]
                .data
                .clone()
        };
        let experts = MlpExperts {
            num_experts: e,
            dim: d,
            hidden: m,
            w0: get("Dense_0/kernel"),
            b0: get("Dense_0/bias"),
            w1: get("Dense_1/kernel"),
            b1: get("Dense_1/bias"),
        };
        let mut soft = RouterConfig::new(RouterKind::SoftMoe);
        soft.capacity = CapacitySpec::Slots(1);
        let routers = [
            RouterConfig {
                k: 2,
                capacity: CapacitySpec::Factor(0.5),
                ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
            },
            RouterConfig::new(RouterKind::SoftmaxExpertChoice),
            soft,
        ];
        for router in routers {
            let (delta, record) = model
                .moe_forward(moe, &y_vec, [b, s, d], &router, 2)
                .unwrap();
            let n = 2 * s;
            for (g, rec) in record.groups.iter().enumerate() {
                let xg = &y_vec[g * n * d..(g + 1) * n * d];
                let want = moe_layer(xg, &rec.routing, &experts, false).unwrap();
                for (a, b) in delta[g * n * d..(g + 1) * n * d]
                    .iter()
                    .zip(&want.token_outputs)
                {
                    assert!((a - b).abs() < 1e-5, "{:?}: {a} vs {b}", router.kind);
                }
            }
        }
    }
}
