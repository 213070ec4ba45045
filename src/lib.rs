//! routerscope: look inside vision Mixture-of-Experts models.
//!
//! - [`routing`]: the routers of "Routers in Vision Mixture of Experts" as pure functions.
//! - [`tensor_io`]: validated safetensors reading and atomic writing.

pub mod routing;
pub mod tensor_io;
