//! `routerscope.load`, `Model`, and the `Prediction` of a forward pass with the routing of every
//! MoE layer (`LayerRouting`); what-ifs re-run from the first MoE layer they change, as in the
//! app.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use numpy::PyArrayDyn;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList};
use routerscope::backend::{DeviceChoice, Engine};
use routerscope::catalog;
use routerscope::model::{
    ForwardOutput, ModelConfig, ModelError, RunOptions, WhatIf, decode_image, preprocess,
};
use routerscope::routing::{ArgStyle, RouterKind};

use crate::arrays::{ImageInput, image_inputs, output};
use crate::errors::{check_file, model_error, non_negative, value_error};
use crate::routing::{Routing, parse_router};
use crate::stoppable::run_stoppable;

/// A ViT-MoE checkpoint, loaded once and run on the CPU (or a GPU where one is asked for and
/// works).
#[pyclass(module = "routerscope", name = "Model", frozen)]
pub struct Model {
    pub(crate) engine: Arc<Engine>,
    pub(crate) path: PathBuf,
    /// What errors call it: the built-in name or the path.
    pub(crate) what: String,
}

/// Where a model name or path points: a built-in name, else the path itself.
fn resolve(name: &str) -> (PathBuf, String) {
    if !Path::new(name).exists()
        && let Some(p) = catalog::builtin_model_named(name)
    {
        return (p, name.to_string());
    }
    (PathBuf::from(name), name.to_string())
}

/// Load a checkpoint: a routerscope ``.safetensors`` file, the ``.index`` of a vmoe checkpoint,
/// or a built-in model name (``"photo"``, ``"photo-sinkhorn-ec"``,
/// ``"fashion-mnist-softmax-tc"``, ...; see :func:`builtin_models`).
///
/// ``device`` is ``"auto"`` (a hardware GPU when there is one, else the CPU), ``"gpu"`` (any
/// adapter, software ones included; the CPU when none works) or ``"cpu"``.
///
/// Raises ``FileNotFoundError`` / ``IsADirectoryError`` / ``PermissionError`` (all ``OSError``)
/// when the file cannot be opened and ``ValueError`` when it is not a valid checkpoint.
#[pyfunction]
#[pyo3(signature = (path, *, device = "auto"))]
pub(crate) fn load(py: Python<'_>, path: &Bound<'_, PyAny>, device: &str) -> PyResult<Model> {
    let name: PathBuf = path.extract().map_err(|_| {
        value_error(format!(
            "path must be a str or os.PathLike naming a checkpoint or a built-in model, got {}",
            path.get_type().name().map_or("?".into(), |n| n.to_string())
        ))
    })?;
    let device: DeviceChoice = device.parse().map_err(value_error)?;
    let (file, what) = resolve(&name.to_string_lossy());
    if let Err(e) = check_file(&file, "model") {
        if !name.to_string_lossy().contains(['/', '.']) && !file.exists() {
            let names: Vec<String> = catalog::builtin_models()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(crate::errors::os_error(
                &missing,
                &file,
                format!(
                    "no model file `{}` and no built-in model of that name (built-in: {})",
                    name.display(),
                    names.join(", ")
                ),
            ));
        }
        return Err(e);
    }
    let (engine, interrupted) = run_stoppable(
        py,
        |_stop, _: &dyn Fn(())| -> Result<Engine, ModelError> {
            let (ctx, _notice) = device.headless();
            Engine::load(&file, ctx.as_ref())
        },
        |_, ()| Ok(()),
    )?;
    if let Some(e) = interrupted {
        return Err(e);
    }
    let engine = engine.map_err(model_error)?;
    Ok(Model {
        engine: Arc::new(engine),
        path: file,
        what,
    })
}

/// The run options a what-if's keywords ask for on `engine`'s model (`what` names it).
fn what_if_options(
    engine: &Engine,
    what: &str,
    router: Option<&str>,
    k: Option<i64>,
    capacity_factor: Option<f64>,
    group_images: Option<i64>,
) -> PyResult<RunOptions> {
    let router: Option<RouterKind> = router.map(parse_router).transpose()?;
    WhatIf {
        router,
        k: non_negative("k", k)?,
        capacity_factor,
        group_images: non_negative("group_images", group_images)?,
    }
    .run_options(&engine.config, what, ArgStyle::Python)
    .map_err(model_error)
}

impl Model {
    fn run(
        &self,
        py: Python<'_>,
        images: &Bound<'_, PyAny>,
        opts: RunOptions,
    ) -> PyResult<Prediction> {
        let inputs = image_inputs(py, images)?;
        for input in &inputs {
            if let ImageInput::Path(p) = input {
                check_file(p, "image")?;
            }
        }
        let names: Vec<String> = inputs.iter().enumerate().map(|(i, x)| x.name(i)).collect();
        self.engine
            .check_options(&opts, inputs.len())
            .map_err(model_error)?;
        let engine = &*self.engine;
        let (out, interrupted) = run_stoppable(
            py,
            |stop, _: &dyn Fn(())| -> Result<ForwardOutput, ModelError> {
                let cfg = &engine.config;
                let pixels = inputs
                    .iter()
                    .map(|x| image_pixels(x, cfg))
                    .collect::<Result<Vec<_>, _>>()?;
                engine.forward_observed(&pixels, &opts, &mut |_, _| !stop.load(Ordering::SeqCst))
            },
            |_, ()| Ok(()),
        )?;
        if let Some(e) = interrupted {
            return Err(e);
        }
        let out = out.map_err(model_error)?;
        Ok(Prediction::new(self, Arc::new(out), names))
    }
}

/// Decodes (a path) or wraps (pixels) one image and preprocesses it as the CLI does.
fn image_pixels(input: &ImageInput, cfg: &ModelConfig) -> Result<Vec<f32>, ModelError> {
    match input {
        ImageInput::Path(p) => preprocess(&decode_image(p)?, cfg),
        ImageInput::Pixels {
            pixels,
            height,
            width,
            channels,
        } => {
            let (w, h) = (*width as u32, *height as u32);
            let bad = || ModelError::Image(format!("{height}x{width}x{channels} pixel array"));
            let img = match channels {
                1 => {
                    image::GrayImage::from_raw(w, h, pixels.clone()).map(image::DynamicImage::from)
                }
                2 => image::GrayAlphaImage::from_raw(w, h, pixels.clone())
                    .map(image::DynamicImage::from),
                3 => image::RgbImage::from_raw(w, h, pixels.clone()).map(image::DynamicImage::from),
                4 => {
                    image::RgbaImage::from_raw(w, h, pixels.clone()).map(image::DynamicImage::from)
                }
                _ => None,
            }
            .ok_or_else(bad)?;
            preprocess(&img, cfg)
        }
    }
}

/// The model's configuration as a Python dict (the checkpoint's JSON).
fn config_dict<'py>(py: Python<'py>, cfg: &ModelConfig) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (cfg.to_json(),))
}

#[pymethods]
impl Model {
    /// The architecture and trained routing, as stored in the checkpoint (a dict).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        config_dict(py, &self.engine.config)
    }

    /// The checkpoint file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The model's name in its configuration.
    #[getter]
    fn name(&self) -> String {
        self.engine.config.name.clone()
    }

    /// Where it runs: ``"CPU (candle, N threads)"`` or ``"GPU: <adapter>, <backend>"``.
    #[getter]
    fn device(&self) -> String {
        self.engine.device()
    }

    /// Class names of the head (empty for a feature model).
    #[getter]
    fn class_names(&self) -> Vec<String> {
        let cfg = &self.engine.config;
        (0..cfg.num_classes).map(|c| cfg.class_name(c)).collect()
    }

    /// Whether the model has no classifier head (its result is its token features).
    #[getter]
    fn is_feature_model(&self) -> bool {
        self.engine.config.is_feature_model()
    }

    /// Encoder blocks (0-based) whose MLP is an MoE layer.
    #[getter]
    fn moe_blocks(&self) -> Vec<usize> {
        self.engine
            .config
            .moe
            .as_ref()
            .map_or_else(Vec::new, |m| m.layers.clone())
    }

    /// The router the checkpoint was trained with (``None`` for a dense model).
    #[getter]
    fn router(&self) -> Option<&'static str> {
        self.engine
            .config
            .moe
            .as_ref()
            .map(|m| m.router.kind.cli_name())
    }

    /// Tokens per image (patches, plus the CLS token when the model has one).
    #[getter]
    fn tokens_per_image(&self) -> usize {
        self.engine.config.seq_len()
    }

    /// Patch grid ``(rows, cols)``.
    #[getter]
    fn grid(&self) -> (usize, usize) {
        let [r, c] = self.engine.config.grid();
        (r, c)
    }

    /// Whether token 0 of every image is the CLS token.
    #[getter]
    fn has_cls_token(&self) -> bool {
        self.engine.config.seq_len() > self.engine.config.num_patches()
    }

    /// Run the model on ``images`` and return the :class:`Prediction`: class probabilities (none
    /// for a feature model), token features and the routing of every MoE layer.
    ///
    /// ``images`` is one image or a list of them: file paths (PNG, JPEG, GIF, BMP, WebP, TIFF) or
    /// uint8 pixel arrays ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` (numpy, torch, jax, PIL), or a
    /// uint8 batch ``[B, H, W, C]``; each is resized to the model's input as ``routerscope
    /// predict`` does. ``router``, ``k`` and ``capacity_factor`` are a what-if on the same
    /// weights (another router starts from its vmoe defaults); ``group_images`` routes that many
    /// consecutive images as one group (default: the checkpoint's, normally 1).
    #[pyo3(signature = (images, router = None, *, k = None, capacity_factor = None, group_images = None))]
    fn predict(
        &self,
        py: Python<'_>,
        images: &Bound<'_, PyAny>,
        router: Option<&str>,
        k: Option<i64>,
        capacity_factor: Option<f64>,
        group_images: Option<i64>,
    ) -> PyResult<Prediction> {
        let opts = what_if_options(
            &self.engine,
            &self.what,
            router,
            k,
            capacity_factor,
            group_images,
        )?;
        self.run(py, images, opts)
    }

    /// The same run as :meth:`predict`, for its token features: ``result.features`` is float32
    /// ``[images, tokens, d]``, the final LayerNorm output (token 0 is the CLS token when the
    /// model has one), as ``routerscope features`` writes it.
    #[pyo3(signature = (images, router = None, *, k = None, capacity_factor = None, group_images = None))]
    fn features(
        &self,
        py: Python<'_>,
        images: &Bound<'_, PyAny>,
        router: Option<&str>,
        k: Option<i64>,
        capacity_factor: Option<f64>,
        group_images: Option<i64>,
    ) -> PyResult<Prediction> {
        self.predict(py, images, router, k, capacity_factor, group_images)
    }

    fn __repr__(&self) -> String {
        let cfg = &self.engine.config;
        let moe = cfg.moe.as_ref().map_or("dense".to_string(), |m| {
            format!(
                "{} experts in blocks {:?}, {}",
                m.num_experts,
                m.layers,
                m.router.kind.cli_name()
            )
        });
        format!(
            "Model('{}', {}x{} px, {} blocks, {moe}, {})",
            self.what,
            cfg.image_size[0],
            cfg.image_size[1],
            cfg.num_layers,
            self.engine.device()
        )
    }
}

/// The result of running a model on images: probabilities, features and per MoE layer the
/// routing. :meth:`what_if` re-routes the same images from the first MoE layer it changes.
#[pyclass(module = "routerscope", name = "Prediction", frozen)]
pub struct Prediction {
    engine: Arc<Engine>,
    what: String,
    out: Arc<ForwardOutput>,
    images: Vec<String>,
    layers: PyOnceLock<Py<PyList>>,
}

impl Prediction {
    fn new(model: &Model, out: Arc<ForwardOutput>, images: Vec<String>) -> Self {
        Self {
            engine: model.engine.clone(),
            what: model.what.clone(),
            out,
            images,
            layers: PyOnceLock::new(),
        }
    }
}

#[pymethods]
impl Prediction {
    /// float32 ``[images, classes]``: class probabilities (``[images, 0]`` for a feature model).
    #[getter]
    fn probabilities<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let classes = self.engine.config.num_classes;
        output(py, &[self.images.len(), classes], self.out.probs.concat())
    }

    /// float32 ``[images, tokens, d]``: the final LayerNorm output of every token (token 0 is the
    /// CLS token when the model has one).
    #[getter]
    fn features<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let cfg = &self.engine.config;
        output(
            py,
            &[self.images.len(), cfg.seq_len(), cfg.hidden_size],
            self.out.features.concat(),
        )
    }

    /// The images, as paths or ``array[i]``.
    #[getter]
    fn images(&self) -> Vec<String> {
        self.images.clone()
    }

    /// The device the run used.
    #[getter]
    fn device(&self) -> String {
        self.engine.device()
    }

    /// One :class:`LayerRouting` per MoE layer, in block order.
    #[getter]
    fn layers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self
            .layers
            .get_or_try_init(py, || -> PyResult<Py<PyList>> {
                let items = (0..self.out.records.len())
                    .map(|l| {
                        Py::new(
                            py,
                            LayerRouting {
                                out: self.out.clone(),
                                layer: l,
                                seq_len: self.engine.config.seq_len(),
                                routing: PyOnceLock::new(),
                            },
                        )
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(PyList::new(py, items)?.unbind())
            })?;
        Ok(list.bind(py).clone())
    }

    /// The ``k`` most probable classes of each image, as ``routerscope predict --json`` lists
    /// them: per image a list of ``{"class", "name", "probability"}`` dicts (empty for a feature
    /// model).
    #[pyo3(signature = (k = 5))]
    fn top<'py>(&self, py: Python<'py>, k: usize) -> PyResult<Bound<'py, PyList>> {
        let cfg = &self.engine.config;
        let per_image = PyList::empty(py);
        for probs in &self.out.probs {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let row = PyList::empty(py);
            for &c in order.iter().take(k) {
                let d = PyDict::new(py);
                d.set_item("class", c)?;
                d.set_item("name", cfg.class_name(c))?;
                d.set_item("probability", probs[c])?;
                row.append(d)?;
            }
            per_image.append(row)?;
        }
        Ok(per_image)
    }

    /// The same images under other routing: ``router``, ``k``, ``capacity_factor`` and
    /// ``group_images`` as for :meth:`Model.predict`, applied to the checkpoint's own routing.
    /// Re-runs only from the first MoE layer whose routing changes.
    #[pyo3(signature = (router = None, *, k = None, capacity_factor = None, group_images = None))]
    fn what_if(
        &self,
        py: Python<'_>,
        router: Option<&str>,
        k: Option<i64>,
        capacity_factor: Option<f64>,
        group_images: Option<i64>,
    ) -> PyResult<Prediction> {
        let opts = what_if_options(
            &self.engine,
            &self.what,
            router,
            k,
            capacity_factor,
            group_images,
        )?;
        self.engine
            .check_options(&opts, self.images.len())
            .map_err(model_error)?;
        let engine = &*self.engine;
        let prev = &*self.out;
        let (out, interrupted) = run_stoppable(
            py,
            |stop, _: &dyn Fn(())| {
                engine.rerun_observed(prev, &opts, &mut |_, _| !stop.load(Ordering::SeqCst))
            },
            |_, ()| Ok(()),
        )?;
        if let Some(e) = interrupted {
            return Err(e);
        }
        let out = out.map_err(model_error)?;
        Ok(Prediction {
            engine: self.engine.clone(),
            what: self.what.clone(),
            out: Arc::new(out),
            images: self.images.clone(),
            layers: PyOnceLock::new(),
        })
    }

    /// The routing of each MoE layer in this run: per layer a dict with ``block``, ``router``,
    /// ``k``, ``capacity_factor`` (``None`` when given as slots) and ``group_images``.
    #[getter]
    fn routers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        let blocks = self
            .engine
            .config
            .moe
            .as_ref()
            .map_or_else(Vec::new, |m| m.layers.clone());
        for (block, r) in blocks.iter().zip(&self.out.options.routers) {
            let d = PyDict::new(py);
            d.set_item("block", block)?;
            d.set_item("router", r.kind.cli_name())?;
            d.set_item("k", r.experts_per_token())?;
            let cf = match r.capacity {
                routerscope::routing::CapacitySpec::Factor(f) if r.kind != RouterKind::SoftMoe => {
                    Some(f)
                }
                _ => None,
            };
            d.set_item("capacity_factor", cf)?;
            d.set_item("group_images", self.out.options.group_images)?;
            list.append(d)?;
        }
        Ok(list)
    }

    fn __repr__(&self) -> String {
        format!(
            "Prediction({} images, {} MoE layers, {})",
            self.images.len(),
            self.out.records.len(),
            self.engine.device()
        )
    }
}

/// The routing of one MoE layer in a :class:`Prediction`, per image: arrays are
/// ``[images, tokens, ...]`` (tokens of each image, CLS first when the model has one), except the
/// per-group loads. :attr:`routing` holds the whole :class:`Routing` of the layer's groups.
#[pyclass(module = "routerscope", name = "LayerRouting", frozen)]
pub struct LayerRouting {
    out: Arc<ForwardOutput>,
    layer: usize,
    seq_len: usize,
    routing: PyOnceLock<Py<Routing>>,
}

impl LayerRouting {
    fn record(&self) -> &routerscope::model::MoeLayerRecord {
        &self.out.records[self.layer]
    }

    fn images(&self) -> usize {
        self.out.probs.len()
    }

    /// `a` (per-group, `[groups, group tokens, rest..]`) reshaped to `[images, tokens, rest..]`.
    fn per_image<'py>(&self, a: Option<Bound<'py, PyAny>>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(a) = a else { return Ok(None) };
        if a.is_none() {
            return Ok(None);
        }
        let shape: Vec<usize> = a.getattr("shape")?.extract()?;
        let mut new = vec![self.images(), self.seq_len];
        new.extend_from_slice(&shape[2..]);
        Ok(Some(a.call_method1("reshape", (new,))?))
    }

    fn routing_any<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, Routing>> {
        Ok(self.routing(py)?.clone())
    }
}

#[pymethods]
impl LayerRouting {
    /// The encoder block (0-based) of this MoE layer.
    #[getter]
    fn block(&self) -> usize {
        self.record().block
    }

    /// The router's command-line name.
    #[getter]
    fn router(&self) -> &'static str {
        self.record().groups[0].routing.router.cli_name()
    }

    /// Images per routing group.
    #[getter]
    fn group_images(&self) -> usize {
        self.record().groups[0].num_images
    }

    /// Slots per expert per group.
    #[getter]
    fn capacity(&self) -> usize {
        self.record().groups[0].routing.capacity
    }

    /// The layer's :class:`Routing`, with a groups axis (one group per image unless
    /// ``group_images`` was larger).
    #[getter]
    fn routing<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, Routing>> {
        let r = self.routing.get_or_try_init(py, || {
            let groups = self
                .record()
                .groups
                .iter()
                .map(|g| g.routing.clone())
                .collect();
            Py::new(py, Routing::new(groups, true))
        })?;
        Ok(r.bind(py).clone())
    }

    /// Token Choice: int32 ``[images, tokens, k]``, the experts each token chose (rank order,
    /// dropped choices included). ``None`` for the other routers.
    #[getter]
    fn expert_index<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let r = self.routing_any(py)?;
        self.per_image(Some(r.getattr("expert_index")?))
    }

    /// Token Choice: float32 ``[images, tokens, k]``, the gate of each choice. ``None`` otherwise.
    #[getter]
    fn gates<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let r = self.routing_any(py)?;
        self.per_image(Some(r.getattr("gates")?))
    }

    /// Token Choice: int32 ``[images, tokens, k]``, each choice's slot, -1 where dropped.
    #[getter]
    fn slot<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let r = self.routing_any(py)?;
        self.per_image(Some(r.getattr("slot")?))
    }

    /// bool ``[images, tokens]``: tokens that reached no expert.
    #[getter]
    fn dropped<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let r = self.routing_any(py)?;
        self.per_image(Some(r.getattr("dropped")?))
    }

    /// int64 ``[groups, experts]``: filled slots per expert in each routing group.
    #[getter]
    fn tokens_per_expert<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.routing_any(py)?.getattr("tokens_per_expert")
    }

    /// float32 ``[images, tokens, experts]``: the router's probabilities (softmax of its logits;
    /// Soft MoE: combine weight summed over each expert's slots).
    #[getter]
    fn router_probabilities<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let e = self.record().groups[0].routing.num_experts;
        let data = self
            .record()
            .groups
            .iter()
            .flat_map(|g| g.probs.iter().copied())
            .collect();
        output(py, &[self.images(), self.seq_len, e], data)
    }

    /// float32 ``[images, tokens, experts]`` router logits (Soft MoE: ``[images, tokens,
    /// experts, slots]`` slot logits).
    #[getter]
    fn router_logits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let g0 = &self.record().groups[0].routing;
        let mut shape = vec![self.images(), self.seq_len, g0.num_experts];
        if g0.soft().is_some() {
            shape.push(g0.capacity);
        }
        let data = self
            .record()
            .groups
            .iter()
            .flat_map(|g| g.logits.iter().copied())
            .collect();
        output(py, &shape, data)
    }

    /// float32 ``[images, tokens, experts, capacity]``: the dispatch tensor (Soft MoE: each
    /// slot's weights over its group's tokens).
    #[getter]
    fn dispatch<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let r = self.routing_any(py)?;
        self.per_image(Some(r.getattr("dispatch")?))
    }

    /// float32 ``[images, tokens, experts, capacity]``: the combine tensor.
    #[getter]
    fn combine<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let r = self.routing_any(py)?;
        self.per_image(Some(r.getattr("combine")?))
    }

    fn __repr__(&self) -> String {
        let r = &self.record().groups[0].routing;
        format!(
            "LayerRouting(block={}, router='{}', groups={}, capacity={})",
            self.record().block,
            r.router.cli_name(),
            self.record().groups.len(),
            r.capacity
        )
    }
}

/// The built-in models, ``{name: path}``: ``fashion-mnist-<router>`` for the six routers of the
/// routers paper, ``fashion-mnist-dense``, ``photo`` (DINOv2-S/14 split into experts) and
/// ``photo-<router>`` (that model distilled under each sparse router).
#[pyfunction]
pub(crate) fn builtin_models(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, path) in catalog::builtin_models() {
        d.set_item(name, path)?;
    }
    Ok(d)
}

/// The sample images shipped with routerscope (Fashion-MNIST test images, then photos), as paths.
#[pyfunction]
pub(crate) fn sample_images() -> Vec<PathBuf> {
    catalog::sample_images()
}

/// An image file as uint8 RGB pixels ``[H, W, 3]`` (PNG, JPEG, GIF, BMP, WebP, TIFF; EXIF
/// orientation applied; decoding bounded as for models), resized to ``size`` ``(H, W)`` with a
/// triangle filter when given, the way models resize their inputs.
#[pyfunction]
#[pyo3(signature = (path, *, size = None))]
pub(crate) fn read_image<'py>(
    py: Python<'py>,
    path: PathBuf,
    size: Option<(u32, u32)>,
) -> PyResult<Bound<'py, numpy::PyArrayDyn<u8>>> {
    check_file(&path, "image")?;
    if let Some((h, w)) = size
        && (h == 0 || w == 0 || h > 16_384 || w > 16_384)
    {
        return Err(value_error(format!(
            "size=({h}, {w}): 1 to 16384 pixels per side"
        )));
    }
    let rgb = crate::stoppable::run_released(py, || -> Result<image::RgbImage, ModelError> {
        let img = decode_image(&path)?;
        Ok(match size {
            Some((h, w)) => img
                .resize_exact(w, h, image::imageops::FilterType::Triangle)
                .to_rgb8(),
            None => img.to_rgb8(),
        })
    })?
    .map_err(model_error)?;
    let (w, h) = rgb.dimensions();
    output(py, &[h as usize, w as usize, 3], rgb.into_raw())
}
