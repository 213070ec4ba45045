//! Probes the GPU backend's fixed costs on the current adapter: dispatch overhead (tiny GELU
//! launches) and the matmul kernel (both variants) at ViT-S/16 sizes. Used for the numbers in the
//! README's benchmark section; `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` pick the adapter.

use std::time::Instant;

use routerscope::gpu::GpuContext;
use routerscope::gpu::kernels::{Kernel, Matmul, flat_groups, upload};

fn main() -> anyhow::Result<()> {
    let ctx = GpuContext::headless()?;
    println!("{}", ctx.describe());
    let d = &ctx.device;
    let wait = || d.poll(wgpu::PollType::wait_indefinitely());
    let x = upload(d, "x", &vec![0.5f32; 1 << 16]);
    let y = upload(d, "y", &vec![0.5f32; 1 << 16]);
    for n in [1usize, 10, 100] {
        let t = Instant::now();
        let mut enc = d.create_command_encoder(&Default::default());
        for _ in 0..n {
            let params = [1024, 0, 0, 0];
            ctx.kernels.launch(
                d,
                &mut enc,
                Kernel::Gelu,
                &params,
                &[&x, &y],
                flat_groups(1024),
            );
        }
        ctx.queue.submit([enc.finish()]);
        wait()?;
        println!("{n} GELU dispatches: {:?}", t.elapsed());
    }
    for tiled in [false, true] {
        for (m, k, n) in [
            (197usize, 384usize, 1536usize),
            (197, 384, 1536),
            (12500, 64, 256),
        ] {
            let a = upload(d, "a", &vec![0.5f32; m * k]);
            let b = upload(d, "b", &vec![0.5f32; k * n]);
            let c = upload(d, "c", &vec![0.5f32; m * n]);
            let t = Instant::now();
            let mut enc = d.create_command_encoder(&Default::default());
            let (kernel, params, groups) = Matmul::plain(m, k, n).params(tiled);
            ctx.kernels
                .launch(d, &mut enc, kernel, &params, &[&a, &b, &a, &c], groups);
            ctx.queue.submit([enc.finish()]);
            wait()?;
            let s = t.elapsed().as_secs_f64();
            let gflops = 2.0 * (m * k * n) as f64 / s / 1e9;
            println!(
                "matmul {m}x{k} @ {k}x{n} ({kernel:?}): {:.1} ms, {gflops:.2} GFLOP/s",
                s * 1e3
            );
        }
    }
    Ok(())
}
