//! The reference reading: what the bytes sent mean under the request rules, read
//! independently of loadgate (httparse, the RFC 9112 framing rules, and only
//! `loadgate::http::target` for the host and path): each request's method, and the
//! target, Host, backend and body it must be forwarded with, or why the rules refuse it.
//! Not for generating the bytes (`generate.rs`) or comparing with what was forwarded
//! (`check.rs`).

use loadgate::http::target;

use crate::hygiene::rig::Backend::{self, Batch, Internal, Public};

/// One request as the reference reads it.
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) method: String,
    /// What it must be forwarded as, or why the rules refuse it.
    pub(super) meaning: Result<Meaning, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Meaning {
    /// The origin-form target: the normalised path and the query as sent.
    pub(super) target: String,
    /// The normalised authority; an absolute-form target's wins over `Host`. `None`
    /// for an HTTP/1.0 request that names none: the backend's address is sent.
    pub(super) host: Option<String>,
    pub(super) backend: Backend,
    pub(super) body: Vec<u8>,
}

pub(super) struct Reading {
    pub(super) requests: Vec<Sent>,
    /// Why the bytes after the last request have no meaning (incomplete, unparseable,
    /// ambiguously framed); `None` when they are used up.
    pub(super) tail: Option<String>,
    /// The methods of the requests read, and of the one in the tail if its head parsed:
    /// a response to `HEAD` has no body.
    pub(super) methods: Vec<String>,
}

impl Reading {
    pub(super) fn is_head(&self, i: usize) -> bool {
        self.methods.get(i).is_some_and(|m| m == "HEAD")
    }
}

pub(super) fn read(bytes: &[u8]) -> Reading {
    let mut requests = Vec::new();
    let mut methods = Vec::new();
    let mut rest = bytes;
    let tail = loop {
        // Empty lines before a request line are skipped (RFC 9112 §2.2).
        if rest.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            break None;
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Request::new(&mut slots);
        let head_len = match head.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => break Some("an incomplete head".to_string()),
            Err(e) => break Some(format!("an unparseable head ({e})")),
        };
        let method = head.method.unwrap_or_default().to_string();
        let http10 = head.version == Some(0);
        methods.push(method.clone());
        let target = head.path.unwrap_or_default().to_string();
        let fields: Vec<(String, String)> = head
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value);
                (
                    h.name.to_ascii_lowercase(),
                    value.trim_matches([' ', '\t']).to_string(),
                )
            })
            .collect();
        let (body, body_len) = match framing(&fields, http10, &rest[head_len..]) {
            Framed::Done { body, len, .. } => (body, len),
            Framed::Incomplete => break Some("an incomplete body".to_string()),
            Framed::Bad(why) => break Some(why),
        };
        let chunked = fields.iter().any(|(n, _)| n == "transfer-encoding");
        let meaning = meaning(&method, &target, http10, &fields, (body, chunked));
        requests.push(Sent { method, meaning });
        rest = &rest[head_len + body_len..];
    };
    Reading {
        requests,
        tail,
        methods,
    }
}

pub(super) enum Framed {
    /// The body, the bytes it took, and the names of its trailer fields.
    Done {
        body: Vec<u8>,
        len: usize,
        trailers: Vec<String>,
    },
    Incomplete,
    Bad(String),
}

/// RFC 9112 §6.3 with the proxy's refusals (rule 6): `Transfer-Encoding` must be
/// `chunked` alone, without `Content-Length`, and not on HTTP/1.0; one `Content-Length`
/// of digits.
fn framing(fields: &[(String, String)], http10: bool, rest: &[u8]) -> Framed {
    let values = |name: &str| -> Vec<&str> {
        fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let te = values("transfer-encoding");
    let cl = values("content-length");
    if !te.is_empty() {
        let codings: Vec<&str> = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let chunked = codings.len() == 1 && codings[0].eq_ignore_ascii_case("chunked");
        if !chunked || !cl.is_empty() || http10 {
            return Framed::Bad(format!(
                "framing Transfer-Encoding {te:?} Content-Length {cl:?}"
            ));
        }
        return dechunk(rest);
    }
    match cl.as_slice() {
        [] => Framed::Done {
            body: Vec::new(),
            len: 0,
            trailers: Vec::new(),
        },
        [v] if !v.is_empty() && v.len() < 19 && v.bytes().all(|b| b.is_ascii_digit()) => {
            let len: usize = v.parse().expect("digits");
            match rest.get(..len) {
                Some(body) => Framed::Done {
                    body: body.to_vec(),
                    len,
                    trailers: Vec::new(),
                },
                None => Framed::Incomplete,
            }
        }
        _ => Framed::Bad(format!("framing Content-Length {cl:?}")),
    }
}

/// A chunked body at the front of `rest`, read the way hyper's decoder reads it: hex
/// size, optional whitespace and extension, CRLF, data, CRLF; after the last chunk,
/// trailer lines up to an empty one.
pub(super) fn dechunk(rest: &[u8]) -> Framed {
    let crlf = |at: usize| match (rest.get(at), rest.get(at + 1)) {
        (Some(b'\r'), Some(b'\n')) => Some(true),
        (None, _) | (Some(b'\r'), None) => None,
        _ => Some(false),
    };
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let start = at;
        let mut size: u64 = 0;
        while let Some(digit) = rest.get(at).and_then(|&b| char::from(b).to_digit(16)) {
            match size
                .checked_mul(16)
                .and_then(|s| s.checked_add(digit.into()))
            {
                Some(s) => size = s,
                None => return Framed::Bad("chunk size overflow".to_string()),
            }
            at += 1;
        }
        if at == start {
            return match rest.get(at) {
                None => Framed::Incomplete,
                Some(_) => Framed::Bad("no chunk size".to_string()),
            };
        }
        while matches!(rest.get(at), Some(b' ' | b'\t')) {
            at += 1;
        }
        if rest.get(at) == Some(&b';') {
            while let Some(&b) = rest.get(at).filter(|&&b| b != b'\r') {
                if b == b'\n' {
                    return Framed::Bad("LF in a chunk extension".to_string());
                }
                at += 1;
            }
        }
        match crlf(at) {
            Some(true) => at += 2,
            Some(false) => return Framed::Bad("chunk size line".to_string()),
            None => return Framed::Incomplete,
        }
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(end) = find(&rest[at..], b"\r\n") else {
                    return Framed::Incomplete;
                };
                let line = String::from_utf8_lossy(&rest[at..at + end]);
                at += end + 2;
                match line.split_once(':') {
                    _ if end == 0 => {
                        return Framed::Done {
                            body,
                            len: at,
                            trailers,
                        }
                    }
                    Some((name, _)) => trailers.push(name.trim().to_ascii_lowercase()),
                    None => return Framed::Bad(format!("trailer line {line:?}")),
                }
            }
        }
        let Some(data) = usize::try_from(size)
            .ok()
            .and_then(|size| rest.get(at..at.checked_add(size)?))
        else {
            return Framed::Incomplete;
        };
        body.extend_from_slice(data);
        at += data.len();
        match crlf(at) {
            Some(true) => at += 2,
            Some(false) => return Framed::Bad("chunk data not ended by CRLF".to_string()),
            None => return Framed::Incomplete,
        }
    }
}

/// The request rules (README "Request rules") for one parsed request.
fn meaning(
    method: &str,
    target: &str,
    http10: bool,
    fields: &[(String, String)],
    (body, chunked): (Vec<u8>, bool),
) -> Result<Meaning, String> {
    if method == "CONNECT" {
        return Err("CONNECT".to_string());
    }
    // hyper cannot send a GET or HEAD body of unknown length: one past the read-ahead
    // buffer (`request_buffer_bytes`, 64 KiB) is refused.
    if chunked && matches!(method, "GET" | "HEAD") && body.len() >= 64 * 1024 {
        return Err("a chunked GET/HEAD body past the read-ahead".to_string());
    }
    if target.contains('#') {
        return Err("a fragment".to_string());
    }
    // Absolute-form: any RFC 3986 scheme (loadgate, like hyper, does not insist on
    // `http`), then the authority up to the path or query.
    let scheme = target.split_once("://").filter(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let (authority, path_and_query) = match scheme {
        Some((_, rest)) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            (Some(&rest[..end]), &rest[end..])
        }
        None if target.starts_with('/') => (None, target),
        None => return Err(format!("target {target:?}")),
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    let hosts: Vec<&str> = fields
        .iter()
        .filter(|(n, _)| n == "host")
        .map(|(_, v)| v.as_str())
        .collect();
    let host = match (authority, hosts.as_slice()) {
        (_, [_, _, ..]) => return Err("two Host lines".to_string()),
        (_, []) if !http10 => return Err("no Host on HTTP/1.1".to_string()),
        (Some(authority), _) => Some(authority),
        (None, [host]) => Some(*host),
        (None, []) => None,
    };
    let host = host
        .map(target::host)
        .transpose()
        .map_err(|e| format!("host: {e}"))?;
    let path = target::path(path).map_err(|e| format!("path: {e}"))?;
    let target = match query {
        Some(query) => format!("{}?{query}", path.forward),
        None => path.forward.to_string(),
    };
    Ok(Meaning {
        target,
        backend: route(host.as_ref().map_or("", |h| h.name()), &path.route),
        host: host.map(|h| h.authority),
        body,
    })
}

/// The rig's route table (see `rig.rs`).
fn route(host: &str, path: &str) -> Backend {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if host == "internal.example" {
        Internal
    } else if under("/checkout") {
        Public
    } else if ["/reports", "/api/reports", "/cart/items"]
        .into_iter()
        .any(under)
    {
        Batch
    } else {
        Public
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
