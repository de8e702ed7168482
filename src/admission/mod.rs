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
use crate::metrics::{self as m, CounterTable, Label as _};
use adaptive::AdaptiveLimit;
use decision::Outcome;
use signal::{ReportedSignal, Source};

/// The utilisation of an upstream as one decision saw it.
#[derive(Debug, Clone, Copy)]
pub struct Signal {
    /// The ratio in force: `(own in-flight + external load) / pool`.
    pub utilisation: f64,
    pub source: Source,
    /// This proxy's requests in flight to the upstream.
    pub own: usize,
    /// Own in-flight ÷ pool (or ÷ the learned limit when adaptive).
    pub local: f64,
    /// Load the backends report beyond this proxy's own, in workers.
    pub external: f64,
    /// Workers in the pool: reported max, `max_workers`, or the learned limit.
    pub pool: f64,
    /// The most requests this proxy may have in flight: `pool - external`, rounded.
    pub room: usize,
    /// The backends' own busy ÷ max as last reported, when a fresh valid report exists.
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
    /// A critical request found the queue at its memory bound: 503.
    QueueFull { signal: Signal, retry_after: u64 },
    /// A critical request waited too long, or would have (`predicted`): 503.
    QueueTimeout {
        signal: Signal,
        retry_after: u64,
        predicted: bool,
    },
}

impl Rejection {
    /// The decision that refused the request: `Shed`, `QueueFull` or `QueueTimeout`.
    pub fn decision(&self) -> Decision {
        match self {
            Rejection::Shed { .. } => Decision::Shed,
            Rejection::QueueFull { .. } => Decision::QueueFull,
            Rejection::QueueTimeout { .. } => Decision::QueueTimeout,
        }
    }
}

/// How admission reads and reserves an upstream's in-flight slots.
pub trait Slots {
    /// Held while the request is in flight; dropping it frees the slot.
    type Reservation;
    fn inflight(&self) -> usize;
    /// Whether backend `i` (in config order) is in rotation.
    fn backend_in_rotation(&self, i: usize) -> bool;
    /// Counts one more request in flight, unless that would pass `limit`.
    fn try_reserve(&self, limit: Option<usize>) -> Option<Self::Reservation>;
}

crate::metrics::label_values! {
    /// What admission did with a request: the `outcome` label of
    /// `loadgate_admission_decisions_total`, and a route's counts in `/status`.
    pub enum Decision {
        Admitted => "admitted",
        Shed => "shed",
        Queued => "queued",
        /// Refused by the critical queue: no slot within the timeout, or none expected.
        QueueTimeout => "queue_timeout",
        /// Refused by the critical queue: it held `queue_size` requests already.
        QueueFull => "queue_full",
        /// Shadow mode: a sheddable or normal request enforce mode would have shed.
        WouldShed => "would_shed",
        /// Shadow mode: a critical request that would have waited in the queue.
        WouldQueue => "would_queue",
        /// Shadow mode: a critical request the queue would have answered 503.
        WouldReject => "would_reject",
    }
}

/// A route's admission decisions: each one counts in
/// `loadgate_admission_decisions_total{route, upstream, class, outcome}` and in the
/// route's `/status`.
pub type RouteCounters = CounterTable<Decision>;

impl CounterTable<Decision> {
    /// The counters of route `route`, of class `class`, sending to `upstream`.
    pub fn for_route(route: &str, upstream: &str, class: RouteClass) -> RouteCounters {
        CounterTable::new(|outcome: Decision| {
            metrics::counter!(m::ADMISSION_DECISIONS_TOTAL,
                m::LABEL_ROUTE => route.to_string(), m::LABEL_UPSTREAM => upstream.to_string(),
                m::LABEL_CLASS => class.as_str(), m::LABEL_OUTCOME => outcome.as_str())
        })
    }
}

crate::metrics::label_values! {
    /// How a request left the critical queue: the `outcome` label of
    /// `loadgate_admission_queue_wait_seconds`.
    pub enum QueueExit {
        /// A slot freed in time.
        Admitted => "admitted",
        /// Refused with 503: no slot by the queue timeout, or none expected in time.
        QueueTimeout => "queue_timeout",
        /// The client went away while it waited.
        Cancelled => "cancelled",
    }
}

/// How long no request may be shed or queued before a shedding episode ends.
pub const EPISODE_DWELL: Duration = Duration::from_secs(1);
/// A queue drain rate is measured over at least this long, and a quarter of the queue
/// timeout: the first completions of a burst on a cold backend (JIT, new connections,
/// a busy machine) come slowly and in clumps, and a rate read from them refuses
/// critical requests the queue would have served in time ...
const QUEUE_RATE_WINDOW: Duration = Duration::from_millis(50);
/// ... and at least this many completions (or the whole queue timeout).
const QUEUE_RATE_COMPLETIONS: u64 = 4;
/// A measured queue drain rate is forgotten after this long.
const QUEUE_RATE_MAX_AGE: Duration = Duration::from_secs(1);
/// A request is refused before its deadline only when its expected wait passes the
/// time it has left by this factor: a rate measured over the first few completions of
/// a burst (new upstream connections, a busy machine) is noisy, and a critical request
/// refused wrongly costs more than one that waits until its deadline.
const EARLY_REFUSAL_MARGIN: f64 = 1.5;

/// The admission state of one upstream.
pub struct Admission {
    upstream: String,
    config: crate::config::SheddingConfig,
    max_workers: f64,
    /// One report holder per backend, written by that backend's poller.
    reports: Vec<Arc<ReportedSignal>>,
    interval: Duration,
    adaptive: Option<Mutex<AdaptiveLimit>>,
    drain: DrainMeter,
    queue: Mutex<QueueDrain>,
    queued: AtomicUsize,
    slot_freed: Notify,
    episode: Episode,
    gauges: SignalGauges,
    /// `loadgate_admission_queue_wait_seconds` of this upstream, one per [`QueueExit`].
    queue_wait: Box<[metrics::Histogram]>,
}

impl Admission {
    pub fn new(config: &UpstreamConfig) -> Admission {
        Admission::after(config, None)
    }

    /// The admission of an upstream whose config changed on reload: what it learned
    /// goes on. `previous` is the old config and admission; each backend still in the
    /// list keeps its reported signal (when polled at the same interval), and the
    /// adaptive limit goes on from where it was.
    pub fn after(
        config: &UpstreamConfig,
        previous: Option<(&UpstreamConfig, &Admission)>,
    ) -> Admission {
        let interval = config.actuator.interval;
        let now = Instant::now();
        let kept_report = |backend: &String| {
            let (old_config, old) = previous?;
            if old.interval != interval {
                return None;
            }
            let i = old_config.backends.iter().position(|b| b == backend)?;
            old.reports.get(i).cloned()
        };
        let adaptive = config.adaptive.clone().map(|settings| {
            let old = previous.and_then(|(_, old)| old.adaptive.as_ref());
            let limit = match old {
                Some(old) => {
                    let old = old.lock().unwrap_or_else(|e| e.into_inner());
                    AdaptiveLimit::resumed(&old, settings, now)
                }
                None => AdaptiveLimit::new(settings, now),
            };
            Mutex::new(limit)
        });
        Admission {
            upstream: config.name.clone(),
            config: config.shedding.clone(),
            max_workers: f64::from(config.max_workers),
            reports: config
                .backends
                .iter()
                .map(|b| kept_report(b).unwrap_or_else(|| Arc::new(ReportedSignal::new(interval))))
                .collect(),
            interval,
            adaptive,
            drain: DrainMeter::default(),
            queue: Mutex::new(QueueDrain::default()),
            queued: AtomicUsize::new(0),
            slot_freed: Notify::new(),
            episode: Episode::new(Instant::now()),
            gauges: SignalGauges::new(&config.name),
            queue_wait: QueueExit::ALL
                .iter()
                .map(|exit| {
                    metrics::histogram!(m::ADMISSION_QUEUE_WAIT_SECONDS,
                        m::LABEL_UPSTREAM => config.name.clone(), m::LABEL_OUTCOME => exit.as_str())
                })
                .collect(),
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

    /// The utilisation in force now (see `signal.rs` for the model).
    pub fn signal<S: Slots>(&self, slots: &S) -> Signal {
        let now = Instant::now();
        let backends = self
            .reports
            .iter()
            .enumerate()
            .map(|(i, r)| (r.estimate(), slots.backend_in_rotation(i)));
        let own = slots.inflight();
        let mut parts = signal::combine(own as f64, self.max_workers, backends, now, self.interval);
        let mut source = if parts.reported {
            Source::Reported
        } else {
            Source::Local
        };
        if let Some(limit) = self.adaptive_limit() {
            // No fixed pool: the learned limit takes its place.
            parts.pool = limit.max(1.0);
            source = Source::Adaptive;
        }
        Signal {
            utilisation: parts.utilisation(),
            source,
            own,
            local: parts.own / parts.pool,
            external: parts.external,
            pool: parts.pool,
            room: parts.room() as usize,
            reported: self.fresh_ratio(now),
        }
    }

    /// The backends' own busy ÷ max over their fresh reports, for `/status` and metrics.
    fn fresh_ratio(&self, now: Instant) -> Option<f64> {
        let (busy, max) = self
            .reports
            .iter()
            .filter_map(|r| r.estimate())
            .filter(|e| e.weight(now, self.interval) > 0.0)
            .fold((0.0, 0.0), |(b, m), e| {
                (b + e.report.busy, m + e.report.max)
            });
        (max > 0.0).then(|| busy / max)
    }

    /// Sets the utilisation and signal-source gauges to the signal now. Called when
    /// metrics are scraped rather than per decision: seven gauge writes per request,
    /// on cache lines every worker thread shares, cost more than the decision itself.
    pub fn publish_gauges<S: Slots>(&self, slots: &S) {
        self.gauges.set(&self.signal(slots));
    }

    /// The threshold in force for `class`: a route's own override, else the upstream's.
    pub fn threshold(&self, class: RouteClass, route_override: Option<f64>) -> f64 {
        route_override.unwrap_or(self.config.thresholds.for_class(class))
    }

    /// Decides one request and, when it is admitted, reserves its in-flight slot.
    ///
    /// The reservation is atomic with the hard-limit check, so concurrent decisions
    /// cannot together push this proxy's in-flight count past the room the backend
    /// has for it.
    pub async fn admit<S: Slots>(
        &self,
        class: RouteClass,
        threshold_override: Option<f64>,
        counters: &RouteCounters,
        slots: &S,
    ) -> Result<S::Reservation, Rejection> {
        self.admit_decided(class, threshold_override, counters, slots)
            .await
            .map(|(reservation, _)| reservation)
    }

    /// [`admit`](Admission::admit), saying how the request was admitted: at once
    /// ([`Decision::Admitted`], also when admission is off), after waiting in the
    /// critical queue ([`Decision::Queued`]), or in shadow mode with what enforce mode
    /// would have done (`WouldShed`, `WouldQueue`, `WouldReject`; else `Admitted`). A
    /// rejection says its own ([`Rejection::decision`]). For the access log.
    pub async fn admit_decided<S: Slots>(
        &self,
        class: RouteClass,
        threshold_override: Option<f64>,
        counters: &RouteCounters,
        slots: &S,
    ) -> Result<(S::Reservation, Decision), Rejection> {
        let unlimited = || {
            slots
                .try_reserve(None)
                .expect("an unlimited reservation succeeds")
        };
        if self.config.mode == ShedMode::Off {
            return Ok((unlimited(), Decision::Admitted));
        }
        let threshold = self.threshold(class, threshold_override);
        let signal = self.signal(slots);
        let roll: f64 = rand::random();
        let mut outcome =
            decision::decide(class, threshold, self.config.band, signal.utilisation, roll);
        // Critical requests waiting for a slot come first: while any wait, the other
        // classes do not take the slots they are waiting for.
        if outcome == Outcome::Admit && class != RouteClass::Critical && self.queued() > 0 {
            outcome = Outcome::Shed;
        }
        if self.config.mode == ShedMode::Shadow {
            return Ok(self.shadow(class, outcome, &signal, counters, unlimited));
        }
        let mut reserved = None;
        if outcome == Outcome::Admit {
            reserved = slots.try_reserve(Some(signal.room));
            if reserved.is_none() {
                // At the hard limit: critical requests queue, the rest are shed.
                outcome = match class {
                    RouteClass::Critical => Outcome::Queue,
                    _ => Outcome::Shed,
                };
            }
        }
        match (outcome, reserved) {
            (Outcome::Admit, Some(reservation)) => {
                counters.increment(Decision::Admitted);
                Ok((reservation, Decision::Admitted))
            }
            (Outcome::Queue, _) => {
                self.episode
                    .pressure(&self.upstream, Pressure::Queued, &signal);
                let waited = self.wait_for_slot(threshold, counters, slots, signal).await;
                waited.map(|reservation| (reservation, Decision::Queued))
            }
            _ => {
                self.episode
                    .pressure(&self.upstream, Pressure::Shed, &signal);
                counters.increment(Decision::Shed);
                shed_total().increment(1);
                Err(Rejection::Shed {
                    class,
                    signal,
                    threshold,
                    retry_after: self.retry_after(&signal, threshold),
                })
            }
        }
    }

    /// Shadow mode: admits every request and counts what enforce mode would have
    /// done with it: shed, queued, or answered 503 by the queue.
    fn shadow<R>(
        &self,
        class: RouteClass,
        outcome: Outcome,
        signal: &Signal,
        counters: &RouteCounters,
        admit: impl FnOnce() -> R,
    ) -> (R, Decision) {
        // Enforce mode would not have let this proxy pass its room: at the room, a
        // critical request queues and the others are shed.
        let at_room = signal.own >= signal.room;
        let outcome = match (class, outcome) {
            (RouteClass::Critical, Outcome::Admit) if at_room => Outcome::Queue,
            (_, Outcome::Admit) if at_room => Outcome::Shed,
            (_, outcome) => outcome,
        };
        let (decision, pressure) = match outcome {
            Outcome::Admit => (Decision::Admitted, None),
            Outcome::Shed => (Decision::WouldShed, Some(Pressure::Shed)),
            Outcome::Queue => {
                // The requests beyond the room are the ones that would be waiting.
                let ahead = signal.own.saturating_sub(signal.room) as f64;
                let rate = self.drain.rate(Instant::now());
                let wait = if rate > 0.0 { ahead / rate } else { 0.0 };
                if wait > self.config.queue_timeout.as_secs_f64() {
                    (Decision::WouldReject, Some(Pressure::Rejected))
                } else {
                    (Decision::WouldQueue, Some(Pressure::Queued))
                }
            }
        };
        counters.increment(decision);
        if let Some(pressure) = pressure {
            self.episode.pressure(&self.upstream, pressure, signal);
        }
        (admit(), decision)
    }

    /// The critical queue, bounded by time: a request waits while its expected wait
    /// (the requests ahead of it ÷ the rate the queue drains at) fits the queue
    /// timeout, and never past it. `queue_size` is only a memory bound far above any
    /// sane burst. Until the drain rate has been measured while the queue was
    /// non-empty, a request waits: a burst the backend absorbs in time is served.
    async fn wait_for_slot<S: Slots>(
        &self,
        threshold: f64,
        counters: &RouteCounters,
        slots: &S,
        first: Signal,
    ) -> Result<S::Reservation, Rejection> {
        let entered = Instant::now();
        let ahead = self.queued.fetch_add(1, Ordering::AcqRel);
        let _leave = QueueSlot(self);
        let completed_at_entry = self.drain.completed();
        let timeout = self.config.queue_timeout;
        let wait = QueueWait {
            histograms: &self.queue_wait,
            entered,
            exit: AtomicUsize::new(QueueExit::Cancelled.index()),
        };
        let reject = |signal: Signal, predicted: bool| {
            wait.leave(Some(QueueExit::QueueTimeout));
            counters.increment(Decision::QueueTimeout);
            self.episode
                .pressure(&self.upstream, Pressure::Rejected, &signal);
            Rejection::QueueTimeout {
                retry_after: self.retry_after(&signal, threshold),
                signal,
                predicted,
            }
        };
        if ahead >= self.config.queue_size {
            // Refused at the door: it never waited.
            wait.leave(None);
            counters.increment(Decision::QueueFull);
            self.episode
                .pressure(&self.upstream, Pressure::Rejected, &first);
            return Err(Rejection::QueueFull {
                signal: first,
                retry_after: self.retry_after(&first, threshold),
            });
        }
        let rate = self.queue_rate(entered, ahead == 0, completed_at_entry);
        if rate
            .is_some_and(|r| expected_wait(ahead as f64, r) > timeout.mul_f64(EARLY_REFUSAL_MARGIN))
        {
            return Err(reject(first, true));
        }
        counters.increment(Decision::Queued);
        let deadline = entered + timeout;
        loop {
            let freed = self.slot_freed.notified();
            let signal = self.signal(slots);
            if signal.utilisation < threshold {
                if let Some(reservation) = slots.try_reserve(Some(signal.room)) {
                    wait.leave(Some(QueueExit::Admitted));
                    counters.increment(Decision::Admitted);
                    return Ok(reservation);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(reject(signal, false));
            }
            // Requests ahead move up as requests complete; give up early once the
            // measured drain rate says the rest of the wait will not fit.
            let completed = self.drain.completed();
            let still_ahead = (ahead as u64).saturating_sub(completed - completed_at_entry);
            if let Some(rate) = self.queue_rate(now, false, completed) {
                if expected_wait(still_ahead as f64, rate)
                    > (deadline - now).mul_f64(EARLY_REFUSAL_MARGIN)
                {
                    return Err(reject(signal, true));
                }
            }
            // A slot frees when an in-flight request ends; the reported signal changes
            // without a notification, so look again at least every 10 ms.
            let wake = deadline.min(now + Duration::from_millis(10));
            let _ = tokio::time::timeout_at(wake, freed).await;
        }
    }

    /// Feeds the queue's drain-rate measurement and reads it: completions per second
    /// while the queue was non-empty. `first` restarts the measurement window.
    fn queue_rate(&self, now: Instant, first: bool, completed: u64) -> Option<f64> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if first {
            queue.since = Some((now, completed));
        }
        queue.observe(now, completed, self.config.queue_timeout);
        queue.rate(now)
    }

    /// Retry-After: the backlog above the threshold over the measured drain rate.
    fn retry_after(&self, signal: &Signal, threshold: f64) -> u64 {
        let backlog =
            (signal.utilisation - threshold).max(0.0) * signal.pool + self.queued() as f64;
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

    /// Ends the shedding episode once nothing has been shed or queued for
    /// [`EPISODE_DWELL`], logging what it shed. Called on a timer, so the episode
    /// ends without a request arriving.
    pub fn tick(&self, now: Instant) {
        self.episode.tick(&self.upstream, self.config.mode, now);
    }

    /// Whether a shedding episode (or, in shadow mode, a would-shed one) is under way.
    pub fn is_shedding(&self) -> bool {
        self.episode.active.load(Ordering::Relaxed)
    }
}

/// `ahead / rate` as a duration; unbounded when nothing drains.
fn expected_wait(ahead: f64, rate: f64) -> Duration {
    if ahead <= 0.0 {
        Duration::ZERO
    } else if rate > 0.0 {
        Duration::from_secs_f64((ahead / rate).min(3600.0))
    } else {
        Duration::MAX
    }
}

/// The critical queue's drain rate, measured only while the queue is non-empty:
/// then the backend is saturated and completions per second are its capacity.
#[derive(Default)]
struct QueueDrain {
    /// Start of the current measurement window and the completions counted by then.
    since: Option<(Instant, u64)>,
    /// The smoothed rate and when it was last measured.
    rate: Option<(f64, Instant)>,
}

impl QueueDrain {
    fn observe(&mut self, now: Instant, completed: u64, timeout: Duration) {
        let Some((started, at_start)) = self.since else {
            return;
        };
        let elapsed = now.saturating_duration_since(started);
        let done = completed.saturating_sub(at_start);
        let window = QUEUE_RATE_WINDOW.max(timeout / 4);
        let enough = (elapsed >= window && done >= QUEUE_RATE_COMPLETIONS) || elapsed >= timeout;
        if !enough || elapsed.is_zero() {
            return;
        }
        let sample = done as f64 / elapsed.as_secs_f64();
        let rate = match self.rate {
            Some((rate, at)) if now.saturating_duration_since(at) < QUEUE_RATE_MAX_AGE => {
                0.5 * rate + 0.5 * sample
            }
            _ => sample,
        };
        self.rate = Some((rate, now));
        self.since = Some((now, completed));
    }

    fn rate(&self, now: Instant) -> Option<f64> {
        self.rate
            .filter(|(_, at)| now.saturating_duration_since(*at) < QUEUE_RATE_MAX_AGE)
            .map(|(rate, _)| rate)
    }
}

/// What kept a request from being admitted at once, for the episode's summary.
#[derive(Clone, Copy)]
enum Pressure {
    Shed,
    Queued,
    Rejected,
}

/// One shedding episode: from the first request shed or queued until none has been
/// for [`EPISODE_DWELL`]. Logged once when it starts and once when it ends.
struct Episode {
    active: AtomicBool,
    /// Time base for `last_ms`.
    epoch: Instant,
    /// When a request was last shed or queued, in ms since `epoch`.
    last_ms: AtomicU64,
    started: Mutex<Option<Instant>>,
    counts: [AtomicU64; 3],
}

impl Episode {
    fn new(epoch: Instant) -> Episode {
        Episode {
            active: AtomicBool::new(false),
            epoch,
            last_ms: AtomicU64::new(0),
            started: Mutex::new(None),
            counts: Default::default(),
        }
    }

    fn pressure(&self, upstream: &str, pressure: Pressure, signal: &Signal) {
        let now = Instant::now();
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
        self.counts[pressure as usize].fetch_add(1, Ordering::Relaxed);
        if !self.active.swap(true, Ordering::AcqRel) {
            *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            tracing::warn!(
                upstream,
                utilisation = format_args!("{:.2}", signal.utilisation),
                own = signal.own,
                external = format_args!("{:.1}", signal.external),
                pool = format_args!("{:.0}", signal.pool),
                source = %signal.source,
                "entering shedding"
            );
        }
    }

    fn tick(&self, upstream: &str, mode: ShedMode, now: Instant) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        if now.saturating_duration_since(last) < EPISODE_DWELL {
            return;
        }
        if !self.active.swap(false, Ordering::AcqRel) {
            return;
        }
        let started = self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let [shed, queued, rejected] = self.counts.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
        let lasted = started.map_or(Duration::ZERO, |s| last.saturating_duration_since(s));
        let shadow = if mode == ShedMode::Shadow {
            " (shadow mode: nothing was shed, these are what enforce mode would have done)"
        } else {
            ""
        };
        tracing::info!(
            upstream,
            lasted = format_args!("{:.1}s", lasted.as_secs_f64()),
            shed,
            queued,
            rejected,
            "leaving shedding{shadow}"
        );
    }
}

/// A place in the critical queue; leaving the queue (admitted, refused or
/// cancelled) frees it, and the last one out ends the drain-rate window.
struct QueueSlot<'a>(&'a Admission);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        if self.0.queued.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.queue.lock().unwrap_or_else(|e| e.into_inner()).since = None;
        }
    }
}

/// A request's time in the critical queue, recorded in
/// `loadgate_admission_queue_wait_seconds` when it leaves, however it leaves: as
/// `exit` says, `cancelled` unless told otherwise (the waiting future was dropped);
/// not at all when `exit` is `None` (refused as the queue was full: it never entered).
struct QueueWait<'a> {
    histograms: &'a [metrics::Histogram],
    entered: Instant,
    /// The index of the [`QueueExit`]; past the last one for `None`. (Atomic only so
    /// that the waiting future, which holds a reference to it, stays `Send`.)
    exit: AtomicUsize,
}

impl QueueWait<'_> {
    fn leave(&self, exit: Option<QueueExit>) {
        let index = exit.map_or(QueueExit::ALL.len(), |e| e.index());
        self.exit.store(index, Ordering::Relaxed);
    }
}

impl Drop for QueueWait<'_> {
    fn drop(&mut self) {
        if let Some(histogram) = self.histograms.get(*self.exit.get_mut()) {
            histogram.record(self.entered.elapsed().as_secs_f64());
        }
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
    /// Requests completed so far.
    fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

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
    external: metrics::Gauge,
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
            external: metrics::gauge!(m::UPSTREAM_EXTERNAL_LOAD,
                m::LABEL_UPSTREAM => upstream.to_string()),
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
        self.external.set(signal.external);
        self.local.set(signal.local);
        self.reported.set(signal.reported.unwrap_or(f64::NAN));
        self.in_force.set(signal.utilisation);
        for (gauge, source) in self.source.iter().zip(Source::ALL) {
            gauge.set(if source == signal.source { 1.0 } else { 0.0 });
        }
    }
}

/// `loadgate_shed_total`, registered once.
fn shed_total() -> &'static metrics::Counter {
    static SHED_TOTAL: OnceLock<metrics::Counter> = OnceLock::new();
    SHED_TOTAL.get_or_init(|| metrics::counter!(m::SHED_TOTAL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Upstream;

    #[test]
    fn a_changed_config_keeps_each_kept_backends_signal_and_the_learned_limit() {
        let mut old_config = Upstream::for_tests("app").config.clone();
        old_config.backends = vec!["10.0.0.1:8080".into(), "10.0.0.2:8080".into()];
        old_config.adaptive = Some(crate::config::AdaptiveSettings::default());
        let old = Admission::new(&old_config);
        // Latency that grows with load makes the limit move off its initial value.
        for i in 0..200 {
            old.on_response(Duration::from_millis(5 + i / 4), (i / 2) as usize, false);
        }
        let learned = old.adaptive_limit().unwrap();
        assert_ne!(learned, old_config.adaptive.as_ref().unwrap().initial_limit);

        let mut config = old_config.clone();
        config.shedding.band = 0.2;
        config.backends = vec!["10.0.0.2:8080".into(), "10.0.0.3:8080".into()];
        let new = Admission::after(&config, Some((&old_config, &old)));
        assert!(
            Arc::ptr_eq(&new.report_holder(0), &old.report_holder(1)),
            "10.0.0.2 kept"
        );
        assert!(
            !Arc::ptr_eq(&new.report_holder(1), &old.report_holder(0)),
            "10.0.0.3 is new"
        );
        assert_eq!(new.adaptive_limit(), Some(learned));

        // Polled at another interval, a report means something else: started afresh.
        config.actuator.interval = old_config.actuator.interval * 2;
        let other = Admission::after(&config, Some((&old_config, &old)));
        assert!(!Arc::ptr_eq(&other.report_holder(0), &old.report_holder(1)));
    }

    /// In-flight slots counted in memory; a reservation frees its slot on drop.
    struct FakeSlots {
        inflight: Arc<AtomicUsize>,
        admission: Arc<Admission>,
    }

    struct FakeReservation {
        inflight: Arc<AtomicUsize>,
        admission: Arc<Admission>,
    }

    impl Drop for FakeReservation {
        fn drop(&mut self) {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            self.admission.on_release();
        }
    }

    impl Slots for FakeSlots {
        type Reservation = FakeReservation;
        fn inflight(&self) -> usize {
            self.inflight.load(Ordering::Acquire)
        }
        fn backend_in_rotation(&self, _: usize) -> bool {
            true
        }
        fn try_reserve(&self, limit: Option<usize>) -> Option<FakeReservation> {
            self.inflight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match limit {
                    Some(limit) if n >= limit => None,
                    _ => Some(n + 1),
                })
                .ok()?;
            Some(FakeReservation {
                inflight: self.inflight.clone(),
                admission: self.admission.clone(),
            })
        }
    }

    fn setup(workers: u32, mode: ShedMode) -> Arc<FakeSlots> {
        let mut config = Upstream::for_tests("app").config.clone();
        config.max_workers = workers;
        config.shedding.mode = mode;
        config.shedding.queue_timeout = Duration::from_millis(500);
        Arc::new(FakeSlots {
            inflight: Arc::new(AtomicUsize::new(0)),
            admission: Arc::new(Admission::new(&config)),
        })
    }

    /// Sends `n` critical requests at once; each admitted one holds its slot for
    /// `service`. Returns each request's result and when it was decided.
    async fn critical_burst(
        slots: &Arc<FakeSlots>,
        n: usize,
        service: Duration,
    ) -> Vec<(Result<(), bool>, Duration)> {
        let started = Instant::now();
        let counters = Arc::new(RouteCounters::for_route("t", "app", RouteClass::Critical));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let slots = slots.clone();
                let counters = counters.clone();
                tokio::spawn(async move {
                    let decided = slots
                        .admission
                        .admit(RouteClass::Critical, None, &counters, &*slots)
                        .await;
                    let at = started.elapsed();
                    match decided {
                        Ok(reservation) => {
                            tokio::time::sleep(service).await;
                            drop(reservation);
                            (Ok(()), at)
                        }
                        Err(Rejection::QueueTimeout { predicted, .. }) => (Err(predicted), at),
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_the_backend_absorbs_in_time_is_served_whole() {
        // 150 critical requests at once, 8 slots, 1 ms each: about 20 ms of work.
        let slots = setup(8, ShedMode::Enforce);
        let results = critical_burst(&slots, 150, Duration::from_millis(1)).await;
        assert!(results.iter().all(|(r, _)| r.is_ok()), "{results:?}");
        assert_eq!(slots.admission.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_standing_queue_is_refused_early_not_at_the_timeout() {
        // 8 slots, 50 ms each: about 80 requests fit the 500 ms timeout, 320 do not.
        let slots = setup(8, ShedMode::Enforce);
        let results = critical_burst(&slots, 400, Duration::from_millis(50)).await;
        let served = results.iter().filter(|(r, _)| r.is_ok()).count();
        assert!((72..=88).contains(&served), "served {served}");
        // Once the drain rate is measured (over a quarter of the timeout, 125 ms), those
        // who cannot make it even with the margin (past about 1.5 x 80 in line) are told
        // at once, not at the timeout.
        let early = results
            .iter()
            .filter(|(r, at)| *r == Err(true) && *at < Duration::from_millis(200))
            .count();
        assert!(early >= 260, "refused early: {early} of {}", 400 - served);
        // None waited past the timeout.
        assert!(results
            .iter()
            .all(|(_, at)| *at <= Duration::from_millis(510)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_episode_ends_after_the_dwell_without_a_request() {
        let slots = setup(2, ShedMode::Enforce);
        let admission = &slots.admission;
        let counters = RouteCounters::for_route("t", "app", RouteClass::Critical);
        let _held: Vec<_> = (0..2).map(|_| slots.try_reserve(None).unwrap()).collect();
        let shed = admission
            .admit(RouteClass::Sheddable, None, &counters, &*slots)
            .await;
        assert!(matches!(shed, Err(Rejection::Shed { .. })));
        assert!(admission.is_shedding());
        let t0 = Instant::now();
        admission.tick(t0 + Duration::from_millis(900));
        assert!(admission.is_shedding(), "still within the dwell");
        tokio::time::advance(Duration::from_millis(1100)).await;
        admission.tick(Instant::now());
        assert!(!admission.is_shedding());
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_mode_counts_what_enforce_mode_would_do_per_class() {
        let slots = setup(2, ShedMode::Shadow);
        let admission = &slots.admission;
        let counters = RouteCounters::for_route("t", "app", RouteClass::Critical);
        let mut held: Vec<_> = (0..2).map(|_| slots.try_reserve(None).unwrap()).collect();
        for class in [
            RouteClass::Critical,
            RouteClass::Sheddable,
            RouteClass::Normal,
        ] {
            let admitted = admission.admit(class, None, &counters, &*slots).await;
            held.push(admitted.expect("shadow mode admits everything"));
        }
        assert_eq!(counters.get(Decision::WouldQueue), 1);
        assert_eq!(counters.get(Decision::WouldShed), 2);
        assert_eq!(counters.get(Decision::Shed), 0);
        assert_eq!(counters.get(Decision::Admitted), 0);
        assert!(admission.is_shedding());
        drop(held);
        let idle = admission
            .admit(RouteClass::Sheddable, None, &counters, &*slots)
            .await;
        assert!(idle.is_ok());
        assert_eq!(counters.get(Decision::Admitted), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_learns_how_it_was_admitted() {
        let slots = setup(1, ShedMode::Enforce);
        let admission = &slots.admission;
        let counters = RouteCounters::for_route("t", "app", RouteClass::Critical);
        let decide = |class| admission.admit_decided(class, None, &counters, &*slots);
        let (first, decision) = decide(RouteClass::Critical).await.expect("a free slot");
        assert_eq!(decision, Decision::Admitted);

        let shed = decide(RouteClass::Sheddable).await.err().expect("shed");
        assert_eq!(shed.decision(), Decision::Shed);

        // The only slot is held: a critical request waits, and gets it once freed.
        let waiting = decide(RouteClass::Critical);
        let release = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(first);
        };
        let (waited, ()) = tokio::join!(waiting, release);
        let (held, decision) = waited.expect("admitted after the wait");
        assert_eq!(decision, Decision::Queued);

        // Nothing frees it again: the next critical request times out in the queue.
        let refused = decide(RouteClass::Critical).await.err().expect("refused");
        assert_eq!(refused.decision(), Decision::QueueTimeout);
        drop(held);

        let shadow = setup(1, ShedMode::Shadow);
        let _held = shadow.try_reserve(None).unwrap();
        let decided = shadow
            .admission
            .admit_decided(RouteClass::Normal, None, &counters, &*shadow)
            .await;
        let (_admitted, decision) = decided.expect("shadow mode admits");
        assert_eq!(decision, Decision::WouldShed);
    }

    /// The `loadgate_admission_queue_wait_seconds` `_count` and `_sum` of `upstream`
    /// and `outcome`, as scraped.
    fn queue_wait(upstream: &str, outcome: &str) -> (f64, f64) {
        let text = crate::metrics::handle().render();
        let value = |suffix: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!("{}_{suffix}{{", m::ADMISSION_QUEUE_WAIT_SECONDS))
                        && l.contains(&format!("upstream=\"{upstream}\""))
                        && l.contains(&format!("outcome=\"{outcome}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0.0)
        };
        (value("count"), value("sum"))
    }

    #[tokio::test(start_paused = true)]
    async fn every_queued_request_records_its_wait_by_how_it_left() {
        let name = "queue-wait-unit";
        let mut config = Upstream::for_tests(name).config.clone();
        config.max_workers = 1;
        config.shedding.queue_timeout = Duration::from_millis(500);
        crate::metrics::handle();
        let admission = Arc::new(Admission::new(&config));
        let slots = Arc::new(FakeSlots {
            inflight: Arc::new(AtomicUsize::new(0)),
            admission,
        });
        let counters = Arc::new(RouteCounters::for_route("t", name, RouteClass::Critical));
        let queue = |slots: &Arc<FakeSlots>| {
            let (slots, counters) = (slots.clone(), counters.clone());
            tokio::spawn(async move {
                let admitted = slots
                    .admission
                    .admit(RouteClass::Critical, None, &counters, &*slots)
                    .await;
                admitted.is_ok()
            })
        };
        let entered = |slots: &Arc<FakeSlots>| {
            let slots = slots.clone();
            async move {
                while slots.admission.queued() == 0 {
                    tokio::task::yield_now().await;
                }
            }
        };
        let held = slots.try_reserve(None).unwrap();

        // The client goes away after 50 ms in the queue.
        let gone = queue(&slots);
        entered(&slots).await;
        tokio::time::advance(Duration::from_millis(50)).await;
        gone.abort();
        assert!(gone.await.is_err());
        // No slot frees within the timeout.
        assert!(!queue(&slots).await.unwrap());
        // A slot frees after 20 ms.
        let admitted = queue(&slots);
        entered(&slots).await;
        tokio::time::advance(Duration::from_millis(20)).await;
        drop(held);
        assert!(admitted.await.unwrap());

        let (n, waited) = queue_wait(name, "cancelled");
        assert_eq!(n, 1.0);
        assert!((0.05..0.06).contains(&waited), "cancelled after {waited}");
        let (n, waited) = queue_wait(name, "queue_timeout");
        assert_eq!(n, 1.0);
        assert!((0.5..0.52).contains(&waited), "timed out after {waited}");
        let (n, waited) = queue_wait(name, "admitted");
        assert_eq!(n, 1.0);
        assert!((0.02..0.04).contains(&waited), "admitted after {waited}");
    }
}
