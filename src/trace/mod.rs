//! Routing traces: the routing of any framework's MoE, logged to one safetensors file (format in
//! [`format`] and `docs/trace-format.md`), read back as the same routing records a model run
//! produces, so that every view, figure and analysis works on it, and re-routed under any router
//! where the trace holds the router's logits.
//!
//! [`TraceFile`] opens and validates a trace; [`TraceModel`] runs "forward" over its images (the
//! logged routing, or a what-if on the logged logits of each layer).

mod assignment;
pub mod diff;
pub mod format;
mod model;
mod reader;

pub use model::{TraceModel, is_trace_file};
pub use reader::{MAX_TRACE_ITEMS, TraceFile};

use std::path::PathBuf;

/// Parses JSON `json` (described as `what` in errors), naming the entry that is wrong
/// (`` what: `images[3].label`: invalid type: ... ``).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    json: &str,
    what: &str,
) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let at = e.path().to_string();
        if at == "." || at.is_empty() {
            format!("{what}: {}", e.inner())
        } else {
            format!("{what}: `{at}`: {}", e.inner())
        }
    })
}

/// Why a trace could not be read; every message names the file and the tensor or entry.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{0}")]
    Image(String),
}
