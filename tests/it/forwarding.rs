//! The forwarding headers as the backend reads them, byte for byte: `X-Forwarded-*`
//! and RFC 7239 `Forwarded`, from a peer in `trusted_proxies` and from anyone else,
//! with `forwarded` on and off.

use std::net::SocketAddr;
use std::time::Duration;

use loadgate::config::{Cidr, Config, ForwardedHeader};

use crate::hygiene::recorder::Recorder;
use crate::support::{proxy_config, raw_exchange, start_proxy};

/// A client's claims: a balancer in front would send these; anyone else must not.
const CLAIMS: &str = "X-Forwarded-For: 203.0.113.7\r\n\
                      X-Forwarded-Proto: https\r\n\
                      X-Forwarded-Host: shop.example\r\n\
                      X-Forwarded-Port: 443\r\n\
                      Forwarded: for=203.0.113.7;proto=https;host=shop.example\r\n";

/// A proxy on `listen` in front of a recording backend, trusting 127.0.0.0/8 and ::1
/// when `trusted`, adding RFC 7239 elements as `forwarded` says.
struct Setup {
    listen: &'static str,
    trusted: bool,
    forwarded: ForwardedHeader,
}

impl Setup {
    fn config(&self, backend: SocketAddr) -> Config {
        let mut config = proxy_config(backend);
        config.server.listen = vec![self.listen.parse().unwrap()];
        // The recorder answers health checks too: none, so it records only requests.
        config.upstreams[0].health.enabled = false;
        if self.trusted {
            config.server.trusted_proxies = vec![
                Cidr::parse("127.0.0.0/8").unwrap(),
                Cidr::parse("::1").unwrap(),
            ];
        }
        config.server.forwarded = self.forwarded;
        config
    }

    /// Sends `head` (a request head without its final CRLF; `Connection: close` added)
    /// and returns the field lines of the request the backend received, and the proxy's
    /// address.
    async fn forward(&self, head: &str) -> (Vec<String>, SocketAddr) {
        let recorder = Recorder::start().await;
        let proxy = start_proxy(self.config(recorder.addr())).await;
        let request = format!("{head}Connection: close\r\n\r\n");
        let response = raw_exchange(proxy.addr(), request.as_bytes()).await;
        assert_eq!(response.split(' ').nth(1), Some("200"), "{response}");
        let got = recorder
            .wait_for(1, Duration::from_secs(5))
            .await
            .expect("the backend got the request");
        let text = String::from_utf8(got[0].clone()).unwrap();
        let head = &text[..text.find("\r\n\r\n").expect("a whole head")];
        let lines = head.split("\r\n").skip(1).map(str::to_string).collect();
        (lines, proxy.addr())
    }
}

/// The values of the field lines named `name` (lowercase, as hyper writes them).
fn values<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
        .collect()
}

const PLAIN: Setup = Setup {
    listen: "127.0.0.1:0",
    trusted: false,
    forwarded: ForwardedHeader::Off,
};

#[tokio::test]
async fn a_clients_own_forwarding_claims_are_replaced_and_its_forwarded_removed() {
    let (lines, _) = PLAIN
        .forward(&format!(
            "GET /api/orders HTTP/1.1\r\nHost: shop.example\r\n{CLAIMS}"
        ))
        .await;
    assert_eq!(values(&lines, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&lines, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(&lines, "x-forwarded-host"), ["shop.example"]);
    // The port the client asked for: none in Host, so http's 80, whatever port the
    // proxy listens on (a port mapping 80 -> its port in front).
    assert_eq!(values(&lines, "x-forwarded-port"), ["80"]);
    assert_eq!(
        values(&lines, "forwarded"),
        Vec::<&str>::new(),
        "a client's own Forwarded would be believed by Spring: {lines:?}"
    );
}

#[tokio::test]
async fn the_forwarded_port_is_the_hosts_or_the_listeners() {
    let (lines, _) = PLAIN
        .forward("GET /api/orders HTTP/1.1\r\nHost: shop.example:8443\r\n")
        .await;
    assert_eq!(values(&lines, "x-forwarded-port"), ["8443"]);
    // HTTP/1.0 without Host: nothing but the port the connection came in on.
    let (lines, proxy) = PLAIN.forward("GET /api/orders HTTP/1.0\r\n").await;
    assert_eq!(
        values(&lines, "x-forwarded-port"),
        [proxy.port().to_string()]
    );
    assert_eq!(values(&lines, "x-forwarded-host"), Vec::<&str>::new());
}

#[tokio::test]
async fn a_trusted_proxys_claims_are_kept_and_its_forwarded_passes_unchanged() {
    let trusting = Setup {
        trusted: true,
        ..PLAIN
    };
    let (lines, _) = trusting
        .forward(&format!(
            "GET /api/orders HTTP/1.1\r\nHost: shop.internal:8080\r\n{CLAIMS}"
        ))
        .await;
    assert_eq!(
        values(&lines, "x-forwarded-for"),
        ["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(values(&lines, "x-forwarded-proto"), ["https"]);
    assert_eq!(values(&lines, "x-forwarded-host"), ["shop.example"]);
    assert_eq!(values(&lines, "x-forwarded-port"), ["443"]);
    assert_eq!(
        values(&lines, "forwarded"),
        ["for=203.0.113.7;proto=https;host=shop.example"]
    );
    // A balancer that sent only the scheme: the port follows it.
    let (lines, _) = trusting
        .forward("GET /api/orders HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-Proto: https\r\n")
        .await;
    assert_eq!(values(&lines, "x-forwarded-port"), ["443"]);
    assert_eq!(values(&lines, "x-forwarded-host"), ["shop.example"]);
}

#[tokio::test]
async fn rfc7239_element_replaces_a_clients_forwarded() {
    let on = Setup {
        forwarded: ForwardedHeader::On,
        ..PLAIN
    };
    let (lines, _) = on
        .forward(&format!(
            "GET /api/orders HTTP/1.1\r\nHost: shop.example:8080\r\n{CLAIMS}"
        ))
        .await;
    assert_eq!(
        values(&lines, "forwarded"),
        ["for=127.0.0.1;proto=http;host=\"shop.example:8080\""]
    );
    // The X-Forwarded-* headers are set as well: Tomcat's RemoteIpValve reads only them.
    assert_eq!(values(&lines, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&lines, "x-forwarded-port"), ["8080"]);
}

#[tokio::test]
async fn rfc7239_element_is_appended_to_a_trusted_proxys() {
    let on = Setup {
        trusted: true,
        forwarded: ForwardedHeader::On,
        ..PLAIN
    };
    let (lines, _) = on
        .forward(
            "GET /api/orders HTTP/1.1\r\nHost: shop.example\r\n\
             Forwarded: for=203.0.113.7;proto=https\r\n\
             Forwarded: for=\"[2001:db8::7]:4711\"\r\n",
        )
        .await;
    assert_eq!(
        values(&lines, "forwarded"),
        ["for=203.0.113.7;proto=https, for=\"[2001:db8::7]:4711\", \
          for=127.0.0.1;proto=http;host=shop.example"]
    );
}

#[tokio::test]
async fn rfc7239_names_an_ipv6_client_in_brackets_and_quotes() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback (::1) on this machine");
        return;
    }
    let on = Setup {
        listen: "[::1]:0",
        trusted: false,
        forwarded: ForwardedHeader::On,
    };
    let (lines, _) = on
        .forward("GET /api/orders HTTP/1.1\r\nHost: [::1]:8080\r\n")
        .await;
    assert_eq!(
        values(&lines, "forwarded"),
        ["for=\"[::1]\";proto=http;host=\"[::1]:8080\""]
    );
    assert_eq!(values(&lines, "x-forwarded-for"), ["::1"]);
    assert_eq!(values(&lines, "x-forwarded-port"), ["8080"]);
}
