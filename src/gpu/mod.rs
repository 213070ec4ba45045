//! GPU backend: the ViT-MoE forward pass and the routers as WGSL compute shaders (`shaders/`) on
//! wgpu (Vulkan, Metal, DX12, GL). The app computes on eframe's own device; the CLI, tests and
//! benchmarks create a headless one. The candle CPU path stays the reference (parity tests in
//! `tests.rs`) and the fallback (see `crate::backend`).

mod context;
pub mod kernels;
mod model;
mod moe;
pub mod parity;

pub use context::{GpuContext, GpuError, device_descriptor};
pub use model::{GpuVitMoe, MAX_TOKENS};

#[cfg(test)]
pub(crate) mod tests;
