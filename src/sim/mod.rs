//! The built-in simulated Spring Boot / Tomcat backend.
//!
//! Used by `loadgate demo`, `loadgate sim-backend`, the tests and the benchmarks to
//! reproduce overload on one machine. It is not a general web server.
//!
//! What it emulates, on HTTP/1.1:
//! - a pool of `workers` (Tomcat `maxThreads`) with a FIFO queue; every request
//!   on the main port holds a worker from dispatch until its response body is sent;
//! - `/api/...` work endpoints: per-route service time, a deterministic body,
//!   an ETag as Spring's `ShallowEtagHeaderFilter` makes it (`"0"` + md5 hex),
//!   `Cache-Control`, and 304 for a matching `If-None-Match` after the work.
//!   Query overrides: `?delay_ms=N` (service time), `?size=N` (filler body bytes).
//!   A request with a body is echoed back; `GET /api/headers` returns the request headers;
//! - `/actuator/health`, `/actuator/metrics/tomcat.threads.{busy,config.max,current}`,
//!   `/actuator/prometheus`, on the main port or on `management_listen`;
//! - Tomcat's connection rules: `keepAliveTimeout` (0 disables it), `maxKeepAliveRequests`,
//!   and `maxConnections` open at once with an `acceptCount` listen backlog behind them.
//!
//! Without a management port, as in most Spring apps, an actuator request takes a
//! worker from the same pool, waits behind queued work like any request, and the
//! busy count it reports includes its own worker: what a real Tomcat does.
//!
//! Layout: `server` (listeners, handle), `conn` (one connection), `handler`
//! (routing, work endpoints), `pool` (workers), `actuator`, `etag`, `body`, `stats`.

mod actuator;
mod body;
mod conn;
pub mod etag;
mod handler;
mod pool;
mod server;
mod stats;

pub use actuator::{ACTUATOR_JSON, PROMETHEUS_TEXT};
pub use body::filler_bytes;
pub use server::{run_cli, SimBackend};
pub use stats::SimStats;

use serde::Deserialize;
use std::net::SocketAddr;

/// How a route's service time is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Every request takes exactly the configured time.
    #[default]
    Fixed,
    /// Exponentially distributed around the configured mean.
    Exponential,
}

/// Settings of the simulated backend (the `[sim]` config section, or `loadgate sim-backend` flags).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Main (data) port.
    pub listen: SocketAddr,
    /// Separate management port for `/actuator/*` (Spring's `management.server.port`).
    /// `None`: actuator requests are served on the main port and need a worker.
    pub management_listen: Option<SocketAddr>,
    /// Worker pool size (Tomcat `maxThreads`).
    pub workers: usize,
    /// Default service time of a work request, in milliseconds.
    pub service_time_ms: f64,
    /// Default distribution of the service time.
    pub distribution: Distribution,
    /// Idle keep-alive connections are closed after this long (Tomcat `keepAliveTimeout`).
    pub keep_alive_timeout_ms: u64,
    /// A connection is closed after this many requests (Tomcat `maxKeepAliveRequests`); 0 = unlimited.
    pub max_keep_alive_requests: u32,
    /// Connections served at once (Tomcat `maxConnections`); further ones wait in the
    /// listen backlog, unaccepted.
    pub max_connections: usize,
    /// The listen backlog (Tomcat `acceptCount`): connections the kernel holds while
    /// `max_connections` are open; past it, new connections are refused or dropped.
    pub accept_count: u32,
    /// `Cache-Control` sent on `/api/` responses unless a route overrides it.
    pub cache_control: Option<String>,
    /// The connector name reported in actuator tags.
    pub connector_name: String,
    /// Per-path overrides, longest prefix wins.
    pub routes: Vec<SimRoute>,
}

/// A per-path override of the work endpoints' behaviour.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimRoute {
    pub path_prefix: String,
    pub service_time_ms: Option<f64>,
    pub distribution: Option<Distribution>,
    pub cache_control: Option<String>,
    /// Size of the generated response body in bytes.
    pub body_bytes: Option<usize>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            management_listen: None,
            workers: 200,
            service_time_ms: 20.0,
            distribution: Distribution::Fixed,
            keep_alive_timeout_ms: 20_000,
            max_keep_alive_requests: 100,
            max_connections: 8192,
            accept_count: 100,
            cache_control: None,
            connector_name: "http-nio-8080".to_string(),
            routes: Vec::new(),
        }
    }
}
