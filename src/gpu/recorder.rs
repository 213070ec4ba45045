//! Recording a run: kernels go into one command encoder with their parameters in a shared uniform
//! arena, and per-run buffers come from a workspace that is reused while the shapes stay.

use std::collections::HashMap;

use super::context::GpuContext;
use super::error::GpuError;
use super::kernels::{Kernel, Matmul, ParamArena, read_words, storage};

/// Records kernels into a command encoder; a host read submits what is recorded so far.
pub(crate) struct Recorder<'a> {
    pub ctx: &'a GpuContext,
    encoder: Option<wgpu::CommandEncoder>,
    params: ParamArena,
}

impl<'a> Recorder<'a> {
    pub fn new(ctx: &'a GpuContext) -> Self {
        Self {
            ctx,
            encoder: None,
            params: ParamArena::new(&ctx.device),
        }
    }

    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
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
        let ctx = self.ctx;
        let enc = self.encoder.get_or_insert_with(|| {
            ctx.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") })
        });
        let binding = self.params.push(&ctx.device, params);
        ctx.kernels
            .launch_with(&ctx.device, enc, k, binding, buffers, groups);
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
        self.encoder()
            .copy_buffer_to_buffer(src, 0, dst, 0, (len * 4) as u64);
    }

    /// Submits everything recorded and reads `len` words of each buffer.
    pub fn read(&mut self, reads: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<u32>>, GpuError> {
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
