//! The training loop: seeded initialisation and shuffling, AdamW with warm-up and cosine decay,
//! a progress bar, and an atomic checkpoint (model + optimizer state) at every epoch end so an
//! interrupted run resumes losing at most one epoch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::data::Dataset;
use super::net::{NetMode, TrainNet, cross_entropy};
use super::optim::{AdamW, AdamWConfig};
use crate::model::{ModelConfig, load_checkpoint, random_weights, save_checkpoint};
use crate::routing::RouterKind;
use crate::tensor_io::{OutTensor, TensorFile, write_f32_safetensors};

/// Metadata key of the training-state file.
pub const STATE_METADATA_KEY: &str = "routerscope.train_state";

/// Everything that defines a run (saved with the state; a resume must match it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub peak_lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 5,
            batch_size: 128,
            seed: 0,
            peak_lr: 1e-3,
            weight_decay: 0.05,
            warmup_steps: 200,
        }
    }
}

/// What the state file records besides the optimizer moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub options: TrainOptions,
    pub router: String,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimizer updates applied.
    pub step: usize,
    /// Training seconds so far (over all sessions).
    pub seconds: f64,
}

/// Summary of one epoch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub images_per_second: f64,
    pub dropped_token_rate: f64,
}

/// `M.safetensors` → `M.train-state.safetensors`.
pub fn state_path(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    model.with_file_name(format!("{stem}.train-state.safetensors"))
}

/// Pixels of images `idx` of `data` as normalised floats `[B, H·W]`.
pub fn batch_tensor(
    data: &Dataset,
    idx: &[usize],
    cfg: &ModelConfig,
) -> Result<Tensor, TrainError> {
    let (mean, std) = (cfg.normalization.mean[0], cfg.normalization.std[0]);
    let px = data.rows * data.cols;
    let mut v = Vec::with_capacity(idx.len() * px);
    for &i in idx {
        v.extend(data.normalized(i, mean, std));
    }
    Ok(Tensor::from_vec(v, (idx.len(), px), &Device::Cpu)?)
}

/// A training run in progress.
pub struct Trainer {
    pub net: TrainNet,
    pub optim: AdamW,
    pub state: TrainState,
}

impl Trainer {
    /// A fresh run of `config` (one channel, matching `data`'s image size).
    pub fn new(
        config: ModelConfig,
        options: TrainOptions,
        steps_per_epoch: usize,
    ) -> Result<Self, TrainError> {
        let weights = random_weights(&config, options.seed);
        let router = config.moe.as_ref().map_or("dense".to_string(), |m| {
            m.router.kind.cli_name().to_string()
        });
        let net = TrainNet::from_weights(config, &weights)?;
        let optim = AdamW::new(adam_config(&options, steps_per_epoch), &net.params)?;
        Ok(Self {
            net,
            optim,
            state: TrainState {
                options,
                router,
                epochs_done: 0,
                step: 0,
                seconds: 0.0,
            },
        })
    }

    /// Continues the run saved at `model` (and its state file).
    pub fn resume(model: &Path, steps_per_epoch: usize) -> Result<Self, TrainError> {
        let (config, weights) =
            load_checkpoint(model).map_err(|e| TrainError::Model(e.to_string()))?;
        let sp = state_path(model);
        let file = TensorFile::open(&sp).map_err(|e| {
            TrainError::Resume(format!(
                "{}: {e} (no training state to resume from)",
                sp.display()
            ))
        })?;
        let meta = file
            .metadata()
            .map_err(|e| TrainError::Resume(e.to_string()))?;
        let state: TrainState = meta
            .get(STATE_METADATA_KEY)
            .ok_or_else(|| {
                TrainError::Resume(format!(
                    "{}: no `{STATE_METADATA_KEY}` metadata",
                    sp.display()
                ))
            })
            .and_then(|j| {
                serde_json::from_str(j)
                    .map_err(|e| TrainError::Resume(format!("{}: {e}", sp.display())))
            })?;
        let net = TrainNet::from_weights(config, &weights)?;
        let mut optim = AdamW::new(adam_config(&state.options, steps_per_epoch), &net.params)?;
        optim.step = state.step;
        for (name, var) in &net.params {
            for (prefix, store) in [("m", &mut optim.m), ("v", &mut optim.v)] {
                let key = format!("{prefix}/{name}");
                let shape = format!("{:?}", var.dims());
                let t = file
                    .f32(&key, &shape)
                    .map_err(|e| TrainError::Resume(e.to_string()))?;
                store.insert(
                    name.clone(),
                    Tensor::from_vec(t.data, t.shape, &Device::Cpu)?,
                );
            }
        }
        Ok(Self { net, optim, state })
    }

    /// One optimizer step on a batch; returns (loss, correct predictions, dropped tokens, tokens).
    pub fn step(
        &mut self,
        images: &Tensor,
        labels: &[u8],
        rng: &mut ChaCha8Rng,
    ) -> Result<(f64, usize, usize, usize), TrainError> {
        let router = self
            .net
            .config
            .moe
            .as_ref()
            .map(|m| m.router.clone())
            .unwrap_or_else(|| crate::routing::RouterConfig::new(RouterKind::SoftmaxTokenChoice));
        let out = self
            .net
            .forward(images, &router, &mut NetMode::Train(rng))?;
        let labels_t = Tensor::from_vec(
            labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
            labels.len(),
            &Device::Cpu,
        )?;
        let ce = cross_entropy(&out.logits, &labels_t)?;
        let loss = (&ce + &out.aux_loss)?;
        let grads = loss.backward()?;
        self.optim.apply(&self.net.params, &grads)?;
        self.state.step = self.optim.step;
        let pred: Vec<u32> = out.logits.argmax(1)?.to_vec1()?;
        let correct = pred
            .iter()
            .zip(labels)
            .filter(|(p, l)| **p == **l as u32)
            .count();
        Ok((
            ce.to_scalar::<f32>()? as f64,
            correct,
            out.dropped_tokens,
            out.tokens,
        ))
    }

    /// Trains the remaining epochs on `data`, checkpointing to `out` after each; stops early when
    /// `on_epoch` returns false.
    pub fn run(
        &mut self,
        data: &Dataset,
        out: &Path,
        mut on_epoch: impl FnMut(&EpochReport) -> bool,
    ) -> Result<Vec<EpochReport>, TrainError> {
        let opts = self.state.options.clone();
        let bs = opts.batch_size;
        let steps = data.len() / bs;
        if steps == 0 {
            return Err(TrainError::Data(format!(
                "{} training images are fewer than one batch of {bs}",
                data.len()
            )));
        }
        let mut reports = Vec::new();
        for epoch in self.state.epochs_done..opts.epochs {
            let mut order: Vec<usize> = (0..data.len()).collect();
            let mut rng = epoch_rng(opts.seed, epoch);
            order.shuffle(&mut rng);
            let bar = ProgressBar::new(steps as u64).with_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta} left)",
                )
                .map_err(|e| TrainError::Model(e.to_string()))?
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{}/{}", epoch + 1, opts.epochs));
            let start = Instant::now();
            let (mut loss_sum, mut correct, mut seen, mut dropped, mut tokens) = (0.0, 0, 0, 0, 0);
            for s in 0..steps {
                let idx = &order[s * bs..(s + 1) * bs];
                let images = batch_tensor(data, idx, &self.net.config)?;
                let labels: Vec<u8> = idx.iter().map(|&i| data.labels[i]).collect();
                let (loss, ok, dr, tk) = self.step(&images, &labels, &mut rng)?;
                if !loss.is_finite() {
                    return Err(TrainError::Diverged(format!(
                        "loss became {loss} at epoch {} step {s}",
                        epoch + 1
                    )));
                }
                loss_sum += loss * bs as f64;
                correct += ok;
                seen += bs;
                dropped += dr;
                tokens += tk;
                bar.inc(1);
                bar.set_message(format!(
                    "loss {:.3} acc {:.1}% {:.0} img/s",
                    loss_sum / seen as f64,
                    100.0 * correct as f64 / seen as f64,
                    seen as f64 / start.elapsed().as_secs_f64()
                ));
            }
            bar.finish_and_clear();
            let secs = start.elapsed().as_secs_f64();
            self.state.seconds += secs;
            self.state.epochs_done = epoch + 1;
            let report = EpochReport {
                epoch: epoch + 1,
                loss: loss_sum / seen as f64,
                accuracy: correct as f64 / seen as f64,
                images_per_second: seen as f64 / secs,
                dropped_token_rate: if tokens == 0 {
                    0.0
                } else {
                    dropped as f64 / tokens as f64
                },
            };
            self.save(out)?;
            let go_on = on_epoch(&report);
            reports.push(report);
            if !go_on {
                break;
            }
        }
        Ok(reports)
    }

    /// Writes the model and then its training state, each atomically.
    pub fn save(&self, out: &Path) -> Result<(), TrainError> {
        let weights = self.net.to_weights()?;
        let mut names = Vec::new();
        let mut data = Vec::new();
        for (name, m) in &self.optim.m {
            let v = &self.optim.v[name];
            names.push((format!("m/{name}"), m.dims().to_vec()));
            data.push(m.flatten_all()?.to_vec1::<f32>()?);
            names.push((format!("v/{name}"), v.dims().to_vec()));
            data.push(v.flatten_all()?.to_vec1::<f32>()?);
        }
        let tensors: Vec<OutTensor<'_>> = names
            .iter()
            .zip(&data)
            .map(|((name, shape), d)| OutTensor {
                name,
                shape: shape.clone(),
                data: d,
            })
            .collect();
        let json =
            serde_json::to_string(&self.state).map_err(|e| TrainError::Model(e.to_string()))?;
        let meta = HashMap::from([(STATE_METADATA_KEY.to_string(), json)]);
        write_f32_safetensors(&state_path(out), &tensors, meta)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        save_checkpoint(out, &self.net.config, &weights)
            .map_err(|e| TrainError::Model(e.to_string()))
    }
}

fn adam_config(o: &TrainOptions, steps_per_epoch: usize) -> AdamWConfig {
    AdamWConfig {
        peak_lr: o.peak_lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: o.weight_decay,
        warmup_steps: o.warmup_steps,
        total_steps: o.epochs * steps_per_epoch,
    }
}

/// The RNG of epoch `epoch` (shuffling and router noise): a function of the seed and the epoch
/// only, so a resumed run draws exactly what an uninterrupted one would.
pub fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64 + 1);
    rng
}
