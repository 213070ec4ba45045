//! Two routings of the same images compared token by token: two snapshots of a run, two
//! implementations, two precisions, two checkpoints. Per MoE block, the share of tokens whose
//! top-1 expert differs and whose chosen set differs, and per image and patch where they differ.

use std::collections::BTreeMap;

use serde::Serialize;

use super::reader::TraceFile;
use crate::routing::{Assignment, RouterFamily, RoutingResult};

/// What each token chose in one block: its top-1 expert (`u32::MAX`: none) and its set of
/// experts (sorted).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenPicks {
    pub top: Vec<u32>,
    pub sets: Vec<Vec<u32>>,
}

/// Token Choice: the first choice and every choice (kept or not, as the router ranked them);
/// Expert Choice: the highest-scored expert that took the token and every expert that did;
/// Soft MoE: the expert with the largest combine weight, and that expert alone.
pub fn token_picks(r: &RoutingResult) -> TokenPicks {
    let e = r.num_experts;
    let mut top = Vec::with_capacity(r.num_tokens);
    let mut sets = Vec::with_capacity(r.num_tokens);
    match &r.assignment {
        Assignment::Sparse(sp) => {
            for i in 0..r.num_tokens {
                let ch = r.token_choices(i);
                let t = if r.router.family() == RouterFamily::TokenChoice {
                    ch.first().map(|c| c.expert)
                } else {
                    ch.iter()
                        .max_by(|a, b| {
                            sp.scores[i * e + a.expert as usize]
                                .total_cmp(&sp.scores[i * e + b.expert as usize])
                        })
                        .map(|c| c.expert)
                };
                top.push(t.unwrap_or(u32::MAX));
                let mut set: Vec<u32> = ch.iter().map(|c| c.expert).collect();
                set.sort_unstable();
                set.dedup();
                sets.push(set);
            }
        }
        Assignment::Soft(_) => {
            let p = r.expert_probabilities();
            for row in p.chunks_exact(e) {
                let j = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(j, _)| j as u32);
                top.push(j);
                sets.push(vec![j]);
            }
        }
    }
    TokenPicks { top, sets }
}

/// Every token's picks in each block of a trace's logged routing, in image order.
pub fn trace_picks(trace: &TraceFile) -> Result<BTreeMap<usize, TokenPicks>, String> {
    let mut out = BTreeMap::new();
    for (l, layer) in trace.meta().layers.iter().enumerate() {
        let mut all = TokenPicks {
            top: Vec::new(),
            sets: Vec::new(),
        };
        // Groups hold consecutive images; visit them in image order.
        let mut order: Vec<usize> = (0..layer.groups.len()).collect();
        order.sort_by_key(|&g| layer.groups[g].members[0][0]);
        for g in order {
            let rec = trace.logged_group(l, g).map_err(|e| e.to_string())?;
            let p = token_picks(&rec.routing);
            all.top.extend(p.top);
            all.sets.extend(p.sets);
        }
        out.insert(layer.block, all);
    }
    Ok(out)
}

/// One block compared.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockDiff {
    pub block: usize,
    pub tokens: usize,
    pub top1_differ: usize,
    pub top1_differ_rate: f64,
    pub set_differ: usize,
    pub set_differ_rate: f64,
    /// Per image, the share of its tokens whose top-1 expert differs.
    pub per_image: Vec<f64>,
    /// Per image and token, whether the top-1 expert differs.
    #[serde(skip)]
    pub maps: Vec<Vec<bool>>,
}

/// Two traces compared.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceDiff {
    pub a: String,
    pub b: String,
    pub images: usize,
    pub tokens_per_image: usize,
    pub blocks: Vec<BlockDiff>,
    /// Blocks only one of the two logged.
    pub only_in_a: Vec<usize>,
    pub only_in_b: Vec<usize>,
}

/// Compares `a` and `b`: the same images (count, grid, CLS token, and pixels where both hold
/// them), every block both logged.
pub fn diff_traces(a: &TraceFile, b: &TraceFile) -> Result<TraceDiff, String> {
    let (ma, mb) = (a.meta(), b.meta());
    let name = |t: &TraceFile| t.path().display().to_string();
    if ma.images.len() != mb.images.len() {
        return Err(format!(
            "{} holds {} images, {} holds {}: a diff compares the routing of the same images",
            name(a),
            ma.images.len(),
            name(b),
            mb.images.len()
        ));
    }
    let (ia, ib) = (&ma.images[0], &mb.images[0]);
    if ia.grid != ib.grid || ia.cls_token != ib.cls_token {
        return Err(format!(
            "{} has a patch grid of {:?} (CLS token: {}), {} of {:?} ({}): not the same images",
            name(a),
            ia.grid,
            ia.cls_token,
            name(b),
            ib.grid,
            ib.cls_token
        ));
    }
    for i in 0..ma.images.len() {
        if let (Ok(pa), Ok(pb)) = (a.image_pixels(i), b.image_pixels(i))
            && let (Some(pa), Some(pb)) = (pa, pb)
            && pa != pb
        {
            return Err(format!(
                "image {i} differs between {} and {}: a diff compares the routing of the same \
                 images",
                name(a),
                name(b)
            ));
        }
    }
    let s = ia.grid[0] * ia.grid[1] + usize::from(ia.cls_token);
    let pa = trace_picks(a)?;
    let pb = trace_picks(b)?;
    let mut blocks = Vec::new();
    for (block, x) in &pa {
        let Some(y) = pb.get(block) else { continue };
        let n = x.top.len().min(y.top.len());
        let mut maps = Vec::with_capacity(n / s.max(1));
        let (mut top1, mut set) = (0, 0);
        let mut per_image = Vec::new();
        for img in 0..n / s.max(1) {
            let mut map = Vec::with_capacity(s);
            for t in img * s..(img + 1) * s {
                let d = x.top[t] != y.top[t];
                top1 += usize::from(d);
                set += usize::from(x.sets[t] != y.sets[t]);
                map.push(d);
            }
            per_image.push(map.iter().filter(|&&d| d).count() as f64 / s.max(1) as f64);
            maps.push(map);
        }
        let rate = |c: usize| if n > 0 { c as f64 / n as f64 } else { 0.0 };
        blocks.push(BlockDiff {
            block: *block,
            tokens: n,
            top1_differ: top1,
            top1_differ_rate: rate(top1),
            set_differ: set,
            set_differ_rate: rate(set),
            per_image,
            maps,
        });
    }
    if blocks.is_empty() {
        return Err(format!(
            "{} (blocks {:?}) and {} (blocks {:?}) have no MoE block in common",
            name(a),
            pa.keys().collect::<Vec<_>>(),
            name(b),
            pb.keys().collect::<Vec<_>>()
        ));
    }
    Ok(TraceDiff {
        a: name(a),
        b: name(b),
        images: ma.images.len(),
        tokens_per_image: s,
        only_in_a: pa.keys().filter(|k| !pb.contains_key(k)).copied().collect(),
        only_in_b: pb.keys().filter(|k| !pa.contains_key(k)).copied().collect(),
        blocks,
    })
}
