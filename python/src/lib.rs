//! `routerscope._native`: the Python extension module. The routers ([`routing`]), the models
//! ([`model`]), the dataset analysis ([`analysis`]) and the run writer ([`run`]) of the routerscope library, with numpy
//! arrays in and out; the package `routerscope` (Python, beside this crate) re-exports them.
//!
//! Every call checks its arguments and turns library errors into Python exceptions
//! ([`errors`]); long calls run without the GIL and stop on Ctrl-C ([`stoppable`]).

mod analysis;
mod arrays;
mod errors;
mod model;
mod routing;
mod run;
mod stoppable;

use pyo3::prelude::*;

/// The exact routers of "Routers in Vision Mixture of Experts" (google-research/vmoe), ViT-MoE
/// models and dataset routing analysis. Use the ``routerscope`` package, which re-exports this
/// module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(routing::route, m)?)?;
    m.add_function(wrap_pyfunction!(model::load, m)?)?;
    m.add_function(wrap_pyfunction!(model::builtin_models, m)?)?;
    m.add_function(wrap_pyfunction!(model::sample_images, m)?)?;
    m.add_function(wrap_pyfunction!(model::read_image, m)?)?;
    m.add_function(wrap_pyfunction!(analysis::_analyze, m)?)?;
    m.add_class::<routing::Routing>()?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::Prediction>()?;
    m.add_class::<model::LayerRouting>()?;
    m.add_class::<run::PyRunWriter>()?;
    let routers: Vec<&str> = routerscope::routing::RouterKind::ALL
        .iter()
        .map(|k| k.cli_name())
        .collect();
    m.add("ROUTERS", pyo3::types::PyTuple::new(m.py(), routers)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
