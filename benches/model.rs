//! One image through (a) a Fashion-MNIST-sized ViT-MoE (28×28 grey, patch 4, width 64, 6 blocks,
//! MoE in blocks 3 and 5 with 8 experts) and (b) a ViT-S/16-sized V-MoE (224×224 RGB, width 384,
//! 12 blocks, MoE in the last 6 with 32 experts): a full forward, and a router what-if that
//! re-runs from the first MoE layer, on the CPU (candle) and, where there is an adapter, on the
//! GPU backend (`WGPU_BACKEND` / `WGPU_ADAPTER_NAME` pick it); and (c) the built-in photo model,
//! DINOv2-S/14 moefied (224×224, 257 tokens, 8 experts in blocks 9 and 11, top-2; its real
//! weights), where the GPU backend falls back (it has no LayerScale or exact GELU yet); and (d)
//! the released V-MoE-B/16 at 384 px (random weights, top-2, one image).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use routerscope::gpu::{GpuContext, GpuVitMoe};
use routerscope::model::{
    ModelConfig, ModelWeights, RunOptions, VitMoe, load_checkpoint, preset, random_weights,
};
use routerscope::routing::{RouterConfig, RouterKind};

fn bench_model(
    c: &mut Criterion,
    cfg: ModelConfig,
    weights: ModelWeights,
    gpu: Option<&GpuContext>,
) {
    let image: Vec<f32> = (0..cfg.image_size[0] * cfg.image_size[1] * cfg.channels)
        .map(|i| ((i * 31 % 255) as f32 / 127.5) - 1.0)
        .collect();
    let images = vec![image];
    let base_opts = RunOptions::from_config(&cfg);
    let what_if = base_opts
        .clone()
        .with_router(RouterConfig::new(RouterKind::SoftmaxExpertChoice));
    // The sparsity-constrained solver runs on the host in the GPU backend: this what-if measures
    // that hand-off (read back the logits, solve, upload the plan) against the same on the CPU.
    let what_if_scot = base_opts
        .clone()
        .with_router(RouterConfig::new(RouterKind::SparseExpertChoice));
    let mut group = c.benchmark_group(format!("model/{}", cfg.name));
    let cpu = VitMoe::new(cfg.clone(), weights.clone()).expect("model");
    let base = cpu.forward(&images, &base_opts).expect("forward");
    group.bench_function("cpu/forward", |b| {
        b.iter(|| cpu.forward(black_box(&images), &base_opts).unwrap())
    });
    group.bench_function("cpu/what-if-router", |b| {
        b.iter(|| cpu.rerun(black_box(&base), &what_if).unwrap())
    });
    group.bench_function("cpu/what-if-sparse-ec", |b| {
        b.iter(|| cpu.rerun(black_box(&base), &what_if_scot).unwrap())
    });
    if let Some(ctx) = gpu {
        let model = match GpuVitMoe::new(ctx, &cfg, &weights) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{}: no GPU rows ({e})", cfg.name);
                group.finish();
                return;
            }
        };
        let base = model.forward(&images, &base_opts).expect("GPU forward");
        group.bench_function("gpu/forward", |b| {
            b.iter(|| model.forward(black_box(&images), &base_opts).unwrap())
        });
        group.bench_function("gpu/what-if-router", |b| {
            b.iter(|| model.rerun(black_box(&base), &what_if).unwrap())
        });
        group.bench_function("gpu/what-if-sparse-ec", |b| {
            b.iter(|| model.rerun(black_box(&base), &what_if_scot).unwrap())
        });
    }
    group.finish();
}

fn models(c: &mut Criterion) {
    let gpu = match GpuContext::headless() {
        Ok(ctx) => {
            eprintln!("GPU: {}", ctx.describe());
            Some(ctx)
        }
        Err(e) => {
            eprintln!("no GPU ({e}): CPU only");
            None
        }
    };
    for name in ["fashion-mnist", "vit-s16"] {
        let cfg = preset(name, RouterKind::SoftmaxTokenChoice).expect("preset");
        let weights = random_weights(&cfg, 0);
        bench_model(c, cfg, weights, gpu.as_ref());
    }
    // The released V-MoE-B/16 (ImageNet-21k, fine-tuned on ILSVRC2012) at 384 px: 577 tokens,
    // width 768, 8 experts top-2 in every other block; random weights, one image per group. Its
    // GPU rows run on hardware adapters only (minutes per forward on a software one).
    let b16 = routerscope::model::vmoe_b16_benchmark();
    let weights = random_weights(&b16, 0);
    let hardware = gpu.as_ref().filter(|g| !g.is_software());
    bench_model(c, b16, weights, hardware);
    let photo = routerscope::catalog::photo_model();
    let (cfg, weights) = load_checkpoint(&photo).expect("the built-in photo model");
    bench_model(c, cfg, weights, gpu.as_ref());
}

fn settings() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20)
}

criterion_group! { name = benches; config = settings(); targets = models }

fn main() {
    // SAFETY: first statement of main, no other thread exists yet.
    unsafe { routerscope::runtime::pin_thread_count() };
    benches();
    Criterion::default().configure_from_args().final_summary();
}
