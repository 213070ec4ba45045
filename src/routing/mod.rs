//! Routing: the unified dispatch/combine formulation of "Routers in Vision Mixture of Experts"
//! and its routers, as pure functions with no UI, matching google-research/vmoe in every discrete
//! decision (see `shared/spec/routers.md`).
//!
//! Entry points: [`route_logits`] for the sparse routers, [`route_soft`] for Soft MoE, both giving a
//! [`RoutingResult`]; [`moe_layer`] applies a routing to experts.

mod aux_loss;
mod capacity;
pub(crate) mod expert_choice;
#[cfg(test)]
pub(crate) mod golden;
mod layer;
pub mod ops;
mod options;
mod result;
pub(crate) mod router;
mod scot;
mod sinkhorn;
mod soft_moe;
pub(crate) mod token_choice;

pub use aux_loss::{gshard_loss, importance_loss, load_loss};
pub use capacity::{CapacityRounding, compute_capacity};
pub use layer::{Experts, MlpExperts, MoeLayerOutput, gelu_tanh, moe_layer};
pub use options::{ArgStyle, MAX_DENSE_OUTPUT_BYTES, RouteOptions, check_dense_size};
pub use result::{
    Assignment, AuxLosses, Choice, RoutingResult, RoutingStats, SoftAssignment, SolverInfo,
    SparseAssignment,
};
pub use router::{
    CapacitySpec, LossWeights, MAX_SOLVER_ITERATIONS, Mode, RouterConfig, RouterFamily, RouterKind,
    check_finite, route_logits, route_soft,
};
pub use scot::{ScotOptions, ScotPlan, scot_columns, sparse_simplex_projection};
pub use sinkhorn::{SinkhornPlan, sinkhorn_iterations, sinkhorn_plan};
pub use soft_moe::{SoftRouterParams, soft_logits, soft_weights};

/// Why a group could not be routed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RoutingError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("non-finite input: {0}")]
    NonFinite(String),
    #[error("impossible capacity: {0}")]
    Capacity(String),
    #[error("invalid router configuration: {0}")]
    InvalidConfig(String),
}

#[cfg(test)]
mod tests;
