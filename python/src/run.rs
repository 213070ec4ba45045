//! `routerscope.Run`'s native half: one process's writer of a run (`docs/run-format.md`). Each
//! `log_layer` call's routing is summed here, in Rust and without the GIL, with the library's
//! one definition of the run's numbers ([`routerscope::run::LayerSums`]): framework picks are
//! counted as they are, logits alone are routed under the declared router exactly as
//! `routerscope.route` routes them. That routing takes milliseconds for a large call, so it runs
//! on the writer's worker thread: the call checks its arguments, copies the arrays and returns,
//! and the routing overlaps the training step; `step`, `commit` and `close` wait for it, and a
//! failure is raised by the next call.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use routerscope::routing::{
    ArgStyle, Mode, RouteOptions, RouterConfig, RouterKind, check_finite, route_logits,
};
use routerscope::run::format::BlockRouter;
use routerscope::run::{LayerSums, ProbeImage, RunError, RunSpec, RunWriter};

use crate::arrays::{f32_input, slice};
use crate::errors::{non_negative, os_error, routing_error, value_error};
use crate::stoppable::run_released;

pub(crate) fn run_error(e: RunError) -> PyErr {
    match e {
        RunError::Io { path, err } => {
            let msg = format!("{}: {err}", path.display());
            os_error(&err, &path, msg)
        }
        other => value_error(other.to_string()),
    }
}

/// One process's writer of a run: ``step(n)`` commits the previous step, ``log_layer`` adds a
/// forward call's routing of one MoE block to the current step.
#[pyclass(module = "routerscope._native", name = "RunWriter")]
pub struct PyRunWriter {
    inner: Arc<Mutex<Option<RunWriter>>>,
    path: PathBuf,
    worker: Mutex<Option<Worker>>,
    /// The first failure of a call routed on the worker, raised by the next call.
    failed: Arc<Mutex<Option<String>>>,
}

/// A logits-only call, routed on the worker thread.
struct RouteJob {
    block: usize,
    describe: BlockRouter,
    logits: Option<Vec<f32>>,
    probs: Option<Vec<f32>>,
    n: usize,
    groups: usize,
    e: usize,
    cfg: RouterConfig,
}

enum Job {
    Route(Box<RouteJob>),
    /// Answered once every job sent before it is done.
    Flush(mpsc::Sender<()>),
}

/// The worker thread and its queue (bounded: a caller that logs faster than calls are routed
/// waits, so memory stays bounded).
struct Worker {
    jobs: mpsc::SyncSender<Job>,
    thread: JoinHandle<()>,
}

const QUEUED_CALLS: usize = 8;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RouteJob {
    /// The call's sums: each routing group routed as `routerscope.route` routes it.
    fn sums(&self) -> Result<LayerSums, String> {
        let (n, e) = (self.n, self.e);
        // Probabilities are routed as their logarithms, as a trace's are.
        let owned: Option<Vec<f32>> = match (&self.logits, &self.probs) {
            (None, Some(p)) => Some(p.iter().map(|&v| v.max(1e-30).ln()).collect()),
            _ => None,
        };
        let source = self
            .logits
            .as_deref()
            .or(owned.as_deref())
            .ok_or("nothing to route")?;
        let (lx, px) = (self.logits.as_deref(), self.probs.as_deref());
        let mut s = LayerSums::new(e);
        for g in 0..self.groups {
            let rows = g * n * e..(g + 1) * n * e;
            let r = route_logits(&source[rows.clone()], n, e, &self.cfg, Mode::Deterministic)
                .map_err(|err| format!("group {g}: {err}"))?;
            s.add_routing(&r, lx.map(|x| &x[rows.clone()]), px.map(|p| &p[rows]));
        }
        s.calls = 1;
        Ok(s)
    }
}

fn work(
    jobs: mpsc::Receiver<Job>,
    writer: Arc<Mutex<Option<RunWriter>>>,
    failed: Arc<Mutex<Option<String>>>,
) {
    for job in jobs {
        match job {
            Job::Flush(done) => {
                let _ = done.send(());
            }
            Job::Route(job) => {
                let sums = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.sums()))
                    .unwrap_or_else(|p| {
                        Err(format!(
                            "internal error in routerscope (a bug, please report it): {}",
                            crate::errors::panic_message(&p)
                        ))
                    });
                let added = sums.and_then(|s| match lock(&writer).as_mut() {
                    Some(w) => w
                        .add(job.block, Some(&job.describe), &s)
                        .map_err(|e| e.to_string()),
                    None => Err("the run was closed".into()),
                });
                if let Err(e) = added {
                    lock(&failed).get_or_insert(format!(
                        "block {}: routing the logits of an earlier log_layer call failed: {e}",
                        job.block
                    ));
                }
            }
        }
    }
}

impl PyRunWriter {
    fn with<T>(&self, f: impl FnOnce(&mut RunWriter) -> PyResult<T>) -> PyResult<T> {
        let mut guard = lock(&self.inner);
        match guard.as_mut() {
            Some(w) => f(w),
            None => Err(value_error(format!(
                "{}: the run is closed",
                self.path.display()
            ))),
        }
    }

    /// Raises the worker's first failure, once.
    fn raise_failed(&self) -> PyResult<()> {
        match lock(&self.failed).take() {
            Some(e) => Err(value_error(e)),
            None => Ok(()),
        }
    }

    /// Waits (without the GIL) until every call sent to the worker is summed into the step.
    fn settle(&self, py: Python<'_>) -> PyResult<()> {
        let jobs = lock(&self.worker).as_ref().map(|w| w.jobs.clone());
        if let Some(jobs) = jobs {
            let (done, wait) = mpsc::channel();
            let ok = py.detach(move || jobs.send(Job::Flush(done)).is_ok() && wait.recv().is_ok());
            if !ok {
                return Err(value_error(format!(
                    "{}: the run's routing worker stopped",
                    self.path.display()
                )));
            }
        }
        self.raise_failed()
    }

    /// Queues a call for the worker, starting it on first use.
    fn queue(&self, py: Python<'_>, job: RouteJob) -> PyResult<()> {
        let jobs = {
            let mut worker = lock(&self.worker);
            if worker.is_none() {
                let (jobs, rx) = mpsc::sync_channel(QUEUED_CALLS);
                let (writer, failed) = (self.inner.clone(), self.failed.clone());
                let thread = std::thread::Builder::new()
                    .name("routerscope-run".into())
                    .spawn(move || work(rx, writer, failed))
                    .map_err(|e| value_error(format!("cannot start the routing worker: {e}")))?;
                *worker = Some(Worker { jobs, thread });
            }
            worker.as_ref().map(|w| w.jobs.clone())
        };
        let sent = jobs
            .is_some_and(|jobs| py.detach(move || jobs.send(Job::Route(Box::new(job))).is_ok()));
        if !sent {
            return Err(value_error(format!(
                "{}: the run's routing worker stopped",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Stops the worker after the calls it holds.
    fn stop_worker(&self, py: Python<'_>) {
        if let Some(w) = lock(&self.worker).take() {
            drop(w.jobs);
            let thread = w.thread;
            py.detach(move || {
                let _ = thread.join();
            });
        }
    }
}

/// `[images, tokens, experts]` (groups of `group_images` images) or `[tokens, experts]` (one
/// group): the groups' token count and number.
fn groups_of(
    shape: &[usize],
    e: usize,
    group_images: usize,
    name: &str,
) -> PyResult<(usize, usize)> {
    match *shape {
        [n, ee] if ee == e && n > 0 => Ok((n, 1)),
        [b, s, ee] if ee == e && b > 0 && s > 0 => {
            if !b.is_multiple_of(group_images) {
                return Err(value_error(format!(
                    "{name} holds {b} images, which do not split into routing groups of \
                     group_images={group_images}"
                )));
            }
            Ok((group_images * s, b / group_images))
        }
        _ => Err(value_error(format!(
            "{name} has shape {shape:?}: expected [tokens, {e}] or [images, tokens, {e}]"
        ))),
    }
}

#[pymethods]
impl PyRunWriter {
    #[new]
    #[pyo3(signature = (path, *, experts, model_name="", classes=None, rank=0, world_size=1))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        experts: i64,
        model_name: &str,
        classes: Option<Vec<String>>,
        rank: i64,
        world_size: i64,
    ) -> PyResult<Self> {
        let spec = RunSpec {
            experts: non_negative("experts", Some(experts))?.unwrap_or(0),
            model_name: model_name.to_string(),
            classes: classes.unwrap_or_default(),
            rank: non_negative("rank", Some(rank))?.unwrap_or(0),
            world_size: non_negative("world_size", Some(world_size))?.unwrap_or(1),
        };
        let p = path.clone();
        let w = run_released(py, move || RunWriter::create(&p, &spec))?.map_err(run_error)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Some(w))),
            path,
            worker: Mutex::new(None),
            failed: Arc::new(Mutex::new(None)),
        })
    }

    /// Commits the current step (once the calls routed on the worker are in it) and starts
    /// step ``n`` (steps increase).
    fn step(&self, py: Python<'_>, n: i64) -> PyResult<()> {
        self.settle(py)?;
        self.with(|w| w.step(n).map_err(run_error))
    }

    /// The step being logged, or ``None``.
    #[getter]
    fn current_step(&self) -> PyResult<Option<i64>> {
        self.with(|w| Ok(w.current_step()))
    }

    /// The last committed step, or ``None``.
    #[getter]
    fn last_committed(&self) -> PyResult<Option<i64>> {
        self.with(|w| Ok(w.last_committed()))
    }

    /// Adds one forward call's routing of MoE block ``block`` to the current step.
    #[pyo3(signature = (
        block, *, logits=None, probs=None, expert_index=None, kept=None, router=None, k=None,
        capacity_factor=None, group_images=1
    ))]
    #[allow(clippy::too_many_arguments)]
    fn log_layer(
        &self,
        py: Python<'_>,
        block: i64,
        logits: Option<&Bound<'_, PyAny>>,
        probs: Option<&Bound<'_, PyAny>>,
        expert_index: Option<PyReadonlyArrayDyn<'_, i64>>,
        kept: Option<PyReadonlyArrayDyn<'_, bool>>,
        router: Option<&str>,
        k: Option<i64>,
        capacity_factor: Option<f64>,
        group_images: i64,
    ) -> PyResult<()> {
        self.raise_failed()?;
        let block = non_negative("block", Some(block))?.unwrap_or(0);
        let group_images = non_negative("group_images", Some(group_images))?
            .filter(|&g| g > 0)
            .ok_or_else(|| value_error("group_images= must be at least 1"))?;
        let e = self.with(|w| Ok(w.meta().num_experts))?;
        let logits = logits.map(|x| f32_input(py, x, "logits")).transpose()?;
        let probs = probs.map(|x| f32_input(py, x, "probs")).transpose()?;
        let kind = router
            .map(|r| r.parse::<RouterKind>().map_err(value_error))
            .transpose()?;
        let describe = BlockRouter {
            kind: kind.map(|k| k.cli_name().to_string()),
            k: non_negative("k", k)?,
            capacity_factor,
            capacity: None,
            batch_priority: None,
        };
        let lx = logits.as_ref().map(|a| slice(a, "logits")).transpose()?;
        let px = probs.as_ref().map(|a| slice(a, "probs")).transpose()?;
        for (name, arr) in [("logits", &logits), ("probs", &probs)] {
            if let Some(a) = arr {
                groups_of(a.shape(), e, group_images, name)?;
            }
        }
        let sums = if let Some(idx) = &expert_index {
            // The framework's own picks count as they are.
            let shape = idx.shape().to_vec();
            let kk = *shape.last().unwrap_or(&0);
            let picks = idx
                .as_slice()
                .map_err(|_| value_error("expert_index must be C-contiguous"))?;
            let kept_v = kept
                .as_ref()
                .map(|kp| {
                    if kp.shape() != shape.as_slice() {
                        return Err(value_error(format!(
                            "kept has shape {:?}, expert_index {shape:?}",
                            kp.shape()
                        )));
                    }
                    kp.as_slice()
                        .map_err(|_| value_error("kept must be C-contiguous"))
                })
                .transpose()?;
            let tokens = picks.len() / kk.max(1);
            for (name, v) in [("logits", lx), ("probs", px)] {
                if v.is_some_and(|v| v.len() != tokens * e) {
                    return Err(value_error(format!(
                        "{name} must cover expert_index's {tokens} tokens"
                    )));
                }
            }
            run_released(py, || {
                let mut s = LayerSums::new(e);
                s.add_picks(picks, kept_v, kk, lx, px).map(|()| s)
            })?
            .map_err(value_error)?
        } else {
            if kept.is_some() {
                return Err(value_error("kept= describes expert_index=: give both"));
            }
            let Some(kind) = kind else {
                return Err(value_error(
                    "router= is needed to route logits (the run counts what that router does \
                     with them); or log the framework's own picks with expert_index=",
                ));
            };
            if kind == RouterKind::SoftMoe {
                return Err(value_error(
                    "Soft MoE routes token vectors, not logits: log its picks or run the probe \
                     images through a snapshot",
                ));
            }
            let shape = logits
                .as_ref()
                .or(probs.as_ref())
                .map(|a| a.shape().to_vec())
                .unwrap_or_default();
            if lx.is_none() && px.is_none() {
                return Err(value_error(
                    "nothing to log: give logits=, probs= or expert_index=",
                ));
            }
            let (n, groups) = groups_of(&shape, e, group_images, "logits")?;
            let cfg = RouteOptions {
                k: non_negative("k", k)?,
                capacity_factor,
                ..RouteOptions::default()
            }
            .config(kind, ArgStyle::Python, None)
            .map_err(routing_error)?;
            cfg.capacity_for(n, e).map_err(routing_error)?;
            for (name, v) in [("logits", lx), ("probs", px)] {
                if let Some(v) = v {
                    check_finite(name, v, e).map_err(routing_error)?;
                }
            }
            // The step, the block and the experts are checked now (an empty sum adds nothing);
            // the routing runs on the worker.
            self.with(|w| {
                w.add(block, Some(&describe), &LayerSums::new(e))
                    .map_err(run_error)
            })?;
            let job = RouteJob {
                block,
                describe,
                logits: lx.map(<[f32]>::to_vec),
                probs: px.map(<[f32]>::to_vec),
                n,
                groups,
                e,
                cfg,
            };
            return self.queue(py, job);
        };
        self.with(|w| w.add(block, Some(&describe), &sums).map_err(run_error))
    }

    /// Registers the probe images (uint8 ``[H, W, 3]`` arrays), once.
    #[pyo3(signature = (images, *, grid, cls_token=false, labels=None))]
    fn set_probes(
        &self,
        images: Vec<PyReadonlyArrayDyn<'_, u8>>,
        grid: (usize, usize),
        cls_token: bool,
        labels: Option<Vec<Option<usize>>>,
    ) -> PyResult<()> {
        let mut probes = Vec::with_capacity(images.len());
        for (i, im) in images.iter().enumerate() {
            let &[h, w, 3] = im.shape() else {
                return Err(value_error(format!(
                    "probe image {i} has shape {:?}: expected uint8 [H, W, 3]",
                    im.shape()
                )));
            };
            probes.push(ProbeImage {
                height: h,
                width: w,
                pixels: im
                    .as_slice()
                    .map_err(|_| value_error("probe images must be C-contiguous"))?
                    .to_vec(),
                label: labels.as_ref().and_then(|l| l.get(i).copied().flatten()),
            });
        }
        self.with(|w| {
            w.set_probes(&probes, [grid.0, grid.1], cls_token)
                .map_err(run_error)
        })
    }

    /// Where the snapshot of ``step`` is written.
    fn snapshot_path(&self, step: i64) -> PyResult<PathBuf> {
        self.with(|w| Ok(w.snapshot_path(step)))
    }

    /// Records that the snapshot of ``step`` is complete.
    fn record_snapshot(&self, step: i64) -> PyResult<()> {
        self.with(|w| w.record_snapshot(step).map_err(run_error))
    }

    /// Commits the current step.
    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        self.settle(py)?;
        self.with(|w| w.commit().map_err(run_error))
    }

    /// Forgets the current step's sums without committing them (a step cut short), with any
    /// failure of its calls.
    fn discard(&self, py: Python<'_>) -> PyResult<()> {
        let _ = self.settle(py);
        self.with(|w| {
            w.discard();
            Ok(())
        })
    }

    /// Commits the current step and closes the run (further calls raise). A failure of a call
    /// routed on the worker is raised after the run is closed.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let settled = self.settle(py);
        self.stop_worker(py);
        let closed = match lock(&self.inner).take() {
            Some(w) => w.close().map_err(run_error),
            None => Ok(()),
        };
        settled.and(closed)
    }
}
