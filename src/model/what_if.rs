//! A router what-if on a checkpoint: `--router`, `--k`, `--capacity-factor` and `--group-images`
//! of `predict`, `features` and `analyze`, and the same keywords of the Python `Model.predict`,
//! turned into the [`RunOptions`] of a run, one way for every front end.

use super::{ModelConfig, ModelError, RunOptions};
use crate::routing::{ArgStyle, CapacitySpec, RouterConfig, RouterFamily, RouterKind};

/// What a user asked to change about a checkpoint's own routing; `None` keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WhatIf {
    pub router: Option<RouterKind>,
    pub k: Option<usize>,
    pub capacity_factor: Option<f64>,
    pub group_images: Option<usize>,
}

impl WhatIf {
    /// The router this asks for on the model `cfg` (`what` names the model in errors), `None` for
    /// a model without MoE layers and no routing option.
    ///
    /// Another router starts from its own defaults (vmoe's class defaults), the checkpoint's own
    /// router keeps its trained settings; Soft MoE keeps the slots of its `mu`.
    pub fn router(
        &self,
        cfg: &ModelConfig,
        what: &str,
        style: ArgStyle,
    ) -> Result<Option<RouterConfig>, ModelError> {
        let Some(moe) = &cfg.moe else {
            if self.router.is_some() || self.k.is_some() || self.capacity_factor.is_some() {
                return Err(ModelError::Config(format!(
                    "{what} has no MoE layers to route"
                )));
            }
            return Ok(None);
        };
        let mut r = match self.router {
            Some(kind) if kind != moe.router.kind => RouterConfig::new(kind),
            _ => moe.router.clone(),
        };
        if r.kind == RouterKind::SoftMoe {
            // Soft MoE's slots are fixed by `mu`; the model fills them in.
            r.capacity = CapacitySpec::Slots(1);
        }
        if let Some(k) = self.k {
            check_k_applies(r.kind, style)?;
            r.k = k;
        }
        if let Some(cf) = self.capacity_factor {
            if r.kind == RouterKind::SoftMoe {
                return Err(ModelError::Config(format!(
                    "{} does not apply to Soft MoE: its slots per expert are the shape of `mu`",
                    style.name("capacity-factor")
                )));
            }
            r.capacity = CapacitySpec::Factor(cf);
        }
        Ok(Some(r))
    }

    /// The run options: the checkpoint's routing with this what-if applied to every MoE layer.
    pub fn run_options(
        &self,
        cfg: &ModelConfig,
        what: &str,
        style: ArgStyle,
    ) -> Result<RunOptions, ModelError> {
        let mut opts = RunOptions::from_config(cfg);
        if let Some(r) = self.router(cfg, what, style)? {
            opts = opts.with_router(r);
        }
        if let Some(g) = self.group_images {
            if g == 0 {
                return Err(ModelError::Config(format!(
                    "{} must be at least 1",
                    style.name("group-images")
                )));
            }
            opts.group_images = g;
        }
        Ok(opts)
    }
}

/// `k` is Token Choice's experts per token; elsewhere it is refused, not ignored (as `route`).
pub fn check_k_applies(kind: RouterKind, style: ArgStyle) -> Result<(), ModelError> {
    if kind.family() != RouterFamily::TokenChoice {
        return Err(ModelError::Config(format!(
            "{} does not apply to {} (Expert Choice and Soft MoE have no experts per token)",
            style.name("k"),
            kind.cli_name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny_config;

    #[test]
    fn a_what_if_keeps_the_trained_settings_of_the_checkpoints_own_router() {
        let mut cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
        if let Some(m) = cfg.moe.as_mut() {
            m.router.k = 2;
            m.router.capacity = CapacitySpec::Factor(1.25);
        }
        let own = WhatIf::default()
            .run_options(&cfg, "m", ArgStyle::Cli)
            .unwrap();
        assert_eq!(own, RunOptions::from_config(&cfg));
        let other = WhatIf {
            router: Some(RouterKind::SoftmaxExpertChoice),
            group_images: Some(2),
            ..Default::default()
        }
        .run_options(&cfg, "m", ArgStyle::Cli)
        .unwrap();
        assert_eq!(
            other.routers[0],
            RouterConfig::new(RouterKind::SoftmaxExpertChoice)
        );
        assert_eq!(other.group_images, 2);
        let k_on_ec = WhatIf {
            router: Some(RouterKind::SoftmaxExpertChoice),
            k: Some(2),
            ..Default::default()
        }
        .router(&cfg, "m", ArgStyle::Python)
        .unwrap_err();
        assert!(
            k_on_ec
                .to_string()
                .starts_with("k= does not apply to softmax-ec")
        );
        let zero = WhatIf {
            group_images: Some(0),
            ..Default::default()
        }
        .run_options(&cfg, "m", ArgStyle::Cli)
        .unwrap_err();
        assert!(
            zero.to_string()
                .contains("--group-images must be at least 1")
        );
        cfg.moe = None;
        let dense = WhatIf {
            k: Some(1),
            ..Default::default()
        }
        .router(&cfg, "dense.safetensors", ArgStyle::Cli)
        .unwrap_err();
        assert!(
            dense
                .to_string()
                .contains("dense.safetensors has no MoE layers")
        );
    }
}
