//! Long calls run on a worker thread with the GIL released, while the calling thread waits,
//! forwards progress to Python and checks for Ctrl-C: Python only handles `SIGINT` on its main
//! thread, and only while that thread runs Python code, so a call that simply released the GIL
//! could not be interrupted.
//!
//! On Ctrl-C the worker's stop flag is raised; the worker winds down at its next step (a block
//! boundary of a forward pass, a batch of an analysis) and the call raises `KeyboardInterrupt`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::errors::panic_error;

enum Message<T, P> {
    Progress(P),
    Done(std::thread::Result<T>),
}

/// How often the waiting thread looks for Ctrl-C.
const POLL: Duration = Duration::from_millis(20);

/// Runs `work(stop, report)` on a worker thread. `on_progress` gets each `report`ed value on the
/// calling thread, with the GIL. Returns the work's result and, when the call was interrupted
/// (Ctrl-C, or an exception raised by `on_progress`), that exception: the work saw its stop flag
/// raised and returned early, and the caller decides what to keep before raising it.
pub(crate) fn run_stoppable<T, P, W, F>(
    py: Python<'_>,
    work: W,
    mut on_progress: F,
) -> PyResult<(T, Option<PyErr>)>
where
    T: Send,
    P: Send,
    W: FnOnce(&AtomicBool, &dyn Fn(P)) -> T + Send,
    F: FnMut(Python<'_>, P) -> PyResult<()>,
{
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Message<T, P>>();
        let stop_flag = &stop;
        scope.spawn(move || {
            let progress_tx = tx.clone();
            let report = move |p: P| {
                let _ = progress_tx.send(Message::Progress(p));
            };
            let result = catch_unwind(AssertUnwindSafe(|| work(stop_flag, &report)));
            let _ = tx.send(Message::Done(result));
        });
        let mut interrupted: Option<PyErr> = None;
        let mut rx = rx;
        loop {
            // The receiver moves in and out: it is `Send` but not `Sync`.
            let (msg, back) = py.detach(move || (rx.recv_timeout(POLL), rx));
            rx = back;
            match msg {
                Ok(Message::Done(Ok(value))) => return Ok((value, interrupted)),
                Ok(Message::Done(Err(panic))) => return Err(panic_error(panic)),
                Ok(Message::Progress(p)) => {
                    if interrupted.is_none()
                        && let Err(e) = on_progress(py, p)
                    {
                        stop.store(true, Ordering::SeqCst);
                        interrupted = Some(e);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(pyo3::exceptions::PyRuntimeError::new_err(
                        "internal error in routerscope: the worker thread ended without a result",
                    ));
                }
            }
            if interrupted.is_none()
                && let Err(e) = py.check_signals()
            {
                stop.store(true, Ordering::SeqCst);
                interrupted = Some(e);
            }
        }
    })
}

/// Runs short `work` with the GIL released on the calling thread; a panic becomes a
/// `RuntimeError`.
pub(crate) fn run_released<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(work)))
        .map_err(panic_error)
}
