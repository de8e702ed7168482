//! The utilisation signal in force: `max(local, reported)`, and the rules that
//! decide when a backend's report counts (fresh, `max > 0`, `0 <= busy <= max`).
//!
//! Pure except for [`ReportedSignal`], the shared holder the poller writes and the
//! admission decision reads. No I/O here: fetching is `poller.rs`, parsing `actuator.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use super::poller::PollError;

/// Where the utilisation in force comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This proxy's own in-flight count / `max_workers`.
    Local,
    /// The backend's own busy / max, from its actuator.
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

/// One good poll of the backend's actuator.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub busy: f64,
    pub max: f64,
    /// When the poll that produced it started.
    pub at: Instant,
}

impl Report {
    /// `busy / max`; meaningful only for a report that passed [`validate`].
    pub fn ratio(&self) -> f64 {
        self.busy / self.max
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

/// The utilisation in force and its source: `max(local, reported)` when the report
/// counts, `local` alone otherwise.
///
/// `local` is already a ratio (inflight / max_workers). A report counts when it is
/// younger than `stale_after` (3 poll intervals) and passes [`validate`]. A missing
/// or broken report never reads as "overloaded": the local signal decides alone.
/// On a tie the source is `Local`.
pub fn in_force(
    local: f64,
    report: Option<&Report>,
    now: Instant,
    stale_after: Duration,
) -> (f64, Source) {
    let counted = report.filter(|r| {
        now.saturating_duration_since(r.at) < stale_after && validate(r.busy, r.max).is_ok()
    });
    match counted {
        Some(report) if report.ratio() > local => (report.ratio(), Source::Reported),
        _ => (local, Source::Local),
    }
}

/// The latest good report of one backend plus poll counters for `/status`.
///
/// Written by that backend's poller, read on every admission decision: reading the
/// report is a lock-free load.
#[derive(Debug, Default)]
pub struct ReportedSignal {
    latest: ArcSwapOption<Report>,
    good_polls: AtomicU64,
    failed_polls: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReportedSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last good report, even if stale ([`in_force`] decides whether it counts).
    pub fn latest(&self) -> Option<Report> {
        self.latest.load().as_deref().copied()
    }

    /// Stores a good (validated) report and clears the last error.
    pub fn record_ok(&self, report: Report) {
        self.latest.store(Some(Arc::new(report)));
        self.good_polls.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Counts a failed poll. The last good report is kept: staleness retires it.
    pub fn record_error(&self, error: &PollError) {
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

    /// [`in_force`] with this backend's latest report.
    pub fn in_force(&self, local: f64, now: Instant, stale_after: Duration) -> (f64, Source) {
        in_force(local, self.latest().as_ref(), now, stale_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);
    const STALE: Duration = Duration::from_millis(1500);

    fn report(busy: f64, max: f64, at: Instant) -> Report {
        Report { busy, max, at }
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
    fn in_force_table() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let fresh = now - INTERVAL;
        let cases: [(&str, f64, Option<Report>, f64, Source); 11] = [
            ("no report yet", 0.3, None, 0.3, Source::Local),
            ("no report, idle", 0.0, None, 0.0, Source::Local),
            (
                "fresh, higher",
                0.1,
                Some(report(180.0, 200.0, fresh)),
                0.9,
                Source::Reported,
            ),
            (
                "fresh, lower",
                0.5,
                Some(report(20.0, 200.0, fresh)),
                0.5,
                Source::Local,
            ),
            (
                "fresh, equal",
                0.5,
                Some(report(100.0, 200.0, fresh)),
                0.5,
                Source::Local,
            ),
            (
                "polled just now",
                0.0,
                Some(report(200.0, 200.0, now)),
                1.0,
                Source::Reported,
            ),
            (
                "just under 3 intervals",
                0.1,
                Some(report(180.0, 200.0, now - STALE + Duration::from_millis(1))),
                0.9,
                Source::Reported,
            ),
            (
                "exactly 3 intervals",
                0.1,
                Some(report(180.0, 200.0, now - STALE)),
                0.1,
                Source::Local,
            ),
            (
                "long stale",
                0.1,
                Some(report(200.0, 200.0, t0)),
                0.1,
                Source::Local,
            ),
            (
                "max is -1",
                0.2,
                Some(report(0.0, -1.0, fresh)),
                0.2,
                Source::Local,
            ),
            (
                "busy > max",
                0.2,
                Some(report(300.0, 200.0, fresh)),
                0.2,
                Source::Local,
            ),
        ];
        for (name, local, report, want, source) in cases {
            let got = in_force(local, report.as_ref(), now, STALE);
            assert_eq!(got, (want, source), "{name}");
        }
    }

    #[test]
    fn in_force_with_a_report_from_the_future_counts_as_fresh() {
        // `at` after `now` (clock read order between threads) must not panic or go stale.
        let now = Instant::now();
        let ahead = report(150.0, 200.0, now + Duration::from_millis(5));
        assert_eq!(
            in_force(0.0, Some(&ahead), now, STALE),
            (0.75, Source::Reported)
        );
    }

    #[test]
    fn nan_report_never_counts() {
        let now = Instant::now();
        let nan = report(f64::NAN, 200.0, now);
        assert_eq!(in_force(0.4, Some(&nan), now, STALE), (0.4, Source::Local));
    }

    #[test]
    fn reported_signal_keeps_the_last_good_report_across_errors() {
        let signal = ReportedSignal::new();
        assert!(signal.latest().is_none());
        assert_eq!((signal.good_polls(), signal.failed_polls()), (0, 0));
        assert_eq!(signal.last_error(), None);

        let at = Instant::now();
        signal.record_ok(report(10.0, 100.0, at));
        signal.record_error(&PollError::Status(503));
        let latest = signal.latest().expect("kept after an error");
        assert_eq!((latest.busy, latest.max, latest.at), (10.0, 100.0, at));
        assert_eq!((signal.good_polls(), signal.failed_polls()), (1, 1));
        assert!(signal.last_error().unwrap().contains("503"));

        // Staleness, not the error, retires the report.
        assert_eq!(signal.in_force(0.0, at, STALE), (0.1, Source::Reported));
        assert_eq!(
            signal.in_force(0.0, at + STALE, STALE),
            (0.0, Source::Local)
        );

        signal.record_ok(report(20.0, 100.0, at));
        assert_eq!(signal.last_error(), None);
        assert_eq!(signal.good_polls(), 2);
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
