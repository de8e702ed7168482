//! loadgate in front of a real Apache Tomcat 10.1 (Debian's `tomcat10`), with loadgate's
//! default upstream settings: the actuator poller reads Tomcat's own thread-pool MBeans
//! through `tests/tomcat-webapp`, served on the same connector as the work.
//!
//! Each test starts its own Tomcat (8 threads; the work holds a thread 50 ms, so the
//! pool serves 160 requests/s) and skips, saying why, when Tomcat is not installed.
//! Tests take turns: two JVMs and their load on a 2-core machine would make the
//! figures they assert on meaningless.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Request;
use loadgate::admission::actuator::parse_json_value;
use loadgate::config::defaults::{BAND, THRESHOLD_SHEDDABLE};
use loadgate::http::body::empty;
use loadgate::listener::Proxy;
use serde_json::Value;
use tokio::time::Instant;

use crate::support::tomcat::{self, Tomcat};
use crate::support::*;

const THREADS: usize = 8;
const WORK_MS: u64 = 50;
/// Requests per second the pool serves: 8 threads × 50 ms.
const CAPACITY: u32 = (THREADS as u64 * 1000 / WORK_MS) as u32;

/// Held by a test from before its Tomcat starts until after it stops.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Tomcat and a proxy in front of it. Fields drop in order: proxy, Tomcat, the turn.
struct Rig {
    proxy: Proxy,
    tomcat: Tomcat,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Rig {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.addr())
    }

    /// A URL on Tomcat itself, bypassing the proxy.
    fn direct(&self, path: &str) -> String {
        format!("http://{}{path}", self.tomcat.addr())
    }

    async fn status(&self) -> Value {
        admin::status(&self.proxy).await
    }

    /// Fetches `/status` every 50 ms until `check` holds; panics with `what` and the
    /// last document after `within`.
    async fn status_until(&self, within: Duration, what: &str, check: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status().await;
            if check(&status) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not within {within:?}; last /status:\n{}",
                    serde_json::to_string_pretty(&status).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_until_idle(&self) {
        self.status_until(
            Duration::from_secs(5),
            "the proxy's in-flight count drops to 0",
            |s| s.pointer("/upstreams/0/inflight") == Some(&Value::from(0)),
        )
        .await;
    }
}

/// Takes this test's turn and starts Tomcat; `None` (the reason printed) when it is
/// not installed.
async fn start_tomcat() -> Option<(Tomcat, tokio::sync::MutexGuard<'static, ()>)> {
    let turn = ONE_AT_A_TIME.lock().await;
    let tomcat = tokio::task::spawn_blocking(|| Tomcat::start(THREADS))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    Some((tomcat, turn))
}

/// Starts a proxy with loadgate's defaults in front of `tomcat` and waits for the
/// actuator poller's first good report.
async fn start_rig((tomcat, turn): (Tomcat, tokio::sync::MutexGuard<'static, ()>)) -> Rig {
    let rig = Rig {
        proxy: start_proxy(default_config(tomcat.addr())).await,
        tomcat,
        _turn: turn,
    };
    rig.status_until(
        Duration::from_secs(5),
        "the actuator poller reads Tomcat",
        |s| good_polls(s) > 0,
    )
    .await;
    rig
}

async fn rig() -> Option<Rig> {
    Some(start_rig(start_tomcat().await?).await)
}

fn good_polls(status: &Value) -> u64 {
    status
        .pointer("/upstreams/0/backends/0/actuator/good_polls")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The status of one GET, 0 when it failed without one (bounded by 10 s).
async fn status_of(client: &TestClient, url: &str) -> u16 {
    let req = Request::get(url).body(empty()).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let _ = tokio::time::timeout(Duration::from_secs(10), read(response)).await;
            status
        }
        _ => 0,
    }
}

/// How many outcomes had each status, for messages.
fn histogram(statuses: impl IntoIterator<Item = u16>) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for status in statuses {
        *counts.entry(status).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tomcat_reports_its_pool_and_serves_through_the_proxy() {
    let Some(started) = start_tomcat().await else {
        return;
    };
    // Idle, straight to Tomcat: the webapp's metrics parse as loadgate reads them, and
    // the thread serving the metrics request counts itself as busy.
    let tomcat = &started.0;
    let metric = |name: &str| {
        let (status, body) = tomcat::get(tomcat.addr(), &format!("/actuator/metrics/{name}"))
            .expect("Tomcat answers");
        assert_eq!(status, 200, "{name}: {body}");
        parse_json_value(body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}: {body}"))
    };
    assert_eq!(metric("tomcat.threads.config.max"), THREADS as f64);
    // A thread that served an earlier request (the start-up probe) can take a moment to
    // go back to the pool on a busy machine: read again, for at most a second.
    let mut busy = metric("tomcat.threads.busy");
    for _ in 0..50 {
        if busy == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        busy = metric("tomcat.threads.busy");
    }
    assert_eq!(busy, 1.0);
    let health = tomcat::get(tomcat.addr(), "/actuator/health").unwrap();
    assert_eq!(health, (200, "{\"status\":\"UP\"}\n".to_string()));

    let rig = start_rig(started).await;
    let client = client();
    let got = get(&client, &rig.url("/api/checkout?ms=5")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "ok\n");
    assert_eq!(got.header("content-type"), Some("text/plain;charset=UTF-8"));
    let posted = send(
        &client,
        Request::post(rig.url("/api/checkout?ms=5"))
            .header("content-type", "application/json")
            .body(body("{\"cart\":1}"))
            .unwrap(),
    )
    .await;
    assert_eq!(posted.status, 200, "{}", posted.text());

    let status = rig.status().await;
    let actuator = &status["upstreams"][0]["backends"][0]["actuator"];
    assert_eq!(actuator["enabled"], true, "{status:#}");
    assert_eq!(actuator["last_error"], Value::Null, "{status:#}");
    assert_eq!(actuator["max"].as_f64(), Some(THREADS as f64), "{status:#}");
    let busy = actuator["busy"].as_f64().expect("a busy figure");
    assert!((1.0..=THREADS as f64).contains(&busy), "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_load_is_never_shed() {
    let Some(rig) = rig().await else { return };
    let targets = [
        (rig.url(&format!("/api/checkout?ms={WORK_MS}")), 1),
        (rig.url(&format!("/api/reports?ms={WORK_MS}")), 3),
    ];

    let outcomes = open_loop(&client(), &targets, CAPACITY / 2, Duration::from_secs(3)).await;

    let counts = histogram(outcomes.iter().map(|o| o.status));
    assert_eq!(
        counts.get(&200).copied().unwrap_or(0),
        outcomes.len(),
        "at half the pool's capacity every request is served; statuses: {counts:?}; /status:\n{:#}",
        rig.status().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_critical_requests_is_served_in_full() {
    let Some(rig) = rig().await else { return };
    let client = client();
    let url = rig.url("/api/checkout?ms=1");

    let started = Instant::now();
    let tasks: Vec<_> = (0..150)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { status_of(&client, &url).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("request task"));
    }

    let took = started.elapsed();
    eprintln!("150 critical requests served in {took:?}");
    let counts = histogram(statuses);
    let status = rig.status().await;
    assert_eq!(
        counts,
        BTreeMap::from([(200, 150)]),
        "every critical request of the burst is served (the burst took {took:?}); \
         /status:\n{status:#}"
    );
    assert_eq!(status["routes"][0]["name"], "checkout");
    assert_eq!(status["routes"][0]["queue_rejected"], 0, "{status:#}");
}

/// 4× the pool's capacity of sheddable requests, enough to shed; returns how many were.
async fn overload(rig: &Rig, duration: Duration) -> usize {
    let targets = [(rig.url(&format!("/api/reports?ms={WORK_MS}")), 1)];
    let outcomes = open_loop(&client(), &targets, 4 * CAPACITY, duration).await;
    let shed = count(&outcomes, 0, 429);
    assert!(
        shed > 0,
        "4x overload sheds; statuses: {:?}",
        histogram(outcomes.iter().map(|o| o.status))
    );
    shed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_is_not_shed_after_an_overload_drains() {
    let Some(rig) = rig().await else { return };
    overload(&rig, Duration::from_secs(2)).await;
    rig.wait_until_idle().await;

    // The last reports were taken under overload (busy 8/8 or close); they must not
    // shed requests to a pool that is now idle.
    let client = client();
    let mut statuses = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..15 {
        ticker.tick().await;
        statuses.push(status_of(&client, &rig.url("/api/reports?ms=5")).await);
    }

    assert_eq!(
        histogram(statuses.iter().copied()),
        BTreeMap::from([(200, 15)]),
        "sequential requests to an idle pool in the 1.5 s after an overload: {statuses:?}; \
         /status:\n{:#}",
        rig.status().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_ends_after_an_overload_without_further_requests() {
    let Some(rig) = rig().await else { return };
    overload(&rig, Duration::from_secs(2)).await;
    rig.wait_until_idle().await;

    // No request reaches the proxy from here on: the episode must end by itself.
    rig.status_until(
        Duration::from_secs(4),
        "shedding.active turns false once the load stops",
        |s| s.pointer("/upstreams/0/shedding/active") == Some(&Value::Bool(false)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_that_bypasses_the_proxy_is_seen_and_sheds_sheddable_requests() {
    let Some(rig) = rig().await else { return };
    let client = client();

    // Seven of the eight threads held by requests sent straight to Tomcat: 7/8 is past
    // the sheddable threshold and its band (0.70 + 0.10), so every sheddable request is
    // shed, and one thread is left, which critical requests get. (Six would be 0.75,
    // inside the band: each sheddable request shed with probability 0.5.) They hold
    // for 5 s: up to 3.5 s for the poller to see them, then the requests below.
    let held = 7;
    let hold = Duration::from_secs(5);
    let held_at = Instant::now();
    let holders: Vec<_> = (0..held)
        .map(|_| {
            let client = client.clone();
            let url = rig.direct(&format!("/api/hold?ms={}", hold.as_millis()));
            tokio::spawn(async move { status_of(&client, &url).await })
        })
        .collect();

    let external = |s: &Value| {
        s.pointer("/upstreams/0/shedding/external")
            .and_then(Value::as_f64)
    };
    rig.status_until(
        Duration::from_secs(3),
        "shedding.external reaches 4 workers",
        |s| external(s).is_some_and(|e| e >= 4.0),
    )
    .await;
    // The external load is smoothed across polls: wait until it is past the band.
    let shed_all = THRESHOLD_SHEDDABLE + BAND;
    rig.status_until(
        (held_at + Duration::from_millis(3500)).saturating_duration_since(Instant::now()),
        "the utilisation passes the sheddable threshold and band",
        |s| {
            s.pointer("/upstreams/0/shedding/utilisation")
                .and_then(Value::as_f64)
                .is_some_and(|u| u >= shed_all)
        },
    )
    .await;

    let mut sheddable = Vec::new();
    let mut critical = Vec::new();
    for _ in 0..5 {
        sheddable.push(status_of(&client, &rig.url("/api/reports?ms=5")).await);
        critical.push(status_of(&client, &rig.url("/api/checkout?ms=5")).await);
    }
    let during = held_at.elapsed();
    let status = rig.status().await;
    assert!(
        during < hold - Duration::from_millis(300),
        "the requests ended {during:?} after the hold began, too close to its end ({hold:?})"
    );
    assert_eq!(
        sheddable,
        vec![429; 5],
        "sheddable requests are shed while {held} of {THREADS} threads are held; \
         /status:\n{status:#}"
    );
    assert_eq!(
        critical,
        vec![200; 5],
        "critical requests get the thread left; /status:\n{status:#}"
    );

    let mut statuses = Vec::new();
    for task in holders {
        statuses.push(task.await.expect("holding task"));
    }
    assert_eq!(
        statuses,
        vec![200; held],
        "the requests sent straight to Tomcat"
    );
}
