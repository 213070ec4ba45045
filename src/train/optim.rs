//! AdamW with a linear warm-up and cosine decay, over the named variables of a [`TrainNet`]
//! (state kept by name so it can be saved and resumed).
//!
//! [`TrainNet`]: super::net::TrainNet

use std::collections::BTreeMap;

use candle_core::{Tensor, Var, backprop::GradStore};

use super::TrainError;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub peak_lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to kernels (rank ≥ 2) only: not to biases, LayerNorm
    /// scales, Soft MoE's scalar scale, the CLS token or the position embedding.
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl AdamWConfig {
    /// Learning rate at `step` (0-based): linear warm-up to `peak_lr`, then cosine to 0.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// First and second moments per parameter.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates applied so far.
    pub step: usize,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

fn decays(name: &str, v: &Var) -> bool {
    v.rank() >= 2 && !name.ends_with("pos_embedding") && name != "cls"
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &BTreeMap<String, Var>) -> Result<Self, TrainError> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, p) in params {
            m.insert(name.clone(), p.as_tensor().zeros_like()?);
            v.insert(name.clone(), p.as_tensor().zeros_like()?);
        }
        Ok(Self {
            config,
            step: 0,
            m,
            v,
        })
    }

    /// One update of every parameter that has a gradient.
    pub fn apply(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &GradStore,
    ) -> Result<(), TrainError> {
        let c = self.config;
        let lr = c.lr(self.step);
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (name, p) in params {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let (Some(m), Some(v)) = (self.m.get_mut(name), self.v.get_mut(name)) else {
                return Err(TrainError::Model(format!(
                    "optimizer has no state for `{name}`"
                )));
            };
            // Gradients carry the step's autograd graph; the moments must not, or every step's
            // graph would stay alive through them.
            let g = g.detach();
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let m_hat = (&*m / bc1)?;
            let v_hat = (&*v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let current = p.as_tensor().detach();
            let mut next = (&current - (update * lr)?)?;
            if decays(name, p) && c.weight_decay > 0.0 {
                next = (next - (&current * (lr * c.weight_decay))?)?;
            }
            p.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let c = AdamWConfig {
            peak_lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((c.lr(0) - 1e-4).abs() < 1e-12);
        assert!((c.lr(9) - 1e-3).abs() < 1e-12);
        assert!((c.lr(60) - 5e-4).abs() < 1e-9);
        assert!(c.lr(110).abs() < 1e-12);
        assert!((1..110).all(|s| s < 10 || c.lr(s) <= c.lr(s - 1)));
    }
}
