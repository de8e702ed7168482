//! Latency-learned concurrency limit (the `adaptive` utilisation signal).
//!
//! For upstreams with no fixed worker pool (Spring WebFlux, virtual threads),
//! where `busy / max_workers` means nothing, this learns how much concurrency
//! the backend takes before latency starts to climb, and reports
//! `utilisation = inflight / learned_limit`. It is pure bookkeeping: no I/O, no
//! clock of its own (time is passed in), not thread-safe (wrap it in a `Mutex`).
//! It is not an admission decision by itself and not for pooled backends, whose
//! configured or reported pool size is the better truth.
//!
//! Algorithm (in the style of Netflix concurrency-limits "Gradient2"):
//! - `short` = fast EWMA of sample RTTs; `baseline` = the lowest `short` seen
//!   since the last probe (the "no-load" latency).
//! - Slow start (a sane warm start): from the initial limit, the limit grows by
//!   one per sample (doubling per round trip) while latency stays within
//!   `tolerance * baseline`, until latency first passes it or a request is
//!   dropped. So a new proxy finds a large backend's capacity in a few round
//!   trips instead of shedding while it creeps up.
//! - Then, while `short <= tolerance * baseline`, `target = limit + sqrt(limit)`
//!   (a small queue allowance); above it, `target = limit * gradient` with
//!   `gradient = clamp(tolerance * baseline / short, 0.5, 1.0)`. `limit` moves
//!   toward `target` by the `smoothing` factor. So the limit settles where
//!   latency meets its tolerance, never above it: the queue allowance is given
//!   only while latency is within tolerance.
//! - It only grows while the limit is actually used (`inflight >= limit / 2`),
//!   so an idle service does not inflate it.
//! - A `dropped` sample (timeout / overload) multiplies the limit by 0.9.
//! - Min-RTT probe: every `probe_interval` (jittered ±50% so proxies do not probe
//!   in step) the baseline is forgotten and re-learned, and the limit is halved
//!   to let queues drain; this is how a genuine latency change is accepted.
//! - The limit is clamped to `[min_limit, max_limit]` after every step, probes
//!   included: a probe never drops it to "a handful" under load.
//!
//! Failure mode: a proxy started in the middle of an overload never sees the
//! no-load latency, so until its first probe drains the queue its baseline
//! includes queueing and the limit settles that much higher.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// Weight of the newest sample in the short-term RTT average.
const SHORT_ALPHA: f64 = 0.2;
/// Limit multiplier applied by a dropped (timed-out / overloaded) request.
const DROP_FACTOR: f64 = 0.9;
/// Limit multiplier applied when a min-RTT probe starts, to drain queues.
const PROBE_DRAIN_FACTOR: f64 = 0.5;

/// Tuning of one adaptive limit: a config setting, declared (with its defaults and
/// [`AdaptiveSettings::validate`]) in `config/`.
pub use crate::config::AdaptiveSettings;

// Only the limit repairs its settings; the type and its validation are plain config data
// in `config/settings.rs`.
impl AdaptiveSettings {
    /// Replaces any invalid field by its default, so the bounds always hold.
    fn repaired(mut self) -> Self {
        let d = Self::default();
        if !(self.min_limit.is_finite() && self.min_limit >= 1.0) {
            self.min_limit = d.min_limit;
        }
        if !(self.max_limit.is_finite() && self.max_limit >= self.min_limit) {
            self.max_limit = d.max_limit.max(self.min_limit);
        }
        if !self.initial_limit.is_finite() {
            self.initial_limit = d.initial_limit;
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            self.smoothing = d.smoothing;
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 1.0) {
            self.tolerance = d.tolerance;
        }
        if self.probe_interval.is_zero() {
            self.probe_interval = d.probe_interval;
        }
        self
    }
}

/// A concurrency limit learned from latency. See the module docs.
#[derive(Debug)]
pub struct AdaptiveLimit {
    settings: AdaptiveSettings,
    limit: f64,
    /// Fast EWMA of RTTs, seconds.
    short_rtt: Option<f64>,
    /// Lowest `short_rtt` since the last probe, seconds.
    baseline_rtt: Option<f64>,
    next_probe: Instant,
    /// Growing by one per sample until latency first passes its tolerance.
    slow_start: bool,
    rng: StdRng,
}

impl AdaptiveLimit {
    /// A new limit at `initial_limit` (clamped); the first probe is due about
    /// one `probe_interval` after `now`. Invalid settings are repaired to defaults.
    pub fn new(settings: AdaptiveSettings, now: Instant) -> Self {
        Self::with_rng(settings, now, StdRng::from_entropy())
    }

    /// A limit under new `settings` that goes on from `previous` (a reload): its learned
    /// limit (clamped to the new bounds), latency estimates, probe schedule and phase.
    pub fn resumed(previous: &AdaptiveLimit, settings: AdaptiveSettings, now: Instant) -> Self {
        let mut this = Self::new(settings, now);
        this.limit = this.clamp(previous.limit);
        this.short_rtt = previous.short_rtt;
        this.baseline_rtt = previous.baseline_rtt;
        this.next_probe = previous.next_probe;
        this.slow_start = previous.slow_start;
        this
    }

    fn with_rng(settings: AdaptiveSettings, now: Instant, rng: StdRng) -> Self {
        debug_assert!(settings.validate().is_ok(), "{settings:?}");
        let settings = settings.repaired();
        let mut this = Self {
            limit: settings.initial_limit,
            settings,
            short_rtt: None,
            baseline_rtt: None,
            next_probe: now,
            slow_start: true,
            rng,
        };
        this.limit = this.clamp(this.limit);
        this.schedule_probe(now);
        this
    }

    /// Records one completed request: its round-trip time and how many were in
    /// flight when it started. `dropped` = failed by timeout/overload; it
    /// shrinks the limit and its RTT is not learned from.
    pub fn on_sample(&mut self, rtt: Duration, inflight: usize, dropped: bool, now: Instant) {
        if now >= self.next_probe {
            self.start_probe(now);
        }
        if dropped {
            self.slow_start = false;
            self.limit = self.clamp(self.limit * DROP_FACTOR);
            return;
        }
        let rtt = rtt.as_secs_f64();
        let short = match self.short_rtt {
            Some(s) => s + SHORT_ALPHA * (rtt - s),
            None => rtt,
        };
        self.short_rtt = Some(short);
        let baseline = self.baseline_rtt.map_or(short, |b| b.min(short));
        self.baseline_rtt = Some(baseline);

        let within = short <= self.settings.tolerance * baseline;
        let used = (inflight as f64) >= self.limit / 2.0;
        if self.slow_start {
            if within {
                if used {
                    self.limit = self.clamp(self.limit + 1.0);
                }
                return;
            }
            self.slow_start = false;
        }
        let target = if within {
            if !used {
                return; // idle: do not grow a limit nobody is using
            }
            self.limit + self.limit.sqrt()
        } else {
            let gradient = (self.settings.tolerance * baseline / short).clamp(0.5, 1.0);
            self.limit * gradient
        };
        let s = self.settings.smoothing;
        self.limit = self.clamp(self.limit * (1.0 - s) + target * s);
    }

    /// The learned limit, always within `[min_limit, max_limit]`.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// `inflight / limit`; 1.0 means the learned limit is fully used.
    pub fn utilisation(&self, inflight: usize) -> f64 {
        inflight as f64 / self.limit()
    }

    fn start_probe(&mut self, now: Instant) {
        self.baseline_rtt = None;
        self.limit = self.clamp(self.limit * PROBE_DRAIN_FACTOR);
        self.schedule_probe(now);
    }

    fn schedule_probe(&mut self, now: Instant) {
        let jitter: f64 = self.rng.gen_range(0.5..1.5);
        self.next_probe = now + self.settings.probe_interval.mul_f64(jitter);
    }

    fn clamp(&self, limit: f64) -> f64 {
        limit.clamp(self.settings.min_limit, self.settings.max_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limit_at(settings: AdaptiveSettings, now: Instant) -> AdaptiveLimit {
        AdaptiveLimit::with_rng(settings, now, StdRng::seed_from_u64(7))
    }

    /// Feeds `n` samples of `rtt` with the limit fully used, 1 ms apart.
    fn load(l: &mut AdaptiveLimit, n: usize, rtt: Duration, now: &mut Instant) {
        for _ in 0..n {
            *now += MS;
            let inflight = l.limit().ceil() as usize;
            l.on_sample(rtt, inflight, false, *now);
        }
    }

    #[test]
    fn adaptive_limit_never_below_floor_nor_above_max() {
        let mut rng = StdRng::seed_from_u64(42);
        let s = AdaptiveSettings {
            probe_interval: Duration::from_millis(200),
            ..AdaptiveSettings::default()
        };
        let (floor, max) = (s.min_limit, s.max_limit);
        let mut now = Instant::now();
        let mut l = limit_at(s, now);
        for _ in 0..50_000 {
            now += Duration::from_millis(rng.gen_range(0..50));
            let rtt = match rng.gen_range(0..10) {
                0 => Duration::ZERO,
                1 => Duration::from_secs(rng.gen_range(1_000..1_000_000)),
                2 => Duration::MAX,
                _ => Duration::from_micros(rng.gen_range(1..200_000)),
            };
            let inflight = rng.gen_range(0..2_000);
            l.on_sample(rtt, inflight, rng.gen_bool(0.1), now);
            assert!(l.limit() >= floor && l.limit() <= max, "{}", l.limit());
            assert!(l.limit().is_finite());
        }
    }

    #[test]
    fn stable_low_latency_under_load_grows_toward_max() {
        let mut now = Instant::now();
        let mut l = limit_at(AdaptiveSettings::default(), now);
        load(&mut l, 2_000, 10 * MS, &mut now);
        assert!(l.limit() > 900.0, "{}", l.limit());
    }

    #[test]
    fn rising_latency_under_load_shrinks_but_not_below_floor() {
        let mut now = Instant::now();
        let mut l = limit_at(AdaptiveSettings::default(), now);
        load(&mut l, 500, 10 * MS, &mut now);
        let before = l.limit();
        let mut last = before;
        for _ in 0..500 {
            load(&mut l, 1, 50 * MS, &mut now);
            assert!(l.limit() <= last + 1e-9 && l.limit() >= 10.0);
            last = l.limit();
        }
        assert!(l.limit() < before / 10.0, "{before} -> {}", l.limit());
    }

    #[test]
    fn probes_under_load_keep_floor_and_limit_recovers() {
        let s = AdaptiveSettings {
            min_limit: 50.0,
            probe_interval: Duration::from_secs(1),
            ..AdaptiveSettings::default()
        };
        let mut now = Instant::now();
        let mut l = limit_at(s, now);
        load(&mut l, 1_000, 10 * MS, &mut now);
        let healthy = l.limit();
        // Latency degrades and stays high across many (jittered) probes.
        for _ in 0..10_000 {
            load(&mut l, 1, 60 * MS, &mut now);
            assert!(l.limit() >= 50.0, "{}", l.limit());
        }
        // Latency back to its old baseline: the limit recovers.
        for _ in 0..2_000 {
            load(&mut l, 1, 10 * MS, &mut now);
            assert!(l.limit() >= 50.0);
        }
        assert!(l.limit() > 0.9 * healthy, "{healthy} -> {}", l.limit());
    }

    #[test]
    fn probe_halves_but_respects_floor() {
        let s = AdaptiveSettings {
            initial_limit: 60.0,
            min_limit: 50.0,
            ..AdaptiveSettings::default()
        };
        let mut now = Instant::now();
        let mut l = limit_at(s, now);
        now += Duration::from_secs(46); // past any jittered probe (≤ 45 s)
        l.on_sample(10 * MS, 0, false, now);
        assert_eq!(l.limit(), 50.0);
    }

    #[test]
    fn idle_service_does_not_inflate_limit() {
        let mut now = Instant::now();
        let mut l = limit_at(AdaptiveSettings::default(), now);
        for _ in 0..5_000 {
            now += MS;
            l.on_sample(MS, 2, false, now);
        }
        assert!(l.limit() <= 20.0, "{}", l.limit());
        assert_eq!(l.utilisation(5), 0.25);
    }

    #[test]
    fn dropped_sample_shrinks_and_invalid_settings_are_caught() {
        let now = Instant::now();
        let mut l = limit_at(AdaptiveSettings::default(), now);
        l.on_sample(MS, 20, true, now);
        assert!((l.limit() - 18.0).abs() < 1e-9);
        let bad = AdaptiveSettings {
            min_limit: 0.0,
            ..AdaptiveSettings::default()
        };
        assert!(bad.validate().is_err());
        assert!(AdaptiveSettings::default().validate().is_ok());
    }

    /// The RTT a backend of `threads` workers and `service` per request gives with
    /// `inflight` requests in it: the service time, plus queueing once it is full.
    fn backend_rtt(threads: f64, service: Duration, inflight: usize) -> Duration {
        service.mul_f64((inflight as f64 / threads).max(1.0))
    }

    #[test]
    fn settles_where_latency_meets_its_tolerance_not_above_it() {
        // 10 threads, 50 ms: latency passes 1.5x once more than 15 are in flight.
        // Light traffic first (the no-load latency is seen), then a spike that
        // keeps the whole limit in use.
        let settings = AdaptiveSettings::default();
        let mut now = Instant::now();
        let mut l = limit_at(settings.clone(), now);
        let service = Duration::from_millis(50);
        for _ in 0..100 {
            now += Duration::from_millis(20);
            l.on_sample(backend_rtt(10.0, service, 3), 3, false, now);
        }
        let mut worst = 0.0f64;
        for i in 0..4000 {
            now += Duration::from_millis(2);
            let inflight = l.limit().ceil() as usize;
            let rtt = backend_rtt(10.0, service, inflight);
            l.on_sample(rtt, inflight, false, now);
            if i >= 2000 {
                worst = worst.max(rtt.as_secs_f64() / service.as_secs_f64());
            }
        }
        assert!(
            worst <= settings.tolerance + 0.15,
            "settled at {:.1} with latency {worst:.2}x the baseline",
            l.limit()
        );
        assert!(l.limit() >= 10.0, "limit {:.1} below the pool", l.limit());
    }

    #[test]
    fn slow_start_finds_a_large_pool_within_a_few_round_trips() {
        // 200 threads at 20 ms; starting from 20 the limit must reach the pool fast,
        // not creep up while the proxy sheds.
        let mut now = Instant::now();
        let mut l = limit_at(AdaptiveSettings::default(), now);
        let service = Duration::from_millis(20);
        let mut samples = 0;
        while l.limit() < 200.0 && samples < 1000 {
            now += MS;
            let inflight = l.limit().ceil() as usize;
            l.on_sample(backend_rtt(200.0, service, inflight), inflight, false, now);
            samples += 1;
        }
        assert!(
            samples <= 200,
            "took {samples} samples to reach the pool (limit {:.0})",
            l.limit()
        );
    }
}
