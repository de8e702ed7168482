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
//! (routing, work endpoints), `pool` (workers), `actuator`, `etag`, `body`, `stats`,
//! `limits` (the ranges its numbers must stay in).

mod actuator;
mod body;
mod conn;
pub mod etag;
mod handler;
pub mod limits;
mod pool;
mod server;
mod stats;

pub use actuator::{ACTUATOR_JSON, PROMETHEUS_TEXT};
pub use body::filler_bytes;
pub use server::{run_cli, SimBackend};
pub use stats::SimStats;

/// The `[sim]` settings: config data, declared in `config/`.
pub use crate::config::{Distribution, SimConfig, SimRoute};
