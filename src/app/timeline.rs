//! The Timeline view's state: a run (`docs/run-format.md`) read on a thread of its own into each
//! block's decimated series and alerts, followed while it grows (new committed steps and
//! snapshots within a second, polled off the UI thread), the step cursor, and the probe images'
//! routing at the snapshot at or before the cursor (with the previous snapshot, for the
//! disagreement overlay).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use crate::app::RouterscopeApp;
use crate::run::alerts::{Alert, AlertRules, AlertTracker};
use crate::run::series::{BlockSeries, metric_values};
use crate::run::{RunError, RunFile};
use crate::trace::TraceFile;
use crate::trace::diff::trace_picks;

/// How often a followed run is polled for new steps.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// What the view shows of a run.
#[derive(Clone, Debug)]
pub struct TimelineData {
    pub path: PathBuf,
    pub model: String,
    pub experts: usize,
    pub world_size: usize,
    pub steps: usize,
    pub partial: usize,
    pub first: Option<i64>,
    pub last: Option<i64>,
    /// Per block, in block order.
    pub series: Vec<BlockSeries>,
    pub alerts: Vec<Alert>,
    pub snapshots: Vec<i64>,
    /// How long the last read took.
    pub read_ms: f64,
}

/// The probe images' routing at one snapshot.
#[derive(Clone, Debug)]
pub struct SnapshotView {
    pub step: i64,
    pub images: Vec<image::RgbImage>,
    pub names: Vec<String>,
    pub grid: [usize; 2],
    pub cls: bool,
    /// Per block: every probe token's top-1 expert.
    pub top: BTreeMap<usize, Vec<u32>>,
    /// The previous snapshot's step and top-1 experts, for the disagreement overlay.
    pub previous: Option<(i64, BTreeMap<usize, Vec<u32>>)>,
}

enum Message {
    Data(Box<TimelineData>),
    Snapshot(Box<SnapshotView>),
    Error(String),
}

struct Loader {
    rx: Receiver<Message>,
    requests: Sender<i64>,
    stop: Arc<AtomicBool>,
    follow: Arc<AtomicBool>,
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The Timeline view's state.
#[derive(Default)]
pub struct TimelineView {
    /// The central panel shows the Timeline (a run is open).
    pub shown: bool,
    pub(super) path: Option<PathBuf>,
    loader: Option<Loader>,
    pub(super) data: Option<Box<TimelineData>>,
    pub(super) snapshot: Option<Box<SnapshotView>>,
    pub(super) error: Option<String>,
    /// A run is being opened (until its first data or its error arrives).
    pub(super) loading: bool,
    /// The step under the cursor.
    pub(super) cursor: Option<i64>,
    /// The block shown (its index in `data.series`).
    pub(super) block: usize,
    pub(super) follow: bool,
    pub(super) compare_previous: bool,
    pub(super) playing: Option<Instant>,
    /// The snapshot step asked of the loader and not answered yet.
    pub(super) requested: Option<i64>,
    pub(super) heatmap: Option<(usize, usize, egui::TextureHandle)>,
    pub(super) textures: Vec<egui::TextureHandle>,
    pub(super) textures_step: Option<i64>,
}

/// Reads the whole run into series and alerts.
fn read(run: &RunFile, started: Instant) -> Result<(TimelineData, AlertTracker), RunError> {
    let mut data = empty(run);
    let mut tracker = AlertTracker::new(AlertRules::default());
    extend(run, &mut data, &mut tracker, -1)?;
    data.read_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok((data, tracker))
}

fn empty(run: &RunFile) -> TimelineData {
    TimelineData {
        path: run.dir().to_path_buf(),
        model: if run.meta().model_name.is_empty() {
            run.dir()
                .file_name()
                .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned())
        } else {
            run.meta().model_name.clone()
        },
        experts: run.meta().num_experts,
        world_size: run.meta().world_size,
        steps: 0,
        partial: 0,
        first: None,
        last: None,
        series: Vec::new(),
        alerts: Vec::new(),
        snapshots: Vec::new(),
        read_ms: 0.0,
    }
}

/// Adds the rows of steps after `after` (the series grow at their end; a step some rank had not
/// committed when it was read is shown as read).
fn extend(
    run: &RunFile,
    data: &mut TimelineData,
    tracker: &mut AlertTracker,
    after: i64,
) -> Result<(), RunError> {
    let e = data.experts;
    let mut by_block: BTreeMap<usize, BlockSeries> =
        data.series.drain(..).map(|s| (s.block, s)).collect();
    let mut shares = vec![0.0; e];
    run.for_each_row_after(after, |step, block, sums, _| {
        let total: u64 = sums.kept.iter().sum();
        for (s, &k) in shares.iter_mut().zip(&sums.kept) {
            *s = if total > 0 {
                k as f64 / total as f64
            } else {
                0.0
            };
        }
        let m = sums.metrics();
        by_block
            .entry(block)
            .or_insert_with(|| BlockSeries::new(block, e))
            .push(step, metric_values(&m), &shares);
        if run.is_complete(step) {
            tracker.observe_with(step, block, sums, &m);
        }
        true
    })?;
    data.series = by_block.into_values().collect();
    let steps = run.steps();
    data.steps = steps.len();
    data.partial = steps.keys().filter(|&&s| !run.is_complete(s)).count();
    data.first = steps.keys().next().copied();
    data.last = steps.keys().next_back().copied();
    data.snapshots = run.snapshots().keys().copied().collect();
    data.alerts = tracker.clone().finish();
    Ok(())
}

fn picks(path: &Path) -> Result<(TraceFile, BTreeMap<usize, Vec<u32>>), String> {
    let trace = TraceFile::open(path).map_err(|e| e.to_string())?;
    let top = trace_picks(&trace)?
        .into_iter()
        .map(|(b, p)| (b, p.top))
        .collect();
    Ok((trace, top))
}

/// The snapshot of `step` (and the one before it) as the view shows it.
fn load_snapshot(run: &RunFile, step: i64) -> Result<SnapshotView, String> {
    let path = run
        .snapshots()
        .get(&step)
        .ok_or_else(|| format!("the run has no snapshot at step {step}"))?;
    let (trace, top) = picks(path)?;
    let first = &trace.meta().images[0];
    let mut images = Vec::new();
    let mut names = Vec::new();
    let classes = trace.class_names();
    for i in 0..trace.num_images() {
        images.push(trace.image(i).map_err(|e| e.to_string())?.to_rgb8());
        let name = trace.image_name(i);
        // The reader has checked every label against the classes.
        names.push(
            match trace.meta().images[i].label.and_then(|l| classes.get(l)) {
                Some(class) => format!("{name} · {class}"),
                None => name,
            },
        );
    }
    let previous = match run.snapshots().range(..step).next_back() {
        Some((&s, p)) => Some((s, picks(p)?.1)),
        None => None,
    };
    Ok(SnapshotView {
        step,
        images,
        names,
        grid: first.grid,
        cls: first.cls_token,
        top,
        previous,
    })
}

fn spawn_loader(path: PathBuf, follow: bool, wake: impl Fn() + Send + 'static) -> Loader {
    let (tx, rx) = channel();
    let (req_tx, req_rx) = channel::<i64>();
    let stop = Arc::new(AtomicBool::new(false));
    let follow_flag = Arc::new(AtomicBool::new(follow));
    let (stop2, follow2) = (stop.clone(), follow_flag.clone());
    std::thread::Builder::new()
        .name("routerscope-timeline".into())
        .spawn(move || {
            let send = |m: Message| {
                let ok = tx.send(m).is_ok();
                wake();
                ok
            };
            let started = Instant::now();
            let opened = RunFile::open(&path).and_then(|mut run| {
                let (data, tracker) = read(&run, started)?;
                let _ = run.refresh()?;
                Ok((run, data, tracker))
            });
            let (mut run, mut data, mut tracker) = match opened {
                Ok(x) => x,
                Err(e) => {
                    send(Message::Error(e.to_string()));
                    return;
                }
            };
            if !send(Message::Data(Box::new(data.clone()))) {
                return;
            }
            let mut last_poll = Instant::now();
            while !stop2.load(Ordering::SeqCst) {
                match req_rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(mut step) => {
                        // Only the latest request matters.
                        while let Ok(s) = req_rx.try_recv() {
                            step = s;
                        }
                        let m = match load_snapshot(&run, step) {
                            Ok(v) => Message::Snapshot(Box::new(v)),
                            Err(e) => Message::Error(format!("snapshot of step {step}: {e}")),
                        };
                        if !send(m) {
                            return;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
                if follow2.load(Ordering::SeqCst) && last_poll.elapsed() >= FOLLOW_POLL {
                    last_poll = Instant::now();
                    let after = data.last.unwrap_or(-1);
                    let grown = run.refresh().and_then(|changed| {
                        if changed {
                            extend(&run, &mut data, &mut tracker, after)?;
                        }
                        Ok(changed)
                    });
                    match grown {
                        Ok(true) => {
                            if !send(Message::Data(Box::new(data.clone()))) {
                                return;
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            send(Message::Error(e.to_string()));
                            return;
                        }
                    }
                }
            }
        })
        .expect("the timeline thread starts");
    Loader {
        rx,
        requests: req_tx,
        stop,
        follow: follow_flag,
    }
}

impl RouterscopeApp {
    /// Opens the run at `path` in the Timeline view (the previous run, if any, is closed; a run
    /// that cannot be read is an error and the view keeps what it showed).
    pub fn open_run(&mut self, path: PathBuf, ctx: &egui::Context) {
        let wake = ctx.clone();
        let follow = self.timeline.follow;
        self.timeline.loader = Some(spawn_loader(path.clone(), follow, move || {
            wake.request_repaint()
        }));
        self.timeline.path = Some(path);
        self.timeline.shown = true;
        self.timeline.error = None;
        self.timeline.loading = true;
        self.timeline.requested = None;
        self.dataset.shown = false;
    }

    /// Takes in what the timeline's loader sent; asks for the snapshot at the cursor.
    pub(super) fn poll_timeline(&mut self) {
        let Some(loader) = &self.timeline.loader else {
            return;
        };
        let mut opened_fresh = false;
        while let Ok(m) = loader.rx.try_recv() {
            match m {
                Message::Data(d) => {
                    let was_empty = self.timeline.data.is_none();
                    let same_run = self
                        .timeline
                        .data
                        .as_ref()
                        .is_some_and(|old| old.path == d.path);
                    if !same_run {
                        self.timeline.cursor = None;
                        self.timeline.snapshot = None;
                        self.timeline.block = 0;
                    }
                    let at_end = self.timeline.cursor.is_none()
                        || self.timeline.cursor == self.timeline.data.as_ref().and_then(|o| o.last);
                    if self.timeline.follow || at_end || was_empty {
                        self.timeline.cursor = d.last;
                    }
                    self.timeline.heatmap = None;
                    self.timeline.loading = false;
                    self.timeline.data = Some(d);
                    opened_fresh |= was_empty;
                }
                Message::Snapshot(s) => {
                    if self.timeline.requested == Some(s.step) {
                        self.timeline.requested = None;
                    }
                    self.timeline.snapshot = Some(s);
                    self.timeline.textures_step = None;
                }
                Message::Error(e) => {
                    self.timeline.error = Some(e);
                    self.timeline.loading = false;
                    self.timeline.requested = None;
                }
            }
        }
        let _ = opened_fresh;
        if let Some(step) = self.snapshot_at_cursor()
            && self.timeline.snapshot.as_ref().map(|s| s.step) != Some(step)
            && self.timeline.requested != Some(step)
        {
            self.timeline.requested = Some(step);
            let _ = loader.requests.send(step);
        }
    }

    /// The snapshot step at or before the cursor.
    pub fn snapshot_at_cursor(&self) -> Option<i64> {
        let d = self.timeline.data.as_ref()?;
        let cursor = self.timeline.cursor?;
        d.snapshots.iter().rev().find(|&&s| s <= cursor).copied()
    }

    /// Follows the run as it grows (new steps move the cursor to the latest).
    pub fn set_follow_latest(&mut self, follow: bool) {
        self.timeline.follow = follow;
        if let Some(l) = &self.timeline.loader {
            l.follow.store(follow, Ordering::SeqCst);
        }
        if follow {
            self.timeline.cursor = self.timeline.data.as_ref().and_then(|d| d.last);
        }
    }

    /// Moves the step cursor (clamped to the run's steps).
    pub fn set_timeline_cursor(&mut self, step: i64) {
        if let Some(d) = &self.timeline.data
            && let (Some(a), Some(b)) = (d.first, d.last)
        {
            self.timeline.cursor = Some(step.clamp(a, b));
        }
    }

    /// How long the last frame took to lay out and paint, in milliseconds (the UI's own work,
    /// without the GPU's).
    pub fn frame_ms(&self) -> f32 {
        self.frame_ms
    }

    /// The step cursor.
    pub fn timeline_cursor(&self) -> Option<i64> {
        self.timeline.cursor
    }

    /// What the Timeline shows, once read.
    pub fn timeline_data(&self) -> Option<&TimelineData> {
        self.timeline.data.as_deref()
    }

    /// The snapshot shown, once loaded.
    pub fn timeline_snapshot(&self) -> Option<&SnapshotView> {
        self.timeline.snapshot.as_deref()
    }

    pub fn timeline_error(&self) -> Option<&str> {
        self.timeline.error.as_deref()
    }

    /// Shows MoE block `block` (its index among the run's blocks, in block order).
    pub fn set_timeline_block(&mut self, index: usize) {
        self.timeline.block = index;
        self.timeline.heatmap = None;
    }

    /// Shows the previous snapshot's disagreement over the shown one.
    pub fn set_compare_previous(&mut self, on: bool) {
        self.timeline.compare_previous = on;
    }

    /// Blocks until the Timeline has its data and the snapshot at the cursor (tests).
    pub fn wait_timeline(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_timeline();
            let ready = !self.timeline.loading
                && (self.timeline.error.is_some()
                    || (self.timeline.data.is_some()
                        && (self.snapshot_at_cursor().is_none()
                            || self.timeline.requested.is_none())));
            if ready {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
