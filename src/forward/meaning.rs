//! A request's meaning, settled once before routing: the one host and the normal path
//! it is routed, cache-keyed and forwarded on, and the request rewritten to carry them
//! (the rules are in `http/target.rs` and the README's "Request rules").

use std::borrow::Cow;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

use crate::http::error::ProxyError;
use crate::http::target;

/// What a request means, settled once before routing: the host and path it is routed,
/// cache-keyed and forwarded on (see `http/target.rs` for the rules).
pub(super) struct Meaning {
    /// `None` only for an HTTP/1.0 request that named no host.
    pub(super) host: Option<target::Host>,
    /// The normalised path without its segments' parameters, what routes match, when
    /// it differs from the request's (rewritten) path; `None` for most requests.
    pub(super) route_path: Option<String>,
}

impl Meaning {
    /// The path routes match: see [`Meaning::route_path`](Meaning).
    pub(super) fn route_path<'a, B>(&'a self, req: &'a Request<B>) -> &'a str {
        self.route_path.as_deref().unwrap_or(req.uri().path())
    }
}

/// Settles the request's host and path, and rewrites the request to carry them: an
/// origin-form target with the normalised path, and one `Host` field with the
/// normalised host. Drops header names with `_` unless `underscores` allows them.
pub(super) fn settle_meaning<B>(
    req: &mut Request<B>,
    underscores: bool,
) -> Result<Meaning, ProxyError> {
    let bad = |why: &str| ProxyError::BadRequest(why.to_string());
    let refused = |r: target::Refused| ProxyError::BadRequest(r.to_string());
    // A reverse proxy is not a tunnel (RFC 9110 §9.3.6).
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed {
            method: Method::CONNECT.to_string(),
        });
    }

    // An absolute-form target names the resource by URI: this proxy serves http(s) ones.
    if let Some(scheme) = req.uri().scheme_str() {
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(bad("a request target whose scheme is not http or https"));
        }
    }
    // Host: the target's authority (absolute-form, or `:authority` on HTTP/2), else
    // the one `Host` field.
    let mut fields = req.headers().get_all(header::HOST).iter();
    let field = fields.next();
    if fields.next().is_some() {
        return Err(bad("more than one Host field"));
    }
    let field = field
        .map(|v| {
            v.to_str()
                .map_err(|_| bad("a Host field that is not ASCII"))
        })
        .transpose()?;
    let version = req.version();
    let authority = req.uri().authority().map(|a| a.as_str());
    if version == Version::HTTP_11 && field.is_none() {
        return Err(bad("an HTTP/1.1 request without a Host field"));
    }
    let host = match (authority, field) {
        (Some(authority), Some(field)) if version >= Version::HTTP_2 => {
            let (a, f) = (target::host(authority), target::host(field));
            if a.is_err() || a != f {
                return Err(bad(":authority and the Host field differ"));
            }
            a.ok()
        }
        (Some(authority), _) => Some(target::host(authority).map_err(refused)?),
        (None, Some(field)) => Some(target::host(field).map_err(refused)?),
        (None, None) => None,
    };
    // The one Host field sent on: the client's, when it is already the normal form.
    let host_field_is_normal = match (&host, field) {
        (Some(host), Some(field)) => field == host.authority,
        _ => false,
    };

    // Path: normalised, and forwarded in origin-form.
    let uri = req.uri();
    let asterisk = req.method() == Method::OPTIONS && uri.path() == "*";
    let (route_path, rewritten) = if asterisk {
        (None, None)
    } else {
        let path = target::path(uri.path()).map_err(refused)?;
        let rewritten = match (&path.forward, uri.authority(), uri.path_and_query()) {
            (Cow::Borrowed(_), None, _) => None,
            // An HTTP/2 request's target (or an absolute-form one) whose path is already
            // normal: its own path and query, without formatting and parsing them again.
            // (`http://host?q` has an empty path that `path()` reads as `/`.)
            (Cow::Borrowed(forward), Some(_), Some(pq))
                if pq.as_str().starts_with('/') && pq.path() == *forward =>
            {
                Some(Uri::from(pq.clone()))
            }
            (forward, _, _) => {
                let target = match uri.query() {
                    Some(query) => format!("{forward}?{query}"),
                    None => forward.to_string(),
                };
                Some(Uri::try_from(target).map_err(|_| bad("an invalid request target"))?)
            }
        };
        // Routes match the path without parameters; most paths have none.
        let route = (path.route != path.forward).then(|| path.route.into_owned());
        (route, rewritten)
    };
    if let Some(uri) = rewritten {
        *req.uri_mut() = uri;
    }

    let headers = req.headers_mut();
    if let Some(host) = &host {
        if !host_field_is_normal {
            let value =
                HeaderValue::from_str(&host.authority).map_err(|_| bad("an invalid host"))?;
            headers.insert(header::HOST, value);
        }
    }
    // A byte search: `str::contains(char)` sets up a char searcher for every name.
    let has_underscore = |name: &HeaderName| name.as_str().as_bytes().contains(&b'_');
    if !underscores && headers.keys().any(has_underscore) {
        let names: Vec<_> = headers
            .keys()
            .filter(|n| has_underscore(n))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
    Ok(Meaning { host, route_path })
}
