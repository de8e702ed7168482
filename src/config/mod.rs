//! Configuration: the validated `Config` the proxy runs on, and the TOML loader that
//! builds it. Loading reports every error at once, each with its line.
//!
//! A leaf of plain data: it imports nothing from the rest of the crate. The settings types
//! other layers run on (actuator, adaptive limit, cache in `settings.rs`; the simulated
//! backend in `sim.rs`) are declared here, and every default is in [`defaults`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod listener;
mod load;
mod raw;
mod rewrite;
mod section;
mod settings;
mod sim;
#[cfg(test)]
mod tests;
mod upstream_tls;
mod validate;

pub use listener::{Certificate, ListenerConfig, TlsConfig, TlsVersion};
pub use rewrite::{HeaderRules, RouteRewrite};
pub use settings::{ActuatorFormat, ActuatorSettings, AdaptiveSettings, CacheSettings, Cidr};
pub use sim::{usable_service_time_ms, Distribution, SimConfig, SimRoute, SIM_MAX_SERVICE_TIME_MS};
pub use upstream_tls::{backend_host, CaBundle, UpstreamTls};

/// Every default, in one place. The TOML structs leave an absent key as `None`; validation
/// fills it in from here, and every `Default` impl in `config/` reads it from here too.
/// `config/loadgate.toml` documents each one and why.
pub mod defaults {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

    const fn loopback(port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
    }

    pub const SERVER_LISTEN: SocketAddr = loopback(8080);
    pub const PROBE_PATHS: &[&str] = &["/healthz"];
    pub const DRAIN_TIMEOUT_MS: u64 = 30_000;
    /// Long enough for Kubernetes to take a terminating pod out of its endpoints.
    pub const SHUTDOWN_DELAY_MS: u64 = 5_000;
    pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    /// As long as a request head may take: a handshake is the same kind of wait.
    pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
    pub const CLIENT_IDLE_TIMEOUT_MS: u64 = 75_000;
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    pub const MAX_BODY_BYTES: u64 = 100 * 1024 * 1024;
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// 0: one per core.
    pub const WORKER_THREADS: usize = 0;
    /// Request header names with `_` are dropped, not forwarded.
    pub const UNDERSCORES_IN_HEADERS: bool = false;
    /// No RFC 7239 `Forwarded` element added: Spring and Tomcat read X-Forwarded-*.
    pub const FORWARDED: super::ForwardedHeader = super::ForwardedHeader::Off;
    /// Request bodies up to 64 KiB are read in full before they take a backend worker.
    pub const REQUEST_BUFFER_BYTES: usize = 64 * 1024;
    /// Tomcat's `connectionTimeout` (its default; the server.xml Tomcat ships sets 20 s).
    pub const BODY_READ_TIMEOUT_MS: u64 = 60_000;
    /// Bytes a second, averaged, after a 5 s grace: ASP.NET Core Kestrel's
    /// `MinRequestBodyDataRate`.
    pub const BODY_MIN_RATE: u64 = 240;
    /// nginx's `send_timeout`.
    pub const SEND_TIMEOUT_MS: u64 = 60_000;
    /// One HTTP/2 connection may hold 32 requests: a sixth of Tomcat's default 200 workers.
    pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 32;
    /// Well above the heartbeats of SockJS (25 s) and STOMP clients (10-20 s): only a
    /// tunnel whose peers stopped talking is closed.
    pub const UPGRADE_IDLE_TIMEOUT_MS: u64 = 300_000;
    /// WebSocket upgrades are proxied on every route unless it says otherwise.
    pub const ROUTE_WEBSOCKET: bool = true;

    pub const ADMIN_LISTEN: SocketAddr = loopback(9901);

    pub const MAX_WORKERS: u32 = 200;
    pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
    pub const RESPONSE_HEADER_TIMEOUT_MS: u64 = 30_000;
    pub const IDLE_TIMEOUT_MS: u64 = 4_000;
    pub const MAX_IDLE_PER_BACKEND: usize = 256;

    pub const CONNECT_ATTEMPTS: u32 = 3;
    pub const BACKOFF_BASE_MS: u64 = 100;
    pub const BACKOFF_CAP_MS: u64 = 1_000;
    pub const IDEMPOTENT_METHODS: &[&str] = &["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];
    pub const EJECT_AFTER_CONNECT_FAILURES: u32 = 5;
    pub const EJECT_MS: u64 = 10_000;

    // `[upstream.tls]`: when the table is there, TLS is on unless it says otherwise.
    pub const UPSTREAM_TLS_ENABLED: bool = true;
    pub const UPSTREAM_TLS_INSECURE_SKIP_VERIFY: bool = false;

    /// An upstream with no healthy backend leaves the proxy ready while another can serve.
    pub const REQUIRED_FOR_READINESS: bool = false;

    pub const HEALTH_ENABLED: bool = true;
    pub const HEALTH_PATH: &str = "/actuator/health";
    pub const HEALTH_INTERVAL_MS: u64 = 2_000;
    pub const HEALTH_TIMEOUT_MS: u64 = 1_000;
    pub const HEALTH_RISE: u32 = 2;
    pub const HEALTH_FALL: u32 = 3;

    /// Shedding thresholds per route class (DESIGN.md, "Route classes"), and the width
    /// of the ramp above each over which the reject probability goes from 0 to 1.
    pub const THRESHOLD_CRITICAL: f64 = 1.00;
    pub const THRESHOLD_NORMAL: f64 = 0.85;
    pub const THRESHOLD_SHEDDABLE: f64 = 0.70;
    pub const BAND: f64 = 0.10;
    /// A memory bound, far above any sane burst: the queue timeout is what bounds waiting.
    pub const QUEUE_SIZE: usize = 10_000;
    pub const QUEUE_TIMEOUT_MS: u64 = 500;

    // `[upstream.actuator]`.
    pub const ACTUATOR_ENABLED: bool = true;
    pub const ACTUATOR_INTERVAL_MS: u64 = 250;
    pub const ACTUATOR_TIMEOUT_MS: u64 = 200;

    // `[upstream.adaptive]`.
    pub const ADAPTIVE_ENABLED: bool = false;
    pub const ADAPTIVE_INITIAL_LIMIT: f64 = 20.0;
    pub const ADAPTIVE_MIN_LIMIT: f64 = 10.0;
    pub const ADAPTIVE_MAX_LIMIT: f64 = 1000.0;
    pub const ADAPTIVE_SMOOTHING: f64 = 0.2;
    pub const ADAPTIVE_TOLERANCE: f64 = 1.5;
    pub const ADAPTIVE_PROBE_INTERVAL_MS: u64 = 30_000;

    // The `cache_*` keys of a `[[route]]`.
    pub const CACHE_MAX_BYTES: usize = 64 << 20;
    pub const CACHE_MAX_OBJECT_BYTES: usize = 1 << 20;
    pub const CACHE_GENERATE_ETAG: bool = false;
    pub const CACHE_STORE_SET_COOKIE: bool = false;
    pub const CACHE_COALESCE_TIMEOUT_MS: u64 = 5_000;

    /// A route forwards the path as the client sent it (normalised), prefix and all.
    pub const STRIP_PATH_PREFIX: bool = false;
    /// A route that strips its prefix puts it back into its backend's redirects.
    pub const REWRITE_LOCATION: bool = true;

    // `[sim]` and the `loadgate sim-backend` flags: a stock Spring Boot on Tomcat.
    pub const SIM_LISTEN: SocketAddr = loopback(8081);
    pub const SIM_WORKERS: usize = 200;
    pub const SIM_SERVICE_TIME_MS: f64 = 20.0;
    pub const SIM_KEEP_ALIVE_TIMEOUT_MS: u64 = 20_000;
    pub const SIM_MAX_KEEP_ALIVE_REQUESTS: u32 = 100;
    pub const SIM_MAX_CONNECTIONS: usize = 8192;
    pub const SIM_ACCEPT_COUNT: u32 = 100;
    pub const SIM_CONNECTOR_NAME: &str = "http-nio-8080";

    // `[access_log]`.
    pub const ACCESS_LOG_FORMAT: super::AccessLogFormat = super::AccessLogFormat::Json;
    /// Query strings often carry tokens and personal data.
    pub const ACCESS_LOG_INCLUDE_QUERY: bool = false;
    /// About a second of lines at 16k requests a second, a few MiB at most.
    pub const ACCESS_LOG_BUFFER_LINES: usize = 16_384;
}

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// Data listeners with TLS or the PROXY protocol (`[[listener]]`), served after the
    /// plain ones of `server.listen`.
    pub listeners: Vec<ListenerConfig>,
    /// Optional built-in simulated backend started beside the proxy (used by the demo).
    pub sim: Option<SimConfig>,
    /// The `[access_log]` table; `None` (no `path`) when the access log is off.
    pub access_log: Option<AccessLogConfig>,
}

/// The access log: one line per request, written by a task off the data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// Key `path`: a file (opened for appending, created if absent) or `"stdout"`.
    pub target: AccessLogTarget,
    /// Key `format`, default `json`.
    pub format: AccessLogFormat,
    /// Whether the query string is logged with the path. Default false.
    pub include_query: bool,
    /// Lines waiting for the writer, at most; past it, lines are dropped and counted.
    /// Default 16384.
    pub buffer_lines: usize,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

/// How an access log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line, every field named.
    Json,
    /// The NCSA common log format.
    Common,
    /// The common log format plus referer and user agent (Apache's and nginx's `combined`).
    Combined,
}

/// The most `buffer_lines` an `[access_log]` may ask for.
pub const MAX_ACCESS_LOG_BUFFER_LINES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Data-plane listeners. Default `["127.0.0.1:8080"]`.
    pub listen: Vec<SocketAddr>,
    /// Paths answered by the proxy itself, never forwarded. Default `["/healthz"]`.
    pub probe_paths: Vec<String>,
    /// How long in-flight requests may take to finish on shutdown. Key `drain_timeout_ms`, default 30000.
    pub drain_timeout: Duration,
    /// On SIGTERM, how long readiness answers 503 while the listeners still accept, before
    /// they close and the drain begins. Key `shutdown_delay_ms`, default 5000; 0 for none.
    pub shutdown_delay: Duration,
    /// From the first byte of a request head (or accept, for a connection's first request) to
    /// its last. Key `header_read_timeout_ms`, default 10000.
    pub header_read_timeout: Duration,
    /// How long a client keep-alive connection may sit with nothing in flight. Key
    /// `idle_timeout_ms`, default 75000.
    pub idle_timeout: Duration,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2); larger ones get 431.
    /// Default 65536; 8192 ..= [`MAX_HEADER_BYTES_LIMIT`].
    pub max_header_bytes: usize,
    /// Largest request body; larger ones get 413. Key `max_body_bytes`, default 100 MiB;
    /// `None` (written 0) for no limit.
    pub max_body_bytes: Option<u64>,
    /// Client connections open at once on all data listeners; more are closed at accept.
    /// Default 10000.
    pub max_connections: usize,
    /// Threads serving client connections, each with its own event loop; 0 (the default)
    /// means one per core. Fixed at start, like `listen`.
    pub worker_threads: usize,
    /// Whether request header names with `_` are forwarded; by default they are dropped,
    /// as CGI-style stacks read `X_Forwarded_For` as `X-Forwarded-For`. Default false.
    pub underscores_in_headers: bool,
    /// Peers whose forwarding headers are believed (a load balancer or ingress in
    /// front): their `X-Forwarded-For` is appended to, their `X-Forwarded-Proto`,
    /// `-Host` and `-Port` kept. From any other peer they are replaced. Default none.
    pub trusted_proxies: Vec<Cidr>,
    /// Whether an RFC 7239 `Forwarded` element is appended to each forwarded request. An
    /// untrusted peer's `Forwarded` is removed either way. Key `forwarded`, default off.
    pub forwarded: ForwardedHeader,
    /// Request bodies up to this many bytes are read in full before admission, so a slow
    /// upload holds no backend worker; a larger body streams after its first this-many
    /// bytes. Key `request_buffer_bytes`, default 65536; 0 streams every body.
    pub request_buffer_bytes: usize,
    /// The upload pace every request body is held to.
    pub upload: UploadPace,
    /// How long a response may wait on a client that reads nothing (its socket full)
    /// before the connection is closed. Key `send_timeout_ms`, default 60000.
    pub send_timeout: Duration,
    /// Requests one HTTP/2 connection may have in flight at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    /// Default 32.
    pub http2_max_concurrent_streams: u32,
    /// How long an upgraded (WebSocket) connection may pass no byte either way before
    /// both sides are closed. Key `upgrade_idle_timeout_ms`, default 300000.
    pub upgrade_idle_timeout: Duration,
    /// What the admin `/readyz` asks of the upstreams.
    pub readiness: Readiness,
}

/// When the proxy is ready (`/readyz` 200): not draining, every upstream with
/// `required_for_readiness = true` has a healthy backend, and at least one upstream has
/// one. So a sidecar (one upstream) goes unready when its app is down, and an edge proxy
/// stays ready while any of its upstreams can serve.
///
/// Built from the `required_for_readiness` key of each `[[upstream]]`, but kept here
/// rather than in [`UpstreamConfig`]: an upstream whose config changes is rebuilt on
/// reload (new pool, health state starting over), and turning this key on or off should
/// not do that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// The upstreams that must have a healthy backend for the proxy to be ready. Default:
    /// none.
    pub required: Vec<String>,
}

impl Readiness {
    /// Whether `upstream` has `required_for_readiness = true`.
    pub fn requires(&self, upstream: &str) -> bool {
        self.required.iter().any(|name| name == upstream)
    }
}

/// How fast a client must send its request body. A slow upload holds a backend worker
/// (once forwarded) or a connection and a buffer (while read ahead): a client sending a
/// few bytes a second must not hold either for long. Enforced in `http/body.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadPace {
    /// The longest the body may go without a byte. Key `body_read_timeout_ms`.
    pub read_timeout: Duration,
    /// The fewest bytes a second, averaged from the head once a 5 s grace has passed.
    /// Key `body_min_rate`; 0 for none.
    pub min_rate: u64,
}

/// The most `worker_threads` a config may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The smallest `max_header_bytes`: hyper's HTTP/1 read buffer cannot be smaller.
pub const MIN_HEADER_BYTES: usize = 8192;
/// The largest `max_header_bytes`: hyper's size check can overshoot by one read, and every
/// head it accepts must fit the framing scanner's window (`framing::MAX_HEAD`), or the
/// ambiguous-framing check would be skipped for it (asserted at compile time there).
pub const MAX_HEADER_BYTES_LIMIT: usize = 128 * 1024;

/// The largest `cache_max_object_bytes`: the most the cache store can weigh one object
/// (TinyUFO weights are `u16`, in 1 KiB units; asserted at compile time in `cache/store.rs`).
pub const CACHE_MAX_OBJECT_BYTES_LIMIT: usize = u16::MAX as usize * 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![defaults::SERVER_LISTEN],
            probe_paths: defaults::PROBE_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            drain_timeout: Duration::from_millis(defaults::DRAIN_TIMEOUT_MS),
            shutdown_delay: Duration::from_millis(defaults::SHUTDOWN_DELAY_MS),
            header_read_timeout: Duration::from_millis(defaults::HEADER_READ_TIMEOUT_MS),
            idle_timeout: Duration::from_millis(defaults::CLIENT_IDLE_TIMEOUT_MS),
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            max_body_bytes: Some(defaults::MAX_BODY_BYTES),
            max_connections: defaults::MAX_CONNECTIONS,
            worker_threads: defaults::WORKER_THREADS,
            underscores_in_headers: defaults::UNDERSCORES_IN_HEADERS,
            trusted_proxies: Vec::new(),
            forwarded: defaults::FORWARDED,
            request_buffer_bytes: defaults::REQUEST_BUFFER_BYTES,
            upload: UploadPace {
                read_timeout: Duration::from_millis(defaults::BODY_READ_TIMEOUT_MS),
                min_rate: defaults::BODY_MIN_RATE,
            },
            send_timeout: Duration::from_millis(defaults::SEND_TIMEOUT_MS),
            http2_max_concurrent_streams: defaults::HTTP2_MAX_CONCURRENT_STREAMS,
            upgrade_idle_timeout: Duration::from_millis(defaults::UPGRADE_IDLE_TIMEOUT_MS),
            readiness: Readiness::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Admin listener. Default `127.0.0.1:9901`.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` authorities.
    pub backends: Vec<String>,
    /// The backend's worker pool size (Tomcat `maxThreads`). Default 200.
    pub max_workers: u32,
    /// Key `connect_timeout_ms`, default 1000.
    pub connect_timeout: Duration,
    /// Key `response_header_timeout_ms`, default 30000.
    pub response_header_timeout: Duration,
    /// Key `idle_timeout_ms`, default 4000.
    pub idle_timeout: Duration,
    /// Idle pooled connections kept per backend. Default 256.
    pub max_idle_per_backend: usize,
    /// The backends' management port (Spring's `management.server.port`): health checks
    /// and actuator polls go to each backend's host on this port. Default: none (the
    /// backend's own port).
    pub management_port: Option<u16>,
    pub health: HealthConfig,
    /// The `[upstream.shedding]` table.
    pub shedding: SheddingConfig,
    /// The `[upstream.actuator]` table: the backend-reported utilisation signal.
    pub actuator: ActuatorSettings,
    /// The `[upstream.adaptive]` table; `Some` when enabled (backends with no fixed pool).
    pub adaptive: Option<AdaptiveSettings>,
    /// The `[upstream.retry]` table: connect retries, retry-once on a stale connection,
    /// passive ejection.
    pub retry: RetryConfig,
    /// The `[upstream.tls]` table; `Some` when the backends are reached over TLS (the
    /// pool's connections, health checks and actuator polls). Default: none (plain HTTP).
    pub tls: Option<UpstreamTls>,
}

/// What the upstream pool retries, and when it takes a backend out of rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Connect attempts per request, the first included. Key `connect_attempts`, default 3.
    pub connect_attempts: u32,
    /// Backoff before the second attempt; doubles each time. Key `backoff_base_ms`, default 100.
    pub backoff_base: Duration,
    /// Longest backoff between two attempts. Key `backoff_cap_ms`, default 1000.
    pub backoff_cap: Duration,
    /// Methods retried once on a fresh connection when a reused one dies before any
    /// response byte. Default GET, HEAD, OPTIONS, PUT, DELETE.
    pub idempotent_methods: Vec<http::Method>,
    /// Consecutive failed connect attempts that take a backend out of rotation; 0 never.
    /// Default 5.
    pub eject_after_connect_failures: u32,
    /// How long a passively ejected backend stays out. Key `eject_ms`, default 10000.
    pub eject_duration: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            connect_attempts: defaults::CONNECT_ATTEMPTS,
            backoff_base: Duration::from_millis(defaults::BACKOFF_BASE_MS),
            backoff_cap: Duration::from_millis(defaults::BACKOFF_CAP_MS),
            idempotent_methods: defaults::IDEMPOTENT_METHODS
                .iter()
                .map(|m| http::Method::from_bytes(m.as_bytes()).expect("a valid method"))
                .collect(),
            eject_after_connect_failures: defaults::EJECT_AFTER_CONNECT_FAILURES,
            eject_duration: Duration::from_millis(defaults::EJECT_MS),
        }
    }
}

/// What admission does with its decisions, per upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedMode {
    /// Shed (429) and queue (critical) as decided.
    Enforce,
    /// Decide and count every request, log would-shed transitions, shed nothing.
    Shadow,
    /// No admission at all.
    Off,
}

impl ShedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShedMode::Enforce => "enforce",
            ShedMode::Shadow => "shadow",
            ShedMode::Off => "off",
        }
    }
}

/// Utilisation thresholds per route class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub critical: f64,
    pub normal: f64,
    pub sheddable: f64,
}

impl Thresholds {
    pub fn for_class(&self, class: RouteClass) -> f64 {
        match class {
            RouteClass::Critical => self.critical,
            RouteClass::Normal => self.normal,
            RouteClass::Sheddable => self.sheddable,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SheddingConfig {
    /// Default `enforce`.
    pub mode: ShedMode,
    /// Defaults 1.00 / 0.85 / 0.70.
    pub thresholds: Thresholds,
    /// Width of the ramp above a threshold over which the reject probability goes 0 → 1. Default 0.10.
    pub band: f64,
    /// The most critical requests waiting for a slot at once: a memory bound only.
    /// Key `queue_size`, default 10 000.
    pub queue_size: usize,
    /// How long a critical request may wait for a slot; one whose expected wait (its
    /// place in the queue ÷ the measured drain rate) does not fit is answered 503 at
    /// once. Key `queue_timeout_ms`, default 500.
    pub queue_timeout: Duration,
}

impl Default for SheddingConfig {
    fn default() -> Self {
        SheddingConfig {
            mode: ShedMode::Enforce,
            thresholds: Thresholds {
                critical: defaults::THRESHOLD_CRITICAL,
                normal: defaults::THRESHOLD_NORMAL,
                sheddable: defaults::THRESHOLD_SHEDDABLE,
            },
            band: defaults::BAND,
            queue_size: defaults::QUEUE_SIZE,
            queue_timeout: Duration::from_millis(defaults::QUEUE_TIMEOUT_MS),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Default true.
    pub enabled: bool,
    /// Default `/actuator/health`. Must start with `/` and must not be `/`.
    pub path: String,
    /// Key `interval_ms`, default 2000.
    pub interval: Duration,
    /// Key `timeout_ms`, default 1000.
    pub timeout: Duration,
    /// Consecutive successes to become healthy. Default 2.
    pub rise: u32,
    /// Consecutive failures to become unhealthy. Default 3.
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    Critical,
    Normal,
    Sheddable,
}

impl RouteClass {
    /// Every class, in the order of [`RouteClass::index`].
    pub const ALL: [RouteClass; 3] = [
        RouteClass::Critical,
        RouteClass::Normal,
        RouteClass::Sheddable,
    ];

    /// The class's place in [`RouteClass::ALL`], for tables indexed by class.
    pub fn index(self) -> usize {
        match self {
            RouteClass::Critical => 0,
            RouteClass::Normal => 1,
            RouteClass::Sheddable => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Critical => "critical",
            RouteClass::Normal => "normal",
            RouteClass::Sheddable => "sheddable",
        }
    }
}

/// Whether loadgate adds an RFC 7239 `Forwarded` element (`for`, `proto`, `host`) to the
/// requests it forwards, as well as the `X-Forwarded-*` headers it always sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// Not added. A trusted peer's `Forwarded` passes unchanged; anyone else's is removed.
    Off,
    /// Appended to a trusted peer's `Forwarded`; replaces anyone else's.
    On,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    Off,
    On,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    /// Exact host (`api.example.com`) or wildcard (`*.example.com`); `None` matches any host.
    pub host: Option<String>,
    /// Must start with `/`.
    pub path_prefix: String,
    /// Must name an `[[upstream]]`.
    pub upstream: String,
    /// Default `normal`.
    pub class: RouteClass,
    /// Default `off`.
    pub cache: CachePolicy,
    /// Keys `cache_max_bytes`, `cache_max_object_bytes`, `cache_generate_etag`,
    /// `cache_stale_on_shed_ms`, `cache_stale_if_error_ms`, `cache_stale_while_revalidate_ms`,
    /// `cache_store_set_cookie`, `cache_coalesce_timeout_ms`, `cache_control_field`;
    /// defaults in [`CacheSettings::default`].
    pub cache_settings: CacheSettings,
    /// Overrides the upstream's threshold for this route's class.
    pub threshold: Option<f64>,
    /// Keys `strip_path_prefix`, `rewrite_location`, `[route.request_headers]`,
    /// `[route.response_headers]`.
    pub rewrite: RouteRewrite,
    /// Whether a WebSocket upgrade is proxied; when not, the request goes on without its
    /// `Upgrade` (RFC 9110 §7.8 lets a server ignore it). Key `websocket`, default true.
    pub websocket: bool,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub origin: String,
    pub errors: Vec<ConfigError>,
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: {} error(s)", self.origin, self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {}:{}: {}", self.origin, e.line, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The demo configuration embedded in the binary.
pub const DEMO_TOML: &str = include_str!("../../config/demo.toml");

impl Config {
    /// Parses and validates a TOML document. `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        Config::parse_in(text, origin, Path::new("."))
    }

    /// Parses a document whose relative file paths (certificates) are taken from `base`.
    pub fn parse_in(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigErrors> {
        load::parse(text, base).map_err(|errors| ConfigErrors {
            origin: origin.to_string(),
            errors,
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            origin: origin.clone(),
            errors: vec![ConfigError {
                line: 0,
                message: format!("cannot read file: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse_in(&text, &origin, base)
    }

    /// The embedded demo configuration.
    pub fn demo() -> Config {
        Config::parse(DEMO_TOML, "config/demo.toml").expect("the embedded demo config is valid")
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}
