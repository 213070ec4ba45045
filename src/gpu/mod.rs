//! GPU backend: the ViT-MoE forward pass and the routers as WGSL compute shaders (`shaders/`) on
//! wgpu (Vulkan, Metal, DX12, GL). The app computes on eframe's own device; the CLI, tests and
//! benchmarks create a headless one. The candle CPU path stays the reference (parity tests in
//! `tests.rs`) and the fallback (see `crate::backend`).

//!
//! Files, bottom up (each uses only those before it): `error`, `kernels` (pipelines, launches,
//! buffers, readback), `context` (the device), `recorder` (one run's command encoder and
//! workspace), `layers` (linear, LayerNorm, MLPs), `moe` (one MoE layer), `model` (the ViT-MoE),
//! `parity` (comparison with the CPU model).

mod context;
mod error;
pub mod kernels;
mod layers;
mod model;
mod moe;
pub mod parity;
mod recorder;

pub use context::{GpuContext, device_descriptor};
pub use error::GpuError;
pub use model::{GpuVitMoe, MAX_TOKENS, computed_on_gpu};
pub use recorder::RunStats;

#[cfg(test)]
pub(crate) mod tests;
