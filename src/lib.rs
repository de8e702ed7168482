//! loadgate: an adaptive load-shedding reverse proxy and shared HTTP cache for
//! backends such as Spring Boot on Tomcat.
//!
//! # Layout
//!
//! Folders are the stages of the data path:
//!
//! ```text
//! main.rs         CLI (clap): run / demo / sim-backend / check-config
//! app.rs          the long-running commands: signals, reload, drain
//! config/         TOML → validated Config; every error reported with its line; every
//!                 default; a leaf of plain data (imports nothing else from the crate)
//! listener/       listeners (HTTP/1.1 + h2c), worker threads, accept loop, reload, drain
//!   workers.rs      worker identity and count (a leaf: the pool keys its stacks by it)
//!   activity.rs     per-connection header read and keep-alive idle deadlines
//!   framing.rs      scans raw HTTP/1 bytes for ambiguous framing hyper would accept
//!   interim.rs      a backend's 1xx responses, written between hyper's own writes
//!   proxy_protocol.rs  the PROXY protocol header (v1, v2) a balancer sends first
//!   tunnel.rs       an upgraded (WebSocket) connection: both sockets spliced, idle timeout
//! http/           plumbing every stage shares
//!   body.rs         streamed body types; guards released when a body ends; upload pace
//!   headers.rs      hop-by-hop stripping, Via, X-Forwarded-*
//!   rewrite.rs      a route's rewrites: path prefix stripped, X-Forwarded-Prefix, header rules
//!   target.rs       one meaning per request: host and path normalised (README "Request rules")
//!   error.rs        the proxy's errors and the one error → status table
//!   tls_client.rs   TLS to backends: one rustls client per upstream, the upstream stream,
//!                   a connector for health checks and actuator polls
//!   stream.rs       a TCP connection with or without TLS, for clients and backends alike
//! forward/        the request path
//!   stack.rs        the service around the handler: request id; redaction and trace at DEBUG
//!   handler.rs      the handler, as stages over one request: framing → meaning → probe →
//!                   route → cache → body read ahead → admission → forward → respond
//!   meaning.rs      the request's one host and normal path, settled before routing
//!   read_ahead.rs   request bodies read ahead before admission, within a global budget
//!   routes.rs       host + path prefix → route (upstream, class, cache policy)
//!   record.rs       the access log record each request's stages fill in
//!   state.rs        the config generation in force, swapped atomically on reload
//! cache/          shared HTTP cache per route: key, policy, conditionals, store, fill
//! admission/      utilisation signal (own + external load, adaptive), the shedding
//!                 decision, the critical queue, the actuator poller
//! upstream/       connection pool (retry-once on stale reuse, connect backoff), backends,
//!                 balancing, passive ejection, health checks
//! metrics.rs      metric names, descriptions, and the counter table that feeds both
//!                 Prometheus and /status
//!   process.rs      process_* metrics (memory, fds, CPU, threads) read from /proc/self
//!                   at each scrape
//! admin.rs        /metrics /healthz /readyz /status on the admin port
//! access_log/     one line per request (JSON, common, combined), handed to a writer task
//!                 through a bounded buffer; never blocks a request
//! live/           the admin port's live view: a per-second sampler over the last 15 minutes,
//!                 / (the page), /live.json, /live/stream (SSE) and /report
//! sim/            the built-in simulated Spring Boot / Tomcat backend
//! civil.rs        UTC calendar dates of instants and back (a leaf)
//! ```
//!
//! # Data path of one request
//!
//! ```text
//! client ─▶ listener (max_connections; hyper auto: h1 keep-alive + h2c, 32 streams; header /
//!           idle / send timeouts)
//!        ─▶ head over max_header_bytes: 431 from hyper ─▶ framing verdict (400 if ambiguous)
//!        ─▶ Content-Length over max_body_bytes: 413
//!        ─▶ x-request-id (trace spans only when DEBUG is on)
//!        ─▶ host and path settled (400 if they cannot be), `_` header names dropped
//!        ─▶ probe path? answered here, never forwarded
//!        ─▶ route match (404 if none)
//!        ─▶ cache lookup (cache = "on"): a fresh hit is answered here, 200 or 304
//!        ─▶ request body read ahead (all of it up to 64 KiB; 400 if malformed, 408 if too slow)
//!        ─▶ admission: 429 + Retry-After above the class threshold; critical queues
//!        ─▶ pick backend (least loaded of two healthy; another one if it cannot connect)
//!        ─▶ hop-by-hop stripped, Via, X-Forwarded-*
//!        ─▶ pooled upstream connection (connect retries, one retry on a stale reused
//!           connection; connect / response-header timeouts: 502 / 504; TLS with [upstream.tls])
//!        ─▶ response: hop-by-hop stripped, Via, stored if cacheable, streamed back with backpressure
//!           (what arrived with the head taken at once: a response all here frees its slot)
//!        ─▶ in-flight count released when the backend is done; metrics and the access log
//!           line when the body ends
//!
//! A WebSocket handshake skips the cache and keeps its `Upgrade`; on the backend's 101 the
//! request stops counting as in flight, and both sockets are spliced (`listener/tunnel.rs`)
//! until either side closes, the tunnel idles out, or the drain deadline passes.
//! ```
#![forbid(unsafe_code)]

/// mimalloc, for every binary built on this crate: the proxy, its tests and its benches.
/// A proxied request makes many small, short-lived allocations (header maps, buffers,
/// futures, h2 frames) on worker threads that each run their own runtime. With glibc's
/// allocator, malloc and free took about 12% of the proxy's CPU on the TLS bench's HTTP/2
/// row; with mimalloc, 5%. Whole-process CPU of a fixed TLS load (backend and load
/// generator included) fell by about a tenth (median of 11 paired runs). Built without
/// transparent huge pages (`no_thp`): with them, an idle proxy's resident memory grew from
/// ~10 to ~18 MiB. The C is built by the `cc` crate with the default compiler.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod app;
pub mod cache;
pub mod civil;
pub mod config;
pub mod forward;
pub mod http;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod sim;
pub mod upstream;
