//! The upstream pool against a backend that closes keep-alive connections (after 1 s
//! idle and after 100 requests, like Tomcat): no client-visible errors for GETs, no
//! duplicate POSTs, connect retries that stop at the cap.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use loadgate::listener::Proxy;
use loadgate::sim::SimBackend;

use crate::support::*;

/// A Tomcat-like backend: keep-alive timeout 1 s, `maxKeepAliveRequests` 100.
async fn tomcat_like() -> SimBackend {
    TestBackend::new()
        .workers(64)
        .keep_alive_timeout_ms(1000)
        .max_keep_alive_requests(100)
        .start()
        .await
}

/// A proxy for `backend` whose idle timeout (5 s) is LONGER than the backend's
/// keep-alive (1 s), so pooled connections go stale on purpose.
async fn proxy_longer_idle(backend: &SimBackend, upstream: &str) -> Proxy {
    let mut config = proxy_config(backend.addr());
    name_upstream(&mut config, upstream);
    config.upstreams[0].idle_timeout = Duration::from_secs(5);
    config.upstreams[0].health.enabled = false;
    // This is about connections, not admission: never shed.
    config.upstreams[0].shedding.mode = loadgate::config::ShedMode::Off;
    start_proxy(config).await
}

#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    ok: AtomicUsize,
    /// Answers that were not 2xx, with their body, for the failure message.
    failures: std::sync::Mutex<Vec<(u16, String)>>,
}

impl Tally {
    fn record(&self, got: &Got) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if (200..300).contains(&got.status) {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.lock().unwrap().push((got.status, got.text()));
        }
    }
}

/// Sends one request of `method` to `url` (POSTs carry a small streamed body).
async fn one(client: &TestClient, method: &str, url: &str, n: usize) -> Got {
    let body = if method == "POST" {
        body(format!("order {n}"))
    } else {
        loadgate::http::body::empty()
    };
    send(
        client,
        Request::builder()
            .method(method)
            .uri(url)
            .body(body)
            .unwrap(),
    )
    .await
}

/// The load pattern: `concurrent` requests from 8 workers back to back, then `gaps`
/// rounds of a 64-request burst (32 connections × 2) after an idle gap swept across the backend's 1 s
/// keep-alive timeout (985…1015 ms), so bursts land just before, at and after it.
async fn run_pattern(
    proxy: &Proxy,
    method: &'static str,
    path: &str,
    concurrent: usize,
    gaps: usize,
) -> Arc<Tally> {
    let url = format!("http://{}{path}", proxy.addr());
    let tally = Arc::new(Tally::default());
    let c = client();

    // Phase 1: concurrent, no gaps: connections retire after 100 requests.
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (c, url, tally) = (c.clone(), url.clone(), tally.clone());
            tokio::spawn(async move {
                for i in (w..concurrent).step_by(8) {
                    tally.record(&one(&c, method, &url, i).await);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }

    // Phase 2: idle gaps around the backend's keep-alive timeout.
    for round in 0..gaps {
        let gap = 985 + (round * 30 / gaps.max(1)) as u64;
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let burst: Vec<_> = (0..32)
            .map(|i| {
                let (c, url, tally) = (c.clone(), url.clone(), tally.clone());
                tokio::spawn(async move {
                    // A few sequential requests per connection, so several stay pooled.
                    for j in 0..2 {
                        tally
                            .record(&one(&c, method, &url, 10_000 + round * 100 + i * 2 + j).await);
                    }
                })
            })
            .collect();
        for task in burst {
            task.await.unwrap();
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_gets_across_stale_connections_all_succeed() {
    let backend = tomcat_like().await;
    let proxy = proxy_longer_idle(&backend, "stale_get").await;
    let started = Instant::now();

    // 10,000 GETs: 9,104 concurrent + 14 gaps × 64.
    let tally = run_pattern(&proxy, "GET", "/api/items", 9_104, 14).await;

    let failures = tally.failures.lock().unwrap().clone();
    assert_eq!(tally.sent.load(Ordering::Relaxed), 10_000);
    assert!(
        failures.is_empty(),
        "{} client-visible errors, first: {:?}",
        failures.len(),
        failures.first()
    );

    let stats = proxy.shared().generation.load().upstreams["stale_get"].pool_stats();
    let retried = admin::counter(
        &proxy,
        "loadgate_upstream_stale_reuse_total",
        &[("upstream", "stale_get"), ("outcome", "retried")],
    )
    .await;
    let opened = admin::counter(
        &proxy,
        "loadgate_upstream_connections_total",
        &[("upstream", "stale_get"), ("event", "opened")],
    )
    .await;
    let reused = admin::counter(
        &proxy,
        "loadgate_upstream_connections_total",
        &[("upstream", "stale_get"), ("event", "reused")],
    )
    .await;
    println!(
        "10,000 GETs in {:.1} s: {stats:?}; backend: {} connections opened, {} closed idle, {} closed at max",
        started.elapsed().as_secs_f64(),
        backend.stats().connections_opened(),
        backend.stats().connections_closed_idle(),
        backend.stats().connections_closed_max_requests(),
    );
    assert!(retried > 0.0, "no stale reuse was provoked: {stats:?}");
    // A retried GET reached the backend at most twice; here, never twice, because
    // the backend closed those connections without reading the request.
    let received = backend.stats().requests("/api/items");
    assert!(
        (10_000..=10_000 + stats.stale_retried).contains(&received),
        "{received}"
    );
    assert_eq!(retried as u64, stats.stale_retried);
    assert!(reused > opened, "keep-alive reuses connections: {stats:?}");
    assert!(backend.stats().connections_closed_max_requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn posts_across_stale_connections_are_never_duplicated() {
    let backend = tomcat_like().await;
    let proxy = proxy_longer_idle(&backend, "stale_post").await;

    // 2,000 concurrent + 14 gaps × 64 = 2,896 POSTs, each with a streamed body.
    let tally = run_pattern(&proxy, "POST", "/api/orders", 2_000, 14).await;

    let sent = tally.sent.load(Ordering::Relaxed);
    let ok = tally.ok.load(Ordering::Relaxed) as u64;
    let failures = tally.failures.lock().unwrap().clone();
    let received = backend.stats().requests_by_method("POST", "/api/orders");
    let stats = proxy.shared().generation.load().upstreams["stale_post"].pool_stats();
    println!(
        "{sent} POSTs: {ok} 2xx, {} failed; backend received {received}; {stats:?}",
        failures.len()
    );
    assert_eq!(sent, 2_896);
    assert_eq!(
        received, ok,
        "every POST the backend saw was answered 2xx, none twice"
    );
    for (status, body) in &failures {
        assert_eq!(*status, 502, "{body}");
        assert!(body.contains("not retried"), "{body}");
        assert!(body.contains("stale_connection"), "{body}");
    }
    let not_retryable = admin::counter(
        &proxy,
        "loadgate_upstream_stale_reuse_total",
        &[("upstream", "stale_post"), ("outcome", "not_retryable")],
    )
    .await;
    assert_eq!(not_retryable as usize, failures.len());
}

/// A proxy whose only backend is a closed port, with the default connect policy
/// (3 attempts, backoff 100 ms doubling, cap 1 s).
async fn proxy_to_closed_port(upstream: &str, backends: &[String]) -> Proxy {
    let mut config = proxy_config_for(backends);
    name_upstream(&mut config, upstream);
    config.upstreams[0].health.enabled = false;
    config.upstreams[0].shedding.mode = loadgate::config::ShedMode::Off;
    start_proxy(config).await
}

#[tokio::test]
async fn connect_failures_are_retried_with_backoff_then_502() {
    let dead = closed_port().await;
    let proxy = proxy_to_closed_port("connect_retry", &[dead.to_string()]).await;

    let started = Instant::now();
    let got = get(&client(), &format!("http://{}/api/x", proxy.addr())).await;
    let elapsed = started.elapsed();

    assert_eq!(got.status, 502, "{}", got.text());
    // Two waits: 100 ms and 200 ms nominal, each jittered into [½, 1] of itself.
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1_500), "{elapsed:?}");
    let retries = admin::counter(
        &proxy,
        "loadgate_upstream_connect_retries_total",
        &[("upstream", "connect_retry")],
    )
    .await;
    assert_eq!(retries, 2.0);
}

#[tokio::test]
async fn a_request_that_cannot_connect_goes_to_another_backend_and_the_dead_one_is_ejected() {
    let live = TestBackend::new().start().await;
    let dead = closed_port().await;
    let mut config = proxy_config_for(&[dead.to_string(), live.addr().to_string()]);
    name_upstream(&mut config, "eject");
    config.upstreams[0].health.enabled = false;
    config.upstreams[0].retry.eject_after_connect_failures = 3;
    let proxy = start_proxy(config).await;
    let c = client();
    let url = format!("http://{}/api/x", proxy.addr());

    // P2C picks the dead backend about half the time; a request it could not connect
    // for was never sent, so it goes to the live one at once: every request is served.
    for _ in 0..50 {
        assert_eq!(get(&c, &url).await.status, 200);
    }
    let backend = dead.to_string();
    let labels = [("upstream", "eject"), ("backend", backend.as_str())];
    let ejections = admin::counter(&proxy, "loadgate_backend_ejections_total", &labels).await;
    assert_eq!(ejections, 1.0, "three failed connects in a row eject it");
    let retries = admin::counter(
        &proxy,
        "loadgate_upstream_connect_retries_total",
        &[("upstream", "eject")],
    )
    .await;
    assert_eq!(
        retries, 0.0,
        "with another backend to go to, a dead one is not retried after a backoff"
    );
    for _ in 0..40 {
        assert_eq!(get(&c, &url).await.status, 200);
    }
    assert_eq!(
        admin::counter(&proxy, "loadgate_backend_ejections_total", &labels).await,
        1.0
    );
}
