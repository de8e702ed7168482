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

/// Removes every hop-by-hop header, including each header the `Connection` header names,
/// except `Host`: it is the message's target, routed on, never a connection option
/// (`Connection: host` would otherwise send the request on without the host it was
/// routed for).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names says so more cheaply
    // than a removal (a hash and a probe) per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
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
    let asked = tokens(header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let websocket = tokens(header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"));
    (asked && websocket).then(|| HeaderValue::from_static("websocket"))
}

/// Puts back, after [`strip_hop_by_hop`], the two fields that carry a protocol switch
/// to the next hop: `Upgrade: protocol` and `Connection: upgrade`.
pub fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Appends this proxy to the `Via` header, keeping earlier hops. The protocol token
/// names the version the message was received in (RFC 9110 §7.6.3).
pub fn append_via(headers: &mut HeaderMap, received: Version) {
    let ours = match received {
        Version::HTTP_09 => "0.9 loadgate",
        Version::HTTP_10 => "1.0 loadgate",
        Version::HTTP_2 => "2 loadgate",
        Version::HTTP_3 => "3 loadgate",
        _ => "1.1 loadgate",
    };
    debug_assert!(ours.ends_with(VIA_NAME));
    append_list(headers, header::VIA, &HeaderValue::from_static(ours));
}

/// Adds `X-Forwarded-For` (appended to any earlier list), `X-Forwarded-Proto` and
/// `X-Forwarded-Host` for a request received from `client` for `host`.
///
/// From a `trusted` peer (`trusted_proxies`: a load balancer or ingress in front), the
/// client's `X-Forwarded-For` is appended to and its `X-Forwarded-Proto`, `-Host` and
/// `-Port` are kept (an ingress that terminated TLS says `https`, and Spring builds its
/// redirects from it). From any other peer they would be the client's own claims, so
/// they are replaced.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    host: Option<HeaderValue>,
    trusted: bool,
) {
    let (xff, proto, fhost, port) = (
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("x-forwarded-proto"),
        HeaderName::from_static("x-forwarded-host"),
        HeaderName::from_static("x-forwarded-port"),
    );
    if trusted {
        append_list(headers, xff, client);
        if !headers.contains_key(&proto) {
            headers.insert(proto, HeaderValue::from_static("http"));
        }
        if let Some(value) = host.filter(|_| !headers.contains_key(&fhost)) {
            headers.insert(fhost, value);
        }
        return;
    }
    headers.insert(xff, client.clone());
    headers.insert(proto, HeaderValue::from_static("http"));
    headers.remove(&port);
    match host {
        Some(value) => {
            headers.insert(fhost, value);
        }
        None => {
            headers.remove(&fhost);
        }
    }
}

/// A client address as the value of `X-Forwarded-For`; made once per connection.
pub fn client_address(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

/// Joins all existing values of `name` and `item` into one comma-separated value.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &HeaderValue) {
    if !headers.contains_key(&name) {
        headers.insert(name, item.clone());
        return;
    }
    let mut joined = String::new();
    for value in headers.get_all(&name).iter() {
        if let Ok(v) = value.to_str() {
            joined.push_str(v);
            joined.push_str(", ");
        }
    }
    joined.push_str(item.to_str().unwrap_or_default());
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn forwarded_headers_from_a_trusted_proxy_are_kept_and_appended_to() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("x-forwarded-port", "443"),
        ]);
        add_forwarded(
            &mut h,
            &client_address("10.0.0.5".parse().unwrap()),
            Some(HeaderValue::from_static("shop.internal:8080")),
            true,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-forwarded-port"], "443");
    }

    #[test]
    fn forwarded_headers_from_anyone_else_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "443"),
        ]);
        add_forwarded(
            &mut h,
            &client_address("198.51.100.4".parse().unwrap()),
            Some(HeaderValue::from_static("shop.example:8080")),
            false,
        );
        assert_eq!(h["x-forwarded-for"], "198.51.100.4");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example:8080");
        assert!(!h.contains_key("x-forwarded-port"));
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
