//! Admission: whether a request goes to its upstream now, waits briefly for a slot
//! (critical routes at the hard limit), or is shed with 429.
//!
//! The pieces: `signal.rs` (which utilisation is in force), `actuator.rs` +
//! `poller.rs` (the backend's own busy/max), `adaptive.rs` (a limit learned from
//! latency), `decision.rs` (the pure decision). This file holds the per-upstream
//! state that ties them together and is the only part with side effects.

pub mod actuator;
pub mod adaptive;
pub mod decision;
pub mod poller;
pub mod signal;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{RouteClass, ShedMode, UpstreamConfig};
use crate::metrics as m;
use adaptive::AdaptiveLimit;
use decision::Outcome;
use signal::{Report, ReportedSignal, Source};

/// The utilisation of an upstream as one decision saw it.
#[derive(Debug, Clone, Copy)]
pub struct Signal {
    /// The ratio in force: `max(local, reported)`.
    pub utilisation: f64,
    pub source: Source,
    /// In-flight ÷ capacity (or ÷ the learned limit when adaptive).
    pub local: f64,
    /// The backends' own busy ÷ max, when a fresh valid report exists.
    pub reported: Option<f64>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone)]
pub enum Rejection {
    /// Shed by ratio: 429.
    Shed {
        class: RouteClass,
        signal: Signal,
        /// The threshold the request's class was shed above.
        threshold: f64,
        retry_after: u64,
    },
    /// A critical request found the queue full, or waited too long: 503.
    QueueFull {
        signal: Signal,
        retry_after: u64,
    },
    QueueTimeout {
        signal: Signal,
        retry_after: u64,
    },
}

/// How admission reads and reserves an upstream's in-flight slots.
pub trait Slots {
    /// Held while the request is in flight; dropping it frees the slot.
    type Reservation;
    fn inflight(&self) -> usize;
    fn backends_in_rotation(&self) -> usize;
    /// Counts one more request in flight, unless that would pass `limit`.
    fn try_reserve(&self, limit: Option<usize>) -> Option<Self::Reservation>;
}

/// Per-route admission counters, shown in `/status`.
#[derive(Debug, Default)]
pub struct RouteCounters {
    pub admitted: AtomicU64,
    pub shed: AtomicU64,
    pub would_shed: AtomicU64,
    pub queued: AtomicU64,
    pub queue_rejected: AtomicU64,
}

/// The admission state of one upstream.
pub struct Admission {
    upstream: String,
    config: crate::config::SheddingConfig,
    max_workers: f64,
    /// One report holder per backend, written by that backend's poller.
    reports: Vec<Arc<ReportedSignal>>,
    stale_after: Duration,
    adaptive: Option<Mutex<AdaptiveLimit>>,
    drain: DrainMeter,
    queued: AtomicUsize,
    slot_freed: Notify,
    /// For logging transitions once: currently shedding (or would be, in shadow mode).
    shedding: AtomicBool,
    gauges: SignalGauges,
}

impl Admission {
    pub fn new(config: &UpstreamConfig) -> Admission {
        Admission {
            upstream: config.name.clone(),
            config: config.shedding.clone(),
            max_workers: f64::from(config.max_workers),
            reports: config
                .backends
                .iter()
                .map(|_| Arc::new(ReportedSignal::new()))
                .collect(),
            stale_after: config.actuator.interval * 3,
            adaptive: config
                .adaptive
                .clone()
                .map(|s| Mutex::new(AdaptiveLimit::new(s, Instant::now()))),
            drain: DrainMeter::default(),
            queued: AtomicUsize::new(0),
            slot_freed: Notify::new(),
            shedding: AtomicBool::new(false),
            gauges: SignalGauges::new(&config.name),
        }
    }

    pub fn mode(&self) -> ShedMode {
        self.config.mode
    }

    /// The report holder of backend `i`, for its poller.
    pub fn report_holder(&self, i: usize) -> Arc<ReportedSignal> {
        self.reports[i].clone()
    }

    pub fn reports(&self) -> &[Arc<ReportedSignal>] {
        &self.reports
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The learned limit, when adaptive.
    pub fn adaptive_limit(&self) -> Option<f64> {
        self.adaptive
            .as_ref()
            .map(|a| a.lock().unwrap_or_else(|e| e.into_inner()).limit())
    }

    /// How many requests the upstream can serve at once: the pool size times the
    /// backends in rotation, or the learned limit.
    fn capacity(&self, backends_in_rotation: usize) -> f64 {
        match self.adaptive_limit() {
            Some(limit) => limit,
            None => self.max_workers * backends_in_rotation.max(1) as f64,
        }
    }

    /// The utilisation in force for `inflight` requests. Reports count only when fresh
    /// and valid; several backends' reports are summed (busy and max alike).
    pub fn signal(&self, inflight: usize, backends_in_rotation: usize) -> Signal {
        let now = Instant::now();
        let local = inflight as f64 / self.capacity(backends_in_rotation);
        let reported = self.aggregate_report(now);
        let (utilisation, source) =
            signal::in_force(local, reported.as_ref(), now, self.stale_after);
        let source = match (source, &self.adaptive) {
            (Source::Local, Some(_)) => Source::Adaptive,
            (source, _) => source,
        };
        Signal {
            utilisation,
            source,
            local,
            reported: reported.map(|r| r.ratio()),
        }
    }

    /// Sets the utilisation and signal-source gauges to the signal now. Called when
    /// metrics are scraped rather than per decision: seven gauge writes per request,
    /// on cache lines every worker thread shares, cost more than the decision itself.
    pub fn publish_gauges(&self, inflight: usize, backends_in_rotation: usize) {
        self.gauges
            .set(&self.signal(inflight, backends_in_rotation));
    }

    fn aggregate_report(&self, now: Instant) -> Option<Report> {
        let mut total: Option<Report> = None;
        for report in self.reports.iter().filter_map(|r| r.latest()) {
            let fresh = now.saturating_duration_since(report.at) < self.stale_after;
            if !fresh || signal::validate(report.busy, report.max).is_err() {
                continue;
            }
            total = Some(match total {
                None => report,
                Some(t) => Report {
                    busy: t.busy + report.busy,
                    max: t.max + report.max,
                    at: t.at.min(report.at),
                },
            });
        }
        total
    }

    /// The most requests this proxy may have in flight: the hard limit no class passes.
    fn hard_limit(&self, backends: usize) -> usize {
        self.capacity(backends).ceil().max(1.0) as usize
    }

    /// The threshold in force for `class`: a route's own override, else the upstream's.
    pub fn threshold(&self, class: RouteClass, route_override: Option<f64>) -> f64 {
        route_override.unwrap_or(self.config.thresholds.for_class(class))
    }

    /// Decides one request and, when it is admitted, reserves its in-flight slot.
    ///
    /// The reservation is atomic with the hard-limit check, so concurrent decisions
    /// cannot together push this proxy's in-flight count past the backend's pool.
    pub async fn admit<S: Slots>(
        &self,
        class: RouteClass,
        threshold_override: Option<f64>,
        counters: &RouteCounters,
        slots: &S,
    ) -> Result<S::Reservation, Rejection> {
        let unlimited = || {
            slots
                .try_reserve(None)
                .expect("an unlimited reservation succeeds")
        };
        if self.config.mode == ShedMode::Off {
            return Ok(unlimited());
        }
        let backends = slots.backends_in_rotation();
        let threshold = self.threshold(class, threshold_override);
        let signal = self.signal(slots.inflight(), backends);
        let roll: f64 = rand::random();
        let mut outcome =
            decision::decide(class, threshold, self.config.band, signal.utilisation, roll);
        // Critical requests waiting for a slot come first: while any wait, the other
        // classes do not take the slots they are waiting for.
        if outcome == Outcome::Admit && class != RouteClass::Critical && self.queued() > 0 {
            outcome = Outcome::Shed;
        }
        let mut reserved = None;
        if outcome == Outcome::Admit {
            reserved = slots.try_reserve(Some(self.hard_limit(backends)));
            if reserved.is_none() {
                // At the hard limit: critical requests queue, the rest are shed.
                outcome = match class {
                    RouteClass::Critical => Outcome::Queue,
                    _ => Outcome::Shed,
                };
            }
        }
        self.log_transition(outcome, &signal);
        let metrics = decision_metrics();
        match (outcome, reserved, self.config.mode) {
            (Outcome::Admit, Some(reservation), _) => {
                counters.admitted.fetch_add(1, Ordering::Relaxed);
                metrics.count(class, DecisionLabel::Admitted);
                Ok(reservation)
            }
            (_, _, ShedMode::Shadow) => {
                counters.would_shed.fetch_add(1, Ordering::Relaxed);
                counters.admitted.fetch_add(1, Ordering::Relaxed);
                metrics.count(class, DecisionLabel::WouldShed);
                Ok(unlimited())
            }
            (Outcome::Queue, _, _) => self.wait_for_slot(threshold, counters, slots, signal).await,
            _ => {
                counters.shed.fetch_add(1, Ordering::Relaxed);
                metrics.count(class, DecisionLabel::Shed);
                metrics.shed_total.increment(1);
                Err(Rejection::Shed {
                    class,
                    signal,
                    threshold,
                    retry_after: self.retry_after(&signal, threshold, backends),
                })
            }
        }
    }

    /// The bounded critical queue: wait until utilisation drops below the threshold
    /// and a slot can be reserved, or the queue timeout passes; refuse at once when
    /// the queue is full.
    async fn wait_for_slot<S: Slots>(
        &self,
        threshold: f64,
        counters: &RouteCounters,
        slots: &S,
        first: Signal,
    ) -> Result<S::Reservation, Rejection> {
        let metrics = decision_metrics();
        let class = RouteClass::Critical;
        let backends = slots.backends_in_rotation();
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.config.queue_size {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            counters.queue_rejected.fetch_add(1, Ordering::Relaxed);
            metrics.count(class, DecisionLabel::QueueFull);
            return Err(Rejection::QueueFull {
                signal: first,
                retry_after: self.retry_after(&first, threshold, backends),
            });
        }
        let _leave = QueueSlot(&self.queued);
        counters.queued.fetch_add(1, Ordering::Relaxed);
        metrics.count(class, DecisionLabel::Queued);
        let deadline = Instant::now() + self.config.queue_timeout;
        loop {
            let freed = self.slot_freed.notified();
            let backends = slots.backends_in_rotation();
            let signal = self.signal(slots.inflight(), backends);
            if signal.utilisation < threshold {
                if let Some(reservation) = slots.try_reserve(Some(self.hard_limit(backends))) {
                    counters.admitted.fetch_add(1, Ordering::Relaxed);
                    metrics.count(class, DecisionLabel::Admitted);
                    return Ok(reservation);
                }
            }
            if Instant::now() >= deadline {
                counters.queue_rejected.fetch_add(1, Ordering::Relaxed);
                metrics.count(class, DecisionLabel::QueueTimeout);
                return Err(Rejection::QueueTimeout {
                    retry_after: self.retry_after(&signal, threshold, backends),
                    signal,
                });
            }
            // A slot frees when an in-flight request ends; the reported signal changes
            // without a notification, so look again at least every 10 ms.
            let wake = deadline.min(Instant::now() + Duration::from_millis(10));
            let _ = tokio::time::timeout_at(wake, freed).await;
        }
    }

    /// Retry-After: the backlog above the threshold over the measured drain rate.
    fn retry_after(&self, signal: &Signal, threshold: f64, backends: usize) -> u64 {
        let backlog = (signal.utilisation - threshold).max(0.0) * self.capacity(backends)
            + self.queued() as f64;
        decision::retry_after_secs(backlog, self.drain.rate(Instant::now()))
    }

    /// Called when a request to this upstream ends (its response body finished or
    /// was dropped): feeds the drain rate and wakes one queued critical request.
    pub fn on_release(&self) {
        self.drain.record(Instant::now());
        self.slot_freed.notify_one();
    }

    /// Called when a response head arrived (or the exchange failed), for the adaptive limit.
    pub fn on_response(&self, rtt: Duration, inflight_at_start: usize, dropped: bool) {
        if let Some(adaptive) = &self.adaptive {
            adaptive
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .on_sample(rtt, inflight_at_start, dropped, Instant::now());
        }
    }

    /// Logs entering and leaving shedding once per transition, not per request.
    fn log_transition(&self, outcome: Outcome, signal: &Signal) {
        let lowest = self
            .config
            .thresholds
            .sheddable
            .min(self.config.thresholds.normal)
            .min(self.config.thresholds.critical);
        let verb = match self.config.mode {
            ShedMode::Shadow => "would shed (shadow mode)",
            _ => "shedding",
        };
        if outcome != Outcome::Admit {
            if !self.shedding.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    upstream = %self.upstream,
                    utilisation = format_args!("{:.2}", signal.utilisation),
                    source = %signal.source,
                    "entering {verb}"
                );
            }
        } else if signal.utilisation < lowest && self.shedding.swap(false, Ordering::Relaxed) {
            tracing::info!(
                upstream = %self.upstream,
                utilisation = format_args!("{:.2}", signal.utilisation),
                source = %signal.source,
                "leaving {verb}"
            );
        }
    }

    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }
}

struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Completions per second, smoothed over windows of at least 250 ms.
#[derive(Default)]
struct DrainMeter {
    completed: AtomicU64,
    window: Mutex<DrainWindow>,
}

#[derive(Default)]
struct DrainWindow {
    started: Option<Instant>,
    completed_at_start: u64,
    rate: f64,
}

const DRAIN_WINDOW: Duration = Duration::from_millis(250);

impl DrainMeter {
    fn record(&self, now: Instant) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        // Only one completion per window does the arithmetic; the rest skip the lock.
        if let Ok(mut window) = self.window.try_lock() {
            self.roll(&mut window, now);
        }
    }

    fn rate(&self, now: Instant) -> f64 {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        self.roll(&mut window, now);
        window.rate
    }

    fn roll(&self, window: &mut DrainWindow, now: Instant) {
        let completed = self.completed.load(Ordering::Relaxed);
        let Some(started) = window.started else {
            window.started = Some(now);
            window.completed_at_start = completed;
            return;
        };
        let elapsed = now.saturating_duration_since(started);
        if elapsed < DRAIN_WINDOW {
            return;
        }
        let rate = (completed - window.completed_at_start) as f64 / elapsed.as_secs_f64();
        window.rate = if window.rate == 0.0 {
            rate
        } else {
            0.5 * window.rate + 0.5 * rate
        };
        window.started = Some(now);
        window.completed_at_start = completed;
    }
}

/// Utilisation gauges of one upstream, by source, plus which source is in force.
struct SignalGauges {
    local: metrics::Gauge,
    reported: metrics::Gauge,
    in_force: metrics::Gauge,
    source: [metrics::Gauge; 3],
}

impl SignalGauges {
    fn new(upstream: &str) -> SignalGauges {
        let utilisation = |source: &'static str| {
            metrics::gauge!(m::UPSTREAM_UTILISATION,
                m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_SOURCE => source)
        };
        SignalGauges {
            local: utilisation("local"),
            reported: utilisation("reported"),
            in_force: utilisation("in_force"),
            source: Source::ALL.map(|s| {
                metrics::gauge!(m::SIGNAL_SOURCE,
                    m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_SOURCE => s.as_str())
            }),
        }
    }

    fn set(&self, signal: &Signal) {
        self.local.set(signal.local);
        self.reported.set(signal.reported.unwrap_or(f64::NAN));
        self.in_force.set(signal.utilisation);
        for (gauge, source) in self.source.iter().zip(Source::ALL) {
            gauge.set(if source == signal.source { 1.0 } else { 0.0 });
        }
    }
}

#[derive(Clone, Copy)]
enum DecisionLabel {
    Admitted,
    Shed,
    Queued,
    QueueTimeout,
    QueueFull,
    WouldShed,
}

const DECISION_LABELS: [&str; 6] = [
    "admitted",
    "shed",
    "queued",
    "queue_timeout",
    "queue_full",
    "would_shed",
];
const CLASSES: [RouteClass; 3] = [
    RouteClass::Critical,
    RouteClass::Normal,
    RouteClass::Sheddable,
];

/// Decision counters by class and outcome, registered once.
struct DecisionMetrics {
    decisions: [[metrics::Counter; 6]; 3],
    shed_total: metrics::Counter,
}

impl DecisionMetrics {
    fn count(&self, class: RouteClass, label: DecisionLabel) {
        let class_index = CLASSES.iter().position(|c| *c == class).unwrap_or(1);
        self.decisions[class_index][label as usize].increment(1);
    }
}

fn decision_metrics() -> &'static DecisionMetrics {
    static METRICS: OnceLock<DecisionMetrics> = OnceLock::new();
    METRICS.get_or_init(|| DecisionMetrics {
        decisions: CLASSES.map(|class| {
            DECISION_LABELS.map(|outcome| {
                metrics::counter!(m::ADMISSION_DECISIONS_TOTAL,
                    m::LABEL_CLASS => class.as_str(), m::LABEL_OUTCOME => outcome)
            })
        }),
        shed_total: metrics::counter!(m::SHED_TOTAL),
    })
}
