//! Runs: routing over training. A run is a folder (`NAME.rsrun/`, `docs/run-format.md`): one
//! SQLite database per training process (rank 0's `run.sqlite` with the run's description,
//! `ranks/rank-R.sqlite` for the others) holding, per committed step and MoE block, the sums of
//! what the router did; and `snapshots/step-NNNNNNNNN.rstrace.safetensors`, the per-token routing
//! of fixed probe images at chosen steps, each an ordinary routing trace.
//!
//! [`aggregate`] defines the per-step numbers once (the writer adds them up, the reader derives
//! the metrics), [`writer`] appends steps, [`reader`] opens a run with all its ranks and follows
//! it while it grows, [`alerts`] flags collapse, dead experts and drops.

pub mod aggregate;
pub mod alerts;
pub mod format;
pub mod reader;
pub mod report;
pub mod series;
pub mod writer;

pub use aggregate::{LayerMetrics, LayerSums};
pub use reader::{RunFile, StepInfo, is_run};
pub use writer::{ProbeImage, RunSpec, RunWriter};

use std::path::PathBuf;

/// Why a run could not be read or written; every message names the file and the row or entry.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {err}")]
    Sql { path: PathBuf, err: rusqlite::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}
