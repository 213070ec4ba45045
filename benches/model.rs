//! One image through (a) a Fashion-MNIST-sized ViT-MoE (28×28 grey, patch 4, width 128, 6 blocks,
//! MoE in blocks 3 and 5 with 8 experts) and (b) a ViT-S/16-sized V-MoE (224×224 RGB, width 384,
//! 12 blocks, MoE in the last 6 with 32 experts): a full forward, and a router what-if that
//! re-runs from the first MoE layer.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use routerscope::model::{
    Classifier, ModelConfig, MoeConfig, Normalization, RunOptions, VitMoe, random_weights,
};
use routerscope::routing::{RouterConfig, RouterKind};

#[allow(clippy::too_many_arguments)]
fn config(
    name: &str,
    size: usize,
    channels: usize,
    patch: usize,
    width: usize,
    depth: usize,
    heads: usize,
    layers: Vec<usize>,
    experts: usize,
) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        image_size: [size, size],
        channels,
        patch_size: [patch, patch],
        hidden_size: width,
        num_layers: depth,
        num_heads: heads,
        mlp_dim: 4 * width,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: if size == 28 { 10 } else { 1000 },
        class_names: Vec::new(),
        normalization: Normalization {
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
        },
        moe: Some(MoeConfig {
            layers,
            num_experts: experts,
            router: RouterConfig::new(RouterKind::SoftmaxTokenChoice),
            group_images: 1,
            bfloat16_dispatch: false,
        }),
    }
}

fn bench_model(c: &mut Criterion, cfg: ModelConfig) {
    let image: Vec<f32> = (0..cfg.image_size[0] * cfg.image_size[1] * cfg.channels)
        .map(|i| ((i * 31 % 255) as f32 / 127.5) - 1.0)
        .collect();
    let images = vec![image];
    let model = VitMoe::new(cfg.clone(), random_weights(&cfg, 0)).expect("model");
    let base_opts = RunOptions::from_config(&cfg);
    let what_if = base_opts
        .clone()
        .with_router(RouterConfig::new(RouterKind::SoftmaxExpertChoice));
    let base = model.forward(&images, &base_opts).expect("forward");
    let mut group = c.benchmark_group(format!("model/{}", cfg.name));
    group.bench_function("forward", |b| {
        b.iter(|| model.forward(black_box(&images), &base_opts).unwrap())
    });
    group.bench_function("what-if-router", |b| {
        b.iter(|| model.rerun(black_box(&base), &what_if).unwrap())
    });
    group.finish();
}

fn models(c: &mut Criterion) {
    bench_model(
        c,
        config(
            "fashion-28px-w128-d6-e8",
            28,
            1,
            4,
            128,
            6,
            4,
            vec![3, 5],
            8,
        ),
    );
    bench_model(
        c,
        config(
            "vit-s16-224px-e32",
            224,
            3,
            16,
            384,
            12,
            6,
            (6..12).collect(),
            32,
        ),
    );
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
