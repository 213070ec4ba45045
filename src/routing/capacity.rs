//! Expert capacity (slots per expert per group), exactly as vmoe's `compute_capacity`.
//!
//! Spec §1.3: `x = N·CF/e` in f64, then ceil or round-half-to-even, an error below 1, then
//! padding up to a multiple of `multiple_of`. Who passes which `N` is the router's business.

use std::fmt;
use std::str::FromStr;

use super::RoutingError;

/// How `N·CF/e` becomes an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapacityRounding {
    /// `ceil` (vmoe's default).
    Ceil,
    /// Python's `round()`: half to even (Soft MoE, and the Soft-MoE paper's EC baseline).
    Round,
}

impl fmt::Display for CapacityRounding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ceil => "ceil",
            Self::Round => "round",
        })
    }
}

impl FromStr for CapacityRounding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ceil" => Ok(Self::Ceil),
            "round" => Ok(Self::Round),
            other => Err(format!(
                "unknown capacity rounding `{other}` (expected ceil or round)"
            )),
        }
    }
}

/// Slots per expert for `num_tokens` requests spread over `num_experts` experts.
///
/// `num_tokens` is `n·k` for Token Choice and `n` for Expert Choice and Soft MoE.
/// `multiple_of == 0` means no padding, as in vmoe.
pub fn compute_capacity(
    num_tokens: usize,
    num_experts: usize,
    capacity_factor: f64,
    rounding: CapacityRounding,
    multiple_of: usize,
) -> Result<usize, RoutingError> {
    if num_experts == 0 {
        return Err(RoutingError::InvalidConfig(
            "number of experts must be at least 1".into(),
        ));
    }
    if !capacity_factor.is_finite() || capacity_factor <= 0.0 {
        return Err(RoutingError::InvalidConfig(format!(
            "capacity factor must be a positive finite number, got {capacity_factor}"
        )));
    }
    // Same evaluation order as Python's `num_tokens * capacity_factor / num_experts`.
    let x = num_tokens as f64 * capacity_factor / num_experts as f64;
    let c = match rounding {
        CapacityRounding::Ceil => x.ceil(),
        CapacityRounding::Round => x.round_ties_even(),
    };
    if c < 1.0 {
        return Err(RoutingError::Capacity(format!(
            "capacity {c} < 1 for {num_tokens} tokens, {num_experts} experts and capacity factor \
             {capacity_factor} ({rounding}); raise the capacity factor"
        )));
    }
    if c > u32::MAX as f64 {
        return Err(RoutingError::Capacity(format!(
            "capacity {c:e} is too large (at most {} slots per expert; capacity factor \
             {capacity_factor:e})",
            u32::MAX
        )));
    }
    let mut c = c as usize;
    if multiple_of > 0 {
        // Overflow-safe padding, capped at what the group can fill: no expert ever gets more
        // than `num_tokens` requests, so slots beyond that would stay empty (and a hostile
        // `multiple_of` near 2^64 would otherwise wrap or allocate terabytes).
        let padded = c.div_ceil(multiple_of).saturating_mul(multiple_of);
        c = padded.min(num_tokens.max(c));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::CapacityRounding::{Ceil, Round};
    use super::*;

    /// A padding near 2^64 neither wraps nor asks for more slots than the group has tokens.
    #[test]
    fn huge_paddings_are_capped_at_the_group() {
        assert_eq!(compute_capacity(196, 32, 1.0, Ceil, 1 << 62).unwrap(), 196);
        assert_eq!(
            compute_capacity(196, 32, 1.0, Ceil, usize::MAX).unwrap(),
            196
        );
        assert_eq!(compute_capacity(50, 8, 1.0, Ceil, 4).unwrap(), 8);
    }

    #[test]
    fn worked_values_of_the_spec() {
        assert_eq!(compute_capacity(196, 32, 1.0, Round, 1).unwrap(), 6);
        assert_eq!(compute_capacity(196, 32, 1.0, Ceil, 4).unwrap(), 8);
        assert_eq!(compute_capacity(1576 * 2, 8, 1.05, Ceil, 4).unwrap(), 416);
        assert_eq!(compute_capacity(196, 8, 1.0, Round, 1).unwrap(), 24);
        assert_eq!(compute_capacity(200, 16, 1.0, Round, 1).unwrap(), 12);
        assert_eq!(compute_capacity(256, 32, 1.25, Round, 1).unwrap(), 10);
        // vmoe's own test: 32 tokens, 32 experts, k = 2, CF = 1.
        assert_eq!(compute_capacity(64, 32, 1.0, Ceil, 4).unwrap(), 4);
        assert_eq!(compute_capacity(8, 4, 1.0, Ceil, 1).unwrap(), 2);
        assert_eq!(compute_capacity(16, 4, 1.0, Ceil, 1).unwrap(), 4);
    }

    #[test]
    fn half_rounds_to_even_not_away_from_zero() {
        // 2.5 -> 2 and 3.5 -> 4, unlike f64::round.
        assert_eq!(compute_capacity(5, 2, 1.0, Round, 1).unwrap(), 2);
        assert_eq!(compute_capacity(7, 2, 1.0, Round, 1).unwrap(), 4);
    }

    #[test]
    fn multiple_of_zero_means_no_padding() {
        assert_eq!(compute_capacity(9, 4, 1.0, Ceil, 0).unwrap(), 3);
        assert_eq!(compute_capacity(9, 4, 1.0, Ceil, 4).unwrap(), 4);
    }

    #[test]
    fn capacity_below_one_is_an_error() {
        assert!(matches!(
            compute_capacity(4, 32, 1.0, Round, 1),
            Err(RoutingError::Capacity(_))
        ));
        // ceil never gives 0 for positive inputs.
        assert_eq!(compute_capacity(4, 32, 1.0, Ceil, 1).unwrap(), 1);
        assert!(compute_capacity(0, 4, 1.0, Ceil, 4).is_err());
    }

    #[test]
    fn bad_factors_are_errors() {
        for cf in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(compute_capacity(8, 4, cf, Ceil, 4).is_err(), "cf {cf}");
        }
        assert!(compute_capacity(8, 0, 1.0, Ceil, 4).is_err());
    }
}
