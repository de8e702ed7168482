//! TLS termination: certificates chosen by SNI, ALPN h2, certificates reloaded on
//! SIGHUP (or kept when the new ones are bad), handshake failures counted, and curl
//! over TLS with HTTP/2. Certificates come from a CA made for each test.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use loadgate::config::Config;
use loadgate::listener::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::origin::{respond, Origin};
use crate::support::tls::{served_leaf, Leaf, TestCa};
use crate::support::*;

/// A config with one TLS `[[listener]]` on a free port serving `certificates` (each
/// `(leaf, names)`; empty names take the certificate's own), in front of `origin`.
fn tls_config(origin: SocketAddr, certificates: &[(&Leaf, &[&str])], extra: &str) -> String {
    let mut text = format!(
        r#"
[server]
listen = []
[admin]
listen = "{LOCAL0}"
[[listener]]
address = "{LOCAL0}"
{extra}
"#
    );
    for (leaf, names) in certificates {
        let names = if names.is_empty() {
            String::new()
        } else {
            format!("names = {names:?}")
        };
        text.push_str(&format!(
            "[[listener.certificate]]\ncert = {:?}\nkey = {:?}\n{names}\n",
            leaf.cert_path, leaf.key_path
        ));
    }
    text.push_str(&format!(
        r#"
[[upstream]]
name = "app"
backends = ["{origin}"]
health.enabled = false
actuator.enabled = false
[[route]]
name = "all"
path_prefix = "/"
upstream = "app"
"#
    ));
    text
}

async fn start(text: &str, dir: &Path) -> Proxy {
    let config = Config::parse_in(text, "tls test", dir).unwrap_or_else(|e| panic!("{e}"));
    start_proxy(config).await
}

/// [`start`], with `text` also written to `dir/loadgate.toml` for a reload to read.
async fn start_from_file(text: &str, dir: &Path) -> (Proxy, std::path::PathBuf) {
    let path = dir.join("loadgate.toml");
    std::fs::write(&path, text).unwrap();
    (start(text, dir).await, path)
}

/// One GET over `stream`, HTTP/2 when `h2`; the status and what the origin saw of the
/// protocol in `x-forwarded-proto`.
async fn get_over(stream: TlsStream<TcpStream>, path: &str, h2: bool) -> (u16, String) {
    let io = TokioIo::new(stream);
    let req = Request::get(path)
        .header("host", "a.example.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1.1 connection over TLS kept open across a certificate change.
struct KeptConnection(hyper::client::conn::http1::SendRequest<Empty<Bytes>>);

impl KeptConnection {
    async fn open(stream: TlsStream<TcpStream>) -> KeptConnection {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        KeptConnection(sender)
    }

    /// The status of a GET on it.
    async fn get(&mut self) -> u16 {
        let req = Request::get("/x")
            .header("host", "a.example.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        self.0.send_request(req).await.unwrap().status().as_u16()
    }
}

/// An origin that answers with the request's `x-forwarded-proto`.
async fn proto_echo() -> Origin {
    Origin::start(Duration::ZERO, |parts, _| {
        let proto = parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        respond(200, &[], proto)
    })
    .await
}

#[tokio::test]
async fn each_server_name_gets_its_certificate_and_others_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let default = ca.leaf(dir.path(), "default", &["default.test"]);
    let a = ca.leaf(dir.path(), "a", &["a.example.test"]);
    let wild = ca.leaf(dir.path(), "wild", &["*.b.example.test"]);
    let origin = Origin::canned(200, "hello").await;
    let text = tls_config(
        origin.addr(),
        &[(&default, &[]), (&a, &[]), (&wild, &[])],
        "",
    );
    let proxy = start(&text, dir.path()).await;

    let stream = ca
        .connect(proxy.addr(), "a.example.test", &[])
        .await
        .unwrap();
    assert_eq!(served_leaf(&stream), a.der, "exact name");
    assert_eq!(get_over(stream, "/x", false).await.0, 200);

    let stream = ca
        .connect(proxy.addr(), "api.b.example.test", &[])
        .await
        .unwrap();
    assert_eq!(served_leaf(&stream), wild.der, "wildcard name");
    assert_eq!(get_over(stream, "/x", false).await.0, 200);

    // A name no certificate has gets the first one, which the client then refuses.
    let refused = ca.connect(proxy.addr(), "other.test", &[]).await;
    assert!(
        refused.is_err(),
        "the default certificate does not name other.test"
    );
    let stream = ca.connect(proxy.addr(), "default.test", &[]).await.unwrap();
    assert_eq!(served_leaf(&stream), default.der);
    proxy.shutdown().await;
}

#[tokio::test]
async fn alpn_h2_is_negotiated_and_serves_http2_with_forwarded_proto_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let leaf = ca.leaf(dir.path(), "a", &["a.example.test"]);
    let origin = proto_echo().await;
    let proxy = start(&tls_config(origin.addr(), &[(&leaf, &[])], ""), dir.path()).await;

    let h2 = ca
        .connect(proxy.addr(), "a.example.test", &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, proto) = get_over(h2, "/x", true).await;
    assert_eq!((status, proto.as_str()), (200, "https"));

    let h1 = ca
        .connect(proxy.addr(), "a.example.test", &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, proto) = get_over(h1, "/x", false).await;
    assert_eq!((status, proto.as_str()), (200, "https"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reload_serves_new_certificates_while_open_connections_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let old = ca.leaf(dir.path(), "site", &["a.example.test"]);
    let origin = Origin::canned(200, "hello").await;
    let text = tls_config(origin.addr(), &[(&old, &[])], "");
    let (proxy, config_path) = start_from_file(&text, dir.path()).await;

    // An open HTTP/1.1 connection from before the swap.
    let stream = ca
        .connect(proxy.addr(), "a.example.test", &[])
        .await
        .unwrap();
    assert_eq!(served_leaf(&stream), old.der);
    let mut kept = KeptConnection::open(stream).await;
    assert_eq!(kept.get().await, 200);

    // The same files, new contents: a renewed certificate, then the reload.
    let new = ca.leaf(dir.path(), "site", &["a.example.test"]);
    assert_ne!(new.der, old.der);
    proxy
        .reload_from_file(&config_path)
        .expect("the renewed certificate loads");

    let stream = ca
        .connect(proxy.addr(), "a.example.test", &[])
        .await
        .unwrap();
    assert_eq!(
        served_leaf(&stream),
        new.der,
        "new connections get the new certificate"
    );
    assert_eq!(kept.get().await, 200, "the old connection still serves");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_key_that_does_not_match_is_reported_with_its_file_and_the_running_certificate_stays() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let good = ca.leaf(dir.path(), "site", &["a.example.test"]);
    let origin = Origin::canned(200, "hello").await;
    let text = tls_config(origin.addr(), &[(&good, &[])], "");
    let (proxy, config_path) = start_from_file(&text, dir.path()).await;

    // A renewal gone wrong: a new certificate with the old key beside it.
    let good_key = std::fs::read(&good.key_path).unwrap();
    let renewed = ca.leaf(dir.path(), "site", &["a.example.test"]);
    std::fs::write(&renewed.key_path, &good_key).unwrap();
    let errors = proxy.reload_from_file(&config_path).unwrap_err();
    let report = errors.to_string();
    assert!(
        report.contains("the key does not belong to the certificate")
            && report.contains(&good.key_path.display().to_string()),
        "{report}"
    );
    let key_line = text.lines().position(|l| l.starts_with("key =")).unwrap() + 1;
    assert_eq!(errors.errors[0].line, key_line, "{report}");

    let stream = ca
        .connect(proxy.addr(), "a.example.test", &[])
        .await
        .unwrap();
    assert_eq!(
        served_leaf(&stream),
        good.der,
        "the running certificate stays"
    );
    assert_eq!(get_over(stream, "/x", false).await.0, 200);
    proxy.shutdown().await;
}

/// `loadgate_tls_handshakes_total{result}`. A failure is counted before its connection
/// is closed, so a client that saw the close finds it counted.
async fn handshakes(proxy: &Proxy, result: &str) -> f64 {
    admin::counter(
        proxy,
        "loadgate_tls_handshakes_total",
        &[("result", result)],
    )
    .await
}

#[tokio::test]
async fn failed_handshakes_are_counted_by_reason_and_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let leaf = ca.leaf(dir.path(), "a", &["a.example.test"]);
    let origin = Origin::canned(200, "hello").await;
    let text = tls_config(
        origin.addr(),
        &[(&leaf, &[])],
        "tls_handshake_timeout_ms = 300",
    );
    let proxy = start(&text, dir.path()).await;
    let not_tls = handshakes(&proxy, "not_tls").await;
    let timeout = handshakes(&proxy, "timeout").await;

    // Plain HTTP to a TLS port: no HTTP answer, the connection closes.
    let mut plain = TcpStream::connect(proxy.addr()).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "no HTTP answer over a TLS port"
    );

    // A client that connects and says nothing is closed at the handshake timeout.
    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut [0u8; 16])).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed: {closed:?}"
    );

    assert_eq!(handshakes(&proxy, "not_tls").await, not_tls + 1.0);
    assert_eq!(handshakes(&proxy, "timeout").await, timeout + 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn curl_gets_http2_over_tls_verified_against_the_ca() {
    let Ok(version) = std::process::Command::new("curl").arg("--version").output() else {
        eprintln!("skipped: curl is not installed");
        return;
    };
    if !String::from_utf8_lossy(&version.stdout).contains("HTTP2") {
        eprintln!("skipped: this curl has no HTTP/2");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let leaf = ca.leaf(dir.path(), "a", &["a.example.test"]);
    let origin = proto_echo().await;
    let proxy = start(&tls_config(origin.addr(), &[(&leaf, &[])], ""), dir.path()).await;
    let port = proxy.addr().port();
    let ca_path = ca.write(dir.path());
    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--http2", "--max-time", "10"])
        .arg("--cacert")
        .arg(&ca_path)
        .args(["--resolve", &format!("a.example.test:{port}:127.0.0.1")])
        .args(["--write-out", " %{http_version} %{http_code}"])
        .arg(format!("https://a.example.test:{port}/x"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout,
        "https 2 200",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_access_log_names_the_tls_version_and_the_server_name_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let leaf = ca.leaf(dir.path(), "a", &["a.example.test"]);
    let origin = Origin::canned(200, "hello").await;
    let log = dir.path().join("access.log");
    let mut text = tls_config(origin.addr(), &[(&leaf, &[])], "");
    text.push_str(&format!("[access_log]\npath = {log:?}\n"));
    let proxy = start(&text, dir.path()).await;

    let h2 = ca
        .connect(proxy.addr(), "a.example.test", &[b"h2"])
        .await
        .unwrap();
    assert_eq!(get_over(h2, "/logged", true).await.0, 200);
    let first_line = async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().next() {
                break serde_json::from_str::<serde_json::Value>(line).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let line = tokio::time::timeout(Duration::from_secs(10), first_line)
        .await
        .expect("the line is written within 10 s");
    assert_eq!(line["path"], "/logged");
    assert_eq!(line["protocol"], "HTTP/2");
    assert_eq!(line["tls_version"], "TLSv1.3");
    assert_eq!(line["sni"], "a.example.test");
    proxy.shutdown().await;
}

#[test]
fn the_readmes_edge_proxy_example_is_a_valid_config() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Edge proxy")
        .nth(1)
        .expect("an edge proxy section");
    let example = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a TOML example");
    // The certificate files it names, made for the test.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let ca = TestCa::new();
    ca.leaf(
        &dir.path().join("tls"),
        "shop.example.com",
        &["shop.example.com"],
    );
    let wildcard = "wildcard.api.example.com";
    ca.leaf(&dir.path().join("tls"), wildcard, &["*.api.example.com"]);
    let config =
        Config::parse_in(example, "README.md", dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners.len(), 2);
    assert!(config.listeners[1].proxy_protocol);
    assert!(config.access_log.is_some());
}

#[tokio::test]
async fn the_binary_serves_a_certificate_swapped_on_disk_after_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let old = ca.leaf(dir.path(), "site", &["a.example.test"]);
    let origin = Origin::canned(200, "hello").await;
    let text = tls_config(origin.addr(), &[(&old, &[])], "");
    let loadgate = crate::support::process::Loadgate::run(&text);
    let addr = loadgate.listening_addr();

    // A connection from before the swap, kept open across it.
    let stream = ca.connect(addr, "a.example.test", &[]).await.unwrap();
    assert_eq!(served_leaf(&stream), old.der);
    let mut kept = KeptConnection::open(stream).await;
    assert_eq!(kept.get().await, 200);

    // Renewed in place, as certbot or cert-manager would, then SIGHUP.
    let new = ca.leaf(dir.path(), "site", &["a.example.test"]);
    loadgate.signal("HUP");
    loadgate.wait_for("config reloaded");
    let stream = ca.connect(addr, "a.example.test", &[]).await.unwrap();
    assert_eq!(served_leaf(&stream), new.der);
    assert_eq!(kept.get().await, 200, "the old connection still serves");
}
