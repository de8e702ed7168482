//! A route's rewrites of what passes through it: its path prefix stripped from the
//! forwarded path (and said in `X-Forwarded-Prefix`), and its header rules applied.
//! Pure functions over a path and a `HeaderMap`; which route's rules apply, and when,
//! is the handler's business (`forward/handler.rs`). The rules are validated in
//! `config/rewrite.rs`.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderRules;

/// The field that tells the backend which prefix was stripped, read by Spring's
/// `ForwardedHeaderFilter` (`server.forward-headers-strategy=framework`) to build links.
pub const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// The prefix a route strips: its `path_prefix` without trailing slashes (`/orders/`
/// strips `/orders`), as sent in `X-Forwarded-Prefix`.
pub fn stripped_prefix(path_prefix: &str) -> &str {
    path_prefix.trim_end_matches('/')
}

/// The forwarded path with the segments of `prefix` (as [`stripped_prefix`] gives it)
/// removed: `/orders/api/x` → `/api/x`, `/orders` and `/orders/` → `/`.
///
/// `path` is the normalised forwarded path, whose route path (the same without
/// parameters) the prefix matched on a segment boundary, so its first segments are the
/// prefix's. Their parameters (`;jsessionid=…`) are not dropped: they move onto the
/// first segment left (`/orders;jsessionid=A/api` → `/api;jsessionid=A`), since Tomcat
/// reads `jsessionid` wherever it stands. `None` when `path` does not start with the
/// prefix's segments (the caller forwards it as it is).
pub fn strip_path(path: &str, prefix: &str) -> Option<String> {
    let mut rest = path;
    let mut params = String::new();
    for want in prefix.split('/').skip(1) {
        let segment_and_rest = rest.strip_prefix('/')?;
        let end = segment_and_rest.find('/').unwrap_or(segment_and_rest.len());
        let segment = &segment_and_rest[..end];
        let (name, segment_params) = match segment.find(';') {
            Some(at) => segment.split_at(at),
            None => (segment, ""),
        };
        if name != want {
            return None;
        }
        params.push_str(segment_params);
        rest = &segment_and_rest[end..];
    }
    // `rest` is empty or starts with `/`.
    let rest = if rest.is_empty() { "/" } else { rest };
    if params.is_empty() {
        return Some(rest.to_string());
    }
    // After the first segment left (`/api` of `/api/x`; the empty one of `/`).
    let first_end = rest[1..].find('/').map_or(rest.len(), |i| i + 1);
    let mut out = String::with_capacity(rest.len() + params.len());
    out.push_str(&rest[..first_end]);
    out.push_str(&params);
    out.push_str(&rest[first_end..]);
    Some(out)
}

/// Sets `X-Forwarded-Prefix` for a request whose route stripped `stripped` (`None`: the
/// route strips nothing).
///
/// Spring trusts the field as it comes (it is the proxy's job to remove a client's
/// claims), and builds links and redirects from it, so: from a `trusted` peer (an
/// ingress that stripped its own prefix) the field is kept and ours appended to it
/// (`/shop, /orders`, which Spring joins into `/shop/orders`); from anyone else it is
/// removed, and replaced by ours when this route strips one.
pub fn forwarded_prefix(headers: &mut HeaderMap, stripped: Option<&str>, trusted: bool) {
    if !trusted {
        headers.remove(X_FORWARDED_PREFIX);
    }
    let Some(ours) = stripped.and_then(|p| HeaderValue::from_str(p).ok()) else {
        return;
    };
    // Spring reads the first field line only: earlier lines are joined into one.
    let mut joined = String::new();
    for value in headers.get_all(X_FORWARDED_PREFIX) {
        if let Ok(v) = value.to_str() {
            joined.push_str(v);
            joined.push_str(", ");
        }
    }
    let value = if joined.is_empty() {
        ours
    } else {
        joined.push_str(stripped.unwrap_or_default());
        HeaderValue::from_str(&joined).unwrap_or(ours)
    };
    headers.insert(X_FORWARDED_PREFIX, value);
}

/// The `Location` of a response on a route that strips `prefix` (as [`stripped_prefix`]
/// gives it), put back under that prefix so the client follows it through the same
/// route: `/login` → `/orders/login`. `host` is the authority the request was routed
/// on (as forwarded in `Host`).
///
/// Rewritten: an absolute path, and an absolute URI (or a network-path reference,
/// `//host/…`) whose authority is `host`, the one a backend builds its redirects from.
/// Left as they are (`None`): a Location already under the prefix (the backend applied
/// `X-Forwarded-Prefix` itself), one that names another host, and a relative reference
/// (`login`, `../x`), which the client resolves against the URL it asked for, prefix
/// included.
pub fn location_under_prefix(location: &str, prefix: &str, host: &str) -> Option<String> {
    let (origin, path) = if location.starts_with('/') && !location.starts_with("//") {
        ("", location)
    } else {
        let after_scheme = match location.split_once("://") {
            Some((scheme, rest))
                if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
            {
                rest
            }
            Some(_) => return None,
            None => location.strip_prefix("//")?,
        };
        let authority_len = after_scheme
            .find(['/', '?', '#'])
            .unwrap_or(after_scheme.len());
        if host.is_empty() || !after_scheme[..authority_len].eq_ignore_ascii_case(host) {
            return None;
        }
        let origin_len = location.len() - after_scheme.len() + authority_len;
        location.split_at(origin_len)
    };
    if is_under(path, prefix) {
        return None;
    }
    // `path` starts with `/`, or is empty or a query (`http://host?q`): the prefix goes
    // in front either way.
    Some([origin, prefix, path].concat())
}

/// `path` (with any query or fragment after it) starts with the segments of `prefix`.
fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#', ';']))
}

/// Applies a route's header rules: `remove`, then `set` (every value replaced), then
/// `add` (appended after the values already there).
pub fn apply(rules: &HeaderRules, headers: &mut HeaderMap) {
    for name in &rules.remove {
        headers.remove(name);
    }
    for (name, values) in &rules.set {
        headers.remove(name);
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, values) in &rules.add {
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_is_put_back_under_the_stripped_prefix() {
        let host = "shop.example:8443";
        for (location, rewritten) in [
            ("/login", Some("/orders/login")),
            ("/", Some("/orders/")),
            ("/login?next=%2F#top", Some("/orders/login?next=%2F#top")),
            ("/ordersx/1", Some("/orders/ordersx/1")),
            (
                "https://shop.example:8443/login",
                Some("https://shop.example:8443/orders/login"),
            ),
            (
                "HTTP://SHOP.example:8443/a",
                Some("HTTP://SHOP.example:8443/orders/a"),
            ),
            (
                "http://shop.example:8443?x=1",
                Some("http://shop.example:8443/orders?x=1"),
            ),
            (
                "//shop.example:8443/a",
                Some("//shop.example:8443/orders/a"),
            ),
            // Already under the prefix: the backend read X-Forwarded-Prefix.
            ("/orders", None),
            ("/orders/login", None),
            ("/orders?x", None),
            ("/orders;jsessionid=A/x", None),
            ("https://shop.example:8443/orders/login", None),
            // Another host, another port, another scheme, or relative.
            ("https://sso.example/login", None),
            ("https://shop.example/login", None),
            ("//sso.example/login", None),
            ("ftp://shop.example:8443/x", None),
            ("login", None),
            ("../x", None),
            ("", None),
        ] {
            assert_eq!(
                location_under_prefix(location, "/orders", host).as_deref(),
                rewritten,
                "{location}"
            );
        }
        // With no host routed on, only paths are rewritten.
        assert_eq!(
            location_under_prefix("/a", "/orders", "").as_deref(),
            Some("/orders/a")
        );
        assert_eq!(location_under_prefix("http:///a", "/orders", ""), None);
    }

    #[test]
    fn strips_the_prefix_segments() {
        for (path, prefix, stripped) in [
            ("/orders/api/x", "/orders", Some("/api/x")),
            ("/orders", "/orders", Some("/")),
            ("/orders/", "/orders", Some("/")),
            ("/orders/api/", "/orders", Some("/api/")),
            ("/a/b/c", "/a/b", Some("/c")),
            // Parameters of stripped segments move onto the first segment left.
            (
                "/orders;jsessionid=A/api/x",
                "/orders",
                Some("/api;jsessionid=A/x"),
            ),
            ("/orders;v=1", "/orders", Some("/;v=1")),
            ("/a;x/b;y/c;z/d", "/a/b", Some("/c;z;x;y/d")),
            // Parameters of the segments left stay where they are.
            ("/orders/api;p=1/x", "/orders", Some("/api;p=1/x")),
            // Not the prefix's segments: left alone.
            ("/ordersx/api", "/orders", None),
            ("/other", "/orders", None),
            ("/", "/orders", None),
        ] {
            assert_eq!(
                strip_path(path, prefix).as_deref(),
                stripped,
                "{path} - {prefix}"
            );
        }
    }

    #[test]
    fn a_prefix_with_a_trailing_slash_strips_its_segments() {
        assert_eq!(stripped_prefix("/orders/"), "/orders");
        assert_eq!(
            strip_path("/orders/x", stripped_prefix("/orders/")).as_deref(),
            Some("/x")
        );
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

    fn values<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn forwarded_prefix_by_trust() {
        // (incoming, stripped, trusted) -> sent
        let claim = [("x-forwarded-prefix", "/evil")];
        for (incoming, stripped, trusted, sent) in [
            (&claim[..], Some("/orders"), false, vec!["/orders"]),
            (&claim[..], None, false, vec![]),
            (&claim[..], Some("/orders"), true, vec!["/evil, /orders"]),
            (&claim[..], None, true, vec!["/evil"]),
            (&[][..], Some("/orders"), true, vec!["/orders"]),
            (&[][..], None, false, vec![]),
        ] {
            let mut h = map(incoming);
            forwarded_prefix(&mut h, stripped, trusted);
            assert_eq!(
                values(&h, "x-forwarded-prefix"),
                sent,
                "{incoming:?} {stripped:?} trusted {trusted}"
            );
        }
        // A trusted peer's several lines become one list, ours last.
        let mut h = map(&[("x-forwarded-prefix", "/a"), ("x-forwarded-prefix", "/b")]);
        forwarded_prefix(&mut h, Some("/c"), true);
        assert_eq!(values(&h, "x-forwarded-prefix"), vec!["/a, /b, /c"]);
    }

    #[test]
    fn rules_remove_then_set_then_add() {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).unwrap();
        let value = |v: &'static str| HeaderValue::from_static(v);
        let rules = HeaderRules {
            remove: vec![name("x-debug")],
            set: vec![(name("x-env"), vec![value("prod")])],
            add: vec![(name("vary"), vec![value("Origin"), value("Accept")])],
        };
        let mut h = map(&[
            ("x-debug", "1"),
            ("x-env", "dev"),
            ("x-env", "test"),
            ("vary", "Accept-Encoding"),
            ("x-kept", "yes"),
        ]);
        apply(&rules, &mut h);
        assert!(!h.contains_key("x-debug"));
        assert_eq!(values(&h, "x-env"), vec!["prod"]);
        assert_eq!(
            values(&h, "vary"),
            vec!["Accept-Encoding", "Origin", "Accept"]
        );
        assert_eq!(values(&h, "x-kept"), vec!["yes"]);
    }
}
