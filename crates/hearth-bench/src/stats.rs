//! Summaries of a set of measurements: p50 (the median), p99, max and n.
//!
//! Percentiles use the nearest-rank method: the p-th percentile of n sorted
//! values is the value at rank ⌈p/100 · n⌉ (1-based). It is always one of
//! the measured values, never an interpolation; with fewer than 100 values
//! p99 is the max.

use serde::Serialize;
use std::time::Duration;

/// The p-th percentile (0 < p ≤ 100) of `sorted` (ascending), by nearest
/// rank; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50, p99 and max of a sample, in its own unit (milliseconds or MiB).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub min: f64,
}

impl Summary {
    /// The summary of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            n: sorted.len(),
            p50: percentile(&sorted, 50.0)?,
            p99: percentile(&sorted, 99.0)?,
            max: *sorted.last()?,
            min: *sorted.first()?,
        })
    }

    /// The summary of durations, in milliseconds.
    pub fn of_durations(values: &[Duration]) -> Option<Summary> {
        Summary::of(&values.iter().map(|d| millis(*d)).collect::<Vec<_>>())
    }
}

/// A duration in (fractional) milliseconds.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 50.0), Some(50.0));
        assert_eq!(percentile(&hundred, 99.0), Some(99.0));
        assert_eq!(percentile(&hundred, 100.0), Some(100.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        // Fewer than 100 values: p99 is the max.
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_and_skips_non_finite_values() {
        let s = Summary::of(&[5.0, 1.0, f64::NAN, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                n: 5,
                p50: 3.0,
                p99: 5.0,
                max: 5.0,
                min: 1.0
            }
        );
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn durations_are_summarized_in_milliseconds() {
        let d = [Duration::from_micros(1500), Duration::from_millis(3)];
        let s = Summary::of_durations(&d).unwrap();
        assert_eq!((s.p50, s.max), (1.5, 3.0));
    }
}
