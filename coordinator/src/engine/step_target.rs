//! The step-time target (`--max-step-ms`): what the operator asked for, and the
//! `SchedulerConfig::max_step_ms` it becomes for one worker group, from the group's
//! measured step cost model ([`scheduler::StepCost`]).
//!
//! Invariant: a target is resolved again at every group (re-)initialization, from
//! that group's coefficients; a group that reports no cost (all zeros: the null
//! backend, or workers too old to measure) gets no cap under `auto`, never a cap of
//! zero. Costs: O(1).

use std::fmt;
use std::str::FromStr;

use scheduler::StepCost;

/// `auto` assumes decodes read this fraction of the model's context (as
/// [`StepCost::auto_max_step_ms`] suggests: `max_model_len / 4`).
pub const AUTO_CONTEXT_DIVISOR: usize = 4;

/// How long one engine step may be predicted to take.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum StepTarget {
    /// [`StepCost::auto_max_step_ms`] of the group's cost model at `max_num_seqs`
    /// decodes of `max_model_len / AUTO_CONTEXT_DIVISOR` tokens of context.
    #[default]
    Auto,
    /// No cap: prefill fills the step up to `max_num_batched_tokens`.
    Off,
    /// This many milliseconds (> 0, finite).
    Ms(f64),
}

impl StepTarget {
    /// `SchedulerConfig::max_step_ms` for a group with cost model `cost`.
    pub fn resolve(
        self,
        cost: &StepCost,
        max_num_seqs: usize,
        max_model_len: usize,
    ) -> Option<f64> {
        match self {
            Self::Off => None,
            Self::Ms(ms) => Some(ms),
            Self::Auto if *cost == StepCost::default() => None,
            Self::Auto => {
                Some(cost.auto_max_step_ms(max_num_seqs, max_model_len / AUTO_CONTEXT_DIVISOR))
            }
        }
    }
}

/// Why a `--max-step-ms` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a step-time target: give auto, off (or none), or a positive number of milliseconds such as 50")]
pub struct BadStepTarget(String);

impl FromStr for StepTarget {
    type Err = BadStepTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "off" | "none" => Ok(Self::Off),
            v => match v.parse::<f64>() {
                Ok(ms) if ms.is_finite() && ms > 0.0 => Ok(Self::Ms(ms)),
                _ => Err(BadStepTarget(s.to_string())),
            },
        }
    }
}

impl fmt::Display for StepTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Off => f.write_str("off"),
            Self::Ms(ms) => write!(f, "{ms}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COST: StepCost = StepCost {
        fixed_ms: 10.0,
        per_token_ms: 0.1,
        per_context_token_ms: 0.001,
    };

    #[test]
    fn targets_parse_from_the_flag_and_bad_values_are_named() {
        assert_eq!("auto".parse(), Ok(StepTarget::Auto));
        assert_eq!("OFF".parse(), Ok(StepTarget::Off));
        assert_eq!("none".parse(), Ok(StepTarget::Off));
        assert_eq!("5".parse(), Ok(StepTarget::Ms(5.0)));
        assert_eq!("12.5".parse(), Ok(StepTarget::Ms(12.5)));
        for bad in ["-1", "0", "abc", "inf", "NaN", ""] {
            let e = bad.parse::<StepTarget>().unwrap_err();
            assert!(
                e.to_string().contains("positive number of milliseconds"),
                "{e}"
            );
        }
    }

    #[test]
    fn auto_follows_the_groups_cost_and_a_zero_cost_means_no_cap() {
        let auto = StepTarget::Auto.resolve(&COST, 256, 32768).unwrap();
        assert_eq!(auto, COST.auto_max_step_ms(256, 8192));
        assert_eq!(
            StepTarget::Auto.resolve(&StepCost::default(), 256, 32768),
            None
        );
        assert_eq!(StepTarget::Off.resolve(&COST, 256, 32768), None);
        assert_eq!(
            StepTarget::Ms(5.0).resolve(&StepCost::default(), 1, 2),
            Some(5.0)
        );
    }
}
