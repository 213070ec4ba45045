//! routerscope: look inside vision Mixture-of-Experts models.
//!
//! - [`routing`]: the routers of "Routers in Vision Mixture of Experts" as pure functions.
//! - [`model`]: the ViT-MoE on candle, its checkpoints and image input.
//! - [`figures`]: expert colours and per-image routing views for the app and the exporters.
//! - [`train`]: training the built-in Fashion-MNIST models and evaluating them.
//! - [`app`]: the desktop viewer (eframe/egui), its worker thread and one module per panel.
//! - [`tensor_io`]: validated safetensors reading and atomic writing.

pub mod app;
pub mod backend;
pub mod figures;
pub mod gpu;
pub mod model;
pub mod routing;
pub mod runtime;
pub mod tensor_io;
pub mod train;
