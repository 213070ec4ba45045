//! MoEfication on small seeded dense models: the all-experts MoE is the dense model, the result
//! is deterministic, the clustering and the router fit recover planted structure, bad options are
//! clear errors.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::model::tests::tiny_config;
use crate::model::{Gelu, RunOptions, random_weights};
use crate::routing::{CapacitySpec, RouterKind};

/// A dense feature model with DINOv2's extras: LayerScale and the exact GELU.
fn dense_config() -> ModelConfig {
    let mut cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
    cfg.moe = None;
    cfg.num_classes = 0;
    cfg.class_names.clear();
    cfg.layer_scale = true;
    cfg.gelu = Gelu::Erf;
    cfg
}

/// Random dense weights with non-trivial biases and LayerScales.
fn dense_weights(cfg: &ModelConfig, seed: u64) -> ModelWeights {
    let mut w = random_weights(cfg, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    for (name, t) in w.iter_mut() {
        if name.ends_with("bias") || name.contains("LayerScale") {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-0.5..0.5));
        }
    }
    w
}

fn images(cfg: &ModelConfig, count: usize, seed: u64) -> Vec<Vec<f32>> {
    let px = cfg.image_size[0] * cfg.image_size[1] * cfg.channels;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| (0..px).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect()
}

fn options(experts: usize) -> MoefyOptions {
    MoefyOptions {
        experts,
        layers: vec![0, 2],
        router: RouterConfig {
            k: 2,
            ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
        },
        seed: 7,
        max_cluster_tokens: 64,
    }
}

/// With every expert chosen for every token (Token Choice, k = E, room for all), the MoE layers
/// sum all parts of the dense MLP plus its bias once: the features equal the dense model's.
#[test]
fn all_experts_in_capacity_is_the_dense_model() {
    let cfg = dense_config();
    let w = dense_weights(&cfg, 1);
    let imgs = images(&cfg, 6, 2);
    let (moe_cfg, moe_w, reports) =
        moefy(&cfg, w.clone(), &imgs[..4], &options(4), &mut |_, _, _| {}).unwrap();
    assert_eq!(reports.len(), 2);
    let moe = moe_cfg.moe.as_ref().unwrap();
    assert_eq!(moe.combine, Combine::Unit);
    assert_eq!(moe.expert_mlp_dim, Some(cfg.mlp_dim / 4));
    let dense = VitMoe::new(cfg.clone(), w).unwrap();
    let model = VitMoe::new(moe_cfg.clone(), moe_w).unwrap();
    let all = RunOptions::from_config(&moe_cfg).with_router(RouterConfig {
        k: 4,
        capacity: CapacitySpec::Factor(1.0),
        ..RouterConfig::new(RouterKind::SoftmaxTokenChoice)
    });
    let test = &imgs[4..];
    let want = dense.forward(test, &RunOptions::from_config(&cfg)).unwrap();
    let got = model.forward(test, &all).unwrap();
    for rec in &got.records {
        assert!(
            rec.groups
                .iter()
                .all(|g| g.routing.stats().dropped_choices == 0)
        );
    }
    let mut max = 0.0f32;
    for (a, b) in got
        .features
        .iter()
        .flatten()
        .zip(want.features.iter().flatten())
    {
        max = max.max((a - b).abs());
    }
    assert!(max < 1e-4, "max difference {max}");
    assert_eq!(got.features.len(), 2);
    assert_eq!(got.features[0].len(), cfg.seq_len() * cfg.hidden_size);
    // Top-2 of 4 is a different, sparser model.
    let sparse = model
        .forward(test, &RunOptions::from_config(&moe_cfg))
        .unwrap();
    assert_ne!(sparse.features, want.features);
}

/// One seed, one result; another seed may cluster differently.
#[test]
fn moefy_is_deterministic_for_a_seed() {
    let cfg = dense_config();
    let w = dense_weights(&cfg, 3);
    let imgs = images(&cfg, 3, 4);
    let run = |seed| {
        let mut o = options(2);
        o.seed = seed;
        moefy(&cfg, w.clone(), &imgs, &o, &mut |_, _, _| {}).unwrap()
    };
    let (c1, w1, _) = run(5);
    let (c2, w2, _) = run(5);
    assert_eq!(c1, c2);
    assert_eq!(w1, w2);
}

/// Points drawn around `groups` planted directions come back as those groups, each of the same
/// size.
#[test]
fn balanced_clusters_recover_planted_groups() {
    let (units, dim, groups) = (24, 10, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let centres: Vec<Vec<f32>> = (0..groups)
        .map(|g| {
            (0..dim)
                .map(|i| if i % groups == g { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    // Unit u belongs to planted group (u * 7) % 3, so the groups interleave.
    let planted: Vec<usize> = (0..units).map(|u| (u * 7) % groups).collect();
    let points: Vec<f32> = planted
        .iter()
        .flat_map(|&g| {
            centres[g]
                .iter()
                .map(|c| c + rng.random_range(0.0..0.2))
                .collect::<Vec<_>>()
        })
        .collect();
    let found = balanced_clusters(
        &points,
        units,
        dim,
        groups,
        &mut ChaCha8Rng::seed_from_u64(1),
    );
    assert_eq!(found.len(), groups);
    let mut seen = vec![false; units];
    for g in &found {
        assert_eq!(g.len(), units / groups);
        assert!(g.windows(2).all(|w| w[0] < w[1]));
        assert!(g.iter().all(|&u| planted[u] == planted[g[0]]), "{found:?}");
        for &u in g {
            assert!(!seen[u]);
            seen[u] = true;
        }
    }
}

/// Targets that are an exact linear function of the inputs give back that function.
#[test]
fn the_router_fit_recovers_a_linear_map() {
    let (t, d, e) = (200, 6, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let truth: Vec<f32> = (0..d * e).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<f32> = (0..t * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    // fit_router regresses e · mass, so hand it the map divided by e.
    let mass: Vec<f32> = y
        .chunks_exact(d)
        .flat_map(|row| {
            (0..e)
                .map(|j| (0..d).map(|i| row[i] * truth[i * e + j]).sum::<f32>() / e as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let got = fit_router(&y, d, &mass, e);
    for (a, b) in got.iter().zip(&truth) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
}

#[test]
fn bad_options_are_clear_errors() {
    let cfg = dense_config();
    let w = dense_weights(&cfg, 1);
    let imgs = images(&cfg, 1, 1);
    let err = |cfg: &ModelConfig, o: MoefyOptions, imgs: &[Vec<f32>]| {
        moefy(cfg, w.clone(), imgs, &o, &mut |_, _, _| {})
            .unwrap_err()
            .to_string()
    };
    let e = err(&cfg, options(5), &imgs);
    assert!(
        e.contains("5 experts do not split the 24 hidden units"),
        "{e}"
    );
    let mut o = options(4);
    o.layers = vec![3];
    assert!(err(&cfg, o, &imgs).contains("layer 3 is beyond the model's 3 blocks"));
    assert!(err(&cfg, options(4), &[]).contains("no calibration images"));
    let moe = tiny_config(RouterKind::SoftmaxTokenChoice);
    assert!(err(&moe, options(4), &imgs).contains("already has MoE layers"));
    let mut o = options(4);
    o.router = RouterConfig::new(RouterKind::SoftMoe);
    assert!(err(&cfg, o, &imgs).contains("Soft MoE"));
}
