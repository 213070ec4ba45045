//! A block's metrics over steps, decimated as the rows stream in: at most [`MAX_COLUMNS`] bins of
//! consecutive steps, each keeping every metric's minimum and maximum (a one-step spike stays
//! visible at any zoom) and the experts' summed shares (for a mean load heatmap). A run of
//! 100,000 steps draws from 1,000 bins per block.

use super::aggregate::LayerMetrics;

/// The most step bins a figure draws.
pub const MAX_COLUMNS: usize = 1000;

/// One block's series, decimated while the rows stream in.
#[derive(Clone, Debug)]
pub struct BlockSeries {
    pub block: usize,
    experts: usize,
    /// Steps per bin (doubles, merging pairs of bins, when the bins run out).
    per_bin: usize,
    bins: Vec<Bin>,
}

#[derive(Clone, Debug)]
pub struct Bin {
    pub first: i64,
    pub last: i64,
    pub rows: usize,
    /// Per metric: min, max (infinite when the metric was never known in the bin).
    pub metrics: [(f64, f64); METRICS.len()],
    /// Per expert: the sum of its shares over the bin's rows.
    pub shares: Vec<f64>,
}

/// The metrics drawn, with their names: dropped rate, load CV, max-violation, router entropy,
/// dead experts, z-loss.
pub const METRICS: [&str; 6] = [
    "dropped rate",
    "load CV",
    "max-violation",
    "router entropy",
    "dead experts",
    "router z-loss",
];

impl BlockSeries {
    pub fn new(block: usize, experts: usize) -> Self {
        Self {
            block,
            experts,
            per_bin: 1,
            bins: Vec::new(),
        }
    }

    /// Adds one step's values (`NaN` for a metric that is not known) and the experts' shares.
    pub fn push(&mut self, step: i64, values: [f64; METRICS.len()], shares: &[f64]) {
        let open = self.bins.last().is_some_and(|b| b.rows < self.per_bin);
        if !open {
            if self.bins.len() == MAX_COLUMNS {
                self.halve();
            }
            if self.bins.last().is_none_or(|b| b.rows >= self.per_bin) {
                self.bins.push(Bin {
                    first: step,
                    last: step,
                    rows: 0,
                    metrics: [(f64::INFINITY, f64::NEG_INFINITY); METRICS.len()],
                    shares: vec![0.0; self.experts],
                });
            }
        }
        if let Some(b) = self.bins.last_mut() {
            b.last = step;
            b.rows += 1;
            for (m, v) in b.metrics.iter_mut().zip(values) {
                if v.is_finite() {
                    m.0 = m.0.min(v);
                    m.1 = m.1.max(v);
                }
            }
            for (a, s) in b.shares.iter_mut().zip(shares) {
                *a += s;
            }
        }
    }

    /// Merges neighbouring bins pairwise.
    fn halve(&mut self) {
        let old = std::mem::take(&mut self.bins);
        for pair in old.chunks(2) {
            let mut b = pair[0].clone();
            if let Some(o) = pair.get(1) {
                b.last = o.last;
                b.rows += o.rows;
                for (m, n) in b.metrics.iter_mut().zip(o.metrics) {
                    m.0 = m.0.min(n.0);
                    m.1 = m.1.max(n.1);
                }
                for (a, s) in b.shares.iter_mut().zip(&o.shares) {
                    *a += s;
                }
            }
            self.bins.push(b);
        }
        self.per_bin *= 2;
    }

    pub fn is_empty(&self) -> bool {
        self.bins.is_empty()
    }

    pub fn bins(&self) -> &[Bin] {
        &self.bins
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// The first and last step.
    pub fn step_range(&self) -> (i64, i64) {
        (
            self.bins.first().map_or(0, |b| b.first),
            self.bins.last().map_or(0, |b| b.last),
        )
    }
}

/// The values of [`METRICS`] for one step (`NaN` where unknown).
pub fn metric_values(m: &LayerMetrics) -> [f64; METRICS.len()] {
    [
        m.dropped_rate,
        m.load_cv,
        m.max_violation,
        m.router_entropy.unwrap_or(f64::NAN),
        m.dead_experts as f64,
        m.z_loss.unwrap_or(f64::NAN),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_decimate_into_bins_keeping_extremes() {
        let mut s = BlockSeries::new(3, 2);
        for step in 0..5000 {
            let spike = if step == 2345 { 0.9 } else { 0.1 };
            s.push(step, [spike, 0.0, 0.0, f64::NAN, 0.0, 0.0], &[0.5, 0.5]);
        }
        assert!(s.bins().len() <= MAX_COLUMNS);
        assert_eq!(s.bins().iter().map(|b| b.rows).sum::<usize>(), 5000);
        let max = s.bins().iter().map(|b| b.metrics[0].1).fold(0.0, f64::max);
        assert_eq!(max, 0.9, "a one-step spike survives decimation");
        assert_eq!(s.step_range(), (0, 4999));
    }
}
