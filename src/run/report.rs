//! A run analysed as tables while its rows stream: `layers.csv` (per step and block: the
//! metrics of [`super::aggregate`], the probe tokens' churn at snapshot steps, whether the step
//! is partial), `experts.csv` (per step, block and expert: kept tokens and requests) and
//! `alerts.json`, plus each block's decimated series for the figures. Nothing of the run is held
//! whole: memory is the series (1,000 bins per block) and the alerts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::RunError;
use super::alerts::{Alert, AlertRules, AlertTracker};
use super::reader::RunFile;
use super::series::{BlockSeries, metric_values};
use crate::trace::TraceFile;

/// What an analysis of a run found.
#[derive(Debug)]
pub struct RunAnalysis {
    pub model: String,
    /// Steps committed, and those not yet committed by every rank.
    pub steps: usize,
    pub partial_steps: usize,
    pub first_step: Option<i64>,
    pub last_step: Option<i64>,
    pub series: Vec<BlockSeries>,
    pub alerts: Vec<Alert>,
    /// Per (snapshot step, block): the share of probe tokens whose top expert changed since the
    /// previous snapshot.
    pub churn: BTreeMap<(i64, usize), f64>,
    /// The files written.
    pub files: Vec<PathBuf>,
}

/// The churn at every snapshot after the first: per block, the share of probe tokens whose top
/// expert differs from the previous snapshot's.
pub fn churn(run: &RunFile) -> Result<BTreeMap<(i64, usize), f64>, RunError> {
    let mut out = BTreeMap::new();
    let mut prev: Option<BTreeMap<usize, Vec<u32>>> = None;
    for (&step, path) in run.snapshots() {
        let trace = TraceFile::open(path).map_err(|e| RunError::Invalid {
            path: path.clone(),
            reason: format!("snapshot of step {step}: {e}"),
        })?;
        let tops: BTreeMap<usize, Vec<u32>> = crate::trace::diff::trace_picks(&trace)
            .map_err(|reason| RunError::Invalid {
                path: path.clone(),
                reason,
            })?
            .into_iter()
            .map(|(block, p)| (block, p.top))
            .collect();
        if let Some(p) = &prev {
            for (block, now) in &tops {
                if let Some(before) = p
                    .get(block)
                    .filter(|b| b.len() == now.len() && !now.is_empty())
                {
                    let moved = now.iter().zip(before).filter(|(a, b)| a != b).count();
                    out.insert((step, *block), moved as f64 / now.len() as f64);
                }
            }
        }
        prev = Some(tops);
    }
    Ok(out)
}

/// Appends `v` in decimal (the CSV writer's hot path: tens of millions of counts).
fn push_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |x| x.to_string())
}

#[derive(Serialize)]
struct AlertsFile<'a> {
    run: String,
    rules: RulesJson,
    alerts: &'a [Alert],
}

#[derive(Serialize)]
struct RulesJson {
    collapse_share: f64,
    collapse_steps: usize,
    dead_steps: usize,
    drop_rate: f64,
    drop_steps: usize,
}

/// Streams the run into `layers.csv`, `experts.csv` and `alerts.json` in `dir`, gathering the
/// series and alerts.
pub fn write_tables(run: &RunFile, rules: AlertRules, dir: &Path) -> Result<RunAnalysis, RunError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |err| RunError::Io {
            path: path.clone(),
            err,
        }
    };
    let churn = churn(run)?;
    let layers_path = dir.join("layers.csv");
    let experts_path = dir.join("experts.csv");
    let mut layers = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(&layers_path).map_err(io(&layers_path))?,
    );
    // experts.csv (tens of millions of lines for a long run) is formatted and written on a
    // thread of its own from batches of rows, while this one reads the database.
    let experts_file = std::fs::File::create(&experts_path).map_err(io(&experts_path))?;
    let (batches, batch_rx) =
        std::sync::mpsc::sync_channel::<Vec<(i64, usize, Vec<u64>, Vec<u64>)>>(8);
    let experts_writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut file = experts_file;
        let mut buf: Vec<u8> = Vec::with_capacity(4 << 20);
        buf.extend_from_slice(b"step,block,expert,tokens,requests\n");
        // The row's `step,block,` and each expert's `j,` are formatted once.
        let mut experts: Vec<Vec<u8>> = Vec::new();
        let mut prefix = Vec::with_capacity(32);
        for batch in batch_rx {
            for (step, block, kept, requests) in batch {
                while experts.len() < kept.len() {
                    let mut j = Vec::new();
                    push_u64(&mut j, experts.len() as u64);
                    j.push(b',');
                    experts.push(j);
                }
                prefix.clear();
                push_u64(&mut prefix, step as u64);
                prefix.push(b',');
                push_u64(&mut prefix, block as u64);
                prefix.push(b',');
                for ((&k, &r), j) in kept.iter().zip(&requests).zip(&experts) {
                    buf.extend_from_slice(&prefix);
                    buf.extend_from_slice(j);
                    push_u64(&mut buf, k);
                    buf.push(b',');
                    push_u64(&mut buf, r);
                    buf.push(b'\n');
                }
            }
            if buf.len() >= 2 << 20 {
                file.write_all(&buf)?;
                buf.clear();
            }
        }
        file.write_all(&buf)?;
        Ok(())
    });
    layers
        .write_all(
            b"step,block,tokens,dropped_rate,load_cv,max_violation,router_entropy,dead_experts,\
              z_loss,churn,importance_loss,load_loss,partial\n",
        )
        .map_err(io(&layers_path))?;
    let e = run.meta().num_experts;
    let mut series: BTreeMap<usize, BlockSeries> = BTreeMap::new();
    let mut tracker = AlertTracker::new(rules);
    let mut failure: Option<RunError> = None;
    let mut batch = Vec::with_capacity(1024);
    let mut writer_gone = false;
    let mut shares = vec![0.0; e];
    run.for_each_row(|step, block, sums, _ranks| {
        let m = sums.metrics();
        let partial = !run.is_complete(step);
        let line = format!(
            "{step},{block},{},{},{},{},{},{},{},{},{},{},{}\n",
            m.tokens,
            m.dropped_rate,
            m.load_cv,
            m.max_violation,
            opt(m.router_entropy),
            m.dead_experts,
            opt(m.z_loss),
            opt(churn.get(&(step, block)).copied()),
            opt(m.importance_loss),
            opt(m.load_loss),
            u8::from(partial)
        );
        if let Err(err) = layers.write_all(line.as_bytes()) {
            failure = Some(io(&layers_path)(err));
            return false;
        }
        batch.push((step, block, sums.kept.clone(), sums.requests.clone()));
        if batch.len() == batch.capacity() {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(1024));
            if batches.send(full).is_err() {
                // The writer stopped on an error; it is reported below.
                writer_gone = true;
                return false;
            }
        }
        let total: u64 = sums.kept.iter().sum();
        for (s, &k) in shares.iter_mut().zip(&sums.kept) {
            *s = if total > 0 {
                k as f64 / total as f64
            } else {
                0.0
            };
        }
        series
            .entry(block)
            .or_insert_with(|| BlockSeries::new(block, e))
            .push(step, metric_values(&m), &shares);
        if !partial {
            tracker.observe_with(step, block, sums, &m);
        }
        true
    })?;
    if !writer_gone && !batch.is_empty() {
        let _ = batches.send(batch);
    }
    drop(batches);
    let written = experts_writer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the experts.csv writer panicked")));
    if let Some(err) = failure {
        return Err(err);
    }
    written.map_err(io(&experts_path))?;
    layers.flush().map_err(io(&layers_path))?;
    drop(layers);
    let alerts = tracker.finish();
    let alerts_path = dir.join("alerts.json");
    let json = serde_json::to_string_pretty(&AlertsFile {
        run: run.dir().display().to_string(),
        rules: RulesJson {
            collapse_share: rules.collapse_share,
            collapse_steps: rules.collapse_steps,
            dead_steps: rules.dead_steps,
            drop_rate: rules.drop_rate,
            drop_steps: rules.drop_steps,
        },
        alerts: &alerts,
    })
    .map_err(|err| RunError::Invalid {
        path: alerts_path.clone(),
        reason: err.to_string(),
    })?;
    crate::tensor_io::write_atomic(&alerts_path, json.as_bytes()).map_err(|err| {
        RunError::Invalid {
            path: alerts_path.clone(),
            reason: err.to_string(),
        }
    })?;
    let steps = run.steps();
    Ok(RunAnalysis {
        model: if run.meta().model_name.is_empty() {
            run.dir()
                .file_name()
                .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned())
        } else {
            run.meta().model_name.clone()
        },
        steps: steps.len(),
        partial_steps: steps.keys().filter(|&&s| !run.is_complete(s)).count(),
        first_step: steps.keys().next().copied(),
        last_step: steps.keys().next_back().copied(),
        series: series.into_values().collect(),
        alerts,
        churn,
        files: vec![layers_path, experts_path, alerts_path],
    })
}
