//! The ViT-MoE forward pass on the GPU, step for step the candle model of `crate::model::vit`:
//! weights are uploaded once (the query, key and value kernels side by side as one matrix), and a
//! run records every kernel into one command buffer (split only where the host solves a
//! sparsity-constrained plan), with all launch parameters in one uniform arena, and reads back
//! once at the end. Per-run buffers live in a workspace that is reused while the batch shape
//! stays the same. The residual stream entering each MoE layer is
//! kept on the GPU, so a router what-if restarts at the first MoE layer whose routing changed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::context::GpuContext;
use super::error::GpuError;
use super::kernels::{Activation, Kernel, as_f32, flat_groups, row_groups, storage, upload};
use super::layers::{LayerNorm, Linear, Mlp, add_branch, get};
use super::moe::{LayerPending, MoeWeights, SoftWeights, encode_moe, finish_layer};
use super::recorder::{Recorder, RunStats, Workspace};
use crate::model::vit::{Resume, check_run_options};
use crate::model::{
    Classifier, Combine, Forward, ForwardOutput, ModelConfig, ModelError, ModelWeights, RunOptions,
    block_prefix,
};

/// What a what-if resumes from on the GPU: the residual stream entering each MoE layer
/// (`ForwardOutput`'s backend state for outputs of this backend).
struct GpuResume(Vec<wgpu::Buffer>);

/// Keys one attention workgroup can hold (`MAX_S` in `shaders/attention.wgsl`).
pub const MAX_TOKENS: usize = 3072;

enum Ffn {
    Dense(Mlp),
    Moe(MoeWeights),
}

struct Block {
    ln0: LayerNorm,
    qkv: Linear,
    out: Linear,
    ln1: LayerNorm,
    ffn: Ffn,
    /// LayerScale after attention and after the MLP.
    layer_scale: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

/// A ViT-MoE resident on a GPU.
pub struct GpuVitMoe {
    ctx: GpuContext,
    pub config: ModelConfig,
    param_names: BTreeSet<String>,
    embedding: Linear,
    /// The prefix tokens (CLS, distillation, registers) `[P, d]`, `None` without any.
    prefix: Option<wgpu::Buffer>,
    pos_embedding: wgpu::Buffer,
    blocks: Vec<Block>,
    encoder_norm: LayerNorm,
    pre_logits: Option<Linear>,
    /// The classifier; `None` for a feature model. With a distillation token its weights are
    /// halved at upload, as are `head_dist`'s: the two heads' mean is their sum (exact in f32).
    head: Option<Linear>,
    head_dist: Option<Linear>,
    workspace: Mutex<Workspace>,
    /// What the last run recorded (launches, passes, readback).
    last_stats: Mutex<RunStats>,
}

impl std::fmt::Debug for GpuVitMoe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVitMoe").field("ctx", &self.ctx).finish()
    }
}

impl GpuVitMoe {
    /// Uploads validated checkpoint weights (see `model::load_checkpoint`) to `ctx`'s device.
    pub fn new(
        ctx: &GpuContext,
        config: &ModelConfig,
        weights: &ModelWeights,
    ) -> Result<Self, GpuError> {
        config.validate()?;
        let cfg = config;
        if cfg.seq_len() > MAX_TOKENS {
            return Err(GpuError::Failed(format!(
                "{} tokens per image; the attention kernel holds at most {MAX_TOKENS}",
                cfg.seq_len()
            )));
        }
        let device = &ctx.device;
        let limit = device.limits().max_storage_buffer_binding_size as usize;
        if let Some((name, t)) = weights.iter().find(|(_, t)| t.data.len() * 4 > limit) {
            return Err(GpuError::Failed(format!(
                "tensor `{name}` takes {} MiB ({} bytes); `{}` binds at most {} bytes per buffer",
                (t.data.len() * 4) >> 20,
                t.data.len() * 4,
                ctx.info.name,
                limit
            )));
        }
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let [ph, pw] = cfg.patch_size;
        let embedding = Linear::load(device, weights, "embedding", ph * pw * cfg.channels, d)?;
        let tokens = cfg.prefix();
        let mut prefix = Vec::with_capacity(tokens.count() * d);
        for (name, count) in [
            ("cls", usize::from(tokens.cls)),
            ("dist", usize::from(tokens.distillation)),
            ("registers", tokens.registers),
        ] {
            if count > 0 {
                let t = get(weights, name)?;
                if t.len() != count * d {
                    return Err(ModelError::Tensor(format!(
                        "`{name}` has {} values, expected {count}x{d}",
                        t.len()
                    ))
                    .into());
                }
                prefix.extend_from_slice(t);
            }
        }
        let prefix = (!prefix.is_empty()).then(|| upload(device, "prefix tokens", &prefix));
        let pos = get(weights, "Encoder/posembed_input/pos_embedding")?;
        if pos.len() != cfg.seq_len() * d {
            return Err(ModelError::Tensor(format!(
                "`Encoder/posembed_input/pos_embedding` has {} values, expected {}x{d}",
                pos.len(),
                cfg.seq_len()
            ))
            .into());
        }
        let pos_embedding = upload(device, "pos_embedding", pos);
        let hd = cfg.num_heads * cfg.head_dim();
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = block_prefix(i);
            let att = format!("{b}/SelfAttention");
            // [d, 3·H·hd]: query, key and value kernels side by side, row by row.
            let (mut w, mut bias) = (Vec::with_capacity(d * 3 * hd), Vec::with_capacity(3 * hd));
            let parts: Vec<(&[f32], &[f32])> = ["query", "key", "value"]
                .iter()
                .map(|p| {
                    Ok((
                        get(weights, &format!("{att}/{p}/kernel"))?,
                        get(weights, &format!("{att}/{p}/bias"))?,
                    ))
                })
                .collect::<Result<_, ModelError>>()?;
            for (k, _) in &parts {
                if k.len() != d * hd {
                    return Err(ModelError::Tensor(format!(
                        "`{att}`: projection kernels must be {d}x{hd}"
                    ))
                    .into());
                }
            }
            for r in 0..d {
                for (k, _) in &parts {
                    w.extend_from_slice(&k[r * hd..(r + 1) * hd]);
                }
            }
            for (_, bb) in &parts {
                bias.extend_from_slice(bb);
            }
            let qkv = Linear::from_parts(device, &att, &w, &bias, d, 3 * hd)?;
            let ffn = match cfg.moe.as_ref().filter(|m| m.layers.contains(&i)) {
                None => Ffn::Dense(Mlp::load(
                    device,
                    weights,
                    &format!("{b}/Mlp"),
                    1,
                    cfg.mlp_dim,
                    cfg,
                )?),
                Some(moe) => {
                    let e = moe.num_experts;
                    let router_kernel = weights
                        .get(&format!("{b}/Moe/Router/dense/kernel"))
                        .map(|t| upload(device, "router", &t.data));
                    let soft = match (
                        weights.get(&format!("{b}/Moe/Router/mu")),
                        weights.get(&format!("{b}/Moe/Router/scale")),
                    ) {
                        (Some(mu), Some(scale)) => Some(SoftWeights::new(
                            device,
                            &mu.data,
                            d,
                            e,
                            mu.shape[2],
                            scale.data[0],
                        )),
                        _ => None,
                    };
                    let unit_bias = match moe.combine {
                        Combine::Unit => Some(upload(
                            device,
                            "Moe/bias",
                            vector(weights, &format!("{b}/Moe/bias"), d)?,
                        )),
                        Combine::Gated => None,
                    };
                    Ffn::Moe(MoeWeights {
                        block: i,
                        num_experts: e,
                        router_kernel,
                        soft,
                        experts: Mlp::load(
                            device,
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
                true => {
                    let scale = |j: usize| -> Result<wgpu::Buffer, ModelError> {
                        let name = format!("{b}/LayerScale_{j}/scale");
                        Ok(upload(device, &name, vector(weights, &name, d)?))
                    };
                    Some((scale(0)?, scale(1)?))
                }
                false => None,
            };
            blocks.push(Block {
                ln0: LayerNorm::load(device, weights, &format!("{b}/LayerNorm_0"), d, eps)?,
                qkv,
                out: Linear::load(device, weights, &format!("{att}/out"), hd, d)?,
                ln1: LayerNorm::load(device, weights, &format!("{b}/LayerNorm_1"), d, eps)?,
                ffn,
                layer_scale,
            });
        }
        let encoder_norm = LayerNorm::load(device, weights, "Encoder/encoder_norm", d, eps)?;
        let (pre_logits, head_in) = match cfg.representation_size {
            Some(r) => (Some(Linear::load(device, weights, "pre_logits", d, r)?), r),
            None => (None, d),
        };
        let two_heads = cfg.distillation_token;
        let head_of = |name: &str| -> Result<Linear, ModelError> {
            let w = get(weights, &format!("{name}/kernel"))?;
            let bias = get(weights, &format!("{name}/bias"))?;
            let half = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|x| if two_heads { x * 0.5 } else { *x })
                    .collect()
            };
            Linear::from_parts(
                device,
                name,
                &half(w),
                &half(bias),
                head_in,
                cfg.num_classes,
            )
        };
        let (head, head_dist) = match cfg.is_feature_model() {
            true => (None, None),
            false => (
                Some(head_of("head")?),
                two_heads.then(|| head_of("head_dist")).transpose()?,
            ),
        };
        let errors = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
        ];
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(GpuError::Device(format!("uploading the weights: {e}")));
        }
        Ok(Self {
            ctx: ctx.clone(),
            config: config.clone(),
            param_names: weights.keys().cloned().collect(),
            embedding,
            prefix,
            pos_embedding,
            blocks,
            encoder_norm,
            pre_logits,
            head,
            head_dist,
            workspace: Mutex::new(Workspace::default()),
            last_stats: Mutex::new(RunStats::default()),
        })
    }

    /// Destroys a weight buffer, so that the next run fails like a lost device would.
    #[cfg(test)]
    pub(crate) fn poison_for_test(&self) {
        self.embedding.w.destroy();
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// What the last run recorded: launches, bind groups, passes, copies, submits, bytes read
    /// back and host encode time.
    pub fn last_run_stats(&self) -> RunStats {
        self.last_stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Full forward pass, as [`VitMoe::forward`](crate::model::VitMoe::forward).
    pub fn forward(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
    ) -> Result<ForwardOutput, GpuError> {
        let cfg = &self.config;
        let b = images.len();
        if b == 0 {
            return Err(ModelError::Config("no images to run".into()).into());
        }
        check_run_options(cfg, |n| self.param_names.contains(n), opts, b)?;
        let [h, w] = cfg.image_size;
        let px = h * w * cfg.channels;
        if let Some((i, img)) = images.iter().enumerate().find(|(_, img)| img.len() != px) {
            return Err(ModelError::Image(format!(
                "image {i} has {} values, expected {h}x{w}x{} = {px}",
                img.len(),
                cfg.channels
            ))
            .into());
        }
        let out = ForwardOutput {
            probs: Vec::new(),
            features: Vec::new(),
            records: Vec::new(),
            options: opts.clone(),
            inputs: images.into(),
            resume: Resume::Pending,
        };
        self.run(out, Vec::new(), None, &[])
    }

    /// A what-if, as [`VitMoe::rerun`](crate::model::VitMoe::rerun); an output computed on
    /// another backend is recomputed from its images.
    pub fn rerun(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
    ) -> Result<ForwardOutput, GpuError> {
        let batch = prev.probs.len();
        check_run_options(&self.config, |n| self.param_names.contains(n), opts, batch)?;
        let Some(first) = opts.first_change_from(&prev.options) else {
            return Ok(ForwardOutput {
                options: opts.clone(),
                ..prev.clone()
            });
        };
        let Some(GpuResume(saved)) = prev.backend_state::<GpuResume>() else {
            // Computed on another backend: start over here from the same images.
            return self.forward(&prev.inputs, opts);
        };
        let out = ForwardOutput {
            probs: Vec::new(),
            features: Vec::new(),
            records: prev.records[..first].to_vec(),
            options: opts.clone(),
            inputs: prev.inputs.clone(),
            resume: Resume::Pending,
        };
        self.run(
            out,
            saved[..first].to_vec(),
            Some((first, saved[first].clone())),
            &[],
        )
    }

    /// Runs from the input (`resume` = None) or from MoE layer `resume.0` with its saved residual;
    /// `saved` holds the residuals of the MoE layers before it. `cpu_sinkhorn` lists MoE layers
    /// whose Sinkhorn plan must be computed on the host (the GPU's kernel-mode iterations failed
    /// there on an earlier try).
    fn run(
        &self,
        mut out: ForwardOutput,
        saved: Vec<wgpu::Buffer>,
        resume: Option<(usize, wgpu::Buffer)>,
        cpu_sinkhorn: &[usize],
    ) -> Result<ForwardOutput, GpuError> {
        let template = out.clone();
        let device = &self.ctx.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut residuals = saved.clone();
        let result = self.encode_run(&mut out, &mut residuals, resume.clone(), cpu_sinkhorn);
        let errors = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
        ];
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(GpuError::Command(e.to_string()));
        }
        match result? {
            Some(failed) => {
                // Retry with those layers' plans from the host (spec §5.8 log-domain fallback).
                let mut layers = cpu_sinkhorn.to_vec();
                layers.extend(failed);
                self.run(template, saved, resume, &layers)
            }
            None => {
                out.resume = Resume::Backend(Arc::new(GpuResume(residuals)));
                Ok(out)
            }
        }
    }

    /// Records and runs the blocks; `Some(layers)` when Sinkhorn kernel mode failed in those MoE
    /// layers and the run must be repeated.
    fn encode_run(
        &self,
        out: &mut ForwardOutput,
        residuals: &mut Vec<wgpu::Buffer>,
        resume: Option<(usize, wgpu::Buffer)>,
        cpu_sinkhorn: &[usize],
    ) -> Result<Option<Vec<usize>>, GpuError> {
        let cfg = &self.config;
        let ctx = &self.ctx;
        let device = &ctx.device;
        let b = out.inputs.len();
        let (s, d) = (cfg.seq_len(), cfg.hidden_size);
        let bs = b * s;
        let mut ws = self.workspace.lock().map_err(|_| {
            GpuError::Failed("the GPU workspace was poisoned by a failed run".into())
        })?;
        let hd = cfg.num_heads * cfg.head_dim();
        let x = ws.get(device, "x", bs * d);
        let hbuf = ws.get(device, "h", bs * d);
        let qkv = ws.get(device, "qkv", bs * 3 * hd);
        let att = ws.get(device, "att", bs * hd);
        let mlp_h = ws.get(device, "mlp_h", bs * cfg.mlp_dim);
        let mut rec = Recorder::new(ctx);

        let (start, resume_at_moe) = match &resume {
            None => {
                let [h, w] = cfg.image_size;
                let [ph, pw] = cfg.patch_size;
                let [gh, gw] = cfg.grid();
                let c = cfg.channels;
                let np = gh * gw;
                let pin = ph * pw * c;
                let img = ws.get(device, "images", b * h * w * c);
                let flat: Vec<f32> = out.inputs.concat();
                ctx.queue.write_buffer(&img, 0, bytemuck::cast_slice(&flat));
                let patches = ws.get(device, "patches", b * np * pin);
                let emb = ws.get(device, "patch_embedding", b * np * d);
                let params = embed_params(cfg, b, 0, 0);
                rec.launch(
                    Kernel::Patchify,
                    &params,
                    &[&img, &img, &img, &patches],
                    flat_groups(b * np * pin),
                );
                self.embedding
                    .encode(&mut rec, &patches, &emb, b * np, Activation::None, false);
                let prefix = self.prefix.as_ref().unwrap_or(&emb);
                rec.launch(
                    Kernel::Assemble,
                    &params,
                    &[&emb, prefix, &self.pos_embedding, &x],
                    flat_groups(bs * d),
                );
                (0, false)
            }
            Some((layer, saved)) => {
                rec.copy(saved, &x, bs * d);
                let block = cfg
                    .moe
                    .as_ref()
                    .map(|m| m.layers[*layer])
                    .ok_or_else(|| ModelError::Config("no MoE layers to resume at".into()))?;
                (block, true)
            }
        };

        // A branch that LayerScale or a unit-combine bias finishes is written here first.
        let branch = ws.get(device, "branch", bs * d);
        let mut pending: Vec<LayerPending> = Vec::new();
        for (i, block) in self.blocks.iter().enumerate().skip(start) {
            let scale = |j: usize| {
                block
                    .layer_scale
                    .as_ref()
                    .map(|(a, m)| if j == 0 { a } else { m })
            };
            if !(resume_at_moe && i == start) {
                block.ln0.encode(&mut rec, &x, &hbuf, bs);
                block
                    .qkv
                    .encode(&mut rec, &hbuf, &qkv, bs, Activation::None, false);
                rec.launch(
                    Kernel::Attention,
                    &[
                        s as u32,
                        cfg.num_heads as u32,
                        cfg.head_dim() as u32,
                        (1.0 / (cfg.head_dim() as f32).sqrt()).to_bits(),
                    ],
                    &[&qkv, &att],
                    [s as u32, cfg.num_heads as u32, b as u32],
                );
                match scale(0) {
                    None => block
                        .out
                        .encode(&mut rec, &att, &x, bs, Activation::None, true),
                    Some(ls) => {
                        block
                            .out
                            .encode(&mut rec, &att, &branch, bs, Activation::None, false);
                        add_branch(&mut rec, &branch, Some(ls), None, &x, bs, d);
                    }
                }
            }
            block.ln1.encode(&mut rec, &x, &hbuf, bs);
            match &block.ffn {
                Ffn::Dense(mlp) => match scale(1) {
                    None => mlp.encode(&mut rec, &hbuf, &mlp_h, &x, 1, 1, bs, true),
                    Some(ls) => {
                        mlp.encode(&mut rec, &hbuf, &mlp_h, &branch, 1, 1, bs, false);
                        add_branch(&mut rec, &branch, Some(ls), None, &x, bs, d);
                    }
                },
                Ffn::Moe(moe) => {
                    let li = out.records.len() + pending.len();
                    let saved = storage(device, "moe input", bs * d);
                    rec.copy(&x, &saved, bs * d);
                    residuals.push(saved);
                    let router = &out.options.routers[li];
                    let finish = scale(1).is_some() || moe.unit_bias.is_some();
                    let p = encode_moe(
                        &mut rec,
                        &mut ws,
                        moe,
                        li,
                        &hbuf,
                        if finish { &branch } else { &x },
                        !finish,
                        router,
                        b,
                        s,
                        out.options.group_images,
                        cfg.moe.as_ref().is_some_and(|m| m.bfloat16_dispatch),
                        cpu_sinkhorn.contains(&li),
                    )?;
                    if finish {
                        add_branch(
                            &mut rec,
                            &branch,
                            scale(1),
                            moe.unit_bias.as_ref(),
                            &x,
                            bs,
                            d,
                        );
                    }
                    pending.push(p);
                }
            }
        }
        // The features: the final LayerNorm of every token, or with timm's `fc_norm` the last
        // block's output (the LayerNorm then normalises the pooled vector instead).
        let features = match cfg.fc_norm {
            true => &x,
            false => {
                self.encoder_norm.encode(&mut rec, &x, &hbuf, bs);
                &hbuf
            }
        };
        let classes = cfg.num_classes;
        let probs = match &self.head {
            None => None,
            Some(head) => {
                let pool = |rec: &mut Recorder<'_>, ws: &mut Workspace, name: &str, mode, token| {
                    let pooled = ws.get(device, name, b * d);
                    rec.launch(
                        Kernel::Pool,
                        &embed_params(cfg, b, mode, token),
                        &[features, features, features, &pooled],
                        flat_groups(b * d),
                    );
                    match cfg.fc_norm {
                        false => pooled,
                        true => {
                            let normed = ws.get(device, &format!("{name}.normed"), b * d);
                            self.encoder_norm.encode(rec, &pooled, &normed, b);
                            normed
                        }
                    }
                };
                let mode = match cfg.classifier {
                    Classifier::Token => 0,
                    Classifier::Gap => 1,
                };
                let pooled = pool(&mut rec, &mut ws, "pooled", mode, 0);
                let rep = match &self.pre_logits {
                    Some(p) => {
                        let r = ws.get(device, "pre_logits", b * p.fan_out);
                        p.encode(&mut rec, &pooled, &r, b, Activation::Tanh, false);
                        r
                    }
                    None => pooled,
                };
                let logits = ws.get(device, "logits", b * classes);
                head.encode(&mut rec, &rep, &logits, b, Activation::None, false);
                if let Some(hd) = &self.head_dist {
                    // DeiT: the distillation token (token 1) through its own head, added to the
                    // halved CLS head's logits.
                    let dist = pool(&mut rec, &mut ws, "pooled_dist", 0, 1);
                    hd.encode(&mut rec, &dist, &logits, b, Activation::None, true);
                }
                let probs = ws.get(device, "probs", b * classes);
                rec.launch(
                    Kernel::SoftmaxRows,
                    &[b as u32, classes as u32, 0, 0],
                    &[&logits, &probs],
                    row_groups(b),
                );
                Some(probs)
            }
        };

        let mut reads: Vec<(&wgpu::Buffer, usize)> = vec![(features, bs * d)];
        if let Some(p) = &probs {
            reads.push((p, b * classes));
        }
        for p in &pending {
            reads.extend(p.reads());
        }
        let mut words = rec.read(&reads)?.into_iter();
        if let Ok(mut s) = self.last_stats.lock() {
            *s = rec.stats;
        }
        let features = as_f32(words.next().unwrap_or_default());
        out.features = features.chunks_exact(s * d).map(<[f32]>::to_vec).collect();
        out.probs = match probs {
            Some(_) => as_f32(words.next().unwrap_or_default())
                .chunks_exact(classes)
                .map(<[f32]>::to_vec)
                .collect(),
            None => vec![Vec::new(); b],
        };
        let mut failed = Vec::new();
        for p in pending {
            let n = p.reads().len();
            let layer_words: Vec<Vec<u32>> = words.by_ref().take(n).collect();
            match finish_layer(p, layer_words)? {
                Ok(record) => out.records.push(record),
                Err(layer) => failed.push(layer),
            }
        }
        Ok((!failed.is_empty()).then_some(failed))
    }
}

impl Forward for GpuVitMoe {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn check_options(&self, opts: &RunOptions, batch: usize) -> Result<(), ModelError> {
        check_run_options(&self.config, |n| self.param_names.contains(n), opts, batch)
    }
    fn forward(&self, images: &[Vec<f32>], opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        Ok(GpuVitMoe::forward(self, images, opts)?)
    }
}

/// The parameters of `shaders/embed.wgsl` for a batch of `b` images; `mode` and `token` say
/// what `pool` reads.
fn embed_params(cfg: &ModelConfig, b: usize, mode: u32, token: u32) -> [u32; 16] {
    let [h, w] = cfg.image_size;
    let [ph, pw] = cfg.patch_size;
    let [gh, gw] = cfg.grid();
    let u = |v: usize| v as u32;
    [
        u(b),
        u(h),
        u(w),
        u(cfg.channels),
        u(ph),
        u(pw),
        u(gh),
        u(gw),
        u(cfg.seq_len()),
        u(cfg.hidden_size),
        u(cfg.prefix().count()),
        mode,
        token,
        0,
        0,
        0,
    ]
}

/// Tensor `name`, which must hold `len` values (a per-channel vector).
fn vector<'a>(weights: &'a ModelWeights, name: &str, len: usize) -> Result<&'a [f32], ModelError> {
    let t = get(weights, name)?;
    if t.len() != len {
        return Err(ModelError::Tensor(format!(
            "`{name}` has {} values, expected {len}",
            t.len()
        )));
    }
    Ok(t)
}

/// Whether the GPU backend computed `out` (so a what-if from it resumes on the GPU).
pub fn computed_on_gpu(out: &ForwardOutput) -> bool {
    out.backend_state::<GpuResume>().is_some()
}
