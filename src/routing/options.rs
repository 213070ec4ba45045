//! The user-facing router options (`routerscope route`'s flags, the Python `route()` keywords)
//! turned into a [`RouterConfig`], one way for every front end so that they route identically.
//!
//! An option that does not apply to the chosen router is an error, not silently ignored; the
//! messages name the option the way the caller's front end spells it ([`ArgStyle`]).

use super::{CapacityRounding, CapacitySpec, RouterConfig, RouterFamily, RouterKind, RoutingError};

/// How an error message names an option: `--capacity-factor` (command line) or
/// `capacity_factor=` (Python keyword).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ArgStyle {
    #[default]
    Cli,
    Python,
}

impl ArgStyle {
    /// `flag` is the command-line spelling without dashes (`capacity-factor`).
    pub fn name(self, flag: &str) -> String {
        match self {
            Self::Cli => format!("--{flag}"),
            Self::Python => format!("{}=", flag.replace('-', "_")),
        }
    }
}

/// Every router option a user can give; `None` (or `false`) keeps the router's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteOptions {
    /// Experts per token (Token Choice).
    pub k: Option<usize>,
    pub capacity_factor: Option<f64>,
    /// Sparse routers only.
    pub capacity_multiple_of: Option<usize>,
    /// Sparse routers only.
    pub capacity_rounding: Option<CapacityRounding>,
    /// Token Choice only.
    pub batch_priority: bool,
    /// Sinkhorn and sparsity-constrained routers.
    pub iterations: Option<usize>,
    /// Sparsity-constrained routers.
    pub adam_lr: Option<f32>,
    /// Soft MoE: slots per expert (must match `mu`).
    pub num_slots: Option<usize>,
}

impl RouteOptions {
    /// The configuration of `kind` with these options, refusing those that do not apply.
    /// A Soft MoE configuration given neither slots nor a factor takes `soft_slots` (the slots
    /// of its `mu`) when known.
    pub fn config(
        &self,
        kind: RouterKind,
        style: ArgStyle,
        soft_slots: Option<usize>,
    ) -> Result<RouterConfig, RoutingError> {
        let family = kind.family();
        let name = kind.cli_name();
        let only = |flag: &str, given: bool, applies: bool, who: &str| {
            if given && !applies {
                return Err(RoutingError::InvalidConfig(format!(
                    "{} does not apply to {name}: it is for {who}",
                    style.name(flag)
                )));
            }
            Ok(())
        };
        let tc = family == RouterFamily::TokenChoice;
        let soft = family == RouterFamily::Soft;
        only("k", self.k.is_some(), tc, "Token Choice routers")?;
        only(
            "batch-priority",
            self.batch_priority,
            tc,
            "Token Choice routers",
        )?;
        only(
            "iterations",
            self.iterations.is_some(),
            kind.has_solver(),
            "Sinkhorn and sparsity-constrained routers",
        )?;
        only(
            "adam-lr",
            self.adam_lr.is_some(),
            kind.uses_adam(),
            "sparsity-constrained routers",
        )?;
        only("num-slots", self.num_slots.is_some(), soft, "Soft MoE")?;
        let soft_rule = "sparse routers (Soft MoE always rounds half to even with no padding)";
        only(
            "capacity-multiple-of",
            self.capacity_multiple_of.is_some(),
            !soft,
            soft_rule,
        )?;
        only(
            "capacity-rounding",
            self.capacity_rounding.is_some(),
            !soft,
            soft_rule,
        )?;
        if self.num_slots.is_some() && self.capacity_factor.is_some() {
            return Err(RoutingError::InvalidConfig(format!(
                "give either {} or {}, not both",
                style.name("num-slots"),
                style.name("capacity-factor")
            )));
        }
        let mut cfg = RouterConfig::new(kind);
        if let Some(k) = self.k {
            cfg.k = k;
        }
        if let Some(cf) = self.capacity_factor {
            cfg.capacity = CapacitySpec::Factor(cf);
        }
        if let Some(p) = self.num_slots {
            cfg.capacity = CapacitySpec::Slots(p);
        }
        if soft
            && self.capacity_factor.is_none()
            && self.num_slots.is_none()
            && let Some(p) = soft_slots
        {
            cfg.capacity = CapacitySpec::Slots(p);
        }
        if let Some(m) = self.capacity_multiple_of {
            cfg.multiple_of = m;
        }
        if let Some(r) = self.capacity_rounding {
            cfg.rounding = r;
        }
        cfg.batch_priority = self.batch_priority;
        if let Some(t) = self.iterations {
            cfg.max_iterations = t;
        }
        if let Some(lr) = self.adam_lr {
            cfg.adam_lr = lr;
        }
        Ok(cfg)
    }
}

/// The dense `dispatch` and `combine` tensors a front end materialises may take at most this many
/// bytes together.
pub const MAX_DENSE_OUTPUT_BYTES: u64 = 2 << 30;

/// Sized before allocating: dense `[.., n, e, c]` outputs (two f32 tensors of `shape`) grow with
/// n² for Expert Choice and large capacities.
pub fn check_dense_size(shape: &[usize], what: &str) -> Result<(), RoutingError> {
    let bytes = shape
        .iter()
        .try_fold(8u64, |a, &d| a.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    if bytes > MAX_DENSE_OUTPUT_BYTES {
        return Err(RoutingError::Capacity(format!(
            "the dense dispatch and combine tensors {shape:?} would take {} MB, beyond the {} MB \
             output limit of {what} (route fewer tokens per group, or lower the capacity)",
            bytes >> 20,
            MAX_DENSE_OUTPUT_BYTES >> 20
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_that_do_not_apply_are_refused_in_the_callers_spelling() {
        let o = RouteOptions {
            k: Some(2),
            ..Default::default()
        };
        let cli = o
            .config(RouterKind::SoftmaxExpertChoice, ArgStyle::Cli, None)
            .unwrap_err();
        assert!(
            cli.to_string().contains("--k does not apply to softmax-ec"),
            "{cli}"
        );
        let py = RouteOptions {
            capacity_multiple_of: Some(2),
            ..Default::default()
        }
        .config(RouterKind::SoftMoe, ArgStyle::Python, Some(2))
        .unwrap_err();
        assert!(
            py.to_string()
                .contains("capacity_multiple_of= does not apply to soft"),
            "{py}"
        );
        let both = RouteOptions {
            num_slots: Some(2),
            capacity_factor: Some(1.0),
            ..Default::default()
        }
        .config(RouterKind::SoftMoe, ArgStyle::Python, None)
        .unwrap_err();
        assert!(both.to_string().contains("num_slots= or capacity_factor="));
    }

    #[test]
    fn options_set_the_configuration_and_soft_moe_takes_the_slots_of_mu() {
        let o = RouteOptions {
            k: Some(2),
            capacity_factor: Some(1.25),
            capacity_multiple_of: Some(0),
            capacity_rounding: Some(CapacityRounding::Round),
            batch_priority: true,
            iterations: Some(30),
            ..Default::default()
        };
        let c = o
            .config(RouterKind::SinkhornTokenChoice, ArgStyle::Cli, None)
            .unwrap();
        assert_eq!(
            (c.k, c.capacity, c.multiple_of, c.rounding, c.batch_priority),
            (
                2,
                CapacitySpec::Factor(1.25),
                0,
                CapacityRounding::Round,
                true
            )
        );
        assert_eq!(c.max_iterations, 30);
        let soft = RouteOptions::default()
            .config(RouterKind::SoftMoe, ArgStyle::Cli, Some(3))
            .unwrap();
        assert_eq!(soft.capacity, CapacitySpec::Slots(3));
        assert!(check_dense_size(&[1 << 16, 1 << 10, 1 << 6], "route").is_err());
        assert!(check_dense_size(&[196, 32, 8], "route").is_ok());
    }
}
