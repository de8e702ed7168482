//! The shedding decision: pure functions of (route class, threshold, band,
//! utilisation, a random roll). No I/O and no clock, so every case is a table row
//! in the tests below.
//!
//! Below a class's threshold nothing is shed; between threshold and threshold +
//! band the reject probability ramps linearly from 0 to 1, so the backend is not
//! flapped on and off at one exact ratio; above it everything of that class is shed.
//! Critical routes are never shed by ratio: at their threshold (1.0, the hard limit)
//! they queue briefly for a slot instead.

use crate::config::RouteClass;

/// What admission does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Admit,
    /// Answer 429 with Retry-After.
    Shed,
    /// Wait in the bounded critical queue for a slot.
    Queue,
}

/// Probability of rejecting a request at `utilisation` for a class whose threshold
/// is `threshold`: 0 below it, 1 at or above `threshold + band`, linear between.
pub fn reject_probability(utilisation: f64, threshold: f64, band: f64) -> f64 {
    if utilisation.is_nan() || utilisation < threshold {
        return 0.0;
    }
    if band <= 0.0 {
        return 1.0;
    }
    ((utilisation - threshold) / band).clamp(0.0, 1.0)
}

/// Decides one request. `roll` is uniform in [0, 1): the caller's random draw.
pub fn decide(
    class: RouteClass,
    threshold: f64,
    band: f64,
    utilisation: f64,
    roll: f64,
) -> Outcome {
    match class {
        RouteClass::Critical if utilisation >= threshold => Outcome::Queue,
        RouteClass::Critical => Outcome::Admit,
        _ if roll < reject_probability(utilisation, threshold, band) => Outcome::Shed,
        _ => Outcome::Admit,
    }
}

/// Seconds a shed client should wait: the time the backlog above the threshold
/// takes to drain at the measured completion rate, clamped to 1..=30 s.
pub fn retry_after_secs(backlog: f64, drain_per_sec: f64) -> u64 {
    if drain_per_sec.is_nan() || drain_per_sec <= 0.0 {
        return 30;
    }
    let secs = (backlog.max(0.0) / drain_per_sec).ceil();
    (secs as u64).clamp(1, 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RouteClass::*;

    #[test]
    fn decision_table() {
        // (class, threshold, band, utilisation, roll, expected)
        let cases = [
            (Sheddable, 0.70, 0.10, 0.00, 0.0, Outcome::Admit),
            (Sheddable, 0.70, 0.10, 0.69, 0.0, Outcome::Admit),
            (Sheddable, 0.70, 0.10, 0.70, 0.0, Outcome::Admit), // p = 0 exactly at threshold
            (Sheddable, 0.70, 0.10, 0.75, 0.49, Outcome::Shed), // p = 0.5
            (Sheddable, 0.70, 0.10, 0.75, 0.51, Outcome::Admit),
            (Sheddable, 0.70, 0.10, 0.80, 0.999, Outcome::Shed), // p = 1
            (Sheddable, 0.70, 0.10, 1.50, 0.999, Outcome::Shed),
            (Normal, 0.85, 0.10, 0.80, 0.0, Outcome::Admit),
            (Normal, 0.85, 0.10, 0.90, 0.49, Outcome::Shed),
            (Normal, 0.85, 0.10, 0.90, 0.51, Outcome::Admit),
            (Normal, 0.85, 0.10, 0.95, 0.999, Outcome::Shed),
            (Normal, 0.85, 0.00, 0.85, 0.999, Outcome::Shed), // no band: a step
            (Normal, 0.85, 0.00, 0.8499, 0.0, Outcome::Admit),
            (Critical, 1.00, 0.10, 0.99, 0.0, Outcome::Admit),
            (Critical, 1.00, 0.10, 1.00, 0.0, Outcome::Queue),
            (Critical, 1.00, 0.10, 3.00, 0.0, Outcome::Queue),
            (Sheddable, 0.70, 0.10, f64::NAN, 0.0, Outcome::Admit), // no signal is not overload
        ];
        for (class, threshold, band, utilisation, roll, expected) in cases {
            assert_eq!(
                decide(class, threshold, band, utilisation, roll),
                expected,
                "{class:?} t={threshold} b={band} u={utilisation} roll={roll}"
            );
        }
    }

    #[test]
    fn probability_ramps_linearly_across_the_band() {
        assert_eq!(reject_probability(0.70, 0.70, 0.10), 0.0);
        assert!((reject_probability(0.72, 0.70, 0.10) - 0.2).abs() < 1e-9);
        assert!((reject_probability(0.79, 0.70, 0.10) - 0.9).abs() < 1e-9);
        assert_eq!(reject_probability(0.80, 0.70, 0.10), 1.0);
    }

    #[test]
    fn retry_after_is_clamped() {
        assert_eq!(retry_after_secs(0.0, 400.0), 1);
        assert_eq!(retry_after_secs(100.0, 400.0), 1);
        assert_eq!(retry_after_secs(1000.0, 400.0), 3);
        assert_eq!(retry_after_secs(1e9, 1.0), 30);
        assert_eq!(retry_after_secs(5.0, 0.0), 30);
        assert_eq!(retry_after_secs(5.0, f64::NAN), 30);
    }
}
