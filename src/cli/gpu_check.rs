//! `routerscope gpu-check`: the GPU backend on this machine's adapter, in one binary (the GPU
//! machine has no Rust toolchain, and test executables are too large to carry several): parity
//! against the CPU on the shipped models, then one-image timings of the benchmark models on the
//! CPU and the GPU with what each GPU run records, printed as one table.

use std::path::PathBuf;
use std::time::Instant;

use routerscope::catalog;
use routerscope::gpu::parity::{ParityReport, compare};
use routerscope::gpu::{GpuContext, GpuVitMoe, RunStats};
use routerscope::model::{
    ModelConfig, ModelWeights, RunOptions, VitMoe, load_checkpoint, load_image, preset,
    random_weights, vmoe_b16_benchmark,
};
use routerscope::routing::{RouterConfig, RouterKind};
use routerscope::train::{Dataset, Split};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct GpuCheckArgs {
    /// Also run on a software adapter (lavapipe), to try the check where there is no GPU.
    #[arg(long)]
    allow_software: bool,
    /// Models to time (comma-separated): fashion-mnist, vit-s16, vmoe-b16, photo.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fashion-mnist,vit-s16,vmoe-b16,photo"
    )]
    models: Vec<String>,
    /// Timed runs per row, after one warm-up (the median is reported).
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Images of the built-in Fashion-MNIST slice per shipped model in the parity check.
    #[arg(long, default_value_t = 250)]
    parity_images: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: &GpuCheckArgs) -> anyhow::Result<()> {
    let ctx = GpuContext::headless().map_err(|e| anyhow::anyhow!("no GPU adapter: {e}"))?;
    if ctx.is_software() && !args.allow_software {
        anyhow::bail!(
            "the adapter is a software one ({}); pass --allow-software to run the check on it",
            ctx.describe()
        );
    }
    println!("adapter: {}", ctx.describe());
    let started = Instant::now();
    let parity = parity(&ctx, args.parity_images)?;
    let mut failed = false;
    println!(
        "\n| parity (GPU vs CPU) | images | tokens | ties | mismatches | max Δp | max Δlogit | max Δfeature | max 1 − cos |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, r) in &parity {
        let bad = r.mismatches > 0
            || r.max_prob_diff >= 1e-3
            || r.max_logit_diff >= 1e-3
            || r.max_feature_diff > 1e-3
            || r.max_feature_cosine_gap > 1e-5;
        failed |= bad;
        println!(
            "| {name}{} | {} | {} | {} | {} | {:.1e} | {:.1e} | {:.1e} | {:.1e} |",
            if bad { " **FAIL**" } else { "" },
            r.images,
            r.tokens,
            r.tie_mismatches,
            r.mismatches,
            r.max_prob_diff,
            r.max_logit_diff,
            r.max_feature_diff,
            r.max_feature_cosine_gap
        );
    }
    println!("(parity: {:.1} s)", started.elapsed().as_secs_f64());

    println!(
        "\n| model | CPU forward | GPU forward | CPU what-if | GPU what-if | GPU launches / bind groups / passes / submits | readback | host encode |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for name in &args.models {
        let (cfg, weights) = model(name)?;
        let row = time_model(&ctx, name, &cfg, weights, args.iterations);
        println!("{}", row.markdown());
        rows.push(row);
    }
    if let Some(path) = &args.json {
        let v = json!({
            "adapter": ctx.describe(),
            "parity": parity.iter().map(|(n, r)| json!({
                "model": n, "images": r.images, "tokens": r.tokens, "ties": r.tie_mismatches,
                "mismatches": r.mismatches, "max_prob_diff": r.max_prob_diff,
                "max_logit_diff": r.max_logit_diff, "max_feature_diff": r.max_feature_diff,
                "max_feature_cosine_gap": r.max_feature_cosine_gap,
            })).collect::<Vec<_>>(),
            "timings": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        routerscope::tensor_io::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if failed {
        anyhow::bail!("GPU parity failed (rows marked FAIL above)");
    }
    Ok(())
}

/// Every shipped Fashion-MNIST model under its own router on the first `n` slice images, and
/// under every router its weights allow on the sample images (a model left behind, as
/// `scripts/gpu-check.sh` does to fit the transfer, is replaced by a seeded random one and says
/// so); then the photo model on the sample photos (see [`photo_parity`]).
fn parity(ctx: &GpuContext, n: usize) -> anyhow::Result<Vec<(String, ParityReport)>> {
    let slice = Dataset::load(&catalog::fashion_mnist_slice(), Split::Test)?;
    let n = n.min(slice.len());
    let mut out = Vec::new();
    for kind in catalog::TRAINED_ROUTERS {
        let (path, trained) = catalog::model_for(kind).map_err(anyhow::Error::msg)?;
        let (cfg, weights) = load_checkpoint(&path)?;
        let gpu = GpuVitMoe::new(ctx, &cfg, &weights)?;
        let cpu = VitMoe::new(cfg.clone(), weights)?;
        let mut report = ParityReport::default();
        let (mean, std) = (cfg.normalization.mean[0], cfg.normalization.std[0]);
        let images: Vec<Vec<f32>> = (0..n)
            .map(|i| slice.normalized(i, mean, std).collect())
            .collect();
        let opts = RunOptions::from_config(&cfg);
        report.merge(&compare(
            &cpu.forward(&images, &opts)?,
            &gpu.forward(&images, &opts)?,
            cfg.hidden_size,
        ));
        let samples: Vec<Vec<f32>> = catalog::sample_images()
            .iter()
            .filter(|p| p.to_string_lossy().contains("fmnist"))
            .map(|p| load_image(p, &cfg))
            .collect::<Result<_, _>>()?;
        for other in RouterKind::ALL {
            let opts = RunOptions::from_config(&cfg).with_router(RouterConfig {
                capacity: match other {
                    RouterKind::SoftMoe => routerscope::routing::CapacitySpec::Slots(1),
                    _ => RouterConfig::new(other).capacity,
                },
                ..RouterConfig::new(other)
            });
            // Routers whose parameters the checkpoint lacks (Soft MoE on a sparse one) are skipped.
            let (Ok(c), Ok(g)) = (cpu.forward(&samples, &opts), gpu.forward(&samples, &opts))
            else {
                continue;
            };
            report.merge(&compare(&c, &g, cfg.hidden_size));
        }
        let name = match trained {
            true => cfg.name.clone(),
            false => format!("{} (not here: a random stand-in)", cfg.name),
        };
        out.push((name, report));
    }
    out.extend(photo_parity(ctx)?);
    Ok(out)
}

/// The photo model (DINOv2-S/14 MoE: LayerScale, erf GELU, unit combine, narrow experts, no
/// head) on the sample photos: its own run, then every sparse router at k = 1, 2 and 4 (Expert
/// Choice at capacity factor 1.25·k, the same compute) as what-ifs from it; and each distilled
/// photo model that is here under its own router.
fn photo_parity(ctx: &GpuContext) -> anyhow::Result<Vec<(String, ParityReport)>> {
    let base = catalog::photo_model();
    if !base.is_file() {
        return Ok(Vec::new());
    }
    let (cfg, weights) = load_checkpoint(&base)?;
    let photos: Vec<Vec<f32>> = catalog::sample_images()
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("photo-"))
        })
        .map(|p| load_image(p, &cfg))
        .collect::<Result<_, _>>()?;
    let gpu = GpuVitMoe::new(ctx, &cfg, &weights)?;
    let cpu = VitMoe::new(cfg.clone(), weights)?;
    let own = RunOptions::from_config(&cfg);
    let (c0, g0) = (cpu.forward(&photos, &own)?, gpu.forward(&photos, &own)?);
    let mut report = compare(&c0, &g0, cfg.hidden_size);
    for kind in RouterKind::ALL {
        if kind == RouterKind::SoftMoe {
            continue;
        }
        for k in [1, 2, 4] {
            let mut r = RouterConfig::new(kind);
            match kind.family() {
                routerscope::routing::RouterFamily::TokenChoice => {
                    r.k = k;
                    r.capacity = routerscope::routing::CapacitySpec::Factor(1.25);
                }
                _ => r.capacity = routerscope::routing::CapacitySpec::Factor(1.25 * k as f64),
            }
            let opts = own.clone().with_router(r);
            report.merge(&compare(
                &cpu.rerun(&c0, &opts)?,
                &gpu.rerun(&g0, &opts)?,
                cfg.hidden_size,
            ));
        }
    }
    let mut out = vec![(
        "photo model, 5 sparse routers × k = 1, 2, 4".to_string(),
        report,
    )];
    for kind in catalog::PHOTO_ROUTERS {
        let Some(path) = catalog::photo_model_for(kind).filter(|p| p.is_file()) else {
            continue;
        };
        let (dcfg, dw) = load_checkpoint(&path)?;
        let opts = RunOptions::from_config(&dcfg);
        let g = GpuVitMoe::new(ctx, &dcfg, &dw)?.forward(&photos, &opts)?;
        let c = VitMoe::new(dcfg.clone(), dw)?.forward(&photos, &opts)?;
        out.push((
            format!("photo-{}", kind.cli_name()),
            compare(&c, &g, dcfg.hidden_size),
        ));
    }
    Ok(out)
}

/// A benchmark model: the presets with seeded random weights (as `cargo bench --bench model`),
/// or the shipped photo model.
fn model(name: &str) -> anyhow::Result<(ModelConfig, ModelWeights)> {
    match name {
        "photo" => Ok(load_checkpoint(&catalog::photo_model())?),
        "vmoe-b16" => {
            let cfg = vmoe_b16_benchmark();
            let w = random_weights(&cfg, 0);
            Ok((cfg, w))
        }
        p => {
            let cfg = preset(p, RouterKind::SoftmaxTokenChoice).ok_or_else(|| {
                anyhow::anyhow!("unknown model `{p}` (fashion-mnist, vit-s16, vmoe-b16, photo)")
            })?;
            let w = random_weights(&cfg, 0);
            Ok((cfg, w))
        }
    }
}

struct Row {
    name: String,
    cpu: [f64; 2],
    gpu: Result<([f64; 2], [RunStats; 2]), String>,
}

impl Row {
    fn markdown(&self) -> String {
        let ms = |v: f64| format!("{v:.2} ms");
        match &self.gpu {
            Ok((t, [f, w])) => format!(
                "| {} | {} | {} | {} | {} | {} / {} / {} / {} (what-if {} / {} / {} / {}) | {} KB | {:.2} ms |",
                self.name,
                ms(self.cpu[0]),
                ms(t[0]),
                ms(self.cpu[1]),
                ms(t[1]),
                f.launches,
                f.bind_groups,
                f.passes,
                f.submits,
                w.launches,
                w.bind_groups,
                w.passes,
                w.submits,
                f.readback_bytes / 1024,
                f.encode_time.as_secs_f64() * 1e3
            ),
            Err(why) => format!(
                "| {} | {} | {why} | {} | — | — | — | — |",
                self.name,
                ms(self.cpu[0]),
                ms(self.cpu[1])
            ),
        }
    }

    fn json(&self) -> serde_json::Value {
        let stats = |s: &RunStats| {
            json!({"launches": s.launches, "bind_groups": s.bind_groups, "passes": s.passes,
                   "copies": s.copies, "submits": s.submits, "readback_bytes": s.readback_bytes,
                   "encode_ms": s.encode_time.as_secs_f64() * 1e3})
        };
        json!({
            "model": self.name,
            "cpu_forward_ms": self.cpu[0],
            "cpu_what_if_ms": self.cpu[1],
            "gpu": match &self.gpu {
                Ok((t, s)) => json!({"forward_ms": t[0], "what_if_ms": t[1],
                                     "forward": stats(&s[0]), "what_if": stats(&s[1])}),
                Err(e) => json!({"skipped": e}),
            },
        })
    }
}

/// Median wall time of `f` over `n` runs after one warm-up, in ms.
fn median_ms<T>(n: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    f()?;
    let mut t: Vec<f64> = (0..n.max(1))
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<anyhow::Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn time_model(
    ctx: &GpuContext,
    name: &str,
    cfg: &ModelConfig,
    weights: ModelWeights,
    n: usize,
) -> Row {
    let image: Vec<f32> = (0..cfg.image_size[0] * cfg.image_size[1] * cfg.channels)
        .map(|i| ((i * 31 % 255) as f32 / 127.5) - 1.0)
        .collect();
    let images = vec![image];
    let opts = RunOptions::from_config(cfg);
    let what_if = opts
        .clone()
        .with_router(RouterConfig::new(RouterKind::SoftmaxExpertChoice));
    let gpu = if ctx.is_software() && name == "vmoe-b16" {
        Err("skipped on a software adapter (minutes per run)".to_string())
    } else {
        GpuVitMoe::new(ctx, cfg, &weights).map_err(|e| e.to_string())
    };
    let cpu_model = VitMoe::new(cfg.clone(), weights);
    let cpu = cpu_model
        .map_err(anyhow::Error::from)
        .and_then(|m| {
            let base = m.forward(&images, &opts)?;
            Ok([
                median_ms(n, || Ok(m.forward(&images, &opts)?))?,
                median_ms(n, || Ok(m.rerun(&base, &what_if)?))?,
            ])
        })
        .unwrap_or([f64::NAN; 2]);
    let gpu = gpu.and_then(|g| {
        (|| {
            let base = g.forward(&images, &opts)?;
            let fwd = median_ms(n, || Ok(g.forward(&images, &opts)?))?;
            let fwd_stats = g.last_run_stats();
            let wi = median_ms(n, || Ok(g.rerun(&base, &what_if)?))?;
            Ok::<_, anyhow::Error>(([fwd, wi], [fwd_stats, g.last_run_stats()]))
        })()
        .map_err(|e| e.to_string())
    });
    Row {
        name: cfg.name.clone(),
        cpu,
        gpu,
    }
}
