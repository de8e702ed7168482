//! The PROXY protocol on a `[[listener]]`: the balancer's header names the client, and
//! that address is the one the backend is told and `trusted_proxies` is checked
//! against; a connection without a header is closed; it works in front of TLS too.

use std::net::SocketAddr;
use std::time::Duration;

use loadgate::config::Config;
use loadgate::listener::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::origin::Origin;
use crate::support::tls::TestCa;
use crate::support::*;

fn config(origin: SocketAddr, listener_extra: &str, dir: &std::path::Path) -> Config {
    let text = format!(
        r#"
[server]
listen = []
trusted_proxies = ["203.0.113.0/24"]
[admin]
listen = "{LOCAL0}"
[[listener]]
address = "{LOCAL0}"
proxy_protocol = true
{listener_extra}
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
    );
    Config::parse_in(&text, "proxy protocol test", dir).unwrap_or_else(|e| panic!("{e}"))
}

const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 192.0.2.99\r\nConnection: close\r\n\r\n";

/// Sends `header` then [`GET`] in one write, and reads the whole answer. A connection
/// closed with the request unread is reset: that reads as no answer.
async fn exchange(proxy: &Proxy, header: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream.write_all(&[header, GET].concat()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes");
    if let Err(error) = read {
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn xff(origin: &Origin) -> String {
    origin.last_headers()["x-forwarded-for"]
        .to_str()
        .unwrap()
        .to_string()
}

/// A v2 PROXY header for a TCP connection from `source` to `destination` (IPv6).
fn v2_tcp6(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V6(s), SocketAddr::V6(d)) = (source, destination) else {
        panic!("IPv6 addresses");
    };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([0x21, 0x21, 0, 36]);
    header.extend(s.ip().octets());
    header.extend(d.ip().octets());
    header.extend(s.port().to_be_bytes());
    header.extend(d.port().to_be_bytes());
    header
}

#[tokio::test]
async fn the_headers_client_is_the_one_the_backend_is_told_and_trust_is_checked_on() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::canned(200, "hello").await;
    let proxy = start_proxy(config(origin.addr(), "", dir.path())).await;

    // An untrusted client: its own X-Forwarded-For is replaced by its address.
    let answer = exchange(&proxy, b"PROXY TCP4 198.51.100.4 10.0.0.1 56324 443\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xff(&origin), "198.51.100.4");
    assert_eq!(origin.last_headers()["x-forwarded-port"], "80");

    // A client in trusted_proxies: its list is appended to.
    let answer = exchange(&proxy, b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xff(&origin), "192.0.2.99, 203.0.113.7");

    // v2, IPv6.
    let header = v2_tcp6(
        "[2001:db8::7]:40000".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    );
    let answer = exchange(&proxy, &header).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xff(&origin), "2001:db8::7");

    // v2 LOCAL (the balancer's own health check): the connection's own address stays.
    let local = [&b"\r\n\r\n\0\r\nQUIT\n"[..], &[0x20, 0x00, 0, 0]].concat();
    let answer = exchange(&proxy, &local).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xff(&origin), "127.0.0.1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_connection_without_a_header_is_closed_unanswered_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::canned(200, "hello").await;
    let proxy = start_proxy(config(origin.addr(), "", dir.path())).await;
    let refused = |proxy| {
        admin::counter(
            proxy,
            "loadgate_proxy_protocol_headers_total",
            &[("result", "not_proxy_protocol")],
        )
    };
    let before = refused(&proxy).await;
    let answer = exchange(&proxy, b"").await;
    assert_eq!(answer, "", "closed without an answer");
    assert_eq!(origin.requests(), 0, "nothing reached the backend");
    assert_eq!(refused(&proxy).await, before + 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_header_comes_before_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let leaf = ca.leaf(dir.path(), "a", &["a.example.test"]);
    let origin = Origin::canned(200, "hello").await;
    let certificate = format!(
        "[[listener.certificate]]\ncert = {:?}\nkey = {:?}\n",
        leaf.cert_path, leaf.key_path
    );
    let proxy = start_proxy(config(origin.addr(), &certificate, dir.path())).await;

    let mut tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.4 10.0.0.1 56324 443\r\n")
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[]));
    let name = rustls_pki_types::ServerName::try_from("a.example.test").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(GET).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xff(&origin), "198.51.100.4");
    assert_eq!(origin.last_headers()["x-forwarded-proto"], "https");
    assert_eq!(origin.last_headers()["x-forwarded-port"], "443");
    proxy.shutdown().await;
}
