//! The settings of the built-in simulated backend: the `[sim]` config section, also
//! built from `loadgate sim-backend` flags. Plain data; its defaults come from
//! `super::defaults`. The backend itself is `sim/`.

use std::net::SocketAddr;

use serde::Deserialize;

use super::defaults;

/// The longest service time the simulated backend accepts, in milliseconds: one hour.
/// Far past any timeout a test would wait for, and far below what a `Duration` can hold
/// (1e300 ms cannot be one, and used to panic every request). Declared here, not in
/// `sim/`, so that config validation and the backend's own start-up check share it.
pub const SIM_MAX_SERVICE_TIME_MS: f64 = 3_600_000.0;

/// Whether `ms` is a service time the simulated backend can run with: a finite number of
/// milliseconds from 0 to [`SIM_MAX_SERVICE_TIME_MS`].
pub fn usable_service_time_ms(ms: f64) -> bool {
    ms.is_finite() && (0.0..=SIM_MAX_SERVICE_TIME_MS).contains(&ms)
}

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
            listen: defaults::SIM_LISTEN,
            management_listen: None,
            workers: defaults::SIM_WORKERS,
            service_time_ms: defaults::SIM_SERVICE_TIME_MS,
            distribution: Distribution::Fixed,
            keep_alive_timeout_ms: defaults::SIM_KEEP_ALIVE_TIMEOUT_MS,
            max_keep_alive_requests: defaults::SIM_MAX_KEEP_ALIVE_REQUESTS,
            max_connections: defaults::SIM_MAX_CONNECTIONS,
            accept_count: defaults::SIM_ACCEPT_COUNT,
            cache_control: None,
            connector_name: defaults::SIM_CONNECTOR_NAME.to_string(),
            routes: Vec::new(),
        }
    }
}
