//! The access log as an operator reads it: one line per request with every field right
//! for a forwarded 200, a shed 429, a 304 from the cache and a 502 from a dead backend;
//! no line lost in a burst; hostile text escaped; and, with the `loadgate` binary, a
//! reopen on SIGUSR1 (logrotate), a format change on SIGHUP, and a file that cannot be
//! opened stopping the start with a clear error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::Request;
use loadgate::config::{AccessLogConfig, AccessLogFormat, AccessLogTarget, CachePolicy, Config};
use loadgate::http::body::empty;
use serde_json::Value;

use crate::support::origin::{respond, Origin};
use crate::support::process::{self, Loadgate};
use crate::support::*;

fn log_to(config: &mut Config, path: &Path, format: AccessLogFormat) {
    config.access_log = Some(AccessLogConfig {
        target: AccessLogTarget::File(path.to_path_buf()),
        format,
        include_query: false,
        buffer_lines: 4096,
    });
}

/// The lines of `path` once there are at least `n` (waiting up to 10 s for them).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} line(s) in {} after 10 s, expected {n}:\n{text}",
            lines.len(),
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `n`th line (from 1) of `path`, parsed as JSON.
async fn json_line(path: &Path, n: usize) -> Value {
    let lines = lines(path, n).await;
    serde_json::from_str(&lines[n - 1]).unwrap_or_else(|e| panic!("{e}: {}", lines[n - 1]))
}

/// A proxy in front of an origin answering 200 `hello`, its upstream named `name`,
/// logging in `format` to `access.log` in a new temporary folder; `adjust` changes the
/// config first. The origin and the folder live as long as what is returned.
async fn hello_proxy(
    name: &str,
    format: AccessLogFormat,
    adjust: impl FnOnce(&mut Config),
) -> (
    loadgate::listener::Proxy,
    PathBuf,
    Origin,
    tempfile::TempDir,
) {
    let origin = Origin::canned(200, "hello").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, name);
    log_to(&mut config, &path, format);
    adjust(&mut config);
    (start_proxy(config).await, path, origin, dir)
}

/// Asserts what every JSON line says of a request this test sent: time, client,
/// protocol, a duration, and the request id the response carried.
fn assert_common_fields(line: &Value, got: &Got) {
    let time = line["time"].as_str().expect("time");
    assert_eq!(time.len(), "2024-01-01T00:00:00.000Z".len(), "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
    assert_eq!(line["client"], "127.0.0.1");
    assert!(
        line["client_port"].as_u64().is_some_and(|p| p > 0),
        "{line}"
    );
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["status"], got.status);
    assert_eq!(line["bytes_out"], got.body.len());
    assert!(
        line["duration_ms"].as_f64().is_some_and(|d| d > 0.0),
        "{line}"
    );
    assert_eq!(line["request_id"], got.header("x-request-id").unwrap());
    assert!(line.get("tls_version").is_none() && line.get("sni").is_none());
    assert!(line.get("completed").is_none(), "the body ended: {line}");
}

#[tokio::test]
async fn a_forwarded_request_is_logged_with_every_field() {
    let origin = Origin::start(Duration::from_millis(5), |_, _| {
        respond(201, &[], "created")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, "logged-200");
    log_to(&mut config, &path, AccessLogFormat::Json);
    let proxy = start_proxy(config).await;

    let agent = "Mozilla/5.0 \"quoted\" \\back\tslash\u{e9}";
    let req = Request::post(format!("http://{}/api/orders/7?token=secret", proxy.addr()))
        .header("user-agent", agent)
        .header("referer", "https://shop.example/cart")
        .body(body("hello"))
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, 201);

    let line = json_line(&path, 1).await;
    assert_common_fields(&line, &got);
    assert_eq!(line["method"], "POST");
    assert_eq!(line["host"], proxy.addr().to_string());
    assert_eq!(
        line["path"], "/api/orders/7",
        "the query is left out: {line}"
    );
    assert!(line.get("query").is_none());
    assert_eq!(line["bytes_in"], 5);
    assert_eq!(line["bytes_out"], 7);
    assert_eq!(line["route"], "api");
    assert_eq!(line["upstream"], "logged-200");
    assert_eq!(line["backend"], origin.addr().to_string());
    assert_eq!(line["class"], "normal");
    assert_eq!(line["admission"], "admitted");
    assert!(line.get("cache").is_none(), "no cache on the route");
    assert_eq!(line["user_agent"], agent);
    assert_eq!(line["referer"], "https://shop.example/cart");
    let upstream = line["upstream_ms"].as_f64().expect("upstream_ms");
    let duration = line["duration_ms"].as_f64().unwrap();
    assert!(upstream >= 5.0 && upstream <= duration, "{line}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_shed_request_is_logged_as_shed_without_a_backend() {
    let origin = Origin::canned(200, "ok").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, "logged-429");
    config.upstreams[0].max_workers = 1;
    log_to(&mut config, &path, AccessLogFormat::Json);
    let proxy = start_proxy(config).await;

    // One request holds the only worker ...
    let held_url = format!("http://{}/api/reports/hold", proxy.addr());
    let held = tokio::spawn(async move { get(&client(), &held_url).await });
    assert!(eventually(Duration::from_secs(5), || origin.requests() == 1).await);
    // ... so the next sheddable one is shed.
    let got = get(&client(), &format!("http://{}/api/reports/9", proxy.addr())).await;
    assert_eq!(got.status, 429);
    origin.release();
    assert_eq!(held.await.unwrap().status, 200);

    let lines = lines(&path, 2).await;
    let shed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["status"] == 429)
        .collect();
    assert_eq!(shed.len(), 1, "{lines:?}");
    let line = &shed[0];
    assert_common_fields(line, &got);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/api/reports/9");
    assert_eq!(line["bytes_in"], 0);
    assert!(!got.body.is_empty(), "a problem body");
    assert_eq!(line["route"], "reports");
    assert_eq!(line["upstream"], "logged-429");
    assert_eq!(line["class"], "sheddable");
    assert_eq!(line["admission"], "shed");
    assert!(line.get("backend").is_none(), "{line}");
    assert!(line.get("upstream_ms").is_none(), "{line}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_304_from_the_cache_is_logged_without_admission_or_backend() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(
            200,
            &[("etag", "\"v1\""), ("cache-control", "max-age=60")],
            "catalog",
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, "logged-304");
    for route in &mut config.routes {
        route.cache = CachePolicy::On;
    }
    log_to(&mut config, &path, AccessLogFormat::Json);
    let proxy = start_proxy(config).await;
    let url = format!("http://{}/api/catalog", proxy.addr());

    let first = get(&client(), &url).await;
    assert_eq!(first.status, 200);
    let req = Request::get(&url)
        .header("if-none-match", "\"v1\"")
        .body(empty())
        .unwrap();
    let revalidated = send(&client(), req).await;
    assert_eq!(revalidated.status, 304);
    assert_eq!(origin.requests(), 1, "the 304 came from the cache");

    let miss = json_line(&path, 1).await;
    assert_common_fields(&miss, &first);
    assert_eq!(miss["cache"], "fwd=miss; stored");
    assert_eq!(miss["admission"], "admitted");
    assert_eq!(miss["backend"], origin.addr().to_string());

    let hit = json_line(&path, 2).await;
    assert_common_fields(&hit, &revalidated);
    assert_eq!(hit["status"], 304);
    assert_eq!(hit["bytes_out"], 0);
    let cache = hit["cache"].as_str().expect("cache");
    assert!(cache.starts_with("hit; ttl="), "{hit}");
    assert_eq!(
        revalidated.header("cache-status"),
        Some(format!("loadgate; {cache}").as_str())
    );
    assert_eq!(hit["route"], "api");
    assert_eq!(hit["upstream"], "logged-304");
    for absent in ["admission", "backend", "upstream_ms"] {
        assert!(hit.get(absent).is_none(), "{absent}: {hit}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_502_from_a_dead_backend_names_the_backend_tried() {
    let dead = closed_port().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut config = proxy_config(dead.addr());
    name_upstream(&mut config, "logged-502");
    config.upstreams[0].health.enabled = false;
    config.upstreams[0].retry.connect_attempts = 1;
    log_to(&mut config, &path, AccessLogFormat::Json);
    let proxy = start_proxy(config).await;

    let got = get(&client(), &format!("http://{}/api/orders", proxy.addr())).await;
    assert_eq!(got.status, 502);
    let line = json_line(&path, 1).await;
    assert_common_fields(&line, &got);
    assert_eq!(line["route"], "api");
    assert_eq!(line["upstream"], "logged-502");
    assert_eq!(line["admission"], "admitted");
    assert_eq!(line["backend"], dead.addr().to_string());
    assert!(line["upstream_ms"].as_f64().is_some(), "{line}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn requests_hyper_refuses_before_the_handler_are_logged_with_their_status() {
    let (proxy, path, _origin, _dir) = hello_proxy("logged-refused", AccessLogFormat::Json, |c| {
        c.server.max_header_bytes = 8192;
    })
    .await;

    // A header line without a colon: hyper answers 400 and closes.
    let malformed = raw_exchange(
        proxy.addr(),
        b"GET /api/x HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
    )
    .await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    let first = json_line(&path, 1).await;
    // A head larger than max_header_bytes: 431.
    let big = format!(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let too_large = raw_exchange(proxy.addr(), big.as_bytes()).await;
    assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");
    let second = json_line(&path, 2).await;
    for (line, status) in [(&first, 400), (&second, 431)] {
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        assert!(line["client_port"].as_u64().is_some(), "{line}");
        // Nothing of the request was read: no method, path or route is claimed.
        for absent in ["method", "path", "protocol", "route", "upstream", "backend"] {
            assert!(line.get(absent).is_none(), "{absent} in {line}");
        }
    }
    // A request after them is logged as usual, and no line was dropped.
    let got = get(&client(), &format!("http://{}/api/ok", proxy.addr())).await;
    assert_eq!(got.status, 200);
    let third = json_line(&path, 3).await;
    assert_eq!(third["path"], "/api/ok");
    assert_eq!(proxy.shared().access_log.dropped(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_target_too_long_for_hyper_is_logged_as_414() {
    // Room in the buffer for the head, so the target's own limit (64 KiB) is what is hit.
    let (proxy, path, _origin, _dir) = hello_proxy("logged-414", AccessLogFormat::Common, |c| {
        c.server.max_header_bytes = 128 * 1024;
    })
    .await;

    let long = format!(
        "GET /api/{} HTTP/1.1\r\nHost: a\r\n\r\n",
        "a".repeat(70_000)
    );
    let answer = raw_exchange(proxy.addr(), long.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer}");
    let line = &lines(&path, 1).await[0];
    assert!(line.ends_with("] \"-\" 414 -"), "{line}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_loses_no_line() {
    const REQUESTS: usize = 2000;
    const CLIENTS: usize = 20;
    let origin = Origin::canned(200, "ok").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, "logged-burst");
    // Room for every client at once: this test is about the log, not shedding.
    config.upstreams[0].max_workers = 1000;
    log_to(&mut config, &path, AccessLogFormat::Json);
    let proxy = start_proxy(config).await;

    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let addr = proxy.addr();
        tasks.spawn(async move {
            let client = client();
            for n in (c..REQUESTS).step_by(CLIENTS) {
                let got = get(&client, &format!("http://{addr}/api/burst/{n}")).await;
                assert_eq!(got.status, 200);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let lines = lines(&path, REQUESTS).await;
    assert_eq!(lines.len(), REQUESTS);
    let mut paths: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    paths.sort();
    let mut expected: Vec<String> = (0..REQUESTS).map(|n| format!("/api/burst/{n}")).collect();
    expected.sort();
    assert_eq!(paths, expected);
    assert_eq!(proxy.shared().access_log.dropped(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn combined_lines_escape_what_the_client_sent() {
    let (proxy, path, _origin, _dir) =
        hello_proxy("logged-combined", AccessLogFormat::Combined, |c| {
            c.access_log.as_mut().unwrap().include_query = true;
        })
        .await;

    let agent = http::HeaderValue::from_bytes(b"evil\" 200 5 \"forged\\\t\xff").unwrap();
    let req = Request::get(format!("http://{}/api/x?q=1&r=%22", proxy.addr()))
        .header("user-agent", agent)
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 200);

    let line = &lines(&path, 1).await[0];
    let (client_and_time, rest) = line.split_once("] ").unwrap();
    assert!(client_and_time.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(client_and_time.ends_with(" +0000"), "{line}");
    assert_eq!(
        rest,
        "\"GET /api/x?q=1&r=%22 HTTP/1.1\" 200 5 \"-\" \"evil\\\" 200 5 \\\"forged\\\\\\t\\xff\""
    );
    proxy.shutdown().await;
}

fn binary_config(backend: std::net::SocketAddr, log: &Path, format: &str) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:0"]
drain_timeout_ms = 2000

[admin]
listen = "127.0.0.1:0"

[access_log]
path = "{}"
format = "{format}"

[[upstream]]
name = "app"
backends = ["{backend}"]

[upstream.health]
enabled = false

[[route]]
name = "main"
path_prefix = "/"
upstream = "app"
"#,
        log.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_and_sighup_changes_the_format() {
    let origin = Origin::canned(200, "ok").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated: PathBuf = dir.path().join("access.log.1");
    let proxy = Loadgate::run(&binary_config(origin.addr(), &path, "json"));
    let addr = proxy.listening_addr();
    let c = client();
    let url = |n: u32| format!("http://{addr}/r/{n}");

    assert_eq!(get(&c, &url(1)).await.status, 200);
    assert_eq!(json_line(&path, 1).await["path"], "/r/1");

    // logrotate: rename, then SIGUSR1. Until the signal, lines go to the renamed file.
    std::fs::rename(&path, &rotated).unwrap();
    assert_eq!(get(&c, &url(2)).await.status, 200);
    assert_eq!(json_line(&rotated, 2).await["path"], "/r/2");
    proxy.signal("USR1");
    proxy.wait_for("access log reopened");
    assert_eq!(get(&c, &url(3)).await.status, 200);
    assert_eq!(json_line(&path, 1).await["path"], "/r/3");
    assert_eq!(
        lines(&rotated, 2).await.len(),
        2,
        "nothing more in the old file"
    );

    // A reload to the common format: the next line is written the new way.
    proxy.write_config(&binary_config(origin.addr(), &path, "common"));
    proxy.signal("HUP");
    proxy.wait_for("config reloaded");
    assert_eq!(get(&c, &url(4)).await.status, 200);
    let lines = lines(&path, 2).await;
    assert!(
        lines[1].starts_with("127.0.0.1 - - [")
            && lines[1].ends_with("\"GET /r/4 HTTP/1.1\" 200 2"),
        "{lines:?}"
    );

    // A reload naming a file that cannot be opened is rejected; the log goes on.
    let nowhere = dir.path().join("missing/dir/access.log");
    proxy.write_config(&binary_config(origin.addr(), &nowhere, "json"));
    proxy.signal("HUP");
    proxy.wait_for("config reload rejected");
    proxy.wait_for("cannot open the access log");
    assert_eq!(get(&c, &url(5)).await.status, 200);
    let lines = self::lines(&path, 3).await;
    assert!(
        lines[2].ends_with("\"GET /r/5 HTTP/1.1\" 200 2"),
        "{lines:?}"
    );
}

#[test]
fn an_access_log_that_cannot_be_opened_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("loadgate.toml");
    let nowhere = dir.path().join("missing/dir/access.log");
    std::fs::write(
        &config,
        binary_config("127.0.0.1:9".parse().unwrap(), &nowhere, "json"),
    )
    .unwrap();
    let out = process::command()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot open the access log {}", nowhere.display())),
        "{stderr}"
    );
}
