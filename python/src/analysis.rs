//! `routerscope.analyze`: the `analyze` command's dataset routing analysis, returned as the dict
//! of `analysis.json` and, with `out=`, written with its CSV tables and figures as the command
//! writes them.

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use routerscope::analysis::source::{DataSource, TraceSource};
use routerscope::analysis::{AnalyzeOptions, Progress, analyze, report, router_runs};
use routerscope::catalog;
use routerscope::figures::Palette;
use routerscope::model::{Forward, WhatIf};
use routerscope::routing::{ArgStyle, RouterKind};
use routerscope::trace::TraceModel;
use routerscope::train::Split;

use crate::errors::{analysis_error, check_exists, non_negative, value_error};
use crate::model::{Model, load};
use crate::routing::parse_router;
use crate::stoppable::{run_released, run_stoppable};

/// The dataset a name or path points to: `fashion-mnist` is the Fashion-MNIST test set (the
/// Debian package's where installed, else the built-in 1,000-image slice), `fashion-mnist-slice`
/// the slice.
fn resolve_data(data: &Path) -> PathBuf {
    if !data.exists() {
        match data.to_str() {
            Some("fashion-mnist") => return catalog::fashion_mnist_test_set(),
            Some("fashion-mnist-slice") => return catalog::fashion_mnist_slice(),
            _ => {}
        }
    }
    data.to_path_buf()
}

fn compare_list(compare: &Bound<'_, PyAny>) -> PyResult<Vec<RouterKind>> {
    let names: Vec<String> = if let Ok(s) = compare.extract::<String>() {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    } else {
        compare.extract().map_err(|_| {
            value_error("compare= must be a sequence of router names (or one comma-separated str)")
        })?
    };
    names.iter().map(|n| parse_router(n)).collect()
}

/// What an analysis runs on.
enum Subject {
    Model(std::sync::Arc<routerscope::backend::Engine>),
    Trace(TraceModel),
}

impl Subject {
    fn forward(&self) -> &(dyn Forward + Sync) {
        match self {
            Subject::Model(m) => &**m,
            Subject::Trace(t) => t,
        }
    }
}

/// Native half of :func:`routerscope.analyze` (which adds the progress bar).
#[pyfunction]
#[pyo3(signature = (
    model, data = None, *, out = None, compare = None, router = None, k = None, capacity_factor = None,
    group_images = None, split = "test", limit = None, atlas_size = 16, atlas_per_image = 2, png_width = 1200,
    progress = None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn _analyze<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    data: Option<PathBuf>,
    out: Option<PathBuf>,
    compare: Option<&Bound<'py, PyAny>>,
    router: Option<&str>,
    k: Option<i64>,
    capacity_factor: Option<f64>,
    group_images: Option<i64>,
    split: &str,
    limit: Option<i64>,
    atlas_size: i64,
    atlas_per_image: i64,
    png_width: u32,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let split = match split {
        "test" => Split::Test,
        "train" => Split::Train,
        other => {
            return Err(value_error(format!(
                "split= must be \"test\" or \"train\", got {other:?}"
            )));
        }
    };
    let compare = compare.map(compare_list).transpose()?.unwrap_or_default();
    let router = router.map(parse_router).transpose()?;
    if let Some(dir) = &out {
        report::check_output_dir(dir, ArgStyle::Python).map_err(analysis_error)?;
    }
    // A routing trace analyses its own images; anything else names a model.
    let trace_path: Option<PathBuf> = match model.cast::<Model>() {
        Ok(_) => None,
        Err(_) => model
            .extract::<PathBuf>()
            .ok()
            .filter(|p| routerscope::trace::is_trace_file(p)),
    };
    let loaded;
    let (subject, what): (Subject, String) = match &trace_path {
        Some(p) => {
            if data.is_some() {
                return Err(value_error(
                    "data= does not apply to a routing trace: it analyses the images it holds",
                ));
            }
            let t = run_released(py, || TraceModel::open(p))?
                .map_err(|e| value_error(e.to_string()))?;
            (Subject::Trace(t), p.display().to_string())
        }
        None => {
            let model: Bound<'py, Model> = match model.cast::<Model>() {
                Ok(m) => m.clone(),
                Err(_) => {
                    loaded = Bound::new(py, load(py, model, "auto")?)?;
                    loaded
                }
            };
            let what = model.get().what.clone();
            (Subject::Model(model.get().engine.clone()), what)
        }
    };
    let cfg = subject.forward().config();
    let main = WhatIf {
        router,
        k: non_negative("k", k)?,
        capacity_factor,
        group_images: non_negative("group_images", group_images)?,
    };
    let limit = non_negative("limit", limit)?;
    let atlas_size = non_negative("atlas_size", Some(atlas_size))?.unwrap_or(0);
    let max_atlas = routerscope::analysis::atlas::MAX_ATLAS_SIZE;
    if atlas_size > max_atlas {
        return Err(value_error(format!(
            "atlas_size={atlas_size} is beyond the limit of {max_atlas}"
        )));
    }
    let atlas_per_image = non_negative("atlas_per_image", Some(atlas_per_image))?.unwrap_or(0);
    let runs =
        router_runs(cfg, &what, &main, &compare, ArgStyle::Python).map_err(analysis_error)?;
    let mut source = match &subject {
        Subject::Trace(t) => DataSource::Trace(TraceSource::new(t.trace().clone())),
        Subject::Model(_) => {
            let data = data.ok_or_else(|| value_error("data= is needed to analyse a model"))?;
            let data = resolve_data(&data);
            check_exists(&data, "data")?;
            DataSource::open(&data, split, &cfg.class_names).map_err(analysis_error)?
        }
    };
    if let Some(n) = limit {
        source.truncate(n);
    }
    let opts = AnalyzeOptions {
        runs,
        atlas_size,
        atlas_per_image,
        batch_tokens: AnalyzeOptions::DEFAULT_BATCH_TOKENS,
    };
    let engine = subject.forward();
    let source_ref = &source;
    let (result, interrupted) = run_stoppable(
        py,
        |stop, report: &dyn Fn(Progress)| {
            analyze(engine, source_ref, &opts, &mut |p| report(p), stop)
        },
        |_, p: Progress| match &progress {
            Some(cb) => cb.call1((p.done, p.total)).map(|_| ()),
            None => Ok(()),
        },
    )?;
    let analysis = result.map_err(analysis_error)?;
    // Stopped by Ctrl-C: what was done is kept (marked partial), as the command line does.
    if let Some(dir) = &out {
        let written = routerscope::figures::dataset::write_analysis(
            &analysis,
            dir,
            Palette::TolMuted,
            png_width,
        )
        .map_err(value_error);
        if interrupted.is_none() {
            written?;
        }
    }
    if let Some(e) = interrupted {
        return Err(e);
    }
    let json = report::json(&analysis).map_err(analysis_error)?;
    py.import("json")?.call_method1("loads", (json,))
}
