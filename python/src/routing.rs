//! `routerscope.route` and the `Routing` it returns: one router over one group `[tokens, experts]`
//! or many `[groups, tokens, experts]`, exactly as `routerscope route` routes each group.
//!
//! A `Routing` keeps the compact form; the dense `[.., tokens, experts, capacity]` tensors are
//! built on first access (they are large, and most callers read only the picks and loads).

use numpy::{PyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use rand::SeedableRng;
use routerscope::routing::{
    ArgStyle, CapacityRounding, Mode, RouteOptions, RouterFamily, RouterKind, RoutingResult,
    SoftRouterParams, check_dense_size, route_logits, route_soft,
};

use crate::arrays::{f32_input, frozen, output, slice};
use crate::errors::{non_negative, routing_error, value_error};
use crate::stoppable::{run_released, run_stoppable};

/// The routing of one or more groups by one router: who went to which expert slot, with which
/// weight, what was dropped, and the load of every expert.
///
/// Arrays have a leading groups axis when the input had one (`[groups, tokens, ...]`), else not.
/// Dense tensors are built on first access and cached (read-only).
#[pyclass(module = "routerscope", name = "Routing", frozen)]
pub struct Routing {
    pub(crate) groups: Vec<RoutingResult>,
    /// Whether the input had a groups axis.
    pub(crate) batched: bool,
    dispatch: PyOnceLock<Py<PyAny>>,
    combine: PyOnceLock<Py<PyAny>>,
}

impl Routing {
    pub(crate) fn new(groups: Vec<RoutingResult>, batched: bool) -> Self {
        Self {
            groups,
            batched,
            dispatch: PyOnceLock::new(),
            combine: PyOnceLock::new(),
        }
    }

    fn first(&self) -> &RoutingResult {
        &self.groups[0]
    }

    /// The output shape for per-group arrays of shape `inner`.
    fn shape(&self, inner: &[usize]) -> Vec<usize> {
        let mut s = Vec::with_capacity(inner.len() + 1);
        if self.batched {
            s.push(self.groups.len());
        }
        s.extend_from_slice(inner);
        s
    }

    fn is_token_choice(&self) -> bool {
        self.first().router.family() == RouterFamily::TokenChoice
    }

    /// Per-group scalars: a float for one group, an array for a groups axis.
    fn scalars<'py>(&self, py: Python<'py>, values: Vec<f64>) -> PyResult<Bound<'py, PyAny>> {
        if self.batched {
            Ok(output(py, &[values.len()], values)?.into_any())
        } else {
            Ok(values[0].into_pyobject(py)?.into_any())
        }
    }

    fn dense<'py>(
        &self,
        py: Python<'py>,
        what: &str,
        f: impl Fn(&RoutingResult) -> Vec<f32> + Send + Sync,
    ) -> PyResult<Py<PyAny>> {
        let r = self.first();
        let shape = self.shape(&[r.num_tokens, r.num_experts, r.capacity]);
        let mut total = shape.clone();
        if self.batched {
            total = vec![shape[0] * shape[1], shape[2], shape[3]];
        }
        check_dense_size(&total, what)
            .map_err(|e| pyo3::exceptions::PyMemoryError::new_err(e.to_string()))?;
        let data: Vec<f32> = run_released(py, || self.groups.iter().flat_map(&f).collect())?;
        Ok(frozen(output(py, &shape, data)?)?.unbind())
    }

    /// `[.., tokens, k]` per Token Choice choice (rank order), `None` for the other routers.
    fn per_choice<'py, T: numpy::Element + Copy>(
        &self,
        py: Python<'py>,
        pad: T,
        f: impl Fn(&routerscope::routing::Choice) -> T,
    ) -> PyResult<Option<Bound<'py, PyArrayDyn<T>>>> {
        if !self.is_token_choice() {
            return Ok(None);
        }
        let r = self.first();
        let (n, k) = (r.num_tokens, r.k);
        let mut data = Vec::with_capacity(self.groups.len() * n * k);
        for g in &self.groups {
            for i in 0..n {
                let ch = g.token_choices(i);
                data.extend(ch.iter().take(k).map(&f));
                data.extend(std::iter::repeat_n(pad, k.saturating_sub(ch.len())));
            }
        }
        Ok(Some(output(py, &self.shape(&[n, k]), data)?))
    }
}

#[pymethods]
impl Routing {
    /// The router's command-line name (``"softmax-tc"``, ...).
    #[getter]
    fn router(&self) -> &'static str {
        self.first().router.cli_name()
    }

    /// The router's name in the routers paper (``"Softmax Token Choice"``, ...).
    #[getter]
    fn name(&self) -> &'static str {
        self.first().router.display_name()
    }

    /// Number of groups routed (1 without a groups axis).
    #[getter]
    fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Tokens per group.
    #[getter]
    fn num_tokens(&self) -> usize {
        self.first().num_tokens
    }

    #[getter]
    fn num_experts(&self) -> usize {
        self.first().num_experts
    }

    /// Slots per expert per group ``c`` (Soft MoE: slots per expert ``p``).
    #[getter]
    fn capacity(&self) -> usize {
        self.first().capacity
    }

    /// Experts per token (Token Choice ``k``; 1 for the other routers).
    #[getter]
    fn k(&self) -> usize {
        self.first().k
    }

    /// ``e·c / N``: the capacity factor after rounding and padding (``N = tokens·k`` for Token
    /// Choice, ``tokens`` otherwise).
    #[getter]
    fn actual_capacity_factor(&self) -> f64 {
        self.first().stats().actual_capacity_factor
    }

    /// Dispatch tensor ``D``, float32 ``[.., tokens, experts, capacity]``: 1 where a token sits in
    /// an expert slot (Soft MoE: the slot's weight on the token; columns sum to 1 over tokens).
    #[getter]
    fn dispatch(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.dispatch
            .get_or_try_init(py, || {
                self.dense(py, "Routing.dispatch", RoutingResult::dispatch_dense)
            })
            .map(|a| a.clone_ref(py))
    }

    /// Combine tensor ``Γ``, float32 ``[.., tokens, experts, capacity]``: the weight of each
    /// expert slot's output in the token's output (``D`` times the gate; Soft MoE: the token's
    /// softmax over all slots).
    #[getter]
    fn combine(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.combine
            .get_or_try_init(py, || {
                self.dense(py, "Routing.combine", RoutingResult::combine_dense)
            })
            .map(|a| a.clone_ref(py))
    }

    /// Token Choice: int32 ``[.., tokens, k]``, the experts each token chose, in rank order,
    /// before capacity (dropped choices included; see ``slot``). ``None`` for the other routers.
    #[getter]
    fn expert_index<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArrayDyn<i32>>>> {
        self.per_choice(py, -1, |c| c.expert as i32)
    }

    /// Token Choice: float32 ``[.., tokens, k]``, the combine gate of each choice (the router's
    /// probability; it reaches the token only where the choice was kept). ``None`` otherwise.
    #[getter]
    fn gates<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArrayDyn<f32>>>> {
        self.per_choice(py, 0.0, |c| c.gate)
    }

    /// Token Choice: int32 ``[.., tokens, k]``, the slot each choice took in its expert's buffer
    /// after capacity and priority, or -1 where it was dropped. ``None`` otherwise.
    #[getter]
    fn slot<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArrayDyn<i32>>>> {
        self.per_choice(py, -1, |c| c.slot.map_or(-1, |s| s as i32))
    }

    /// bool ``[.., tokens]``: tokens that reach no expert at all (their MoE output is 0).
    /// Never true for Soft MoE.
    #[getter]
    fn dropped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
        let n = self.first().num_tokens;
        let mut data = vec![false; self.groups.len() * n];
        for (g, r) in self.groups.iter().enumerate() {
            for t in r.stats().dropped_tokens {
                data[g * n + t] = true;
            }
        }
        output(py, &self.shape(&[n]), data)
    }

    /// int64 ``[.., experts]``: filled slots per expert (Soft MoE: every token reaches every
    /// slot, so ``tokens``).
    #[getter]
    fn tokens_per_expert<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
        let e = self.first().num_experts;
        let data = self
            .groups
            .iter()
            .flat_map(|r| r.stats().tokens_per_expert.into_iter().map(|v| v as i64))
            .collect();
        output(py, &self.shape(&[e]), data)
    }

    /// int64 ``[.., experts]``: (token, expert) requests per expert, those beyond capacity
    /// included (Token Choice); equal to ``tokens_per_expert`` for the other routers.
    #[getter]
    fn requests_per_expert<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
        let e = self.first().num_experts;
        let data = self
            .groups
            .iter()
            .flat_map(|r| r.stats().requests_per_expert.into_iter().map(|v| v as i64))
            .collect();
        output(py, &self.shape(&[e]), data)
    }

    /// int64 ``[.., tokens]``: how many experts process each token.
    #[getter]
    fn experts_per_token<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
        let n = self.first().num_tokens;
        let data = self
            .groups
            .iter()
            .flat_map(|r| r.stats().experts_per_token.into_iter().map(|v| v as i64))
            .collect();
        output(py, &self.shape(&[n]), data)
    }

    /// float32 ``[.., tokens, experts]``: the matrix the router ranked to select (softmax,
    /// Sinkhorn plan or sparse OT plan). ``None`` for Soft MoE.
    #[getter]
    fn scores<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArrayDyn<f32>>>> {
        let r = self.first();
        if r.sparse().is_none() {
            return Ok(None);
        }
        let data = self
            .groups
            .iter()
            .filter_map(|g| g.sparse())
            .flat_map(|s| s.scores.iter().copied())
            .collect();
        Ok(Some(output(
            py,
            &self.shape(&[r.num_tokens, r.num_experts]),
            data,
        )?))
    }

    /// float32 ``[.., tokens, experts]``: each token's probability per expert (the combine gate
    /// matrix of a sparse router; Soft MoE: the token's combine weight summed over each expert's
    /// slots).
    #[getter]
    fn probabilities<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let r = self.first();
        let data = self
            .groups
            .iter()
            .flat_map(|g| g.expert_probabilities())
            .collect();
        output(py, &self.shape(&[r.num_tokens, r.num_experts]), data)
    }

    /// Soft MoE: float32 ``[.., tokens, experts, slots]``, the logits ``scale·cos(x, μ)`` both
    /// softmaxes come from. ``None`` for the sparse routers.
    #[getter]
    fn soft_logits<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArrayDyn<f32>>>> {
        let r = self.first();
        if r.soft().is_none() {
            return Ok(None);
        }
        let data = self
            .groups
            .iter()
            .filter_map(|g| g.soft())
            .flat_map(|s| s.logits.iter().copied())
            .collect();
        Ok(Some(output(
            py,
            &self.shape(&[r.num_tokens, r.num_experts, r.capacity]),
            data,
        )?))
    }

    /// The router's auxiliary losses as vmoe computes them, per group: a dict with ``total`` and
    /// each term the router computes (``importance``, ``load`` in training mode, ``gshard``).
    /// Values are floats, or float64 ``[groups]`` arrays with a groups axis.
    #[getter]
    fn aux_losses<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        type Term = fn(&routerscope::routing::AuxLosses) -> Option<f32>;
        let terms: [(&str, Term); 3] = [
            ("importance", |a| a.importance),
            ("load", |a| a.load),
            ("gshard", |a| a.gshard),
        ];
        for (name, term) in terms {
            if term(&self.first().aux).is_some() {
                let v = self
                    .groups
                    .iter()
                    .map(|g| term(&g.aux).map_or(f64::NAN, f64::from))
                    .collect();
                d.set_item(name, self.scalars(py, v)?)?;
            }
        }
        let total = self.groups.iter().map(|g| f64::from(g.aux.total)).collect();
        d.set_item("total", self.scalars(py, total)?)?;
        Ok(d)
    }

    /// Iterations the solver ran (Sinkhorn, sparsity-constrained OT): an int, or an int64
    /// ``[groups]`` array with a groups axis; ``None`` for routers without a solver.
    #[getter]
    fn solver_iterations<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.first().solver.is_none() {
            return Ok(None);
        }
        let its: Vec<i64> = self
            .groups
            .iter()
            .map(|g| g.solver.map_or(0, |s| s.iterations as i64))
            .collect();
        if self.batched {
            Ok(Some(output(py, &[its.len()], its)?.into_any()))
        } else {
            Ok(Some(its[0].into_pyobject(py)?.into_any()))
        }
    }

    fn __repr__(&self) -> String {
        let dropped: usize = self
            .groups
            .iter()
            .map(|g| g.stats().dropped_tokens.len())
            .sum();
        let r = self.first();
        format!(
            "Routing(router='{}', groups={}, tokens={}, experts={}, capacity={}, k={}, dropped={dropped})",
            r.router.cli_name(),
            self.groups.len(),
            r.num_tokens,
            r.num_experts,
            r.capacity,
            r.k
        )
    }
}

pub(crate) fn parse_router(router: &str) -> PyResult<RouterKind> {
    router.parse::<RouterKind>().map_err(value_error)
}

/// The tokens of `groups` groups, a `[.., n, width]` array (`name` in errors).
fn grouped_shape(
    shape: &[usize],
    name: &str,
    inner: &str,
) -> PyResult<(usize, usize, usize, bool)> {
    match *shape {
        [n, w] => Ok((1, n, w, false)),
        [g, n, w] => {
            if g == 0 {
                return Err(value_error(format!(
                    "{name} has shape {shape:?}: no groups to route"
                )));
            }
            Ok((g, n, w, true))
        }
        _ => Err(value_error(format!(
            "{name} must be [tokens, {inner}] or [groups, tokens, {inner}], got shape {shape:?}"
        ))),
    }
}

/// Solver work above which a call runs on a worker thread that Ctrl-C can stop between groups.
const INLINE_WORK: usize = 1 << 22;

/// Route tokens with one of the routers of "Routers in Vision Mixture of Experts", exactly as
/// google-research/vmoe does and as ``routerscope route`` does for each group.
///
/// ``logits`` are the router logits, ``[tokens, experts]`` or ``[groups, tokens, experts]``,
/// float32 (float16 and bfloat16 are widened exactly), as numpy, torch or jax arrays or anything
/// with ``__array__`` or ``__dlpack__``. Soft MoE takes ``x`` (``[tokens, d]`` or ``[groups,
/// tokens, d]``), ``mu`` (``[d, experts, slots]``) and ``scale`` instead, with ``logits=None``.
/// Each group is routed independently (vmoe vmaps over groups).
///
/// ``router`` is one of ``softmax-tc``, ``sinkhorn-tc``, ``softmax-ec``, ``sinkhorn-ec``,
/// ``sparse-ec``, ``sparse-tc``, ``soft``. The keywords are the command line's flags, with the
/// same defaults (vmoe's): ``k=1``, ``capacity_factor=1.0`` (Soft MoE: the slots of ``mu``),
/// ``capacity_multiple_of=4``, ``capacity_rounding="ceil"``, ``iterations=20``,
/// ``adam_lr=0.01``. A keyword that does not apply to the router is an error, not ignored.
/// ``train_seed`` routes in training mode: router noise (and the load loss) drawn from a seeded
/// generator, the groups in order from one stream.
///
/// Returns a :class:`Routing`. Raises ``ValueError`` for bad arguments (an unknown router, a
/// wrong dtype or rank, NaN or infinite values, an impossible capacity).
#[pyfunction]
#[pyo3(signature = (
    logits, router, *, k=None, capacity_factor=None, capacity_multiple_of=None,
    capacity_rounding="ceil", batch_priority=false, iterations=None, adam_lr=None,
    num_slots=None, x=None, mu=None, scale=None, train_seed=None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn route<'py>(
    py: Python<'py>,
    logits: Option<&Bound<'py, PyAny>>,
    router: &str,
    k: Option<i64>,
    capacity_factor: Option<f64>,
    capacity_multiple_of: Option<i64>,
    capacity_rounding: &str,
    batch_priority: bool,
    iterations: Option<i64>,
    adam_lr: Option<f32>,
    num_slots: Option<i64>,
    x: Option<&Bound<'py, PyAny>>,
    mu: Option<&Bound<'py, PyAny>>,
    scale: Option<&Bound<'py, PyAny>>,
    train_seed: Option<u64>,
) -> PyResult<Routing> {
    let kind = parse_router(router)?;
    let rounding: CapacityRounding = capacity_rounding.parse().map_err(value_error)?;
    let soft = kind == RouterKind::SoftMoe;
    let opts = RouteOptions {
        k: non_negative("k", k)?,
        capacity_factor,
        capacity_multiple_of: non_negative("capacity_multiple_of", capacity_multiple_of)?,
        // "ceil" is the default; only an explicit other rounding is an option Soft MoE refuses.
        capacity_rounding: (rounding != CapacityRounding::Ceil || !soft).then_some(rounding),
        batch_priority,
        iterations: non_negative("iterations", iterations)?,
        adam_lr,
        num_slots: non_negative("num_slots", num_slots)?,
    };
    let mut rng = train_seed.map(rand_chacha::ChaCha8Rng::seed_from_u64);
    if soft {
        if logits.is_some() {
            return Err(value_error(
                "Soft MoE routes token vectors: pass x=, mu= and scale= (and logits=None)",
            ));
        }
        let (Some(x), Some(mu), Some(scale)) = (x, mu, scale) else {
            return Err(value_error(
                "Soft MoE needs x= ([tokens, d] or [groups, tokens, d]), mu= ([d, experts, slots]) \
                 and scale=",
            ));
        };
        let x = f32_input(py, x, "x")?;
        let mu = f32_input(py, mu, "mu")?;
        let scale_arr = f32_input(py, scale, "scale")?;
        let (groups, n, d, batched) = grouped_shape(x.shape(), "x", "d")?;
        let &[md, e, p] = mu.shape() else {
            return Err(value_error(format!(
                "mu must be [d, experts, slots], got shape {:?}",
                mu.shape()
            )));
        };
        if md != d {
            return Err(value_error(format!(
                "mu has shape {:?} but x has d = {d}: expected [{d}, experts, slots]",
                mu.shape()
            )));
        }
        let scale_data = slice(&scale_arr, "scale")?;
        if scale_data.len() != 1 || scale_arr.shape().len() > 1 {
            return Err(value_error(format!(
                "scale must be a scalar, got shape {:?}",
                scale_arr.shape()
            )));
        }
        let cfg = opts
            .config(kind, ArgStyle::Python, Some(p))
            .map_err(routing_error)?;
        let params = SoftRouterParams {
            mu: slice(&mu, "mu")?,
            dim: d,
            num_experts: e,
            num_slots: p,
            scale: scale_data[0],
        };
        let xs = slice(&x, "x")?;
        let work = groups
            .saturating_mul(n)
            .saturating_mul(d.max(1) * (e * p).max(1));
        let one = |g: usize, rng: Option<&mut rand_chacha::ChaCha8Rng>| {
            let mode = match rng {
                Some(r) => Mode::Train(r),
                None => Mode::Deterministic,
            };
            route_soft(&xs[g * n * d..(g + 1) * n * d], n, &params, &cfg, mode)
        };
        let results = route_groups(py, groups, work, rng.as_mut(), one)?;
        return Ok(Routing::new(results, batched));
    }
    for (name, given) in [
        ("x", x.is_some()),
        ("mu", mu.is_some()),
        ("scale", scale.is_some()),
    ] {
        if given {
            return Err(value_error(format!(
                "{name}= is for Soft MoE (router=\"soft\"); {} routes logits",
                kind.cli_name()
            )));
        }
    }
    let Some(logits) = logits else {
        return Err(value_error(format!(
            "{} routes router logits: pass logits ([tokens, experts] or [groups, tokens, experts])",
            kind.cli_name()
        )));
    };
    let cfg = opts
        .config(kind, ArgStyle::Python, None)
        .map_err(routing_error)?;
    let arr = f32_input(py, logits, "logits")?;
    let (groups, n, e, batched) = grouped_shape(arr.shape(), "logits", "experts")?;
    let data = slice(&arr, "logits")?;
    let solver = if kind.has_solver() {
        cfg.max_iterations.max(1)
    } else {
        1
    };
    let work = groups
        .saturating_mul(n)
        .saturating_mul(e)
        .saturating_mul(solver);
    let one = |g: usize, rng: Option<&mut rand_chacha::ChaCha8Rng>| {
        let mode = match rng {
            Some(r) => Mode::Train(r),
            None => Mode::Deterministic,
        };
        route_logits(&data[g * n * e..(g + 1) * n * e], n, e, &cfg, mode)
    };
    let results = route_groups(py, groups, work, rng.as_mut(), one)?;
    Ok(Routing::new(results, batched))
}

/// Routes `groups` groups in order with `one`, without the GIL: inline when the work is small,
/// else on a worker thread that stops between groups on Ctrl-C. A group's error names it.
fn route_groups<F>(
    py: Python<'_>,
    groups: usize,
    work: usize,
    mut rng: Option<&mut rand_chacha::ChaCha8Rng>,
    one: F,
) -> PyResult<Vec<RoutingResult>>
where
    F: Fn(
            usize,
            Option<&mut rand_chacha::ChaCha8Rng>,
        ) -> Result<RoutingResult, routerscope::routing::RoutingError>
        + Sync,
{
    let name = |g: usize, e: routerscope::routing::RoutingError| {
        if groups > 1 {
            value_error(format!("group {g}: {e}"))
        } else {
            routing_error(e)
        }
    };
    let all = |stop: &std::sync::atomic::AtomicBool,
               rng: &mut Option<&mut rand_chacha::ChaCha8Rng>| {
        let mut out = Vec::with_capacity(groups);
        for g in 0..groups {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            match one(g, rng.as_deref_mut()) {
                Ok(r) => out.push(r),
                Err(e) => return Err((g, e)),
            }
        }
        Ok(out)
    };
    if work <= INLINE_WORK {
        let never = std::sync::atomic::AtomicBool::new(false);
        let result = run_released(py, || all(&never, &mut rng))?;
        return result.map_err(|(g, e)| name(g, e));
    }
    let (result, interrupted) = run_stoppable(
        py,
        |stop, _report: &dyn Fn(())| all(stop, &mut rng),
        |_, ()| Ok(()),
    )?;
    if let Some(e) = interrupted {
        return Err(e);
    }
    result.map_err(|(g, e)| name(g, e))
}
