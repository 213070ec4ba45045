//! The routing trace format (version 1; `docs/trace-format.md`): one safetensors file whose
//! `__metadata__` holds, under [`TRACE_METADATA_KEY`], a JSON description of the images and of
//! every MoE layer's routing groups, and whose tensors hold what was logged per group.

use serde::{Deserialize, Serialize};

/// The `__metadata__` key of the trace description.
pub const TRACE_METADATA_KEY: &str = "routerscope.trace";
/// `format` of a trace description.
pub const FORMAT_NAME: &str = "routerscope-trace";
/// The version this routerscope writes and reads.
pub const VERSION: u32 = 1;

/// The JSON description of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceMeta {
    pub format: String,
    pub version: u32,
    #[serde(default)]
    pub model_name: String,
    pub num_experts: usize,
    /// Class names, indexed by the images' `label`.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Pixels per patch `[h, w]` (for drawing the grid over the image); derived from the image
    /// and its grid when absent.
    #[serde(default)]
    pub patch_size: Option<[usize; 2]>,
    pub images: Vec<ImageMeta>,
    pub layers: Vec<LayerMeta>,
}

/// One image the model saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Patch grid `[rows, cols]`.
    pub grid: [usize; 2],
    /// Whether a CLS token leads the image's tokens.
    #[serde(default)]
    pub cls_token: bool,
    /// A file name to show.
    #[serde(default)]
    pub name: Option<String>,
    /// Where the image is, relative to the trace file, when its pixels are not in the trace
    /// (tensor `images/{i}`, uint8 `[H, W, 3]`).
    #[serde(default)]
    pub path: Option<String>,
    /// Class index into `classes`.
    #[serde(default)]
    pub label: Option<usize>,
}

/// One MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// The encoder block (0-based).
    pub block: usize,
    #[serde(default)]
    pub router: Option<RouterMeta>,
    pub groups: Vec<GroupMeta>,
}

/// What is known of a layer's router.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouterMeta {
    /// The router's command-line name (`softmax-tc`, ...).
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// Slots per expert per group.
    #[serde(default)]
    pub capacity: Option<usize>,
    #[serde(default)]
    pub batch_priority: Option<bool>,
}

/// One routing group: the tokens `[start, end)` of each member image, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupMeta {
    pub members: Vec<[usize; 3]>,
}

/// The name of piece `piece` of group `group` in layer `layer` (`layers/0/groups/3/logits`).
pub fn group_tensor(layer: usize, group: usize, piece: &str) -> String {
    format!("layers/{layer}/groups/{group}/{piece}")
}

/// The name of image `i`'s pixels.
pub fn image_tensor(i: usize) -> String {
    format!("images/{i}")
}

/// What a group may hold, besides nothing.
pub const PIECES: [&str; 10] = [
    "logits",
    "probs",
    "expert_index",
    "gates",
    "kept",
    "slot",
    "dispatch",
    "combine",
    "soft_dispatch",
    "soft_combine",
];
