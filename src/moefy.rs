//! MoEfication (Zhang et al., Findings of ACL 2022): a dense ViT's MLPs become MoE layers whose
//! experts are groups of the MLP's own hidden units that fire together on calibration tokens, with
//! a bias-free linear router (vmoe's `Moe/Router/dense/kernel`) fitted to predict how much of a
//! token's activation mass each group holds.
//!
//! The experts are combined with unit weights and the dense MLP's output bias is added once per
//! token ([`Combine::Unit`]), so with every expert chosen for every token the MoE layer is exactly
//! the dense MLP (up to float summation order).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{
    Combine, ModelConfig, ModelError, ModelWeights, MoeConfig, VitMoe, block_prefix,
};
use crate::routing::RouterConfig;
use crate::tensor_io::F32Tensor;

/// Why a model could not be MoEfied; the message names the block, size or option.
#[derive(Debug, thiserror::Error)]
pub enum MoefyError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct MoefyOptions {
    /// Experts per MoE layer (must divide the MLP width).
    pub experts: usize,
    /// The dense blocks to turn into MoE layers.
    pub layers: Vec<usize>,
    /// The router the checkpoint declares (its kernel is the fitted one; any sparse router).
    pub router: RouterConfig,
    /// Seeds the clustering's initial centroids and the token sample.
    pub seed: u64,
    /// At most this many calibration tokens per layer are used for the clustering.
    pub max_cluster_tokens: usize,
}

/// How well one layer's router predicts where the activation mass is.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerReport {
    pub block: usize,
    /// Mean share of a token's activation mass in its best `k` experts (an oracle router), for
    /// `k` in [`REPORT_K`].
    pub oracle_mass: Vec<f64>,
    /// The same share in the `k` experts the fitted router ranks first.
    pub router_mass: Vec<f64>,
}

/// The `k`s of [`LayerReport`].
pub const REPORT_K: [usize; 3] = [1, 2, 4];

/// Turns blocks `opts.layers` of the dense model `cfg`/`weights` into MoE layers, calibrated on
/// `images` (preprocessed for `cfg`, see `model::preprocess`). `progress(step, done, total)`
/// reports each stage.
pub fn moefy(
    cfg: &ModelConfig,
    weights: ModelWeights,
    images: &[Vec<f32>],
    opts: &MoefyOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(ModelConfig, ModelWeights, Vec<LayerReport>), MoefyError> {
    let (d, m, e) = (cfg.hidden_size, cfg.mlp_dim, opts.experts);
    check(cfg, opts)?;
    if images.is_empty() {
        return Err(MoefyError::Config(
            "no calibration images (every one was unreadable, or the folder is empty)".into(),
        ));
    }
    let mut layers = opts.layers.clone();
    layers.sort_unstable();
    let model = VitMoe::new(cfg.clone(), weights.clone())?;
    let mut inputs: Vec<Vec<f32>> = vec![Vec::new(); layers.len()];
    const BATCH: usize = 8;
    let batches = images.len().div_ceil(BATCH);
    for (i, chunk) in images.chunks(BATCH).enumerate() {
        progress("calibration forward", i, batches);
        for (all, part) in inputs.iter_mut().zip(model.mlp_inputs(chunk, &layers)?) {
            all.extend(part);
        }
    }
    progress("calibration forward", batches, batches);
    drop(model);

    let mut weights = weights;
    let mut reports = Vec::with_capacity(layers.len());
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    for (li, (&block, y)) in layers.iter().zip(&inputs).enumerate() {
        progress("clustering and router fit", li, layers.len());
        let t = y.len() / d;
        let prefix = format!("{}/Mlp", block_prefix(block));
        let take = |w: &mut ModelWeights, name: &str| {
            w.remove(&format!("{prefix}/{name}"))
                .map(|t| t.data)
                .ok_or_else(|| MoefyError::Config(format!("missing tensor `{prefix}/{name}`")))
        };
        let (w0, b0, w1, b1) = (
            take(&mut weights, "Dense_0/kernel")?,
            take(&mut weights, "Dense_0/bias")?,
            take(&mut weights, "Dense_1/kernel")?,
            take(&mut weights, "Dense_1/bias")?,
        );
        let h = hidden_activations(y, t, d, &w0, &b0, m, cfg)?;
        // Units' |activation| profiles over a token sample, the clustering's points.
        let sample = sample_tokens(t, opts.max_cluster_tokens, &mut rng);
        let mut profiles = vec![0.0f32; m * sample.len()];
        for (c, &tok) in sample.iter().enumerate() {
            for (u, &v) in h[tok * m..(tok + 1) * m].iter().enumerate() {
                profiles[u * sample.len() + c] = v.abs();
            }
        }
        let groups = balanced_clusters(&profiles, m, sample.len(), e, &mut rng);
        drop(profiles);
        let mass = group_mass(&h, t, m, &groups);
        drop(h);
        let kernel = fit_router(y, d, &mass, e);
        reports.push(report(block, y, t, d, &mass, e, &kernel));
        insert_experts(
            &mut weights,
            block,
            &groups,
            [&w0, &b0, &w1, &b1],
            [d, m],
            kernel,
        );
    }
    progress("clustering and router fit", layers.len(), layers.len());
    let mut moe_cfg = cfg.clone();
    moe_cfg.moe = Some(MoeConfig {
        layers,
        num_experts: e,
        router: opts.router.clone(),
        group_images: 1,
        bfloat16_dispatch: false,
        combine: Combine::Unit,
        expert_mlp_dim: Some(m / e),
    });
    moe_cfg.validate()?;
    Ok((moe_cfg, weights, reports))
}

/// Checks `opts` against the dense model before any work (`moefy` does it too; a caller can
/// before it loads calibration images).
pub fn check(cfg: &ModelConfig, opts: &MoefyOptions) -> Result<(), MoefyError> {
    let bad = |m: String| Err(MoefyError::Config(m));
    let (m, e) = (cfg.mlp_dim, opts.experts);
    if let Some(moe) = &cfg.moe {
        return bad(format!(
            "the model already has MoE layers (blocks {:?}); moefy takes a dense model",
            moe.layers
        ));
    }
    if e < 2 || !m.is_multiple_of(e) {
        return bad(format!(
            "{e} experts do not split the {m} hidden units of the MLPs into equal groups \
             (the expert count must divide {m} and be at least 2)"
        ));
    }
    if opts.layers.is_empty() {
        return bad("no layers to turn into MoE layers".into());
    }
    if let Some(&l) = opts.layers.iter().find(|&&l| l >= cfg.num_layers) {
        return bad(format!(
            "layer {l} is beyond the model's {} blocks",
            cfg.num_layers
        ));
    }
    let mut sorted = opts.layers.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != opts.layers.len() {
        return bad(format!("layer listed twice in {:?}", opts.layers));
    }
    if opts.router.kind.family() == crate::routing::RouterFamily::Soft {
        return bad(
            "moefy fits a sparse router's kernel; Soft MoE has no such kernel (pick a sparse \
             router)"
                .into(),
        );
    }
    if opts.max_cluster_tokens == 0 {
        return bad("max_cluster_tokens must be positive".into());
    }
    Ok(())
}

/// `gelu(y @ W0 + b0)` `[t, m]` for the `t` token inputs `y` `[t, d]`.
fn hidden_activations(
    y: &[f32],
    t: usize,
    d: usize,
    w0: &[f32],
    b0: &[f32],
    m: usize,
    cfg: &ModelConfig,
) -> Result<Vec<f32>, MoefyError> {
    let yt = Tensor::from_slice(y, (t, d), &Device::Cpu)?;
    let wt = Tensor::from_slice(w0, (d, m), &Device::Cpu)?;
    let mut h: Vec<f32> = yt.matmul(&wt)?.flatten_all()?.to_vec1()?;
    for row in h.chunks_exact_mut(m) {
        for (v, &b) in row.iter_mut().zip(b0) {
            *v = cfg.gelu.apply(*v + b);
        }
    }
    Ok(h)
}

/// Up to `max` distinct token indices of `0..t`, sorted (all of them when `t <= max`).
fn sample_tokens(t: usize, max: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    if t <= max {
        return (0..t).collect();
    }
    // Partial Fisher–Yates: the first `max` of a seeded shuffle.
    let mut idx: Vec<usize> = (0..t).collect();
    for i in 0..max {
        let j = rng.random_range(i..t);
        idx.swap(i, j);
    }
    let mut out = idx[..max].to_vec();
    out.sort_unstable();
    out
}

/// Splits `units` points of dimension `dim` (`points` `[units, dim]`) into `groups` clusters of
/// exactly `units / groups` points by cosine similarity: balanced k-means, with seeded
/// k-means++ centroids and a greedy assignment of the most similar (point, cluster) pairs first
/// while the cluster has room. Each group's indices are sorted; ties break to the lower index, so
/// the result depends only on the input and the RNG state.
pub fn balanced_clusters(
    points: &[f32],
    units: usize,
    dim: usize,
    groups: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let size = units / groups;
    let mut p: Vec<f32> = points.to_vec();
    for row in p.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // k-means++ on the cosine distance 1 - sim.
    let mut centroids: Vec<Vec<f32>> = Vec::with_capacity(groups);
    let first = rng.random_range(0..units);
    centroids.push(p[first * dim..(first + 1) * dim].to_vec());
    let mut dist = vec![f32::INFINITY; units];
    while centroids.len() < groups {
        let last = centroids.last().map(Vec::as_slice).unwrap_or(&[]);
        for (u, d) in dist.iter_mut().enumerate() {
            *d = d.min((1.0 - dot(&p[u * dim..(u + 1) * dim], last)).max(0.0));
        }
        let total: f64 = dist.iter().map(|&d| f64::from(d * d)).sum();
        let pick = if total > 0.0 {
            let mut r = rng.random::<f64>() * total;
            let mut chosen = units - 1;
            for (u, &d) in dist.iter().enumerate() {
                r -= f64::from(d * d);
                if r <= 0.0 {
                    chosen = u;
                    break;
                }
            }
            chosen
        } else {
            rng.random_range(0..units)
        };
        centroids.push(p[pick * dim..(pick + 1) * dim].to_vec());
    }
    let mut assign = vec![usize::MAX; units];
    for _ in 0..30 {
        let mut pairs: Vec<(f32, usize, usize)> = Vec::with_capacity(units * groups);
        for u in 0..units {
            let pu = &p[u * dim..(u + 1) * dim];
            for (g, c) in centroids.iter().enumerate() {
                pairs.push((dot(pu, c), u, g));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut next = vec![usize::MAX; units];
        let mut fill = vec![0usize; groups];
        for (_, u, g) in pairs {
            if next[u] == usize::MAX && fill[g] < size {
                next[u] = g;
                fill[g] += 1;
            }
        }
        let changed = next != assign;
        assign = next;
        for (g, c) in centroids.iter_mut().enumerate() {
            c.iter_mut().for_each(|v| *v = 0.0);
            for u in (0..units).filter(|&u| assign[u] == g) {
                for (v, &x) in c.iter_mut().zip(&p[u * dim..(u + 1) * dim]) {
                    *v += x;
                }
            }
            let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                c.iter_mut().for_each(|v| *v /= norm);
            }
        }
        if !changed {
            break;
        }
    }
    (0..groups)
        .map(|g| (0..units).filter(|&u| assign[u] == g).collect())
        .collect()
}

/// Each token's share of its activation mass (`Σ |h|`) per group, `[t, e]`.
fn group_mass(h: &[f32], t: usize, m: usize, groups: &[Vec<usize>]) -> Vec<f32> {
    let e = groups.len();
    let mut out = vec![0.0f32; t * e];
    for (row, o) in h.chunks_exact(m).zip(out.chunks_exact_mut(e)) {
        let total: f32 = row
            .iter()
            .map(|v| v.abs())
            .sum::<f32>()
            .max(f32::MIN_POSITIVE);
        for (j, g) in groups.iter().enumerate() {
            o[j] = g.iter().map(|&u| row[u].abs()).sum::<f32>() / total;
        }
    }
    out
}

/// The bias-free linear router `[d, e]` that best predicts `e ·` the mass shares (mean 1 per
/// token) from the token inputs `y` `[t, d]`: ridge least squares, solved in double precision
/// through the normal equations (Cholesky), with a ridge of 1e-4 of the mean diagonal.
pub fn fit_router(y: &[f32], d: usize, mass: &[f32], e: usize) -> Vec<f32> {
    let mut gram = vec![0.0f64; d * d];
    let mut rhs = vec![0.0f64; d * e];
    for (row, target) in y.chunks_exact(d).zip(mass.chunks_exact(e)) {
        for i in 0..d {
            let yi = f64::from(row[i]);
            if yi == 0.0 {
                continue;
            }
            for (g, &yj) in gram[i * d..(i + 1) * d].iter_mut().zip(row) {
                *g += yi * f64::from(yj);
            }
            for (r, &a) in rhs[i * e..(i + 1) * e].iter_mut().zip(target) {
                *r += yi * f64::from(a) * e as f64;
            }
        }
    }
    let mean_diag = (0..d).map(|i| gram[i * d + i]).sum::<f64>() / d as f64;
    for i in 0..d {
        gram[i * d + i] += 1e-4 * mean_diag.max(1e-12) + 1e-12;
    }
    let l = cholesky(&gram, d);
    let mut kernel = vec![0.0f32; d * e];
    for j in 0..e {
        let b: Vec<f64> = (0..d).map(|i| rhs[i * e + j]).collect();
        for (i, v) in cholesky_solve(&l, d, &b).into_iter().enumerate() {
            kernel[i * e + j] = v as f32;
        }
    }
    kernel
}

/// Lower-triangular `L` with `L·Lᵀ = a` for a symmetric positive definite `a` `[n, n]`.
fn cholesky(a: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                l[i * n + i] = (a[i * n + i] - s).max(1e-300).sqrt();
            } else {
                l[i * n + j] = (a[i * n + j] - s) / l[j * n + j];
            }
        }
    }
    l
}

fn cholesky_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut z = vec![0.0f64; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * z[k]).sum();
        z[i] = (b[i] - s) / l[i * n + i];
    }
    let mut x = vec![0.0f64; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
        x[i] = (z[i] - s) / l[i * n + i];
    }
    x
}

/// The oracle's and the fitted router's top-k mass shares.
fn report(
    block: usize,
    y: &[f32],
    t: usize,
    d: usize,
    mass: &[f32],
    e: usize,
    kernel: &[f32],
) -> LayerReport {
    let mut oracle = vec![0.0f64; REPORT_K.len()];
    let mut router = vec![0.0f64; REPORT_K.len()];
    for (row, share) in y.chunks_exact(d).zip(mass.chunks_exact(e)) {
        let logits: Vec<f32> = (0..e)
            .map(|j| {
                row.iter()
                    .enumerate()
                    .map(|(i, &v)| v * kernel[i * e + j])
                    .sum()
            })
            .collect();
        let order = |key: &[f32]| {
            let mut o: Vec<usize> = (0..e).collect();
            o.sort_by(|&a, &b| key[b].total_cmp(&key[a]).then(a.cmp(&b)));
            o
        };
        let (by_mass, by_router) = (order(share), order(&logits));
        for (n, &k) in REPORT_K.iter().enumerate() {
            let k = k.min(e);
            oracle[n] += by_mass[..k]
                .iter()
                .map(|&j| f64::from(share[j]))
                .sum::<f64>();
            router[n] += by_router[..k]
                .iter()
                .map(|&j| f64::from(share[j]))
                .sum::<f64>();
        }
    }
    let t = t.max(1) as f64;
    LayerReport {
        block,
        oracle_mass: oracle.into_iter().map(|v| v / t).collect(),
        router_mass: router.into_iter().map(|v| v / t).collect(),
    }
}

/// Replaces block `block`'s dense MLP `[w0, b0, w1, b1]` (`[d, m]`, `[m]`, `[m, d]`, `[d]`) by
/// one expert per group of hidden units, the layer's output bias and the router kernel.
fn insert_experts(
    weights: &mut ModelWeights,
    block: usize,
    groups: &[Vec<usize>],
    [w0, b0, w1, b1]: [&[f32]; 4],
    [d, m]: [usize; 2],
    kernel: Vec<f32>,
) {
    let e = groups.len();
    let me = m / e;
    let (mut ew0, mut eb0, mut ew1) = (
        Vec::with_capacity(e * d * me),
        Vec::with_capacity(e * me),
        Vec::with_capacity(e * me * d),
    );
    for g in groups {
        for r in 0..d {
            ew0.extend(g.iter().map(|&u| w0[r * m + u]));
        }
        eb0.extend(g.iter().map(|&u| b0[u]));
        for &u in g {
            ew1.extend_from_slice(&w1[u * d..(u + 1) * d]);
        }
    }
    let p = format!("{}/Moe", block_prefix(block));
    let mut put = |name: &str, shape: Vec<usize>, data: Vec<f32>| {
        weights.insert(format!("{p}/{name}"), F32Tensor { shape, data });
    };
    put("Mlp/Dense_0/kernel", vec![e, d, me], ew0);
    put("Mlp/Dense_0/bias", vec![e, me], eb0);
    put("Mlp/Dense_1/kernel", vec![e, me, d], ew1);
    put("Mlp/Dense_1/bias", vec![e, d], vec![0.0; e * d]);
    put("bias", vec![d], b1.to_vec());
    put("Router/dense/kernel", vec![d, e], kernel);
}

#[cfg(test)]
mod tests;

/// Image files under `dir`, searched recursively, sorted (extensions as the viewer opens).
pub fn image_files(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, MoefyError> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| MoefyError::Config(format!("{}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(MoefyError::Config(format!(
            "{}: not a folder of calibration images",
            dir.display()
        )));
    }
    crate::model::list_images(dir, usize::MAX)
        .map(|l| l.files)
        .map_err(MoefyError::Config)
}

/// `crops` seeded random square crops (a side of 50–100% of the shorter side, anywhere in the
/// image, mirrored with probability ½) of every image, preprocessed for `cfg`. Unreadable files
/// are skipped and returned with why.
pub fn calibration_crops(
    files: &[std::path::PathBuf],
    cfg: &ModelConfig,
    crops: usize,
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<(std::path::PathBuf, String)>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x006d_6f65_6679);
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for f in files {
        let img = match crate::model::decode_image(f) {
            Ok(i) => i,
            Err(e) => {
                skipped.push((f.clone(), e.to_string()));
                continue;
            }
        };
        let (w, h) = (img.width(), img.height());
        let short = w.min(h).max(1);
        for _ in 0..crops {
            let side = rng.random_range(short.div_ceil(2)..=short).max(1);
            let x = rng.random_range(0..=w - side);
            let y = rng.random_range(0..=h - side);
            let mut crop = img.crop_imm(x, y, side, side);
            if rng.random_bool(0.5) {
                crop = crop.fliph();
            }
            match crate::model::preprocess(&crop, cfg) {
                Ok(px) => out.push(px),
                Err(e) => {
                    skipped.push((f.clone(), e.to_string()));
                    break;
                }
            }
        }
    }
    (out, skipped)
}

/// Run options under which every token reaches every expert of every MoE layer (Token Choice
/// with k = E and room for all): for a moefied model, the dense model it came from.
pub fn all_experts_options(cfg: &ModelConfig) -> crate::model::RunOptions {
    let opts = crate::model::RunOptions::from_config(cfg);
    let Some(moe) = &cfg.moe else { return opts };
    opts.with_router(RouterConfig {
        k: moe.num_experts,
        capacity: crate::routing::CapacitySpec::Factor(1.0),
        ..RouterConfig::new(crate::routing::RouterKind::SoftmaxTokenChoice)
    })
}

/// Mean cosine similarity between two models' features of the same images (`[B][S·d]`), over
/// the patch tokens (the first `skip` tokens, the CLS token, left out): how far a routing moves
/// the representation.
pub fn mean_patch_cosine(a: &[Vec<f32>], b: &[Vec<f32>], d: usize, skip: usize) -> f64 {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (x, y) in a.iter().zip(b) {
        for (u, v) in x.chunks_exact(d).zip(y.chunks_exact(d)).skip(skip) {
            let dot: f64 = u
                .iter()
                .zip(v)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let nu: f64 = u.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            let nv: f64 = v.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
            sum += dot / (nu * nv).max(f64::MIN_POSITIVE);
            count += 1;
        }
    }
    if count == 0 { 1.0 } else { sum / count as f64 }
}
