//! Shared helpers for the integration tests: a builder for simulated backends, a
//! config builder for proxies on 127.0.0.1:0, an HTTP client, raw-socket helpers and
//! open-loop load. What the admin listener says is in [`admin`], origins the simulated
//! backend cannot stand in for in [`origin`], the `loadgate` binary as a child process
//! in [`process`], and a real Tomcat in [`tomcat`].
//!
//! Not here: helpers one test module alone needs; they stay in that module.

pub mod admin;
pub mod origin;
pub mod process;
pub mod tls;
pub mod tomcat;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loadgate::config::{
    ActuatorSettings, AdminConfig, CachePolicy, Config, HealthConfig, RouteClass, RouteConfig,
    ServerConfig, SheddingConfig, UpstreamConfig,
};
use loadgate::http::body::{empty, full, ProxyBody};
use loadgate::listener::Proxy;
use loadgate::sim::{SimBackend, SimConfig, SimRoute};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const LOCAL0: &str = "127.0.0.1:0";

/// Builds a simulated backend: `TestBackend::new().workers(4).latency_ms(50).start()`.
pub struct TestBackend {
    config: SimConfig,
}

impl TestBackend {
    pub fn new() -> TestBackend {
        TestBackend {
            config: SimConfig {
                listen: LOCAL0.parse().unwrap(),
                workers: 16,
                service_time_ms: 0.0,
                ..SimConfig::default()
            },
        }
    }
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }
    pub fn latency_ms(mut self, ms: f64) -> Self {
        self.config.service_time_ms = ms;
        self
    }
    pub fn route(mut self, prefix: &str, service_time_ms: f64) -> Self {
        self.config.routes.push(SimRoute {
            path_prefix: prefix.to_string(),
            service_time_ms: Some(service_time_ms),
            distribution: None,
            cache_control: None,
            body_bytes: None,
        });
        self
    }
    pub fn management_port(mut self) -> Self {
        self.config.management_listen = Some(LOCAL0.parse().unwrap());
        self
    }
    pub fn keep_alive_timeout_ms(mut self, ms: u64) -> Self {
        self.config.keep_alive_timeout_ms = ms;
        self
    }
    pub fn max_keep_alive_requests(mut self, n: u32) -> Self {
        self.config.max_keep_alive_requests = n;
        self
    }
    /// The `Cache-Control` every response carries.
    pub fn cache_control(mut self, value: &str) -> Self {
        self.config.cache_control = Some(value.to_string());
        self
    }
    /// Listens on `addr` instead of a free port (to restart a backend where it was).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }
    pub async fn try_start(self) -> std::io::Result<SimBackend> {
        SimBackend::start(self.config).await
    }
    pub async fn start(self) -> SimBackend {
        self.try_start().await.expect("sim backend starts")
    }
}

/// Only what a deployment must say: where to listen, the backend and the routes
/// (`/api/checkout` critical, `/api/reports` sheddable, the rest of `/api` normal).
/// Everything else, `max_workers`, health checks, actuator polling and shedding
/// included, is loadgate's default.
pub fn default_config(backend: SocketAddr) -> Config {
    Config::parse(&default_config_text(backend, ""), "support::default_config")
        .expect("the test config is valid")
}

/// [`default_config`] as the TOML a user would write, with `server_keys` (lines of
/// `[server]` keys, or nothing) added: for the tests that run the binary.
pub fn default_config_text(backend: SocketAddr, server_keys: &str) -> String {
    format!(
        r#"
[server]
listen = ["{LOCAL0}"]
{server_keys}

[admin]
listen = "{LOCAL0}"

[[upstream]]
name = "app"
backends = ["{backend}"]

[[route]]
name = "checkout"
path_prefix = "/api/checkout"
upstream = "app"
class = "critical"

[[route]]
name = "reports"
path_prefix = "/api/reports"
upstream = "app"
class = "sheddable"

[[route]]
name = "api"
path_prefix = "/api"
upstream = "app"
"#
    )
}

/// A proxy config with one upstream "app" and one catch-all route per class prefix:
/// `/api/checkout` critical, `/api/reports` sheddable, everything else normal.
pub fn proxy_config(backend: SocketAddr) -> Config {
    proxy_config_for(&[backend.to_string()])
}

pub fn proxy_config_for(backends: &[String]) -> Config {
    let route = |name: &str, prefix: &str, class| RouteConfig {
        name: name.to_string(),
        host: None,
        path_prefix: prefix.to_string(),
        upstream: "app".to_string(),
        class,
        cache: CachePolicy::Off,
        cache_settings: Default::default(),
        threshold: None,
        rewrite: Default::default(),
        websocket: true,
    };
    Config {
        server: ServerConfig {
            listen: vec![LOCAL0.parse().unwrap()],
            probe_paths: vec!["/healthz".to_string()],
            drain_timeout: Duration::from_secs(5),
            ..ServerConfig::default()
        },
        admin: AdminConfig {
            listen: LOCAL0.parse().unwrap(),
        },
        upstreams: vec![UpstreamConfig {
            name: "app".to_string(),
            backends: backends.to_vec(),
            max_workers: 16,
            connect_timeout: Duration::from_millis(500),
            response_header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(4),
            max_idle_per_backend: 64,
            management_port: None,
            health: HealthConfig {
                enabled: true,
                path: "/actuator/health".to_string(),
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(80),
                rise: 1,
                fall: 2,
            },
            // Shedding on the local signal only; tests that want the reported signal turn
            // the poller on (it would add actuator requests to the backend's counts).
            shedding: SheddingConfig::default(),
            actuator: ActuatorSettings {
                enabled: false,
                ..ActuatorSettings::default()
            },
            adaptive: None,
            retry: Default::default(),
            tls: None,
        }],
        routes: vec![
            route("checkout", "/api/checkout", RouteClass::Critical),
            route("reports", "/api/reports", RouteClass::Sheddable),
            route("api", "/api", RouteClass::Normal),
        ],
        listeners: Vec::new(),
        sim: None,
        access_log: None,
    }
}

/// Names the upstream of a [`proxy_config_for`] config `name`, in its routes too.
/// Metrics are process-wide and labelled by upstream: a test that asserts on an
/// upstream's metrics gives it a name no other test uses.
pub fn name_upstream(config: &mut Config, name: &str) {
    config.upstreams[0].name = name.to_string();
    for route in &mut config.routes {
        route.upstream = name.to_string();
    }
}

pub async fn start_proxy(config: Config) -> Proxy {
    Proxy::start(config).await.expect("proxy starts")
}

pub type TestClient = Client<HttpConnector, ProxyBody>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response with its body read to the end.
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
}

pub async fn read(response: Response<hyper::body::Incoming>) -> Got {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body reads").to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Sends `req` with a 10 s bound, so no test can hang.
pub async fn send(client: &TestClient, req: Request<ProxyBody>) -> Got {
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("response within 10 s")
        .expect("request succeeds");
    tokio::time::timeout(Duration::from_secs(10), read(response))
        .await
        .expect("body within 10 s")
}

pub async fn get(client: &TestClient, url: &str) -> Got {
    send(client, Request::get(url).body(empty()).unwrap()).await
}

pub fn body(bytes: impl Into<Bytes>) -> ProxyBody {
    full(bytes)
}

/// Writes raw bytes to `addr` and reads until the peer closes or 5 s pass.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    stream.write_all(request).await.expect("writes");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a `Content-Length` body (none: empty) from a connection
/// that stays open, within 5 s; returns its head and body as text.
pub async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("response within 5 s")
            .expect("reads");
        assert!(n > 0, "connection closed mid-response: {text}");
        out.extend_from_slice(&buf[..n]);
    }
}

/// Polls `check` every 20 ms until it is true or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A local address nothing listens on, held for as long as the value lives: its socket
/// is bound but never listens, so connections to it are refused, and no other socket
/// can take the port meanwhile (a listener of a test running alongside, or the source
/// port of an outgoing connection, which would connect to itself).
pub struct ClosedPort {
    addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Frees the port, for a test that starts listening on it next.
    pub fn release(self) -> SocketAddr {
        self.addr
    }
}

impl std::fmt::Display for ClosedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

pub async fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(LOCAL0.parse().unwrap()).unwrap();
    ClosedPort {
        addr: socket.local_addr().unwrap(),
        _socket: socket,
    }
}

/// One answer seen by [`open_loop`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Index into the `targets` given to `open_loop`.
    pub target: usize,
    /// HTTP status, or 0 when the request failed without one.
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
}

/// Open-loop load: `rate` requests per second for `duration`, sent on schedule
/// whether or not earlier ones returned, cycling through `targets` by weight.
/// A client that falls behind (its runtime starved on a busy machine) goes on at the
/// rate rather than sending the requests it missed at once: the rate is never exceeded,
/// so light load stays light, and the sending takes that much longer instead. Every
/// request is bounded by a 10 s timeout, so the run ends at most 10 s after its last send.
pub async fn open_loop(
    client: &TestClient,
    targets: &[(String, u32)],
    rate: u32,
    duration: Duration,
) -> Vec<Outcome> {
    let schedule: Vec<usize> = targets
        .iter()
        .enumerate()
        .flat_map(|(i, (_, weight))| std::iter::repeat_n(i, *weight as usize))
        .collect();
    let total = (f64::from(rate) * duration.as_secs_f64()) as usize;
    // One tick every 5 ms, or one request per tick at rates below 200/s.
    let tick = Duration::from_millis(5).max(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let per_tick = (f64::from(rate) * tick.as_secs_f64()).max(1.0) as usize;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::with_capacity(total);
    let mut sent = 0;
    while sent < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            let target = schedule[sent % schedule.len()];
            let url = targets[target].0.clone();
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::get(&url).body(empty()).unwrap();
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(response)) => {
                        let header = |name| {
                            response
                                .headers()
                                .get(name)
                                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                                .map(str::to_string)
                        };
                        let outcome = Outcome {
                            target,
                            status: response.status().as_u16(),
                            retry_after: header("retry-after"),
                            content_type: header("content-type"),
                        };
                        let _ = response.into_body().collect().await;
                        outcome
                    }
                    _ => Outcome {
                        target,
                        status: 0,
                        retry_after: None,
                        content_type: None,
                    },
                }
            }));
            sent += 1;
        }
    }
    let mut outcomes = Vec::with_capacity(total);
    for task in tasks {
        outcomes.push(task.await.expect("request task"));
    }
    outcomes
}

/// How many outcomes for `target` had `status`.
pub fn count(outcomes: &[Outcome], target: usize, status: u16) -> usize {
    outcomes
        .iter()
        .filter(|o| o.target == target && o.status == status)
        .count()
}
