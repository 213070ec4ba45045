//! The seven routers behind one configuration and one entry point per input kind: logits for the
//! sparse routers, token vectors plus `mu`/`scale` for Soft MoE.
//!
//! Which matrix feeds which step follows spec §2.8: Sinkhorn and sparsity-constrained plans only
//! *select*; the combine gates are softmax probabilities (clean for Sinkhorn TC and the SCOT
//! routers, noisy for Softmax TC/EC and Sinkhorn EC while training).

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::RoutingError;
use super::aux_loss::{gshard_loss, importance_loss, load_loss};
use super::capacity::{CapacityRounding, compute_capacity};
use super::expert_choice::expert_choice_selection;
use super::ops::{add_gaussian_noise, softmax_rows};
use super::result::{Assignment, AuxLosses, RoutingResult, SolverInfo};
use super::scot::{ScotOptions, scot_columns};
use super::sinkhorn::sinkhorn_plan;
use super::soft_moe::{SoftRouterParams, soft_logits, soft_weights};
use super::token_choice::token_choice_slotting;

/// The routers of the study (the six of the paper, plus Sparsity-constrained Token Choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RouterKind {
    #[serde(rename = "softmax-tc")]
    SoftmaxTokenChoice,
    #[serde(rename = "sinkhorn-tc")]
    SinkhornTokenChoice,
    #[serde(rename = "softmax-ec")]
    SoftmaxExpertChoice,
    #[serde(rename = "sinkhorn-ec")]
    SinkhornExpertChoice,
    #[serde(rename = "sparse-ec")]
    SparseExpertChoice,
    #[serde(rename = "sparse-tc")]
    SparseTokenChoice,
    #[serde(rename = "soft")]
    SoftMoe,
}

/// How a router family assigns tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterFamily {
    TokenChoice,
    ExpertChoice,
    Soft,
}

impl RouterKind {
    pub const ALL: [RouterKind; 7] = [
        Self::SoftmaxTokenChoice,
        Self::SinkhornTokenChoice,
        Self::SoftmaxExpertChoice,
        Self::SinkhornExpertChoice,
        Self::SparseExpertChoice,
        Self::SparseTokenChoice,
        Self::SoftMoe,
    ];

    /// The short name used on the command line and in files.
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::SoftmaxTokenChoice => "softmax-tc",
            Self::SinkhornTokenChoice => "sinkhorn-tc",
            Self::SoftmaxExpertChoice => "softmax-ec",
            Self::SinkhornExpertChoice => "sinkhorn-ec",
            Self::SparseExpertChoice => "sparse-ec",
            Self::SparseTokenChoice => "sparse-tc",
            Self::SoftMoe => "soft",
        }
    }

    /// The name the paper uses.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::SoftmaxTokenChoice => "Softmax Token Choice",
            Self::SinkhornTokenChoice => "Sinkhorn Token Choice",
            Self::SoftmaxExpertChoice => "Softmax Expert Choice",
            Self::SinkhornExpertChoice => "Sinkhorn Expert Choice",
            Self::SparseExpertChoice => "Sparsity-constrained Expert Choice",
            Self::SparseTokenChoice => "Sparsity-constrained Token Choice",
            Self::SoftMoe => "Soft MoE",
        }
    }

    pub fn family(self) -> RouterFamily {
        match self {
            Self::SoftmaxTokenChoice | Self::SinkhornTokenChoice | Self::SparseTokenChoice => {
                RouterFamily::TokenChoice
            }
            Self::SoftmaxExpertChoice | Self::SinkhornExpertChoice | Self::SparseExpertChoice => {
                RouterFamily::ExpertChoice
            }
            Self::SoftMoe => RouterFamily::Soft,
        }
    }

    /// Routers with an iterative solver (`maxiter`): Sinkhorn and sparsity-constrained OT.
    pub fn has_solver(self) -> bool {
        matches!(
            self,
            Self::SinkhornTokenChoice
                | Self::SinkhornExpertChoice
                | Self::SparseExpertChoice
                | Self::SparseTokenChoice
        )
    }

    /// Routers solved with Adam (`adam_lr`).
    pub fn uses_adam(self) -> bool {
        matches!(self, Self::SparseExpertChoice | Self::SparseTokenChoice)
    }

    /// Routers that add training noise (the SCOT routers never do).
    pub fn uses_noise(self) -> bool {
        !matches!(self, Self::SparseExpertChoice | Self::SparseTokenChoice)
    }
}

impl fmt::Display for RouterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for RouterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.cli_name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.cli_name()).collect();
                format!(
                    "unknown router `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Capacity given as a factor (vmoe's `capacity_factor`) or as slots (vmoe's `capacity`; Soft
/// MoE's `num_slots`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacitySpec {
    Factor(f64),
    Slots(usize),
}

/// Weights of the auxiliary losses (a term with weight 0 is not computed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    pub importance: f32,
    pub load: f32,
    pub gshard: f32,
}

/// Everything that decides how a group is routed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    pub kind: RouterKind,
    /// Experts per token `k` (Token Choice only).
    pub k: usize,
    pub capacity: CapacitySpec,
    /// Sparse routers only; Soft MoE always rounds half to even with no padding.
    pub rounding: CapacityRounding,
    /// Sparse routers only; 0 disables padding.
    pub multiple_of: usize,
    /// Batch Priority Routing (Token Choice only).
    pub batch_priority: bool,
    /// `maxiter` of Sinkhorn (runs `10·floor(maxiter/10)`) or of the SCOT Adam solver.
    pub max_iterations: usize,
    /// Adam learning rate of the SCOT solver.
    pub adam_lr: f32,
    /// Training noise; sparse routers use `noise_std / e`, Soft MoE `noise_std` as is.
    pub noise_std: f32,
    /// Combine with softmax probabilities (true, vmoe's default) or with the OT plan.
    pub use_softmax_combine_weights: bool,
    pub loss_weights: LossWeights,
}

impl RouterConfig {
    /// vmoe's class defaults for `kind`: k = 1, capacity factor 1, ceil to a multiple of 4,
    /// no BPR, 20 iterations, Adam lr 1e-2, noise 1.0 (Soft MoE 0), softmax combine weights,
    /// importance and load loss weights 1.0 for Softmax Token Choice only.
    pub fn new(kind: RouterKind) -> Self {
        let softmax_tc = kind == RouterKind::SoftmaxTokenChoice;
        Self {
            kind,
            k: 1,
            capacity: CapacitySpec::Factor(1.0),
            rounding: CapacityRounding::Ceil,
            multiple_of: 4,
            batch_priority: false,
            max_iterations: 20,
            adam_lr: 1e-2,
            noise_std: if kind == RouterKind::SoftMoe {
                0.0
            } else {
                1.0
            },
            use_softmax_combine_weights: true,
            loss_weights: LossWeights {
                importance: if softmax_tc { 1.0 } else { 0.0 },
                load: if softmax_tc { 1.0 } else { 0.0 },
                gshard: 0.0,
            },
        }
    }

    /// Experts per token used by this router (`k` for Token Choice, else 1).
    pub fn experts_per_token(&self) -> usize {
        if self.kind.family() == RouterFamily::TokenChoice {
            self.k
        } else {
            1
        }
    }

    /// Slots per expert for a group of `n` tokens and `e` experts, and the `N` it derives from.
    pub fn capacity_for(&self, n: usize, e: usize) -> Result<(usize, usize), RoutingError> {
        if n == 0 || e == 0 {
            return Err(RoutingError::Shape(format!(
                "a group needs at least one token and one expert, got {n} tokens and {e} experts"
            )));
        }
        let family = self.kind.family();
        if family == RouterFamily::TokenChoice && !(1..=e).contains(&self.k) {
            return Err(RoutingError::InvalidConfig(format!(
                "k = {} experts per token must be between 1 and the {e} experts",
                self.k
            )));
        }
        let big_n = n * self.experts_per_token();
        let c = match (self.capacity, family) {
            (CapacitySpec::Slots(0), _) => {
                return Err(RoutingError::Capacity(
                    "capacity must be at least 1 slot".into(),
                ));
            }
            (CapacitySpec::Slots(c), _) => c,
            (CapacitySpec::Factor(cf), RouterFamily::Soft) => {
                compute_capacity(n, e, cf, CapacityRounding::Round, 1)?
            }
            (CapacitySpec::Factor(cf), _) => {
                compute_capacity(big_n, e, cf, self.rounding, self.multiple_of)?
            }
        };
        // Token Choice: no expert is ever sent more than the group's `N = n·k` requests, so
        // slots beyond them would stay empty; capping there keeps a huge factor or slot count
        // (1e300, 2^62) from sizing the `[e, c]` slot buffers (the routing is the same).
        let c = if family == RouterFamily::TokenChoice {
            c.min(big_n)
        } else {
            c
        };
        if family == RouterFamily::ExpertChoice && c > n {
            return Err(RoutingError::Capacity(format!(
                "capacity {c} exceeds the {n} tokens of the group: Expert Choice picks {c} distinct \
                 tokens per expert (lower the capacity factor or the multiple-of padding)"
            )));
        }
        Ok((c, big_n))
    }
}

/// Inference (no noise, no load loss) or training (noise from the given RNG).
pub enum Mode<'a> {
    Deterministic,
    Train(&'a mut dyn RngCore),
}

impl Mode<'_> {
    fn is_train(&self) -> bool {
        matches!(self, Mode::Train(_))
    }
}

/// A non-finite value in `data` (rows of `cols`) is an error naming its place.
pub fn check_finite(name: &str, data: &[f32], cols: usize) -> Result<(), RoutingError> {
    // Branch-free within a chunk, so the test vectorises; the search below runs only on failure.
    if data
        .chunks(256)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
    {
        return Ok(());
    }
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(at) => Err(RoutingError::NonFinite(format!(
            "{name} has a non-finite value {} at [{}, {}]",
            data[at],
            at / cols,
            at % cols
        ))),
    }
}

/// The most Sinkhorn or sparsity-constrained solver iterations a router may ask for (the
/// routers paper uses 20; 10,000 keep a 1,576 × 8 group under a few seconds).
pub const MAX_SOLVER_ITERATIONS: usize = 10_000;

/// Checks a sparse router's settings for groups of `n` tokens and `e` experts; gives the slots per
/// expert and the `N` they derive from.
pub(crate) fn check_sparse_config(
    cfg: &RouterConfig,
    n: usize,
    e: usize,
) -> Result<(usize, usize), RoutingError> {
    let (c, capacity_tokens) = cfg.capacity_for(n, e)?;
    let solves = cfg.kind.uses_adam()
        || matches!(
            cfg.kind,
            RouterKind::SinkhornTokenChoice | RouterKind::SinkhornExpertChoice
        );
    if solves && cfg.max_iterations > MAX_SOLVER_ITERATIONS {
        return Err(RoutingError::InvalidConfig(format!(
            "{} solver iterations is beyond the limit of {MAX_SOLVER_ITERATIONS}",
            cfg.max_iterations
        )));
    }
    if cfg.kind.uses_adam() && cfg.max_iterations == 0 {
        return Err(RoutingError::InvalidConfig(
            "the sparsity-constrained solver needs at least 1 iteration".into(),
        ));
    }
    if cfg.kind.uses_adam() && !(cfg.adam_lr.is_finite() && cfg.adam_lr > 0.0) {
        return Err(RoutingError::InvalidConfig(format!(
            "Adam learning rate must be positive, got {}",
            cfg.adam_lr
        )));
    }
    Ok((c, capacity_tokens))
}

/// Routes one group given its router logits `[n, e]` (row-major). Soft MoE needs token vectors:
/// use [`route_soft`].
pub fn route_logits(
    logits: &[f32],
    n: usize,
    e: usize,
    cfg: &RouterConfig,
    mut mode: Mode<'_>,
) -> Result<RoutingResult, RoutingError> {
    if cfg.kind == RouterKind::SoftMoe {
        return Err(RoutingError::InvalidConfig(
            "Soft MoE routes token vectors with its own mu and scale, not router logits".into(),
        ));
    }
    if logits.len() != n * e {
        return Err(RoutingError::Shape(format!(
            "logits hold {} values, expected n·e = {n}·{e}",
            logits.len()
        )));
    }
    check_finite("logits", logits, e.max(1))?;
    let (c, capacity_tokens) = check_sparse_config(cfg, n, e)?;
    let k = cfg.experts_per_token();

    // Noisy logits L̃ = L + N(0, (noise_std/e)²) in training, for the routers that have noise.
    let sigma = cfg.noise_std / e as f32;
    let noisy: Option<Vec<f32>> = match &mut mode {
        Mode::Train(rng) if cfg.kind.uses_noise() && cfg.noise_std > 0.0 => {
            let mut l = logits.to_vec();
            add_gaussian_noise(&mut l, sigma, &mut **rng);
            Some(l)
        }
        _ => None,
    };
    let selection_logits = noisy.as_deref().unwrap_or(logits);
    let clean_softmax = || softmax_rows(logits, e);

    let mut solver = None;
    let (scores, gates) = match cfg.kind {
        RouterKind::SoftmaxTokenChoice | RouterKind::SoftmaxExpertChoice => {
            let g = softmax_rows(selection_logits, e);
            (g.clone(), g)
        }
        RouterKind::SinkhornTokenChoice | RouterKind::SinkhornExpertChoice => {
            let plan = sinkhorn_plan(selection_logits, n, e, cfg.max_iterations);
            solver = Some(SolverInfo {
                iterations: plan.iterations,
                converged: false,
                log_domain: plan.log_domain,
            });
            let gates = if !cfg.use_softmax_combine_weights {
                plan.plan.clone()
            } else if cfg.kind == RouterKind::SinkhornTokenChoice {
                // vmoe quirk: Sinkhorn TC combines with the clean softmax even in training.
                clean_softmax()
            } else {
                softmax_rows(selection_logits, e)
            };
            (plan.plan, gates)
        }
        RouterKind::SparseExpertChoice | RouterKind::SparseTokenChoice => {
            let s = clean_softmax();
            let (plan, info) = sparse_plan(cfg, &s, n, e, c);
            solver = Some(info);
            let gates = if cfg.use_softmax_combine_weights {
                s
            } else {
                plan.clone()
            };
            (plan, gates)
        }
        RouterKind::SoftMoe => unreachable!("rejected above"),
    };

    let aux = match cfg.kind {
        RouterKind::SoftmaxTokenChoice | RouterKind::SinkhornTokenChoice => token_choice_aux(
            cfg,
            logits,
            noisy.as_deref(),
            &gates,
            e,
            k,
            sigma,
            mode.is_train(),
        ),
        _ => AuxLosses::default(),
    };

    let sparse = match cfg.kind.family() {
        RouterFamily::TokenChoice => {
            token_choice_slotting(scores, gates, n, e, k, c, cfg.batch_priority)
        }
        _ => expert_choice_selection(scores, gates, n, e, c),
    };
    Ok(RoutingResult {
        router: cfg.kind,
        num_tokens: n,
        num_experts: e,
        capacity: c,
        k,
        capacity_tokens,
        assignment: Assignment::Sparse(sparse),
        aux,
        solver,
    })
}

/// The sparsity-constrained OT plan `[n, e]` of the SCOT routers from the softmax `s` `[n, e]`:
/// per expert at most `c` tokens (Expert Choice) or per token at most `k` experts (Token Choice).
pub(crate) fn sparse_plan(
    cfg: &RouterConfig,
    s: &[f32],
    n: usize,
    e: usize,
    c: usize,
) -> (Vec<f32>, SolverInfo) {
    let info = |out: &super::scot::ScotPlan| SolverInfo {
        iterations: out.iterations,
        converged: out.converged,
        log_domain: false,
    };
    if cfg.kind == RouterKind::SparseExpertChoice {
        let b = (n as f64 / e as f64) as f32;
        let opts = ScotOptions {
            kappa: c,
            max_iterations: cfg.max_iterations,
            adam_lr: cfg.adam_lr,
        };
        let out = scot_columns(s, n, e, (1.0, b), &opts);
        let i = info(&out);
        (out.plan, i)
    } else {
        let a = (n as f64 / e as f64) as f32;
        let st = transpose(s, n, e);
        let opts = ScotOptions {
            kappa: cfg.experts_per_token(),
            max_iterations: cfg.max_iterations,
            adam_lr: cfg.adam_lr,
        };
        let out = scot_columns(&st, e, n, (a, 1.0), &opts);
        (transpose(&out.plan, e, n), info(&out))
    }
}

/// The auxiliary losses of the Token Choice routers (spec §2.0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn token_choice_aux(
    cfg: &RouterConfig,
    logits: &[f32],
    noisy: Option<&[f32]>,
    gates: &[f32],
    e: usize,
    k: usize,
    sigma: f32,
    train: bool,
) -> AuxLosses {
    let w = cfg.loss_weights;
    let mut aux = AuxLosses::default();
    if w.importance != 0.0 {
        // Importance uses the noise-free softmax.
        let clean = if noisy.is_some() {
            softmax_rows(logits, e)
        } else {
            gates.to_vec()
        };
        aux.importance = Some(importance_loss(&clean, e));
    }
    if let Some(noisy) = noisy.filter(|_| w.load != 0.0 && train) {
        aux.load = Some(load_loss(logits, noisy, e, k, sigma));
    }
    if w.gshard != 0.0 {
        aux.gshard = Some(gshard_loss(gates, e));
    }
    aux.total = w.importance * aux.importance.unwrap_or(0.0)
        + w.load * aux.load.unwrap_or(0.0)
        + w.gshard * aux.gshard.unwrap_or(0.0);
    aux
}

/// Routes one group with Soft MoE: tokens `x` `[n, d]`, `mu` `[d, e, p]` and `scale`.
/// The slot count comes from `params.num_slots`; a config with `CapacitySpec::Factor` must agree
/// with it (vmoe derives `p` from the factor when `num_slots` is unset).
pub fn route_soft(
    x: &[f32],
    n: usize,
    params: &SoftRouterParams<'_>,
    cfg: &RouterConfig,
    mut mode: Mode<'_>,
) -> Result<RoutingResult, RoutingError> {
    if cfg.kind != RouterKind::SoftMoe {
        return Err(RoutingError::InvalidConfig(format!(
            "{} routes router logits; only Soft MoE routes token vectors",
            cfg.kind.display_name()
        )));
    }
    let (d, e, p) = (params.dim, params.num_experts, params.num_slots);
    if x.len() != n * d {
        return Err(RoutingError::Shape(format!(
            "x holds {} values, expected n·d = {n}·{d}",
            x.len()
        )));
    }
    if params.mu.len() != d * e * p {
        return Err(RoutingError::Shape(format!(
            "mu holds {} values, expected d·e·p = {d}·{e}·{p}",
            params.mu.len()
        )));
    }
    if d == 0 || p == 0 {
        return Err(RoutingError::Shape(format!(
            "Soft MoE needs d ≥ 1 and p ≥ 1, got d = {d}, p = {p}"
        )));
    }
    check_finite("x", x, d)?;
    check_finite("mu", params.mu, e * p)?;
    if !params.scale.is_finite() {
        return Err(RoutingError::NonFinite(format!(
            "scale is {}",
            params.scale
        )));
    }
    let (c, capacity_tokens) = cfg.capacity_for(n, e)?;
    if c != p {
        return Err(RoutingError::Shape(format!(
            "mu has {p} slots per expert but the configured capacity gives {c} \
             (pass the slot count, or a capacity factor that rounds to {p})"
        )));
    }
    let mut logits = soft_logits(x, n, params);
    if let Mode::Train(rng) = &mut mode
        && cfg.noise_std > 0.0
    {
        add_gaussian_noise(&mut logits, cfg.noise_std, &mut **rng);
    }
    let soft = soft_weights(logits, n, e * p);
    Ok(RoutingResult {
        router: RouterKind::SoftMoe,
        num_tokens: n,
        num_experts: e,
        capacity: p,
        k: 1,
        capacity_tokens,
        assignment: Assignment::Soft(soft),
        aux: AuxLosses::default(),
        solver: None,
    })
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}
