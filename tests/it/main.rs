//! The integration tests, one binary: the real proxy, in-process or as the `loadgate`
//! binary, in front of real backends on 127.0.0.1, asserted through what a user sees.
//! One module per area; `cargo test --test it tomcat::` runs one of them.
//!
//! One binary rather than one per file: a single link step, and `support` compiled
//! once, every helper in it used by some test.

mod support;

mod access_log;
mod backend_responses;
mod balancing;
mod cache;
mod cache_stale;
mod cli;
mod clients;
mod config_files;
mod dashboards;
mod deploy;
mod forwarding;
mod hygiene;
mod live;
mod metrics;
mod proxy;
mod proxy_protocol;
mod readiness;
mod reload;
mod rewrite;
mod shedding;
mod signal;
mod sim;
mod slow_clients;
mod tls;
mod tomcat;
mod upstream;
mod upstream_tls;
mod websocket;
