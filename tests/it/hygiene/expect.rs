//! What a backend should receive, byte for byte: [`expected`] builds it from the
//! request line and the client's headers as they should be forwarded, and adds what
//! the proxy adds to every forwarded request, in the order it adds them today:
//!
//! ```text
//! <the client's headers, in order; names lowercased (hyper writes them so); hop-by-hop
//!  headers, Expect and headers with '_' in their name gone; an existing
//!  x-forwarded-for / via / x-forwarded-proto / -host / -port updated in place>
//! x-request-id: <generated>        unless the client sent one
//! host: <authority>                only when the client sent no Host but the target had one
//! x-forwarded-for: 127.0.0.1       the client's own replaced (127.0.0.1 is no trusted proxy)
//! x-forwarded-proto: http
//! x-forwarded-host: <host>         the Host forwarded, when there is one
//! x-forwarded-port: <port>         the Host's port, else 80; the proxy's port when no Host
//! via: 1.1 loadgate                "1.0" / "2" for requests received in HTTP/1.0 / HTTP/2
//! host: <backend address>          only when there is no host at all (HTTP/1.0 without Host)
//! content-length: <n>              a body read ahead in full (≤ 64 KiB), however framed
//! ```
//! The generated request id differs per process, so [`normalise`] replaces it with
//! `{id}` in what the backend received before the comparison. [`same_request`] compares
//! every byte of the request line, of each field line and of the body; only the order
//! of differently named fields is left out (the positions above are today's).

use std::net::SocketAddr;

/// Stands for the generated `x-request-id` value in expectations.
const ID: &str = "{id}";

#[derive(Debug, Clone)]
pub struct Expected {
    line: String,
    headers: Vec<(String, String)>,
    received: &'static str,
    host_added: Option<String>,
    backend_host: bool,
    body: Vec<u8>,
}

/// The request `line` (without CRLF) with the client's `headers` as they should reach
/// the backend, no body, received over HTTP/1.1.
pub fn expected(line: &str, headers: &[(&str, &str)]) -> Expected {
    Expected {
        line: line.to_string(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
            .collect(),
        received: "1.1",
        host_added: None,
        backend_host: false,
        body: Vec::new(),
    }
}

impl Expected {
    /// A body forwarded as is (the `content-length` header belongs in `headers`).
    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// The protocol the client spoke, as `Via` names it: "1.0", "1.1" or "2".
    pub fn received(mut self, version: &'static str) -> Self {
        self.received = version;
        self
    }

    /// The client sent no `Host` but the target (absolute-form, `:authority`) named one:
    /// the proxy adds `host`.
    pub fn host_added(mut self, host: &str) -> Self {
        self.host_added = Some(host.to_string());
        self
    }

    /// No host anywhere (HTTP/1.0 without `Host`): the backend's address is sent.
    pub fn backend_host(mut self) -> Self {
        self.backend_host = true;
        self
    }

    /// The exact bytes, for a request that reached `backend` through the proxy on `proxy`.
    pub fn bytes(&self, backend: SocketAddr, proxy: SocketAddr) -> Vec<u8> {
        let mut headers = self.headers.clone();
        let mut set = |name: &str, value: String, append: bool| match headers
            .iter_mut()
            .find(|(n, _)| n == name)
        {
            Some((_, old)) if append => *old = format!("{old}, {value}"),
            Some((_, old)) => *old = value,
            None => headers.push((name.to_string(), value)),
        };
        let forwarded_host = self.host_added.clone().or_else(|| {
            self.headers
                .iter()
                .find(|(n, _)| n == "host")
                .map(|(_, v)| v.clone())
        });
        if !self.headers.iter().any(|(n, _)| n == "x-request-id") {
            set("x-request-id", ID.to_string(), false);
        }
        if let Some(host) = &self.host_added {
            set("host", host.clone(), false);
        }
        set("x-forwarded-for", "127.0.0.1".to_string(), false);
        set("x-forwarded-proto", "http".to_string(), false);
        let forwarded_host = forwarded_host.filter(|h| !h.is_empty());
        let port = match &forwarded_host {
            // The port follows the last ':' after an IPv6 literal's brackets.
            Some(host) => host[host.rfind(']').map_or(0, |end| end + 1)..]
                .rsplit_once(':')
                .map_or("80", |(_, port)| port)
                .to_string(),
            None => proxy.port().to_string(),
        };
        set("x-forwarded-port", port, false);
        if let Some(host) = forwarded_host {
            set("x-forwarded-host", host, false);
        }
        set("via", format!("{} loadgate", self.received), true);
        if self.backend_host {
            set("host", backend.to_string(), false);
        }
        let mut out = format!("{}\r\n", self.line);
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// True when `got` (what a backend read) is the request `want` describes: the same
/// request line, the same field lines byte for byte (lines of one name in the same
/// order) and the same body. The order of differently named fields is not compared: it
/// carries no meaning (RFC 9110 §5.3), and a `HeaderMap` removal reorders them.
pub fn same_request(got: &[u8], want: &[u8]) -> bool {
    canonical(&normalise(got)) == canonical(want)
}

/// `raw` with the value of a proxy-generated `x-request-id` (`{8 hex}-{hex}`) replaced
/// by `{id}`; everything else untouched.
pub fn normalise(raw: &[u8]) -> Vec<u8> {
    let Some(mut parts) = Parts::split(raw) else {
        return raw.to_vec();
    };
    for field in &mut parts.fields {
        if field
            .strip_prefix(b"x-request-id: ")
            .is_some_and(is_generated_id)
        {
            *field = format!("x-request-id: {ID}").into_bytes();
        }
    }
    parts.join()
}

/// `raw` with its field lines sorted by name, lines of one name kept in order.
fn canonical(raw: &[u8]) -> Vec<u8> {
    let Some(mut parts) = Parts::split(raw) else {
        return raw.to_vec();
    };
    parts.fields.sort_by_key(|field| {
        let name = field.split(|&b| b == b':').next().unwrap_or_default();
        name.to_ascii_lowercase()
    });
    parts.join()
}

/// A request with a complete head, in pieces.
struct Parts<'a> {
    line: &'a [u8],
    /// Each field line without its CRLF.
    fields: Vec<Vec<u8>>,
    body: &'a [u8],
}

impl<'a> Parts<'a> {
    fn split(raw: &'a [u8]) -> Option<Parts<'a>> {
        let head_len = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let mut lines = Vec::new();
        let mut rest = &raw[..head_len];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            lines.push(rest[..end].to_vec());
            rest = &rest[end + 2..];
        }
        lines.push(rest.to_vec());
        let line_len = lines.remove(0).len();
        Some(Parts {
            line: &raw[..line_len],
            fields: lines,
            body: &raw[head_len + 4..],
        })
    }

    fn join(&self) -> Vec<u8> {
        let mut out = self.line.to_vec();
        for field in &self.fields {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(field);
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(self.body);
        out
    }
}

fn is_generated_id(value: &[u8]) -> bool {
    let hex = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_hexdigit);
    match value.iter().position(|&b| b == b'-') {
        Some(dash) => dash == 8 && hex(&value[..dash]) && hex(&value[dash + 1..]),
        None => false,
    }
}
