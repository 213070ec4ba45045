//! Distillation of an MoE into its dense original: only the MoE layers (routers, experts, the
//! shared output bias) train, so that the final features of every token match the dense model's
//! under the MoE's own routing; every other weight stays frozen, bit for bit.
//!
//! Because the blocks before the first MoE layer are frozen and dense, their output is computed
//! once per augmented crop (with the fast inference path), as is the dense model's target; each
//! step then runs blocks `first..` with autograd. The loss is `1 − cos` between the MoE's and
//! the dense model's final features, averaged over every token, plus the router's auxiliary
//! losses, with each router's training-time behaviour as vmoe has it (noise for the routers that
//! use it; importance + load losses for Softmax Token Choice).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use image::DynamicImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::net::{NetMode, TrainNet};
use super::optim::{AdamW, AdamWConfig};
use crate::model::{ModelConfig, ModelWeights, RunOptions, VitMoe, block_prefix};
use crate::routing::{RouterConfig, RouterKind};

/// Everything that defines a distillation run (recorded in the output's metadata).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillOptions {
    /// Optimizer updates.
    pub steps: usize,
    /// Crops per update.
    pub batch_size: usize,
    /// Augmented crops drawn from the data folder, computed through the frozen blocks once.
    pub crops: usize,
    pub seed: u64,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
}

impl Default for DistillOptions {
    fn default() -> Self {
        Self {
            steps: 400,
            batch_size: 8,
            crops: 256,
            seed: 0,
            peak_lr: 3e-4,
            warmup_steps: 20,
            weight_decay: 0.0,
        }
    }
}

/// One update's numbers.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Updates done (1-based).
    pub step: usize,
    pub loss: f64,
    /// Mean cosine of the MoE's final token features to the dense model's, this batch.
    pub fidelity: f64,
    pub aux_loss: f64,
    /// Share of token-layer routings that reached no expert, this batch.
    pub dropped: f64,
    pub seconds: f64,
}

/// The frozen blocks' output and the dense target of one crop.
struct Crop {
    input: Vec<f32>,
    target: Vec<f32>,
}

/// A distillation in progress.
pub struct Distiller {
    pub net: TrainNet,
    pub router: RouterConfig,
    pub options: DistillOptions,
    first: usize,
    opt: AdamW,
    pool: Vec<Crop>,
    rng: ChaCha8Rng,
    pub step: usize,
}

/// Checks that `dense` is `moe` without its MoE layers: the same architecture, and every tensor
/// the two share equal up to the storage precision of either (an f16 file is widened on load).
pub fn check_pair(
    dense: (&ModelConfig, &ModelWeights),
    moe: (&ModelConfig, &ModelWeights),
) -> Result<(), TrainError> {
    let (dc, dw) = dense;
    let (mc, mw) = moe;
    if dc.moe.is_some() {
        return Err(TrainError::Model(format!(
            "the dense model `{}` has MoE layers; give the dense original",
            dc.name
        )));
    }
    let Some(m) = &mc.moe else {
        return Err(TrainError::Model(format!(
            "`{}` has no MoE layers to distil",
            mc.name
        )));
    };
    let arch = |c: &ModelConfig| {
        (
            c.image_size,
            c.channels,
            c.patch_size,
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.mlp_dim,
            c.gelu,
            c.layer_scale,
            c.prefix(),
            c.layer_norm_eps.to_bits(),
        )
    };
    if arch(dc) != arch(mc) {
        return Err(TrainError::Model(format!(
            "the dense model `{}` does not match the MoE `{}`: {:?} against {:?} (image size, \
             channels, patch, width, depth, heads, MLP, GELU, LayerScale, prefix tokens, eps)",
            dc.name,
            mc.name,
            arch(dc),
            arch(mc)
        )));
    }
    let moe_blocks: Vec<String> = m.layers.iter().map(|&i| block_prefix(i)).collect();
    for (name, a) in dw {
        let in_moe_block = moe_blocks
            .iter()
            .any(|b| name.starts_with(&format!("{b}/Mlp/")));
        if in_moe_block || name.starts_with("head") || name.starts_with("pre_logits") {
            continue;
        }
        let Some(b) = mw.get(name) else {
            return Err(TrainError::Model(format!(
                "the MoE `{}` has no tensor `{name}` of the dense model",
                mc.name
            )));
        };
        if a.shape != b.shape {
            return Err(TrainError::Model(format!(
                "`{name}` is {:?} in the dense model but {:?} in the MoE",
                a.shape, b.shape
            )));
        }
        // f16 keeps 11 significant bits: a relative step of 2^-11 (plus subnormals near 0).
        if let Some((x, y)) = a
            .data
            .iter()
            .zip(&b.data)
            .find(|(x, y)| (*x - *y).abs() > 1e-3 * x.abs().max(y.abs()) + 1e-6)
        {
            return Err(TrainError::Model(format!(
                "`{name}` differs between the dense model and the MoE ({x} against {y}): the \
                 MoE was not made from this dense model"
            )));
        }
    }
    Ok(())
}

/// Seeded augmentation of one photo for a `size` input: a random resized crop (8–100% of the
/// area, aspect 3/4–4/3, as torchvision's `RandomResizedCrop` draws it, falling back to the
/// central square), a horizontal flip half the time, and colour jitter (brightness, contrast
/// and saturation each scaled by a factor in [0.8, 1.2], in random order).
pub fn augment(img: &DynamicImage, size: [usize; 2], rng: &mut impl Rng) -> DynamicImage {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let area = f64::from(w) * f64::from(h);
    let mut rect = None;
    for _ in 0..10 {
        let a = area * rng.random_range(0.08..=1.0);
        let ratio = rng.random_range((0.75f64).ln()..=(4.0f64 / 3.0).ln()).exp();
        let cw = (a * ratio).sqrt().round() as u32;
        let ch = (a / ratio).sqrt().round() as u32;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            rect = Some((x, y, cw, ch));
            break;
        }
    }
    let (x, y, cw, ch) = rect.unwrap_or_else(|| {
        let s = w.min(h);
        ((w - s) / 2, (h - s) / 2, s, s)
    });
    let mut crop = img
        .crop_imm(x, y, cw, ch)
        .resize_exact(
            size[1] as u32,
            size[0] as u32,
            image::imageops::FilterType::Triangle,
        )
        .to_rgb32f();
    if rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut crop);
    }
    let mut order = [0u8, 1, 2];
    for i in (1..3).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let factors: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.8..=1.2));
    let px = crop.as_mut();
    for &which in &order {
        let f = factors[usize::from(which)];
        match which {
            0 => px.iter_mut().for_each(|v| *v *= f),
            1 => {
                // Towards the mean grey level, as torchvision's adjust_contrast.
                let grey: f32 = px
                    .chunks_exact(3)
                    .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
                    .sum::<f32>()
                    / (px.len() / 3).max(1) as f32;
                px.iter_mut().for_each(|v| *v = grey + f * (*v - grey));
            }
            _ => {
                for p in px.chunks_exact_mut(3) {
                    let grey = 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
                    p.iter_mut().for_each(|v| *v = grey + f * (*v - grey));
                }
            }
        }
        px.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    }
    DynamicImage::ImageRgb32F(crop)
}

/// Files left out, with why.
pub type Skipped = Vec<(PathBuf, String)>;

/// The photos of a data folder, decoded (unreadable ones skipped and returned with why).
pub fn read_photos(dir: &Path) -> Result<(Vec<DynamicImage>, Skipped), TrainError> {
    let meta =
        std::fs::metadata(dir).map_err(|e| TrainError::Data(format!("{}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(TrainError::Data(format!(
            "{}: not a folder of photos",
            dir.display()
        )));
    }
    let files = crate::model::list_images(dir, usize::MAX)
        .map_err(TrainError::Data)?
        .files;
    let (mut photos, mut skipped) = (Vec::new(), Vec::new());
    for f in files {
        match crate::model::decode_image(&f) {
            Ok(img) => photos.push(img),
            Err(e) => skipped.push((f, e.to_string())),
        }
    }
    if photos.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no readable photos ({} unreadable)",
            dir.display(),
            skipped.len()
        )));
    }
    Ok((photos, skipped))
}

impl Distiller {
    /// Prepares the distillation of `moe` (run under `router`) into `dense`: checks the pair,
    /// draws `options.crops` augmented crops of `photos` and computes their frozen-block outputs
    /// and dense targets (`progress(done, total)` after each batch).
    pub fn new(
        dense: (ModelConfig, ModelWeights),
        moe: (ModelConfig, ModelWeights),
        router: RouterConfig,
        photos: &[DynamicImage],
        options: DistillOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, TrainError> {
        let (mut cfg, weights) = moe;
        if options.steps == 0 || options.batch_size == 0 || options.crops == 0 {
            return Err(TrainError::Model(format!(
                "steps, batch size and crops must be at least 1 (got {}, {}, {})",
                options.steps, options.batch_size, options.crops
            )));
        }
        if photos.is_empty() {
            return Err(TrainError::Data("no photos to distil on".into()));
        }
        let Some(m) = cfg.moe.as_mut() else {
            return Err(TrainError::Model(format!(
                "`{}` has no MoE layers to distil",
                cfg.name
            )));
        };
        if router.kind == RouterKind::SoftMoe || m.router.kind == RouterKind::SoftMoe {
            return Err(TrainError::Model(format!(
                "distillation trains sparse routers; {} on a {} checkpoint is not supported",
                router.kind.cli_name(),
                m.router.kind.cli_name()
            )));
        }
        m.router = router.clone();
        let first = m.layers.iter().copied().min().unwrap_or(0);
        cfg.validate()
            .map_err(|e| TrainError::Model(e.to_string()))?;
        // The router must be runnable on these weights (its parameters present).
        crate::model::check_tensors(&cfg, weights.clone(), &cfg.name)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        check_pair((&dense.0, &dense.1), (&cfg, &weights))?;
        let dense = VitMoe::new(dense.0, dense.1).map_err(|e| TrainError::Model(e.to_string()))?;

        let frozen_model = VitMoe::new(cfg.clone(), weights.clone())
            .map_err(|e| TrainError::Model(e.to_string()))?;
        let net = TrainNet::for_distillation(cfg.clone(), &weights)?;
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x6469_7374_696c);
        let mut pool = Vec::with_capacity(options.crops);
        let dense_opts = RunOptions::from_config(&dense.config);
        const BATCH: usize = 16;
        while pool.len() < options.crops {
            let n = BATCH.min(options.crops - pool.len());
            let images = (0..n)
                .map(|_| {
                    let photo = &photos[rng.random_range(0..photos.len())];
                    crate::model::preprocess(&augment(photo, cfg.image_size, &mut rng), &cfg)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TrainError::Data(e.to_string()))?;
            let inputs = frozen_model
                .block_inputs(&images, first)
                .map_err(|e| TrainError::Model(e.to_string()))?;
            let targets = dense
                .forward(&images, &dense_opts)
                .map_err(|e| TrainError::Model(e.to_string()))?
                .features;
            let per = inputs.len() / n;
            for (i, target) in targets.into_iter().enumerate() {
                pool.push(Crop {
                    input: inputs[i * per..(i + 1) * per].to_vec(),
                    target,
                });
            }
            progress(pool.len(), options.crops);
        }
        let opt = AdamW::new(
            AdamWConfig {
                peak_lr: options.peak_lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: options.weight_decay,
                warmup_steps: options.warmup_steps,
                total_steps: options.steps,
            },
            &net.params,
        )?;
        Ok(Self {
            net,
            router,
            options,
            first,
            opt,
            pool,
            rng,
            step: 0,
        })
    }

    /// One update on a batch drawn from the crop pool.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        let start = Instant::now();
        let cfg = &self.net.config;
        let (s, d) = (cfg.seq_len(), cfg.hidden_size);
        let b = self.options.batch_size;
        let picks: Vec<usize> = (0..b)
            .map(|_| self.rng.random_range(0..self.pool.len()))
            .collect();
        let gather = |f: &dyn Fn(&Crop) -> &[f32]| -> Result<Tensor, TrainError> {
            let data: Vec<f32> = picks
                .iter()
                .flat_map(|&i| f(&self.pool[i]).to_vec())
                .collect();
            Ok(Tensor::from_vec(data, (b, s, d), &Device::Cpu)?)
        };
        let x = gather(&|c| &c.input)?;
        let target = gather(&|c| &c.target)?;
        let mut noise = ChaCha8Rng::seed_from_u64(self.rng.random());
        let enc = self
            .net
            .encode(x, self.first, &self.router, &mut NetMode::Train(&mut noise))?;
        let cos = cosine_rows(&enc.tokens, &target)?;
        let fidelity = cos.mean_all()?;
        let loss = ((1.0 - &fidelity)? + &enc.aux_loss)?;
        let loss_v = f64::from(loss.to_scalar::<f32>()?);
        if !loss_v.is_finite() {
            return Err(TrainError::Diverged(format!(
                "loss {loss_v} at step {}",
                self.step + 1
            )));
        }
        let grads = loss.backward()?;
        self.opt.apply(&self.net.params, &grads)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss: loss_v,
            fidelity: f64::from(fidelity.to_scalar::<f32>()?),
            aux_loss: f64::from(enc.aux_loss.to_scalar::<f32>()?),
            dropped: enc.dropped_tokens as f64 / enc.tokens_routed.max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The model as it stands: the frozen weights and the trained MoE layers, under the router
    /// it was distilled with.
    pub fn model(&self) -> Result<(ModelConfig, ModelWeights), TrainError> {
        let mut w = self.net.to_weights()?;
        for (name, t) in &self.net.frozen {
            w.insert(
                name.clone(),
                crate::tensor_io::F32Tensor {
                    shape: t.dims().to_vec(),
                    data: t.flatten_all()?.to_vec1()?,
                },
            );
        }
        Ok((self.net.config.clone(), w))
    }
}

/// Per-row cosine similarity of `a` and `b` `[B, S, d]` over the last axis: `[B, S]`.
fn cosine_rows(a: &Tensor, b: &Tensor) -> Result<Tensor, TrainError> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?;
    let nb = b.sqr()?.sum(D::Minus1)?;
    Ok((dot / ((na * nb)? + 1e-12)?.sqrt()?)?)
}

/// How close an MoE runs to its dense original on some photos, under a router.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Mean cosine of the final patch features (prefix tokens left out) to the dense model's.
    pub patch_cosine: f64,
    /// Share of (token, MoE layer) pairs that reached no expert.
    pub dropped: f64,
    /// Entropy of the experts' share of the router's requests (Token Choice: before capacity;
    /// Expert Choice: the tokens taken), over `ln E`, per MoE layer over all the photos, then
    /// averaged over layers: 1 when every expert is asked as often.
    pub usage_entropy: f64,
}

/// [`Fidelity`] of `moe` under `router` against `dense` on `images` (preprocessed), run in
/// batches by the inference path.
pub fn fidelity(
    dense: &VitMoe,
    moe: &VitMoe,
    router: &RouterConfig,
    images: &[Vec<f32>],
) -> Result<Fidelity, TrainError> {
    let cfg = &moe.config;
    let d = cfg.hidden_size;
    let skip = cfg.seq_len() - cfg.num_patches();
    let opts = RunOptions::from_config(cfg).with_router(router.clone());
    let e = cfg.moe.as_ref().map_or(1, |m| m.num_experts);
    let (mut cos_sum, mut cos_n) = (0.0, 0usize);
    let (mut dropped, mut routed) = (0usize, 0usize);
    let mut requests: Vec<Vec<usize>> = Vec::new();
    for chunk in images.chunks(8) {
        let want = dense
            .forward(chunk, &RunOptions::from_config(&dense.config))
            .map_err(|e| TrainError::Model(e.to_string()))?;
        let got = moe
            .forward(chunk, &opts)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        let patches = cfg.num_patches();
        cos_sum += crate::moefy::mean_patch_cosine(&got.features, &want.features, d, skip)
            * (chunk.len() * patches) as f64;
        cos_n += chunk.len() * patches;
        requests.resize(got.records.len(), vec![0; e]);
        for (layer, rec) in got.records.iter().enumerate() {
            for g in &rec.groups {
                let st = g.routing.stats();
                dropped += st.dropped_tokens.len();
                routed += g.routing.num_tokens;
                for (r, n) in requests[layer].iter_mut().zip(&st.requests_per_expert) {
                    *r += n;
                }
            }
        }
    }
    let entropy = |counts: &[usize]| {
        let total: usize = counts.iter().sum();
        if total == 0 || counts.len() < 2 {
            return 1.0;
        }
        let h: f64 = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.ln()
            })
            .sum();
        h / (counts.len() as f64).ln()
    };
    Ok(Fidelity {
        patch_cosine: cos_sum / cos_n.max(1) as f64,
        dropped: dropped as f64 / routed.max(1) as f64,
        usage_entropy: requests.iter().map(|c| entropy(c)).sum::<f64>()
            / requests.len().max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gelu, Normalization, preset, random_weights};
    use crate::moefy::{MoefyOptions, moefy};

    /// A DINOv2-like tiny feature model: RGB, LayerScale, erf GELU, no head.
    fn dense() -> (ModelConfig, ModelWeights) {
        let mut cfg = preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
        cfg.name = "tiny-dense".into();
        cfg.channels = 3;
        cfg.normalization = Normalization {
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        };
        cfg.hidden_size = 16;
        cfg.mlp_dim = 32;
        cfg.num_heads = 2;
        cfg.num_layers = 4;
        cfg.gelu = Gelu::Erf;
        cfg.layer_scale = true;
        cfg.num_classes = 0;
        cfg.class_names.clear();
        cfg.moe = None;
        let mut w = random_weights(&cfg, 11);
        // LayerScale and biases away from their initial 1 and 0, so a dropped factor shows.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (name, t) in w.iter_mut() {
            if name.contains("LayerScale") || name.ends_with("bias") {
                t.data
                    .iter_mut()
                    .for_each(|v| *v += rng.random_range(-0.5..0.5));
            }
        }
        (cfg, w)
    }

    fn photos(n: usize) -> Vec<DynamicImage> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        (0..n)
            .map(|_| {
                let img = image::RgbImage::from_fn(40, 36, |x, y| {
                    let base = ((x * 5 + y * 3) % 200) as u8;
                    image::Rgb([
                        base.wrapping_add(rng.random_range(0..40)),
                        rng.random(),
                        (255 - base).wrapping_add(rng.random_range(0..30)),
                    ])
                });
                DynamicImage::ImageRgb8(img)
            })
            .collect()
    }

    fn moefied(dense: &(ModelConfig, ModelWeights)) -> (ModelConfig, ModelWeights) {
        moefied_at(dense, &[2, 3])
    }

    fn moefied_at(
        dense: &(ModelConfig, ModelWeights),
        layers: &[usize],
    ) -> (ModelConfig, ModelWeights) {
        let (cfg, w) = dense;
        let images: Vec<Vec<f32>> = photos(4)
            .iter()
            .map(|p| crate::model::preprocess(p, cfg).unwrap())
            .collect();
        let mut router = RouterConfig::new(RouterKind::SoftmaxTokenChoice);
        router.k = 2;
        router.capacity = crate::routing::CapacitySpec::Factor(1.0);
        let opts = MoefyOptions {
            experts: 4,
            layers: layers.to_vec(),
            router,
            seed: 0,
            max_cluster_tokens: 1000,
        };
        let (c, w, _) = moefy(cfg, w.clone(), &images, &opts, &mut |_, _, _| {}).unwrap();
        (c, w)
    }

    fn router(kind: RouterKind) -> RouterConfig {
        let mut r = RouterConfig::new(kind);
        if kind.family() == crate::routing::RouterFamily::TokenChoice {
            r.k = 2;
            r.capacity = crate::routing::CapacitySpec::Factor(1.25);
        } else {
            r.capacity = crate::routing::CapacitySpec::Factor(2.5);
        }
        if kind == RouterKind::SoftmaxTokenChoice {
            r.loss_weights.importance = 0.005;
            r.loss_weights.load = 0.005;
        }
        r
    }

    fn options(steps: usize) -> DistillOptions {
        DistillOptions {
            steps,
            batch_size: 4,
            crops: 12,
            seed: 3,
            peak_lr: 3e-3,
            warmup_steps: 2,
            weight_decay: 0.0,
        }
    }

    /// The training graph from the first MoE block, in evaluation mode, computes the features
    /// the inference path computes (LayerScale, erf GELU, unit combine, narrow experts), for
    /// every sparse router.
    #[test]
    fn training_graph_matches_inference_on_a_moefied_feature_model() {
        let (cfg, w) = moefied(&dense());
        let model = VitMoe::new(cfg.clone(), w.clone()).unwrap();
        let net = TrainNet::for_distillation(cfg.clone(), &w).unwrap();
        let images: Vec<Vec<f32>> = photos(3)
            .iter()
            .map(|p| crate::model::preprocess(p, &cfg).unwrap())
            .collect();
        let first = 2;
        let x = model.block_inputs(&images, first).unwrap();
        let (s, d) = (cfg.seq_len(), cfg.hidden_size);
        for kind in RouterKind::ALL
            .into_iter()
            .filter(|k| *k != RouterKind::SoftMoe)
        {
            let r = router(kind);
            if model
                .check_options(&RunOptions::from_config(&cfg).with_router(r.clone()), 3)
                .is_err()
            {
                continue;
            }
            let x = Tensor::from_vec(x.clone(), (3, s, d), &Device::Cpu).unwrap();
            let enc = net
                .encode::<ChaCha8Rng>(x, first, &r, &mut NetMode::Eval)
                .unwrap();
            let got: Vec<f32> = enc.tokens.flatten_all().unwrap().to_vec1().unwrap();
            let want = model
                .forward(&images, &RunOptions::from_config(&cfg).with_router(r))
                .unwrap()
                .features
                .concat();
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "{kind:?}: max |diff| {diff}");
        }
    }

    /// Distillation lowers the loss, raises held-out fidelity, and leaves every weight outside
    /// the MoE layers bit-identical; a second run with the seed gives the same weights.
    #[test]
    fn distillation_learns_and_freezes_the_rest() {
        let d = dense();
        let m = moefied(&d);
        let photos = photos(5);
        let run = || {
            let mut dist = Distiller::new(
                d.clone(),
                m.clone(),
                router(RouterKind::SoftmaxTokenChoice),
                &photos,
                options(30),
                &mut |_, _| {},
            )
            .unwrap();
            let mut losses = Vec::new();
            while dist.step < 30 {
                losses.push(dist.step().unwrap().loss);
            }
            (dist.model().unwrap(), losses)
        };
        let ((cfg, w), losses) = run();
        let early: f64 = losses[..5].iter().sum::<f64>() / 5.0;
        let late: f64 = losses[25..].iter().sum::<f64>() / 5.0;
        assert!(late < 0.7 * early, "loss {early} -> {late}");
        let mut trained = 0;
        for (name, t) in &w {
            let before = &m.1[name];
            if name.contains("/Moe/") {
                trained += usize::from(t.data != before.data);
            } else {
                assert!(
                    t.data
                        .iter()
                        .zip(&before.data)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "frozen `{name}` changed"
                );
            }
        }
        assert!(trained >= 8, "only {trained} MoE tensors changed");
        assert_eq!(
            cfg.moe.as_ref().unwrap().router.kind,
            RouterKind::SoftmaxTokenChoice
        );
        let ((_, w2), losses2) = run();
        assert_eq!(losses, losses2);
        assert!(w.iter().all(|(n, t)| w2[n].data == t.data));

        let eval: Vec<Vec<f32>> = self::photos(7)[5..]
            .iter()
            .map(|p| crate::model::preprocess(p, &cfg).unwrap())
            .collect();
        let dense_model = VitMoe::new(d.0.clone(), d.1.clone()).unwrap();
        let r = router(RouterKind::SoftmaxTokenChoice);
        let before = fidelity(
            &dense_model,
            &VitMoe::new(m.0.clone(), m.1.clone()).unwrap(),
            &r,
            &eval,
        )
        .unwrap();
        let after = fidelity(&dense_model, &VitMoe::new(cfg, w).unwrap(), &r, &eval).unwrap();
        assert!(
            after.patch_cosine > before.patch_cosine,
            "{before:?} -> {after:?}"
        );
    }

    /// The auxiliary losses the distillation adds are the routing core's for the same logits.
    #[test]
    fn auxiliary_losses_equal_the_routing_cores() {
        let (cfg, w) = moefied_at(&dense(), &[3]);
        let model = VitMoe::new(cfg.clone(), w.clone()).unwrap();
        let net = TrainNet::for_distillation(cfg.clone(), &w).unwrap();
        let images: Vec<Vec<f32>> = photos(2)
            .iter()
            .map(|p| crate::model::preprocess(p, &cfg).unwrap())
            .collect();
        // One MoE layer (block 3): the inference model reports its clean logits per group.
        let r = router(RouterKind::SoftmaxTokenChoice);
        let x = model.block_inputs(&images, 3).unwrap();
        let (s, d, e) = (cfg.seq_len(), cfg.hidden_size, 4);
        let x = Tensor::from_vec(x, (2, s, d), &Device::Cpu).unwrap();
        // Same noise draw as the net makes: replay its RNG.
        let sigma = r.noise_std / e as f32;
        let mut noise_rng = ChaCha8Rng::seed_from_u64(77);
        let enc = net
            .encode(x, 3, &r, &mut NetMode::Train(&mut noise_rng))
            .unwrap();
        let got = f64::from(enc.aux_loss.to_scalar::<f32>().unwrap());
        let out = model
            .forward(
                &images,
                &RunOptions::from_config(&cfg).with_router(r.clone()),
            )
            .unwrap();
        let rec = out.records.iter().find(|rec| rec.block == 3).unwrap();
        let mut replay = ChaCha8Rng::seed_from_u64(77);
        let eps: Vec<f32> = (0..2 * s * e)
            .map(|_| sigma * replay.sample::<f32, _>(rand_distr::StandardNormal))
            .collect();
        let mut want = 0.0f64;
        for (g, group) in rec.groups.iter().enumerate() {
            let logits = &group.logits;
            let noisy: Vec<f32> = logits
                .iter()
                .zip(&eps[g * s * e..(g + 1) * s * e])
                .map(|(l, n)| l + n)
                .collect();
            let probs: Vec<f32> = logits
                .chunks_exact(e)
                .flat_map(|row| {
                    let m = row.iter().cloned().fold(f32::MIN, f32::max);
                    let ex: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
                    let z: f32 = ex.iter().sum();
                    ex.into_iter().map(move |v| v / z)
                })
                .collect();
            want += f64::from(crate::routing::importance_loss(&probs, e)) * 0.005
                + f64::from(crate::routing::load_loss(logits, &noisy, e, 2, sigma)) * 0.005;
        }
        want /= 2.0;
        assert!(
            (got - want).abs() < 1e-6 + 1e-4 * want.abs(),
            "net {got} vs routing core {want}"
        );
        assert!(want > 0.0);
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let d = dense();
        let m = moefied(&d);
        let photos = photos(2);
        let err = |dense: (ModelConfig, ModelWeights),
                   moe: (ModelConfig, ModelWeights),
                   r: RouterConfig,
                   p: &[DynamicImage],
                   o: DistillOptions| {
            Distiller::new(dense, moe, r, p, o, &mut |_, _| {})
                .err()
                .expect("an error")
                .to_string()
        };
        let tc = router(RouterKind::SoftmaxTokenChoice);
        // A dense model that is not the MoE's original.
        let other = (d.0.clone(), random_weights(&d.0, 99));
        let e = err(other, m.clone(), tc.clone(), &photos, options(3));
        assert!(e.contains("differs") && e.contains("not made from"), "{e}");
        let mut wide = d.clone();
        wide.0.num_heads = 4;
        let e = err(wide, m.clone(), tc.clone(), &photos, options(3));
        assert!(e.contains("does not match"), "{e}");
        // A router the MoE cannot run (Soft MoE, without its parameters).
        let e = err(
            d.clone(),
            m.clone(),
            RouterConfig::new(RouterKind::SoftMoe),
            &photos,
            options(3),
        );
        assert!(e.contains("soft"), "{e}");
        let e = err(d.clone(), m.clone(), tc.clone(), &[], options(3));
        assert!(e.contains("no photos"), "{e}");
        let e = err(d.clone(), m.clone(), tc.clone(), &photos, options(0));
        assert!(e.contains("at least 1"), "{e}");
        let e = err(d.clone(), d.clone(), tc, &photos, options(3));
        assert!(e.contains("no MoE layers") || e.contains("has MoE"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = read_photos(dir.path()).err().unwrap().to_string();
        assert!(e.contains("no readable photos"), "{e}");
        std::fs::write(dir.path().join("junk.png"), b"not a png").unwrap();
        let e = read_photos(dir.path()).err().unwrap().to_string();
        assert!(e.contains("1 unreadable"), "{e}");
        let e = read_photos(&dir.path().join("missing"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
