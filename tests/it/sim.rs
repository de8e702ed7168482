//! Integration tests of the simulated Spring Boot / Tomcat backend over real sockets.

use bytes::Bytes;
use http::{header, HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use loadgate::sim::{SimBackend, SimConfig, SimRoute, ACTUATOR_JSON};
use md5::{Digest, Md5};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::support::read_response;

const DEADLINE: Duration = Duration::from_secs(5);

fn config() -> SimConfig {
    SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        service_time_ms: 0.0,
        ..SimConfig::default()
    }
}

async fn start(cfg: SimConfig) -> SimBackend {
    SimBackend::start(cfg).await.expect("sim starts")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Sends one request on a fresh connection and reads the whole response.
async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    timeout(DEADLINE, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let response = sender.send_request(req).await.unwrap();
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    })
    .await
    .expect("response within the deadline")
}

fn get_request(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header(header::HOST, "sim")
        .body(Full::default())
        .unwrap()
}

fn get(addr: SocketAddr, path: &str) -> impl std::future::Future<Output = Reply> + Send + 'static {
    send(addr, get_request(path))
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn spring_etag(body: &[u8]) -> String {
    let hex: String = Md5::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("\"0{hex}\"")
}

/// The value of an unlabelled-by-us Prometheus sample line `name{...} value`.
fn prometheus_value(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|line| line.starts_with(&format!("{name}{{")))
        .unwrap_or_else(|| panic!("no sample {name} in {text}"));
    let labels = &line[line.find('{').unwrap()..=line.find('}').unwrap()];
    assert_eq!(labels, "{name=\"http-nio-8080\"}");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn metric_value(reply: &Reply, name: &str) -> f64 {
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header(header::CONTENT_TYPE), Some(ACTUATOR_JSON));
    let json = reply.json();
    assert_eq!(json["name"], name);
    assert_eq!(json["baseUnit"], "threads");
    assert_eq!(json["measurements"][0]["statistic"], "VALUE");
    assert_eq!(json["availableTags"][0]["tag"], "name");
    assert_eq!(json["availableTags"][0]["values"][0], "http-nio-8080");
    json["measurements"][0]["value"].as_f64().unwrap()
}

/// Starts `n` requests that each hold a worker for `delay_ms`, and waits until they do.
async fn hold_workers(
    backend: &SimBackend,
    n: usize,
    delay_ms: u64,
) -> Vec<tokio::task::JoinHandle<Reply>> {
    let addr = backend.addr();
    let before = backend.stats().busy();
    let held = (0..n)
        .map(|_| tokio::spawn(get(addr, &format!("/api/slow?delay_ms={delay_ms}"))))
        .collect();
    let stats = backend.stats();
    wait_until("workers busy", || stats.busy() == before + n).await;
    held
}

#[tokio::test]
async fn actuator_reports_busy_and_max_counting_itself() {
    let backend = start(SimConfig {
        workers: 8,
        ..config()
    })
    .await;
    let addr = backend.addr();
    let held = hold_workers(&backend, 3, 3_000).await;

    let busy = get(addr, "/actuator/metrics/tomcat.threads.busy").await;
    assert_eq!(metric_value(&busy, "tomcat.threads.busy"), 4.0);
    let max = get(addr, "/actuator/metrics/tomcat.threads.config.max").await;
    assert_eq!(metric_value(&max, "tomcat.threads.config.max"), 8.0);
    assert!(std::str::from_utf8(&busy.body)
        .unwrap()
        .contains(r#""value":4.0"#));

    let prom = get(addr, "/actuator/prometheus").await;
    assert_eq!(prom.status, StatusCode::OK);
    assert!(prom
        .header(header::CONTENT_TYPE)
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = std::str::from_utf8(&prom.body).unwrap();
    assert!(text.contains("# HELP tomcat_threads_busy_threads"));
    assert!(text.contains("# TYPE tomcat_threads_busy_threads gauge\n"));
    assert!(text.contains("# TYPE tomcat_threads_config_max_threads gauge\n"));
    assert_eq!(prometheus_value(text, "tomcat_threads_busy_threads"), 4.0);
    assert_eq!(
        prometheus_value(text, "tomcat_threads_config_max_threads"),
        8.0
    );

    let health = get(addr, "/actuator/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.header(header::CONTENT_TYPE), Some(ACTUATOR_JSON));
    assert_eq!(health.json(), serde_json::json!({"status": "UP"}));

    let stats = backend.stats();
    assert_eq!((stats.busy(), stats.max_workers()), (3, 8));
    assert_eq!(stats.requests("/actuator/health"), 1);
    assert_eq!(stats.requests("/api/slow"), 3);
    for task in held {
        task.abort();
    }
}

#[tokio::test]
async fn pool_bounds_concurrency_and_queues_the_rest() {
    let backend = start(SimConfig {
        workers: 4,
        service_time_ms: 100.0,
        ..config()
    })
    .await;
    let addr = backend.addr();
    let stats = backend.stats();
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| tokio::spawn(get(addr, &format!("/api/work?n={i}"))))
        .collect();
    let mut saw_queue = false;
    while !tasks.iter().all(|t| t.is_finished()) {
        saw_queue |= stats.queued() > 0;
        assert!(stats.busy() <= 4);
        assert!(started.elapsed() < DEADLINE, "requests did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().status, StatusCode::OK);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "five rounds of 100 ms"
    );
    assert!(saw_queue);
    assert!(
        stats.peak_queued() >= 10,
        "peak queue {}",
        stats.peak_queued()
    );
    assert_eq!(stats.peak_busy(), 4);
    assert_eq!(stats.requests("/api/work"), 20);
    assert_eq!(stats.total_requests(), 20);
    wait_until("workers released", || stats.busy() == 0).await;
    assert_eq!(stats.queued(), 0);
    backend.shutdown().await;
}

#[tokio::test]
async fn etag_like_spring_and_304_after_the_work() {
    let backend = start(SimConfig {
        service_time_ms: 50.0,
        cache_control: Some("max-age=60".to_string()),
        routes: vec![SimRoute {
            path_prefix: "/api/private".to_string(),
            service_time_ms: Some(0.0),
            distribution: None,
            cache_control: Some("private, no-store".to_string()),
            body_bytes: None,
        }],
        ..config()
    })
    .await;
    let addr = backend.addr();

    let first = get(addr, "/api/items").await;
    assert_eq!(first.status, StatusCode::OK);
    let etag = first.header(header::ETAG).unwrap().to_string();
    assert_eq!(etag, spring_etag(&first.body));
    assert_eq!(etag.len(), 35);
    assert_eq!(first.header(header::CACHE_CONTROL), Some("max-age=60"));
    assert_eq!(first.json()["path"], "/api/items");

    for condition in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
        "*".into(),
    ] {
        let started = Instant::now();
        let reply = send(
            addr,
            Request::get("/api/items")
                .header(header::IF_NONE_MATCH, condition)
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "the work is done first"
        );
        assert!(reply.body.is_empty());
        assert_eq!(reply.header(header::ETAG), Some(etag.as_str()));
        assert_eq!(reply.header(header::CACHE_CONTROL), Some("max-age=60"));
    }

    let changed = send(
        addr,
        Request::get("/api/items")
            .header(header::IF_NONE_MATCH, "\"0deadbeef\"")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(changed.body, first.body);

    let head = send(
        addr,
        Request::head("/api/items").body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header(header::ETAG), Some(etag.as_str()));
    assert_eq!(
        head.header(header::CONTENT_LENGTH),
        Some(first.body.len().to_string().as_str())
    );

    let private = get(addr, "/api/private/x").await;
    assert_eq!(private.status, StatusCode::OK);
    assert_eq!(
        private.header(header::ETAG),
        None,
        "no-store: no ETag, as in Spring"
    );
    assert_eq!(
        private.header(header::CACHE_CONTROL),
        Some("private, no-store")
    );

    let stats = backend.stats();
    assert_eq!(stats.requests("/api/items"), 7);
    assert_eq!(stats.requests_by_method("HEAD", "/api/items"), 1);
    backend.shutdown().await;
}

#[tokio::test]
async fn large_bodies_stream_with_the_right_etag() {
    let backend = start(SimConfig {
        routes: vec![SimRoute {
            path_prefix: "/api/blob".to_string(),
            service_time_ms: None,
            distribution: None,
            cache_control: None,
            body_bytes: Some(1000),
        }],
        ..config()
    })
    .await;
    let addr = backend.addr();

    let blob = get(addr, "/api/blob").await;
    assert_eq!(blob.body.len(), 1000);
    assert_eq!(&blob.body[..], &loadgate::sim::filler_bytes(1000)[..]);
    assert_eq!(blob.header(header::ETAG).unwrap(), spring_etag(&blob.body));

    let size = 3 * 1024 * 1024 + 7;
    let big = get(addr, &format!("/api/blob?size={size}")).await;
    assert_eq!(big.status, StatusCode::OK);
    assert_eq!(big.body.len(), size);
    assert_eq!(
        big.header(header::CONTENT_LENGTH),
        Some(size.to_string().as_str())
    );
    assert_eq!(big.header(header::ETAG).unwrap(), spring_etag(&big.body));

    let bad = get(addr, "/api/blob?size=many").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    backend.shutdown().await;
}

#[tokio::test]
async fn echo_streams_the_body_and_headers_are_reported() {
    let backend = start(config()).await;
    let addr = backend.addr();

    let payload: Bytes = (0..200_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let echoed = send(
        addr,
        Request::post("/api/echo")
            .header(header::CONTENT_TYPE, "application/x-test")
            .body(Full::new(payload.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(echoed.status, StatusCode::OK);
    assert_eq!(echoed.body, payload);
    assert_eq!(
        echoed.header(header::CONTENT_TYPE),
        Some("application/x-test")
    );
    assert_eq!(echoed.header(header::ETAG), None);

    let reply = send(
        addr,
        Request::get("/api/headers")
            .header(header::HOST, "backend.local")
            .header("x-forwarded-for", "10.0.0.1")
            .header("accept", "a")
            .header("accept", "b")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    let headers = reply.json();
    assert_eq!(headers["x-forwarded-for"], serde_json::json!(["10.0.0.1"]));
    assert_eq!(headers["accept"], serde_json::json!(["a", "b"]));
    assert_eq!(headers["host"], serde_json::json!(["backend.local"]));
    assert!(headers.get("via").is_none());

    let deleted = send(
        addr,
        Request::delete("/api/items/1")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.header(header::ETAG), None, "no ETag for non-GET");

    let stats = backend.stats();
    assert_eq!(stats.requests_by_method("DELETE", "/api/items/1"), 1);
    assert_eq!(stats.requests_by_method("POST", "/api/echo"), 1);
    assert_eq!(stats.requests_by_method("GET", "/api/echo"), 0);
    assert_eq!(stats.requests("/api/headers"), 1);
    backend.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_get_a_spring_style_404() {
    let backend = start(config()).await;
    for path in ["/nope", "/api", "/actuator/metrics/jvm.memory.used"] {
        let reply = get(backend.addr(), path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        let json = reply.json();
        assert_eq!(json["status"], 404);
        assert_eq!(json["error"], "Not Found");
        assert_eq!(json["path"], path);
        assert!(json["timestamp"].as_str().unwrap().ends_with("+00:00"));
    }
    backend.shutdown().await;
}

/// Waits for the server to close the stream; returns how long that took.
async fn wait_for_close(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 64];
    match timeout(DEADLINE, stream.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!("unexpected {n} bytes"),
        Err(_) => panic!("connection not closed"),
    }
}

#[tokio::test]
async fn keep_alive_timeout_closes_idle_connections_only() {
    let backend = start(SimConfig {
        keep_alive_timeout_ms: 200,
        ..config()
    })
    .await;
    let stats = backend.stats();
    let mut stream = TcpStream::connect(backend.addr()).await.unwrap();

    // A request that takes longer than the timeout is answered, not cut.
    stream
        .write_all(b"GET /api/slow?delay_ms=400 HTTP/1.1\r\nHost: sim\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(stats.connections_closed_idle(), 0);

    // Then, idle: closed without a response after the timeout.
    let waited = wait_for_close(&mut stream).await;
    assert!(
        waited >= Duration::from_millis(150),
        "closed after {waited:?}"
    );
    assert_eq!(stats.connections_closed_idle(), 1);
    assert_eq!(stats.connections_opened(), 1);
    backend.shutdown().await;
}

#[tokio::test]
async fn the_hundredth_request_closes_the_connection() {
    let backend = start(config()).await;
    let stream = TcpStream::connect(backend.addr()).await.unwrap();
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    for n in 1..=100 {
        let response = timeout(DEADLINE, sender.send_request(get_request("/api/ping")))
            .await
            .unwrap()
            .unwrap();
        let connection = response.headers().get(header::CONNECTION).cloned();
        response.into_body().collect().await.unwrap();
        if n < 100 {
            assert_eq!(connection, None, "request {n}");
        } else {
            assert_eq!(connection.unwrap(), "close");
        }
    }
    timeout(DEADLINE, conn)
        .await
        .expect("connection closed")
        .unwrap()
        .unwrap();
    let stats = backend.stats();
    assert_eq!(stats.requests("/api/ping"), 100);
    assert_eq!(stats.connections_opened(), 1);
    assert_eq!(stats.connections_closed_max_requests(), 1);
    backend.shutdown().await;
}

#[tokio::test]
async fn management_port_answers_without_a_worker() {
    let backend = start(SimConfig {
        workers: 2,
        management_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..config()
    })
    .await;
    let management = backend.management_addr().unwrap();
    assert_ne!(management, backend.addr());

    let on_main = get(backend.addr(), "/actuator/health").await;
    assert_eq!(
        on_main.status,
        StatusCode::NOT_FOUND,
        "actuator moved to the management port"
    );

    let held = hold_workers(&backend, 2, 3_000).await;
    let started = Instant::now();
    let busy = timeout(
        Duration::from_secs(1),
        get(management, "/actuator/metrics/tomcat.threads.busy"),
    )
    .await
    .expect("management port answers while the pool is full");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "well before the held 3 s"
    );
    assert_eq!(metric_value(&busy, "tomcat.threads.busy"), 2.0);
    let prom = get(management, "/actuator/prometheus").await;
    let text = std::str::from_utf8(&prom.body).unwrap();
    assert_eq!(prometheus_value(text, "tomcat_threads_busy_threads"), 2.0);
    assert_eq!(
        prometheus_value(text, "tomcat_threads_config_max_threads"),
        2.0
    );
    assert_eq!(
        get(management, "/actuator/health").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(management, "/api/slow").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(backend.stats().peak_busy(), 2);
    for task in held {
        task.abort();
    }
}

#[tokio::test]
async fn shutdown_closes_connections_and_stops_listening() {
    let backend = start(config()).await;
    let addr = backend.addr();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: sim\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut stream).await;

    timeout(Duration::from_secs(2), backend.shutdown())
        .await
        .expect("idle shutdown is quick");
    wait_for_close(&mut stream).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn connections_past_max_connections_wait_in_the_backlog_until_one_closes() {
    let backend = start(SimConfig {
        max_connections: 1,
        ..config()
    })
    .await;
    let request = b"GET /api/x HTTP/1.1\r\nHost: sim\r\n\r\n";
    let mut first = TcpStream::connect(backend.addr()).await.unwrap();
    first.write_all(request).await.unwrap();
    assert!(read_response(&mut first).await.starts_with("HTTP/1.1 200"));

    // The kernel completes the handshake (the backlog), but the sim does not accept
    // the connection, so its request is not served while the first stays open.
    let mut second = TcpStream::connect(backend.addr()).await.unwrap();
    second.write_all(request).await.unwrap();
    let mut byte = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(200), second.read(&mut byte))
            .await
            .is_err(),
        "served past max_connections"
    );
    drop(first);
    assert!(read_response(&mut second).await.starts_with("HTTP/1.1 200"));
    assert_eq!(backend.stats().requests("/api/x"), 2);
}

#[tokio::test]
async fn without_a_management_port_the_actuator_waits_for_a_worker_and_counts_itself() {
    let backend = start(SimConfig {
        workers: 1,
        ..config()
    })
    .await;
    let addr = backend.addr();
    // Idle: the worker serving the metrics request is the one busy worker.
    let idle = get(addr, "/actuator/metrics/tomcat.threads.busy").await;
    let json: serde_json::Value = serde_json::from_slice(&idle.body).unwrap();
    assert_eq!(json["measurements"][0]["value"], 1.0);

    // With the only worker held, the metrics request waits behind it.
    let held = tokio::spawn(async move { get(addr, "/api/hold?delay_ms=300").await.status });
    let stats = backend.stats();
    let deadline = Instant::now() + DEADLINE;
    while stats.busy() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let asked = Instant::now();
    let waited = get(addr, "/actuator/metrics/tomcat.threads.busy").await;
    assert_eq!(waited.status, StatusCode::OK);
    assert!(
        asked.elapsed() >= Duration::from_millis(200),
        "answered in {:?} while the pool was full",
        asked.elapsed()
    );
    assert_eq!(held.await.unwrap(), StatusCode::OK);
}
