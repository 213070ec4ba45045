//! One MoE layer on the GPU: router logits, the router (softmax, Sinkhorn, Token Choice slotting,
//! Expert Choice selection, Soft MoE weights), tokens into expert slots, all experts of all groups
//! in one batched matmul pair, and the combine back into the residual stream. After the run, the
//! read-back matrices become the same [`RoutingResult`]s the CPU routers produce.
//!
//! The sparsity-constrained OT solver (SCOT) runs on the host: its per-column sparse simplex
//! projection is a sort per column per Adam step, a poor fit for a GPU at these sizes, and it is
//! tiny (`n × e`); the host reads the logits, solves on their softmax exactly as `route_logits`
//! does, and uploads the plan; selection, dispatch and combine stay on the GPU. Sinkhorn runs on the GPU in kernel mode; a group whose
//! iterations fail (spec §5.8) is re-solved on the host in the log domain and the layer re-run.

use super::error::GpuError;
use super::kernels::{Kernel, Matmul, as_f32, as_i32, flat_groups, row_groups, upload};
use super::layers::Mlp;
use super::recorder::{Recorder, Workspace};
use crate::model::{GroupRecord, ModelError, MoeLayerRecord};
use crate::routing::expert_choice::expert_choice_assignment;
use crate::routing::ops::softmax_rows;
use crate::routing::router::{check_finite, check_sparse_config, sparse_plan, token_choice_aux};
use crate::routing::{
    Assignment, AuxLosses, CapacitySpec, Choice, RouterConfig, RouterFamily, RouterKind,
    RoutingResult, SoftAssignment, SolverInfo, SparseAssignment, sinkhorn_iterations,
    sinkhorn_plan,
};

/// `eps` inside the square root of vmoe's `normalize` (as `routing::soft_moe`).
const NORM_EPS: f32 = 1e-6;

/// Soft MoE router parameters: `mu` l2-normalised per slot (once, at upload) and the scale.
pub(crate) struct SoftWeights {
    mu: wgpu::Buffer,
    slots: usize,
    scale: f32,
}

impl SoftWeights {
    /// `mu` is `[d, e, p]` row-major.
    pub fn new(
        device: &wgpu::Device,
        mu: &[f32],
        d: usize,
        e: usize,
        p: usize,
        scale: f32,
    ) -> Self {
        let ep = e * p;
        let mut inv = vec![0.0f32; ep];
        for row in mu.chunks_exact(ep) {
            for (acc, &v) in inv.iter_mut().zip(row) {
                *acc += v * v;
            }
        }
        for v in inv.iter_mut() {
            *v = 1.0 / (*v + NORM_EPS).sqrt();
        }
        let mut normalized = mu.to_vec();
        for row in normalized.chunks_exact_mut(ep) {
            for (v, &m) in row.iter_mut().zip(&inv) {
                *v *= m;
            }
        }
        debug_assert_eq!(mu.len(), d * ep);
        Self {
            mu: upload(device, "mu", &normalized),
            slots: p,
            scale,
        }
    }
}

pub(crate) struct MoeWeights {
    pub block: usize,
    pub num_experts: usize,
    pub router_kernel: Option<wgpu::Buffer>,
    pub soft: Option<SoftWeights>,
    pub experts: Mlp,
    /// `Some(Moe/bias)` under unit combine: every gate is 1, the bias is added once per token
    /// (by the caller, with the LayerScale).
    pub unit_bias: Option<wgpu::Buffer>,
}

/// What a layer left on the GPU to read back, and how to turn it into records.
pub(crate) struct LayerPending {
    layer: usize,
    block: usize,
    router: RouterConfig,
    n: usize,
    e: usize,
    c: usize,
    capacity_tokens: usize,
    groups: usize,
    group_images: usize,
    buffers: Vec<(wgpu::Buffer, usize)>,
    /// Solver results computed on the host (SCOT, or Sinkhorn's log-domain fallback).
    host_solver: Vec<SolverInfo>,
    /// Sinkhorn ran on the GPU: its status words are the last buffer.
    gpu_sinkhorn: bool,
}

impl LayerPending {
    pub fn reads(&self) -> Vec<(&wgpu::Buffer, usize)> {
        self.buffers.iter().map(|(b, n)| (b, *n)).collect()
    }
}

/// Records MoE layer `layer` (encoder block `moe.block`) on `h = LN_1(x)` `[b·s, d]`: its
/// output is added to the residual stream `x` (`accumulate`), or written to `x` as a branch
/// for the caller to finish.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_moe(
    rec: &mut Recorder<'_>,
    ws: &mut Workspace,
    moe: &MoeWeights,
    layer: usize,
    h: &wgpu::Buffer,
    x: &wgpu::Buffer,
    accumulate: bool,
    router: &RouterConfig,
    b: usize,
    s: usize,
    group_images: usize,
    bf16: bool,
    host_sinkhorn: bool,
) -> Result<LayerPending, GpuError> {
    let device = rec.ctx.device.clone();
    let device = &device;
    let (d, m, e) = (moe.experts.dim, moe.experts.hidden, moe.num_experts);
    let n = group_images * s;
    let groups = b / group_images;
    let bs = b * s;
    let name = |what: &str| format!("layer{layer}.{what}");
    let u = |v: usize| v as u32;
    let mut pending = LayerPending {
        layer,
        block: moe.block,
        router: router.clone(),
        n,
        e,
        c: 0,
        capacity_tokens: 0,
        groups,
        group_images,
        buffers: Vec::new(),
        host_solver: Vec::new(),
        gpu_sinkhorn: false,
    };

    if router.kind.family() == RouterFamily::Soft {
        let soft = moe.soft.as_ref().ok_or_else(|| {
            ModelError::Config(format!("block {}: no Soft MoE parameters", moe.block))
        })?;
        let cfg = RouterConfig {
            capacity: CapacitySpec::Slots(soft.slots),
            ..router.clone()
        };
        let (c, capacity_tokens) = cfg.capacity_for(n, e)?;
        pending.c = c;
        pending.capacity_tokens = capacity_tokens;
        pending.router = cfg;
        let ep = e * c;
        let xn = ws.get(device, "moe.xn", bs * d);
        rec.launch(
            Kernel::L2NormalizeRows,
            &[u(bs * d), u(d), NORM_EPS.to_bits(), 0],
            &[h, &xn],
            flat_groups(bs),
        );
        let logits = ws.get(device, &name("logits"), bs * ep);
        let mut mm = Matmul::plain(bs, d, ep);
        mm.alpha = soft.scale;
        rec.matmul(mm, &xn, &soft.mu, None, &logits);
        let combine = ws.get(device, &name("combine"), bs * ep);
        rec.launch(
            Kernel::SoftmaxRows,
            &[u(bs), u(ep), 0, 0],
            &[&logits, &combine],
            row_groups(bs),
        );
        let dispatch_t = ws.get(device, &name("dispatch_t"), groups * ep * n);
        rec.launch(
            Kernel::SoftmaxColumnsT,
            &[0, u(ep), u(n), u(groups)],
            &[&logits, &dispatch_t],
            flat_groups(groups * ep),
        );
        let xr = if bf16 {
            let xr = ws.get(device, "moe.x_bf16", bs * d);
            rec.launch(
                Kernel::RoundBf16,
                &[u(bs * d), 0, 0, 0],
                &[h, &xr],
                flat_groups(bs * d),
            );
            xr
        } else {
            h.clone()
        };
        let slots = ws.get(device, "moe.slots", groups * ep * d);
        let gather = Matmul {
            outer: groups,
            a_so: ep * n,
            b_so: n * d,
            c_so: ep * d,
            ..Matmul::plain(ep, n, d)
        };
        rec.matmul(gather, &dispatch_t, &xr, None, &slots);
        let hidden = ws.get(device, "moe.hidden", groups * ep * m);
        let out = ws.get(device, "moe.out", groups * ep * d);
        moe.experts
            .encode(rec, &slots, &hidden, &out, groups, e, c, false);
        let out = if bf16 {
            let r = ws.get(device, "moe.out_bf16", groups * ep * d);
            rec.launch(
                Kernel::RoundBf16,
                &[u(groups * ep * d), 0, 0, 0],
                &[&out, &r],
                flat_groups(groups * ep * d),
            );
            r
        } else {
            out
        };
        let back = Matmul {
            outer: groups,
            a_so: n * ep,
            b_so: ep * d,
            c_so: n * d,
            accumulate,
            ..Matmul::plain(n, ep, d)
        };
        rec.matmul(back, &combine, &out, None, x);
        pending.buffers = vec![
            (logits, bs * ep),
            (dispatch_t, groups * ep * n),
            (combine, bs * ep),
        ];
        return Ok(pending);
    }

    let kernel = moe
        .router_kernel
        .as_ref()
        .ok_or_else(|| ModelError::Config(format!("block {}: no router kernel", moe.block)))?;
    let (c, capacity_tokens) = check_sparse_config(router, n, e)?;
    let k = router.experts_per_token();
    pending.c = c;
    pending.capacity_tokens = capacity_tokens;
    let logits = ws.get(device, &name("logits"), bs * e);
    rec.matmul(Matmul::plain(bs, d, e), h, kernel, None, &logits);
    let probs = ws.get(device, &name("probs"), bs * e);
    rec.launch(
        Kernel::SoftmaxRows,
        &[u(bs), u(e), 0, 0],
        &[&logits, &probs],
        row_groups(bs),
    );
    let mut status = None;
    let scores = match router.kind {
        RouterKind::SoftmaxTokenChoice | RouterKind::SoftmaxExpertChoice => probs.clone(),
        RouterKind::SinkhornTokenChoice | RouterKind::SinkhornExpertChoice if !host_sinkhorn => {
            let plan = ws.get(device, &name("plan"), bs * e);
            let uu = ws.get(device, "moe.sinkhorn_u", bs);
            let vv = ws.get(device, "moe.sinkhorn_v", groups * e);
            let st = ws.get(device, &name("status"), groups);
            let beta = (n as f64 / e as f64) as f32;
            rec.launch(
                Kernel::Sinkhorn,
                &[
                    u(n),
                    u(e),
                    u(sinkhorn_iterations(router.max_iterations)),
                    beta.to_bits(),
                ],
                &[&logits, &plan, &uu, &vv, &st],
                [u(groups), 1, 1],
            );
            pending.gpu_sinkhorn = true;
            status = Some(st);
            plan
        }
        _ => {
            // Host solver: Sinkhorn's log-domain fallback, or the SCOT routers. Both start from the
            // logits (SCOT from their softmax computed here, exactly as `route_logits` does), so
            // the host plan is the CPU router's plan for these logits, bit for bit.
            let sinkhorn = router.kind.has_solver() && !router.kind.uses_adam();
            let words = rec.read(&[(&logits, bs * e)])?;
            let values = as_f32(words.into_iter().next().unwrap_or_default());
            let mut plan = Vec::with_capacity(bs * e);
            for g in 0..groups {
                let part = &values[g * n * e..(g + 1) * n * e];
                check_finite("logits", part, e)?;
                if sinkhorn {
                    let p = sinkhorn_plan(part, n, e, router.max_iterations);
                    pending.host_solver.push(SolverInfo {
                        iterations: p.iterations,
                        converged: false,
                        log_domain: p.log_domain,
                    });
                    plan.extend(p.plan);
                } else {
                    let (p, info) = sparse_plan(router, &softmax_rows(part, e), n, e, c);
                    pending.host_solver.push(info);
                    plan.extend(p);
                }
            }
            let buf = ws.get(device, &name("plan"), bs * e);
            rec.ctx
                .queue
                .write_buffer(&buf, 0, bytemuck::cast_slice(&plan));
            buf
        }
    };
    let gates = if router.use_softmax_combine_weights {
        probs.clone()
    } else {
        scores.clone()
    };

    let slot_token = ws.get(device, &name("slot_token"), groups * e * c);
    let table = ws.get(device, "moe.table", bs * e);
    let mut extra = Vec::new();
    if router.kind.family() == RouterFamily::TokenChoice {
        let chosen = ws.get(device, &name("chosen"), bs * k);
        let order = ws.get(device, "moe.order", bs);
        let choice_slot = ws.get(device, &name("choice_slot"), bs * k);
        let requests = ws.get(device, &name("requests"), groups * e);
        let params = [
            u(n),
            u(e),
            u(k),
            u(c),
            u(groups),
            u32::from(router.batch_priority),
            0,
            0,
        ];
        let bufs = [
            &scores,
            &chosen,
            &order,
            &choice_slot,
            &slot_token,
            &table,
            &requests,
        ];
        rec.launch(Kernel::TopK, &params, &bufs, flat_groups(bs));
        rec.launch(Kernel::OrderTokens, &params, &bufs, flat_groups(bs));
        rec.launch(
            Kernel::TokenChoiceSlots,
            &params,
            &bufs,
            flat_groups(groups * e),
        );
        extra = vec![
            (chosen, bs * k),
            (choice_slot, bs * k),
            (requests, groups * e),
        ];
    } else {
        rec.launch(
            Kernel::ExpertChoiceSelect,
            &[u(n), u(e), u(c), u(groups)],
            &[&scores, &slot_token, &table],
            flat_groups(bs * e),
        );
    }
    let slots = ws.get(device, "moe.slots", groups * e * c * d);
    let params = [u(n), u(e), u(c), u(d), u(groups), u32::from(bf16), 0, 0];
    rec.launch(
        Kernel::Gather,
        &params,
        &[h, &slot_token, &gates, &slots],
        flat_groups(groups * e * c * d),
    );
    let hidden = ws.get(device, "moe.hidden", groups * e * c * m);
    let out = ws.get(device, "moe.out", groups * e * c * d);
    moe.experts
        .encode(rec, &slots, &hidden, &out, groups, e, c, false);
    let flags = u32::from(moe.unit_bias.is_some()) | (u32::from(!accumulate) << 1);
    rec.launch(
        Kernel::Combine,
        &[u(n), u(e), u(c), u(d), u(groups), u32::from(bf16), flags, 0],
        &[&out, &table, &gates, x],
        flat_groups(bs * d),
    );

    pending.buffers = vec![
        (logits, bs * e),
        (probs, bs * e),
        (scores, bs * e),
        (gates, bs * e),
        (slot_token, groups * e * c),
    ];
    pending.buffers.extend(extra);
    if let Some(st) = status {
        pending.buffers.push((st, groups));
    }
    Ok(pending)
}

/// Builds layer records from the words read back (in [`LayerPending::reads`] order).
/// `Ok(Err(layer))`: a GPU Sinkhorn group failed and the layer must be solved on the host.
pub(crate) fn finish_layer(
    p: LayerPending,
    words: Vec<Vec<u32>>,
) -> Result<Result<MoeLayerRecord, usize>, GpuError> {
    let (n, e, c) = (p.n, p.e, p.c);
    let mut words = words.into_iter();
    let mut next = || {
        words
            .next()
            .ok_or_else(|| GpuError::Failed("missing readback".into()))
    };
    let mut groups = Vec::with_capacity(p.groups);
    let result = |assignment, aux, solver| RoutingResult {
        router: p.router.kind,
        num_tokens: n,
        num_experts: e,
        capacity: c,
        k: p.router.experts_per_token(),
        capacity_tokens: p.capacity_tokens,
        assignment,
        aux,
        solver,
    };

    if p.router.kind == RouterKind::SoftMoe {
        let ep = e * c;
        let logits = as_f32(next()?);
        let dispatch_t = as_f32(next()?);
        let combine = as_f32(next()?);
        for g in 0..p.groups {
            let lg = logits[g * n * ep..(g + 1) * n * ep].to_vec();
            check_finite("Soft MoE logits", &lg, ep)?;
            let dt = &dispatch_t[g * ep * n..(g + 1) * ep * n];
            let mut dispatch = vec![0.0f32; n * ep];
            for (slot, col) in dt.chunks_exact(n).enumerate() {
                for (i, &w) in col.iter().enumerate() {
                    dispatch[i * ep + slot] = w;
                }
            }
            let soft = SoftAssignment {
                dispatch,
                combine: combine[g * n * ep..(g + 1) * n * ep].to_vec(),
                logits: lg.clone(),
            };
            let routing = result(Assignment::Soft(soft), AuxLosses::default(), None);
            groups.push(GroupRecord {
                first_image: g * p.group_images,
                num_images: p.group_images,
                logits: lg,
                probs: routing.expert_probabilities(),
                routing,
            });
        }
        return Ok(Ok(MoeLayerRecord {
            block: p.block,
            groups,
        }));
    }

    let k = p.router.experts_per_token();
    let logits = as_f32(next()?);
    let probs = as_f32(next()?);
    let scores = as_f32(next()?);
    let gates = as_f32(next()?);
    let slot_token = as_i32(next()?);
    let tc = p.router.kind.family() == RouterFamily::TokenChoice;
    let (chosen, choice_slot, requests) = if tc {
        (next()?, as_i32(next()?), next()?)
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    if p.gpu_sinkhorn {
        let status = next()?;
        if status.iter().any(|&s| s != 0) {
            return Ok(Err(p.layer));
        }
    }
    let ne = n * e;
    for g in 0..p.groups {
        let lg = logits[g * ne..(g + 1) * ne].to_vec();
        check_finite("logits", &lg, e)?;
        let sc = scores[g * ne..(g + 1) * ne].to_vec();
        let gt = gates[g * ne..(g + 1) * ne].to_vec();
        let aux = match p.router.kind {
            RouterKind::SoftmaxTokenChoice | RouterKind::SinkhornTokenChoice => {
                let sigma = p.router.noise_std / e as f32;
                token_choice_aux(&p.router, &lg, None, &gt, e, k, sigma, false)
            }
            _ => AuxLosses::default(),
        };
        let st: Vec<Option<u32>> = slot_token[g * e * c..(g + 1) * e * c]
            .iter()
            .map(|&t| u32::try_from(t).ok())
            .collect();
        let sparse = if tc {
            let mut slot_gate = vec![0.0f32; e * c];
            for (slot, t) in st.iter().enumerate() {
                if let Some(t) = t {
                    slot_gate[slot] = gt[*t as usize * e + slot / c];
                }
            }
            let choices = (0..n * k)
                .map(|ik| {
                    let expert = chosen[g * n * k + ik];
                    let i = ik / k;
                    Choice {
                        expert,
                        slot: u32::try_from(choice_slot[g * n * k + ik]).ok(),
                        gate: gt[i * e + expert as usize],
                    }
                })
                .collect();
            SparseAssignment {
                slot_token: st,
                slot_gate,
                choice_offsets: (0..=n).map(|i| (i * k) as u32).collect(),
                choices,
                requests: requests[g * e..(g + 1) * e].to_vec(),
                scores: sc,
                gates: gt,
            }
        } else {
            expert_choice_assignment(st, sc, gt, n, e, c)
        };
        let solver = if let Some(info) = p.host_solver.get(g) {
            Some(*info)
        } else if p.router.kind.has_solver() {
            Some(SolverInfo {
                iterations: sinkhorn_iterations(p.router.max_iterations),
                converged: false,
                log_domain: false,
            })
        } else {
            None
        };
        let routing = result(Assignment::Sparse(sparse), aux, solver);
        groups.push(GroupRecord {
            first_image: g * p.group_images,
            num_images: p.group_images,
            logits: lg,
            probs: probs[g * ne..(g + 1) * ne].to_vec(),
            routing,
        });
    }
    Ok(Ok(MoeLayerRecord {
        block: p.block,
        groups,
    }))
}
