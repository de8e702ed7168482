//! A cheap latency record per route: fixed log-spaced buckets of atomic counts, written
//! once per finished request with no lock, read once a second by the live view's
//! sampler, which takes the difference from the second before. Not a metric: the
//! Prometheus histogram (`loadgate_request_duration_seconds`) stays the one to scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets per doubling of the duration: each bucket is 2^(1/4) ≈ 1.19 times as wide as
/// the one before, so a percentile read from them is within 19% of the true value.
const PER_DOUBLING: f64 = 4.0;
/// The upper bound of the first bucket, in microseconds: everything at or below it.
const FIRST_US: f64 = 100.0;
/// Buckets in all: the last one ends at 100 µs × 2^19 ≈ 52 s and takes anything longer.
pub const BUCKETS: usize = 77;

/// Counts of finished requests by duration bucket, since the record was made.
#[derive(Debug)]
pub struct LatencyRecord {
    counts: [AtomicU64; BUCKETS],
}

impl Default for LatencyRecord {
    fn default() -> Self {
        LatencyRecord {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyRecord {
    /// Counts one finished request that took `elapsed`.
    pub fn record(&self, elapsed: Duration) {
        self.counts[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// The bucket of a duration.
fn bucket(elapsed: Duration) -> usize {
    let us = elapsed.as_secs_f64() * 1e6;
    if us <= FIRST_US {
        return 0;
    }
    let index = ((us / FIRST_US).log2() * PER_DOUBLING).ceil();
    (index as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in milliseconds.
fn upper_ms(i: usize) -> f64 {
    FIRST_US * (i as f64 / PER_DOUBLING).exp2() / 1000.0
}

/// The lower bound of bucket `i`, in milliseconds (0 for the first).
fn lower_ms(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        upper_ms(i - 1)
    }
}

/// Requests by bucket over some span (a second, a report's window): only the buckets
/// with requests, as `(bucket, count)` in bucket order, so a quiet second costs nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spread(Vec<(u8, u32)>);

impl Spread {
    /// What happened between two snapshots of one record. A bucket that went down (the
    /// record was replaced) counts from zero.
    pub fn between(before: &[u64; BUCKETS], now: &[u64; BUCKETS]) -> Spread {
        Spread(
            before
                .iter()
                .zip(now)
                .enumerate()
                .filter_map(|(i, (&b, &n))| {
                    let d = if n >= b { n - b } else { n };
                    (d > 0).then(|| (i as u8, d.min(u64::from(u32::MAX)) as u32))
                })
                .collect(),
        )
    }

    /// Adds another spread's counts to this one.
    pub fn add(&mut self, other: &Spread) {
        if other.0.is_empty() {
            return;
        }
        let mut dense = self.dense();
        for &(i, n) in &other.0 {
            dense[usize::from(i)] += u64::from(n);
        }
        *self = Spread(
            dense
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(i, &n)| (i as u8, n.min(u64::from(u32::MAX)) as u32))
                .collect(),
        );
    }

    fn dense(&self) -> [u64; BUCKETS] {
        let mut dense = [0u64; BUCKETS];
        for &(i, n) in &self.0 {
            dense[usize::from(i)] += u64::from(n);
        }
        dense
    }

    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|&(_, n)| u64::from(n)).sum()
    }

    /// The `q` quantile (0..=1) in milliseconds, interpolated within its bucket; `None`
    /// with no requests.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the request wanted, 1-based: the median of 3 is the 2nd.
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
        let mut below = 0.0;
        for &(i, n) in &self.0 {
            let n = f64::from(n);
            if below + n >= rank {
                let (lo, hi) = (lower_ms(usize::from(i)), upper_ms(usize::from(i)));
                let within = (rank - below) / n;
                return Some(lo + (hi - lo) * within);
            }
            below += n;
        }
        self.0.last().map(|&(i, _)| upper_ms(usize::from(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    #[test]
    fn buckets_cover_100_microseconds_to_a_minute_in_order() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(ms(0.1)), 0);
        assert_eq!(bucket(ms(0.2)), 4);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
        assert!(upper_ms(BUCKETS - 1) > 50_000.0);
        for d in [0.15, 1.0, 7.3, 120.0, 4000.0] {
            let i = bucket(ms(d));
            assert!(
                lower_ms(i) < d && d <= upper_ms(i) * 1.000_001,
                "{d} in {i}"
            );
        }
    }

    #[test]
    fn percentiles_are_within_a_bucket_of_the_truth() {
        let record = LatencyRecord::default();
        let before = record.snapshot();
        // 98 fast requests at 2 ms, 2 slow ones at 800 ms.
        for _ in 0..98 {
            record.record(ms(2.0));
        }
        record.record(ms(800.0));
        record.record(ms(800.0));
        let spread = Spread::between(&before, &record.snapshot());
        assert_eq!(spread.count(), 100);
        let p50 = spread.quantile_ms(0.5).unwrap();
        let p99 = spread.quantile_ms(0.99).unwrap();
        assert!((2.0 / 1.19..=2.0 * 1.19).contains(&p50), "p50 {p50}");
        assert!((800.0 / 1.19..=800.0 * 1.19).contains(&p99), "p99 {p99}");
        assert_eq!(Spread::default().quantile_ms(0.5), None);
    }

    #[test]
    fn a_second_is_the_difference_of_two_snapshots_and_spreads_add_up() {
        let record = LatencyRecord::default();
        record.record(ms(5.0));
        let first = record.snapshot();
        record.record(ms(5.0));
        record.record(ms(50.0));
        let second = Spread::between(&first, &record.snapshot());
        assert_eq!(second.count(), 2);
        // A record replaced by a new one (a counter that went down) counts from zero.
        let fresh = LatencyRecord::default();
        fresh.record(ms(5.0));
        assert_eq!(
            Spread::between(&record.snapshot(), &fresh.snapshot()).count(),
            1
        );

        let mut total = second.clone();
        total.add(&second);
        total.add(&Spread::default());
        assert_eq!(total.count(), 4);
        let p99 = total.quantile_ms(0.99).unwrap();
        assert!(p99 > 40.0 && p99 < 60.0, "{p99}");
    }
}
