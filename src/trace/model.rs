//! A trace as a [`Forward`]: its images are routed by index. Under the trace's own routing (the
//! first layer's logged router, in groups of the logged size) each layer's record is what was
//! logged; any other router, k, capacity or group size routes the layer's logged logits, a
//! what-if that is exact for that layer (the layers after it ran on the logged model and cannot
//! change).

use std::path::Path;
use std::sync::Arc;

use super::format::TRACE_METADATA_KEY;
use super::reader::TraceFile;
use crate::model::vit::Resume;
use crate::model::{
    BlockObserver, Forward, ForwardOutput, GroupRecord, ModelConfig, ModelError, MoeLayerRecord,
    RunOptions,
};
use crate::routing::{RouterConfig, RouterKind};

/// The images of a trace a run routed (the resume state of its outputs).
struct TraceIds(Vec<usize>);

/// A trace, run as a model over its own images.
#[derive(Clone, Debug)]
pub struct TraceModel {
    trace: Arc<TraceFile>,
}

impl TraceModel {
    pub fn open(path: &Path) -> Result<Self, super::TraceError> {
        Ok(Self {
            trace: Arc::new(TraceFile::open(path)?),
        })
    }

    pub fn new(trace: Arc<TraceFile>) -> Self {
        Self { trace }
    }

    pub fn trace(&self) -> &Arc<TraceFile> {
        &self.trace
    }

    /// The routing of images `ids` (consecutive groups of `opts.group_images`) under `opts`.
    pub fn route_ids(&self, ids: &[usize], opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        let t = &*self.trace;
        let cfg = t.config();
        let layers = cfg.moe.as_ref().map_or(0, |m| m.layers.len());
        let err = |e: super::TraceError| ModelError::Source(e.to_string());
        if opts.routers.len() != layers {
            return Err(ModelError::Config(format!(
                "{} router settings for the trace's {layers} MoE layers",
                opts.routers.len()
            )));
        }
        let g = opts.group_images.max(1);
        if !ids.len().is_multiple_of(g) {
            return Err(ModelError::Config(format!(
                "{} images cannot be split into routing groups of {g} images",
                ids.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i >= t.num_images()) {
            return Err(ModelError::Config(format!(
                "image {bad}: the trace holds {} images",
                t.num_images()
            )));
        }
        self.check_options(opts)?;
        let mut records = Vec::with_capacity(layers);
        for (l, router) in opts.routers.iter().enumerate() {
            let logged = self.is_logged(router, g);
            let mut groups = Vec::with_capacity(ids.len() / g);
            for (c, chunk) in ids.chunks(g).enumerate() {
                let mut rec: GroupRecord = if logged {
                    let group = t.group_of(l, chunk[0]);
                    let first = t.meta().layers[l].groups[group].members[0][0];
                    let whole = chunk.iter().enumerate().all(|(k, &i)| i == first + k);
                    if whole {
                        t.logged_group(l, group).map_err(err)?
                    } else {
                        t.what_if_group(l, chunk, router).map_err(err)?
                    }
                } else {
                    t.what_if_group(l, chunk, router).map_err(err)?
                };
                rec.first_image = c * g;
                rec.num_images = chunk.len();
                groups.push(rec);
            }
            records.push(MoeLayerRecord {
                block: t.meta().layers[l].block,
                groups,
            });
        }
        Ok(ForwardOutput {
            probs: vec![Vec::new(); ids.len()],
            features: vec![Vec::new(); ids.len()],
            records,
            options: opts.clone(),
            inputs: Arc::from(vec![Vec::new(); ids.len()]),
            resume: Resume::Backend(Arc::new(TraceIds(ids.to_vec()))),
        })
    }
}

impl TraceModel {
    /// Whether `router` in groups of `group_images` is the trace's own routing (shown as
    /// logged) rather than a what-if on its logits.
    pub fn is_logged(&self, router: &RouterConfig, group_images: usize) -> bool {
        let t = &*self.trace;
        let Some(own) = t.config().moe.as_ref().map(|m| &m.router) else {
            return false;
        };
        // Soft MoE's slots are the logged weights' own (a what-if sets them to a placeholder).
        let same = router == own
            || (router.kind == RouterKind::SoftMoe && own.kind == RouterKind::SoftMoe);
        same && group_images == t.group_images()
    }

    /// The MoE layers `opts` would re-route (what-ifs), in order.
    pub fn what_if_layers(&self, opts: &RunOptions) -> Vec<usize> {
        let g = opts.group_images.max(1);
        (0..opts.routers.len())
            .filter(|&l| !self.is_logged(&opts.routers[l], g))
            .collect()
    }

    /// Fails, naming the layer, when `opts` is a what-if on a layer whose trace logged no
    /// logits or probabilities to re-route.
    pub fn check_options(&self, opts: &RunOptions) -> Result<(), ModelError> {
        let t = &*self.trace;
        for l in self.what_if_layers(opts) {
            if !t.has_logits(l) {
                let router = &opts.routers[l];
                return Err(ModelError::Source(format!(
                    "{}: layer {l} (block {}) logged no router logits or probabilities (only \
                     {}), so only its logged routing can be shown: {} (k = {}, groups of {} \
                     images) is a what-if, which re-routes logits",
                    t.path().display(),
                    t.meta().layers[l].block,
                    t.pieces(l, 0).join(", "),
                    router.kind.cli_name(),
                    router.k,
                    opts.group_images.max(1),
                )));
            }
        }
        Ok(())
    }
}

impl Forward for TraceModel {
    fn config(&self) -> &ModelConfig {
        self.trace.config()
    }

    fn check_options(&self, opts: &RunOptions, _batch: usize) -> Result<(), ModelError> {
        TraceModel::check_options(self, opts)
    }

    fn forward(&self, images: &[Vec<f32>], opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        let _ = (images, opts);
        Err(ModelError::Config(
            "a routing trace routes the images it holds (by index), not pixels".into(),
        ))
    }

    fn forward_source(
        &self,
        ids: &[usize],
        _images: &[Vec<f32>],
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        self.route_ids(ids, opts)
    }

    fn rerun(&self, prev: &ForwardOutput, opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        let ids = prev
            .backend_state::<TraceIds>()
            .map(|t| t.0.clone())
            .ok_or_else(|| ModelError::Config("not a run of this trace".into()))?;
        self.route_ids(&ids, opts)
    }

    fn rerun_observed(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        let _ = observe;
        self.rerun(prev, opts)
    }
}

/// Whether `path` is a routing trace (a safetensors file whose metadata describes a trace),
/// read from its header only.
pub fn is_trace_file(path: &Path) -> bool {
    let Ok(mut f) = crate::files::open_regular(path) else {
        return false;
    };
    use std::io::Read;
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return false;
    }
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return false;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).is_ok()
        && std::str::from_utf8(&header).is_ok_and(|h| h.contains(TRACE_METADATA_KEY))
}
