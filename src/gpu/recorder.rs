//! Recording a run: kernels go into one command encoder, consecutive launches into one compute
//! pass, with their parameters in a shared uniform arena; per-run buffers come from a workspace
//! that is reused while the shapes stay. The recorder counts what it records ([`RunStats`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::context::GpuContext;
use super::error::GpuError;
use super::kernels::{Kernel, Matmul, ParamArena, read_words, storage};

/// What one run recorded and read back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Kernel dispatches.
    pub launches: usize,
    /// Bind groups created (one per launch).
    pub bind_groups: usize,
    /// Compute passes (a pass ends at a buffer copy or a host read).
    pub passes: usize,
    /// Buffer-to-buffer copies.
    pub copies: usize,
    /// Submissions to the queue, each followed by a host read.
    pub submits: usize,
    /// Bytes read back to the host.
    pub readback_bytes: usize,
    /// Host time spent recording (launches, copies), not waiting for the GPU.
    pub encode_time: Duration,
}

/// Records kernels into a command encoder; a host read submits what is recorded so far.
pub(crate) struct Recorder<'a> {
    pub ctx: &'a GpuContext,
    encoder: Option<wgpu::CommandEncoder>,
    /// The open pass; it locks `encoder` until dropped.
    pass: Option<wgpu::ComputePass<'static>>,
    params: ParamArena,
    pub stats: RunStats,
}

impl<'a> Recorder<'a> {
    pub fn new(ctx: &'a GpuContext) -> Self {
        Self {
            ctx,
            encoder: None,
            pass: None,
            params: ParamArena::new(&ctx.device),
            stats: RunStats::default(),
        }
    }

    /// The encoder, with any open pass ended first.
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.get_or_insert_with(|| {
            self.ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") })
        })
    }

    pub fn launch(
        &mut self,
        k: Kernel,
        params: &[u32],
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) {
        let start = Instant::now();
        let ctx = self.ctx;
        let binding = self.params.push(&ctx.device, params);
        if self.pass.is_none() {
            let enc = self.encoder.get_or_insert_with(|| {
                ctx.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") })
            });
            let pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            self.pass = Some(pass.forget_lifetime());
            self.stats.passes += 1;
        }
        if let Some(pass) = self.pass.as_mut() {
            ctx.kernels
                .dispatch_in(&ctx.device, pass, k, binding, buffers, groups);
        }
        self.stats.launches += 1;
        self.stats.bind_groups += 1;
        self.stats.encode_time += start.elapsed();
    }

    pub fn matmul(
        &mut self,
        mm: Matmul,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
        c: &wgpu::Buffer,
    ) {
        let (kernel, params, groups) = mm.params(self.ctx.tiled_matmul);
        let unused = &self.ctx.kernels.dummy;
        self.launch(kernel, &params, &[a, b, bias.unwrap_or(unused), c], groups);
    }

    pub fn copy(&mut self, src: &wgpu::Buffer, dst: &wgpu::Buffer, len: usize) {
        let start = Instant::now();
        self.encoder()
            .copy_buffer_to_buffer(src, 0, dst, 0, (len * 4) as u64);
        self.stats.copies += 1;
        self.stats.encode_time += start.elapsed();
    }

    /// Submits everything recorded and reads `len` words of each buffer.
    pub fn read(&mut self, reads: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<u32>>, GpuError> {
        self.pass = None;
        self.stats.submits += 1;
        self.stats.readback_bytes += reads.iter().map(|(_, n)| n * 4).sum::<usize>();
        let enc = match self.encoder.take() {
            Some(e) => e,
            None => self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("read"),
                }),
        };
        self.params.flush(&self.ctx.queue);
        read_words(&self.ctx.device, &self.ctx.queue, enc, reads)
    }
}

/// Per-run buffers by name, reused while they are large enough.
#[derive(Default)]
pub(crate) struct Workspace {
    buffers: HashMap<String, (wgpu::Buffer, usize)>,
}

impl Workspace {
    /// A buffer of at least `len` values named `name` (its contents are undefined).
    pub fn get(&mut self, device: &wgpu::Device, name: &str, len: usize) -> wgpu::Buffer {
        let len = len.max(4);
        match self.buffers.get(name) {
            Some((b, have)) if *have >= len => b.clone(),
            _ => {
                let b = storage(device, name, len);
                self.buffers.insert(name.to_string(), (b.clone(), len));
                b
            }
        }
    }
}
