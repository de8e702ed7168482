//! The utilisation signal: this proxy's own in-flight count, plus the load a
//! backend reports that this proxy cannot see (external load), over the pool.
//!
//! # The model
//!
//! ```text
//! utilisation = (own in-flight now + external load) / pool
//! ```
//!
//! - **Own in-flight** is exact and instant: this proxy counts every request it
//!   has in flight to the upstream (a guard released when the response body ends).
//! - **External load** is what a backend's report shows beyond that: traffic that
//!   bypasses this proxy, other loadgate instances, the poll itself. From each good
//!   report, `busy - own in-flight to that backend when the sample was taken - the
//!   poll's own worker (when the poll goes to the main connector)`, never below
//!   zero; smoothed across reports ([`SMOOTHING`]); and faded to zero as the report
//!   ages: full weight for one poll interval, then linearly to nothing at
//!   [`STALE_INTERVALS`] intervals.
//! - **Pool** is the backend's last reported max (a pool size does not go stale the
//!   way a busy count does), else the configured `max_workers`, summed over the
//!   backends in rotation.
//!
//! A report is evidence only of load the proxy cannot see. That is what keeps a
//! lagging report from shedding an idle pool: a report of 8/8 busy taken while this
//! proxy had 8 requests in flight says "no external load", and stays harmless after
//! the burst drains. Several instances in front of one backend agree without talking
//! to each other, because each sees the others' requests as external load.
//!
//! # Failure modes
//!
//! - No report yet, a broken actuator (404, `max = -1`, `busy > max`, a timeout):
//!   external load is zero and the pool is `max_workers` (or the last good report's
//!   max); the own count alone decides.
//! - A report that lags by a poll interval: external load changes that fast are seen
//!   late (by up to one interval plus smoothing). Own load is never late.
//! - The own count is read before and after the sample, and the larger is taken
//!   away, so requests that start or end during the poll never read as external
//!   load; external load is underestimated by at most the requests that ended
//!   during the poll.
//! - Requests of this proxy waiting in the backend's accept queue (not yet on a
//!   worker) make `busy - own` negative: clamped to zero, never read as idle
//!   capacity.
//!
//! Pure except for [`ReportedSignal`], the shared holder the poller writes and the
//! admission decision reads. No I/O here: fetching is `poller.rs`, parsing `actuator.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

/// Weight of the newest report's external load against the smoothed one before it.
pub const SMOOTHING: f64 = 0.5;
/// A report no longer counts at all once it is this many poll intervals old.
pub const STALE_INTERVALS: u32 = 3;

/// Where the utilisation in force comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This proxy's own in-flight count over `max_workers`: no report counts.
    Local,
    /// Own in-flight plus the external load and pool size of fresh backend reports.
    Reported,
    /// In-flight count / a concurrency limit learned from latency.
    Adaptive,
}

impl Source {
    /// Every source, e.g. to initialise one gauge per label value.
    pub const ALL: [Source; 3] = [Source::Local, Source::Reported, Source::Adaptive];

    /// The label value used in `/status` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Reported => "reported",
            Source::Adaptive => "adaptive",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One good poll of a backend's actuator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    pub busy: f64,
    pub max: f64,
    /// When the poll that produced it started.
    pub at: Instant,
    /// This proxy's own requests in flight to the backend while the sample was taken
    /// (the larger of the counts read before and after it).
    pub own: f64,
    /// Workers the poll itself holds while it is served: 1 on the main connector,
    /// 0 on a separate management port.
    pub poll_workers: f64,
}

impl Report {
    /// The busy workers this proxy did not put there, never below zero.
    pub fn external(&self) -> f64 {
        (self.busy - self.own - self.poll_workers).max(0.0)
    }
}

/// Checks that a busy/max pair can be used as a utilisation: both finite,
/// `max > 0`, `0 <= busy <= max`. The error says which figure is wrong and why.
pub fn validate(busy: f64, max: f64) -> Result<(), String> {
    if !busy.is_finite() {
        return Err(format!("busy is {busy}, not a finite number"));
    }
    if !max.is_finite() {
        return Err(format!("max is {max}, not a finite number"));
    }
    if max == -1.0 {
        return Err(
            "max is -1: Spring Boot 3.3.0 reports -1 for tomcat.threads.config.max \
             (its Tomcat executor is no longer linked to the MBean Micrometer reads; \
             spring-boot#40957, upgrade Spring Boot), and Tomcat reports -1 when virtual threads \
             are enabled (no fixed pool: use the adaptive signal)"
                .to_string(),
        );
    }
    if max <= 0.0 {
        return Err(format!(
            "max is {max}: a pool of at most {max} threads cannot be used as a denominator"
        ));
    }
    if busy < 0.0 {
        return Err(format!(
            "busy is {busy}: a negative count (Tomcat reports -1 when virtual threads are enabled)"
        ));
    }
    if busy > max {
        return Err(format!(
            "busy {busy} is above max {max}: the two figures describe different pools \
             (check the connector and the metric names)"
        ));
    }
    Ok(())
}

/// How much a report `age` old still counts: fully for one poll interval, then
/// linearly less, nothing from [`STALE_INTERVALS`] intervals on.
pub fn fade(age: Duration, interval: Duration) -> f64 {
    let interval = interval.as_secs_f64();
    if interval <= 0.0 {
        return 0.0;
    }
    let intervals = age.as_secs_f64() / interval;
    let last = f64::from(STALE_INTERVALS);
    if intervals <= 1.0 {
        1.0
    } else if intervals >= last {
        0.0
    } else {
        (last - intervals) / (last - 1.0)
    }
}

/// What one backend's reports say: the latest report and the external load
/// smoothed over the reports so far, as of that report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub report: Report,
    /// Smoothed external load, in workers, at `report.at`.
    pub external: f64,
}

impl Estimate {
    /// The estimate after `report`: its external load blended with the previous
    /// estimate's, which counts for less the older it is.
    pub fn next(previous: Option<&Estimate>, report: Report, interval: Duration) -> Estimate {
        let new = report.external();
        let external = match previous {
            Some(p) => {
                let weight = fade(report.at.saturating_duration_since(p.report.at), interval);
                let old = p.external * weight;
                // A stale previous estimate carries no information: take the new one whole.
                if weight > 0.0 {
                    SMOOTHING * new + (1.0 - SMOOTHING) * old
                } else {
                    new
                }
            }
            None => new,
        };
        Estimate { report, external }
    }

    /// How much this estimate counts at `now`, 0 when stale.
    pub fn weight(&self, now: Instant, interval: Duration) -> f64 {
        fade(now.saturating_duration_since(self.report.at), interval)
    }
}

/// The parts of an upstream's utilisation, in workers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Parts {
    /// This proxy's requests in flight now.
    pub own: f64,
    /// Load the backends report beyond this proxy's, faded by age.
    pub external: f64,
    /// Workers of the backends in rotation.
    pub pool: f64,
    /// Whether any fresh report counted (for pool size or external load).
    pub reported: bool,
}

impl Parts {
    /// `(own + external) / pool`.
    pub fn utilisation(&self) -> f64 {
        (self.own + self.external) / self.pool
    }

    /// The workers left for this proxy: `pool - external`, rounded, never below zero.
    pub fn room(&self) -> f64 {
        (self.pool - self.external).round().max(0.0)
    }
}

/// Combines the own in-flight count with each backend's estimate (`None` before its
/// first good poll) and whether it is in rotation. Backends out of rotation take no
/// traffic and add neither pool nor external load; with none in rotation, the pool
/// is one backend's `max_workers`, so the ratio stays meaningful.
pub fn combine(
    own: f64,
    max_workers: f64,
    backends: impl IntoIterator<Item = (Option<Estimate>, bool)>,
    now: Instant,
    interval: Duration,
) -> Parts {
    let mut parts = Parts {
        own,
        external: 0.0,
        pool: 0.0,
        reported: false,
    };
    for (estimate, in_rotation) in backends {
        if !in_rotation {
            continue;
        }
        match estimate {
            Some(e) => {
                // A pool size does not go stale the way a busy count does: the last
                // reported max stays the pool until a new report says otherwise.
                parts.pool += e.report.max;
                let weight = e.weight(now, interval);
                if weight > 0.0 {
                    parts.external += e.external * weight;
                    parts.reported = true;
                }
            }
            None => parts.pool += max_workers,
        }
    }
    if parts.pool <= 0.0 {
        parts.pool = max_workers.max(1.0);
    }
    parts
}

/// The latest estimate of one backend plus poll counters for `/status`.
///
/// Written by that backend's poller, read on every admission decision: reading the
/// estimate is a lock-free load.
#[derive(Debug)]
pub struct ReportedSignal {
    interval: Duration,
    latest: ArcSwapOption<Estimate>,
    good_polls: AtomicU64,
    failed_polls: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReportedSignal {
    /// A holder for reports taken every `interval`.
    pub fn new(interval: Duration) -> Self {
        ReportedSignal {
            interval,
            latest: ArcSwapOption::empty(),
            good_polls: AtomicU64::new(0),
            failed_polls: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// The poll interval the estimates fade by.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The last good report, even if stale.
    pub fn latest(&self) -> Option<Report> {
        self.estimate().map(|e| e.report)
    }

    /// The estimate after the last good report, even if stale ([`Estimate::weight`]
    /// says how much it still counts).
    pub fn estimate(&self) -> Option<Estimate> {
        self.latest.load().as_deref().copied()
    }

    /// Stores a good (validated) report and clears the last error.
    pub fn record_ok(&self, report: Report) {
        let next = Estimate::next(self.estimate().as_ref(), report, self.interval);
        self.latest.store(Some(Arc::new(next)));
        self.good_polls.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Counts a failed poll. The last good report is kept: its age fades it out.
    pub fn record_error(&self, error: &dyn std::fmt::Display) {
        self.failed_polls.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    pub fn good_polls(&self) -> u64 {
        self.good_polls.load(Ordering::Relaxed)
    }

    pub fn failed_polls(&self) -> u64 {
        self.failed_polls.load(Ordering::Relaxed)
    }

    /// The error of the latest poll when it failed; `None` once a poll succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The external load this backend carries at `now`, faded by age; 0 without a report.
    pub fn external_now(&self, now: Instant) -> f64 {
        self.estimate()
            .map_or(0.0, |e| e.external * e.weight(now, self.interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);
    const MS: Duration = Duration::from_millis(1);

    fn report(busy: f64, max: f64, own: f64, at: Instant) -> Report {
        Report {
            busy,
            max,
            at,
            own,
            poll_workers: 1.0,
        }
    }

    fn estimate(busy: f64, max: f64, own: f64, at: Instant) -> Estimate {
        Estimate::next(None, report(busy, max, own, at), INTERVAL)
    }

    #[test]
    fn validate_accepts_sensible_pairs() {
        for (busy, max) in [(0.0, 200.0), (3.0, 200.0), (200.0, 200.0), (0.0, 0.5)] {
            assert_eq!(validate(busy, max), Ok(()), "{busy}/{max}");
        }
    }

    #[test]
    fn validate_rejects_minus_one_max_with_its_cause() {
        let why = validate(0.0, -1.0).unwrap_err();
        assert!(why.starts_with("max is -1: Spring Boot 3.3"), "{why}");
        assert!(why.contains("virtual threads"), "{why}");
    }

    #[test]
    fn validate_rejects_zero_max_busy_above_max_negative_and_nan() {
        let cases = [
            (0.0, 0.0, "max is 0"),
            (1.0, -5.0, "max is -5"),
            (201.0, 200.0, "busy 201 is above max 200"),
            (-1.0, 200.0, "busy is -1: a negative count"),
            (f64::NAN, 200.0, "busy is NaN"),
            (3.0, f64::NAN, "max is NaN"),
            (3.0, f64::INFINITY, "max is inf"),
        ];
        for (busy, max, start) in cases {
            let why = validate(busy, max).unwrap_err();
            assert!(why.starts_with(start), "{busy}/{max}: {why}");
        }
    }

    #[test]
    fn external_load_is_busy_less_own_and_the_poll_never_below_zero() {
        let at = Instant::now();
        // (busy, own, poll workers, external)
        let cases = [
            (8.0, 7.0, 1.0, 0.0), // the pool full of this proxy's requests, and the poll
            (8.0, 8.0, 1.0, 0.0), // own request in the accept queue: clamped
            (1.0, 0.0, 1.0, 0.0), // an idle Tomcat counts the poll's own thread
            (6.0, 1.0, 1.0, 4.0), // four workers busy with traffic that bypasses the proxy
            (6.0, 1.0, 0.0, 5.0), // the same on a management port
            (0.0, 3.0, 0.0, 0.0),
        ];
        for (busy, own, poll_workers, want) in cases {
            let r = Report {
                busy,
                max: 8.0,
                at,
                own,
                poll_workers,
            };
            assert_eq!(
                r.external(),
                want,
                "busy {busy} own {own} poll {poll_workers}"
            );
        }
    }

    #[test]
    fn fade_table() {
        let cases = [
            (0, 1.0),
            (500, 1.0),
            (750, 0.75),
            (1000, 0.5),
            (1250, 0.25),
            (1500, 0.0),
            (60_000, 0.0),
        ];
        for (ms, want) in cases {
            let got = fade(Duration::from_millis(ms), INTERVAL);
            assert!((got - want).abs() < 1e-9, "{ms} ms: {got}, want {want}");
        }
        assert_eq!(fade(Duration::ZERO, Duration::ZERO), 0.0);
    }

    #[test]
    fn smoothing_blends_with_a_fresh_previous_estimate_only() {
        let t0 = Instant::now();
        let first = estimate(5.0, 8.0, 0.0, t0); // external 4
        assert_eq!(first.external, 4.0);
        let second = Estimate::next(Some(&first), report(1.0, 8.0, 0.0, t0 + INTERVAL), INTERVAL);
        assert_eq!(second.external, 0.5 * 0.0 + 0.5 * 4.0);
        // Half faded: the previous estimate counts for half of its value.
        let later = Estimate::next(
            Some(&first),
            report(1.0, 8.0, 0.0, t0 + INTERVAL * 2),
            INTERVAL,
        );
        assert_eq!(later.external, 0.5 * (4.0 * 0.5));
        // Stale: the new report is taken whole.
        let stale = Estimate::next(
            Some(&first),
            report(3.0, 8.0, 0.0, t0 + INTERVAL * 3),
            INTERVAL,
        );
        assert_eq!(stale.external, 2.0);
    }

    /// (name, own, backends, own + external, pool, reported)
    type CombineCase = (
        &'static str,
        f64,
        Vec<(Option<Estimate>, bool)>,
        f64,
        f64,
        bool,
    );

    #[test]
    fn combine_table() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let fresh = now - INTERVAL;
        let cases: Vec<CombineCase> = vec![
            ("no report yet", 3.0, vec![(None, true)], 3.0, 10.0, false),
            (
                "a burst's report: all busy were ours",
                0.0,
                vec![(Some(estimate(8.0, 8.0, 7.0, fresh)), true)],
                0.0,
                8.0,
                true,
            ),
            (
                "bypass traffic holds six",
                1.0,
                vec![(Some(estimate(8.0, 8.0, 1.0, fresh)), true)],
                1.0 + 6.0,
                8.0,
                true,
            ),
            (
                "half faded",
                0.0,
                vec![(Some(estimate(5.0, 8.0, 0.0, now - INTERVAL * 2)), true)],
                2.0,
                8.0,
                true,
            ),
            (
                "stale: no external load, the last reported pool",
                2.0,
                vec![(Some(estimate(8.0, 8.0, 0.0, now - INTERVAL * 3)), true)],
                2.0,
                8.0,
                false,
            ),
            (
                "out of rotation adds nothing",
                2.0,
                vec![
                    (Some(estimate(8.0, 8.0, 0.0, fresh)), false),
                    (Some(estimate(3.0, 8.0, 0.0, fresh)), true),
                ],
                4.0,
                8.0,
                true,
            ),
            (
                "two backends: one reported, one not",
                4.0,
                vec![(Some(estimate(3.0, 8.0, 0.0, fresh)), true), (None, true)],
                6.0,
                18.0,
                true,
            ),
            (
                "none in rotation",
                1.0,
                vec![(None, false)],
                1.0,
                10.0,
                false,
            ),
            (
                "from the future counts as fresh",
                0.0,
                vec![(Some(estimate(5.0, 8.0, 0.0, now + MS * 5)), true)],
                4.0,
                8.0,
                true,
            ),
        ];
        for (name, own, backends, load, pool, reported) in cases {
            let parts = combine(own, 10.0, backends, now, INTERVAL);
            assert!(
                (parts.own + parts.external - load).abs() < 1e-9,
                "{name}: {parts:?}"
            );
            assert_eq!((parts.pool, parts.reported), (pool, reported), "{name}");
        }
    }

    #[test]
    fn a_lagging_report_of_a_full_pool_never_sheds_an_idle_one() {
        // The report was taken while a burst of this proxy's own requests held the
        // pool; by the time it is read, the burst has drained.
        let t0 = Instant::now();
        let during_burst = estimate(8.0, 8.0, 8.0, t0);
        let parts = combine(
            0.0,
            8.0,
            [(Some(during_burst), true)],
            t0 + MS * 400,
            INTERVAL,
        );
        assert_eq!(parts.utilisation(), 0.0);
        assert_eq!(parts.room(), 8.0);
    }

    #[test]
    fn room_is_what_external_load_leaves() {
        let parts = |external| Parts {
            own: 0.0,
            external,
            pool: 8.0,
            reported: true,
        };
        assert_eq!(parts(0.0).room(), 8.0);
        assert_eq!(parts(0.4).room(), 8.0);
        assert_eq!(parts(6.0).room(), 2.0);
        assert_eq!(parts(9.0).room(), 0.0);
    }

    #[test]
    fn reported_signal_keeps_the_last_good_report_across_errors() {
        let signal = ReportedSignal::new(INTERVAL);
        assert!(signal.latest().is_none());
        assert_eq!((signal.good_polls(), signal.failed_polls()), (0, 0));
        assert_eq!(signal.last_error(), None);

        let at = Instant::now();
        signal.record_ok(report(3.0, 8.0, 0.0, at));
        signal.record_error(&"the actuator answered 503 Service Unavailable");
        let latest = signal.latest().expect("kept after an error");
        assert_eq!((latest.busy, latest.max, latest.at), (3.0, 8.0, at));
        assert_eq!((signal.good_polls(), signal.failed_polls()), (1, 1));
        assert!(signal.last_error().unwrap().contains("503"));

        // Age, not the error, retires the report.
        assert_eq!(signal.external_now(at), 2.0);
        assert_eq!(signal.external_now(at + INTERVAL * 3), 0.0);

        signal.record_ok(report(1.0, 8.0, 0.0, at + INTERVAL));
        assert_eq!(signal.last_error(), None);
        assert_eq!(signal.good_polls(), 2);
        assert_eq!(signal.external_now(at + INTERVAL), 1.0);
    }

    #[test]
    fn reported_signal_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ReportedSignal>();
    }

    #[test]
    fn source_labels() {
        let labels: Vec<_> = Source::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(labels, ["local", "reported", "adaptive"]);
    }
}
