//! Header rules of a forwarding proxy (RFC 9110 §7.6): hop-by-hop headers are
//! removed in both directions, and the proxy announces itself with `Via` and the
//! `X-Forwarded-*` headers. Pure functions over a `HeaderMap`, no I/O.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// The name this proxy uses in `Via`.
pub const VIA_NAME: &str = "loadgate";

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1),
/// plus `Proxy-Authorization`, which is meant for this proxy alone.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
];

/// One of [`HOP_BY_HOP`], matched by name: `HOP_BY_HOP.contains` would build (and drop)
/// the const array for every name it is asked about.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
            | "proxy-authorization"
    )
}

/// Removes every hop-by-hop header, including each header the `Connection` header names,
/// except `Host`: it is the message's target, routed on, never a connection option
/// (`Connection: host` would otherwise send the request on without the host it was
/// routed for).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names says so more cheaply
    // than a removal (a hash and a probe) per hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| *name != header::HOST)
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The `Upgrade` value of a WebSocket opening handshake (RFC 6455 §4.1): `Connection`
/// names `upgrade` and `Upgrade` names `websocket`, case-insensitively. Any other
/// protocol (`h2c` among them) gets `None`, and its `Upgrade` is stripped as hop-by-hop.
pub fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let tokens = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    // `Upgrade` first: most requests have none, and one lookup settles them.
    let websocket = || tokens(header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"));
    let asked = || tokens(header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    (websocket() && asked()).then(|| HeaderValue::from_static("websocket"))
}

/// Puts back, after [`strip_hop_by_hop`], the two fields that carry a protocol switch
/// to the next hop: `Upgrade: protocol` and `Connection: upgrade`.
pub fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Decimal digits only, no sign or whitespace, as hyper parses `Content-Length`.
pub fn parse_digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Whether the last transfer coding a `Transfer-Encoding` value names is `chunked`.
pub fn ends_in_chunked(value: &[u8]) -> bool {
    let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// Appends this proxy to the `Via` header, keeping earlier hops. The protocol token
/// names the version the message was received in (RFC 9110 §7.6.3).
pub fn append_via(headers: &mut HeaderMap, received: Version) {
    // Constants: `from_static` on a value picked at run time checks its bytes every call.
    const VIA_09: HeaderValue = HeaderValue::from_static("0.9 loadgate");
    const VIA_10: HeaderValue = HeaderValue::from_static("1.0 loadgate");
    const VIA_11: HeaderValue = HeaderValue::from_static("1.1 loadgate");
    const VIA_2: HeaderValue = HeaderValue::from_static("2 loadgate");
    const VIA_3: HeaderValue = HeaderValue::from_static("3 loadgate");
    let ours = match received {
        Version::HTTP_09 => VIA_09,
        Version::HTTP_10 => VIA_10,
        Version::HTTP_2 => VIA_2,
        Version::HTTP_3 => VIA_3,
        _ => VIA_11,
    };
    debug_assert!(ours.as_bytes().ends_with(VIA_NAME.as_bytes()));
    append_list(headers, header::VIA, &ours);
}

/// What the forwarding headers say about the connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The peer's address as an `X-Forwarded-For` item ([`client_address`]).
    pub client: &'a HeaderValue,
    /// The peer's address.
    pub peer: IpAddr,
    /// The connection came in over TLS: the scheme is `https`.
    pub tls: bool,
    /// The port the connection came in on (the listener's).
    pub local_port: u16,
    /// The peer is one of `trusted_proxies`: its forwarding headers are believed.
    pub trusted: bool,
    /// An RFC 7239 `Forwarded` element is added (`forwarded = "on"`).
    pub forwarded: bool,
}

/// Sets the forwarding headers of a request received over `hop` for `host` (the `Host`
/// forwarded; `None` when the client named none):
///
/// - `X-Forwarded-For`: the peer's address, appended to a trusted peer's list.
/// - `X-Forwarded-Proto`: `https` over TLS, `http` otherwise.
/// - `X-Forwarded-Host`: `host`.
/// - `X-Forwarded-Port`: the port the client asked for: the one in the forwarded host,
///   else the scheme's default (443, 80), as Traefik does; with no host at all, the
///   listener's port. Not the listener's port when the host names none: behind a port
///   mapping (a Kubernetes Service 80 → 8080, `docker -p 80:8080`) the client used 80,
///   and Spring's `ForwardedHeaderFilter` and Tomcat's `RemoteIpValve` build redirects
///   with this port, overriding the one in `X-Forwarded-Host` (`RemoteIpValve` drops
///   that one and falls back to 80 / 443 when this header is missing).
/// - `Forwarded` (RFC 7239), when `hop.forwarded`: `for=<peer>;proto=<scheme>;host=<host>`.
///
/// From a `trusted` peer (a load balancer or ingress in front) `X-Forwarded-For` and
/// `Forwarded` are appended to, and its `X-Forwarded-Proto`, `-Host` and `-Port` kept:
/// an ingress that terminated TLS says `https`, and Spring builds its redirects from it.
/// Whichever it left out is filled in, the port from the host and scheme it forwarded.
/// From any other peer they would be the client's own claims, so they are replaced, and
/// its `Forwarded` is removed even when loadgate adds none: Spring reads `Forwarded`
/// before any `X-Forwarded-*` (`forward-headers-strategy = framework`).
pub fn add_forwarded(headers: &mut HeaderMap, hop: &Hop<'_>, host: Option<HeaderValue>) {
    // Constants, so the names are checked once at compile time rather than per request.
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    const PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
    const HTTPS: HeaderValue = HeaderValue::from_static("https");
    const HTTP: HeaderValue = HeaderValue::from_static("http");
    let (xff, proto, fhost, port) = (XFF, PROTO, HOST, PORT);
    let (scheme, scheme_value) = if hop.tls {
        ("https", HTTPS)
    } else {
        ("http", HTTP)
    };
    if hop.forwarded {
        let element = forwarded_element(hop.peer, scheme, host.as_ref());
        if hop.trusted {
            append_list(headers, header::FORWARDED, &element);
        } else {
            headers.insert(header::FORWARDED, element);
        }
    } else if !hop.trusted {
        headers.remove(header::FORWARDED);
    }
    if hop.trusted {
        append_list(headers, xff, hop.client);
        if !headers.contains_key(&proto) {
            headers.insert(proto.clone(), scheme_value);
        }
        if let Some(value) = host.filter(|_| !headers.contains_key(&fhost)) {
            headers.insert(fhost.clone(), value);
        }
        if !headers.contains_key(&port) {
            let first = |name: &HeaderName| {
                let value = headers.get(name)?.to_str().ok()?;
                value.split(',').next().map(str::trim)
            };
            let value = forwarded_port(
                first(&fhost),
                first(&proto).unwrap_or(scheme),
                hop.local_port,
            );
            headers.insert(port, value);
        }
        return;
    }
    headers.insert(xff, hop.client.clone());
    headers.insert(proto, scheme_value);
    let host_text = host.as_ref().and_then(|h| h.to_str().ok());
    headers.insert(port, forwarded_port(host_text, scheme, hop.local_port));
    match host {
        Some(value) => {
            headers.insert(fhost, value);
        }
        None => {
            headers.remove(&fhost);
        }
    }
}

/// The `X-Forwarded-Port` for a request to `host` over `scheme`: the host's own port,
/// else the scheme's default; `local_port` when there is no host.
fn forwarded_port(host: Option<&str>, scheme: &str, local_port: u16) -> HeaderValue {
    let Some(host) = host else {
        return HeaderValue::from(local_port);
    };
    // The port follows the last ':' outside an IPv6 literal's brackets: one pass from the
    // end, over bytes (the host is short; a char search sets up a searcher per call).
    let colon = host
        .bytes()
        .rposition(|b| b == b':' || b == b']')
        .filter(|&at| host.as_bytes()[at] == b':');
    let port = colon
        .map(|at| &host.as_bytes()[at + 1..])
        .filter(|digits| (1..=5).contains(&digits.len()))
        .and_then(|digits| Some((digits, u16::try_from(parse_digits(digits)?).ok()?)));
    match port {
        // The host's own digits when they are the number's (no leading zero): a copy,
        // not the formatting `HeaderValue::from(u16)` does.
        Some((digits, _)) if digits[0] != b'0' => {
            HeaderValue::from_bytes(digits).expect("ASCII digits are a header value")
        }
        Some((_, number)) => HeaderValue::from(number),
        None if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") => {
            HeaderValue::from_static("443")
        }
        None => HeaderValue::from_static("80"),
    }
}

/// This hop's RFC 7239 `Forwarded` element: `for=<peer>;proto=<scheme>;host=<host>`, an
/// IPv6 address bracketed and quoted (§6), a value that is not a token quoted (§4).
fn forwarded_element(peer: IpAddr, scheme: &str, host: Option<&HeaderValue>) -> HeaderValue {
    let mut element = String::with_capacity(64);
    match peer {
        IpAddr::V4(ip) => element.push_str(&format!("for={ip}")),
        IpAddr::V6(ip) => element.push_str(&format!("for=\"[{ip}]\"")),
    }
    element.push_str(";proto=");
    element.push_str(scheme);
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        element.push_str(";host=");
        push_token_or_quoted(&mut element, host);
    }
    HeaderValue::from_str(&element).expect("visible ASCII, quoted or not, is a header value")
}

/// Appends `value` as a token when it is one (RFC 9110 §5.6.2), else as a quoted-string.
fn push_token_or_quoted(out: &mut String, value: &str) {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !value.is_empty() && value.chars().all(tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A client address as the value of `X-Forwarded-For`; made once per connection.
pub fn client_address(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

/// Joins all existing values of `name` and `item` into one comma-separated value.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &HeaderValue) {
    // One hash and probe, whether the field is there already or (usually) not.
    let mut entry = match headers.entry(name) {
        header::Entry::Vacant(entry) => {
            entry.insert(item.clone());
            return;
        }
        header::Entry::Occupied(entry) => entry,
    };
    let mut joined = String::new();
    for value in entry.iter() {
        if let Ok(v) = value.to_str() {
            joined.push_str(v);
            joined.push_str(", ");
        }
    }
    joined.push_str(item.to_str().unwrap_or_default());
    if let Ok(value) = HeaderValue::from_str(&joined) {
        // Replaces every earlier line of the field with the one joined value.
        entry.insert(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_by_hop_match_names_the_list() {
        assert!(HOP_BY_HOP.iter().all(is_hop_by_hop));
        for end_to_end in [
            header::HOST,
            header::VIA,
            header::CONTENT_LENGTH,
            header::EXPECT,
        ] {
            assert!(!is_hop_by_hop(&end_to_end), "{end_to_end}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "close, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic abc"),
            ("authorization", "Bearer kept"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["authorization", "x-kept"]);
    }

    #[test]
    fn a_connection_header_cannot_name_host_away() {
        let mut h = map(&[
            ("connection", "host, x-a"),
            ("host", "api.example"),
            ("x-a", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["host"]);
    }

    /// A plain-HTTP connection on port 8080 from `peer`, trusted or not, without RFC 7239.
    /// Its `X-Forwarded-For` item is leaked (a few bytes a test) so that one expression
    /// builds the whole `Hop`.
    fn from(peer: &str, trusted: bool) -> Hop<'static> {
        let peer: IpAddr = peer.parse().unwrap();
        Hop {
            client: Box::leak(Box::new(client_address(peer))),
            peer,
            tls: false,
            local_port: 8080,
            trusted,
            forwarded: false,
        }
    }

    fn host(value: &'static str) -> Option<HeaderValue> {
        Some(HeaderValue::from_static(value))
    }

    #[test]
    fn forwarded_headers_from_a_trusted_proxy_are_kept_and_appended_to() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("x-forwarded-port", "443"),
            ("forwarded", "for=203.0.113.7;proto=https;host=shop.example"),
        ]);
        add_forwarded(&mut h, &from("10.0.0.5", true), host("shop.internal:8080"));
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(
            h["forwarded"], "for=203.0.113.7;proto=https;host=shop.example",
            "kept as it came when loadgate adds none"
        );
    }

    #[test]
    fn forwarded_headers_from_anyone_else_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "443"),
            ("forwarded", "for=203.0.113.7;proto=https;host=evil.example"),
        ]);
        add_forwarded(
            &mut h,
            &from("198.51.100.4", false),
            host("shop.example:8080"),
        );
        assert_eq!(h["x-forwarded-for"], "198.51.100.4");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example:8080");
        assert_eq!(h["x-forwarded-port"], "8080");
        assert!(
            !h.contains_key("forwarded"),
            "a client's own Forwarded never reaches the backend"
        );
    }

    #[test]
    fn proto_says_https_for_a_connection_that_came_in_over_tls() {
        let tls = Hop {
            tls: true,
            ..from("198.51.100.4", false)
        };
        let mut h = map(&[("x-forwarded-proto", "http")]);
        add_forwarded(&mut h, &tls, host("shop.example"));
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-port"], "443");
        // A trusted peer that said nothing gets the scheme loadgate saw; what it said stays.
        let trusted = Hop {
            trusted: true,
            ..tls
        };
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, &trusted, host("shop.example"));
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-port"], "443");
        let mut h = map(&[("x-forwarded-proto", "http")]);
        add_forwarded(&mut h, &trusted, host("shop.example"));
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-port"], "80");
    }

    #[test]
    fn port_is_the_one_the_client_asked_for() {
        let port = |hop: &Hop<'_>, value: Option<HeaderValue>, headers: &[(&str, &str)]| {
            let mut h = map(headers);
            add_forwarded(&mut h, hop, value);
            h["x-forwarded-port"].to_str().unwrap().to_string()
        };
        let plain = from("198.51.100.4", false);
        let tls = Hop { tls: true, ..plain };
        // The listener is on 8080, but a host without a port was asked for on the
        // scheme's default port (a port mapping 80 -> 8080 in front).
        assert_eq!(port(&plain, host("shop.example"), &[]), "80");
        assert_eq!(port(&tls, host("shop.example"), &[]), "443");
        assert_eq!(port(&plain, host("shop.example:8081"), &[]), "8081");
        assert_eq!(port(&tls, host("[2001:db8::1]:8443"), &[]), "8443");
        assert_eq!(port(&plain, host("[2001:db8::1]"), &[]), "80");
        // No host at all (HTTP/1.0): the port the connection came in on.
        assert_eq!(port(&plain, None, &[]), "8080");
        // A trusted peer's port stays; without one, it follows the host and scheme it sent.
        let trusted = from("10.0.0.5", true);
        let sent = [("x-forwarded-port", "8443")];
        assert_eq!(port(&trusted, host("internal:8080"), &sent), "8443");
        let sent = [
            ("x-forwarded-proto", "https, http"),
            ("x-forwarded-host", "shop.example, internal"),
        ];
        assert_eq!(port(&trusted, host("internal:8080"), &sent), "443");
        let sent = [("x-forwarded-host", "shop.example:9443")];
        assert_eq!(port(&trusted, host("internal:8080"), &sent), "9443");
        // A port written with leading zeros is sent as its number; one that is no port
        // at all counts as none.
        let sent = [("x-forwarded-host", "shop.example:09443")];
        assert_eq!(port(&trusted, host("internal:8080"), &sent), "9443");
        let sent = [("x-forwarded-host", "shop.example:99999")];
        assert_eq!(port(&trusted, host("internal:8080"), &sent), "80");
        for not_a_port in [
            "shop.example:",
            "shop.example:+443",
            "shop.example:4 3",
            "[::1]:",
        ] {
            let sent = [("x-forwarded-host", not_a_port)];
            assert_eq!(
                port(&trusted, host("internal:8080"), &sent),
                "80",
                "{not_a_port}"
            );
        }
        assert_eq!(port(&trusted, host("internal:8080"), &[]), "8080");
    }

    #[test]
    fn rfc7239_element_replaces_a_clients_and_extends_a_trusted_proxys() {
        let on = |peer: &str, trusted: bool| Hop {
            forwarded: true,
            ..from(peer, trusted)
        };
        let mut h = map(&[("forwarded", "for=203.0.113.7;proto=https")]);
        add_forwarded(&mut h, &on("198.51.100.4", false), host("shop.example"));
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.4;proto=http;host=shop.example"
        );

        let mut h = map(&[
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("forwarded", "for=192.0.2.1"),
        ]);
        add_forwarded(&mut h, &on("10.0.0.5", true), host("shop.example:8080"));
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.7;proto=https, for=192.0.2.1, \
             for=10.0.0.5;proto=http;host=\"shop.example:8080\""
        );
        assert_eq!(h.get_all("forwarded").iter().count(), 1);

        // IPv6 addresses are bracketed and quoted (RFC 7239 §6); TLS says https; no host,
        // no host parameter.
        let mut h = HeaderMap::new();
        let v6 = Hop {
            tls: true,
            ..on("2001:db8::1", false)
        };
        add_forwarded(&mut h, &v6, host("[2001:db8::2]:8443"));
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=\"[2001:db8::2]:8443\""
        );
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, &on("::1", false), None);
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
    }

    #[test]
    fn quoted_values_escape_quotes_and_backslashes() {
        let mut out = String::new();
        push_token_or_quoted(&mut out, "a\"b\\c");
        assert_eq!(out, "\"a\\\"b\\\\c\"");
        let mut out = String::new();
        push_token_or_quoted(&mut out, "shop.example");
        assert_eq!(out, "shop.example");
    }

    #[test]
    fn via_names_the_received_protocol() {
        let mut h = map(&[("via", "1.0 edge")]);
        append_via(&mut h, Version::HTTP_2);
        assert_eq!(h["via"], "1.0 edge, 2 loadgate");
        let mut h = HeaderMap::new();
        append_via(&mut h, Version::HTTP_11);
        assert_eq!(h["via"], "1.1 loadgate");
    }

    #[test]
    fn only_a_websocket_upgrade_asked_for_in_connection_is_one() {
        let upgrade = |pairs: &[(&str, &str)]| websocket_upgrade(&map(pairs));
        let ws = Some(HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade(&[("connection", "Upgrade"), ("upgrade", "websocket")]),
            ws
        );
        assert_eq!(
            upgrade(&[
                ("connection", "keep-alive, upgrade"),
                ("upgrade", "WebSocket")
            ]),
            ws
        );
        assert_eq!(upgrade(&[("upgrade", "websocket")]), None, "no Connection");
        assert_eq!(
            upgrade(&[
                ("connection", "upgrade, http2-settings"),
                ("upgrade", "h2c")
            ]),
            None
        );
        assert_eq!(upgrade(&[("connection", "upgrade")]), None, "no Upgrade");

        let mut h = map(&[
            ("connection", "Upgrade, x-a"),
            ("upgrade", "websocket"),
            ("x-a", "1"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let protocol = websocket_upgrade(&h).unwrap();
        strip_hop_by_hop(&mut h);
        keep_upgrade(&mut h, protocol);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(!h.contains_key("x-a"));
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    }
}
