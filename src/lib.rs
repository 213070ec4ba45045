//! routerscope: look inside vision Mixture-of-Experts models.
//!
//! - [`routing`]: the routers of "Routers in Vision Mixture of Experts" as pure functions.
//! - [`model`]: the ViT-MoE on candle, its checkpoints and image input.
//! - [`tensor_io`]: validated safetensors reading and atomic writing.

pub mod model;
pub mod routing;
pub mod runtime;
pub mod tensor_io;
