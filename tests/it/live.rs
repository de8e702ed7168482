//! The live view on the admin port as its users see it: the page at `/` (served whole,
//! fetching nothing from elsewhere, and drawn by a real headless Chromium when one is
//! installed), `/live.json` and `/live/stream` following the load a test drives, and
//! `/report` as one file to keep.

use std::time::Duration;

use loadgate::config::{Config, ShedMode};
use loadgate::listener::Proxy;
use loadgate::sim::SimBackend;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A backend of two slow workers behind a proxy that knows it has two: a handful of
/// concurrent requests fills it, so the sheddable route sheds.
async fn small_backend() -> SimBackend {
    TestBackend::new()
        .workers(2)
        .latency_ms(150.0)
        .start()
        .await
}

fn config_for(backend: &SimBackend) -> Config {
    let mut config = proxy_config(backend.addr());
    config.upstreams[0].max_workers = 2;
    config.upstreams[0].health.enabled = false;
    config
}

/// Ten requests to `api` (normal) one after another, all served, then bursts for
/// `duration`: every 100 ms, six concurrent requests to the sheddable route `reports`,
/// which fill the two workers, so most are shed. Every request is bounded by the
/// client's 10 s. Returns the requests sent to `reports`.
async fn drive(proxy: &Proxy, duration: Duration) -> usize {
    let client = client();
    let base = format!("http://{}", proxy.addr());
    for _ in 0..ORDERS {
        assert_eq!(
            get(&client, &format!("{base}/api/orders")).await.status,
            200
        );
    }
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    while tokio::time::Instant::now() < deadline {
        for _ in 0..6 {
            let (client, url) = (client.clone(), format!("{base}/api/reports"));
            tasks.push(tokio::spawn(async move { get(&client, &url).await.status }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = tasks.len();
    for task in tasks {
        task.await.expect("request task");
    }
    sent
}

/// The requests [`drive`] sends to `api`.
const ORDERS: usize = 10;

/// `/live.json?minutes=1`.
async fn live(proxy: &Proxy) -> Value {
    let got = admin::fetch(proxy, "/live.json?minutes=1").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("content-type"), Some("application/json"));
    got.json()
}

/// A route's requests of one kind over the samples of a `/live.json` document.
fn route_total(doc: &Value, route: &str, key: &str) -> f64 {
    let samples = doc["samples"].as_array().expect("samples");
    samples
        .iter()
        .flat_map(|s| {
            let span = s["span_ms"].as_f64().expect("a span") / 1000.0;
            let routes = s["routes"].as_array().expect("routes");
            routes.iter().map(move |r| (span, r))
        })
        .filter(|(_, r)| r["name"] == route)
        .map(|(span, r)| r["rps"][key].as_f64().expect("a rate") * span)
        .sum()
}

/// Polls `/live.json` until `check` holds, for at most `within`; the last document.
async fn live_until(proxy: &Proxy, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let doc = live(proxy).await;
        if check(&doc) {
            return doc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/live.json did not get there within {within:?}: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_html_and_fetches_nothing_from_elsewhere() {
    let backend = small_backend().await;
    let proxy = start_proxy(config_for(&backend)).await;
    let page = admin::fetch(&proxy, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    assert!(html.starts_with("<!doctype html>"), "{}", &html[..80]);
    assert!(html.len() < 40 * 1024, "the page is {} bytes", html.len());
    // No script, style sheet, font or link from anywhere but the admin port itself.
    for external in ["http://", "https://", "//cdn", "@import", "url("] {
        assert!(!html.contains(external), "the page names {external:?}");
    }
    assert!(html.contains("name=\"viewport\""), "readable on a phone");
    assert!(html.contains("href=\"report?minutes="), "links the report");
    assert!(html.contains("EventSource('live/stream')"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_json_shows_zeros_when_idle_and_follows_the_load() {
    let backend = small_backend().await;
    let proxy = start_proxy(config_for(&backend)).await;

    // Idle: samples come, with every route at zero and no reported signal.
    let idle = live_until(&proxy, Duration::from_secs(10), |doc| {
        !doc["samples"].as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(idle["interval_ms"], 1000);
    assert_eq!(idle["history_minutes"], 15);
    let sample = &idle["samples"][0];
    let upstream = &sample["upstreams"][0];
    assert_eq!(upstream["name"], "app");
    assert_eq!(upstream["reported"], Value::Null, "no actuator: no signal");
    assert_eq!(upstream["actuator"], false);
    assert_eq!(upstream["thresholds"]["sheddable"], 0.7);
    assert_eq!(upstream["max_workers"], 2);
    assert_eq!(route_total(&idle, "api", "admitted"), 0.0);
    assert_eq!(upstream["latency_ms"]["normal"]["p50"], Value::Null);

    drive(&proxy, Duration::from_secs(2)).await;
    let busy = live_until(&proxy, Duration::from_secs(10), |doc| {
        route_total(doc, "api", "admitted") > 0.0 && route_total(doc, "reports", "shed") > 0.0
    })
    .await;
    // The upstream's figures are its routes' added up, and its latency is measured.
    let samples = busy["samples"].as_array().unwrap();
    for sample in samples {
        let of = |route: &str| {
            let routes = sample["routes"].as_array().unwrap();
            let r = routes.iter().find(|r| r["name"] == route).unwrap();
            r["rps"]["admitted"].as_f64().unwrap()
        };
        let upstream = sample["upstreams"][0]["rps"]["admitted"].as_f64().unwrap();
        let routes = of("api") + of("reports") + of("checkout");
        // Each rate is rounded to two decimals on its own.
        assert!((upstream - routes).abs() < 0.035, "{sample}");
    }
    let p99 = samples
        .iter()
        .filter_map(|s| s["upstreams"][0]["latency_ms"]["normal"]["p99"].as_f64())
        .fold(0.0f64, f64::max);
    assert!(p99 >= 100.0, "orders take 150 ms at the backend, p99 {p99}");
    let peak = samples
        .iter()
        .map(|s| s["upstreams"][0]["utilisation"].as_f64().unwrap())
        .fold(0.0f64, f64::max);
    assert!(
        peak >= 0.5,
        "two workers kept busy, peak utilisation {peak}"
    );
}

/// Reads from `stream` until `count` SSE events named `sample` have arrived, within
/// `within`; the text read.
async fn read_events(stream: &mut TcpStream, count: usize, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    let mut text = String::new();
    let mut buf = [0u8; 16 * 1024];
    while text.matches("event: sample\n").count() < count {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{count} events not in {within:?}: {text}"))
            .expect("reads");
        assert!(n > 0, "the stream ended: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_pushes_a_sample_each_second_and_ends_with_its_client() {
    let backend = small_backend().await;
    let proxy = start_proxy(config_for(&backend)).await;
    let mut stream = TcpStream::connect(proxy.admin_addr()).await.unwrap();
    stream
        .write_all(b"GET /live/stream HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let text = read_events(&mut stream, 3, Duration::from_secs(10)).await;
    let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(text.contains("retry: 2000"), "{text}");
    // One a second: the one in hand at once, then each new one (two of them: a second
    // at least between them).
    assert!(started.elapsed() >= Duration::from_millis(900));
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("each event's data is one JSON sample"))
        .collect();
    assert!(data.len() >= 3);
    assert!(data
        .windows(2)
        .all(|w| w[0]["t"].as_u64() < w[1]["t"].as_u64()));
    assert_eq!(data[0]["upstreams"][0]["name"], "app");
    assert_eq!(live(&proxy).await["streams"], 1);

    // The client leaves: its stream is gone by the next sample, no task left behind.
    drop(stream);
    live_until(&proxy, Duration::from_secs(5), |doc| doc["streams"] == 0).await;
}

/// The cells of the report's table row that starts with `<td>{first}</td>`.
fn row<'a>(html: &'a str, first: &str) -> Vec<&'a str> {
    let start = html
        .find(&format!("<tr><td>{first}</td>"))
        .unwrap_or_else(|| panic!("no row for {first}"));
    let end = start + html[start..].find("</tr>").unwrap();
    html[start..end]
        .split("<td")
        .skip(1)
        .map(|cell| {
            let cell = &cell[cell.find('>').unwrap() + 1..];
            &cell[..cell.find("</td>").unwrap()]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_is_one_file_with_the_config_and_the_figures_of_the_window() {
    let backend = small_backend().await;
    let proxy = start_proxy(config_for(&backend)).await;
    let reports = drive(&proxy, Duration::from_secs(2)).await as f64;
    // Every request driven has been counted in a sample.
    let doc = live_until(&proxy, Duration::from_secs(10), |doc| {
        let n = |r, k| route_total(doc, r, k);
        n("api", "admitted") >= ORDERS as f64 - 0.5
            && n("reports", "admitted") + n("reports", "shed") >= reports - 0.5
    })
    .await;
    let shed = route_total(&doc, "reports", "shed").round() as u64;
    assert!(shed > 0);

    let got = admin::fetch(&proxy, "/report?minutes=1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("text/html; charset=utf-8"));
    let disposition = got.header("content-disposition").unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"loadgate-report-")
            && disposition.ends_with("Z.html\""),
        "{disposition}"
    );
    let html = got.text();
    for outside in ["http://", "https://", "<script", "<link", "src="] {
        assert!(!html.contains(outside), "the report has {outside:?}");
    }
    assert!(html.contains("<svg"), "charts drawn in the file");
    assert!(html.contains("<path d=\"M"), "a chart with data in it");

    // The config: listeners, the upstream with its thresholds, the routes with classes.
    // As configured (port 0: any free port).
    assert!(html.contains("<tr><td>127.0.0.1:0</td><td>HTTP/1.1, h2c</td></tr>"));
    let upstream = row(&html, "app");
    assert_eq!(upstream[2], "2", "max_workers: {upstream:?}");
    assert_eq!(&upstream[4..7], ["100.0%", "85.0%", "70.0%"]);
    let checkout = row(&html, "checkout");
    assert_eq!(checkout[4], "critical", "{checkout:?}");

    // The figures: the routes' totals as `/live.json` counted them, and latency.
    let reports: Vec<&str> = html
        .match_indices("<tr><td>reports</td><td>app</td><td>sheddable</td>")
        .map(|(at, _)| &html[at..])
        .collect();
    assert_eq!(reports.len(), 1, "one figures row for reports");
    let figures = row(reports[0], "reports");
    let reported_shed: u64 = figures[4].parse().unwrap();
    assert!(reported_shed >= shed, "report {reported_shed}, live {shed}");
    assert!(
        figures[9].ends_with('%') && figures[9] != "0.0%",
        "{figures:?}"
    );
    let api = row(&html[html.find("<h2>Routes</h2>").unwrap()..], "api");
    assert_eq!(api[3], ORDERS.to_string(), "{api:?}");
    assert!(api[11].ends_with(" ms"), "p99 of api: {api:?}");

    let bad = admin::fetch(&proxy, "/report?minutes=99").await;
    assert_eq!(bad.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_shows_what_it_would_have_shed() {
    let backend = small_backend().await;
    let mut config = config_for(&backend);
    config.upstreams[0].shedding.mode = ShedMode::Shadow;
    let proxy = start_proxy(config).await;
    drive(&proxy, Duration::from_secs(2)).await;
    let doc = live_until(&proxy, Duration::from_secs(10), |doc| {
        route_total(doc, "reports", "would_shed") > 0.0
    })
    .await;
    assert_eq!(
        route_total(&doc, "reports", "shed"),
        0.0,
        "shadow sheds nothing"
    );
    assert_eq!(doc["samples"][0]["upstreams"][0]["mode"], "shadow");

    let html = admin::fetch(&proxy, "/report?minutes=1").await.text();
    let figures = row(&html[html.find("<h2>Routes</h2>").unwrap()..], "reports");
    assert!(
        figures[8].parse::<u64>().unwrap() > 0,
        "would shed: {figures:?}"
    );
    assert_eq!(figures[4], "0", "shed: {figures:?}");
}

/// The Chromium binary, if one is installed.
fn chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_browser_draws_the_load_with_no_script_error() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: no chromium or chromium-browser on PATH (apt-get install chromium)");
        return;
    };
    let backend = small_backend().await;
    let proxy = start_proxy(config_for(&backend)).await;
    // Some history for the page's first fetch, and load while it watches.
    drive(&proxy, Duration::from_secs(2)).await;
    let load = {
        let proxy_addr = proxy.addr();
        tokio::spawn(async move {
            let client = client();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
            while tokio::time::Instant::now() < deadline {
                get(&client, &format!("http://{proxy_addr}/api/orders")).await;
            }
        })
    };

    let profile = tempfile::tempdir().unwrap();
    // `?events=3`: the page closes its stream after three samples, so the browser's
    // virtual time (which waits for open requests) can run out and the DOM be dumped.
    let url = format!("http://{}/?events=3", proxy.admin_addr());
    let mut command = tokio::process::Command::new(&chromium);
    command
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Killed (by its PID) if the wait below gives up and drops it.
        .kill_on_drop(true);
    let child = command.spawn().expect("chromium starts");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("chromium dumps the page within 60 s")
        .expect("chromium runs");
    load.abort();
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chromium: {:?}\n{dom}",
        output.status
    );

    let attribute = |name: &str| -> String {
        let at = dom
            .find(&format!("{name}=\""))
            .unwrap_or_else(|| panic!("no {name}: {dom}"));
        let rest = &dom[at + name.len() + 2..];
        rest[..rest.find('"').unwrap()].to_string()
    };
    assert_eq!(attribute("data-errors"), "", "script errors on the page");
    assert!(
        dom.contains("stopped after 3 samples"),
        "the stream delivered: {dom}"
    );
    let samples: usize = attribute("data-samples").parse().unwrap();
    assert!(samples >= 3, "{samples} samples");
    // The utilisation chart has a line with a point for each sample.
    let line = &dom[dom
        .find("data-series=\"in force\"")
        .expect("a utilisation line")..];
    let points: usize = line["data-series=\"in force\" data-points=\"".len()..]
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(points >= 3, "{points} points drawn");
    assert!(dom.contains("data-upstream=\"app\""));
    assert!(dom.contains("no signal"), "no actuator: the page says so");
    // The routes' table follows the load: orders admitted, reports shed.
    let route = |name: &str, key: &str| -> u64 {
        let row = &dom[dom.find(&format!("data-route=\"{name}\"")).unwrap()..];
        let at = row.find(&format!("{key}=\"")).unwrap() + key.len() + 2;
        row[at..].split('"').next().unwrap().parse().unwrap()
    };
    assert!(route("api", "data-admitted-60s") > 0);
    assert!(route("reports", "data-shed-60s") > 0);
    assert_eq!(route("checkout", "data-admitted-60s"), 0);
}

/// The names in the latest sample of a `/live.json` document: its upstreams and routes.
fn latest_names(doc: &Value) -> (Vec<String>, Vec<String>) {
    let latest = doc["samples"].as_array().unwrap().last().expect("a sample");
    let names = |key: &str| -> Vec<String> {
        let items = latest[key].as_array().unwrap();
        items
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect()
    };
    (names("upstreams"), names("routes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_upstreams_and_routes_in_the_next_samples() {
    let backend = small_backend().await;
    let config = config_for(&backend);
    let proxy = start_proxy(config.clone()).await;
    let before = live_until(&proxy, Duration::from_secs(10), |doc| {
        !doc["samples"].as_array().unwrap().is_empty()
    })
    .await;
    let (upstreams, routes) = latest_names(&before);
    assert_eq!(upstreams, ["app"]);
    assert!(routes.contains(&"checkout".to_string()), "{routes:?}");

    // Reloaded: `checkout` gone; an upstream `other` with a route `other` added.
    let mut reloaded = config;
    reloaded.routes.retain(|r| r.name != "checkout");
    let mut other = reloaded.upstreams[0].clone();
    other.name = "other".to_string();
    reloaded.upstreams.push(other);
    let mut route = reloaded.routes[0].clone();
    (route.name, route.path_prefix, route.upstream) =
        ("other".into(), "/api/other".into(), "other".into());
    reloaded.routes.push(route);
    proxy.apply(reloaded);

    let client = client();
    for _ in 0..3 {
        let got = get(&client, &format!("http://{}/api/other/x", proxy.addr())).await;
        assert_eq!(got.status, 200);
    }
    let after = live_until(&proxy, Duration::from_secs(10), |doc| {
        route_total(doc, "other", "admitted") >= 2.5
    })
    .await;
    let (upstreams, routes) = latest_names(&after);
    assert_eq!(upstreams, ["app", "other"]);
    assert!(!routes.contains(&"checkout".to_string()), "{routes:?}");
    // The report lists what is configured now.
    let html = admin::fetch(&proxy, "/report?minutes=1").await.text();
    assert_eq!(
        row(&html[html.find("<h2>Routes</h2>").unwrap()..], "other")[3],
        "3"
    );
    assert!(!html.contains("<tr><td>checkout</td>"));
}
