use routerscope::gpu::GpuContext;
use routerscope::gpu::kernels::{Kernel, Matmul, flat_groups, upload};
use std::time::Instant;

fn main() {
    let ctx = GpuContext::headless().unwrap();
    println!("{}", ctx.describe());
    let d = &ctx.device;
    let x = upload(d, "x", &vec![0.5f32; 1 << 16]);
    let y = upload(d, "y", &vec![0.5f32; 1 << 16]);
    for n in [1usize, 10, 100] {
        let t = Instant::now();
        let mut enc = d.create_command_encoder(&Default::default());
        for _ in 0..n {
            ctx.kernels.launch(
                d,
                &mut enc,
                Kernel::Gelu,
                &[1024, 0, 0, 0],
                &[&x, &y],
                flat_groups(1024),
            );
        }
        ctx.queue.submit([enc.finish()]);
        d.poll(eframe::egui_wgpu::wgpu::PollType::wait_indefinitely())
            .unwrap();
        println!("{n} gelu dispatches: {:?}", t.elapsed());
    }
    for (m, k, n) in [
        (50usize, 64usize, 192usize),
        (197, 384, 1536),
        (197, 384, 1536),
        (12500, 64, 256),
    ] {
        let a = upload(d, "a", &vec![0.5f32; m * k]);
        let b = upload(d, "b", &vec![0.5f32; k * n]);
        let c = upload(d, "c", &vec![0.5f32; m * n]);
        let t = Instant::now();
        let mut enc = d.create_command_encoder(&Default::default());
        let (kk, p, g) = Matmul::plain(m, k, n).params(false);
        ctx.kernels
            .launch(d, &mut enc, kk, &p, &[&a, &b, &a, &c], g);
        ctx.queue.submit([enc.finish()]);
        d.poll(eframe::egui_wgpu::wgpu::PollType::wait_indefinitely())
            .unwrap();
        println!("matmul {m}x{k}x{n}: {:?}", t.elapsed());
    }
}
