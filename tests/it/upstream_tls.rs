//! TLS to backends (`[upstream.tls]`): a backend served over TLS with a certificate from
//! a CA made for each test is reached with `ca_file`, its pooled connection reused and
//! new connections resumed; an untrusted certificate or one for another name is a 502
//! counted as `kind="tls"`; `insecure_skip_verify` accepts any certificate; health
//! checks and actuator polls go over TLS too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use loadgate::config::Config;
use loadgate::listener::Proxy;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::tls::{Leaf, TestCa};
use crate::support::*;

/// What a [`TlsOrigin`] saw.
#[derive(Default)]
struct Seen {
    /// TCP connections accepted.
    accepts: AtomicUsize,
    /// Handshakes completed, and of those the ones that resumed an earlier session.
    handshakes: AtomicUsize,
    resumed: AtomicUsize,
    /// Requests other than health checks and actuator polls.
    requests: AtomicUsize,
    health_checks: AtomicUsize,
    actuator_polls: AtomicUsize,
    /// The server name (SNI) and ALPN protocol of the last handshake.
    sni: Mutex<Option<String>>,
    alpn: Mutex<Option<String>>,
}

/// An HTTP/1.1 backend served over TLS only, with `leaf`'s certificate. It offers ALPN
/// h2 and http/1.1, as a server that speaks both does. Stops when dropped.
struct TlsOrigin {
    addr: SocketAddr,
    seen: Arc<Seen>,
    server: JoinHandle<()>,
}

impl TlsOrigin {
    async fn start(leaf: &Leaf) -> TlsOrigin {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf.cert_path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&leaf.key_path).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(LOCAL0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                shared.accepts.fetch_add(1, Ordering::SeqCst);
                let (acceptor, seen) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (_, session) = stream.get_ref();
                    seen.handshakes.fetch_add(1, Ordering::SeqCst);
                    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        seen.resumed.fetch_add(1, Ordering::SeqCst);
                    }
                    *seen.sni.lock().unwrap() = session.server_name().map(str::to_string);
                    *seen.alpn.lock().unwrap() = session
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned());
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&seen, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TlsOrigin { addr, seen, server }
    }

    fn requests(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }

    fn accepts(&self) -> usize {
        self.seen.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Health checks are answered UP, actuator polls with a Spring metric, anything else
/// with its own path.
fn answer(seen: &Seen, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let body = if path == "/actuator/health" {
        seen.health_checks.fetch_add(1, Ordering::SeqCst);
        r#"{"status":"UP"}"#.to_string()
    } else if path.starts_with("/actuator/metrics/") {
        seen.actuator_polls.fetch_add(1, Ordering::SeqCst);
        r#"{"measurements":[{"statistic":"VALUE","value":4.0}]}"#.to_string()
    } else {
        seen.requests.fetch_add(1, Ordering::SeqCst);
        format!("over tls: {path}")
    };
    Response::new(Full::new(Bytes::from(body)))
}

/// A proxy config with one upstream `name` in front of `backend`, its `[upstream.tls]`
/// table `tls` and `extra` keys of the upstream (health checks and actuator off unless
/// `extra` turns them on).
fn config(backend: SocketAddr, name: &str, tls: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["{LOCAL0}"]
[admin]
listen = "{LOCAL0}"
[[upstream]]
name = "{name}"
backends = ["{backend}"]
{extra}
[upstream.tls]
{tls}
[[route]]
name = "all"
path_prefix = "/"
upstream = "{name}"
"#
    )
}

const NO_CHECKS: &str = "health.enabled = false\nactuator.enabled = false";

async fn start(text: &str, dir: &Path) -> Proxy {
    let config = Config::parse_in(text, "upstream tls test", dir).unwrap_or_else(|e| panic!("{e}"));
    start_proxy(config).await
}

fn url(proxy: &Proxy, path: &str) -> String {
    format!("http://{}{path}", proxy.addr())
}

/// Asserts a detail-free problem+json 502 caused by TLS.
#[track_caller]
fn assert_tls_502(got: &Got, upstream: &str) {
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(got.header("content-type"), Some("application/problem+json"));
    let problem = got.json();
    assert_eq!(problem["cause"], "tls", "{problem}");
    assert_eq!(problem["upstream"], upstream, "{problem}");
    let text = got.text();
    for internal in [
        "127.0.0.1",
        "certificate",
        "UnknownIssuer",
        "NotValidForName",
    ] {
        assert!(!text.contains(internal), "{internal} leaked: {text}");
    }
}

#[tokio::test]
async fn a_tls_backend_is_reached_with_its_ca_and_its_connection_reused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = ca.write(dir.path());
    let origin = TlsOrigin::start(&ca.leaf(dir.path(), "backend", &["127.0.0.1"])).await;
    let tls = format!("ca_file = {:?}", ca_file.file_name().unwrap());
    let proxy = start(
        &config(origin.addr, "tls_reuse", &tls, NO_CHECKS),
        dir.path(),
    )
    .await;
    let client = client();

    let first = get(&client, &url(&proxy, "/orders/1")).await;
    assert_eq!(
        (first.status, first.text().as_str()),
        (200, "over tls: /orders/1")
    );
    let second = get(&client, &url(&proxy, "/orders/2")).await;
    assert_eq!(
        (second.status, second.text().as_str()),
        (200, "over tls: /orders/2")
    );

    assert_eq!(origin.requests(), 2, "the backend saw both requests");
    assert_eq!(
        origin.accepts(),
        1,
        "the second request reused the pooled connection"
    );
    assert_eq!(
        origin.seen.alpn.lock().unwrap().as_deref(),
        Some("http/1.1"),
        "the pool speaks HTTP/1.1 and says so, though the backend offers h2"
    );
    // An IP backend is verified against the certificate's IP address; rustls sends no
    // SNI for an address.
    assert_eq!(*origin.seen.sni.lock().unwrap(), None);
}

#[tokio::test]
async fn new_connections_to_a_backend_resume_the_tls_session() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = ca.write(dir.path());
    let origin = TlsOrigin::start(&ca.leaf(dir.path(), "backend", &["127.0.0.1"])).await;
    // No idle connections kept: every request opens one.
    let extra = format!("max_idle_per_backend = 0\n{NO_CHECKS}");
    let tls = format!("ca_file = {:?}", ca_file.display().to_string());
    let proxy = start(&config(origin.addr, "tls_resume", &tls, &extra), dir.path()).await;
    let client = client();
    for i in 0..3 {
        let got = get(&client, &url(&proxy, &format!("/r/{i}"))).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    assert_eq!(origin.accepts(), 3, "a connection per request");
    assert_eq!(origin.seen.handshakes.load(Ordering::SeqCst), 3);
    assert!(
        origin.seen.resumed.load(Ordering::SeqCst) >= 2,
        "after the first full handshake the others resume: {} of 3",
        origin.seen.resumed.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn an_untrusted_backend_certificate_is_a_502_counted_as_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let origin = TlsOrigin::start(&ca.leaf(dir.path(), "backend", &["127.0.0.1"])).await;
    // No ca_file: the system's trust store, which has never heard of the test's CA.
    let proxy = start(
        &config(origin.addr, "tls_untrusted", "enabled = true", NO_CHECKS),
        dir.path(),
    )
    .await;
    let labels = [("upstream", "tls_untrusted"), ("kind", "tls")];
    let before = admin::counter(&proxy, "loadgate_upstream_errors_total", &labels).await;

    let got = get(&client(), &url(&proxy, "/orders")).await;
    assert_tls_502(&got, "tls_untrusted");
    assert_eq!(
        origin.requests(),
        0,
        "no request went over the refused session"
    );
    assert_eq!(
        origin.accepts(),
        1,
        "a refused certificate is not tried again with backoff: it would be refused again"
    );
    let after = admin::counter(&proxy, "loadgate_upstream_errors_total", &labels).await;
    assert_eq!(after - before, 1.0);
}

#[tokio::test]
async fn server_name_is_sent_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    ca.write(dir.path());
    let origin = TlsOrigin::start(&ca.leaf(dir.path(), "backend", &["orders.internal"])).await;

    let tls = "ca_file = \"ca.pem\"\nserver_name = \"orders.internal\"";
    let proxy = start(
        &config(origin.addr, "tls_named", tls, NO_CHECKS),
        dir.path(),
    )
    .await;
    let got = get(&client(), &url(&proxy, "/a")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        origin.seen.sni.lock().unwrap().as_deref(),
        Some("orders.internal")
    );
    drop(proxy);

    // The certificate names orders.internal, not the name the proxy asks for.
    let tls = "ca_file = \"ca.pem\"\nserver_name = \"billing.internal\"";
    let proxy = start(
        &config(origin.addr, "tls_misnamed", tls, NO_CHECKS),
        dir.path(),
    )
    .await;
    let got = get(&client(), &url(&proxy, "/b")).await;
    assert_tls_502(&got, "tls_misnamed");
    assert_eq!(
        admin::counter(
            &proxy,
            "loadgate_upstream_errors_total",
            &[("upstream", "tls_misnamed"), ("kind", "tls")]
        )
        .await,
        1.0
    );
    // Without server_name the backend's host, 127.0.0.1, is verified: not in the
    // certificate either.
    let proxy = start(
        &config(
            origin.addr,
            "tls_by_address",
            "ca_file = \"ca.pem\"",
            NO_CHECKS,
        ),
        dir.path(),
    )
    .await;
    assert_tls_502(&get(&client(), &url(&proxy, "/c")).await, "tls_by_address");
    assert_eq!(
        origin.requests(),
        1,
        "only the request to the right name arrived"
    );
}

#[tokio::test]
async fn insecure_skip_verify_accepts_an_untrusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = TestCa::new();
    let origin = TlsOrigin::start(&unknown.leaf(dir.path(), "self", &["somewhere.else"])).await;
    let proxy = start(
        &config(
            origin.addr,
            "tls_insecure",
            "insecure_skip_verify = true",
            NO_CHECKS,
        ),
        dir.path(),
    )
    .await;
    let got = get(&client(), &url(&proxy, "/anything")).await;
    assert_eq!(
        (got.status, got.text().as_str()),
        (200, "over tls: /anything")
    );
    assert_eq!(origin.requests(), 1);
}

/// Polls `check` every 20 ms for up to 5 s; whether it came true.
async fn within_5s<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
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

const CHECKS: &str = "health = { interval_ms = 100, timeout_ms = 80, rise = 1, fall = 2 }\n\
                      actuator = { enabled = true, interval_ms = 100, timeout_ms = 80 }";

#[tokio::test]
async fn health_checks_and_actuator_polls_go_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    ca.write(dir.path());
    let origin = TlsOrigin::start(&ca.leaf(dir.path(), "backend", &["127.0.0.1"])).await;
    let proxy = start(
        &config(origin.addr, "tls_checked", "ca_file = \"ca.pem\"", CHECKS),
        dir.path(),
    )
    .await;
    let seen = origin.seen.clone();
    assert!(
        within_5s(|| {
            let seen = seen.clone();
            async move {
                seen.health_checks.load(Ordering::SeqCst) >= 3
                    && seen.actuator_polls.load(Ordering::SeqCst) >= 2
            }
        })
        .await,
        "health checks and polls arrive over TLS"
    );
    assert_eq!(admin::readyz(&proxy).await.status, 200);
    let backend = origin.addr.to_string();
    let healthy = [("upstream", "tls_checked"), ("backend", backend.as_str())];
    assert_eq!(
        admin::metric(&proxy, "loadgate_backend_healthy", &healthy).await,
        Some(1.0)
    );
    let got = get(&client(), &url(&proxy, "/still/here")).await;
    assert_eq!(got.status, 200, "{}", got.text());
}

#[tokio::test]
async fn health_checks_fail_when_the_backend_certificate_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let origin = TlsOrigin::start(&ca.leaf(dir.path(), "backend", &["127.0.0.1"])).await;
    let proxy = start(
        &config(origin.addr, "tls_unchecked", "enabled = true", CHECKS),
        dir.path(),
    )
    .await;
    let backend = origin.addr.to_string();
    let labels = [("upstream", "tls_unchecked"), ("backend", backend.as_str())];
    let proxy_ref = &proxy;
    assert!(
        within_5s(|| async move {
            admin::metric(proxy_ref, "loadgate_backend_healthy", &labels).await == Some(0.0)
        })
        .await,
        "the backend leaves the rotation"
    );
    assert_eq!(admin::readyz(&proxy).await.status, 503);
    let got = get(&client(), &url(&proxy, "/x")).await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert!(origin.accepts() >= 2, "the checks did connect");
    let seen = &origin.seen;
    assert_eq!(
        (
            seen.health_checks.load(Ordering::SeqCst),
            seen.actuator_polls.load(Ordering::SeqCst),
            seen.requests.load(Ordering::SeqCst),
        ),
        (0, 0, 0),
        "nothing was sent over a session with an untrusted certificate"
    );
}

#[tokio::test]
async fn a_reload_with_a_new_ca_file_trusts_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (TestCa::new(), TestCa::new());
    let origin = TlsOrigin::start(&ca.leaf(dir.path(), "backend", &["127.0.0.1"])).await;
    // First the wrong CA in ca.pem: the backend's certificate is not trusted.
    other.write(dir.path());
    let text = config(origin.addr, "tls_reload", "ca_file = \"ca.pem\"", NO_CHECKS);
    let config_path = dir.path().join("loadgate.toml");
    std::fs::write(&config_path, &text).unwrap();
    let proxy = start(&text, dir.path()).await;
    assert_tls_502(&get(&client(), &url(&proxy, "/a")).await, "tls_reload");

    // The same file, the right CA in it: the config text is unchanged, its CA is not.
    ca.write(dir.path());
    proxy
        .reload_from_file(&config_path)
        .expect("the new CA file loads");
    let got = get(&client(), &url(&proxy, "/b")).await;
    assert_eq!((got.status, got.text().as_str()), (200, "over tls: /b"));
    assert_eq!(origin.requests(), 1);
}
