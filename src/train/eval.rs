//! Test-set evaluation of a checkpoint with the inference model: accuracy, per-class accuracy, and
//! per MoE layer the routing statistics over every test image (expert load, dropped tokens, experts
//! per token, and which classes' patches each expert receives).

use std::time::Instant;

use serde::Serialize;

use super::TrainError;
use super::data::Dataset;
use crate::model::Forward;
use crate::model::RunOptions;
use crate::routing::Assignment;

/// Routing statistics of one MoE layer over the evaluated images.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerReport {
    pub block: usize,
    pub router: String,
    /// Slots per expert `c` (Soft MoE: `p`).
    pub capacity: usize,
    /// Mean tokens processed per expert per routing group (Soft MoE: combine mass, in tokens).
    pub load_per_expert: Vec<f64>,
    /// Fraction of the group's tokens reaching no expert.
    pub dropped_token_rate: f64,
    /// Mean number of experts processing a token.
    pub experts_per_token: f64,
    /// Fraction of tokens processed by exactly `t` experts, `t = 0..=e`.
    pub experts_per_token_histogram: Vec<f64>,
    /// `[class][expert]`: share of that class's token-to-expert assignments (Soft MoE: combine
    /// mass) going to each expert; rows sum to 1.
    pub class_expert_usage: Vec<Vec<f64>>,
}

/// Evaluation of a model on a labelled set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub images: usize,
    pub accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
    pub class_names: Vec<String>,
    pub layers: Vec<LayerReport>,
    pub seconds: f64,
}

/// Evaluates `model` with its own routing on all of `data`, `batch` images at a time.
pub fn evaluate<M: Forward + ?Sized>(
    model: &M,
    data: &Dataset,
    batch: usize,
) -> Result<EvalReport, TrainError> {
    let cfg = model.config();
    if [data.rows, data.cols] != cfg.image_size || cfg.channels != 1 {
        return Err(TrainError::Data(format!(
            "the data has {}x{} grey images but the model expects {}x{}x{}",
            data.rows, data.cols, cfg.image_size[0], cfg.image_size[1], cfg.channels
        )));
    }
    let opts = RunOptions::from_config(cfg);
    let batch = batch.max(opts.group_images).div_ceil(opts.group_images) * opts.group_images;
    let classes = cfg.num_classes;
    let start = Instant::now();
    let mut correct = vec![0usize; classes];
    let mut count = vec![0usize; classes];
    let layers = cfg.moe.as_ref().map_or(0, |m| m.layers.len());
    let e = cfg.moe.as_ref().map_or(0, |m| m.num_experts);
    let mut acc: Vec<LayerAcc> = (0..layers).map(|_| LayerAcc::new(e, classes)).collect();
    let (mean, std) = (cfg.normalization.mean[0], cfg.normalization.std[0]);
    // Whole routing groups only: a trailing partial group is left out (and reported by `images`).
    let usable = data.len() / opts.group_images * opts.group_images;
    let mut done = 0;
    while done < usable {
        let end = (done + batch).min(usable);
        let images: Vec<Vec<f32>> = (done..end)
            .map(|i| data.normalized(i, mean, std).collect())
            .collect();
        let out = model
            .forward(&images, &opts)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        for (k, probs) in out.probs.iter().enumerate() {
            let label = data.labels[done + k] as usize;
            let pred = argmax(probs);
            count[label] += 1;
            correct[label] += usize::from(pred == label);
        }
        for (la, rec) in acc.iter_mut().zip(&out.records) {
            la.block = rec.block;
            for g in &rec.groups {
                let labels: Vec<usize> = (0..g.num_images)
                    .map(|m| data.labels[done + g.first_image + m] as usize)
                    .collect();
                la.add(&g.routing, &labels);
            }
        }
        done = end;
    }
    let total: usize = count.iter().sum();
    Ok(EvalReport {
        model: cfg.name.clone(),
        images: total,
        accuracy: correct.iter().sum::<usize>() as f64 / total.max(1) as f64,
        per_class_accuracy: correct
            .iter()
            .zip(&count)
            .map(|(&c, &n)| c as f64 / n.max(1) as f64)
            .collect(),
        class_names: (0..classes).map(|c| cfg.class_name(c)).collect(),
        layers: acc.into_iter().map(LayerAcc::finish).collect(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}

struct LayerAcc {
    block: usize,
    router: String,
    capacity: usize,
    groups: usize,
    tokens: usize,
    dropped: usize,
    load: Vec<f64>,
    hist: Vec<usize>,
    usage: Vec<Vec<f64>>,
}

impl LayerAcc {
    fn new(e: usize, classes: usize) -> Self {
        Self {
            block: 0,
            router: String::new(),
            capacity: 0,
            groups: 0,
            tokens: 0,
            dropped: 0,
            load: vec![0.0; e],
            hist: vec![0; e + 1],
            usage: vec![vec![0.0; e]; classes],
        }
    }

    /// Adds one group; `labels` are its images' classes (tokens are image-major).
    fn add(&mut self, r: &crate::routing::RoutingResult, labels: &[usize]) {
        let stats = r.stats();
        let (n, e) = (r.num_tokens, r.num_experts);
        let per_image = n / labels.len().max(1);
        self.router = r.router.cli_name().to_string();
        self.capacity = r.capacity;
        self.groups += 1;
        self.tokens += n;
        self.dropped += stats.dropped_tokens.len();
        for (h, c) in self.hist.iter_mut().zip(&stats.experts_per_token_histogram) {
            *h += c;
        }
        match &r.assignment {
            Assignment::Sparse(_) => {
                for (l, &t) in self.load.iter_mut().zip(&stats.tokens_per_expert) {
                    *l += t as f64;
                }
                for i in 0..n {
                    let class = labels[(i / per_image).min(labels.len() - 1)];
                    for ch in r.token_choices(i).iter().filter(|c| c.slot.is_some()) {
                        self.usage[class][ch.expert as usize] += 1.0;
                    }
                }
            }
            Assignment::Soft(_) => {
                let probs = r.expert_probabilities();
                for i in 0..n {
                    let class = labels[(i / per_image).min(labels.len() - 1)];
                    for j in 0..e {
                        let w = probs[i * e + j] as f64;
                        self.load[j] += w;
                        self.usage[class][j] += w;
                    }
                }
            }
        }
    }

    fn finish(self) -> LayerReport {
        let g = self.groups.max(1) as f64;
        let t = self.tokens.max(1) as f64;
        let weighted: usize = self.hist.iter().enumerate().map(|(k, c)| k * c).sum();
        LayerReport {
            block: self.block,
            router: self.router,
            capacity: self.capacity,
            load_per_expert: self.load.iter().map(|l| l / g).collect(),
            dropped_token_rate: self.dropped as f64 / t,
            experts_per_token: weighted as f64 / t,
            experts_per_token_histogram: self.hist.iter().map(|&c| c as f64 / t).collect(),
            class_expert_usage: self
                .usage
                .into_iter()
                .map(|row| {
                    let s: f64 = row.iter().sum();
                    row.into_iter().map(|v| v / s.max(1e-12)).collect()
                })
                .collect(),
        }
    }
}
