//! Every kernel against its CPU reference on random inputs, and the whole GPU model against the
//! candle model for every router. Without an adapter these tests pass with a note, unless
//! `ROUTERSCOPE_REQUIRE_GPU=1` (CI sets it), where a missing adapter fails them.

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::kernels::{Activation, Kernel, Matmul, as_f32, as_i32, flat_groups, row_groups, upload};
use super::parity::compare;
use super::recorder::Recorder;
use super::*;
use crate::model::tests::tiny_config;
use crate::model::{RunOptions, VitMoe, gelu, random_weights};
use crate::routing::expert_choice::expert_choice_selection;
use crate::routing::ops::softmax_rows;
use crate::routing::token_choice::token_choice_slotting;
use crate::routing::{CapacitySpec, RouterConfig, RouterKind, sinkhorn_plan};

/// The shared test device, or `None` (with a note) where there is no adapter.
pub(crate) fn test_gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::headless() {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            assert!(
                std::env::var("ROUTERSCOPE_REQUIRE_GPU").as_deref() != Ok("1"),
                "ROUTERSCOPE_REQUIRE_GPU=1 but no GPU device: {e}"
            );
            eprintln!("no GPU adapter, GPU test skipped: {e}");
            None
        }
    })
    .as_ref()
}

fn randn(rng: &mut ChaCha8Rng, len: usize, std: f32) -> Vec<f32> {
    (0..len)
        .map(|_| std * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn read_f32(rec: &mut Recorder<'_>, buf: &wgpu::Buffer, len: usize) -> Vec<f32> {
    as_f32(rec.read(&[(buf, len)]).unwrap().remove(0))
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= rel * scale.max(b.abs()),
            "{what}[{i}]: gpu {a} vs cpu {b} (scale {scale})"
        );
    }
}

fn cpu_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for t in 0..k {
            let av = a[i * k + t] as f64;
            for j in 0..n {
                c[i * n + j] = (c[i * n + j] as f64 + av * b[t * n + j] as f64) as f32;
            }
        }
    }
    c
}

#[test]
fn matmul_with_bias_activation_and_two_level_batches() {
    let Some(ctx) = test_gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // 3 groups × 5 experts of [7, 37] @ [37, 19], odd sizes to exercise the tile edges.
    let (outer, inner, m, k, n) = (3, 5, 7, 37, 19);
    let a = randn(&mut rng, outer * inner * m * k, 1.0);
    let b = randn(&mut rng, inner * k * n, 0.3);
    let bias = randn(&mut rng, inner * n, 0.5);
    let c0 = randn(&mut rng, outer * inner * m * n, 1.0);
    for (act, accumulate, tiled) in [
        (Activation::None, false, true),
        (Activation::Gelu, false, true),
        (Activation::Tanh, true, true),
        (Activation::None, false, false),
        (Activation::Gelu, true, false),
        (Activation::GeluErf, false, true),
        (Activation::GeluErf, true, false),
    ] {
        let d = &ctx.device;
        let (ab, bb, biasb, cb) = (
            upload(d, "a", &a),
            upload(d, "b", &b),
            upload(d, "bias", &bias),
            upload(d, "c", &c0),
        );
        let mm = Matmul {
            outer,
            inner,
            a_so: inner * m * k,
            a_si: m * k,
            b_si: k * n,
            c_so: inner * m * n,
            c_si: m * n,
            bias_si: n,
            accumulate,
            ..Matmul::plain(m, k, n).with_bias().act(act)
        };
        let mut rec = Recorder::new(ctx);
        let (kernel, params, groups) = mm.params(tiled);
        rec.launch(kernel, &params, &[&ab, &bb, &biasb, &cb], groups);
        let got = read_f32(&mut rec, &cb, c0.len());
        let mut want = Vec::new();
        for o in 0..outer {
            for j in 0..inner {
                let at = (o * inner + j) * m * k;
                let y = cpu_matmul(&a[at..at + m * k], &b[j * k * n..(j + 1) * k * n], m, k, n);
                for (r, row) in y.chunks_exact(n).enumerate() {
                    for (col, v) in row.iter().enumerate() {
                        let mut v = v + bias[j * n + col];
                        v = match act {
                            Activation::None => v,
                            Activation::Gelu => gelu(v),
                            Activation::GeluErf => crate::model::gelu_erf(v),
                            Activation::Tanh => v.tanh(),
                        };
                        let idx = (o * inner + j) * m * n + r * n + col;
                        want.push(if accumulate { c0[idx] + v } else { v });
                    }
                }
            }
        }
        assert_close(&got, &want, 1e-4, &format!("matmul {act:?} tiled={tiled}"));
    }
}

#[test]
fn layernorm_softmax_gelu_and_bf16_match_the_cpu() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, cols) = (13, 70);
    let x: Vec<f32> = randn(&mut rng, rows * cols, 2.0)
        .iter()
        .map(|v| v + 0.7)
        .collect();
    let scale = randn(&mut rng, cols, 1.0);
    let bias = randn(&mut rng, cols, 1.0);
    let (xb, sb, bb, yb) = (
        upload(d, "x", &x),
        upload(d, "s", &scale),
        upload(d, "b", &bias),
        upload(d, "y", &x),
    );
    let mut rec = Recorder::new(ctx);
    rec.launch(
        Kernel::LayerNorm,
        &[rows as u32, cols as u32, 1e-6f32.to_bits(), 0],
        &[&xb, &sb, &bb, &yb],
        row_groups(rows),
    );
    let got = read_f32(&mut rec, &yb, x.len());
    let t =
        candle_core::Tensor::from_vec(x.clone(), (rows, cols), &candle_core::Device::Cpu).unwrap();
    let op = crate::model::ops::LayerNormOp {
        scale: &scale,
        bias: &bias,
        eps: 1e-6,
    };
    let want: Vec<f32> = t
        .apply_op1_no_bwd(&op)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_close(&got, &want, 1e-4, "layernorm");

    rec.launch(
        Kernel::SoftmaxRows,
        &[rows as u32, cols as u32, 0, 0],
        &[&xb, &yb],
        row_groups(rows),
    );
    assert_close(
        &read_f32(&mut rec, &yb, x.len()),
        &softmax_rows(&x, cols),
        1e-4,
        "softmax",
    );

    rec.launch(
        Kernel::Gelu,
        &[x.len() as u32, 0, 0, 0],
        &[&xb, &yb],
        flat_groups(x.len()),
    );
    let want: Vec<f32> = x.iter().map(|&v| gelu(v)).collect();
    assert_close(&read_f32(&mut rec, &yb, x.len()), &want, 1e-4, "gelu");

    rec.launch(
        Kernel::RoundBf16,
        &[x.len() as u32, 0, 0, 0],
        &[&xb, &yb],
        flat_groups(x.len()),
    );
    let want: Vec<f32> = x
        .iter()
        .map(|&v| crate::routing::ops::round_to_bf16(v))
        .collect();
    assert_eq!(
        read_f32(&mut rec, &yb, x.len()),
        want,
        "bf16 rounding is exact"
    );
}

#[test]
fn attention_matches_softmax_qk_v() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, s, heads, hd) = (2, 37, 3, 8);
    let dm = heads * hd;
    let qkv = randn(&mut rng, b * s * 3 * dm, 1.0);
    let (qb, ob) = (
        upload(d, "qkv", &qkv),
        upload(d, "out", &vec![0.0f32; b * s * dm]),
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let mut rec = Recorder::new(ctx);
    rec.launch(
        Kernel::Attention,
        &[s as u32, heads as u32, hd as u32, scale.to_bits()],
        &[&qb, &ob],
        [s as u32, heads as u32, b as u32],
    );
    let got = read_f32(&mut rec, &ob, b * s * dm);
    let mut want = vec![0.0f32; b * s * dm];
    let at = |bi: usize, t: usize, part: usize, h: usize, j: usize| {
        qkv[(bi * s + t) * 3 * dm + part * dm + h * hd + j]
    };
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..s {
                let sc: Vec<f32> = (0..s)
                    .map(|t| {
                        (0..hd)
                            .map(|j| at(bi, i, 0, h, j) * scale * at(bi, t, 1, h, j))
                            .sum()
                    })
                    .collect();
                let p = softmax_rows(&sc, s);
                for j in 0..hd {
                    want[(bi * s + i) * dm + h * hd + j] =
                        (0..s).map(|t| p[t] * at(bi, t, 2, h, j)).sum();
                }
            }
        }
    }
    assert_close(&got, &want, 1e-4, "attention");
}

/// Random scores with many exact ties (values on a coarse grid), `groups` groups of `[n, e]`.
fn tied_scores(rng: &mut ChaCha8Rng, groups: usize, n: usize, e: usize) -> Vec<f32> {
    (0..groups * n * e)
        .map(|_| (rng.random_range(0..6) as f32) / 8.0)
        .collect()
}

#[test]
fn token_choice_slotting_matches_the_cpu_with_ties_bpr_and_drops() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (groups, n, e) = (3, 29, 5);
    for (k, c, bpr) in [(1, 4, false), (2, 7, true), (2, 3, false), (3, 20, true)] {
        let scores = tied_scores(&mut rng, groups, n, e);
        let z = |len: usize| upload(d, "z", &vec![0u32; len]);
        let sb = upload(d, "scores", &scores);
        let (chosen, order, cs, st, table, req) = (
            z(groups * n * k),
            z(groups * n),
            z(groups * n * k),
            z(groups * e * c),
            z(groups * n * e),
            z(groups * e),
        );
        let params = [
            n as u32,
            e as u32,
            k as u32,
            c as u32,
            groups as u32,
            u32::from(bpr),
            0,
            0,
        ];
        let bufs = [&sb, &chosen, &order, &cs, &st, &table, &req];
        let mut rec = Recorder::new(ctx);
        rec.launch(Kernel::TopK, &params, &bufs, flat_groups(groups * n));
        rec.launch(Kernel::OrderTokens, &params, &bufs, flat_groups(groups * n));
        rec.launch(
            Kernel::TokenChoiceSlots,
            &params,
            &bufs,
            flat_groups(groups * e),
        );
        let mut w = rec
            .read(&[
                (&chosen, groups * n * k),
                (&cs, groups * n * k),
                (&st, groups * e * c),
                (&req, groups * e),
                (&table, groups * n * e),
            ])
            .unwrap()
            .into_iter();
        let (chosen, cs, st, req, table) = (
            w.next().unwrap(),
            as_i32(w.next().unwrap()),
            as_i32(w.next().unwrap()),
            w.next().unwrap(),
            as_i32(w.next().unwrap()),
        );
        for g in 0..groups {
            let sc = scores[g * n * e..(g + 1) * n * e].to_vec();
            let want = token_choice_slotting(sc.clone(), sc, n, e, k, c, bpr);
            let got_slots: Vec<Option<u32>> = st[g * e * c..(g + 1) * e * c]
                .iter()
                .map(|&t| u32::try_from(t).ok())
                .collect();
            assert_eq!(
                got_slots, want.slot_token,
                "k={k} c={c} bpr={bpr} group {g}: slots"
            );
            assert_eq!(&req[g * e..(g + 1) * e], &want.requests[..], "requests");
            for (ik, ch) in want.choices.iter().enumerate() {
                assert_eq!(chosen[g * n * k + ik], ch.expert, "choice {ik}");
                assert_eq!(
                    u32::try_from(cs[g * n * k + ik]).ok(),
                    ch.slot,
                    "slot of choice {ik}"
                );
                let i = ik / k;
                let want_table = ch.slot.map_or(-1, |s| (ch.expert * c as u32 + s) as i32);
                assert_eq!(table[(g * n + i) * e + ch.expert as usize], want_table);
            }
        }
    }
}

#[test]
fn expert_choice_selection_matches_the_cpu_with_ties() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (groups, n, e) = (2, 31, 6);
    for c in [1, 4, 31] {
        let scores = tied_scores(&mut rng, groups, n, e);
        let sb = upload(d, "scores", &scores);
        let st = upload(d, "st", &vec![0u32; groups * e * c]);
        let table = upload(d, "table", &vec![0u32; groups * n * e]);
        let mut rec = Recorder::new(ctx);
        rec.launch(
            Kernel::ExpertChoiceSelect,
            &[n as u32, e as u32, c as u32, groups as u32],
            &[&sb, &st, &table],
            flat_groups(groups * n * e),
        );
        let got = as_i32(rec.read(&[(&st, groups * e * c)]).unwrap().remove(0));
        for g in 0..groups {
            let sc = scores[g * n * e..(g + 1) * n * e].to_vec();
            let want = expert_choice_selection(sc.clone(), sc, n, e, c);
            let got: Vec<Option<u32>> = got[g * e * c..(g + 1) * e * c]
                .iter()
                .map(|&t| u32::try_from(t).ok())
                .collect();
            assert_eq!(got, want.slot_token, "c={c} group {g}");
        }
    }
}

#[test]
fn sinkhorn_matches_the_cpu_and_flags_failures() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (groups, n, e) = (3, 40, 8);
    let mut logits = randn(&mut rng, groups * n * e, 2.0);
    // Group 1 overflows exp without the global shift; group 2 needs the log domain.
    for v in &mut logits[n * e..2 * n * e] {
        *v += 95.0;
    }
    for (i, v) in logits[2 * n * e..].iter_mut().enumerate() {
        *v += if i % e == 0 { 150.0 } else { -150.0 };
    }
    let lb = upload(d, "logits", &logits);
    let plan = upload(d, "plan", &vec![0.0f32; groups * n * e]);
    let (ub, vb, st) = (
        upload(d, "u", &vec![0.0f32; groups * n]),
        upload(d, "v", &vec![0.0f32; groups * e]),
        upload(d, "st", &vec![0u32; groups]),
    );
    let mut rec = Recorder::new(ctx);
    let beta = n as f32 / e as f32;
    rec.launch(
        Kernel::Sinkhorn,
        &[n as u32, e as u32, 20, beta.to_bits()],
        &[&lb, &plan, &ub, &vb, &st],
        [groups as u32, 1, 1],
    );
    let mut w = rec
        .read(&[(&plan, groups * n * e), (&st, groups)])
        .unwrap()
        .into_iter();
    let (got, status) = (as_f32(w.next().unwrap()), w.next().unwrap());
    for g in 0..2 {
        let want = sinkhorn_plan(&logits[g * n * e..(g + 1) * n * e], n, e, 20);
        assert!(!want.log_domain);
        assert_eq!(status[g], 0, "group {g} ran in kernel mode");
        for (a, b) in got[g * n * e..(g + 1) * n * e].iter().zip(&want.plan) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                "group {g}: {a} vs {b}"
            );
        }
    }
    let want = sinkhorn_plan(&logits[2 * n * e..], n, e, 20);
    assert!(want.log_domain);
    assert_eq!(status[2], 1, "the degenerate group is handed to the host");
}

fn perturbed_weights(cfg: &crate::model::ModelConfig, seed: u64) -> crate::model::ModelWeights {
    let mut w = random_weights(cfg, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    for (name, t) in w.iter_mut() {
        let leaf = name.rsplit('/').next().unwrap_or("");
        if leaf == "bias" || name == "cls" || (leaf == "scale" && !name.contains("Router")) {
            for v in t.data.iter_mut() {
                *v += 0.2 * rng.sample::<f32, _>(StandardNormal);
            }
        }
    }
    w
}

fn images(cfg: &crate::model::ModelConfig, count: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let px = cfg.image_size[0] * cfg.image_size[1] * cfg.channels;
    (0..count).map(|_| randn(&mut rng, px, 1.0)).collect()
}

/// The whole GPU model equals the candle model for every router, grouped or not, with bf16
/// dispatch, and its what-if equals a full run; with the matmul variant of this adapter and with
/// the other one (hardware GPUs use the tiled kernel, software adapters the barrier-free one).
#[test]
fn gpu_model_matches_the_candle_model_for_every_router() {
    let Some(ctx) = test_gpu() else { return };
    for tiled in [ctx.tiled_matmul, !ctx.tiled_matmul] {
        let ctx = &GpuContext {
            tiled_matmul: tiled,
            ..ctx.clone()
        };
        model_parity(ctx);
    }
}

fn model_parity(ctx: &GpuContext) {
    for kind in RouterKind::ALL {
        for (group, bf16) in [(1, false), (2, true)] {
            let mut cfg = tiny_config(kind);
            if let Some(m) = cfg.moe.as_mut() {
                m.group_images = group;
                m.bfloat16_dispatch = bf16;
            }
            let w = perturbed_weights(&cfg, 7);
            let gpu = GpuVitMoe::new(ctx, &cfg, &w).unwrap();
            let cpu = VitMoe::new(cfg.clone(), w).unwrap();
            let imgs = images(&cfg, 4, 9);
            let mut opts = RunOptions::from_config(&cfg);
            if kind.family() == crate::routing::RouterFamily::TokenChoice {
                opts.routers[0].k = 2;
                opts.routers[1].batch_priority = true;
                opts.routers[1].capacity = CapacitySpec::Factor(0.5);
            }
            let a = cpu.forward(&imgs, &opts).unwrap();
            let b = gpu.forward(&imgs, &opts).unwrap();
            assert!(super::computed_on_gpu(&b));
            let r = compare(&a, &b, cfg.hidden_size);
            assert!(r.max_prob_diff < 1e-4, "{kind:?} group {group}: {r:?}");
            assert_eq!(r.mismatches, 0, "{kind:?} group {group}: {r:?}");
            assert!(r.max_weight_diff < 1e-4, "{kind:?}: {r:?}");
            for (la, lb) in a.records.iter().zip(&b.records) {
                for (ga, gb) in la.groups.iter().zip(&lb.groups) {
                    assert_eq!(
                        ga.routing.solver.map(|s| s.iterations),
                        gb.routing.solver.map(|s| s.iterations)
                    );
                    assert_close(&gb.logits, &ga.logits, 1e-4, "router logits");
                    assert_eq!(
                        ga.routing.aux.importance.is_some(),
                        gb.routing.aux.importance.is_some()
                    );
                }
            }
            // What-if on the GPU from the second MoE layer equals a full run.
            let mut other = opts.clone();
            other.routers[1] = match kind {
                RouterKind::SoftMoe => other.routers[1].clone(),
                _ => RouterConfig {
                    capacity: CapacitySpec::Factor(2.0),
                    ..other.routers[1].clone()
                },
            };
            let full = cpu.forward(&imgs, &other).unwrap();
            let what_if = gpu.rerun(&b, &other).unwrap();
            let r = compare(&full, &what_if, cfg.hidden_size);
            assert!(
                r.max_prob_diff < 1e-4 && r.mismatches == 0,
                "{kind:?} what-if: {r:?}"
            );
        }
    }
}

/// The configurations the CPU model runs, one per combination of the switches the GPU kernels
/// must follow: GELU form × LayerScale × expert combine × head (CLS classifier, mean-pooled
/// classifier, feature model) × expert width, each under a different router in turn; then the
/// prefix-token and pooling variants of the importers (distillation token, registers, a kept CLS
/// token with mean pooling, `fc_norm`, Hugging Face's LayerNorm epsilon, `pre_logits`).
fn switch_configs() -> Vec<(String, crate::model::ModelConfig)> {
    use crate::model::{Classifier, Combine, Gelu};
    let mut out = Vec::new();
    let mut i = 0;
    for gelu in [Gelu::Tanh, Gelu::Erf] {
        for layer_scale in [false, true] {
            for combine in [Combine::Gated, Combine::Unit] {
                for head in ["token", "gap", "features"] {
                    for narrow in [None, Some(8)] {
                        let kind = RouterKind::ALL[i % RouterKind::ALL.len()];
                        i += 1;
                        let mut cfg = tiny_config(kind);
                        cfg.gelu = gelu;
                        cfg.layer_scale = layer_scale;
                        match head {
                            "gap" => cfg.classifier = Classifier::Gap,
                            "features" => {
                                cfg.num_classes = 0;
                                cfg.class_names.clear();
                            }
                            _ => {}
                        }
                        if let Some(m) = cfg.moe.as_mut() {
                            m.combine = combine;
                            m.expert_mlp_dim = narrow;
                        }
                        let name = format!(
                            "{kind:?} {gelu:?} ls={layer_scale} {combine:?} {head} experts={narrow:?}"
                        );
                        out.push((name, cfg));
                    }
                }
            }
        }
    }
    let base = |kind| {
        let mut cfg = tiny_config(kind);
        cfg.gelu = Gelu::Erf;
        cfg.layer_scale = true;
        cfg
    };
    let mut c = base(RouterKind::SoftmaxTokenChoice);
    c.distillation_token = true;
    out.push(("distillation token".into(), c));
    let mut c = base(RouterKind::SinkhornExpertChoice);
    c.register_tokens = 3;
    out.push(("registers, CLS classifier".into(), c));
    let mut c = base(RouterKind::SoftmaxExpertChoice);
    c.register_tokens = 2;
    c.num_classes = 0;
    c.class_names.clear();
    out.push(("registers, feature model".into(), c));
    let mut c = base(RouterKind::SparseExpertChoice);
    c.classifier = Classifier::Gap;
    c.cls_token = Some(true);
    c.register_tokens = 1;
    out.push(("CLS kept, mean pooling over patches".into(), c));
    let mut c = base(RouterKind::SoftmaxTokenChoice);
    c.classifier = Classifier::Gap;
    c.cls_token = Some(true);
    c.fc_norm = true;
    out.push(("fc_norm".into(), c));
    let mut c = base(RouterKind::SinkhornTokenChoice);
    c.distillation_token = true;
    c.fc_norm = true;
    out.push(("distillation token with fc_norm".into(), c));
    let mut c = base(RouterKind::SoftMoe);
    c.layer_norm_eps = 1e-12;
    out.push(("LayerNorm eps 1e-12".into(), c));
    let mut c = tiny_config(RouterKind::SoftmaxTokenChoice);
    c.representation_size = Some(6);
    out.push(("pre_logits".into(), c));
    out
}

/// Random weights for `cfg` with every bias, scale and learned token perturbed, so that each
/// switch changes the result.
fn switch_weights(cfg: &crate::model::ModelConfig, seed: u64) -> crate::model::ModelWeights {
    let mut w = perturbed_weights(cfg, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1000);
    for (name, t) in w.iter_mut() {
        if name == "dist" || name == "registers" || name.ends_with("Moe/bias") {
            for v in t.data.iter_mut() {
                *v += 0.5 * rng.sample::<f32, _>(StandardNormal);
            }
        }
    }
    w
}

/// Every configuration switch the CPU model follows, the GPU model follows too: it accepts each
/// configuration (no fallback for a missing feature) and matches the candle model's routing,
/// features and probabilities, in a full run and in a what-if.
#[test]
fn every_configuration_switch_runs_on_the_gpu_as_on_the_cpu() {
    let Some(ctx) = test_gpu() else { return };
    for (name, cfg) in switch_configs() {
        let w = switch_weights(&cfg, 21);
        let cpu = VitMoe::new(cfg.clone(), w.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let gpu = GpuVitMoe::new(ctx, &cfg, &w)
            .unwrap_or_else(|e| panic!("{name}: the GPU backend refuses it: {e}"));
        let imgs = images(&cfg, 2, 4);
        let opts = RunOptions::from_config(&cfg);
        let a = cpu.forward(&imgs, &opts).unwrap();
        let b = gpu.forward(&imgs, &opts).unwrap();
        assert!(super::computed_on_gpu(&b), "{name}");
        let r = compare(&a, &b, cfg.hidden_size);
        assert_eq!(r.mismatches + r.tie_mismatches, 0, "{name}: {r:?}");
        assert!(r.max_prob_diff < 1e-4, "{name}: {r:?}");
        assert!(r.max_feature_diff < 1e-4, "{name}: {r:?}");
        assert!(r.max_feature_cosine_gap < 1e-6, "{name}: {r:?}");
        assert_eq!(a.features[0].len(), cfg.seq_len() * cfg.hidden_size);
        assert_eq!(b.probs.len(), 2, "{name}");
        assert_eq!(b.probs[0].len(), cfg.num_classes, "{name}");
        // A what-if at the second MoE layer, resumed on the GPU.
        let mut other = opts.clone();
        if other.routers[1].kind != RouterKind::SoftMoe {
            other.routers[1].capacity = CapacitySpec::Factor(2.0);
        }
        let full = cpu.forward(&imgs, &other).unwrap();
        let what_if = gpu.rerun(&b, &other).unwrap();
        let r = compare(&full, &what_if, cfg.hidden_size);
        assert_eq!(r.mismatches, 0, "{name} what-if: {r:?}");
        assert!(r.max_feature_diff < 1e-4, "{name} what-if: {r:?}");
    }
}

#[test]
fn patch_embedding_plumbing_and_pooling_match_the_cpu_layout() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (b, h, w, ch, ph, pw) = (2, 8, 12, 3, 4, 4);
    let (gh, gw) = (h / ph, w / pw);
    let (np, pin, dim) = (gh * gw, ph * pw * ch, 5);
    let img = randn(&mut rng, b * h * w * ch, 1.0);
    // Three prefix tokens (CLS, distillation, a register) before the patches.
    let np_prefix = 3;
    let cls = randn(&mut rng, np_prefix * dim, 1.0);
    let emb = randn(&mut rng, b * np * dim, 1.0);
    let pos = randn(&mut rng, (np + np_prefix) * dim, 1.0);
    let s = np + np_prefix;
    let (ib, cb, eb, pb) = (
        upload(d, "img", &img),
        upload(d, "cls", &cls),
        upload(d, "emb", &emb),
        upload(d, "pos", &pos),
    );
    let patches = upload(d, "patches", &vec![0.0f32; b * np * pin]);
    let x = upload(d, "x", &vec![0.0f32; b * s * dim]);
    let pooled = upload(d, "pooled", &vec![0.0f32; b * dim]);
    let u = |v: usize| v as u32;
    let mut params = [
        u(b),
        u(h),
        u(w),
        u(ch),
        u(ph),
        u(pw),
        u(gh),
        u(gw),
        u(s),
        u(dim),
        u(np_prefix),
        0,
        1,
        0,
        0,
        0,
    ];
    let mut rec = Recorder::new(ctx);
    rec.launch(
        Kernel::Patchify,
        &params,
        &[&ib, &ib, &ib, &patches],
        flat_groups(b * np * pin),
    );
    rec.launch(
        Kernel::Assemble,
        &params,
        &[&eb, &cb, &pb, &x],
        flat_groups(b * s * dim),
    );
    rec.launch(
        Kernel::Pool,
        &params,
        &[&x, &x, &x, &pooled],
        flat_groups(b * dim),
    );
    let mut wds = rec
        .read(&[
            (&patches, b * np * pin),
            (&x, b * s * dim),
            (&pooled, b * dim),
        ])
        .unwrap()
        .into_iter();
    let (got_p, got_x, got_cls) = (
        as_f32(wds.next().unwrap()),
        as_f32(wds.next().unwrap()),
        as_f32(wds.next().unwrap()),
    );
    // The candle model's order: (b, gh, ph, gw, pw, c) permuted to (b, gh, gw, ph, pw, c).
    let t = candle_core::Tensor::from_vec(
        img.clone(),
        (b, gh, ph, gw, pw, ch),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let want: Vec<f32> = t
        .permute((0, 1, 3, 2, 4, 5))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got_p, want, "patchify");
    for bi in 0..b {
        for ti in 0..s {
            for j in 0..dim {
                let v = if ti < np_prefix {
                    cls[ti * dim + j]
                } else {
                    emb[(bi * np + ti - np_prefix) * dim + j]
                };
                assert_eq!(got_x[(bi * s + ti) * dim + j], v + pos[ti * dim + j]);
            }
        }
        // Mode 0 reads the token asked for: here the distillation token.
        let at = (bi * s + 1) * dim;
        assert_eq!(&got_cls[bi * dim..(bi + 1) * dim], &got_x[at..at + dim]);
    }
    params[11] = 1;
    rec.launch(
        Kernel::Pool,
        &params,
        &[&x, &x, &x, &pooled],
        flat_groups(b * dim),
    );
    let got = read_f32(&mut rec, &pooled, b * dim);
    // Mode 1: the mean over the patch tokens only (timm's `avg` with prefix tokens).
    let want: Vec<f32> = (0..b * dim)
        .map(|i| {
            (np_prefix..s)
                .map(|ti| got_x[((i / dim) * s + ti) * dim + i % dim])
                .sum::<f32>()
                / np as f32
        })
        .collect();
    assert_close(&got, &want, 1e-5, "mean pooling");
}

#[test]
fn soft_moe_normalisation_and_both_softmaxes_match_the_cpu() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (groups, n, dim, ep) = (2, 23, 7, 6);
    let x = randn(&mut rng, groups * n * dim, 1.5);
    let logits = randn(&mut rng, groups * n * ep, 3.0);
    let (xb, lb) = (upload(d, "x", &x), upload(d, "logits", &logits));
    let xn = upload(d, "xn", &vec![0.0f32; x.len()]);
    let comb = upload(d, "combine", &vec![0.0f32; logits.len()]);
    let disp = upload(d, "dispatch_t", &vec![0.0f32; logits.len()]);
    let mut rec = Recorder::new(ctx);
    rec.launch(
        Kernel::L2NormalizeRows,
        &[x.len() as u32, dim as u32, 1e-6f32.to_bits(), 0],
        &[&xb, &xn],
        flat_groups(groups * n),
    );
    rec.launch(
        Kernel::SoftmaxRows,
        &[(groups * n) as u32, ep as u32, 0, 0],
        &[&lb, &comb],
        row_groups(groups * n),
    );
    rec.launch(
        Kernel::SoftmaxColumnsT,
        &[0, ep as u32, n as u32, groups as u32],
        &[&lb, &disp],
        flat_groups(groups * ep),
    );
    let mut w = rec
        .read(&[(&xn, x.len()), (&comb, logits.len()), (&disp, logits.len())])
        .unwrap()
        .into_iter();
    let (got_xn, got_c, got_d) = (
        as_f32(w.next().unwrap()),
        as_f32(w.next().unwrap()),
        as_f32(w.next().unwrap()),
    );
    let want_xn: Vec<f32> = x
        .chunks_exact(dim)
        .flat_map(|r| {
            let m = 1.0 / (r.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
            r.iter().map(move |v| v * m)
        })
        .collect();
    assert_close(&got_xn, &want_xn, 1e-5, "l2 normalisation");
    for g in 0..groups {
        let part = logits[g * n * ep..(g + 1) * n * ep].to_vec();
        let want = crate::routing::soft_weights(part, n, ep);
        assert_close(
            &got_c[g * n * ep..(g + 1) * n * ep],
            &want.combine,
            1e-4,
            "combine",
        );
        let dt = &got_d[g * ep * n..(g + 1) * ep * n];
        let got: Vec<f32> = (0..n * ep).map(|k| dt[(k % ep) * n + k / ep]).collect();
        assert_close(&got, &want.dispatch, 1e-4, "dispatch");
    }
}

/// Gather and combine reproduce a Token Choice routing with k = 2 and drops: slot inputs are the
/// routed tokens (bf16-rounded when asked), outputs add Σ gate · slot output over kept choices
/// (every gate 1 under unit combine; written rather than added for a branch).
#[test]
fn gather_and_combine_follow_the_routing_records() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (n, e, dim) = (30, 4, 9);
    let logits = randn(&mut rng, n * e, 2.0);
    let cfg = RouterConfig {
        k: 2,
        capacity: CapacitySpec::Factor(0.5),
        ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
    };
    let rr = crate::routing::route_logits(&logits, n, e, &cfg, crate::routing::Mode::Deterministic)
        .unwrap();
    let sp = rr.sparse().unwrap();
    let c = rr.capacity;
    let st: Vec<i32> = sp
        .slot_token
        .iter()
        .map(|t| t.map_or(-1, |t| t as i32))
        .collect();
    let mut table = vec![-1i32; n * e];
    for i in 0..n {
        for ch in rr.token_choices(i) {
            if let Some(s) = ch.slot {
                table[i * e + ch.expert as usize] = (ch.expert as usize * c + s as usize) as i32;
            }
        }
    }
    let x = randn(&mut rng, n * dim, 1.0);
    let out0 = randn(&mut rng, n * dim, 1.0);
    let slot_out = randn(&mut rng, e * c * dim, 1.0);
    for (bf16, flags) in [(false, 0), (true, 0), (false, 1), (false, 2), (true, 3)] {
        let (unit, overwrite) = (flags & 1 != 0, flags & 2 != 0);
        let round = |v: f32| {
            if bf16 {
                crate::routing::ops::round_to_bf16(v)
            } else {
                v
            }
        };
        let (xb, stb, tb, gb) = (
            upload(d, "x", &x),
            upload(d, "st", &st),
            upload(d, "table", &table),
            upload(d, "gates", &sp.gates),
        );
        let slots = upload(d, "slots", &vec![0.0f32; e * c * dim]);
        let (sob, ob) = (upload(d, "slot_out", &slot_out), upload(d, "out", &out0));
        let params = [
            n as u32,
            e as u32,
            c as u32,
            dim as u32,
            1,
            u32::from(bf16),
            flags,
            0,
        ];
        let mut rec = Recorder::new(ctx);
        rec.launch(
            Kernel::Gather,
            &params,
            &[&xb, &stb, &gb, &slots],
            flat_groups(e * c * dim),
        );
        rec.launch(
            Kernel::Combine,
            &params,
            &[&sob, &tb, &gb, &ob],
            flat_groups(n * dim),
        );
        let mut w = rec
            .read(&[(&slots, e * c * dim), (&ob, n * dim)])
            .unwrap()
            .into_iter();
        let (got_slots, got_out) = (as_f32(w.next().unwrap()), as_f32(w.next().unwrap()));
        for (slot, t) in sp.slot_token.iter().enumerate() {
            let want: Vec<f32> = match t {
                Some(t) => x[*t as usize * dim..][..dim]
                    .iter()
                    .map(|&v| round(v))
                    .collect(),
                None => vec![0.0; dim],
            };
            assert_eq!(
                &got_slots[slot * dim..(slot + 1) * dim],
                &want[..],
                "slot {slot}"
            );
        }
        for i in 0..n {
            for k in 0..dim {
                let add: f32 = rr
                    .token_choices(i)
                    .iter()
                    .filter_map(|ch| {
                        ch.slot.map(|s| {
                            let gate = if unit { 1.0 } else { ch.gate };
                            gate * round(slot_out[(ch.expert as usize * c + s as usize) * dim + k])
                        })
                    })
                    .sum();
                let want = if overwrite {
                    add
                } else {
                    out0[i * dim + k] + add
                };
                assert!(
                    (got_out[i * dim + k] - want).abs() < 1e-5,
                    "token {i}: {} vs {want}",
                    got_out[i * dim + k]
                );
            }
        }
    }
}

/// The residual add of a finished branch: `x += (a + bias) · scale` per channel with each part
/// optional, in the CPU path's order (bias first, then the scale), bit for bit.
#[test]
fn residual_add_with_layer_scale_and_bias_matches_the_cpu() {
    let Some(ctx) = test_gpu() else { return };
    let d = &ctx.device;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (rows, dim) = (37, 11);
    let x0 = randn(&mut rng, rows * dim, 1.0);
    let a = randn(&mut rng, rows * dim, 1.0);
    let scale = randn(&mut rng, dim, 0.3);
    let bias = randn(&mut rng, dim, 0.5);
    for (use_scale, use_bias) in [(false, false), (true, false), (false, true), (true, true)] {
        let (ab, sb, bb, xb) = (
            upload(d, "a", &a),
            upload(d, "scale", &scale),
            upload(d, "bias", &bias),
            upload(d, "x", &x0),
        );
        let mut rec = Recorder::new(ctx);
        super::layers::add_branch(
            &mut rec,
            &ab,
            use_scale.then_some(&sb),
            use_bias.then_some(&bb),
            &xb,
            rows,
            dim,
        );
        let got = read_f32(&mut rec, &xb, rows * dim);
        let want: Vec<f32> = (0..rows * dim)
            .map(|i| {
                let j = i % dim;
                let mut v = a[i];
                if use_bias {
                    v += bias[j];
                }
                if use_scale {
                    v *= scale[j];
                }
                x0[i] + v
            })
            .collect();
        assert_eq!(got, want, "scale {use_scale}, bias {use_bias}");
    }
}

/// What a run records: every launch gets its bind group, consecutive launches share one compute
/// pass (a pass ends only at a copy or a host read), and the readback is the probabilities, the
/// features and the routing of each MoE layer, nothing more. A what-if records only the blocks
/// from the first MoE layer on.
#[test]
fn a_run_records_its_launches_in_few_passes_and_reads_back_only_results() {
    let Some(ctx) = test_gpu() else { return };
    let cfg = crate::model::preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
    let w = random_weights(&cfg, 3);
    let gpu = GpuVitMoe::new(ctx, &cfg, &w).unwrap();
    let imgs = images(&cfg, 2, 5);
    let opts = RunOptions::from_config(&cfg);
    let base = gpu.forward(&imgs, &opts).unwrap();
    let f = gpu.last_run_stats();
    assert!(f.launches > 40, "{f:?}");
    assert_eq!(f.bind_groups, f.launches);
    assert!(
        f.passes <= f.copies + f.submits,
        "one pass per segment: {f:?}"
    );
    let (b, s, d) = (2, cfg.seq_len(), cfg.hidden_size);
    assert!(
        f.readback_bytes >= 4 * (b * cfg.num_classes + b * s * d),
        "{f:?}"
    );
    // Routing records: at most a few [n, e] matrices and slot tables per layer and group.
    let e = cfg.moe.as_ref().unwrap().num_experts;
    assert!(
        f.readback_bytes <= 4 * (b * cfg.num_classes + b * s * d + 2 * 8 * b * s * e),
        "{f:?}"
    );
    let what_if = opts
        .clone()
        .with_router(RouterConfig::new(RouterKind::SoftmaxExpertChoice));
    gpu.rerun(&base, &what_if).unwrap();
    let w = gpu.last_run_stats();
    assert!(w.launches < f.launches, "what-if {w:?} vs forward {f:?}");
    assert!(w.copies >= 1, "the saved residual is copied in: {w:?}");
}
