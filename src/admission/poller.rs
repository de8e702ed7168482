//! The actuator poller: one task per backend that reads the backend's own busy/max
//! from Spring Boot Actuator every interval and stores good reports in a
//! [`ReportedSignal`]. It uses its own small connection pool, outside the data plane's.
//!
//! Not here: parsing (`actuator.rs`) and deciding which signal is in force (`signal.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, MissedTickBehavior};

use super::actuator::{parse_json_value, parse_prometheus, ActuatorFormat, MetricNames};
use super::signal::{validate, Report, ReportedSignal, STALE_INTERVALS};
use crate::http::tls_client::{Connector, TlsClient};
use crate::metrics::{self as m, CounterTable, Label as _};

/// Largest actuator body read; a Spring Boot Prometheus scrape is usually well under 1 MiB.
const MAX_BODY_BYTES: usize = 4 << 20;
/// Idle poller connections are closed after this long: below the usual backend
/// keep-alive (Tomcat 20-60 s), so the poller rarely reuses a connection the backend closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const USER_AGENT: &str = "loadgate-actuator-poller";

/// How to poll one upstream's actuator: a config setting, declared in `config/`.
pub use crate::config::ActuatorSettings;

// What the poller does with its settings. The type, its defaults and its validation rules
// (`problems`) are plain config data in `config/settings.rs`.
impl ActuatorSettings {
    /// The metric names in use: the overrides, else Tomcat's names for the format.
    pub fn metric_names(&self) -> MetricNames {
        let tomcat = MetricNames::tomcat(self.format);
        MetricNames {
            busy: self.busy_metric.clone().unwrap_or(tomcat.busy),
            max: self.max_metric.clone().unwrap_or(tomcat.max),
        }
    }

    /// Age from which a report no longer counts at all: [`STALE_INTERVALS`] poll intervals.
    pub fn stale_after(&self) -> Duration {
        self.interval.saturating_mul(STALE_INTERVALS)
    }

    /// Whether polls go to the backend's own connector (no `base_url`, or one naming
    /// the backend's own address), where they take a worker from its pool.
    pub fn on_main_connector(&self, backend: &str) -> bool {
        match &self.base_url {
            None => true,
            Some(base) => base
                .parse::<http::Uri>()
                .ok()
                .and_then(|uri| uri.authority().map(|a| a.as_str() == backend))
                .unwrap_or(false),
        }
    }

    /// The URLs one poll fetches: busy then max (JSON), or the one scrape (Prometheus).
    fn urls(&self, backend: &str) -> Vec<String> {
        let base = match &self.base_url {
            Some(base) => base.trim_end_matches('/').to_string(),
            None => format!("http://{backend}"),
        };
        match self.format {
            ActuatorFormat::Prometheus => vec![format!("{base}/actuator/prometheus")],
            ActuatorFormat::Json => {
                let names = self.metric_names();
                let tag = self
                    .connector
                    .as_deref()
                    .map(|c| format!("?tag=name:{}", percent_encode(c)))
                    .unwrap_or_default();
                vec![
                    format!("{base}/actuator/metrics/{}{tag}", names.busy),
                    format!("{base}/actuator/metrics/{}{tag}", names.max),
                ]
            }
        }
    }
}

/// Why one poll produced no report.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PollError {
    #[error("{url} answered 404 Not Found: {}", not_found_advice(url))]
    NotFound { url: String },
    #[error("the actuator did not answer within {after:?}")]
    Timeout { after: Duration },
    #[error("cannot reach the actuator: {0}")]
    Connect(String),
    #[error("the actuator answered {}{}", status_text(*.0), status_advice(*.0))]
    Status(u16),
    #[error("the actuator's answer cannot be read: {0}")]
    Malformed(String),
    #[error("the actuator's figures cannot be used: {0}")]
    Invalid(String),
}

fn not_found_advice(url: &str) -> &'static str {
    if url.contains("/actuator/prometheus") {
        "/actuator/prometheus needs micrometer-registry-prometheus on the classpath and \
         management.endpoints.web.exposure.include=prometheus"
    } else {
        "the metric is not registered or not exposed: Tomcat's thread metrics need \
         server.tomcat.mbeanregistry.enabled=true, and the endpoint needs \
         management.endpoints.web.exposure.include=metrics (for Jetty or Undertow, \
         set busy_metric and max_metric)"
    }
}

fn status_text(code: u16) -> String {
    match StatusCode::from_u16(code) {
        Ok(status) => status.to_string(),
        Err(_) => code.to_string(),
    }
}

fn status_advice(code: u16) -> &'static str {
    match code {
        401 | 403 => {
            ": the actuator is protected; permit loadgate's address, \
             or serve the actuator on management.server.port and point base_url at it"
        }
        _ => "",
    }
}

/// Spawns the poller of one backend (`host:port`) of `upstream`.
///
/// It polls at once, then every `settings.interval`; each poll is bounded by
/// `settings.timeout`. `own()` is this proxy's requests in flight to the backend,
/// read around the busy sample so the report can tell them from external load.
/// `saturated()` tells whether the proxy's own local signal says the pool is
/// saturated, to tell a slow actuator from a broken one in the logs.
/// The task ends by itself when nobody else holds `signal`; abort it to stop it sooner.
/// With `enabled: false` the task ends at once. An `https://` base URL is polled over TLS
/// with `tls`, the upstream's client.
pub fn spawn_poller(
    upstream: String,
    backend: String,
    settings: ActuatorSettings,
    signal: Arc<ReportedSignal>,
    own: impl Fn() -> usize + Send + Sync + 'static,
    saturated: impl Fn() -> bool + Send + 'static,
    tls: Option<TlsClient>,
) -> tokio::task::JoinHandle<()> {
    if !settings.enabled {
        tracing::debug!(upstream, backend, "actuator polling disabled");
        return tokio::spawn(async {});
    }
    let poller = Poller::new(&backend, &settings, tls);
    let gauges = PollGauges::new(&upstream, &backend);
    tokio::spawn(async move {
        let mut log = LogState::default();
        let mut tick = tokio::time::interval(settings.interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if Arc::strong_count(&signal) == 1 {
                tracing::debug!(
                    upstream,
                    backend,
                    "actuator poller stopping: signal dropped"
                );
                return;
            }
            let started = Instant::now();
            let result = poller.poll(&own).await.and_then(|sample| {
                validate(sample.busy, sample.max).map_err(PollError::Invalid)?;
                Ok(Report {
                    busy: sample.busy,
                    max: sample.max,
                    at: started,
                    own: sample.own as f64,
                    poll_workers: poller.poll_workers(),
                })
            });
            gauges.record(&result, &signal);
            match result {
                Ok(report) => {
                    signal.record_ok(report);
                    match log.on_ok() {
                        Some(OkNote::First) => tracing::info!(
                            upstream,
                            backend,
                            busy = report.busy,
                            max = report.max,
                            "reported signal available from the actuator"
                        ),
                        Some(OkNote::Recovered { failures }) => tracing::info!(
                            upstream,
                            backend,
                            busy = report.busy,
                            max = report.max,
                            "actuator answering again after {failures} failed polls"
                        ),
                        None => {}
                    }
                }
                Err(error) => {
                    signal.record_error(&error);
                    let saturated = matches!(error, PollError::Timeout { .. })
                        && (saturated() || signal.latest().is_some_and(|r| r.busy >= r.max));
                    if log.on_error(ErrorKind::of(&error, saturated)) {
                        log_error(&upstream, &backend, &error, saturated);
                    }
                }
            }
        }
    })
}

crate::metrics::label_values! {
    /// How one poll ended: the `result` label of `loadgate_actuator_polls_total`.
    enum PollResult {
        Ok => "ok",
        NotFound => "not_found",
        Timeout => "timeout",
        Connect => "connect",
        Status => "status",
        Malformed => "malformed",
        Invalid => "invalid",
    }
}

impl PollResult {
    fn of<T>(result: &Result<T, PollError>) -> PollResult {
        match result {
            Ok(_) => PollResult::Ok,
            Err(PollError::NotFound { .. }) => PollResult::NotFound,
            Err(PollError::Timeout { .. }) => PollResult::Timeout,
            Err(PollError::Connect(_)) => PollResult::Connect,
            Err(PollError::Status(_)) => PollResult::Status,
            Err(PollError::Malformed(_)) => PollResult::Malformed,
            Err(PollError::Invalid(_)) => PollResult::Invalid,
        }
    }
}

/// One backend's poll counters by result and whether its report still counts, all
/// registered (at zero) when the poller starts, so an alert sees them before any failure.
struct PollGauges {
    polls: CounterTable<PollResult>,
    fresh: metrics::Gauge,
}

impl PollGauges {
    fn new(upstream: &str, backend: &str) -> PollGauges {
        let fresh = metrics::gauge!(m::ACTUATOR_REPORT_FRESH,
            m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_BACKEND => backend.to_string());
        fresh.set(0.0);
        PollGauges {
            polls: CounterTable::new(|result: PollResult| {
                metrics::counter!(m::ACTUATOR_POLLS_TOTAL,
                    m::LABEL_UPSTREAM => upstream.to_string(),
                    m::LABEL_BACKEND => backend.to_string(),
                    m::LABEL_RESULT => result.as_str())
            }),
            fresh,
        }
    }

    /// Counts one poll; a good one is recorded in `signal` after this, so freshness is
    /// read as of the report it brings.
    fn record(&self, result: &Result<Report, PollError>, signal: &ReportedSignal) {
        self.polls.increment(PollResult::of(result));
        let fresh = match result {
            Ok(_) => true,
            Err(_) => signal
                .estimate()
                .is_some_and(|e| e.weight(Instant::now(), signal.interval()) > 0.0),
        };
        self.fresh.set(if fresh { 1.0 } else { 0.0 });
    }
}

fn log_error(upstream: &str, backend: &str, error: &PollError, saturated: bool) {
    if saturated {
        tracing::warn!(upstream, backend, %error,
            "actuator timed out while the pool is saturated: the actuator shares the worker pool; \
             set management.server.port and point base_url at it");
    } else {
        tracing::warn!(upstream, backend, %error,
            "actuator poll failed; the local signal alone is in force until it answers");
    }
}

/// The poller's own HTTP client and the URLs of one poll.
struct Poller {
    client: Client<Connector, Empty<Bytes>>,
    format: ActuatorFormat,
    names: MetricNames,
    connector: Option<String>,
    urls: Vec<String>,
    timeout: Duration,
    /// The actuator shares the backend's connector and so its worker pool.
    main_connector: bool,
}

/// One poll's figures as reported, not yet validated, with this proxy's own
/// in-flight count to the backend while the busy figure was sampled.
struct Sample {
    busy: f64,
    max: f64,
    own: usize,
}

impl Poller {
    fn new(backend: &str, settings: &ActuatorSettings, tls: Option<TlsClient>) -> Poller {
        let urls = settings.urls(backend);
        let connector = Connector::new(settings.timeout, tls);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // One connection per concurrent request of a poll: 2 for JSON, 1 for Prometheus.
            .pool_max_idle_per_host(urls.len())
            .build(connector);
        Poller {
            client,
            format: settings.format,
            names: settings.metric_names(),
            connector: settings.connector.clone(),
            urls,
            timeout: settings.timeout,
            main_connector: settings.on_main_connector(backend),
        }
    }

    /// Workers the poll holds while the backend serves it: on the main connector
    /// the request that reads the busy count is itself one of the busy.
    fn poll_workers(&self) -> f64 {
        if self.main_connector {
            1.0
        } else {
            0.0
        }
    }

    /// One poll. The busy figure is fetched on its own, between two reads of `own`,
    /// and on the main connector the max figure only after it, so the busy count
    /// includes exactly one worker of the poll's.
    async fn poll(&self, own: &(dyn Fn() -> usize + Sync)) -> Result<Sample, PollError> {
        let work = async {
            match self.format {
                ActuatorFormat::Json => {
                    let before = own();
                    let (busy, max) = if self.main_connector {
                        let busy = self.fetch(&self.urls[0]).await;
                        (busy, None)
                    } else {
                        let (busy, max) =
                            tokio::join!(self.fetch(&self.urls[0]), self.fetch(&self.urls[1]));
                        (busy, Some(max))
                    };
                    let after = own();
                    let max = match max {
                        Some(max) => max,
                        None => self.fetch(&self.urls[1]).await,
                    };
                    let busy = parse_json_value(&busy?)
                        .map_err(|e| PollError::Malformed(format!("{}: {e}", self.names.busy)))?;
                    let max = parse_json_value(&max?)
                        .map_err(|e| PollError::Malformed(format!("{}: {e}", self.names.max)))?;
                    Ok(Sample {
                        busy,
                        max,
                        own: before.max(after),
                    })
                }
                ActuatorFormat::Prometheus => {
                    let before = own();
                    let body = self.fetch(&self.urls[0]).await?;
                    let after = own();
                    let text = std::str::from_utf8(&body)
                        .map_err(|e| PollError::Malformed(format!("not UTF-8 text: {e}")))?;
                    let (busy, max) =
                        parse_prometheus(text, &self.names, self.connector.as_deref())
                            .map_err(|e| PollError::Malformed(e.to_string()))?;
                    Ok(Sample {
                        busy,
                        max,
                        own: before.max(after),
                    })
                }
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| PollError::Timeout {
                after: self.timeout,
            })?
    }

    async fn fetch(&self, url: &str) -> Result<Bytes, PollError> {
        let accept = match self.format {
            ActuatorFormat::Json => "application/json",
            // The classic text format, not OpenMetrics.
            ActuatorFormat::Prometheus => "text/plain;version=0.0.4;q=1.0, */*;q=0.1",
        };
        let request = Request::get(url)
            .header(header::ACCEPT, accept)
            .header(header::USER_AGENT, USER_AGENT)
            .body(Empty::new())
            .map_err(|e| PollError::Connect(format!("bad URL {url:?}: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| PollError::Connect(crate::http::error::error_chain(&e)))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(PollError::NotFound {
                    url: url.to_string(),
                })
            }
            other => return Err(PollError::Status(other.as_u16())),
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| PollError::Malformed(format!("reading the body of {url}: {e}")))?;
        Ok(body.to_bytes())
    }
}

/// Percent-encodes a query value, keeping RFC 3986 unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The kind of a poll error, as far as logging cares: a change of kind is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorKind {
    NotFound,
    /// `saturated`: the pool was full when the actuator timed out.
    Timeout {
        saturated: bool,
    },
    Connect,
    Status(u16),
    Malformed,
    Invalid,
}

impl ErrorKind {
    fn of(error: &PollError, saturated: bool) -> ErrorKind {
        match error {
            PollError::NotFound { .. } => ErrorKind::NotFound,
            PollError::Timeout { .. } => ErrorKind::Timeout { saturated },
            PollError::Connect(_) => ErrorKind::Connect,
            PollError::Status(code) => ErrorKind::Status(*code),
            PollError::Malformed(_) => ErrorKind::Malformed,
            PollError::Invalid(_) => ErrorKind::Invalid,
        }
    }
}

/// What a good poll is worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OkNote {
    First,
    Recovered { failures: u64 },
}

/// Decides which poll outcomes are logged: the first report, each change of error
/// kind, and the recovery; never the same failure every poll.
#[derive(Debug, Default)]
struct LogState {
    ever_ok: bool,
    /// The kind of the current run of failures, if the last poll failed.
    failing: Option<ErrorKind>,
    failures: u64,
}

impl LogState {
    fn on_ok(&mut self) -> Option<OkNote> {
        let note = if self.failing.is_some() {
            Some(OkNote::Recovered {
                failures: self.failures,
            })
        } else if !self.ever_ok {
            Some(OkNote::First)
        } else {
            None
        };
        self.ever_ok = true;
        self.failing = None;
        self.failures = 0;
        note
    }

    /// Whether this failure is news worth a log line.
    fn on_error(&mut self, kind: ErrorKind) -> bool {
        self.failures += 1;
        let news = match (self.failing, kind) {
            // A saturated timeout episode stays one episode while the pool drains a bit.
            (
                Some(ErrorKind::Timeout { saturated: true }),
                ErrorKind::Timeout { saturated: false },
            ) => false,
            (previous, kind) => previous != Some(kind),
        };
        if news {
            self.failing = Some(kind);
        }
        news
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: ErrorKind = ErrorKind::Timeout { saturated: false };
    const SATURATED: ErrorKind = ErrorKind::Timeout { saturated: true };

    #[test]
    fn the_same_failure_is_logged_once() {
        let mut log = LogState::default();
        assert!(log.on_error(ErrorKind::NotFound));
        assert!(!log.on_error(ErrorKind::NotFound));
        assert!(!log.on_error(ErrorKind::NotFound));
        assert_eq!(log.on_ok(), Some(OkNote::Recovered { failures: 3 }));
        assert_eq!(log.on_ok(), None);
        // A new episode after recovery is news again.
        assert!(log.on_error(ErrorKind::NotFound));
    }

    #[test]
    fn first_report_and_changes_of_kind_are_logged() {
        let mut log = LogState::default();
        assert_eq!(log.on_ok(), Some(OkNote::First));
        assert_eq!(log.on_ok(), None);
        assert!(log.on_error(ErrorKind::Connect));
        assert!(log.on_error(ErrorKind::Status(503)));
        assert!(!log.on_error(ErrorKind::Status(503)));
        assert!(log.on_error(ErrorKind::Status(500)));
        assert!(log.on_error(ErrorKind::Invalid));
        assert!(log.on_error(ErrorKind::Malformed));
    }

    #[test]
    fn a_saturated_timeout_episode_is_logged_once() {
        let mut log = LogState::default();
        assert!(log.on_error(TIMEOUT));
        assert!(!log.on_error(TIMEOUT));
        // The pool fills up: now the advice about management.server.port is news.
        assert!(log.on_error(SATURATED));
        assert!(!log.on_error(SATURATED));
        // Flapping around saturation does not repeat it.
        assert!(!log.on_error(TIMEOUT));
        assert!(!log.on_error(SATURATED));
        assert_eq!(log.on_ok(), Some(OkNote::Recovered { failures: 6 }));
    }

    #[test]
    fn defaults() {
        let s = ActuatorSettings::default();
        assert!(s.enabled);
        assert_eq!(s.format, ActuatorFormat::Json);
        assert_eq!(s.interval, Duration::from_millis(250));
        assert_eq!(s.timeout, Duration::from_millis(200));
        assert_eq!(s.stale_after(), Duration::from_millis(750));
        assert_eq!(s.metric_names(), MetricNames::tomcat(ActuatorFormat::Json));
        assert!(s.problems().is_empty(), "{:?}", s.problems());
    }

    #[test]
    fn urls_per_format() {
        let json = ActuatorSettings::default();
        assert_eq!(
            json.urls("10.0.0.1:8080"),
            [
                "http://10.0.0.1:8080/actuator/metrics/tomcat.threads.busy",
                "http://10.0.0.1:8080/actuator/metrics/tomcat.threads.config.max"
            ]
        );
        let jetty = ActuatorSettings {
            base_url: Some("http://127.0.0.1:8082/".into()),
            busy_metric: Some("jetty.threads.busy".into()),
            max_metric: Some("jetty.threads.config.max".into()),
            connector: Some("http nio".into()),
            ..ActuatorSettings::default()
        };
        assert_eq!(
            jetty.urls("ignored:1"),
            [
                "http://127.0.0.1:8082/actuator/metrics/jetty.threads.busy?tag=name:http%20nio",
                "http://127.0.0.1:8082/actuator/metrics/jetty.threads.config.max?tag=name:http%20nio"
            ]
        );
        let prometheus = ActuatorSettings {
            format: ActuatorFormat::Prometheus,
            ..ActuatorSettings::default()
        };
        assert_eq!(prometheus.urls("b:1"), ["http://b:1/actuator/prometheus"]);
        assert_eq!(
            prometheus.metric_names(),
            MetricNames::tomcat(ActuatorFormat::Prometheus)
        );
    }

    #[test]
    fn problems_are_listed() {
        let bad = ActuatorSettings {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            base_url: Some("ftp://x:8082".into()),
            busy_metric: Some(" ".into()),
            ..ActuatorSettings::default()
        };
        let problems = bad.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("shorter than the interval"));
        assert!(problems[1].contains("must be an http:// or https:// URL"));
        assert!(problems[2].contains("busy_metric"));
        let with_actuator = ActuatorSettings {
            base_url: Some("http://x:8082/actuator/".into()),
            ..ActuatorSettings::default()
        };
        assert!(with_actuator.problems()[0].contains("must not include /actuator"));
    }

    #[test]
    fn errors_say_what_to_do() {
        let json = PollError::NotFound {
            url: "http://b/actuator/metrics/tomcat.threads.busy".into(),
        };
        assert!(json
            .to_string()
            .contains("server.tomcat.mbeanregistry.enabled=true"));
        let prometheus = PollError::NotFound {
            url: "http://b/actuator/prometheus".into(),
        };
        assert!(prometheus
            .to_string()
            .contains("micrometer-registry-prometheus"));
        assert!(prometheus
            .to_string()
            .contains("exposure.include=prometheus"));
        assert_eq!(
            PollError::Timeout {
                after: Duration::from_millis(250)
            }
            .to_string(),
            "the actuator did not answer within 250ms"
        );
        assert_eq!(
            PollError::Status(503).to_string(),
            "the actuator answered 503 Service Unavailable"
        );
        assert!(PollError::Status(401)
            .to_string()
            .contains("management.server.port"));
    }
}
