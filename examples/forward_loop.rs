//! Runs one model's forward pass (or router what-if) in a loop, for profiling with `perf`:
//!
//! ```sh
//! cargo build --release --example forward_loop
//! perf record -g target/release/examples/forward_loop vit-s16 forward 30
//! ```
//!
//! Models: `fashion-mnist`, `vit-s16` (random weights), `vmoe-b16` (the released V-MoE-B/16 at
//! 384 px, random weights) or a checkpoint path; modes `forward` or `what-if`.

use std::time::Instant;

use routerscope::model::{
    ModelConfig, RunOptions, VitMoe, load_checkpoint, preset, random_weights, vmoe_b16_benchmark,
};
use routerscope::routing::{RouterConfig, RouterKind};

fn main() -> anyhow::Result<()> {
    // SAFETY: first statement of main, no other thread exists yet.
    unsafe { routerscope::runtime::pin_thread_count() };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("vit-s16", String::as_str);
    let mode = args.get(1).map_or("forward", String::as_str);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let (cfg, weights): (ModelConfig, _) = match name {
        "vmoe-b16" => {
            let cfg = vmoe_b16_benchmark();
            let w = random_weights(&cfg, 0);
            (cfg, w)
        }
        p if std::path::Path::new(p).is_file() => load_checkpoint(std::path::Path::new(p))?,
        p => {
            let cfg = preset(p, RouterKind::SoftmaxTokenChoice)
                .ok_or_else(|| anyhow::anyhow!("unknown model `{p}`"))?;
            let w = random_weights(&cfg, 0);
            (cfg, w)
        }
    };
    let model = VitMoe::new(cfg.clone(), weights)?;
    let image: Vec<f32> = (0..cfg.image_size[0] * cfg.image_size[1] * cfg.channels)
        .map(|i| ((i * 31 % 255) as f32 / 127.5) - 1.0)
        .collect();
    let images = vec![image];
    let opts = RunOptions::from_config(&cfg);
    let what_if = opts
        .clone()
        .with_router(RouterConfig::new(RouterKind::SoftmaxExpertChoice));
    let base = model.forward(&images, &opts)?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        match mode {
            "what-if" => model.rerun(&base, &what_if)?,
            _ => model.forward(&images, &opts)?,
        };
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{name} {mode}: median {:.3} ms (min {:.3}, n {n})",
        times[n / 2],
        times[0]
    );
    Ok(())
}
