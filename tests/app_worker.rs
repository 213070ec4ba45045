//! The app's compute thread on a model large enough to take a while: a run reports its progress
//! block by block, and a newer request stops it between two blocks instead of queueing behind it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::DynamicImage;
use routerscope::app::worker::{Job, Reply, RunRequest, Worker};
use routerscope::model::{
    Classifier, ModelConfig, MoeConfig, Normalization, RunOptions, random_weights, save_checkpoint,
};
use routerscope::routing::{RouterConfig, RouterKind};

/// 224 px, 197 tokens, 12 blocks, MoE in the last six: slow enough in a test build to be
/// interrupted, small enough to write quickly.
fn config() -> ModelConfig {
    ModelConfig {
        name: "slow".into(),
        image_size: [224, 224],
        channels: 3,
        patch_size: [16, 16],
        hidden_size: 192,
        num_layers: 12,
        num_heads: 3,
        mlp_dim: 768,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: 10,
        gelu: Default::default(),
        layer_scale: false,
        class_names: Vec::new(),
        normalization: Normalization {
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
        },
        layer_norm_eps: routerscope::model::DEFAULT_LAYER_NORM_EPS,
        cls_token: None,
        distillation_token: false,
        register_tokens: 0,
        fc_norm: false,
        moe: Some(MoeConfig {
            layers: vec![6, 7, 8, 9, 10, 11],
            num_experts: 4,
            router: RouterConfig::new(RouterKind::SoftmaxTokenChoice),
            group_images: 1,
            bfloat16_dispatch: false,
            combine: Default::default(),
            expert_mlp_dim: None,
        }),
    }
}

fn next(worker: &Worker) -> Reply {
    worker
        .recv_timeout(Duration::from_secs(300))
        .expect("the worker answers")
}

#[test]
fn a_newer_run_stops_the_running_one_between_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.safetensors");
    let cfg = config();
    save_checkpoint(&path, &cfg, &random_weights(&cfg, 1)).unwrap();
    let worker = Worker::spawn(|| {});
    worker.send(Job::OpenModel(path.clone()));
    assert!(matches!(next(&worker), Reply::ModelOpened(Ok(_))));

    let images: Vec<(u64, Arc<DynamicImage>)> = (0..24u64)
        .map(|i| {
            let img = image::RgbImage::from_fn(224, 224, |x, y| {
                image::Rgb([(x as u64 * 3 + i) as u8, y as u8, (x ^ y) as u8])
            });
            (i, Arc::new(DynamicImage::ImageRgb8(img)))
        })
        .collect();
    let request = |id: u64, router: RouterKind, model: &Path| {
        Job::Run(RunRequest {
            id,
            model: model.to_path_buf(),
            images: images.clone(),
            trace_ids: vec![None; images.len()],
            options: RunOptions::from_config(&cfg).with_router(RouterConfig::new(router)),
        })
    };
    let start = Instant::now();
    worker.send(request(1, RouterKind::SoftmaxTokenChoice, &path));
    // The first run reports blocks once it has taken 100 ms.
    let first_block = loop {
        match next(&worker) {
            Reply::RunProgress { id: 1, done, total } => {
                assert_eq!(total, 12);
                break done;
            }
            Reply::Ran(r) => panic!("run {} finished before reporting progress", r.id),
            Reply::RunFailed { error, .. } => panic!("{error}"),
            _ => {}
        }
    };
    assert!(first_block < 12);
    let one_block = start.elapsed() / first_block as u32;
    // A newer request (a router change) arrives while run 1 is in progress.
    let sent = Instant::now();
    worker.send(request(2, RouterKind::SoftmaxExpertChoice, &path));
    let mut superseded = None;
    loop {
        match next(&worker) {
            Reply::RunSuperseded { id: 1 } => superseded = Some(sent.elapsed()),
            Reply::Ran(r) => {
                assert_eq!(r.id, 2, "the superseded run must not deliver a result");
                assert_eq!(
                    r.output.options.routers[0].kind,
                    RouterKind::SoftmaxExpertChoice
                );
                assert!(!r.what_if, "run 1 left nothing to resume from");
                break;
            }
            Reply::RunFailed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    let stopped_after = superseded.expect("run 1 was stopped");
    // It stopped at the next block boundary, not after the remaining blocks.
    assert!(
        stopped_after < one_block * 3 + Duration::from_millis(500),
        "stopped {stopped_after:?} after the request; one block takes {one_block:?}"
    );
}
