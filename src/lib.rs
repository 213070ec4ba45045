//! routerscope: look inside vision Mixture-of-Experts models.
//!
//! Layers, bottom up; a module only uses the ones above it in this list:
//! - [`routing`]: the routers of "Routers in Vision Mixture of Experts" as pure functions.
//! - [`files`], [`tensor_io`], [`runtime`]: inputs opened only as regular files, staged
//!   output folders; validated safetensors reading and atomic writing; thread settings.
//! - [`model`]: the ViT-MoE on candle (CPU), its checkpoints and image input.
//! - [`import`]: pretrained ViTs (timm, Hugging Face, Flax `.npz`, ONNX) and vmoe checkpoints
//!   read as routerscope models; [`moefy`]: a dense ViT split into experts.
//! - [`gpu`]: the same forward pass as WGSL compute shaders on wgpu.
//! - [`backend`]: the device choice and the engine that runs on the GPU with CPU fallback.
//! - [`trace`]: routing traces logged from any framework, read as routing records.
//! - [`run`]: routing over training: per-step sums in SQLite, probe snapshots as traces, alerts.
//! - [`train`]: training the built-in Fashion-MNIST models and evaluating them.
//! - [`analysis`]: routing statistics and the expert atlas over a whole dataset.
//! - [`figures`]: expert colours, per-image routing views, SVG/PNG/CSV/JSON export.
//! - [`catalog`]: the built-in models and sample images.
//! - [`app`] (feature `app`, on by default): the desktop viewer (eframe/egui).
//!
//! Without default features (`default-features = false`) nothing of the GUI stack is compiled.

pub mod analysis;
#[cfg(feature = "app")]
pub mod app;
pub mod backend;
pub mod catalog;
pub mod figures;
pub mod files;
pub mod format;
pub mod gpu;
pub mod import;
pub mod model;
pub mod moefy;
pub mod routing;
pub mod run;
pub mod runtime;
pub mod tensor_io;
pub mod trace;
pub mod train;
