//! What an operator slices `/metrics` by: requests, durations, admission decisions and
//! cache lookups labelled with the route and upstream from the config; the critical
//! queue's wait histogram; the process metrics read from `/proc` at each scrape.
//!
//! Metrics are process-wide: every test here names its upstreams and routes with a
//! prefix no other test uses, so the series it asserts on are its own.

use std::time::Duration;

use loadgate::config::{CachePolicy, Config, RouteClass, RouteConfig};
use loadgate::listener::Proxy;

use crate::support::origin::{respond, Origin};
use crate::support::*;

const REQUESTS: &str = "loadgate_requests_total";
const DECISIONS: &str = "loadgate_admission_decisions_total";
const QUEUE_WAIT_COUNT: &str = "loadgate_admission_queue_wait_seconds_count";
const QUEUE_WAIT_SUM: &str = "loadgate_admission_queue_wait_seconds_sum";

fn route(name: &str, prefix: &str, upstream: &str, class: RouteClass) -> RouteConfig {
    RouteConfig {
        name: name.to_string(),
        host: None,
        path_prefix: prefix.to_string(),
        upstream: upstream.to_string(),
        class,
        cache: CachePolicy::Off,
        cache_settings: Default::default(),
        threshold: None,
        rewrite: Default::default(),
        websocket: true,
    }
}

/// A config with upstream `name` on `backend`, health checks off, and no routes yet.
fn one_upstream(backend: std::net::SocketAddr, name: &str) -> Config {
    let mut config = proxy_config(backend);
    name_upstream(&mut config, name);
    config.upstreams[0].health.enabled = false;
    config.routes.clear();
    config
}

/// Sends `GET path` and returns its status.
async fn get_status(proxy: &Proxy, path: &str) -> u16 {
    get(&client(), &format!("http://{}{path}", proxy.addr()))
        .await
        .status
}

#[tokio::test]
async fn requests_durations_decisions_and_lookups_are_labelled_by_route_and_upstream() {
    let shop = TestBackend::new().start().await;
    let search = TestBackend::new().cache_control("max-age=60").start().await;
    let mut config = one_upstream(shop.addr(), "ml_shop");
    let mut second = config.upstreams[0].clone();
    second.name = "ml_search".to_string();
    second.backends = vec![search.addr().to_string()];
    config.upstreams.push(second);
    config.routes = vec![
        route("ml_orders", "/api/orders", "ml_shop", RouteClass::Normal),
        route(
            "ml_checkout",
            "/api/checkout",
            "ml_shop",
            RouteClass::Critical,
        ),
        RouteConfig {
            cache: CachePolicy::On,
            ..route("ml_find", "/api/find", "ml_search", RouteClass::Sheddable)
        },
    ];
    let proxy = start_proxy(config).await;
    let unrouted = [
        ("route", "none"),
        ("upstream", "none"),
        ("class", "none"),
        ("status", "4xx"),
    ];
    let unrouted_before = admin::counter(&proxy, REQUESTS, &unrouted).await;

    for i in 0..3 {
        assert_eq!(get_status(&proxy, &format!("/api/orders/{i}")).await, 200);
    }
    // The simulated backend answers 400 to a delay it cannot read: a 4xx on the route.
    assert_eq!(get_status(&proxy, "/api/orders/x?delay_ms=soon").await, 400);
    assert_eq!(get_status(&proxy, "/api/checkout/1").await, 200);
    // The first is a miss and goes to the backend; the second a hit, answered here.
    assert_eq!(get_status(&proxy, "/api/find/q").await, 200);
    assert_eq!(get_status(&proxy, "/api/find/q").await, 200);
    assert_eq!(get_status(&proxy, "/nowhere").await, 404);

    let orders = [
        ("route", "ml_orders"),
        ("upstream", "ml_shop"),
        ("class", "normal"),
    ];
    let with = |labels: &[(&'static str, &'static str)], more: (&'static str, &'static str)| {
        let mut labels = labels.to_vec();
        labels.push(more);
        labels
    };
    let settles = |labels: Vec<(&'static str, &'static str)>, want: f64| {
        let proxy = &proxy;
        async move { admin::counter_settles(proxy, REQUESTS, &labels, want).await }
    };
    assert_eq!(settles(with(&orders, ("status", "2xx")), 3.0).await, 3.0);
    assert_eq!(settles(with(&orders, ("status", "4xx")), 1.0).await, 1.0);
    let checkout = [
        ("route", "ml_checkout"),
        ("upstream", "ml_shop"),
        ("class", "critical"),
    ];
    assert_eq!(settles(with(&checkout, ("status", "2xx")), 1.0).await, 1.0);
    let find = [
        ("route", "ml_find"),
        ("upstream", "ml_search"),
        ("class", "sheddable"),
    ];
    // The hit counts on its route too, though it never reached the upstream.
    assert_eq!(settles(with(&find, ("status", "2xx")), 2.0).await, 2.0);
    assert_eq!(
        admin::metric(&proxy, REQUESTS, &with(&find, ("status", "5xx"))).await,
        Some(0.0),
        "every status class of a route is there from the start"
    );
    let unrouted_after = admin::counter(&proxy, REQUESTS, &unrouted).await;
    assert!(
        unrouted_after > unrouted_before,
        "the 404 counts as route none: {unrouted_before} -> {unrouted_after}"
    );

    // One duration per request, in the route's histogram.
    let durations = "loadgate_request_duration_seconds_count";
    assert_eq!(admin::counter(&proxy, durations, &orders).await, 4.0);
    assert_eq!(admin::counter(&proxy, durations, &checkout).await, 1.0);
    assert_eq!(admin::counter(&proxy, durations, &find).await, 2.0);

    // Admission saw every request that reached it: not the cache hit.
    let admitted = ("outcome", "admitted");
    assert_eq!(
        admin::counter(&proxy, DECISIONS, &with(&orders, admitted)).await,
        4.0
    );
    assert_eq!(
        admin::counter(&proxy, DECISIONS, &with(&checkout, admitted)).await,
        1.0
    );
    assert_eq!(
        admin::counter(&proxy, DECISIONS, &with(&find, admitted)).await,
        1.0
    );

    let lookups = "loadgate_cache_lookups_total";
    let lookup = |result: &'static str| {
        [
            ("route", "ml_find"),
            ("upstream", "ml_search"),
            ("result", result),
        ]
    };
    assert_eq!(admin::counter(&proxy, lookups, &lookup("miss")).await, 1.0);
    assert_eq!(admin::counter(&proxy, lookups, &lookup("hit")).await, 1.0);
    assert_eq!(shop.stats().requests("/api/orders/0"), 1);
    assert_eq!(search.stats().requests("/api/find/q"), 1);
}

#[tokio::test]
async fn a_reload_keeps_the_series_of_an_unchanged_route_counting() {
    let backend = TestBackend::new().start().await;
    let mut config = one_upstream(backend.addr(), "mr_app");
    config.routes = vec![
        route("mr_kept", "/api/kept", "mr_app", RouteClass::Normal),
        route("mr_moved", "/api/moved", "mr_app", RouteClass::Normal),
    ];
    let proxy = start_proxy(config.clone()).await;
    for path in ["/api/kept/1", "/api/kept/2", "/api/moved/1"] {
        assert_eq!(get_status(&proxy, path).await, 200);
    }
    let kept = [
        ("route", "mr_kept"),
        ("upstream", "mr_app"),
        ("class", "normal"),
        ("status", "2xx"),
    ];
    assert_eq!(
        admin::counter_settles(&proxy, REQUESTS, &kept, 2.0).await,
        2.0
    );

    // The upstream's own config changes (it is rebuilt under the same name) and the other
    // route changes class: the kept route's labels are unchanged, so its series go on.
    let mut reloaded = config.clone();
    reloaded.upstreams[0].max_workers += 1;
    reloaded.routes[1].class = RouteClass::Sheddable;
    proxy.apply(reloaded);
    for path in ["/api/kept/3", "/api/moved/2"] {
        assert_eq!(get_status(&proxy, path).await, 200);
    }

    assert_eq!(
        admin::counter_settles(&proxy, REQUESTS, &kept, 3.0).await,
        3.0
    );
    let kept_admitted = [
        ("route", "mr_kept"),
        ("upstream", "mr_app"),
        ("class", "normal"),
        ("outcome", "admitted"),
    ];
    assert_eq!(admin::counter(&proxy, DECISIONS, &kept_admitted).await, 3.0);
    let status = admin::status(&proxy).await;
    let route_status = |name: &str| {
        status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        route_status("mr_kept")["admitted"],
        3,
        "counting on in /status"
    );
    // A route whose class changed counts under its new labels from there on.
    assert_eq!(route_status("mr_moved")["admitted"], 1);
    let moved = |class| {
        [
            ("route", "mr_moved"),
            ("upstream", "mr_app"),
            ("class", class),
            ("status", "2xx"),
        ]
    };
    assert_eq!(
        admin::counter_settles(&proxy, REQUESTS, &moved("sheddable"), 1.0).await,
        1.0
    );
    assert_eq!(
        admin::counter(&proxy, REQUESTS, &moved("normal")).await,
        1.0
    );
}

/// A proxy whose upstream `name` has room for one request, in front of an origin that
/// holds requests to `/hold…` until released; `/api/checkout` is critical.
async fn one_slot(name: &str, queue_timeout: Duration) -> (Origin, Proxy) {
    let origin = Origin::start(Duration::ZERO, |_, _| respond(200, &[], "ok")).await;
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, name);
    config.upstreams[0].health.enabled = false;
    config.upstreams[0].max_workers = 1;
    config.upstreams[0].shedding.queue_timeout = queue_timeout;
    let proxy = start_proxy(config).await;
    (origin, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_wait_histogram_counts_each_queued_request_by_how_it_left() {
    let timeout = Duration::from_millis(300);
    let (origin, proxy) = one_slot("mq_app", timeout).await;
    let base = format!("http://{}", proxy.addr());
    let holder = tokio::spawn({
        let url = format!("{base}/api/checkout/hold");
        async move { get(&client(), &url).await.status }
    });
    let shared = proxy.shared().clone();
    let inflight = |n: usize| {
        let shared = shared.clone();
        move || shared.generation.load().upstreams["mq_app"].inflight() == n
    };
    assert!(eventually(Duration::from_secs(3), inflight(1)).await);

    // The one slot stays taken: a critical request waits out the queue timeout.
    let started = std::time::Instant::now();
    assert_eq!(get_status(&proxy, "/api/checkout/late").await, 503);
    assert!(started.elapsed() >= timeout);
    let timed_out = [("upstream", "mq_app"), ("outcome", "queue_timeout")];
    assert_eq!(
        admin::counter(&proxy, QUEUE_WAIT_COUNT, &timed_out).await,
        1.0
    );
    let waited = admin::counter(&proxy, QUEUE_WAIT_SUM, &timed_out).await;
    assert!(waited >= timeout.as_secs_f64(), "waited {waited} s");

    // Another waits while the slot is held, and is admitted when it frees.
    let queued = tokio::spawn({
        let url = format!("{base}/api/checkout/soon");
        async move { get(&client(), &url).await.status }
    });
    let waiting = || {
        shared.generation.load().upstreams["mq_app"]
            .admission
            .queued()
            == 1
    };
    assert!(eventually(Duration::from_secs(3), waiting).await);
    origin.release();
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(queued.await.unwrap(), 200);
    let admitted = [("upstream", "mq_app"), ("outcome", "admitted")];
    assert_eq!(
        admin::counter(&proxy, QUEUE_WAIT_COUNT, &admitted).await,
        1.0
    );
    assert!(admin::counter(&proxy, QUEUE_WAIT_SUM, &admitted).await > 0.0);
    let cancelled = [("upstream", "mq_app"), ("outcome", "cancelled")];
    assert_eq!(
        admin::counter(&proxy, QUEUE_WAIT_COUNT, &cancelled).await,
        0.0
    );
    assert_eq!(
        origin.requests(),
        2,
        "the timed-out request never reached the origin"
    );
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn process_metrics_are_read_from_proc_at_each_scrape() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(one_upstream(backend.addr(), "mp_app")).await;
    let read = |text: &str, name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("{name} is not in the scrape:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let first = admin::metrics(&proxy).await;
    assert!(read(&first, "process_resident_memory_bytes") > 0.0);
    assert!(read(&first, "process_virtual_memory_bytes") > 0.0);
    let open = read(&first, "process_open_fds");
    assert!(open >= 3.0, "open fds {open}");
    assert!(read(&first, "process_max_fds") >= open);
    assert!(
        read(&first, "process_threads") >= 2.0,
        "the proxy runs threads"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = read(&first, "process_start_time_seconds");
    assert!(
        started <= now && started > now - 3600.0,
        "{started} vs now {now}"
    );
    assert!(first.contains("# TYPE process_cpu_seconds_total counter\n"));

    // CPU time is read again at each scrape: spend some and it has grown.
    let cpu = read(&first, "process_cpu_seconds_total");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut later = cpu;
    while later <= cpu && std::time::Instant::now() < deadline {
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        later = read(&admin::metrics(&proxy).await, "process_cpu_seconds_total");
    }
    assert!(later > cpu, "cpu seconds stayed at {cpu}");
}
