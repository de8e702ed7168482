//! Upstreams: the connection pool per upstream, its backends, balancing, passive
//! ejection after connect failures, and the in-flight count the utilisation signal
//! is built on.
//!
//! Not here: deciding whether to forward (admission) or what to do with the
//! response (caching, header rewriting); see `proxy.rs`.

mod health;
mod pool;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use rand::Rng;
use tokio::time::Instant;

use crate::admission::poller::spawn_poller;
use crate::admission::{Admission, Slots};
use crate::config::{ActuatorSettings, RetryConfig, RouteClass, ShedMode, UpstreamConfig};
use crate::http::body::ProxyBody;
use crate::http::error::UpstreamErrorKind;
use crate::http::tls_client::TlsClient;
use crate::metrics as m;

pub use health::spawn_health_checks;
pub use pool::OnInformational;
pub use pool::PoolStats;
use pool::{Pool, PoolSettings, SendFailure};
pub(crate) use pool::{Upgraded, UpgradedSlot};

/// One backend address of an upstream, with its live state.
#[derive(Debug)]
pub struct Backend {
    /// `host:port`.
    pub authority: String,
    /// `authority` as a `Host` header value, for requests that arrive without one.
    host_header: Option<http::HeaderValue>,
    inflight: AtomicUsize,
    healthy: AtomicBool,
    /// At least one health check has passed since start.
    confirmed: AtomicBool,
    health_gauge: metrics::Gauge,
    /// Failed connect attempts since the last successful one.
    connect_failures: AtomicU32,
    /// Out of rotation until then, after too many connect failures in a row.
    ejected_until: Mutex<Option<Instant>>,
    ejections: metrics::Counter,
    upstream: String,
}

impl Backend {
    fn new(upstream: &str, authority: &str) -> Backend {
        let health_gauge = metrics::gauge!(m::BACKEND_HEALTHY,
            m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_BACKEND => authority.to_string());
        health_gauge.set(1.0);
        let ejections = metrics::counter!(m::BACKEND_EJECTIONS_TOTAL,
            m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_BACKEND => authority.to_string());
        Backend {
            authority: authority.to_string(),
            host_header: http::HeaderValue::from_str(authority).ok(),
            inflight: AtomicUsize::new(0),
            // Optimistic until a health check says otherwise, so a fresh proxy serves at once.
            healthy: AtomicBool::new(true),
            confirmed: AtomicBool::new(false),
            health_gauge,
            connect_failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            ejections,
            upstream: upstream.to_string(),
        }
    }

    /// Taken out of rotation by consecutive connect failures, for a while.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    /// Ends a passive ejection early: an active health check saw the backend recover.
    fn clear_ejection(&self) {
        self.connect_failures.store(0, Ordering::Relaxed);
        *self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn connect_succeeded(&self) {
        self.connect_failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failed connect attempt; the `eject_after_connect_failures`-th in a row
    /// takes the backend out of rotation for `eject_duration`.
    fn connect_failed(&self, retry: &RetryConfig) {
        let failures = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = retry.eject_after_connect_failures;
        if threshold == 0 || failures < threshold {
            return;
        }
        self.connect_failures.store(0, Ordering::Relaxed);
        let mut until = self.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
        let was_ejected = until.is_some_and(|t| Instant::now() < t);
        *until = Some(Instant::now() + retry.eject_duration);
        if !was_ejected {
            self.ejections.increment(1);
            tracing::warn!(upstream = %self.upstream, backend = %self.authority,
                "{failures} connect attempts in a row failed; out of rotation for {}",
                fmt_duration(retry.eject_duration));
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Healthy and seen to pass a check: what `/readyz` asks for.
    pub fn is_confirmed_healthy(&self) -> bool {
        self.is_healthy() && self.confirmed.load(Ordering::Relaxed)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        self.health_gauge.set(if healthy { 1.0 } else { 0.0 });
    }
}

/// An upstream: a named group of backends behind one connection pool.
pub struct Upstream {
    pub name: String,
    pub config: UpstreamConfig,
    backends: Vec<Arc<Backend>>,
    pool: Pool,
    /// One per upstream, so its session cache lets every new connection resume.
    tls: Option<TlsClient>,
    inflight: Arc<AtomicUsize>,
    inflight_gauge: metrics::Gauge,
    /// Shedding state: the utilisation signal and the decision.
    pub admission: Admission,
    /// Stop the health checks and actuator pollers when the upstream is dropped
    /// (e.g. replaced on reload).
    _tasks: Vec<AbortOnDrop>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why forwarding to a backend failed, before any response head arrived.
#[derive(Debug)]
pub struct SendError {
    pub kind: UpstreamErrorKind,
    pub detail: String,
}

impl Upstream {
    /// Builds the upstream and starts its health checks on the current runtime.
    /// `workers` is the proxy's worker thread count, for the pool's per-worker stacks.
    pub fn start(config: &UpstreamConfig, workers: usize) -> Arc<Upstream> {
        Upstream::start_after(config, workers, None)
    }

    /// Builds the upstream that replaces `previous` (same name, changed config) on
    /// reload, keeping what still holds: each backend still listed keeps its health,
    /// ejection and in-flight count, the upstream its in-flight count (requests started
    /// before the reload release into it), and admission its signal history and adaptive
    /// limit. The pool starts afresh.
    pub fn start_after(
        config: &UpstreamConfig,
        workers: usize,
        previous: Option<&Upstream>,
    ) -> Arc<Upstream> {
        let mut upstream = Upstream::build(config, workers, previous);
        let sweeper = upstream.pool.spawn_sweeper();
        upstream._tasks.push(AbortOnDrop(sweeper));
        if config.health.enabled {
            let task = spawn_health_checks(
                upstream.name.clone(),
                upstream.backends.clone(),
                config.health.clone(),
                config.management_port,
                upstream.tls.clone(),
            );
            upstream._tasks.push(AbortOnDrop(task));
        }
        if config.actuator.enabled && config.shedding.mode != ShedMode::Off {
            for (i, backend) in config.backends.iter().enumerate() {
                // The pool counts as saturated when this proxy alone fills it.
                let inflight = upstream.inflight.clone();
                let capacity = config.max_workers as usize * config.backends.len();
                let mut settings = config.actuator.clone();
                if settings.base_url.is_none() {
                    settings.base_url = match (config.management_port, &upstream.tls) {
                        (Some(port), None) => {
                            Some(format!("http://{}", management_authority(backend, port)))
                        }
                        (Some(port), Some(_)) => {
                            Some(format!("https://{}", management_authority(backend, port)))
                        }
                        (None, Some(_)) => Some(format!("https://{backend}")),
                        (None, None) => None,
                    };
                }
                let own = upstream.backends[i].clone();
                let task = spawn_poller(
                    upstream.name.clone(),
                    backend.clone(),
                    settings,
                    upstream.admission.report_holder(i),
                    move || own.inflight(),
                    move || inflight.load(Ordering::Relaxed) >= capacity,
                    upstream.tls.clone(),
                );
                upstream._tasks.push(AbortOnDrop(task));
            }
        }
        let upstream = Arc::new(upstream);
        if config.shedding.mode != ShedMode::Off {
            spawn_episode_clock(Arc::downgrade(&upstream));
        }
        upstream
    }

    fn build(config: &UpstreamConfig, workers: usize, previous: Option<&Upstream>) -> Upstream {
        let inflight_gauge =
            metrics::gauge!(m::UPSTREAM_INFLIGHT, m::LABEL_UPSTREAM => config.name.clone());
        let previous = previous.filter(|p| p.name == config.name);
        let kept = |authority: &String| {
            let old = previous?
                .backends
                .iter()
                .find(|b| b.authority == *authority);
            old.cloned()
        };
        register_series(config);
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| kept(b).unwrap_or_else(|| Arc::new(Backend::new(&config.name, b))))
            .collect();
        let tls = config
            .tls
            .as_ref()
            .map(|settings| TlsClient::new(&config.name, settings));
        let settings = PoolSettings {
            idle_timeout: config.idle_timeout,
            max_idle: config.max_idle_per_backend,
            connect_timeout: config.connect_timeout,
            retry: config.retry.clone(),
            workers,
            tls: tls.clone(),
        };
        Upstream {
            name: config.name.clone(),
            config: config.clone(),
            pool: Pool::new(&config.name, settings, &backends),
            tls,
            backends,
            inflight: previous
                .map_or_else(|| Arc::new(AtomicUsize::new(0)), |p| p.inflight.clone()),
            inflight_gauge,
            admission: Admission::after(config, previous.map(|p| (&p.config, &p.admission))),
            _tasks: Vec::new(),
        }
    }

    /// An upstream with one backend and no health checks, for unit tests.
    pub fn for_tests(name: &str) -> Upstream {
        let config = UpstreamConfig {
            name: name.to_string(),
            backends: vec!["127.0.0.1:9".to_string()],
            max_workers: 10,
            connect_timeout: Duration::from_secs(1),
            response_header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_idle_per_backend: 1,
            management_port: None,
            health: crate::config::HealthConfig {
                enabled: false,
                path: "/health".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 1,
                fall: 1,
            },
            shedding: Default::default(),
            actuator: ActuatorSettings {
                enabled: false,
                ..Default::default()
            },
            adaptive: None,
            retry: Default::default(),
            tls: None,
        };
        Upstream::build(&config, 1, None)
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// `[upstream.tls]`: the pool's connections, health checks and actuator polls use it.
    pub fn tls(&self) -> Option<&TlsClient> {
        self.tls.as_ref()
    }

    /// Requests in flight from this proxy to this upstream.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Sets the in-flight and utilisation gauges to their values now; see
    /// [`crate::admission::Admission::publish_gauges`] for why not per request.
    pub fn publish_gauges(self: &Arc<Self>) {
        self.inflight_gauge.set(self.inflight() as f64);
        self.admission.publish_gauges(self);
    }

    /// Backends currently in rotation.
    pub fn healthy_count(&self) -> usize {
        self.backends.iter().filter(|b| b.is_healthy()).count()
    }

    /// True when at least one backend has passed a health check (or checks are off).
    pub fn is_ready(&self) -> bool {
        if !self.config.health.enabled {
            return true;
        }
        self.backends.iter().any(|b| b.is_confirmed_healthy())
    }

    /// What the connection pool has done: connections opened and reused, stale reuses, retries.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Idle pooled connections held right now.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// Picks a backend: the less loaded of two random healthy ones. Ejected backends
    /// (connect failures) are skipped unless every healthy one is ejected: then
    /// ejection is ignored, so it never empties the rotation by itself.
    pub fn pick(&self) -> Option<Arc<Backend>> {
        self.pick_other_than(&[], Fallback::None)
    }

    /// [`pick`](Upstream::pick), leaving out the backends in `tried`, and every ejected
    /// backend when the request has a stored copy to fall back on.
    fn pick_other_than(&self, tried: &[Arc<Backend>], fallback: Fallback) -> Option<Arc<Backend>> {
        let skip_ejected = fallback == Fallback::StoredCopy;
        // One backend: ejection never empties the rotation by itself, so only health
        // counts, unless a stored copy can answer instead.
        if let [only] = self.backends.as_slice() {
            let usable = only.is_healthy() && !(skip_ejected && only.is_ejected());
            return (usable && tried.is_empty()).then(|| only.clone());
        }
        let untried = |b: &&Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
        let mut healthy: Vec<&Arc<Backend>> = self
            .backends
            .iter()
            .filter(untried)
            .filter(|b| b.is_healthy() && !b.is_ejected())
            .collect();
        if healthy.is_empty() && !skip_ejected {
            healthy = self
                .backends
                .iter()
                .filter(untried)
                .filter(|b| b.is_healthy())
                .collect();
        }
        match healthy.len() {
            0 => None,
            1 => Some(healthy[0].clone()),
            n => {
                let mut rng = rand::thread_rng();
                let a = rng.gen_range(0..n);
                let b = (a + rng.gen_range(1..n)) % n;
                let (a, b) = (healthy[a], healthy[b]);
                Some(if b.inflight() < a.inflight() { b } else { a }.clone())
            }
        }
    }

    /// Picks a backend, binds `reservation` to it and sends `req` (its URI in origin
    /// form), waiting for the response head within the response-header timeout. A
    /// request no connection could be opened for was never sent, so it goes to another
    /// healthy backend, each tried once; the last backend left gets the configured
    /// connect attempts with backoff. The error names the backend it came from.
    ///
    /// With a stored copy to fall back on ([`Fallback::StoredCopy`]), a backend that
    /// cannot be reached is given up on at once: one connect attempt, and no ejected
    /// backend tried, so the copy answers in a connect's time instead of after every
    /// retry's backoff.
    ///
    /// The backend's interim (1xx) responses before the final one go to `informational`.
    pub async fn forward(
        &self,
        reservation: &mut Reservation,
        req: Request<ProxyBody>,
        fallback: Fallback,
        informational: Option<&OnInformational>,
    ) -> Result<Response<ProxyBody>, (SendError, Option<Arc<Backend>>)> {
        let timeout = self.config.response_header_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || SendError {
            kind: UpstreamErrorKind::HeaderTimeout,
            detail: format!("no response head within {}", fmt_duration(timeout)),
        };
        // The backends that could not be connected to (allocated only on a failure).
        let mut failed: Vec<Arc<Backend>> = Vec::new();
        let mut req = req;
        loop {
            let Some(backend) = self.pick_other_than(&failed, fallback) else {
                let detail = match fallback {
                    Fallback::None => "no backend passes its health check",
                    Fallback::StoredCopy => {
                        "no backend passes its health check or is in rotation after failed connects"
                    }
                };
                let error = SendError {
                    kind: UpstreamErrorKind::NoHealthyBackend,
                    detail: detail.to_string(),
                };
                return Err((error, None));
            };
            reservation.bind(&backend);
            let last = !self.backends.iter().any(|b| {
                !Arc::ptr_eq(b, &backend)
                    && b.is_healthy()
                    && !failed.iter().any(|f| Arc::ptr_eq(f, b))
            });
            let attempts = if last && fallback == Fallback::None {
                self.config.retry.connect_attempts
            } else {
                1
            };
            // Boxed: the exchange's future is the largest part of the request's, and every
            // future around it (this one, the handler's stages, hyper's task) is moved
            // whole when created; boxed, they move a pointer instead of ~2 KiB.
            let sent = Box::pin(self.pool.send_with(&backend, req, attempts, informational));
            match tokio::time::timeout_at(deadline, sent).await {
                Ok(Ok((response, _reused))) => return Ok(response),
                Ok(Err(SendFailure {
                    error,
                    unsent: Some(unsent),
                })) if !last => {
                    tracing::debug!(upstream = %self.name, backend = %backend.authority, error = %error.detail,
                        "could not connect; sending the request to another backend");
                    failed.push(backend);
                    req = unsent;
                }
                Ok(Err(failure)) => return Err((failure.error, Some(backend))),
                Err(_) => return Err((timed_out(), Some(backend))),
            }
        }
    }
}

/// What a request falls back on when its upstream fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Nothing: the backend gets every chance (connect retries with backoff, and an
    /// only backend is tried even while ejected).
    None,
    /// A stored copy answers instead (stale-if-error): fail fast.
    StoredCopy,
}

/// One request counted in flight to an upstream, from admission until its response
/// body ends or is dropped, and to its backend once [`bind`](Reservation::bind) names
/// one. Dropping it frees both counts and wakes a queued request.
pub struct Reservation {
    upstream: Arc<Upstream>,
    backend: Option<Arc<Backend>>,
}

impl Reservation {
    /// Also counts the request against the backend it is sent to.
    pub fn bind(&mut self, backend: &Arc<Backend>) {
        if let Some(previous) = self.backend.replace(backend.clone()) {
            previous.inflight.fetch_sub(1, Ordering::Relaxed);
        }
        backend.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// The backend the request was last sent to, if any.
    pub fn backend(&self) -> Option<&Arc<Backend>> {
        self.backend.as_ref()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(backend) = &self.backend {
            backend.inflight.fetch_sub(1, Ordering::Relaxed);
        }
        self.upstream.inflight.fetch_sub(1, Ordering::AcqRel);
        self.upstream.admission.on_release();
    }
}

impl Slots for Arc<Upstream> {
    type Reservation = Reservation;

    fn inflight(&self) -> usize {
        Upstream::inflight(self)
    }

    fn backend_in_rotation(&self, i: usize) -> bool {
        self.backends.get(i).is_some_and(|b| b.is_healthy())
    }

    fn try_reserve(&self, limit: Option<usize>) -> Option<Reservation> {
        let counted = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match limit {
                Some(limit) if n >= limit => None,
                _ => Some(n + 1),
            });
        counted.ok()?;
        Some(Reservation {
            upstream: self.clone(),
            backend: None,
        })
    }
}

/// Ends shedding episodes on time, whether or not requests arrive: ticks every
/// 100 ms until the upstream is dropped (a reload replaces it).
fn spawn_episode_clock(upstream: std::sync::Weak<Upstream>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = tick.tick().await;
            let Some(upstream) = upstream.upgrade() else {
                return;
            };
            upstream.admission.tick(now);
        }
    });
}

/// Sets the upstream's class thresholds and registers its error and upgrade series at
/// zero, so a dashboard draws the thresholds next to the utilisation and an alert on
/// `increase(loadgate_upstream_errors_total[..])` sees the series before the first error.
fn register_series(config: &UpstreamConfig) {
    for class in RouteClass::ALL {
        metrics::gauge!(m::ADMISSION_THRESHOLD,
            m::LABEL_UPSTREAM => config.name.clone(), m::LABEL_CLASS => class.as_str())
        .set(config.shedding.thresholds.for_class(class));
    }
    for kind in UpstreamErrorKind::ALL {
        metrics::counter!(m::UPSTREAM_ERRORS_TOTAL,
            m::LABEL_UPSTREAM => config.name.clone(), m::LABEL_KIND => kind.as_str())
        .absolute(0);
    }
    for outcome in ["switched", "declined", "disabled", "failed"] {
        metrics::counter!(m::UPGRADES_TOTAL,
            m::LABEL_UPSTREAM => config.name.clone(), m::LABEL_OUTCOME => outcome)
        .absolute(0);
    }
    // Registered, not set: tunnels of the generation a reload replaces are still open.
    metrics::gauge!(m::UPGRADED_CONNECTIONS_OPEN, m::LABEL_UPSTREAM => config.name.clone())
        .increment(0.0);
}

/// `host:port` of a backend's management port: its own host with `port`.
pub fn management_authority(backend: &str, port: u16) -> String {
    let host = backend.rsplit_once(':').map_or(backend, |(host, _)| host);
    format!("{host}:{port}")
}

fn fmt_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
