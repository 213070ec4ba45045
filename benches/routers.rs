//! One routing per router on a ViT-B/16 group (196 tokens × 32 experts, the paper's expert count)
//! and on a V-MoE group of 8 images (1,576 tokens × 8 experts). Soft MoE is measured from tokens
//! (d = 768, cosine logits included) and from precomputed logits. `run/log/4096x64` is what one
//! `Run.log_layer` call of 4,096 tokens × 64 experts costs: routing the logits and summing the
//! step's numbers (`logits`), or counting the framework's own top-2 picks with the entropy and
//! z-loss of its logits (`picks+logits`) or without them (`picks`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use routerscope::routing::{
    CapacitySpec, Mode, RouterConfig, RouterKind, SoftRouterParams, route_logits, route_soft,
    soft_weights,
};

fn normal(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn bench_sparse(c: &mut Criterion) {
    for (n, e) in [(196usize, 32usize), (1576, 8)] {
        let logits = normal(n * e, 1);
        let mut group = c.benchmark_group(format!("route/{n}x{e}"));
        for kind in RouterKind::ALL
            .into_iter()
            .filter(|k| *k != RouterKind::SoftMoe)
        {
            let cfg = RouterConfig::new(kind);
            group.bench_function(BenchmarkId::from_parameter(kind.cli_name()), |b| {
                b.iter(|| {
                    route_logits(black_box(&logits), n, e, &cfg, Mode::Deterministic).unwrap()
                })
            });
        }
        group.finish();
    }
}

fn bench_soft(c: &mut Criterion) {
    let (n, d, e) = (196usize, 768usize, 32usize);
    let mut group = c.benchmark_group(format!("route/{n}x{e}"));
    // p = 1 slot per expert (the Soft MoE paper's setting, same expert compute as k = 1 sparse
    // routers at CF 1) and p = 6 (vmoe's default round(n·CF/e) at CF 1).
    for p in [1usize, 6] {
        let cfg = RouterConfig {
            capacity: CapacitySpec::Slots(p),
            ..RouterConfig::new(RouterKind::SoftMoe)
        };
        let x = normal(n * d, 2);
        let mu = normal(d * e * p, 3);
        let params = SoftRouterParams {
            mu: &mu,
            dim: d,
            num_experts: e,
            num_slots: p,
            scale: 1.0,
        };
        group.bench_function(format!("soft-p{p}-from-tokens-d{d}"), |b| {
            b.iter(|| route_soft(black_box(&x), n, &params, &cfg, Mode::Deterministic).unwrap())
        });
        let logits = normal(n * e * p, 4);
        group.bench_function(format!("soft-p{p}-from-logits"), |b| {
            b.iter(|| soft_weights(black_box(logits.clone()), n, e * p))
        });
    }
    group.finish();
}

fn bench_run_log(c: &mut Criterion) {
    use routerscope::run::LayerSums;
    let (n, e, k) = (4096usize, 64usize, 2usize);
    let logits = normal(n * e, 5);
    let cfg = RouterConfig {
        k,
        ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
    };
    let picks: Vec<i64> = (0..n * k).map(|i| ((i * 7919) % e) as i64).collect();
    let mut group = c.benchmark_group(format!("run/log/{n}x{e}"));
    group.bench_function("logits", |b| {
        b.iter(|| {
            let r = route_logits(black_box(&logits), n, e, &cfg, Mode::Deterministic).unwrap();
            let mut s = LayerSums::new(e);
            s.add_routing(&r, Some(&logits), None);
            s
        })
    });
    group.bench_function("picks+logits", |b| {
        b.iter(|| {
            let mut s = LayerSums::new(e);
            s.add_picks(black_box(&picks), None, k, Some(&logits), None)
                .unwrap();
            s
        })
    });
    group.bench_function("picks", |b| {
        b.iter(|| {
            let mut s = LayerSums::new(e);
            s.add_picks(black_box(&picks), None, k, None, None).unwrap();
            s
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = bench_sparse, bench_soft, bench_run_log }
criterion_main!(benches);
