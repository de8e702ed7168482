//! Load shedding end to end: the simulated backend (a Tomcat-like pool), the
//! proxy in front, open-loop load at a multiple of the backend's capacity, and
//! assertions on what callers and the backend saw.

use std::time::Duration;

use loadgate::config::{ActuatorSettings, Config, ShedMode};
use loadgate::listener::Proxy;

use crate::support::*;

const WORKERS: usize = 10;
const SERVICE_MS: f64 = 100.0;
/// Requests per second the backend can serve: 10 workers × 100 ms.
const CAPACITY: u32 = 100;

const CRITICAL: usize = 0;
const NORMAL: usize = 1;
const SHEDDABLE: usize = 2;

async fn backend() -> loadgate::sim::SimBackend {
    TestBackend::new()
        .workers(WORKERS)
        .latency_ms(SERVICE_MS)
        .management_port()
        .start()
        .await
}

fn config_for(backend: &loadgate::sim::SimBackend) -> Config {
    let mut config = proxy_config(backend.addr());
    config.upstreams[0].max_workers = WORKERS as u32;
    config.upstreams[0].health.enabled = false;
    config
}

fn targets(proxy: &Proxy) -> Vec<(String, u32)> {
    let base = format!("http://{}", proxy.addr());
    vec![
        (format!("{base}/api/checkout"), 1),
        (format!("{base}/api/orders"), 3),
        (format!("{base}/api/reports"), 4),
    ]
}

async fn overload(proxy: &Proxy, factor: u32, secs: f64) -> Vec<Outcome> {
    open_loop(
        &client(),
        &targets(proxy),
        CAPACITY * factor,
        Duration::from_secs_f64(secs),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_sheddable_and_normal_and_serves_every_critical_request() {
    let backend = backend().await;
    let proxy = start_proxy(config_for(&backend)).await;

    let outcomes = overload(&proxy, 4, 2.0).await;

    let shed_sheddable = count(&outcomes, SHEDDABLE, 429);
    let shed_normal = count(&outcomes, NORMAL, 429);
    assert!(shed_sheddable > 0, "no sheddable request was shed");
    assert!(shed_normal > 0, "no normal request was shed");
    assert!(
        shed_sheddable > shed_normal,
        "sheddable ({shed_sheddable}) should be shed more than normal ({shed_normal})"
    );
    for o in outcomes.iter().filter(|o| o.status == 429) {
        let secs: u64 = o
            .retry_after
            .as_deref()
            .expect("429 carries Retry-After")
            .parse()
            .expect("Retry-After is seconds");
        assert!((1..=30).contains(&secs), "Retry-After {secs}");
        assert_eq!(o.content_type.as_deref(), Some("application/problem+json"));
    }
    let critical: Vec<u16> = outcomes
        .iter()
        .filter(|o| o.target == CRITICAL)
        .map(|o| o.status)
        .collect();
    assert!(!critical.is_empty());
    assert!(
        critical.iter().all(|s| *s == 200),
        "critical requests got {:?}",
        critical.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );

    let stats = backend.stats();
    assert!(stats.peak_busy() <= WORKERS, "busy exceeded the pool");
    // The backend saw exactly the admitted requests, none of the shed ones.
    for (target, path) in [
        (CRITICAL, "/api/checkout"),
        (NORMAL, "/api/orders"),
        (SHEDDABLE, "/api/reports"),
    ] {
        let answered = outcomes
            .iter()
            .filter(|o| o.target == target && o.status != 429)
            .count() as u64;
        assert_eq!(stats.requests(path), answered, "{path}");
    }
    // Upstream "app" is in other tests too: the series counts their sheds as well.
    let shed = [
        ("route", "reports"),
        ("upstream", "app"),
        ("class", "sheddable"),
        ("outcome", "shed"),
    ];
    let decisions = "loadgate_admission_decisions_total";
    let counted = admin::counter(&proxy, decisions, &shed).await;
    assert!(
        counted >= shed_sheddable as f64,
        "{counted} < {shed_sheddable}"
    );
    let metrics = admin::metrics(&proxy).await;
    // Every metric the scrape shows is described.
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            metrics.contains(&format!("# HELP {name} ")),
            "{name} has no description"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_actuator_unreachable_the_local_signal_still_sheds() {
    let backend = backend().await;
    let dead = closed_port().await;
    let mut config = config_for(&backend);
    config.upstreams[0].actuator = ActuatorSettings {
        enabled: true,
        base_url: Some(format!("http://{dead}")),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(50),
        ..ActuatorSettings::default()
    };
    let proxy = start_proxy(config).await;

    let outcomes = overload(&proxy, 4, 1.5).await;
    assert!(
        count(&outcomes, SHEDDABLE, 429) > 0,
        "nothing shed on the local signal"
    );
    let status = admin::status(&proxy).await;
    let upstream = &status["upstreams"][0];
    assert_eq!(upstream["shedding"]["source"], "local");
    assert!(
        upstream["backends"][0]["actuator"]["failed_polls"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(upstream["backends"][0]["actuator"]["good_polls"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_bypassing_the_proxy_is_seen_through_the_reported_signal() {
    let backend = backend().await;
    let mut config = config_for(&backend);
    config.upstreams[0].actuator = ActuatorSettings {
        enabled: true,
        base_url: Some(format!("http://{}", backend.management_addr().unwrap())),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(80),
        ..ActuatorSettings::default()
    };
    let proxy = start_proxy(config).await;

    // Fill the whole pool straight at the backend, not through the proxy.
    let direct = client();
    let holders: Vec<_> = (0..WORKERS)
        .map(|i| {
            let c = direct.clone();
            let url = format!("http://{}/api/hold/{i}?delay_ms=3000", backend.addr());
            tokio::spawn(async move { get(&c, &url).await.status })
        })
        .collect();
    let shared = proxy.shared().clone();
    // External load is smoothed over reports: it nears the full pool within a few polls,
    // and leaves this proxy no room once it is past 7.5 of the 8 workers.
    let reported_full = || {
        let generation = shared.generation.load();
        let upstream = &generation.upstreams["app"];
        let signal = upstream.admission.signal(upstream);
        signal.reported == Some(1.0) && signal.external > 7.5 && signal.room == 0
    };
    assert!(
        eventually(Duration::from_secs(3), reported_full).await,
        "the poller never saw the full pool"
    );

    let c = client();
    let shed = get(&c, &format!("http://{}/api/reports", proxy.addr())).await;
    assert_eq!(shed.status, 429);
    let problem = shed.json();
    assert_eq!(problem["signal"], "reported");
    assert_eq!(problem["route_class"], "sheddable");
    assert!(problem["utilisation"].as_f64().unwrap() > 0.9, "{problem}");

    // A critical request waits in the bounded queue; the pool stays full, so it
    // gets 503 with Retry-After when the queue timeout runs out.
    let started = std::time::Instant::now();
    let queued = get(&c, &format!("http://{}/api/checkout", proxy.addr())).await;
    assert_eq!(queued.status, 503);
    assert!(queued.header("retry-after").is_some());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "did not wait in the queue"
    );
    assert_eq!(backend.stats().requests("/api/reports"), 0);
    assert_eq!(backend.stats().requests("/api/checkout"), 0);

    for h in holders {
        assert_eq!(h.await.unwrap(), 200);
    }
    let reported_low = || {
        let generation = shared.generation.load();
        let upstream = &generation.upstreams["app"];
        upstream
            .admission
            .signal(upstream)
            .reported
            .is_some_and(|r| r < 0.5)
    };
    assert!(
        eventually(Duration::from_secs(3), reported_low).await,
        "the reported signal never cleared"
    );
    let served = get(&c, &format!("http://{}/api/reports", proxy.addr())).await;
    assert_eq!(served.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_sheds_nothing_and_counts_what_it_would_have_shed() {
    let backend = backend().await;
    let mut config = config_for(&backend);
    config.upstreams[0].shedding.mode = ShedMode::Shadow;
    let proxy = start_proxy(config).await;

    let outcomes = overload(&proxy, 4, 1.0).await;
    assert_eq!(outcomes.iter().filter(|o| o.status == 429).count(), 0);
    let status = admin::status(&proxy).await;
    let reports = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "reports")
        .unwrap();
    assert!(reports["would_shed"].as_u64().unwrap() > 0, "{reports}");
    assert_eq!(reports["shed"], 0);
    assert_eq!(status["upstreams"][0]["shedding"]["mode"], "shadow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_request_at_the_hard_limit_waits_for_a_slot() {
    let backend = TestBackend::new().workers(2).start().await;
    let mut config = proxy_config(backend.addr());
    config.upstreams[0].max_workers = 2;
    config.upstreams[0].health.enabled = false;
    let proxy = start_proxy(config).await;
    let c = client();
    let busy: Vec<_> = (0..2)
        .map(|i| {
            let c = c.clone();
            let url = format!("http://{}/api/orders/{i}?delay_ms=300", proxy.addr());
            tokio::spawn(async move { get(&c, &url).await.status })
        })
        .collect();
    let shared = proxy.shared().clone();
    assert!(
        eventually(Duration::from_secs(3), || shared
            .generation
            .load()
            .upstreams["app"]
            .inflight()
            == 2)
        .await
    );
    let got = get(&c, &format!("http://{}/api/checkout", proxy.addr())).await;
    assert_eq!(got.status, 200, "{}", got.text());
    for b in busy {
        assert_eq!(b.await.unwrap(), 200);
    }
    let status = admin::status(&proxy).await;
    let checkout = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "checkout")
        .unwrap()
        .clone();
    assert_eq!(checkout["queued"], 1, "{checkout}");
    assert_eq!(checkout["queue_rejected"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_before_its_backend_sheds_nothing_until_the_signal_is_real() {
    let port = closed_port().await;
    let mut config = proxy_config(port.addr());
    config.upstreams[0].max_workers = WORKERS as u32;
    config.upstreams[0].health.enabled = false;
    config.upstreams[0].actuator = ActuatorSettings {
        enabled: true,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(80),
        ..ActuatorSettings::default()
    };
    let proxy = start_proxy(config).await;
    let c = client();
    for _ in 0..20 {
        let got = get(&c, &format!("http://{}/api/reports", proxy.addr())).await;
        assert_eq!(got.status, 502, "no backend yet: {}", got.text());
    }

    let backend = TestBackend::new()
        .listen(port.release())
        .workers(WORKERS)
        .start()
        .await;
    let shared = proxy.shared().clone();
    assert!(
        eventually(Duration::from_secs(3), || {
            shared.generation.load().upstreams["app"]
                .admission
                .reports()[0]
                .good_polls()
                > 0
        })
        .await,
        "the poller never reached the backend"
    );
    for _ in 0..20 {
        let got = get(&c, &format!("http://{}/api/reports", proxy.addr())).await;
        assert_eq!(got.status, 200);
    }
    assert_eq!(backend.stats().requests("/api/reports"), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_port_carries_health_checks_and_actuator_polls() {
    let backend = backend().await;
    let mut config = proxy_config(backend.addr());
    config.upstreams[0].management_port = Some(backend.management_addr().unwrap().port());
    config.upstreams[0].actuator = ActuatorSettings {
        enabled: true,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(80),
        ..ActuatorSettings::default()
    };
    let proxy = start_proxy(config).await;
    let shared = proxy.shared().clone();
    let ready_and_polled = || {
        let generation = shared.generation.load();
        let upstream = &generation.upstreams["app"];
        upstream.is_ready() && upstream.admission.reports()[0].good_polls() > 0
    };
    assert!(
        eventually(Duration::from_secs(3), ready_and_polled).await,
        "health checks or polls did not reach the management port"
    );
    // With a management port the sim answers /actuator/* on its main port with 404, as
    // Spring does, so a healthy backend and a good poll prove both used the management port.
    let status = admin::status(&proxy).await;
    assert_eq!(status["upstreams"][0]["backends"][0]["healthy"], true);
    assert_eq!(
        status["upstreams"][0]["backends"][0]["actuator"]["max"],
        WORKERS as f64
    );
}
