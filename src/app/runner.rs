//! What the viewer runs: a checkpoint on its engine (CPU or GPU), or a routing trace, whose
//! "run" reads the logged routing of its own images or re-routes their logged logits. The worker
//! holds either behind one [`Runner`]; the views see the same routing records from both.

use std::path::Path;

use crate::backend::Engine;
use crate::gpu::GpuContext;
use crate::import::load_any;
use crate::model::{BlockObserver, Forward, ForwardOutput, ModelConfig, ModelError, RunOptions};
use crate::routing::{CapacitySpec, RouterConfig, RouterFamily, RouterKind};
use crate::trace::{TraceModel, is_trace_file};

/// A checkpoint or a trace, opened.
pub enum Runner {
    Model(Box<Engine>),
    Trace(TraceModel),
}

/// What the viewer shows about an opened trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSummary {
    pub images: usize,
    pub group_images: usize,
    /// Per MoE layer: its block, whether it logged logits (what-ifs need them) and which
    /// pieces its first group logged.
    pub layers: Vec<TraceLayer>,
    /// The logged router (of the first layer), as the trace describes it.
    pub own: RouterConfig,
    /// The capacity factor the logged router amounts to, on the controls' slider grid: with it
    /// (and the logged kind and k) the view shows the logged routing.
    pub own_capacity_factor: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TraceLayer {
    pub block: usize,
    pub logits: bool,
    pub pieces: Vec<&'static str>,
}

impl TraceSummary {
    /// Whether every layer logged logits, so that every router is a what-if.
    pub fn what_ifs_possible(&self) -> bool {
        self.layers.iter().all(|l| l.logits)
    }

    /// `r`, or the logged router itself when `r` asks for its kind, k and the capacity it
    /// amounts to: the views then show the logged routing, not a what-if.
    pub fn routed_as_logged(&self, r: RouterConfig) -> RouterConfig {
        let same_capacity = match r.capacity {
            CapacitySpec::Factor(f) => (f - self.own_capacity_factor).abs() < 1e-9,
            CapacitySpec::Slots(_) => true,
        };
        let own = r.kind == self.own.kind
            && (r.kind == RouterKind::SoftMoe || (r.k == self.own.k && same_capacity));
        if own { self.own.clone() } else { r }
    }
}

impl Runner {
    /// Opens `path`: a routing trace when its metadata says so, else a checkpoint.
    pub fn open(path: &Path, gpu: Option<&GpuContext>) -> Result<Self, String> {
        if is_trace_file(path) {
            return TraceModel::open(path)
                .map(Runner::Trace)
                .map_err(|e| e.to_string());
        }
        let (cfg, weights) = load_any(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Engine::new(cfg, weights, gpu)
            .map(|e| Runner::Model(Box::new(e)))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Runner::Model(m) => &m.config,
            Runner::Trace(t) => t.trace().config(),
        }
    }

    pub fn trace(&self) -> Option<&TraceModel> {
        match self {
            Runner::Trace(t) => Some(t),
            Runner::Model(_) => None,
        }
    }

    /// Where runs run.
    pub fn device(&self) -> String {
        match self {
            Runner::Model(m) => m.device(),
            Runner::Trace(_) => "trace (no model runs)".into(),
        }
    }

    pub fn take_notice(&self) -> Option<String> {
        match self {
            Runner::Model(m) => m.take_notice(),
            Runner::Trace(_) => None,
        }
    }

    /// The summary the viewer shows for a trace.
    pub fn trace_summary(&self) -> Option<TraceSummary> {
        let t = self.trace()?.trace();
        let layers = (0..t.meta().layers.len())
            .map(|l| TraceLayer {
                block: t.meta().layers[l].block,
                logits: t.has_logits(l),
                pieces: t.pieces(l, 0),
            })
            .collect();
        let (own, _) = t.router(0);
        let own = own.clone();
        let own_capacity_factor = match own.capacity {
            CapacitySpec::Factor(f) => f,
            // c slots per expert for n tokens and e experts: c = factor · n · k / e.
            CapacitySpec::Slots(c) => {
                let n = (t.config().seq_len() * t.group_images()) as f64;
                let e = t.meta().num_experts as f64;
                let k = if own.kind.family() == RouterFamily::TokenChoice {
                    own.k as f64
                } else {
                    1.0
                };
                // On the controls' slider grid (steps of 0.05), which snaps what it shows.
                (c as f64 * e / (n * k) * 20.0).round() / 20.0
            }
        };
        Some(TraceSummary {
            images: t.num_images(),
            group_images: t.group_images(),
            layers,
            own,
            own_capacity_factor,
        })
    }
}

impl Forward for Runner {
    fn config(&self) -> &ModelConfig {
        Runner::config(self)
    }

    fn check_options(&self, opts: &RunOptions, batch: usize) -> Result<(), ModelError> {
        match self {
            Runner::Model(m) => Forward::check_options(&**m, opts, batch),
            Runner::Trace(t) => Forward::check_options(t, opts, batch),
        }
    }

    fn forward(&self, images: &[Vec<f32>], opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        match self {
            Runner::Model(m) => Forward::forward(&**m, images, opts),
            Runner::Trace(t) => t.forward(images, opts),
        }
    }

    fn forward_source(
        &self,
        ids: &[usize],
        images: &[Vec<f32>],
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        match self {
            Runner::Model(m) => m.forward_source(ids, images, opts),
            Runner::Trace(t) => t.forward_source(ids, images, opts),
        }
    }

    fn rerun(&self, prev: &ForwardOutput, opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        match self {
            Runner::Model(m) => Forward::rerun(&**m, prev, opts),
            Runner::Trace(t) => t.rerun(prev, opts),
        }
    }

    fn forward_observed(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        match self {
            Runner::Model(m) => Forward::forward_observed(&**m, images, opts, observe),
            Runner::Trace(t) => t.forward_observed(images, opts, observe),
        }
    }

    fn rerun_observed(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        match self {
            Runner::Model(m) => Forward::rerun_observed(&**m, prev, opts, observe),
            Runner::Trace(t) => t.rerun_observed(prev, opts, observe),
        }
    }
}
