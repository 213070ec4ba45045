//! Library errors as Python exceptions, each carrying the library's message: `OSError` (and its
//! `FileNotFoundError`, `IsADirectoryError`, `PermissionError` subclasses) for files that cannot
//! be opened, `ValueError` for bad arguments and bad file contents, `KeyboardInterrupt` for a run
//! stopped by Ctrl-C, `RuntimeError` for failures of the machinery itself.

use std::path::Path;

use pyo3::PyErr;
use pyo3::exceptions::{
    PyFileNotFoundError, PyIsADirectoryError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
    PyRuntimeError, PyValueError,
};
use routerscope::analysis::AnalysisError;
use routerscope::model::ModelError;
use routerscope::routing::RoutingError;
use routerscope::tensor_io::TensorIoError;

pub(crate) fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// An optional count keyword (`name=`): negative values are a `ValueError` naming it.
pub(crate) fn non_negative(name: &str, v: Option<i64>) -> Result<Option<usize>, PyErr> {
    match v {
        None => Ok(None),
        Some(v) => usize::try_from(v)
            .map(Some)
            .map_err(|_| value_error(format!("{name}= must be a non-negative integer, got {v}"))),
    }
}

/// An `OSError` of the subclass Python uses for `kind`, with `errno`, `strerror` and `filename`
/// set and `message` (which names the file) as its text.
pub(crate) fn os_error(err: &std::io::Error, path: &Path, message: String) -> PyErr {
    let errno = err.raw_os_error().unwrap_or(match err.kind() {
        std::io::ErrorKind::NotFound => libc_errno::ENOENT,
        std::io::ErrorKind::PermissionDenied => libc_errno::EACCES,
        std::io::ErrorKind::IsADirectory => libc_errno::EISDIR,
        _ => 0,
    });
    let args = (errno, message, path.display().to_string());
    match err.kind() {
        std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
        std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
        std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(args),
        _ => PyOSError::new_err(args),
    }
}

/// The POSIX numbers Python's `OSError` subclasses go with, where the OS gave none.
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EISDIR: i32 = 21;
}

/// Checks that `path` is a file that can be opened (`what` says what it is for): a missing
/// file, a folder or a file without permission is the matching `OSError`.
pub(crate) fn check_file(path: &Path, what: &str) -> Result<(), PyErr> {
    match std::fs::metadata(path) {
        Err(e) => Err(os_error(
            &e,
            path,
            format!("{what} {}: {e}", path.display()),
        )),
        Ok(m) if m.is_dir() => {
            let e = std::io::Error::from(std::io::ErrorKind::IsADirectory);
            Err(os_error(
                &e,
                path,
                format!("{what} {} is a folder, not a file", path.display()),
            ))
        }
        Ok(_) => Ok(()),
    }
}

/// Checks that `path` exists (a file or a folder).
pub(crate) fn check_exists(path: &Path, what: &str) -> Result<(), PyErr> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| os_error(&e, path, format!("{what} {}: {e}", path.display())))
}

pub(crate) fn routing_error(e: RoutingError) -> PyErr {
    value_error(e.to_string())
}

pub(crate) fn model_error(e: ModelError) -> PyErr {
    match e {
        ModelError::File(TensorIoError::Io { path, err }) => {
            let msg = format!("{}: {err}", path.display());
            os_error(&err, &path, msg)
        }
        ModelError::Cancelled(_) => PyKeyboardInterrupt::new_err("stopped by Ctrl-C"),
        ModelError::Candle(e) => PyRuntimeError::new_err(e.to_string()),
        ModelError::Backend(e) => PyRuntimeError::new_err(e.to_string()),
        other => value_error(other.to_string()),
    }
}

pub(crate) fn analysis_error(e: AnalysisError) -> PyErr {
    match e {
        AnalysisError::Model(m) => PyRuntimeError::new_err(m),
        AnalysisError::Data(m) | AnalysisError::Options(m) => value_error(m),
    }
}

/// A panic in the library is a bug; it reaches Python as a `RuntimeError` naming it, never as a
/// panic.
pub(crate) fn panic_error(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    PyRuntimeError::new_err(format!(
        "internal error in routerscope (a bug, please report it): {}",
        panic_message(&payload)
    ))
}

/// The message a panic carried.
pub(crate) fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
