//! Training tests on the committed Fashion-MNIST slice with a small architecture.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::data::{Dataset, Split};
use super::net::{NetMode, TrainNet, cross_entropy};
use super::trainer::{TrainOptions, Trainer, batch_tensor, epoch_rng, state_path};
use crate::model::{RunOptions, VitMoe, load_checkpoint, preset, random_weights};
use crate::routing::{CapacitySpec, RouterConfig, RouterKind};

pub(crate) fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/datasets/fashion-mnist-slice")
}

/// The Fashion-MNIST preset shrunk for fast tests (same image size, patching and MoE layout).
fn small_config(kind: Option<RouterKind>) -> crate::model::ModelConfig {
    let mut cfg = preset(
        "fashion-mnist",
        kind.unwrap_or(RouterKind::SoftmaxTokenChoice),
    )
    .expect("preset exists");
    cfg.hidden_size = 16;
    cfg.mlp_dim = 32;
    cfg.num_heads = 2;
    cfg.num_layers = 4;
    match (&mut cfg.moe, kind) {
        (Some(m), Some(_)) => m.layers = vec![1, 3],
        (_, None) => cfg.moe = None,
        _ => {}
    }
    cfg
}

fn labels_tensor(labels: &[u8]) -> Tensor {
    Tensor::from_vec(
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        labels.len(),
        &Device::Cpu,
    )
    .unwrap()
}

fn all_kinds() -> Vec<Option<RouterKind>> {
    let mut v: Vec<_> = RouterKind::ALL.into_iter().map(Some).collect();
    v.push(None);
    v
}

/// The training graph in evaluation mode computes what the inference model computes.
#[test]
fn training_graph_matches_the_inference_model() {
    let data = Dataset::load(&fixture_dir(), Split::Test).unwrap().take(6);
    for kind in all_kinds() {
        let cfg = small_config(kind);
        let weights = random_weights(&cfg, 3);
        let net = TrainNet::from_weights(cfg.clone(), &weights).unwrap();
        let model = VitMoe::new(cfg.clone(), weights).unwrap();
        let idx: Vec<usize> = (0..data.len()).collect();
        let x = batch_tensor(&data, &idx, &cfg).unwrap();
        let router = cfg
            .moe
            .as_ref()
            .map_or(RouterConfig::new(RouterKind::SoftmaxTokenChoice), |m| {
                m.router.clone()
            });
        let out = net
            .forward::<rand_chacha::ChaCha8Rng>(&x, &router, &mut NetMode::Eval)
            .unwrap();
        let probs = super::net::softmax_last(&out.logits)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let images: Vec<Vec<f32>> = (0..data.len())
            .map(|i| x.get(i).unwrap().to_vec1().unwrap())
            .collect();
        let want = model
            .forward(&images, &RunOptions::from_config(&cfg))
            .unwrap();
        for (a, b) in probs.iter().flatten().zip(want.probs.iter().flatten()) {
            assert!((a - b).abs() < 1e-4, "{kind:?}: {a} vs {b}");
        }
    }
}

/// One step lowers the loss on the batch it was taken on, for every router and the dense model.
#[test]
fn one_step_lowers_the_loss_on_its_batch() {
    let data = Dataset::load(&fixture_dir(), Split::Train).unwrap();
    let idx: Vec<usize> = (0..64).collect();
    let labels: Vec<u8> = idx.iter().map(|&i| data.labels[i]).collect();
    for kind in all_kinds() {
        let cfg = small_config(kind);
        let opts = TrainOptions {
            epochs: 1,
            batch_size: 64,
            seed: 1,
            peak_lr: 3e-3,
            weight_decay: 0.0,
            warmup_steps: 1,
        };
        let mut trainer = Trainer::new(cfg.clone(), opts, 10).unwrap();
        let x = batch_tensor(&data, &idx, &cfg).unwrap();
        let router = cfg
            .moe
            .as_ref()
            .map_or(RouterConfig::new(RouterKind::SoftmaxTokenChoice), |m| {
                m.router.clone()
            });
        let loss = |t: &Trainer| {
            let out = t
                .net
                .forward::<rand_chacha::ChaCha8Rng>(&x, &router, &mut NetMode::Eval)
                .unwrap();
            cross_entropy(&out.logits, &labels_tensor(&labels))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let before = loss(&trainer);
        trainer.step(&x, &labels, &mut epoch_rng(1, 0)).unwrap();
        let after = loss(&trainer);
        assert!(after < before, "{kind:?}: loss {before} -> {after}");
        assert_eq!(trainer.state.step, 1);
    }
}

/// An interrupted run resumed from its epoch checkpoint ends with exactly the weights of an
/// uninterrupted run.
#[test]
fn resume_continues_from_the_saved_step() {
    let data = Dataset::load(&fixture_dir(), Split::Train)
        .unwrap()
        .take(256);
    let mut cfg = small_config(Some(RouterKind::SoftmaxTokenChoice));
    if let Some(m) = &mut cfg.moe {
        m.router.capacity = CapacitySpec::Factor(1.0);
    }
    let opts = TrainOptions {
        epochs: 2,
        batch_size: 64,
        seed: 5,
        peak_lr: 1e-3,
        weight_decay: 0.05,
        warmup_steps: 2,
    };
    let dir = tempfile::tempdir().unwrap();
    let steps = data.len() / opts.batch_size;

    let straight = dir.path().join("straight.safetensors");
    let mut t = Trainer::new(cfg.clone(), opts.clone(), steps).unwrap();
    t.run(&data, &straight, |_| true).unwrap();
    assert_eq!(t.state.step, 2 * steps);

    // Stop after the first epoch, then resume.
    let parts = dir.path().join("parts.safetensors");
    let mut first = Trainer::new(cfg.clone(), opts.clone(), steps).unwrap();
    first.run(&data, &parts, |_| false).unwrap();
    let mut resumed = Trainer::resume(&parts, steps).unwrap();
    assert_eq!(resumed.state.epochs_done, 1);
    assert_eq!(resumed.state.step, steps);
    assert_eq!(resumed.optim.step, steps);
    let reports = resumed.run(&data, &parts, |_| true).unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].epoch, 2);
    assert_eq!(resumed.state.step, 2 * steps);

    let (_, a) = load_checkpoint(&straight).unwrap();
    let (_, b) = load_checkpoint(&parts).unwrap();
    assert_eq!(a, b, "resumed run differs from the uninterrupted one");
    assert!(state_path(&parts).exists());
}

#[test]
fn resume_without_state_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(Some(RouterKind::SoftmaxExpertChoice));
    let path = dir.path().join("m.safetensors");
    crate::model::save_checkpoint(&path, &cfg, &random_weights(&cfg, 1)).unwrap();
    let err = Trainer::resume(&path, 4).err().unwrap().to_string();
    assert!(
        err.contains("m.train-state.safetensors") && err.contains("no training state"),
        "{err}"
    );
}
