//! Opening a trace: the header is parsed and every shape checked once, the file stays mapped, and
//! a group's tensors are decoded only when its routing is asked for (a trace of any size is read
//! in memory that does not grow with it). Values (NaN, expert indices) are checked as they are
//! decoded.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorInfo};

use super::TraceError;
use super::assignment::{from_dense, from_picks, from_soft};
use super::format::{
    FORMAT_NAME, ImageMeta, TRACE_METADATA_KEY, TraceMeta, VERSION, group_tensor, image_tensor,
};
use crate::model::{Classifier, GroupRecord, ModelConfig, MoeConfig, Normalization, decode_image};
use crate::routing::ops::softmax_rows;
use crate::routing::{
    Assignment, CapacitySpec, Mode, RouterConfig, RouterFamily, RouterKind, RoutingResult,
    route_logits,
};

/// The most images one trace may describe.
pub const MAX_TRACE_ITEMS: usize = 10_000_000;
/// The most MoE layers of one trace.
pub const MAX_TRACE_LAYERS: usize = 1024;
/// The most classes: the length of `classes`, and the largest label plus one without it.
pub const MAX_TRACE_CLASSES: usize = 100_000;
/// The most tokens per image (the model configuration's limit).
pub const MAX_TRACE_TOKENS: usize = 1 << 20;
/// The most values of one tensor of one group (`[n, e]` logits, `[n, e, c]` dispatch): what a
/// group's routing holds in memory is bounded by this, whatever the file declares.
pub const MAX_GROUP_VALUES: usize = 1 << 26;
/// A trace's description (the safetensors header) at most, as safetensors itself limits it.
pub const MAX_DESCRIPTION_BYTES: u64 = 100_000_000;
/// Tensors are read in pieces of this many bytes (never a second whole copy of a tensor).
const READ_PIECE: usize = 1 << 20;

/// An opened, validated trace.
pub struct TraceFile {
    path: PathBuf,
    /// Read tensor by tensor on demand (positioned reads, not a memory map: a map's touched
    /// pages count towards the process's resident memory, and an analysis reads every group).
    file: std::sync::Mutex<std::fs::File>,
    data_start: u64,
    infos: HashMap<String, TensorInfo>,
    meta: TraceMeta,
    config: ModelConfig,
    /// Per layer: the logged router (or the one inferred from what was logged).
    routers: Vec<RouterConfig>,
    /// Per layer: whether the router's kind was logged (else inferred).
    router_known: Vec<bool>,
    /// Per layer, per image: its group.
    image_group: Vec<Vec<u32>>,
    group_images: usize,
}

impl std::fmt::Debug for TraceFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceFile")
            .field("path", &self.path)
            .field("images", &self.meta.images.len())
            .field("layers", &self.meta.layers.len())
            .finish()
    }
}

/// What one group logged, as decoded values.
struct Pieces {
    logits: Option<Vec<f32>>,
    probs: Option<Vec<f32>>,
}

/// The format and version of a description, read before the rest: a newer version's
/// description need not parse as this one's.
#[derive(serde::Deserialize)]
struct FormatProbe {
    format: Option<String>,
    version: Option<serde_json::Value>,
}

/// Parses a trace description, naming the entry that is wrong
/// (`` `images[3].label`: invalid value: integer `-1`, expected usize ``).
pub(crate) fn parse_description<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    super::parse_json(json, &format!("the `{TRACE_METADATA_KEY}` JSON"))
}

impl TraceFile {
    /// Opens the file, parses and checks its description and the shape and dtype of every
    /// tensor it names.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let io = |err| TraceError::Io {
            path: path.to_owned(),
            err,
        };
        let mut handle = crate::files::open_regular(path).map_err(io)?;
        let file_len = handle.metadata().map_err(io)?.len();
        let bad = |m: String| TraceError::Invalid {
            path: path.to_owned(),
            reason: m,
        };
        let mut len = [0u8; 8];
        handle
            .read_exact(&mut len)
            .map_err(|_| bad(format!("not a safetensors file: {file_len} bytes")))?;
        let header = u64::from_le_bytes(len);
        // Checked before the header is allocated.
        if header > MAX_DESCRIPTION_BYTES || header.saturating_add(8) > file_len {
            return Err(bad(format!(
                "not a valid safetensors file: a header of {header} bytes in a file of \
                 {file_len} (at most {MAX_DESCRIPTION_BYTES})"
            )));
        }
        let mut text = vec![0u8; header as usize];
        handle.read_exact(&mut text).map_err(io)?;
        let metadata: safetensors::tensor::Metadata = std::str::from_utf8(&text)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(t.trim_end()).map_err(|e| e.to_string()))
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        drop(text);
        let data_start = 8 + header;
        let data_len = metadata.data_len() as u64;
        if file_len < data_start.saturating_add(data_len) {
            return Err(bad(format!(
                "truncated: the header declares {data_len} bytes of tensors, the file holds {}",
                file_len - data_start
            )));
        }
        let json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(TRACE_METADATA_KEY))
            .ok_or_else(|| {
                bad(format!(
                    "not a routerscope trace: no `{TRACE_METADATA_KEY}` entry in its metadata"
                ))
            })?;
        let probe: FormatProbe = parse_description(json).map_err(bad)?;
        if probe.format.as_deref() != Some(FORMAT_NAME) {
            return Err(bad(format!("`format` is not \"{FORMAT_NAME}\"")));
        }
        match probe.version {
            Some(v) if v.as_u64() == Some(u64::from(VERSION)) => {}
            Some(v) => {
                return Err(bad(format!(
                    "trace format version {v}; this routerscope reads version {VERSION}"
                )));
            }
            None => return Err(bad("no `version` in the trace description".into())),
        }
        let meta: TraceMeta = parse_description(json).map_err(bad)?;
        let infos: HashMap<String, TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        drop(metadata);
        let mut file = Self {
            path: path.to_owned(),
            file: std::sync::Mutex::new(handle),
            data_start,
            infos,
            config: placeholder_config(),
            routers: Vec::new(),
            router_known: Vec::new(),
            image_group: Vec::new(),
            group_images: 1,
            meta,
        };
        file.validate()?;
        Ok(file)
    }

    fn invalid(&self, reason: String) -> TraceError {
        TraceError::Invalid {
            path: self.path.clone(),
            reason,
        }
    }

    /// Every number of the description bounded (by its documented limit and by the tensors
    /// actually present) before anything is sized or indexed by it.
    fn validate(&mut self) -> Result<(), TraceError> {
        let m = &self.meta;
        let (ni, nl) = (m.images.len(), m.layers.len());
        if ni == 0 {
            return Err(self.invalid("the trace holds no images".into()));
        }
        if nl == 0 {
            return Err(self.invalid("the trace holds no MoE layers".into()));
        }
        if ni > MAX_TRACE_ITEMS || nl > MAX_TRACE_LAYERS {
            return Err(self.invalid(format!(
                "{ni} images and {nl} layers are beyond the limits ({MAX_TRACE_ITEMS} images, \
                 {MAX_TRACE_LAYERS} layers)"
            )));
        }
        let e = m.num_experts;
        if !(1..=4096).contains(&e) {
            return Err(self.invalid(format!("num_experts is {e}: between 1 and 4096 experts")));
        }
        if m.classes.len() > MAX_TRACE_CLASSES {
            return Err(self.invalid(format!(
                "`classes` names {} classes, beyond the limit of {MAX_TRACE_CLASSES}",
                m.classes.len()
            )));
        }
        let first = &m.images[0];
        let [gh, gw] = first.grid;
        let tokens = gh
            .checked_mul(gw)
            .filter(|&t| (1..MAX_TRACE_TOKENS).contains(&t));
        let Some(tokens) = tokens else {
            return Err(self.invalid(format!(
                "image 0 has a patch grid of {gh}x{gw}: between 1 and {} patches",
                MAX_TRACE_TOKENS - 1
            )));
        };
        let side = crate::model::MAX_IMAGE_SIDE as usize;
        if let Some([ph, pw]) = m.patch_size {
            let fits = |g: usize, p: usize| p >= 1 && g.checked_mul(p).is_some_and(|s| s <= side);
            if !(fits(gh, ph) && fits(gw, pw)) {
                return Err(self.invalid(format!(
                    "`patch_size` [{ph}, {pw}] on a grid of {gh}x{gw}: patches are at least 1 \
                     pixel and the image at most {side} pixels a side"
                )));
            }
        }
        if let Some((i, img)) = m
            .images
            .iter()
            .enumerate()
            .find(|(_, im)| im.grid != first.grid || im.cls_token != first.cls_token)
        {
            return Err(self.invalid(format!(
                "image {i} has grid {:?} (CLS token: {}) but image 0 has {:?} ({}): one trace \
                 holds images of one patch grid",
                img.grid, img.cls_token, first.grid, first.cls_token
            )));
        }
        // Every image's label, not the first only: the statistics index classes by it.
        let label_limit = if m.classes.is_empty() {
            MAX_TRACE_CLASSES
        } else {
            m.classes.len()
        };
        if let Some((i, label)) = m
            .images
            .iter()
            .enumerate()
            .find_map(|(i, im)| im.label.filter(|&l| l >= label_limit).map(|l| (i, l)))
        {
            return Err(self.invalid(if m.classes.is_empty() {
                format!(
                    "image {i} has label {label}: without `classes`, labels are below \
                     {MAX_TRACE_CLASSES}"
                )
            } else {
                format!(
                    "image {i} has label {label} but `classes` names {} classes",
                    m.classes.len()
                )
            }));
        }
        let s = tokens + usize::from(first.cls_token);
        let mut group_images = None;
        let mut image_group = Vec::with_capacity(nl);
        let mut blocks = std::collections::BTreeSet::new();
        for (l, layer) in m.layers.iter().enumerate() {
            if layer.block >= 1024 {
                return Err(self.invalid(format!(
                    "layer {l} is block {}: a model has at most 1024 blocks",
                    layer.block
                )));
            }
            if !blocks.insert(layer.block) {
                return Err(self.invalid(format!(
                    "layers {l} and an earlier one are both block {}",
                    layer.block
                )));
            }
            if layer.groups.len() > ni {
                return Err(self.invalid(format!(
                    "layer {l} (block {}) has {} groups for {ni} images",
                    layer.block,
                    layer.groups.len()
                )));
            }
            let mut owner = vec![u32::MAX; ni];
            for (g, group) in layer.groups.iter().enumerate() {
                let where_ = || format!("layer {l} (block {}) group {g}", layer.block);
                if group.members.is_empty() {
                    return Err(self.invalid(format!("{} has no members", where_())));
                }
                let first_image = group.members[0][0];
                for (k, &[img, start, end]) in group.members.iter().enumerate() {
                    if img >= ni {
                        return Err(self.invalid(format!(
                            "{}: member {k} is image {img}, but the trace has {ni} images",
                            where_()
                        )));
                    }
                    if start != 0 || end != s || Some(img) != first_image.checked_add(k) {
                        return Err(self.invalid(format!(
                            "{}: member {k} is tokens {start}..{end} of image {img}; version 1 \
                             groups hold consecutive whole images (tokens 0..{s})",
                            where_()
                        )));
                    }
                    if owner[img] != u32::MAX {
                        return Err(self.invalid(format!(
                            "{}: image {img} is already in group {}",
                            where_(),
                            owner[img]
                        )));
                    }
                    owner[img] = g as u32;
                }
                let size = group.members.len();
                match group_images {
                    None => group_images = Some(size),
                    Some(gs) if gs != size => {
                        return Err(self.invalid(format!(
                            "{} holds {size} images, other groups {gs}: version 1 groups are of \
                             one size",
                            where_()
                        )));
                    }
                    _ => {}
                }
                // `size` ≤ images ≤ 10^7 and `s` ≤ 2^20: the product fits, and a group of more
                // tokens than any tensor may hold values is refused by the tensor checks.
                self.check_group_tensors(l, g, size * s, e)?;
            }
            if let Some(img) = owner.iter().position(|&o| o == u32::MAX) {
                return Err(self.invalid(format!(
                    "layer {l} (block {}) routes no group holding image {img}",
                    layer.block
                )));
            }
            image_group.push(owner);
        }
        let pixels_limit = crate::model::MAX_DECODE_BYTES as usize;
        for i in 0..ni {
            if let Some(info) = self.infos.get(&image_tensor(i)) {
                let ok = info.dtype == Dtype::U8
                    && info.shape.len() == 3
                    && info.shape[2] == 3
                    && (1..=side).contains(&info.shape[0])
                    && (1..=side).contains(&info.shape[1]);
                if !ok {
                    return Err(self.invalid(format!(
                        "tensor `{}` is {:?} {:?}: images are uint8 [H, W, 3], at most {side} \
                         pixels a side",
                        image_tensor(i),
                        info.dtype,
                        info.shape
                    )));
                }
                if info.shape[0] * info.shape[1] * 3 > pixels_limit {
                    return Err(self.invalid(format!(
                        "tensor `{}` of shape {:?} is beyond the limit of {} MB of pixels",
                        image_tensor(i),
                        info.shape,
                        pixels_limit >> 20
                    )));
                }
            }
        }
        self.group_images = group_images.unwrap_or(1);
        self.image_group = image_group;
        self.infer_routers()?;
        self.config = self.build_config();
        Ok(())
    }

    /// Shapes and dtypes of the tensors of group `g` of layer `l` (`n` tokens, `e` experts).
    fn check_group_tensors(
        &self,
        l: usize,
        g: usize,
        n: usize,
        e: usize,
    ) -> Result<(), TraceError> {
        let shape_of = |piece: &str| self.infos.get(&group_tensor(l, g, piece));
        // Pieces that go together, before any shape is compared with its partner's.
        for (a, b) in [
            ("expert_index", "gates"),
            ("dispatch", "combine"),
            ("soft_dispatch", "soft_combine"),
        ] {
            match (shape_of(a).is_some(), shape_of(b).is_some()) {
                (true, false) | (false, true) => {
                    let (has, lacks) = if shape_of(a).is_some() {
                        (a, b)
                    } else {
                        (b, a)
                    };
                    return Err(self.invalid(format!(
                        "layer {l} group {g}: `{}` without `{lacks}`: {a} and {b} go together",
                        group_tensor(l, g, has)
                    )));
                }
                _ => {}
            }
        }
        for piece in ["kept", "slot"] {
            if shape_of(piece).is_some() && shape_of("expert_index").is_none() {
                return Err(self.invalid(format!(
                    "layer {l} group {g}: `{}` without `expert_index`: {piece} describes the picks",
                    group_tensor(l, g, piece)
                )));
            }
        }
        for piece in super::format::PIECES {
            if let Some(info) = shape_of(piece) {
                let values = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if values.is_none_or(|v| v > MAX_GROUP_VALUES) {
                    return Err(self.invalid(format!(
                        "tensor `{}` of shape {:?} is beyond the limit of {MAX_GROUP_VALUES} \
                         values per tensor of a group",
                        group_tensor(l, g, piece),
                        info.shape
                    )));
                }
            }
        }
        let want = |piece: &str, dtypes: &[Dtype], shape: &dyn Fn(&[usize]) -> bool, text: &str| {
            match shape_of(piece) {
                None => Ok(false),
                Some(info) if dtypes.contains(&info.dtype) && shape(&info.shape) => Ok(true),
                Some(info) => Err(self.invalid(format!(
                    "tensor `{}` is {:?} {:?}, expected {text} ({n} tokens of the group's images, \
                     {e} experts)",
                    group_tensor(l, g, piece),
                    info.dtype,
                    info.shape
                ))),
            }
        };
        let float = [Dtype::F32, Dtype::F16, Dtype::BF16];
        let ints = [Dtype::I32, Dtype::I64];
        let ne = |s: &[usize]| s == [n, e];
        let logits = want("logits", &float, &ne, &format!("float [{n}, {e}]"))?;
        let probs = want("probs", &float, &ne, &format!("float [{n}, {e}]"))?;
        let nk = |s: &[usize]| s.len() == 2 && s[0] == n && (1..=e).contains(&s[1]);
        let picks = want(
            "expert_index",
            &ints,
            &nk,
            &format!("int32/int64 [{n}, k ≤ {e}]"),
        )?;
        let k = shape_of("expert_index").map(|i| i.shape[1]);
        let same_k = |s: &[usize]| s.len() == 2 && Some(s[1]) == k && s[0] == n;
        let kk = k.unwrap_or(0);
        want(
            "gates",
            &float,
            &same_k,
            &format!("float [{n}, {kk}] (as expert_index)"),
        )?;
        want(
            "kept",
            &[Dtype::BOOL, Dtype::U8],
            &same_k,
            &format!("bool [{n}, {kk}]"),
        )?;
        want("slot", &ints, &same_k, &format!("int32/int64 [{n}, {kk}]"))?;
        let nec = |s: &[usize]| s.len() == 3 && s[0] == n && s[1] == e && s[2] > 0;
        let dense = want(
            "dispatch",
            &float,
            &nec,
            &format!("float [{n}, {e}, capacity]"),
        )?;
        want(
            "combine",
            &float,
            &nec,
            &format!("float [{n}, {e}, capacity]"),
        )?;
        let soft_d = want(
            "soft_dispatch",
            &float,
            &nec,
            &format!("float [{n}, {e}, slots]"),
        )?;
        want(
            "soft_combine",
            &float,
            &nec,
            &format!("float [{n}, {e}, slots]"),
        )?;
        for pair in [["dispatch", "combine"], ["soft_dispatch", "soft_combine"]] {
            if let (Some(a), Some(b)) = (shape_of(pair[0]), shape_of(pair[1]))
                && a.shape != b.shape
            {
                return Err(self.invalid(format!(
                    "layer {l} group {g}: {} is {:?} but {} is {:?}",
                    pair[0], a.shape, pair[1], b.shape
                )));
            }
        }
        if !(logits || probs || picks || dense || soft_d) {
            return Err(self.invalid(format!(
                "layer {l} group {g} holds no routing: log logits, probs, expert_index + gates, \
                 dispatch + combine, or soft_dispatch + soft_combine"
            )));
        }
        Ok(())
    }

    /// Tokens per image.
    fn tokens_per_image(&self) -> usize {
        let first = &self.meta.images[0];
        first.grid[0] * first.grid[1] + usize::from(first.cls_token)
    }

    /// The router of each layer: as logged, else inferred from what was logged. The logged
    /// numbers are bounded by the group they describe: `k` by the experts, a capacity by the
    /// group's requests (slots beyond them can never be filled), a capacity factor finite and
    /// positive.
    fn infer_routers(&mut self) -> Result<(), TraceError> {
        let e = self.meta.num_experts;
        let n = self.group_images * self.tokens_per_image();
        let mut routers = Vec::new();
        let mut known = Vec::new();
        for (l, layer) in self.meta.layers.iter().enumerate() {
            let at = |m: String| self.invalid(format!("layer {l} (block {}): {m}", layer.block));
            let has = |piece: &str| self.infos.contains_key(&group_tensor(l, 0, piece));
            let logged = layer.router.clone().unwrap_or_default();
            let kind = match &logged.kind {
                Some(k) => k.parse::<RouterKind>().map_err(at)?,
                None if has("soft_dispatch") => RouterKind::SoftMoe,
                None => RouterKind::SoftmaxTokenChoice,
            };
            known.push(logged.kind.is_some());
            let mut cfg = RouterConfig::new(kind);
            let picks_k = self
                .infos
                .get(&group_tensor(l, 0, "expert_index"))
                .map(|i| i.shape[1]);
            if let Some(k) = logged.k {
                if !(1..=e).contains(&k) {
                    return Err(at(format!("router `k` is {k} for {e} experts")));
                }
                if picks_k.is_some_and(|p| p != k) && kind.family() == RouterFamily::TokenChoice {
                    return Err(at(format!(
                        "router `k` is {k} but `expert_index` holds {} picks per token",
                        picks_k.unwrap_or(0)
                    )));
                }
            }
            if let Some(k) = logged.k.or(picks_k) {
                cfg.k = k;
            }
            if let Some(b) = logged.batch_priority {
                cfg.batch_priority = b;
            }
            let requests = n * cfg.experts_per_token();
            if let Some(c) = logged.capacity
                && !(1..=requests).contains(&c)
            {
                return Err(at(format!(
                    "router `capacity` is {c} slots per expert: between 1 and the group's \
                     {requests} requests ({n} tokens x k = {})",
                    cfg.experts_per_token()
                )));
            }
            if let Some(f) = logged.capacity_factor
                && !(f.is_finite() && f > 0.0)
            {
                return Err(at(format!(
                    "router `capacity_factor` is {f}: a positive finite number"
                )));
            }
            cfg.capacity = match (logged.capacity, logged.capacity_factor) {
                (Some(c), _) => CapacitySpec::Slots(c),
                (None, Some(f)) => CapacitySpec::Factor(f),
                (None, None) => {
                    let dense = ["dispatch", "soft_dispatch"]
                        .iter()
                        .find_map(|p| self.infos.get(&group_tensor(l, 0, p)))
                        .map(|i| i.shape[2]);
                    match (dense, picks_k) {
                        (Some(c), _) => CapacitySpec::Slots(c),
                        // Picks without a capacity: the fullest expert of any group, so that
                        // every group shows the same (smallest consistent) capacity.
                        (None, Some(k)) => CapacitySpec::Slots(self.fullest_expert(l, n * k)?),
                        (None, None) => cfg.capacity,
                    }
                }
            };
            if kind.family() == RouterFamily::TokenChoice
                && !(1..=self.meta.num_experts).contains(&cfg.k)
            {
                return Err(self.invalid(format!(
                    "layer {l} (block {}): k = {} for {} experts",
                    layer.block, cfg.k, self.meta.num_experts
                )));
            }
            routers.push(cfg);
        }
        self.routers = routers;
        self.router_known = known;
        Ok(())
    }

    /// The most picks any expert kept in any group of layer `l` (from `slot`, `kept` or all
    /// picks), read from the index tensors alone; a slot must lie below the group's `requests`.
    fn fullest_expert(&self, l: usize, requests: usize) -> Result<usize, TraceError> {
        let e = self.meta.num_experts;
        let mut most = 1;
        for g in 0..self.meta.layers[l].groups.len() {
            let name = |p: &str| group_tensor(l, g, p);
            let Some(experts) = self.ints(&name("expert_index"))? else {
                continue;
            };
            if let Some(slots) = self.ints(&name("slot"))? {
                for (at, &s) in slots.iter().enumerate() {
                    if s < -1 || s >= requests as i64 {
                        let k = self.infos[&name("slot")].shape[1].max(1);
                        return Err(self.invalid(format!(
                            "tensor `{}` has {s} at [{}, {}]: a slot is -1 (dropped) or below the \
                             group's {requests} requests",
                            name("slot"),
                            at / k,
                            at % k
                        )));
                    }
                    most = most.max((s + 1) as usize);
                }
                continue;
            }
            let kept = self.bools(&name("kept"))?;
            let mut count = vec![0usize; e];
            for (at, &j) in experts.iter().enumerate() {
                if (0..e as i64).contains(&j) && kept.as_ref().is_none_or(|k| k[at]) {
                    count[j as usize] += 1;
                }
            }
            most = most.max(count.into_iter().max().unwrap_or(1));
        }
        Ok(most)
    }

    /// A model configuration the views and the analysis can read: the patch grid, the CLS
    /// token, the MoE blocks and experts, the classes. It describes no weights.
    fn build_config(&self) -> ModelConfig {
        let first = &self.meta.images[0];
        let [gh, gw] = first.grid;
        // Without a logged patch size: the image's pixels over the grid, else 16 pixels (fewer
        // where the grid is so fine that the image would pass its size limit).
        let side = crate::model::MAX_IMAGE_SIDE as usize;
        let patch = self.meta.patch_size.unwrap_or_else(|| {
            self.infos
                .get(&image_tensor(0))
                .map(|i| [i.shape[0] / gh, i.shape[1] / gw])
                .filter(|&[a, b]| a > 0 && b > 0)
                .unwrap_or([(side / gh).clamp(1, 16), (side / gw).clamp(1, 16)])
        });
        let blocks: Vec<usize> = self.meta.layers.iter().map(|l| l.block).collect();
        ModelConfig {
            name: if self.meta.model_name.is_empty() {
                "trace".into()
            } else {
                self.meta.model_name.clone()
            },
            image_size: [gh * patch[0], gw * patch[1]],
            channels: 3,
            patch_size: patch,
            hidden_size: 1,
            num_layers: blocks.iter().max().map_or(1, |b| b + 1),
            num_heads: 1,
            mlp_dim: 1,
            classifier: if first.cls_token {
                Classifier::Token
            } else {
                Classifier::Gap
            },
            representation_size: None,
            num_classes: 0,
            class_names: self.class_names(),
            normalization: Normalization {
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
            },
            gelu: Default::default(),
            layer_scale: false,
            layer_norm_eps: crate::model::DEFAULT_LAYER_NORM_EPS,
            cls_token: None,
            distillation_token: false,
            register_tokens: 0,
            fc_norm: false,
            moe: Some(MoeConfig {
                layers: blocks,
                num_experts: self.meta.num_experts,
                router: self.routers[0].clone(),
                group_images: self.group_images,
                bfloat16_dispatch: false,
                combine: Default::default(),
                expert_mlp_dim: None,
            }),
        }
    }

    /// The class names: `classes`, else the labels' numbers.
    pub fn class_names(&self) -> Vec<String> {
        if !self.meta.classes.is_empty() {
            return self.meta.classes.clone();
        }
        let max = self.meta.images.iter().filter_map(|i| i.label).max();
        max.map_or_else(Vec::new, |m| (0..=m).map(|c| c.to_string()).collect())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &TraceMeta {
        &self.meta
    }

    /// The configuration the views read (see [`TraceFile::open`]).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn num_images(&self) -> usize {
        self.meta.images.len()
    }

    pub fn image_meta(&self, i: usize) -> &ImageMeta {
        &self.meta.images[i]
    }

    /// Images per routing group (the same in every layer).
    pub fn group_images(&self) -> usize {
        self.group_images
    }

    /// The logged (or inferred) router of layer `l`, and whether its kind was logged.
    pub fn router(&self, l: usize) -> (&RouterConfig, bool) {
        (&self.routers[l], self.router_known[l])
    }

    /// The group of layer `l` that holds image `i`.
    pub fn group_of(&self, l: usize, i: usize) -> usize {
        self.image_group[l][i] as usize
    }

    /// Whether every group of layer `l` logged router logits or probabilities (what a what-if
    /// re-routes).
    pub fn has_logits(&self, l: usize) -> bool {
        (0..self.meta.layers[l].groups.len()).all(|g| {
            self.infos.contains_key(&group_tensor(l, g, "logits"))
                || self.infos.contains_key(&group_tensor(l, g, "probs"))
        })
    }

    /// Which pieces group `g` of layer `l` logged.
    pub fn pieces(&self, l: usize, g: usize) -> Vec<&'static str> {
        super::format::PIECES
            .iter()
            .copied()
            .filter(|p| self.infos.contains_key(&group_tensor(l, g, p)))
            .collect()
    }

    /// Tensor `name` decoded `width` bytes per value by `decode`, read in pieces of at most
    /// [`READ_PIECE`] bytes straight into the values (a tensor is never held twice); `None`
    /// when the trace lacks it.
    fn read_values<T>(
        &self,
        name: &str,
        width: usize,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Option<(&TensorInfo, Vec<T>)>, TraceError> {
        let Some(info) = self.infos.get(name) else {
            return Ok(None);
        };
        let (a, b) = info.data_offsets;
        let total = b - a;
        let mut values = Vec::with_capacity(total / width.max(1));
        let io = |err| TraceError::Io {
            path: self.path.clone(),
            err,
        };
        // A panic elsewhere while reading leaves the file as usable as before.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.seek(SeekFrom::Start(self.data_start + a as u64))
            .map_err(io)?;
        let piece = READ_PIECE / width.max(1) * width.max(1);
        let mut buf = vec![0u8; piece.min(total)];
        let mut left = total;
        while left > 0 {
            let take = left.min(buf.len());
            file.read_exact(&mut buf[..take]).map_err(|e| {
                self.invalid(format!(
                    "tensor `{name}` cannot be read ({e}): was the file changed or cut short?"
                ))
            })?;
            values.extend(buf[..take].chunks_exact(width.max(1)).map(&decode));
            left -= take;
        }
        Ok(Some((info, values)))
    }

    fn floats(&self, name: &str) -> Result<Option<Vec<f32>>, TraceError> {
        let Some(dtype) = self.infos.get(name).map(|i| i.dtype) else {
            return Ok(None);
        };
        let read = match dtype {
            Dtype::F16 => {
                self.read_values(name, 2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            Dtype::BF16 => self.read_values(name, 2, |b| {
                half::bf16::from_le_bytes([b[0], b[1]]).to_f32()
            }),
            _ => self.read_values(name, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        }?;
        let Some((info, data)) = read else {
            return Ok(None);
        };
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            let cols = info.shape.iter().skip(1).product::<usize>().max(1);
            return Err(self.invalid(format!(
                "tensor `{name}` has {} at row {}, entry {}",
                data[at],
                at / cols,
                at % cols
            )));
        }
        Ok(Some(data))
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, TraceError> {
        let Some(dtype) = self.infos.get(name).map(|i| i.dtype) else {
            return Ok(None);
        };
        let read = match dtype {
            Dtype::I32 => self.read_values(name, 4, |b| {
                i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }),
            _ => self.read_values(name, 8, |b| {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }),
        }?;
        Ok(read.map(|(_, v)| v))
    }

    fn bools(&self, name: &str) -> Result<Option<Vec<bool>>, TraceError> {
        Ok(self.read_values(name, 1, |b| b[0] != 0)?.map(|(_, v)| v))
    }

    fn logits_of(&self, l: usize, g: usize) -> Result<Pieces, TraceError> {
        Ok(Pieces {
            logits: self.floats(&group_tensor(l, g, "logits"))?,
            probs: self.floats(&group_tensor(l, g, "probs"))?,
        })
    }

    /// The record of group `g` of layer `l` as logged (the logged router's own routing). A
    /// group that logged only logits or probabilities is routed by the logged router.
    pub fn logged_group(&self, l: usize, g: usize) -> Result<GroupRecord, TraceError> {
        let e = self.meta.num_experts;
        let group = &self.meta.layers[l].groups[g];
        let n = group.members.len() * self.config.seq_len();
        let name = |p: &str| group_tensor(l, g, p);
        let ctx = |m: String| self.invalid(format!("layer {l} group {g}: {m}"));
        // The assignment builders' messages start with the tensor they found wrong.
        let in_tensor = |m: String| self.invalid(format!("layers/{l}/groups/{g}/{m}"));
        let Pieces { logits, probs } = self.logits_of(l, g)?;
        let probs = probs.or_else(|| logits.as_ref().map(|x| softmax_rows(x, e)));
        let cfg = &self.routers[l];
        let mut routing = if let Some(d) = self.floats(&name("soft_dispatch"))? {
            let c = self.floats(&name("soft_combine"))?.unwrap_or_default();
            let p = d.len() / (n * e);
            from_soft(d, c, n, e, p)
        } else if let Some(d) = self.floats(&name("dispatch"))? {
            let c = self.floats(&name("combine"))?.unwrap_or_default();
            let cap = d.len() / (n * e);
            from_dense(cfg.kind, &d, &c, probs.as_deref(), n, e, cap).map_err(in_tensor)?
        } else if let Some(experts) = self.ints(&name("expert_index"))? {
            let gates = self.floats(&name("gates"))?.unwrap_or_default();
            let k = experts.len() / n;
            let capacity = match cfg.capacity {
                CapacitySpec::Slots(c) => Some(c),
                CapacitySpec::Factor(_) => None,
            };
            let kind = if cfg.kind.family() == RouterFamily::TokenChoice {
                cfg.kind
            } else {
                RouterKind::SoftmaxTokenChoice
            };
            from_picks(
                kind,
                &experts,
                &gates,
                self.bools(&name("kept"))?.as_deref(),
                self.ints(&name("slot"))?.as_deref(),
                probs.as_deref(),
                capacity,
                n,
                e,
                k,
            )
            .map_err(in_tensor)?
        } else {
            let source = logits
                .clone()
                .or_else(|| probs.as_ref().map(|p| log_probs(p)))
                .ok_or_else(|| ctx("no routing logged".into()))?;
            self.route(&source, n, cfg)
                .map_err(|e| ctx(format!("routing its logits under the logged router: {e}")))?
        };
        // Logged sparse routing that the logged router reproduces from the logged logits gains
        // what only the router computes: the matrix Expert Choice ranked (a Sinkhorn or sparse
        // OT plan, not the gates), the auxiliary losses and the solver's convergence.
        if let (Some(x), Assignment::Sparse(_)) = (&logits, &routing.assignment)
            && routing.router == cfg.kind
            && let Ok(derived) = self.route(x, n, cfg)
        {
            adopt_derived(&mut routing, derived);
        }
        Ok(GroupRecord {
            first_image: 0,
            num_images: group.members.len(),
            logits: logits.unwrap_or_default(),
            // Soft MoE's per-expert weights are its combine weights (as a model run reports
            // them); a sparse router's probabilities over all experts cannot be recovered from
            // its picks, so they stay unknown (empty) rather than guessed from the gates.
            probs: probs.unwrap_or_else(|| match routing.assignment {
                Assignment::Soft(_) => routing.expert_probabilities(),
                Assignment::Sparse(_) => Vec::new(),
            }),
            routing,
        })
    }

    fn route(&self, logits: &[f32], n: usize, cfg: &RouterConfig) -> Result<RoutingResult, String> {
        if cfg.kind == RouterKind::SoftMoe {
            return Err(
                "Soft MoE routes token vectors with mu and scale, which a trace does not hold"
                    .into(),
            );
        }
        route_logits(logits, n, self.meta.num_experts, cfg, Mode::Deterministic)
            .map_err(|e| e.to_string())
    }

    /// The logged logits `[tokens, e]` of images `images` in layer `l` (probabilities become
    /// their logarithms, which every router ranks and weighs alike), in image order.
    pub fn image_logits(&self, l: usize, images: &[usize]) -> Result<Vec<f32>, TraceError> {
        let e = self.meta.num_experts;
        let s = self.config.seq_len();
        let mut out = Vec::with_capacity(images.len() * s * e);
        let mut cached: Option<(usize, Vec<f32>)> = None;
        for &i in images {
            let g = self.group_of(l, i);
            if cached.as_ref().is_none_or(|(cg, _)| *cg != g) {
                let Pieces { logits, probs } = self.logits_of(l, g)?;
                let source = logits
                    .or_else(|| probs.map(|p| log_probs(&p)))
                    .ok_or_else(|| {
                        self.invalid(format!(
                            "layer {l} (block {}) group {g} logged no logits or probabilities: a \
                         what-if re-routes logits",
                            self.meta.layers[l].block
                        ))
                    })?;
                cached = Some((g, source));
            }
            let group = &self.meta.layers[l].groups[g];
            let pos = i - group.members[0][0];
            if let Some((_, source)) = &cached {
                out.extend_from_slice(&source[pos * s * e..(pos + 1) * s * e]);
            }
        }
        Ok(out)
    }

    /// Routes the logged logits of `images` (one group) in layer `l` under `cfg`: a what-if.
    pub fn what_if_group(
        &self,
        l: usize,
        images: &[usize],
        cfg: &RouterConfig,
    ) -> Result<GroupRecord, TraceError> {
        let e = self.meta.num_experts;
        let logits = self.image_logits(l, images)?;
        let n = logits.len() / e;
        let routing = self.route(&logits, n, cfg).map_err(|m| {
            self.invalid(format!(
                "layer {l} (block {}): {} on the logged logits: {m}",
                self.meta.layers[l].block,
                cfg.kind.cli_name()
            ))
        })?;
        Ok(GroupRecord {
            first_image: 0,
            num_images: images.len(),
            probs: softmax_rows(&logits, e),
            logits,
            routing,
        })
    }

    /// Image `i`'s pixels (uint8 `[H, W, 3]`, with `H` and `W`) when the trace holds them.
    pub fn image_pixels(&self, i: usize) -> Result<Option<(usize, usize, Vec<u8>)>, TraceError> {
        Ok(self
            .read_values(&image_tensor(i), 1, |b| b[0])?
            .map(|(info, bytes)| (info.shape[0], info.shape[1], bytes)))
    }

    /// Image `i` as the model saw it: its pixels in the trace, else its file (relative to the
    /// trace's folder).
    pub fn image(&self, i: usize) -> Result<image::DynamicImage, TraceError> {
        let name = image_tensor(i);
        if let Some((info, bytes)) = self.read_values(&name, 1, |b| b[0])? {
            let (h, w) = (info.shape[0] as u32, info.shape[1] as u32);
            return image::RgbImage::from_raw(w, h, bytes)
                .map(image::DynamicImage::ImageRgb8)
                .ok_or_else(|| self.invalid(format!("tensor `{name}`: bad pixel count")));
        }
        let meta = &self.meta.images[i];
        let Some(p) = &meta.path else {
            return Err(self.invalid(format!(
                "image {i} has neither pixels (`{name}`) nor a path"
            )));
        };
        let path = self.path.parent().unwrap_or(Path::new(".")).join(p);
        decode_image(&path).map_err(|e| TraceError::Image(e.to_string()))
    }

    /// The name image `i` is shown by.
    pub fn image_name(&self, i: usize) -> String {
        let m = &self.meta.images[i];
        m.name
            .clone()
            .or_else(|| m.path.clone())
            .unwrap_or_else(|| format!("image {i}"))
    }
}

/// Takes the scores, auxiliary losses and solver record of `derived` (the logged router run on
/// the logged logits) into `logged` when both put the same tokens in the same slots.
fn adopt_derived(logged: &mut RoutingResult, derived: RoutingResult) {
    if logged.capacity != derived.capacity {
        return;
    }
    if let (Assignment::Sparse(a), Assignment::Sparse(b)) =
        (&mut logged.assignment, derived.assignment)
        && a.slot_token == b.slot_token
    {
        a.scores = b.scores;
        logged.aux = derived.aux;
        logged.solver = derived.solver;
    }
}

/// `ln p`, with zero probabilities floored so that every router can rank them.
fn log_probs(p: &[f32]) -> Vec<f32> {
    p.iter().map(|&v| v.max(1e-30).ln()).collect()
}

fn placeholder_config() -> ModelConfig {
    ModelConfig {
        name: String::new(),
        image_size: [1, 1],
        channels: 3,
        patch_size: [1, 1],
        hidden_size: 1,
        num_layers: 1,
        num_heads: 1,
        mlp_dim: 1,
        classifier: Classifier::Gap,
        representation_size: None,
        num_classes: 0,
        class_names: Vec::new(),
        normalization: Normalization {
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        },
        gelu: Default::default(),
        layer_scale: false,
        layer_norm_eps: crate::model::DEFAULT_LAYER_NORM_EPS,
        cls_token: None,
        distillation_token: false,
        register_tokens: 0,
        fc_norm: false,
        moe: None,
    }
}
