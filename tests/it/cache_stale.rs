//! Stale-if-error for each way an origin fails a GET whose copy is stored: it stops
//! answering (the upstream's response timeout fires), it resets the connection, or its
//! backend is out of rotation. Within the copy's window (its own `stale-if-error`, or
//! the route's `cache_stale_if_error_ms`) the client gets the copy; past it, or with no
//! window, it gets the error loadgate answers for that failure.
//!
//! Not here (in `cache.rs`): an origin answering 5xx
//! (`a_failing_origin_is_answered_from_a_stored_copy_within_its_stale_if_error_window`),
//! a refused connection (`a_stored_copy_answers_when_the_backend_is_gone`), and a shed
//! request (`a_stale_copy_is_served_instead_of_a_429_while_shedding`).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use loadgate::cache::CacheSettings;
use loadgate::config::{CachePolicy, Config};

use crate::support::origin::{respond, Fault, FaultyOrigin};
use crate::support::*;

/// Stored 30 s old with `max-age=10, stale-if-error=60`: 20 s past its freshness, inside
/// its own window.
const OWN_WINDOW: &str = "/api/own-window";
/// On the `reports` route, whose `cache_stale_if_error_ms` is 60 s; the response names
/// no window of its own.
const ROUTE_WINDOW: &str = "/api/reports/route-window";
/// Stored 100 s old with `max-age=10, stale-if-error=60`: 90 s past its freshness,
/// outside its window.
const PAST_WINDOW: &str = "/api/past-window";
/// `max-age=0` and no window, on a route with none.
const NO_WINDOW: &str = "/api/no-window";

/// What the origin answers while it is well: the copies the tests store.
fn stored_copy(req: &http::request::Parts, _: usize) -> Response<Full<Bytes>> {
    let path = req.uri.path();
    let (cache_control, age) = match path {
        OWN_WINDOW => ("max-age=10, stale-if-error=60", "30"),
        PAST_WINDOW => ("max-age=10, stale-if-error=60", "100"),
        _ => ("max-age=0", "0"),
    };
    respond(
        200,
        &[("cache-control", cache_control), ("age", age)],
        format!("stored {path}"),
    )
}

/// Every route cached; only `reports` has a default stale-if-error window. The upstream
/// is named `upstream`, so its metrics are this test's own.
fn cached_config(origin: SocketAddr, upstream: &str) -> Config {
    let mut config = proxy_config(origin);
    name_upstream(&mut config, upstream);
    for route in &mut config.routes {
        route.cache = CachePolicy::On;
        if route.name == "reports" {
            route.cache_settings = CacheSettings {
                stale_if_error: Some(Duration::from_secs(60)),
                ..CacheSettings::default()
            };
        }
    }
    config
}

/// Stores each copy while the origin answers.
async fn store_copies(client: &TestClient, base: &str, origin: &FaultyOrigin) {
    for path in [OWN_WINDOW, ROUTE_WINDOW, PAST_WINDOW, NO_WINDOW] {
        let got = get(client, &format!("{base}{path}")).await;
        assert_eq!((got.status, got.text()), (200, format!("stored {path}")));
        let cache_status = got.header("cache-status").unwrap_or_default();
        assert!(cache_status.contains("stored"), "{path}: {cache_status}");
    }
    assert_eq!(origin.requests(), 4);
}

/// Asks for each copy while the origin fails: within its window the client gets the
/// copy, with its `Age` and a `Cache-Status` naming stale-if-error; past it, or with no
/// window, the `status` loadgate answers for the failure, whose problem document names
/// `cause`.
async fn assert_stale_only_within_the_window(
    client: &TestClient,
    base: &str,
    status: u16,
    cause: &str,
) {
    for (path, ages) in [(OWN_WINDOW, 30..40), (ROUTE_WINDOW, 0..10)] {
        let got = get(client, &format!("{base}{path}")).await;
        assert_eq!(
            got.status,
            200,
            "{path}: the stored copy, not {}",
            got.text()
        );
        assert_eq!(got.text(), format!("stored {path}"));
        let age: u64 = got.header("age").expect("an Age").parse().unwrap();
        assert!(ages.contains(&age), "{path}: Age {age}, want {ages:?}");
        let cache_status = got.header("cache-status").unwrap_or_default();
        assert!(
            cache_status.starts_with("loadgate; hit")
                && cache_status.contains("detail=stale-if-error"),
            "{path}: {cache_status}"
        );
    }
    for path in [PAST_WINDOW, NO_WINDOW] {
        let got = get(client, &format!("{base}{path}")).await;
        assert_eq!(got.status, status, "{path}: {}", got.text());
        assert_eq!(
            got.header("content-type"),
            Some("application/problem+json"),
            "{path}"
        );
        assert_eq!(got.json()["cause"], cause, "{path}: {}", got.text());
        assert_eq!(
            got.header("cache-status"),
            None,
            "{path}: no copy was served"
        );
    }
}

/// `loadgate_upstream_errors_total` of `upstream` for `kind`.
async fn upstream_errors(proxy: &loadgate::listener::Proxy, upstream: &str, kind: &str) -> f64 {
    let labels = [("upstream", upstream), ("kind", kind)];
    admin::counter(proxy, "loadgate_upstream_errors_total", &labels).await
}

/// Polls the async `check` every 20 ms until it is true or `within` passes.
async fn until<F: Future<Output = bool>>(within: Duration, mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The origin takes each request and never answers: the upstream's response timeout
/// fires (504), and a stored copy within its window answers instead.
#[tokio::test]
async fn a_response_timeout_is_answered_from_a_stored_copy_within_its_window() {
    let origin = FaultyOrigin::start(stored_copy).await;
    let mut config = cached_config(origin.addr(), "stale_timeout");
    // Short, so each held request costs the test 400 ms rather than proxy_config's 5 s;
    // still ample for an origin on loopback to answer the requests that store the copies.
    config.upstreams[0].response_header_timeout = Duration::from_millis(400);
    // Only the data path fails here: a health check missing its 80 ms on a busy machine
    // must not turn this into a no-backend test.
    config.upstreams[0].health.enabled = false;
    let proxy = start_proxy(config).await;
    let client = client();
    let base = format!("http://{}", proxy.addr());
    store_copies(&client, &base, &origin).await;

    origin.fail(Fault::Hold);
    assert_stale_only_within_the_window(&client, &base, 504, "header_timeout").await;
    assert_eq!(origin.requests(), 8, "every failed GET reached the origin");
    assert_eq!(
        upstream_errors(&proxy, "stale_timeout", "header_timeout").await,
        4.0,
        "each timeout counted, whether the client got the copy or the error"
    );
}

/// The origin reads each request and resets the connection without a response (502),
/// and a stored copy within its window answers instead.
#[tokio::test]
async fn a_reset_connection_is_answered_from_a_stored_copy_within_its_window() {
    let origin = FaultyOrigin::start(stored_copy).await;
    let mut config = cached_config(origin.addr(), "stale_reset");
    // As above: only the data path fails.
    config.upstreams[0].health.enabled = false;
    let proxy = start_proxy(config).await;
    let client = client();
    let base = format!("http://{}", proxy.addr());
    store_copies(&client, &base, &origin).await;

    origin.fail(Fault::Reset);
    assert_stale_only_within_the_window(&client, &base, 502, "protocol").await;
    assert_eq!(origin.requests(), 8, "every failed GET reached the origin");
    assert_eq!(
        upstream_errors(&proxy, "stale_reset", "protocol").await,
        4.0,
        "each reset counted, whether the client got the copy or the error"
    );
}

/// The origin's health check fails, so its only backend leaves the rotation (503, and
/// the origin sees nothing); a stored copy within its window answers instead.
#[tokio::test]
async fn a_backend_out_of_rotation_is_answered_from_a_stored_copy_within_its_window() {
    let origin = FaultyOrigin::start(stored_copy).await;
    let mut config = cached_config(origin.addr(), "stale_rotation");
    // Out of rotation two failed checks (at most ~750 ms) after the health check turns
    // to 503; a 200 ms timeout, so a slow check on a busy machine does not take the
    // backend out while the copies are stored.
    let health = &mut config.upstreams[0].health;
    health.interval = Duration::from_millis(250);
    health.timeout = Duration::from_millis(200);
    health.fall = 2;
    let proxy = start_proxy(config).await;
    let client = client();
    let base = format!("http://{}", proxy.addr());
    store_copies(&client, &base, &origin).await;

    origin.fail_health_checks();
    let backend = origin.addr().to_string();
    let labels = [
        ("upstream", "stale_rotation"),
        ("backend", backend.as_str()),
    ];
    let out = until(Duration::from_secs(5), || async {
        admin::metric(&proxy, "loadgate_backend_healthy", &labels).await == Some(0.0)
    })
    .await;
    assert!(out, "the backend left the rotation within 5 s");

    assert_stale_only_within_the_window(&client, &base, 503, "no_healthy_backend").await;
    let refused = get(&client, &format!("{base}{NO_WINDOW}")).await;
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(origin.requests(), 4, "the origin saw none of the GETs");
    assert_eq!(
        upstream_errors(&proxy, "stale_rotation", "no_healthy_backend").await,
        5.0,
        "each request without a backend counted, whether it got the copy or the error"
    );
}
