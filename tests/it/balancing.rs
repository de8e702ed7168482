//! Several backends per upstream: active health checks take a failing backend out
//! of rotation and bring it back on their own; the less loaded of two random
//! healthy backends gets each request; with none healthy the proxy answers 503
//! at once. Real sockets on 127.0.0.1, asserted through what a user sees: HTTP
//! answers, `/status`, `/readyz`, `/metrics` and the backends' own request counts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use loadgate::config::{Config, HealthConfig, ShedMode};
use loadgate::http::body::empty;
use loadgate::listener::Proxy;
use loadgate::sim::SimBackend;

use crate::support::origin::Stalled;
use crate::support::*;

const PATH: &str = "/api/items";
const HEALTH_PATH: &str = "/actuator/health";
const INTERVAL: Duration = Duration::from_millis(100);
const CHECK_TIMEOUT: Duration = Duration::from_millis(80);
const RISE: u32 = 2;
const FALL: u32 = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a health verdict may take to show: `fall` (or `rise`) checks one
/// interval apart, each bounded by the check timeout, plus generous scheduling slack.
const VERDICT_WITHIN: Duration = Duration::from_secs(2);

/// One upstream over `backends`, fast health checks, shedding off (not under test here).
fn config(backends: &[SocketAddr]) -> Config {
    let names: Vec<String> = backends.iter().map(SocketAddr::to_string).collect();
    let mut config = proxy_config_for(&names);
    let upstream = &mut config.upstreams[0];
    upstream.health = HealthConfig {
        enabled: true,
        path: HEALTH_PATH.to_string(),
        interval: INTERVAL,
        timeout: CHECK_TIMEOUT,
        rise: RISE,
        fall: FALL,
    };
    upstream.connect_timeout = CONNECT_TIMEOUT;
    upstream.response_header_timeout = HEADER_TIMEOUT;
    upstream.max_workers = 64;
    upstream.shedding.mode = ShedMode::Off;
    config
}

/// For the tests of the balancing choice alone: health checks off, so a check
/// timing out on a busy test machine cannot take a backend out mid-measurement.
fn balancing_only(backends: &[SocketAddr]) -> Config {
    let mut config = config(backends);
    config.upstreams[0].health.enabled = false;
    config
}

/// A sim with enough workers that its health checks (served on the main port)
/// never wait behind work requests.
async fn sim(latency_ms: f64) -> SimBackend {
    TestBackend::new()
        .workers(64)
        .latency_ms(latency_ms)
        .start()
        .await
}

/// Starts a sim on `addr` again after the one there was killed; retries the bind
/// for up to 2 s while the old listener's socket is being torn down.
async fn restart_on(addr: SocketAddr, latency_ms: f64) -> SimBackend {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let restarted = TestBackend::new()
            .listen(addr)
            .workers(64)
            .latency_ms(latency_ms)
            .try_start()
            .await;
        match restarted {
            Ok(sim) => return sim,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot restart the sim on {addr}: {e}"),
        }
    }
}

/// Polls the async `check` every 20 ms until it is true or `within` passes.
async fn until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `healthy` of `backend` in the admin `/status` document.
async fn status_healthy(proxy: &Proxy, backend: SocketAddr) -> bool {
    let status = admin::status(proxy).await;
    let backends = status["upstreams"][0]["backends"]
        .as_array()
        .expect("backends listed")
        .clone();
    let entry = backends
        .iter()
        .find(|b| b["address"] == backend.to_string())
        .unwrap_or_else(|| panic!("{backend} not in /status: {status}"));
    entry["healthy"].as_bool().expect("healthy is a bool")
}

/// The value of `loadgate_backend_healthy` for `backend`, from the admin `/metrics`.
async fn health_metric(proxy: &Proxy, backend: SocketAddr) -> Option<f64> {
    let backend = backend.to_string();
    let labels = [("upstream", "app"), ("backend", backend.as_str())];
    admin::metric(proxy, "loadgate_backend_healthy", &labels).await
}

/// Waits until `/readyz` says ready, i.e. a backend has passed a check.
async fn wait_ready(proxy: &Proxy) {
    let ready = until(VERDICT_WITHIN, || async {
        admin::readyz(proxy).await.status == 200
    })
    .await;
    assert!(ready, "/readyz never became ready");
}

/// One request as a client saw it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    started: Instant,
    elapsed: Duration,
    /// HTTP status, or 0 if no answer came within 10 s.
    status: u16,
}

/// `n` requests to `url` from `concurrency` closed loops.
async fn closed_loop(url: &str, concurrency: usize, n: usize) -> Vec<Sample> {
    let c = client();
    let per_loop = n.div_ceil(concurrency);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, url) = (c.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            for _ in 0..per_loop {
                samples.push(one_request(&c, &url).await);
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("load task"));
    }
    samples
}

async fn one_request(c: &TestClient, url: &str) -> Sample {
    let started = Instant::now();
    let req = Request::get(url).body(empty()).unwrap();
    let status = match tokio::time::timeout(Duration::from_secs(10), async {
        let response = c.request(req).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    })
    .await
    {
        Ok(Some(status)) => status,
        _ => 0,
    };
    Sample {
        started,
        elapsed: started.elapsed(),
        status,
    }
}

/// Requests from `concurrency` loops until `stop` is set (or 30 s pass, so the
/// test cannot run away), recorded as they finish.
fn steady_traffic(
    url: String,
    concurrency: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Sample>>>, Vec<tokio::task::JoinHandle<()>>) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let c = client();
    let hard_stop = Instant::now() + Duration::from_secs(30);
    let tasks = (0..concurrency)
        .map(|_| {
            let (c, url, stop, samples) = (c.clone(), url.clone(), stop.clone(), samples.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                    let sample = one_request(&c, &url).await;
                    samples.lock().unwrap().push(sample);
                    // A little pacing keeps the loop from monopolising the runtime.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    (samples, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_backend_is_ejected_and_comes_back_after_restart() {
    let a = sim(5.0).await;
    let b = sim(5.0).await;
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let proxy = start_proxy(config(&[a_addr, b_addr])).await;
    wait_ready(&proxy).await;
    assert_eq!(health_metric(&proxy, a_addr).await, Some(1.0));

    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{}{PATH}", proxy.addr());
    let (samples, tasks) = steady_traffic(url, 4, stop.clone());

    // Both serve before the kill.
    let a_stats = a.stats();
    let both_serve = eventually(Duration::from_secs(3), || {
        a_stats.requests(PATH) >= 20 && b.stats().requests(PATH) >= 20
    })
    .await;
    assert!(both_serve, "traffic did not reach both backends");

    // Kill A: its listener and every connection go at once, in-flight requests included.
    let killed = Instant::now();
    drop(a);

    let ejected = until(VERDICT_WITHIN, || async {
        !status_healthy(&proxy, a_addr).await
    })
    .await;
    let ejected_seen = Instant::now();
    assert!(
        ejected,
        "A still healthy in /status after {VERDICT_WITHIN:?}"
    );
    assert_eq!(health_metric(&proxy, a_addr).await, Some(0.0));
    assert_eq!(health_metric(&proxy, b_addr).await, Some(1.0));
    assert!(status_healthy(&proxy, b_addr).await);
    let ready = admin::readyz(&proxy).await;
    assert_eq!(
        ready.status,
        200,
        "B is up, so still ready: {}",
        ready.text()
    );

    // B alone carries the traffic for a while.
    let b_before = b.stats().requests(PATH);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.stats().requests(PATH) > b_before, "B stopped serving");

    // Restart A on the same port; after `rise` passing checks it is back in rotation.
    let restarted = Instant::now();
    let a2 = restart_on(a_addr, 5.0).await;
    let back = until(VERDICT_WITHIN, || async {
        status_healthy(&proxy, a_addr).await
    })
    .await;
    assert!(back, "A not back in /status after {VERDICT_WITHIN:?}");
    assert_eq!(health_metric(&proxy, a_addr).await, Some(1.0));
    let a2_stats = a2.stats();
    assert!(
        a2_stats.requests(HEALTH_PATH) >= u64::from(RISE),
        "rise needs {RISE} passing checks"
    );
    let serves_again = eventually(Duration::from_secs(3), || a2_stats.requests(PATH) >= 20).await;
    assert!(serves_again, "restarted A gets no traffic");

    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("load loop ends")
            .expect("load loop");
    }
    let samples = samples.lock().unwrap().clone();

    // Nothing hung: every answer came within the connect plus header timeouts.
    let bound = CONNECT_TIMEOUT + HEADER_TIMEOUT;
    let slowest = samples.iter().map(|s| s.elapsed).max().unwrap();
    assert!(
        slowest < bound,
        "a request took {slowest:?} (bound {bound:?})"
    );
    // Failures are 502s for requests routed to A between its death and its
    // ejection: none finished before the kill, none started after the ejection showed.
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    for s in &failed {
        assert_eq!(s.status, 502, "{s:?}");
        assert!(
            s.started + s.elapsed >= killed,
            "failed before the kill: {s:?}"
        );
        assert!(s.started < ejected_seen, "failed after the ejection: {s:?}");
    }
    let window = ejected_seen - killed;
    assert!(
        window < VERDICT_WITHIN,
        "ejection took {window:?}; fall {FALL} × {INTERVAL:?}"
    );
    let in_window = samples
        .iter()
        .filter(|s| s.started + s.elapsed >= killed && s.started < ejected_seen)
        .count();
    eprintln!(
        "killed-backend run: {} requests, {} failed with 502 (of {in_window} in the {window:?} \
         kill→ejection window), slowest {slowest:?}, A back {:?} after restart",
        samples.len(),
        failed.len(),
        restarted.elapsed(),
    );
    a2.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_backend_gets_fewer_requests_by_inflight() {
    let slow = sim(200.0).await;
    let fast = sim(0.0).await;
    let proxy = start_proxy(balancing_only(&[slow.addr(), fast.addr()])).await;

    // Closed loops: a request waits on the slow backend for 200 ms and counts in
    // flight there all that time, so the fast one is almost always the less loaded.
    let n = 400;
    let samples = closed_loop(&format!("http://{}{PATH}", proxy.addr()), 8, n).await;
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let (to_slow, to_fast) = (slow.stats().requests(PATH), fast.stats().requests(PATH));
    eprintln!("slow 200 ms vs fast 0 ms: slow got {to_slow}, fast got {to_fast}");
    assert_eq!(to_slow + to_fast, n as u64);
    // A random or round-robin pick would give the slow one about half.
    assert!(
        to_fast >= 5 * to_slow,
        "slow got {to_slow}, fast {to_fast}: not balanced by in-flight"
    );
    slow.shutdown().await;
    fast.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn equal_backends_get_equal_shares() {
    let a = sim(1.0).await;
    let b = sim(1.0).await;
    let proxy = start_proxy(balancing_only(&[a.addr(), b.addr()])).await;

    let n = 1000;
    let samples = closed_loop(&format!("http://{}{PATH}", proxy.addr()), 8, n).await;
    assert!(samples.iter().all(|s| s.status == 200));
    let (to_a, to_b) = (a.stats().requests(PATH), b.stats().requests(PATH));
    eprintln!("equal backends: A got {to_a}, B got {to_b}");
    assert_eq!(to_a + to_b, n as u64);
    // Even a pure coin flip per request (Binomial(1000, 0.5), σ ≈ 15.8) stays within
    // ±100 of 500 (6.3 σ, p < 1e-9); least-loaded choice only narrows the spread.
    assert!(
        to_a.abs_diff(500) <= 100,
        "A got {to_a} of {n}, B {to_b}: outside 400..=600"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_failing_its_health_check_gets_no_requests() {
    // With a management port, the sim serves /actuator/* only there: its main
    // port answers 404 to the health path the proxy checks, as a Spring app
    // with `management.server.port` would.
    let failing = TestBackend::new()
        .workers(64)
        .management_port()
        .start()
        .await;
    let good = sim(0.0).await;
    let proxy = start_proxy(config(&[failing.addr(), good.addr()])).await;

    let ejected = until(VERDICT_WITHIN, || async {
        !status_healthy(&proxy, failing.addr()).await
    })
    .await;
    assert!(
        ejected,
        "a backend answering 404 to its health check stays in rotation"
    );
    assert_eq!(health_metric(&proxy, failing.addr()).await, Some(0.0));
    assert!(status_healthy(&proxy, good.addr()).await);
    assert_eq!(admin::readyz(&proxy).await.status, 200);

    let before = failing.stats().requests(PATH);
    let checks_before = failing.stats().requests(HEALTH_PATH);
    let samples = closed_loop(&format!("http://{}{PATH}", proxy.addr()), 4, 200).await;
    assert!(samples.iter().all(|s| s.status == 200));
    assert_eq!(
        failing.stats().requests(PATH),
        before,
        "ejected backend got traffic"
    );
    assert_eq!(good.stats().requests(PATH), 200);
    // It is still probed, so it can come back.
    let probed = eventually(Duration::from_secs(2), || {
        failing.stats().requests(HEALTH_PATH) > checks_before
    })
    .await;
    assert!(probed, "the ejected backend is no longer checked");
    failing.shutdown().await;
    good.shutdown().await;
}

#[tokio::test]
async fn no_healthy_backend_gives_a_fast_503_with_retry_after() {
    // One backend refuses connections; the other accepts them and never answers,
    // so a request routed to it would wait out the header timeout.
    let refused = closed_port().await;
    let stalled = Stalled::start().await;
    let stalled_addr = stalled.addr();
    let mut config = config(&[refused.addr(), stalled_addr]);
    config.upstreams[0].connect_timeout = Duration::from_secs(2);
    config.upstreams[0].response_header_timeout = Duration::from_secs(5);
    let proxy = start_proxy(config).await;

    let both_out = until(VERDICT_WITHIN, || async {
        !status_healthy(&proxy, refused.addr()).await && !status_healthy(&proxy, stalled_addr).await
    })
    .await;
    assert!(both_out, "dead backends not ejected");

    for _ in 0..5 {
        let started = Instant::now();
        let got = get(&client(), &format!("http://{}{PATH}", proxy.addr())).await;
        let took = started.elapsed();
        assert_eq!(got.status, 503, "{}", got.text());
        assert_eq!(got.header("retry-after"), Some("1"));
        assert_eq!(got.header("content-type"), Some("application/problem+json"));
        let problem = got.json();
        assert_eq!(problem["cause"], "no_healthy_backend", "{problem}");
        assert_eq!(problem["upstream"], "app");
        assert!(took < Duration::from_millis(250), "503 took {took:?}");
    }
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_every_backend_is_down_and_200_after_recovery() {
    let a = sim(0.0).await;
    let b = sim(0.0).await;
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let proxy = start_proxy(config(&[a_addr, b_addr])).await;
    wait_ready(&proxy).await;

    drop(a);
    drop(b);
    let down = until(VERDICT_WITHIN, || async {
        admin::readyz(&proxy).await.status == 503
    })
    .await;
    assert!(down, "/readyz still 200 with every backend down");
    let got = admin::readyz(&proxy).await;
    assert!(got.text().contains("no healthy backend"), "{}", got.text());
    let status = admin::status(&proxy).await;
    assert_eq!(status["upstreams"][0]["ready"], false, "{status}");

    let a = restart_on(a_addr, 0.0).await;
    let b = restart_on(b_addr, 0.0).await;
    let up = until(VERDICT_WITHIN, || async {
        admin::readyz(&proxy).await.status == 200
    })
    .await;
    assert!(up, "/readyz not 200 after the backends came back");
    assert_eq!(
        get(&client(), &format!("http://{}{PATH}", proxy.addr()))
            .await
            .status,
        200
    );
    a.shutdown().await;
    b.shutdown().await;
}
