//! The step-time target (`--max-step-ms`): what the operator asked for, and the
//! scheduler caps it becomes for one worker group ([`StepTarget::resolve`]), from the
//! group's measured step cost model ([`scheduler::StepCost`]): a number is a cap on
//! the step's predicted time (`SchedulerConfig::max_step_ms`); `auto` is a prefill
//! allowance per step (`SchedulerConfig::max_prefill_ms`,
//! [`scheduler::StepCost::auto_prefill_ms`]: the time of a 512-token chunk, at least 10
//! × the step's fixed cost), so a step
//! is its decodes plus at most that much prefill.
//!
//! Invariant: a target is resolved again at every group (re-)initialization, from
//! that group's coefficients; a group that reports no cost (all zeros: the null
//! backend, or workers too old to measure) gets no cap under `auto`, never a cap of
//! zero. Costs: O(1).

use std::fmt;
use std::str::FromStr;

use scheduler::StepCost;

/// How long one engine step may be predicted to take.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum StepTarget {
    /// Each step's prefill chunks may take [`StepCost::auto_prefill_ms`] of the
    /// group's cost model (a 512-token chunk's time), on top of its decodes.
    #[default]
    Auto,
    /// No cap: prefill fills the step up to `max_num_batched_tokens`.
    Off,
    /// This many milliseconds (> 0, finite).
    Ms(f64),
}

/// What a [`StepTarget`] becomes for one group: the scheduler's two caps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepCaps {
    /// `SchedulerConfig::max_step_ms`.
    pub max_step_ms: Option<f64>,
    /// `SchedulerConfig::max_prefill_ms`.
    pub max_prefill_ms: Option<f64>,
}

impl StepTarget {
    /// The scheduler's caps for a group with cost model `cost`.
    pub fn resolve(self, cost: &StepCost) -> StepCaps {
        match self {
            Self::Off => StepCaps::default(),
            Self::Ms(ms) => StepCaps {
                max_step_ms: Some(ms),
                max_prefill_ms: None,
            },
            Self::Auto if *cost == StepCost::default() => StepCaps::default(),
            Self::Auto => StepCaps {
                max_step_ms: None,
                max_prefill_ms: Some(cost.auto_prefill_ms()),
            },
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
        let auto = StepTarget::Auto.resolve(&COST);
        // 512 tokens at 0.1 ms each, reading 512 positions at 0.001 ms: 51.712 ms,
        // below 10 × the 10 ms fixed cost.
        assert_eq!(auto.max_prefill_ms, Some(COST.auto_prefill_ms()));
        assert_eq!(auto.max_prefill_ms, Some(100.0));
        assert_eq!(auto.max_step_ms, None);
        let none = StepCaps::default();
        assert_eq!(StepTarget::Auto.resolve(&StepCost::default()), none);
        assert_eq!(StepTarget::Off.resolve(&COST), none);
        assert_eq!(
            StepTarget::Ms(5.0).resolve(&StepCost::default()),
            StepCaps {
                max_step_ms: Some(5.0),
                max_prefill_ms: None
            }
        );
    }
}
