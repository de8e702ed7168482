//! One meaning per request: the host and path a request is routed on, cache-keyed on
//! and forwarded with, normalised once, before routing, from what the client sent.
//!
//! A proxy that routes on one reading of a request and forwards bytes the backend
//! reads another way lets a client choose its own route (and so its shedding class),
//! or reach a cached route with a path the backend serves differently. So:
//!
//! - **Host** (RFC 9112 §3.2): one `Host` field, a valid `host[:port]`; on HTTP/1.1 it
//!   must be present. An absolute-form target's authority replaces it (§3.2.2); on
//!   HTTP/2 `:authority` and a `host` field must agree (RFC 9113 §8.3.1). The name is
//!   lowercased and loses one trailing dot (`Api.Example.` is `api.example`); the port
//!   is kept for the backend but not used for routing.
//! - **Path** (RFC 3986 §6.2.2, §5.2.4): percent-encoded unreserved characters are
//!   decoded (`%72` is `r`), other escapes keep uppercase hex, `//` is merged and
//!   dot-segments are removed. Path parameters (`;jsessionid=…`) are ignored for
//!   routing and kept in the forwarded path, except on dot-segments (`..;x` is `..`),
//!   the way Tomcat reads them. Refused: `..` above the root, an encoded `/` or `\`, a
//!   raw `\`, an encoded NUL, a malformed escape.
//!
//! Pure functions over strings; the handler applies them (`forward/handler.rs`).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Why a request's host or path was refused (a 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub &'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A request's host, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `name[:port]` as forwarded in `Host` and `X-Forwarded-Host`.
    pub authority: String,
    /// The length of the name within `authority`: what routes match on.
    name_len: usize,
}

impl Host {
    /// The lowercase name without port or trailing dot, as routes match it.
    pub fn name(&self) -> &str {
        &self.authority[..self.name_len]
    }
}

/// Parses and normalises a `Host` value or a target's authority.
pub fn host(raw: &str) -> Result<Host, Refused> {
    if raw.is_empty() {
        return Err(Refused("empty Host"));
    }
    if raw.as_bytes().contains(&b'@') {
        return Err(Refused("userinfo in the host"));
    }
    let (name, port) = if raw.starts_with('[') {
        // An IP literal: `[v6]` or `[v6]:port`.
        let end = raw
            .find(']')
            .ok_or(Refused("unterminated IP literal in the host"))?;
        let literal = &raw[..=end];
        if !literal[1..end]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(Refused("invalid IP literal in the host"));
        }
        match &raw[end + 1..] {
            "" => (literal, None),
            rest => (
                literal,
                Some(rest.strip_prefix(':').ok_or(Refused("invalid host"))?),
            ),
        }
    } else {
        match raw.bytes().position(|b| b == b':') {
            Some(colon) => (&raw[..colon], Some(&raw[colon + 1..])),
            None => (raw, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refused("invalid port in the host"));
        }
    }
    if !name.starts_with('[') && !name.bytes().all(is_reg_name_byte) {
        return Err(Refused("invalid character in the host"));
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(Refused("empty host name"));
    }
    let mut authority = name.to_ascii_lowercase();
    let name_len = authority.len();
    if let Some(port) = port {
        authority.push(':');
        authority.push_str(port);
    }
    Ok(Host {
        authority,
        name_len,
    })
}

/// RFC 3986 reg-name: unreserved, sub-delims and `%` of pct-encoded.
fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b)
}

/// A request path, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path<'a> {
    /// The path forwarded to the backend: normalised, with its segments' parameters.
    pub forward: Cow<'a, str>,
    /// The path routes match on: the same without parameters.
    pub route: Cow<'a, str>,
}

/// Normalises an origin-form path (no query). Most paths need nothing done and are
/// returned borrowed.
pub fn path(raw: &str) -> Result<Path<'_>, Refused> {
    if !raw.starts_with('/') {
        return Err(Refused("the request target is not an absolute path"));
    }
    if is_normal(raw) {
        return Ok(Path {
            forward: Cow::Borrowed(raw),
            route: Cow::Borrowed(raw),
        });
    }
    // Each segment after the leading `/`, decoded, with its parameters apart.
    let segments: Vec<&str> = raw[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<(String, usize)> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        let decoded = decode(segment)?;
        // The segment's name ends at its first `;` (an encoded `;` is data).
        let name_len = decoded.find(';').unwrap_or(decoded.len());
        let name = &decoded[..name_len];
        let is_last = i == last;
        match name {
            "" if !is_last => continue,
            "" => trailing_slash = true,
            "." => trailing_slash = is_last,
            ".." => {
                out.pop().ok_or(Refused("the path climbs above the root"))?;
                trailing_slash = is_last;
            }
            _ => {
                out.push((decoded, name_len));
                trailing_slash = false;
            }
        }
    }
    let mut forward = String::with_capacity(raw.len());
    let mut route = String::with_capacity(raw.len());
    for (segment, name_len) in &out {
        forward.push('/');
        forward.push_str(segment);
        route.push('/');
        route.push_str(&segment[..*name_len]);
    }
    if trailing_slash || out.is_empty() {
        forward.push('/');
        route.push('/');
    }
    Ok(Path {
        forward: Cow::Owned(forward),
        route: Cow::Owned(route),
    })
}

/// True when `raw` has nothing to normalise: no escape, no parameter, no backslash, no
/// empty or dot segment.
fn is_normal(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    if bytes.iter().any(|b| matches!(b, b'%' | b';' | b'\\')) {
        return false;
    }
    // Every segment after a `/` must be non-empty (except a trailing one) and not a
    // dot-segment.
    // Split as bytes: a `str` split on a char sets up a char searcher per segment.
    let mut segments = raw.as_bytes()[1..].split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment == b"." || segment == b".." {
            return false;
        }
    }
    true
}

/// Decodes the escapes of unreserved characters in one segment; keeps the others with
/// uppercase hex. Refuses an encoded `/`, `\` or NUL, a raw `\`, and a bad escape.
fn decode(segment: &str) -> Result<String, Refused> {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Refused("a backslash in the path")),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(Refused("a malformed percent-escape in the path"))?;
                match hex {
                    b'/' => return Err(Refused("an encoded slash in the path")),
                    b'\\' => return Err(Refused("an encoded backslash in the path")),
                    0 => return Err(Refused("an encoded NUL in the path")),
                    b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                        out.push(char::from(b))
                    }
                    b => {
                        let _ = write!(out, "%{b:02X}");
                    }
                }
                i += 3;
            }
            b => {
                // hyper has already refused bytes that may not appear in a target, so
                // every byte here is ASCII.
                out.push(char::from(b));
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(raw: &str) -> (String, String) {
        let p = path(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        (p.forward.into_owned(), p.route.into_owned())
    }

    #[test]
    fn paths_are_normalised() {
        for (raw, forward, route) in [
            ("/", "/", "/"),
            ("/api/reports/x", "/api/reports/x", "/api/reports/x"),
            ("/a/", "/a/", "/a/"),
            (
                "/checkout/../reports/export",
                "/reports/export",
                "/reports/export",
            ),
            (
                "/checkout/..;/reports/export",
                "/reports/export",
                "/reports/export",
            ),
            ("/api/%72eports/x", "/api/reports/x", "/api/reports/x"),
            ("/api//reports/x", "/api/reports/x", "/api/reports/x"),
            ("//reports/x", "/reports/x", "/reports/x"),
            ("/a/./b", "/a/b", "/a/b"),
            ("/reports/x/..", "/reports/", "/reports/"),
            ("/reports/x/.", "/reports/x/", "/reports/x/"),
            ("/checkout/./../reports", "/reports", "/reports"),
            ("/%7euser/x", "/~user/x", "/~user/x"),
            ("/a/%c3%a9/b", "/a/%C3%A9/b", "/a/%C3%A9/b"),
            ("/%2e%2E%2e/x/../y", "/.../y", "/.../y"),
            (
                "/cart;jsessionid=1/items",
                "/cart;jsessionid=1/items",
                "/cart/items",
            ),
            ("/reports;v=1", "/reports;v=1", "/reports"),
            ("/reports%3Bv=1", "/reports%3Bv=1", "/reports%3Bv=1"),
            ("/x/..", "/", "/"),
        ] {
            assert_eq!(
                normal(raw),
                (forward.to_string(), route.to_string()),
                "{raw}"
            );
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for raw in ["/", "/api/reports/x", "/a/", "/a.b/c..d/.e"] {
            let p = path(raw).unwrap();
            assert!(matches!(p.forward, Cow::Borrowed(_)), "{raw}");
            assert_eq!(p.forward, raw);
        }
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for raw in [
            "/../../etc/passwd",
            "/%2e%2e/",
            "/%2e%2E/x/../y",
            "/a/../../b",
            "/..",
            "/a%2Fb",
            "/a%2fb",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
            "/a%00b",
            "/a%zzb",
            "/a%4",
            "x/y",
            "*",
        ] {
            assert!(path(raw).is_err(), "{raw} should be refused");
        }
    }

    #[test]
    fn hosts_are_normalised() {
        for (raw, authority, name) in [
            ("public.example", "public.example", "public.example"),
            ("Internal.Example.", "internal.example", "internal.example"),
            ("API.example:8080", "api.example:8080", "api.example"),
            ("api.example.:8080", "api.example:8080", "api.example"),
            ("127.0.0.1:80", "127.0.0.1:80", "127.0.0.1"),
            ("[::1]:8080", "[::1]:8080", "[::1]"),
            ("[::1]", "[::1]", "[::1]"),
        ] {
            let h = host(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!((h.authority.as_str(), h.name()), (authority, name), "{raw}");
        }
    }

    #[test]
    fn invalid_hosts_are_refused() {
        for raw in [
            "",
            "good.example/evil?x",
            "a b",
            "user@internal.example",
            "public.example:80x",
            "public.example:",
            "[::1",
            "[::1]x",
            "[zz]",
            ".",
            ":80",
            "host\"",
        ] {
            assert!(host(raw).is_err(), "{raw:?} should be refused");
        }
    }
}
