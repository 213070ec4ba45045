//! The GPU backend against the candle CPU path, end to end: every shipped model on every sample
//! image, under its own router and every other router its weights allow (what-ifs, both as full
//! runs and as GPU reruns from the first MoE layer), and on the first 250 images of the
//! committed Fashion-MNIST slice under its own router. Expert assignments must be identical except where
//! the deciding scores tie within float error (counted and printed), class probabilities within
//! 1e-3. With `ROUTERSCOPE_REQUIRE_GPU=1` (CI) a missing adapter fails the test.

mod common;

use routerscope::catalog::sample_images;
use routerscope::gpu::parity::{ParityReport, compare};
use routerscope::gpu::{GpuContext, GpuVitMoe};
use routerscope::model::{RunOptions, VitMoe, decode_image, load_checkpoint, preprocess};
use routerscope::routing::{CapacitySpec, RouterConfig, RouterKind};
use routerscope::train::{Dataset, Split};

/// Images of the committed test slice per model (the software adapter runs ~1 GFLOP/s).
const SLICE_IMAGES: usize = 250;

fn gpu() -> Option<GpuContext> {
    match GpuContext::headless() {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            assert!(
                std::env::var("ROUTERSCOPE_REQUIRE_GPU").as_deref() != Ok("1"),
                "ROUTERSCOPE_REQUIRE_GPU=1 but no GPU device: {e}"
            );
            eprintln!("no GPU adapter, GPU parity skipped: {e}");
            None
        }
    }
}

fn check(what: &str, r: &ParityReport) {
    assert!(r.max_prob_diff < 1e-3, "{what}: {r:?}");
    assert_eq!(
        r.mismatches, 0,
        "{what}: assignments differ without a tie: {r:?}"
    );
    assert!(r.max_logit_diff < 1e-3, "{what}: {r:?}");
}

#[test]
fn shipped_models_agree_on_gpu_and_cpu() {
    let Some(ctx) = gpu() else { return };
    eprintln!("GPU: {}", ctx.describe());
    let slice = Dataset::load(&common::fixture_dir(), Split::Test).unwrap();
    let mut total = ParityReport::default();
    let mut runs = 0;
    for name in common::MODELS {
        let path = common::model_path(name);
        let (cfg, weights) = load_checkpoint(&path).unwrap();
        let gpu = GpuVitMoe::new(&ctx, &cfg, &weights).unwrap();
        let cpu = VitMoe::new(cfg.clone(), weights).unwrap();

        let images: Vec<Vec<f32>> = sample_images()
            .iter()
            .map(|p| preprocess(&decode_image(p).unwrap(), &cfg).unwrap())
            .collect();
        assert!(images.len() >= 18);
        let own = RunOptions::from_config(&cfg);
        let mut option_sets = vec![own.clone()];
        if cfg.moe.is_some() {
            for kind in RouterKind::ALL {
                let mut r = RouterConfig::new(kind);
                if kind == RouterKind::SoftMoe {
                    r.capacity = CapacitySpec::Slots(8);
                }
                let opts = own.clone().with_router(r);
                if cpu.check_options(&opts, images.len()).is_ok() && opts != own {
                    option_sets.push(opts);
                }
            }
        }
        let gpu_own = gpu.forward(&images, &own).unwrap();
        for opts in &option_sets {
            let a = cpu.forward(&images, opts).unwrap();
            let b = gpu.forward(&images, opts).unwrap();
            let what = format!("{name} under {:?}", opts.routers.first().map(|r| r.kind));
            let r = compare(&a, &b);
            check(&what, &r);
            total.merge(&r);
            let c = gpu.rerun(&gpu_own, opts).unwrap();
            let r = compare(&a, &c);
            check(&format!("{what}, GPU what-if"), &r);
            total.merge(&r);
            runs += 2;
        }

        // The test slice under the model's own router: same predictions, same routing.
        let (mean, std) = (cfg.normalization.mean[0], cfg.normalization.std[0]);
        let px: Vec<Vec<f32>> = (0..slice.len().min(SLICE_IMAGES))
            .map(|i| slice.normalized(i, mean, std).collect())
            .collect();
        for batch in px.chunks(250) {
            let a = cpu.forward(batch, &own).unwrap();
            let b = gpu.forward(batch, &own).unwrap();
            let r = compare(&a, &b);
            check(&format!("{name} on the test slice"), &r);
            total.merge(&r);
            runs += 1;
        }
    }
    eprintln!(
        "GPU vs CPU, {runs} runs, {} images: {} sparse-routed tokens, {} differ by a tie (in {} \
         images), {} differ otherwise; max |Δp| {:.2e} (images with a tie: {:.2e}), max |Δlogit| \
         {:.2e}, max |Δscore/weight| {:.2e}",
        total.images,
        total.tokens,
        total.tie_mismatches,
        total.images_with_ties,
        total.mismatches,
        total.max_prob_diff,
        total.max_prob_diff_tied,
        total.max_logit_diff,
        total.max_weight_diff
    );
}
