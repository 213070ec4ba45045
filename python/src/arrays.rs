//! Arrays across the boundary: inputs as C-contiguous numpy arrays (anything else goes through
//! `routerscope._arrays`, which handles torch, jax, `__array__` and DLPack), outputs as numpy
//! arrays that own the Rust buffer (no copy).

use std::path::PathBuf;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{
    Element, IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::value_error;

/// `obj` as a float32 array, without a copy when it already is a C-contiguous float32 numpy
/// array (`name` names it in errors).
pub(crate) fn f32_input<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    if let Ok(a) = obj.cast::<PyArrayDyn<f32>>()
        && a.is_c_contiguous()
    {
        return readonly(a, name);
    }
    let converted = py
        .import("routerscope._arrays")?
        .getattr("as_float32")?
        .call1((obj, name))?;
    let a = converted
        .cast_into::<PyArrayDyn<f32>>()
        .map_err(|_| value_error(format!("{name}: could not be read as a float32 array")))?;
    readonly(&a, name)
}

fn readonly<'py>(
    a: &Bound<'py, PyArrayDyn<f32>>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    a.try_readonly()
        .map_err(|e| value_error(format!("{name}: {e}")))
}

/// The data of a C-contiguous readonly array.
pub(crate) fn slice<'a>(a: &'a PyReadonlyArrayDyn<'_, f32>, name: &str) -> PyResult<&'a [f32]> {
    a.as_slice()
        .map_err(|e| value_error(format!("{name}: {e}")))
}

/// A numpy array of `shape` owning `data` (`data.len()` must be the product of `shape`).
pub(crate) fn output<'py, T: Element>(
    py: Python<'py>,
    shape: &[usize],
    data: Vec<T>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let n = data.len();
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| {
        pyo3::exceptions::PyRuntimeError::new_err(format!(
            "internal error: {n} values for shape {shape:?}: {e}"
        ))
    })?;
    Ok(arr.into_pyarray(py))
}

/// Marks a cached output read-only, so that one caller cannot change what the next one reads.
pub(crate) fn frozen<'py, T: Element>(a: Bound<'py, PyArrayDyn<T>>) -> PyResult<Bound<'py, PyAny>> {
    let any = a.into_any();
    let kwargs = pyo3::types::PyDict::new(any.py());
    kwargs.set_item("write", false)?;
    any.call_method("setflags", (), Some(&kwargs))?;
    Ok(any)
}

/// An image as the user gave it: a file to decode, or pixels (uint8, channels last).
pub(crate) enum ImageInput {
    Path(PathBuf),
    Pixels {
        pixels: Vec<u8>,
        height: usize,
        width: usize,
        channels: usize,
    },
}

impl ImageInput {
    /// The name of image `i` in results: its path, or `array[i]`.
    pub(crate) fn name(&self, i: usize) -> String {
        match self {
            Self::Path(p) => p.display().to_string(),
            Self::Pixels { .. } => format!("array[{i}]"),
        }
    }
}

/// Paths and uint8 `[H, W, C]` arrays from `images` (one image or many; see
/// `routerscope._arrays.as_images`), copied out so the model can run without the GIL.
pub(crate) fn image_inputs(py: Python<'_>, images: &Bound<'_, PyAny>) -> PyResult<Vec<ImageInput>> {
    let items = py
        .import("routerscope._arrays")?
        .getattr("as_images")?
        .call1((images,))?;
    let items = items.cast_into::<PyList>()?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Ok(path) = item.extract::<PathBuf>() {
            out.push(ImageInput::Path(path));
            continue;
        }
        let arr = item
            .cast::<PyArrayDyn<u8>>()
            .map_err(|_| value_error(format!("images[{i}]: not a path or a uint8 image array")))?;
        let &[height, width, channels] = arr.shape() else {
            return Err(value_error(format!(
                "images[{i}]: expected [H, W, C] pixels, got shape {:?}",
                arr.shape()
            )));
        };
        let side = routerscope::model::MAX_IMAGE_SIDE as usize;
        if height > side || width > side {
            return Err(value_error(format!(
                "images[{i}]: {height}x{width} pixels is beyond the limit of {side} per side"
            )));
        }
        let ro = arr
            .try_readonly()
            .map_err(|e| value_error(format!("images[{i}]: {e}")))?;
        let pixels = ro
            .as_slice()
            .map_err(|e| value_error(format!("images[{i}]: {e}")))?
            .to_vec();
        out.push(ImageInput::Pixels {
            pixels,
            height,
            width,
            channels,
        });
    }
    if out.is_empty() {
        return Err(value_error("no images given"));
    }
    Ok(out)
}
