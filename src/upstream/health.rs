//! Active health checks: each backend is probed on the configured path (never `/`,
//! which creates sessions in Spring apps) over its own connection, outside the
//! data-plane pool. `fall` consecutive failures take a backend out of rotation;
//! `rise` consecutive successes bring it back. With `[upstream.tls]` the checks are
//! made over TLS, verified as the pool's connections are: a backend whose certificate
//! is not trusted fails its checks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::Backend;
use crate::config::HealthConfig;
use crate::http::tls_client::{Connector, TlsClient};

/// Spawns one task that checks every backend of an upstream each interval.
pub fn spawn_health_checks(
    upstream: String,
    backends: Vec<Arc<Backend>>,
    config: HealthConfig,
    management_port: Option<u16>,
    tls: Option<TlsClient>,
) -> tokio::task::JoinHandle<()> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let connector = Connector::new(config.timeout, tls);
    // A new connection per check, on purpose: a check then also proves the backend
    // still accepts connections (and completes a TLS handshake), which a pooled
    // connection would not.
    let client: Client<Connector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    tokio::spawn(async move {
        let mut streaks = vec![Streak::default(); backends.len()];
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let checks = backends
                .iter()
                .map(|b| check_once(&client, scheme, b, &config, management_port));
            let results = futures_util::future::join_all(checks).await;
            for ((backend, streak), result) in backends.iter().zip(&mut streaks).zip(results) {
                streak.record(&upstream, backend, &config, result);
            }
        }
    })
}

#[derive(Clone, Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

impl Streak {
    fn record(
        &mut self,
        upstream: &str,
        backend: &Backend,
        config: &HealthConfig,
        result: Result<(), String>,
    ) {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                backend.confirmed.store(true, Ordering::Relaxed);
                if !backend.is_healthy() && self.successes >= config.rise {
                    tracing::info!(upstream, backend = %backend.authority, "backend healthy again, back in rotation");
                    backend.set_healthy(true);
                    // Connect failures while it was down ejected it passively too;
                    // `rise` passing checks are better evidence than that timer.
                    backend.clear_ejection();
                } else if backend.is_healthy() && backend.is_ejected() {
                    // Ejected for failed connects, but this check connected and was
                    // answered: the backend is back before the ejection timer says so.
                    tracing::info!(upstream, backend = %backend.authority,
                        "backend passed a health check; its ejection for failed connects ends");
                    backend.clear_ejection();
                }
            }
            Err(why) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if backend.is_healthy() && self.failures >= config.fall {
                    tracing::warn!(upstream, backend = %backend.authority, reason = %why,
                        "backend failed {} health checks in a row, out of rotation", self.failures);
                    backend.set_healthy(false);
                }
            }
        }
    }
}

async fn check_once(
    client: &Client<Connector, Empty<Bytes>>,
    scheme: &str,
    backend: &Backend,
    config: &HealthConfig,
    management_port: Option<u16>,
) -> Result<(), String> {
    let authority = match management_port {
        Some(port) => super::management_authority(&backend.authority, port),
        None => backend.authority.clone(),
    };
    let uri = format!("{scheme}://{authority}{}", config.path);
    let request = Request::get(uri)
        .header(header::USER_AGENT, "loadgate-health-check")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(config.timeout, client.request(request)).await {
        Err(_) => Err(format!("no answer within {:?}", config.timeout)),
        Ok(Err(e)) => Err(crate::http::error::error_chain(&e)),
        Ok(Ok(response)) if response.status().is_success() => Ok(()),
        Ok(Ok(response)) => Err(format!("status {}", response.status())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;

    fn health() -> HealthConfig {
        use crate::config::defaults as d;
        HealthConfig {
            enabled: true,
            path: d::HEALTH_PATH.to_string(),
            interval: std::time::Duration::from_millis(d::HEALTH_INTERVAL_MS),
            timeout: std::time::Duration::from_millis(d::HEALTH_TIMEOUT_MS),
            rise: d::HEALTH_RISE,
            fall: d::HEALTH_FALL,
        }
    }

    #[test]
    fn a_passing_check_ends_an_ejection_for_failed_connects() {
        let backend = Backend::new("health-test", "127.0.0.1:9");
        let retry = RetryConfig::default();
        for _ in 0..retry.eject_after_connect_failures {
            backend.connect_failed(&retry);
        }
        assert!(backend.is_ejected());
        let mut streak = Streak::default();
        streak.record(
            "health-test",
            &backend,
            &health(),
            Err("refused".to_string()),
        );
        assert!(backend.is_ejected(), "a failing check leaves it ejected");
        streak.record("health-test", &backend, &health(), Ok(()));
        assert!(!backend.is_ejected(), "one passing check ends the ejection");
        assert!(backend.is_healthy());
    }
}
