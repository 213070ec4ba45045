//! The ViT-MoE forward pass on the GPU, step for step the candle model of `crate::model::vit`:
//! weights are uploaded once (the query, key and value kernels side by side as one matrix), and a
//! run records every kernel into one command buffer (split only where the host solves a
//! sparsity-constrained plan), with all launch parameters in one uniform arena, and reads back
//! once at the end. Per-run buffers live in a workspace that is reused while the batch shape
//! stays the same. The residual stream entering each MoE layer is
//! kept on the GPU, so a router what-if restarts at the first MoE layer whose routing changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use eframe::egui_wgpu::wgpu;

use super::context::{GpuContext, GpuError};
use super::kernels::{
    Activation, Kernel, Matmul, ParamArena, as_f32, flat_groups, row_groups, storage, upload,
};
use super::moe::{LayerPending, MoeWeights, SoftWeights, encode_moe, finish_layer};
use crate::model::vit::{Resume, check_run_options};
use crate::model::{
    Classifier, ForwardOutput, ModelConfig, ModelError, ModelWeights, RunOptions, block_prefix,
};

const LN_EPS: f32 = 1e-6;
/// Keys one attention workgroup can hold (`MAX_S` in `shaders/attention.wgsl`).
pub const MAX_TOKENS: usize = 1024;

fn get<'a>(weights: &'a ModelWeights, name: &str) -> Result<&'a [f32], ModelError> {
    weights
        .get(name)
        .map(|t| t.data.as_slice())
        .ok_or_else(|| ModelError::Tensor(format!("missing tensor `{name}`")))
}

pub(crate) struct Linear {
    pub w: wgpu::Buffer,
    pub b: wgpu::Buffer,
    pub fan_in: usize,
    pub fan_out: usize,
}

impl Linear {
    fn load(
        device: &wgpu::Device,
        weights: &ModelWeights,
        prefix: &str,
        fan_in: usize,
        fan_out: usize,
    ) -> Result<Self, ModelError> {
        let w = get(weights, &format!("{prefix}/kernel"))?;
        let b = get(weights, &format!("{prefix}/bias"))?;
        Self::from_parts(device, prefix, w, b, fan_in, fan_out)
    }

    fn from_parts(
        device: &wgpu::Device,
        label: &str,
        w: &[f32],
        b: &[f32],
        fan_in: usize,
        fan_out: usize,
    ) -> Result<Self, ModelError> {
        if w.len() != fan_in * fan_out || b.len() != fan_out {
            return Err(ModelError::Tensor(format!(
                "`{label}`: kernel has {} values and bias {}, expected {fan_in}x{fan_out} and {fan_out}",
                w.len(),
                b.len()
            )));
        }
        Ok(Self {
            w: upload(device, label, w),
            b: upload(device, label, b),
            fan_in,
            fan_out,
        })
    }

    /// `out (+)= act(x @ W + b)` for `rows` rows.
    pub fn encode(
        &self,
        rec: &mut Recorder<'_>,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        rows: usize,
        act: Activation,
        accumulate: bool,
    ) {
        let mut mm = Matmul::plain(rows, self.fan_in, self.fan_out)
            .with_bias()
            .act(act);
        mm.accumulate = accumulate;
        rec.matmul(mm, x, &self.w, Some(&self.b), out);
    }
}

struct LayerNorm {
    scale: wgpu::Buffer,
    bias: wgpu::Buffer,
    d: usize,
}

impl LayerNorm {
    fn load(
        device: &wgpu::Device,
        weights: &ModelWeights,
        prefix: &str,
        d: usize,
    ) -> Result<Self, ModelError> {
        let scale = get(weights, &format!("{prefix}/scale"))?;
        let bias = get(weights, &format!("{prefix}/bias"))?;
        if scale.len() != d || bias.len() != d {
            return Err(ModelError::Tensor(format!(
                "`{prefix}`: expected {d} scales and biases"
            )));
        }
        Ok(Self {
            scale: upload(device, prefix, scale),
            bias: upload(device, prefix, bias),
            d,
        })
    }

    fn encode(&self, rec: &mut Recorder<'_>, x: &wgpu::Buffer, y: &wgpu::Buffer, rows: usize) {
        rec.launch(
            Kernel::LayerNorm,
            &[rows as u32, self.d as u32, LN_EPS.to_bits(), 0],
            &[x, &self.scale, &self.bias, y],
            row_groups(rows),
        );
    }
}

/// `num` stacked `Dense_0 → GELU → Dense_1` MLPs.
pub(crate) struct Mlp {
    pub w0: wgpu::Buffer,
    pub b0: wgpu::Buffer,
    pub w1: wgpu::Buffer,
    pub b1: wgpu::Buffer,
    pub dim: usize,
    pub hidden: usize,
}

impl Mlp {
    fn load(
        device: &wgpu::Device,
        weights: &ModelWeights,
        prefix: &str,
        num: usize,
        cfg: &ModelConfig,
    ) -> Result<Self, ModelError> {
        let (d, m) = (cfg.hidden_size, cfg.mlp_dim);
        let part = |name: &str, len: usize| -> Result<wgpu::Buffer, ModelError> {
            let full = format!("{prefix}/{name}");
            let data = get(weights, &full)?;
            if data.len() != len {
                return Err(ModelError::Tensor(format!(
                    "`{full}` has {} values, expected {len}",
                    data.len()
                )));
            }
            Ok(upload(device, &full, data))
        };
        Ok(Self {
            w0: part("Dense_0/kernel", num * d * m)?,
            b0: part("Dense_0/bias", num * m)?,
            w1: part("Dense_1/kernel", num * m * d)?,
            b1: part("Dense_1/bias", num * d)?,
            dim: d,
            hidden: m,
        })
    }

    /// `out (+)= MLP_j(x_j)` over `outer × num` batches of `rows` rows; `x` is
    /// `[outer, num, rows, d]`, MLP `j` serves batch `(·, j)`. `hidden` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        rec: &mut Recorder<'_>,
        x: &wgpu::Buffer,
        hidden: &wgpu::Buffer,
        out: &wgpu::Buffer,
        outer: usize,
        num: usize,
        rows: usize,
        accumulate: bool,
    ) {
        let (d, m) = (self.dim, self.hidden);
        let up = Matmul {
            outer,
            inner: num,
            a_so: num * rows * d,
            a_si: rows * d,
            b_si: d * m,
            c_so: num * rows * m,
            c_si: rows * m,
            bias_si: m,
            ..Matmul::plain(rows, d, m).with_bias().act(Activation::Gelu)
        };
        rec.matmul(up, x, &self.w0, Some(&self.b0), hidden);
        let mut down = Matmul {
            outer,
            inner: num,
            a_so: num * rows * m,
            a_si: rows * m,
            b_si: m * d,
            c_so: num * rows * d,
            c_si: rows * d,
            bias_si: d,
            ..Matmul::plain(rows, m, d).with_bias()
        };
        down.accumulate = accumulate;
        rec.matmul(down, hidden, &self.w1, Some(&self.b1), out);
    }
}

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
}

/// Records kernels into a command encoder; a host read submits what is recorded so far.
pub(crate) struct Recorder<'a> {
    pub ctx: &'a GpuContext,
    encoder: Option<wgpu::CommandEncoder>,
    params: ParamArena,
}

impl<'a> Recorder<'a> {
    pub fn new(ctx: &'a GpuContext) -> Self {
        Self {
            ctx,
            encoder: None,
            params: ParamArena::new(&ctx.device),
        }
    }

    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder.get_or_insert_with(|| {
            self.ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") })
        })
    }

    pub fn launch(
        &mut self,
        k: Kernel,
        params: &[u32],
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) {
        let ctx = self.ctx;
        let enc = self.encoder.get_or_insert_with(|| {
            ctx.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") })
        });
        let binding = self.params.push(&ctx.device, params);
        ctx.kernels
            .launch_with(&ctx.device, enc, k, binding, buffers, groups);
    }

    pub fn matmul(
        &mut self,
        mm: Matmul,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
        c: &wgpu::Buffer,
    ) {
        let (kernel, params, groups) = mm.params(self.ctx.tiled_matmul);
        let unused = &self.ctx.kernels.dummy;
        self.launch(kernel, &params, &[a, b, bias.unwrap_or(unused), c], groups);
    }

    pub fn copy(&mut self, src: &wgpu::Buffer, dst: &wgpu::Buffer, len: usize) {
        self.encoder()
            .copy_buffer_to_buffer(src, 0, dst, 0, (len * 4) as u64);
    }

    /// Submits everything recorded and reads `len` words of each buffer.
    pub fn read(&mut self, reads: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<u32>>, GpuError> {
        let enc = match self.encoder.take() {
            Some(e) => e,
            None => self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("read"),
                }),
        };
        self.params.flush(&self.ctx.queue);
        super::kernels::read_words(&self.ctx.device, &self.ctx.queue, enc, reads)
    }
}

/// Per-run buffers by name, reused while they are large enough.
#[derive(Default)]
pub(crate) struct Workspace {
    buffers: HashMap<String, (wgpu::Buffer, usize)>,
}

impl Workspace {
    /// A buffer of at least `len` values named `name` (its contents are undefined).
    pub fn get(&mut self, device: &wgpu::Device, name: &str, len: usize) -> wgpu::Buffer {
        let len = len.max(4);
        match self.buffers.get(name) {
            Some((b, have)) if *have >= len => b.clone(),
            _ => {
                let b = storage(device, name, len);
                self.buffers.insert(name.to_string(), (b.clone(), len));
                b
            }
        }
    }
}

/// A ViT-MoE resident on a GPU.
pub struct GpuVitMoe {
    ctx: GpuContext,
    pub config: ModelConfig,
    param_names: BTreeSet<String>,
    embedding: Linear,
    cls: Option<wgpu::Buffer>,
    pos_embedding: wgpu::Buffer,
    blocks: Vec<Block>,
    encoder_norm: LayerNorm,
    pre_logits: Option<Linear>,
    head: Linear,
    workspace: Mutex<Workspace>,
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
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let cfg = config;
        if cfg.seq_len() > MAX_TOKENS {
            return Err(GpuError::Model(format!(
                "{} tokens per image; the attention kernel holds at most {MAX_TOKENS}",
                cfg.seq_len()
            ))
            .into());
        }
        let device = &ctx.device;
        let limit = device.limits().max_storage_buffer_binding_size as usize;
        if let Some((name, t)) = weights.iter().find(|(_, t)| t.data.len() * 4 > limit) {
            return Err(GpuError::Model(format!(
                "tensor `{name}` takes {} MiB ({} bytes); `{}` binds at most {} bytes per buffer",
                (t.data.len() * 4) >> 20,
                t.data.len() * 4,
                ctx.info.name,
                limit
            ))
            .into());
        }
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let d = cfg.hidden_size;
        let [ph, pw] = cfg.patch_size;
        let embedding = Linear::load(device, weights, "embedding", ph * pw * cfg.channels, d)?;
        let cls = match cfg.classifier {
            Classifier::Token => Some(upload(device, "cls", get(weights, "cls")?)),
            Classifier::Gap => None,
        };
        let pos = get(weights, "Encoder/posembed_input/pos_embedding")?;
        if pos.len() != cfg.seq_len() * d {
            return Err(ModelError::Tensor(format!(
                "`Encoder/posembed_input/pos_embedding` has {} values, expected {}x{d}",
                pos.len(),
                cfg.seq_len()
            )));
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
                    )));
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
                None => Ffn::Dense(Mlp::load(device, weights, &format!("{b}/Mlp"), 1, cfg)?),
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
                    Ffn::Moe(MoeWeights {
                        block: i,
                        num_experts: e,
                        router_kernel,
                        soft,
                        experts: Mlp::load(device, weights, &format!("{b}/Moe/Mlp"), e, cfg)?,
                    })
                }
            };
            blocks.push(Block {
                ln0: LayerNorm::load(device, weights, &format!("{b}/LayerNorm_0"), d)?,
                qkv,
                out: Linear::load(device, weights, &format!("{att}/out"), hd, d)?,
                ln1: LayerNorm::load(device, weights, &format!("{b}/LayerNorm_1"), d)?,
                ffn,
            });
        }
        let encoder_norm = LayerNorm::load(device, weights, "Encoder/encoder_norm", d)?;
        let (pre_logits, head_in) = match cfg.representation_size {
            Some(r) => (Some(Linear::load(device, weights, "pre_logits", d, r)?), r),
            None => (None, d),
        };
        let head = Linear::load(device, weights, "head", head_in, cfg.num_classes)?;
        let errors = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
        ];
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(GpuError::Device(format!("uploading the weights: {e}")).into());
        }
        Ok(Self {
            ctx: ctx.clone(),
            config: config.clone(),
            param_names: weights.keys().cloned().collect(),
            embedding,
            cls,
            pos_embedding,
            blocks,
            encoder_norm,
            pre_logits,
            head,
            workspace: Mutex::new(Workspace::default()),
        })
    }

    /// Destroys a weight buffer, so that the next run fails like a lost device would.
    #[cfg(test)]
    pub(crate) fn poison_for_test(&self) {
        self.head.w.destroy();
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Full forward pass, as [`VitMoe::forward`](crate::model::VitMoe::forward).
    pub fn forward(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        let cfg = &self.config;
        let b = images.len();
        if b == 0 {
            return Err(ModelError::Config("no images to run".into()));
        }
        check_run_options(cfg, |n| self.param_names.contains(n), opts, b)?;
        let [h, w] = cfg.image_size;
        let px = h * w * cfg.channels;
        if let Some((i, img)) = images.iter().enumerate().find(|(_, img)| img.len() != px) {
            return Err(ModelError::Image(format!(
                "image {i} has {} values, expected {h}x{w}x{} = {px}",
                img.len(),
                cfg.channels
            )));
        }
        let out = ForwardOutput {
            probs: Vec::new(),
            records: Vec::new(),
            options: opts.clone(),
            inputs: images.into(),
            resume: Resume::Gpu(Vec::new()),
        };
        self.run(out, None, &[])
    }

    /// A what-if, as [`VitMoe::rerun`](crate::model::VitMoe::rerun); an output computed on
    /// another backend is recomputed from its images.
    pub fn rerun(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        let batch = prev.probs.len();
        check_run_options(&self.config, |n| self.param_names.contains(n), opts, batch)?;
        let Some(first) = opts.first_change_from(&prev.options) else {
            return Ok(ForwardOutput {
                options: opts.clone(),
                ..prev.clone()
            });
        };
        let Resume::Gpu(saved) = &prev.resume else {
            // Computed on the CPU: start over here from the same images.
            return self.forward(&prev.inputs, opts);
        };
        let out = ForwardOutput {
            probs: Vec::new(),
            records: prev.records[..first].to_vec(),
            options: opts.clone(),
            inputs: prev.inputs.clone(),
            resume: Resume::Gpu(saved[..first].to_vec()),
        };
        self.run(out, Some((first, saved[first].clone())), &[])
    }

    /// Runs from the input (`resume` = None) or from MoE layer `resume.0` with its saved residual.
    /// `cpu_sinkhorn` lists MoE layers whose Sinkhorn plan must be computed on the host (the
    /// GPU's kernel-mode iterations failed there on an earlier try).
    fn run(
        &self,
        mut out: ForwardOutput,
        resume: Option<(usize, wgpu::Buffer)>,
        cpu_sinkhorn: &[usize],
    ) -> Result<ForwardOutput, ModelError> {
        let template = out.clone();
        let device = &self.ctx.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = self.encode_run(&mut out, resume.clone(), cpu_sinkhorn);
        let errors = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
        ];
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(GpuError::Command(e.to_string()).into());
        }
        match result? {
            Some(failed) => {
                // Retry with those layers' plans from the host (spec §5.8 log-domain fallback).
                let mut layers = cpu_sinkhorn.to_vec();
                layers.extend(failed);
                self.run(template, resume, &layers)
            }
            None => Ok(out),
        }
    }

    /// Records and runs the blocks; `Some(layers)` when Sinkhorn kernel mode failed in those MoE
    /// layers and the run must be repeated.
    fn encode_run(
        &self,
        out: &mut ForwardOutput,
        resume: Option<(usize, wgpu::Buffer)>,
        cpu_sinkhorn: &[usize],
    ) -> Result<Option<Vec<usize>>, ModelError> {
        let cfg = &self.config;
        let ctx = &self.ctx;
        let device = &ctx.device;
        let b = out.inputs.len();
        let (s, d) = (cfg.seq_len(), cfg.hidden_size);
        let bs = b * s;
        let mut ws = self.workspace.lock().map_err(|_| {
            GpuError::Model("the GPU workspace was poisoned by a failed run".into())
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
                let params = [
                    b as u32,
                    h as u32,
                    w as u32,
                    c as u32,
                    ph as u32,
                    pw as u32,
                    gh as u32,
                    gw as u32,
                    s as u32,
                    d as u32,
                    u32::from(self.cls.is_some()),
                    0,
                ];
                rec.launch(
                    Kernel::Patchify,
                    &params,
                    &[&img, &img, &img, &patches],
                    flat_groups(b * np * pin),
                );
                self.embedding
                    .encode(&mut rec, &patches, &emb, b * np, Activation::None, false);
                let cls = self.cls.as_ref().unwrap_or(&emb);
                rec.launch(
                    Kernel::Assemble,
                    &params,
                    &[&emb, cls, &self.pos_embedding, &x],
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

        let mut pending: Vec<LayerPending> = Vec::new();
        for (i, block) in self.blocks.iter().enumerate().skip(start) {
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
                block
                    .out
                    .encode(&mut rec, &att, &x, bs, Activation::None, true);
            }
            block.ln1.encode(&mut rec, &x, &hbuf, bs);
            match &block.ffn {
                Ffn::Dense(mlp) => mlp.encode(&mut rec, &hbuf, &mlp_h, &x, 1, 1, bs, true),
                Ffn::Moe(moe) => {
                    let li = out.records.len() + pending.len();
                    let saved = storage(device, "moe input", bs * d);
                    rec.copy(&x, &saved, bs * d);
                    if let Resume::Gpu(v) = &mut out.resume {
                        v.push(saved);
                    }
                    let router = &out.options.routers[li];
                    let p = encode_moe(
                        &mut rec,
                        &mut ws,
                        moe,
                        li,
                        &hbuf,
                        &x,
                        router,
                        b,
                        s,
                        out.options.group_images,
                        cfg.moe.as_ref().is_some_and(|m| m.bfloat16_dispatch),
                        cpu_sinkhorn.contains(&li),
                    )?;
                    pending.push(p);
                }
            }
        }
        self.encoder_norm.encode(&mut rec, &x, &hbuf, bs);
        let pooled = ws.get(device, "pooled", b * d);
        let mode = match cfg.classifier {
            Classifier::Token => 0,
            Classifier::Gap => 1,
        };
        let mut params = [0u32; 12];
        params[0] = b as u32;
        params[8] = s as u32;
        params[9] = d as u32;
        params[11] = mode;
        rec.launch(
            Kernel::Pool,
            &params,
            &[&hbuf, &hbuf, &hbuf, &pooled],
            flat_groups(b * d),
        );
        let rep = match &self.pre_logits {
            Some(p) => {
                let r = ws.get(device, "pre_logits", b * p.fan_out);
                p.encode(&mut rec, &pooled, &r, b, Activation::Tanh, false);
                r
            }
            None => pooled,
        };
        let classes = cfg.num_classes;
        let logits = ws.get(device, "logits", b * classes);
        self.head
            .encode(&mut rec, &rep, &logits, b, Activation::None, false);
        let probs = ws.get(device, "probs", b * classes);
        rec.launch(
            Kernel::SoftmaxRows,
            &[b as u32, classes as u32, 0, 0],
            &[&logits, &probs],
            row_groups(b),
        );

        let mut reads: Vec<(&wgpu::Buffer, usize)> = vec![(&probs, b * classes)];
        for p in &pending {
            reads.extend(p.reads());
        }
        let mut words = rec.read(&reads)?.into_iter();
        let probs = as_f32(words.next().unwrap_or_default());
        out.probs = probs.chunks_exact(classes).map(<[f32]>::to_vec).collect();
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
