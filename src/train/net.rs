//! The ViT-MoE forward pass as a differentiable candle graph, for training. Same architecture,
//! parameter names and routing as `model::vit` (which stays the fast inference path); the
//! routers' selections come from `crate::routing` on the (noisy) logits, and gradients reach the
//! router through the combine gates, as in vmoe: the selection itself is not differentiable.

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use rand::Rng;
use rand_distr::StandardNormal;

use super::TrainError;
use super::ops::{Gelu, GeluErf, Normalize, Softmax};
use crate::model::{Classifier, ModelConfig, ModelWeights, block_prefix, expected_tensors};
use crate::routing::{Mode, RouterConfig, RouterKind, route_logits};
use crate::tensor_io::F32Tensor;

/// Parameters by checkpoint name: the trainable ones, and (distillation) the frozen rest.
pub struct TrainNet {
    pub config: ModelConfig,
    pub params: BTreeMap<String, Var>,
    pub frozen: BTreeMap<String, Tensor>,
}

/// The encoder's output from some block on.
pub struct Encoded {
    /// `[B, S, d]` after the final LayerNorm.
    pub tokens: Tensor,
    /// Sum over MoE layers of the router auxiliary losses (scalar; 0 when none apply).
    pub aux_loss: Tensor,
    pub dropped_tokens: usize,
    /// Tokens routed, over all MoE layers.
    pub tokens_routed: usize,
}

/// What one forward pass returns.
pub struct NetOutput {
    /// `[B, classes]` logits.
    pub logits: Tensor,
    /// Sum over MoE layers of the router auxiliary losses (scalar; 0 when none apply).
    pub aux_loss: Tensor,
    /// Tokens that reached no expert, over all MoE layers.
    pub dropped_tokens: usize,
    pub tokens: usize,
}

/// Training (noise drawn from `rng`) or evaluation.
pub enum NetMode<'a, R: Rng> {
    Train(&'a mut R),
    Eval,
}

impl TrainNet {
    /// Wraps `weights` (every tensor the configuration implies; others are ignored) as variables.
    pub fn from_weights(config: ModelConfig, weights: &ModelWeights) -> Result<Self, TrainError> {
        if let Some(what) = untrainable(&config) {
            return Err(TrainError::Model(format!(
                "training supports vmoe's architecture only, not {what}"
            )));
        }
        let mut params = BTreeMap::new();
        for spec in expected_tensors(&config) {
            // Only the configured router's parameters train; the other family's optional ones are
            // left out of the checkpoint so no what-if runs on untrained router weights.
            if !spec.required {
                continue;
            }
            let Some(t) = weights.get(&spec.name) else {
                return Err(TrainError::Model(format!("missing tensor `{}`", spec.name)));
            };
            let v = Var::from_tensor(&Tensor::from_vec(
                t.data.clone(),
                t.shape.clone(),
                &Device::Cpu,
            )?)?;
            params.insert(spec.name.clone(), v);
        }
        Ok(Self {
            config,
            params,
            frozen: BTreeMap::new(),
        })
    }

    /// For distillation: the MoE layers' parameters (routers, experts and the shared `Moe/bias`)
    /// train; every other weight is a constant. Takes the architectures the photo models use
    /// (LayerScale, erf GELU, feature models, unit combine, narrow experts) besides vmoe's; the
    /// router's own parameters must be in `weights`.
    pub fn for_distillation(
        config: ModelConfig,
        weights: &ModelWeights,
    ) -> Result<Self, TrainError> {
        let Some(moe) = &config.moe else {
            return Err(TrainError::Model(format!(
                "`{}` has no MoE layers to distil",
                config.name
            )));
        };
        if moe.router.kind == RouterKind::SoftMoe {
            return Err(TrainError::Model(
                "distillation trains the sparse routers; Soft MoE is not supported".into(),
            ));
        }
        let moe_prefixes: Vec<String> = moe
            .layers
            .iter()
            .map(|&i| format!("{}/Moe/", block_prefix(i)))
            .collect();
        let (mut params, mut frozen) = (BTreeMap::new(), BTreeMap::new());
        for spec in expected_tensors(&config) {
            let Some(t) = weights.get(&spec.name) else {
                if spec.required {
                    return Err(TrainError::Model(format!("missing tensor `{}`", spec.name)));
                }
                continue;
            };
            let tensor = Tensor::from_vec(t.data.clone(), t.shape.clone(), &Device::Cpu)?;
            // Only the chosen router's parameters train; the other family's stay as they are.
            let router_param = spec.name.contains("/Moe/Router/");
            let trains = moe_prefixes.iter().any(|p| spec.name.starts_with(p))
                && (!router_param || spec.required);
            if trains {
                params.insert(spec.name.clone(), Var::from_tensor(&tensor)?);
            } else {
                frozen.insert(spec.name.clone(), tensor);
            }
        }
        Ok(Self {
            config,
            params,
            frozen,
        })
    }

    /// The current parameter values as checkpoint tensors.
    pub fn to_weights(&self) -> Result<ModelWeights, TrainError> {
        let mut out = ModelWeights::new();
        for (name, v) in &self.params {
            out.insert(
                name.clone(),
                F32Tensor {
                    shape: v.dims().to_vec(),
                    data: v.as_tensor().flatten_all()?.to_vec1()?,
                },
            );
        }
        Ok(out)
    }

    fn p(&self, name: &str) -> Result<&Tensor, TrainError> {
        self.params
            .get(name)
            .map(|v| v.as_tensor())
            .or_else(|| self.frozen.get(name))
            .ok_or_else(|| TrainError::Model(format!("missing tensor `{name}`")))
    }

    fn activation(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(match self.config.gelu {
            crate::model::Gelu::Tanh => x.apply_op1(Gelu)?,
            crate::model::Gelu::Erf => x.apply_op1(GeluErf)?,
        })
    }

    /// `x @ kernel + bias` with the kernel viewed as `[fan_in, fan_out]`.
    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor, TrainError> {
        let w = self.p(&format!("{prefix}/kernel"))?;
        let b = self.p(&format!("{prefix}/bias"))?.flatten_all()?;
        let fan_out = b.dim(0)?;
        let fan_in = w.elem_count() / fan_out;
        let w = w.reshape((fan_in, fan_out))?;
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / fan_in;
        let y = x.reshape((rows, fan_in))?.matmul(&w)?.broadcast_add(&b)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = fan_out;
        Ok(y.reshape(out)?)
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor, TrainError> {
        let eps = self.config.layer_norm_eps;
        let y = x.contiguous()?.apply_op1(Normalize { eps })?;
        Ok(y.broadcast_mul(self.p(&format!("{prefix}/scale"))?)?
            .broadcast_add(self.p(&format!("{prefix}/bias"))?)?)
    }

    fn attention(&self, x: &Tensor, prefix: &str) -> Result<Tensor, TrainError> {
        let (b, s, _) = x.dims3()?;
        let (h, hd) = (self.config.num_heads, self.config.head_dim());
        let split = |t: Tensor| -> Result<Tensor, TrainError> {
            Ok(t.reshape((b, s, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(self.linear(x, &format!("{prefix}/query"))?)?;
        let q = (q / (hd as f64).sqrt())?;
        let k = split(self.linear(x, &format!("{prefix}/key"))?)?;
        let v = split(self.linear(x, &format!("{prefix}/value"))?)?;
        let att = softmax_last(&q.matmul(&k.t()?.contiguous()?)?)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * hd))?;
        self.linear(&y, &format!("{prefix}/out"))
    }

    fn mlp(&self, x: &Tensor, prefix: &str) -> Result<Tensor, TrainError> {
        let h = self.linear(x, &format!("{prefix}/Dense_0"))?;
        let h = self.activation(&h)?;
        self.linear(&h, &format!("{prefix}/Dense_1"))
    }

    /// `e` expert MLPs on `slots` `[e, rows, d]`.
    fn experts(&self, slots: &Tensor, prefix: &str) -> Result<Tensor, TrainError> {
        let w0 = self.p(&format!("{prefix}/Dense_0/kernel"))?;
        let b0 = self.p(&format!("{prefix}/Dense_0/bias"))?.unsqueeze(1)?;
        let w1 = self.p(&format!("{prefix}/Dense_1/kernel"))?;
        let b1 = self.p(&format!("{prefix}/Dense_1/bias"))?.unsqueeze(1)?;
        let h = self.activation(&slots.matmul(w0)?.broadcast_add(&b0)?)?;
        Ok(h.matmul(w1)?.broadcast_add(&b1)?)
    }

    /// Forward pass on `images` `[B, H·W·C]` (normalised pixels). In training the routers add
    /// their noise and the auxiliary losses are computed.
    pub fn forward<R: Rng>(
        &self,
        images: &Tensor,
        router: &RouterConfig,
        mode: &mut NetMode<'_, R>,
    ) -> Result<NetOutput, TrainError> {
        let cfg = &self.config;
        let b = images.dim(0)?;
        let [ph, pw] = cfg.patch_size;
        let [gh, gw] = cfg.grid();
        let c = cfg.channels;
        let d = cfg.hidden_size;
        let x = images
            .reshape((b, gh, ph, gw, pw, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b, gh * gw, ph * pw * c))?;
        let mut x = self.linear(&x, "embedding")?;
        if cfg.classifier == Classifier::Token {
            x = Tensor::cat(&[&self.p("cls")?.broadcast_as((b, 1, d))?, &x], 1)?;
        }
        let x = x.broadcast_add(self.p("Encoder/posembed_input/pos_embedding")?)?;
        let enc = self.encode(x, 0, router, mode)?;
        let x = enc.tokens;
        let pooled = match cfg.classifier {
            Classifier::Token => x.i((.., 0, ..))?,
            Classifier::Gap => x.mean(1)?,
        };
        let pooled = match cfg.representation_size {
            Some(_) => self.linear(&pooled, "pre_logits")?.tanh()?,
            None => pooled,
        };
        Ok(NetOutput {
            logits: self.linear(&pooled, "head")?,
            aux_loss: enc.aux_loss,
            dropped_tokens: enc.dropped_tokens,
            tokens: enc.tokens_routed,
        })
    }

    /// Encoder blocks `start..` on the residual stream `x` `[B, S, d]` (the input of block
    /// `start`), then the final LayerNorm.
    pub fn encode<R: Rng>(
        &self,
        mut x: Tensor,
        start: usize,
        router: &RouterConfig,
        mode: &mut NetMode<'_, R>,
    ) -> Result<Encoded, TrainError> {
        let cfg = &self.config;
        let mut aux = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        let (mut dropped, mut tokens) = (0, 0);
        for i in start..cfg.num_layers {
            let bp = block_prefix(i);
            let scaled = |t: Tensor, which: usize| -> Result<Tensor, TrainError> {
                if !cfg.layer_scale {
                    return Ok(t);
                }
                Ok(t.broadcast_mul(self.p(&format!("{bp}/LayerScale_{which}/scale"))?)?)
            };
            let y = self.layer_norm(&x, &format!("{bp}/LayerNorm_0"))?;
            x = (x + scaled(self.attention(&y, &format!("{bp}/SelfAttention"))?, 0)?)?;
            let y = self.layer_norm(&x, &format!("{bp}/LayerNorm_1"))?;
            let delta = if cfg.is_moe_layer(i) {
                let out = match router.kind {
                    RouterKind::SoftMoe => self.soft_moe(&y, &bp)?,
                    _ => self.sparse_moe(&y, &bp, router, mode)?,
                };
                aux = (aux + out.aux)?;
                dropped += out.dropped;
                tokens += out.tokens;
                out.delta
            } else {
                self.mlp(&y, &format!("{bp}/Mlp"))?
            };
            x = (x + scaled(delta, 1)?)?;
        }
        Ok(Encoded {
            tokens: self.layer_norm(&x, "Encoder/encoder_norm")?,
            aux_loss: aux,
            dropped_tokens: dropped,
            tokens_routed: tokens,
        })
    }

    /// A sparse MoE layer on `y` `[B, S, d]`, one routing group per image.
    fn sparse_moe<R: Rng>(
        &self,
        y: &Tensor,
        bp: &str,
        router: &RouterConfig,
        mode: &mut NetMode<'_, R>,
    ) -> Result<MoeOut, TrainError> {
        let (b, s, d) = y.dims3()?;
        let moe =
            self.config.moe.as_ref().ok_or_else(|| {
                TrainError::Model("MoE layer without an MoE configuration".into())
            })?;
        let e = moe.num_experts;
        let kernel = self.p(&format!("{bp}/Moe/Router/dense/kernel"))?;
        let flat = y.reshape((b * s, d))?;
        let logits = flat.matmul(kernel)?;
        let train = matches!(mode, NetMode::Train(_));
        // Spec §2.0: σ = noise_std / e, only in training and only for routers that use noise.
        let sigma = router.noise_std / e as f32;
        let noisy = match mode {
            NetMode::Train(rng) if router.kind.uses_noise() && sigma > 0.0 => {
                let eps: Vec<f32> = (0..b * s * e)
                    .map(|_| sigma * rng.sample::<f32, _>(StandardNormal))
                    .collect();
                (&logits + Tensor::from_vec(eps, (b * s, e), &Device::Cpu)?)?
            }
            _ => logits.clone(),
        };
        // Spec §2.8: the combine gate is the noisy softmax except for Sinkhorn TC and the SCOT
        // routers, which combine with the clean softmax.
        let gates = match router.kind {
            RouterKind::SinkhornTokenChoice
            | RouterKind::SparseExpertChoice
            | RouterKind::SparseTokenChoice => softmax_last(&logits)?,
            _ => softmax_last(&noisy)?,
        };

        // Selection: the routing core on the noisy logits (deterministic mode: the noise is
        // already in them), one group per image.
        let noisy_vec: Vec<f32> = noisy.flatten_all()?.to_vec1()?;
        let mut results = Vec::with_capacity(b);
        for g in 0..b {
            let lg = &noisy_vec[g * s * e..(g + 1) * s * e];
            results.push(route_logits(lg, s, e, router, Mode::Deterministic)?);
        }
        let cap = results[0].capacity;
        // Gather indices, expert-major `[e, B, c]`: the token row in `y` (or the zero pad row
        // `B·S`) and the gate entry in `gates` (or the zero pad entry `B·S·e`).
        let mut rows = vec![(b * s) as u32; e * b * cap];
        let mut gate_idx = vec![(b * s * e) as u32; e * b * cap];
        let mut dropped = 0;
        for (g, r) in results.iter().enumerate() {
            let Some(sp) = r.sparse() else { continue };
            for (slot, token) in sp.slot_token.iter().enumerate() {
                if let Some(t) = token {
                    let (j, sl) = (slot / cap, slot % cap);
                    let at = (j * b + g) * cap + sl;
                    let row = g * s + *t as usize;
                    rows[at] = row as u32;
                    gate_idx[at] = (row * e + j) as u32;
                }
            }
            dropped += r.stats().dropped_tokens.len();
        }
        let rows = Tensor::from_vec(rows, e * b * cap, &Device::Cpu)?;
        let gate_idx = Tensor::from_vec(gate_idx, e * b * cap, &Device::Cpu)?;
        let zero_row = Tensor::zeros((1, d), DType::F32, &Device::Cpu)?;
        let padded = Tensor::cat(&[&flat, &zero_row], 0)?;
        let slots = padded.index_select(&rows, 0)?.reshape((e, b * cap, d))?;
        let out = self
            .experts(&slots, &format!("{bp}/Moe/Mlp"))?
            .reshape((e * b * cap, d))?;
        let zero = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        let unit = moe.combine == crate::model::Combine::Unit;
        // Unit combine (a moefied model's experts are parts of one MLP) weighs each chosen
        // expert by 1 + (g − sg(g)) / sg(g): exactly 1 forward, as the model runs, while the
        // router still learns from ∂L/∂g = ∂L/∂w / g (a straight-through gate).
        let gates = if unit {
            let g0 = gates.detach();
            (((&gates - &g0)? / g0.clamp(f32::MIN_POSITIVE, 1.0)?)? + 1.0)?
        } else {
            gates
        };
        let gate_flat = Tensor::cat(&[&gates.flatten_all()?, &zero], 0)?;
        let w = gate_flat.index_select(&gate_idx, 0)?;
        let weighted = out.broadcast_mul(&w.unsqueeze(1)?)?;
        let combined = Tensor::zeros((b * s + 1, d), DType::F32, &Device::Cpu)?
            .index_add(&rows, &weighted, 0)?
            .narrow(0, 0, b * s)?
            .reshape((b, s, d))?;
        let combined = if unit {
            combined.broadcast_add(self.p(&format!("{bp}/Moe/bias"))?)?
        } else {
            combined
        };

        let aux = if train && router.kind == RouterKind::SoftmaxTokenChoice {
            aux_losses(&logits, &noisy, router, b, s, e, sigma)?
        } else {
            Tensor::zeros((), DType::F32, &Device::Cpu)?
        };
        Ok(MoeOut {
            delta: combined,
            aux,
            dropped,
            tokens: b * s,
        })
    }

    /// Soft MoE (spec §2.6) on `y` `[B, S, d]`, one group per image.
    fn soft_moe(&self, y: &Tensor, bp: &str) -> Result<MoeOut, TrainError> {
        let (b, s, d) = y.dims3()?;
        let mu = self.p(&format!("{bp}/Moe/Router/mu"))?;
        let (_, e, p) = mu.dims3()?;
        let scale = self.p(&format!("{bp}/Moe/Router/scale"))?.flatten_all()?;
        let xn = y.broadcast_div(&(y.sqr()?.sum_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?;
        let mu = mu.reshape((d, e * p))?;
        let mun = mu.broadcast_div(&(mu.sqr()?.sum_keepdim(0)? + 1e-6)?.sqrt()?)?;
        let mun = mun.broadcast_mul(&scale)?;
        let lam = xn
            .reshape((b * s, d))?
            .matmul(&mun)?
            .reshape((b, s, e * p))?;
        let dispatch = softmax_dim1(&lam)?;
        let combine = softmax_last(&lam)?;
        let slots = dispatch.transpose(1, 2)?.contiguous()?.matmul(y)?; // [B, e·p, d]
        let slots = slots
            .reshape((b, e, p, d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((e, b * p, d))?;
        let out = self
            .experts(&slots, &format!("{bp}/Moe/Mlp"))?
            .reshape((e, b, p, d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, e * p, d))?;
        Ok(MoeOut {
            delta: combine.matmul(&out)?,
            aux: Tensor::zeros((), DType::F32, &Device::Cpu)?,
            dropped: 0,
            tokens: b * s,
        })
    }
}

struct MoeOut {
    delta: Tensor,
    aux: Tensor,
    dropped: usize,
    tokens: usize,
}

/// Softmax over the last axis; the max is a constant for autograd.
pub fn softmax_last(x: &Tensor) -> Result<Tensor, TrainError> {
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}

fn softmax_dim1(x: &Tensor) -> Result<Tensor, TrainError> {
    let m = x.max_keepdim(1)?.detach();
    let ex = x.broadcast_sub(&m)?.exp()?;
    Ok(ex.broadcast_div(&ex.sum_keepdim(1)?)?)
}

/// `(std/mean)²` over the last axis (population std), averaged over the rows.
fn cv_squared(x: &Tensor) -> Result<Tensor, TrainError> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
    Ok((var / mean.sqr()?)?.mean_all()?)
}

/// Softmax Token Choice's importance and load losses (spec §2.0), per image group, averaged over
/// groups and weighted by the router's loss weights.
fn aux_losses(
    logits: &Tensor,
    noisy: &Tensor,
    router: &RouterConfig,
    b: usize,
    s: usize,
    e: usize,
    sigma: f32,
) -> Result<Tensor, TrainError> {
    let w = router.loss_weights;
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    if w.importance > 0.0 {
        let imp = softmax_last(logits)?.reshape((b, s, e))?.sum(1)?;
        total = (total + (cv_squared(&imp)? * w.importance as f64)?)?;
    }
    if w.load > 0.0 && sigma > 0.0 {
        // θ_i: the k-th largest noisy logit of token i.
        let k = router.k.min(e);
        let noisy_vals: Vec<f32> = noisy.flatten_all()?.to_vec1()?;
        let idx: Vec<u32> = noisy_vals
            .chunks_exact(e)
            .map(|row| {
                let mut top = Vec::with_capacity(k);
                crate::routing::ops::top_k_indices(row, k, &mut top);
                top[k - 1] as u32
            })
            .collect();
        let idx = Tensor::from_vec(idx, (b * s, 1), &Device::Cpu)?;
        let theta = noisy.gather(&idx, 1)?;
        let z = (theta.broadcast_sub(logits)? / (sigma as f64 * std::f64::consts::SQRT_2))?;
        // 1 − Φ(z·√2·…) = 0.5·(1 − erf(z)) with z already divided by √2.
        let p = ((1.0 - z.erf()?)? * 0.5)?;
        let load = p.reshape((b, s, e))?.mean(1)?;
        total = (total + (cv_squared(&load)? * w.load as f64)?)?;
    }
    Ok(total)
}

/// Mean cross-entropy of `logits` `[B, C]` against `labels` `[B]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, TrainError> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    Ok((picked.mean_all()? * -1.0)?)
}

/// What `cfg` has that this training graph does not implement.
fn untrainable(cfg: &ModelConfig) -> Option<&'static str> {
    use crate::model::{Combine, Gelu};
    if cfg.layer_scale {
        Some("LayerScale")
    } else if cfg.prefix()
        != crate::model::PrefixTokens::cls_only(cfg.classifier == Classifier::Token)
    {
        Some("distillation or register tokens, or a CLS token with mean pooling")
    } else if cfg.fc_norm {
        Some("a LayerNorm after pooling (fc_norm)")
    } else if cfg.layer_norm_eps != crate::model::DEFAULT_LAYER_NORM_EPS {
        Some("a LayerNorm epsilon other than 1e-6")
    } else if cfg.gelu != Gelu::Tanh {
        Some("the exact (erf) GELU")
    } else if cfg.is_feature_model() {
        Some("a feature model (no classifier head)")
    } else if cfg
        .moe
        .as_ref()
        .is_some_and(|m| m.combine != Combine::Gated || m.expert_hidden(cfg.mlp_dim) != cfg.mlp_dim)
    {
        Some("unit-weight experts narrower than the MLP (a moefied model)")
    } else {
        None
    }
}
