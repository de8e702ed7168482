//! The request handler of the data plane: probe → route → forward → respond.
//!
//! Each step that can refuse a request returns a [`ProxyError`], turned into a
//! response in one place (`error.rs`). Bodies are streamed in both directions;
//! the in-flight count and the request metrics are released when the response
//! body ends or is abandoned, not when this function returns.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::admission::Rejection;
use crate::cache::Lookup;
use crate::forward::routes::Route;
use crate::forward::state::{ClassLabel, Shared};
use crate::http::body::{full, BoxError, OnEnd, Prepend, ProxyBody, WatchedBody};
use crate::http::error::{ProxyError, UpstreamErrorKind};
use crate::http::headers;
use crate::listener::activity::ActiveRequest;
use crate::listener::framing::{FramingVerdicts, Verdict};
use crate::metrics as m;
use crate::upstream::{InflightGuard, Reservation};

/// What the handler knows about the client connection a request arrived on.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as an `X-Forwarded-For` item, formatted once for the connection.
    pub client_address: HeaderValue,
    pub verdicts: FramingVerdicts,
    /// `max_body_bytes` when the connection was accepted.
    pub max_body_bytes: Option<u64>,
}

/// Records the request's metrics when dropped, i.e. when its response body is done.
pub struct RequestDone {
    shared: Arc<Shared>,
    class: ClassLabel,
    status: StatusCode,
    started: Instant,
    _inflight: Option<InflightGuard>,
    /// Keeps the client connection's idle and header timeouts off this request.
    _on_connection: ActiveRequest,
}

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.shared
            .metrics
            .record(self.class, self.status, self.started);
    }
}

/// The body of every response [`handle`] gives: the response's own body, carrying the
/// request's [`RequestDone`] until it ends (no second boxing per response).
pub type HandledBody = OnEnd<ProxyBody, RequestDone>;

/// Handles one request end to end. `on_connection` marks it in flight on its client
/// connection until the response body ends.
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
    on_connection: ActiveRequest,
) -> Response<HandledBody> {
    let started = Instant::now();
    let (class, result) = route_and_forward(&shared, &conn, req).await;
    let (response, inflight) = match result {
        Ok(done) => done,
        Err(error) => {
            if let ProxyError::Upstream { upstream, kind, .. } = &error {
                metrics::counter!(m::UPSTREAM_ERRORS_TOTAL,
                    m::LABEL_UPSTREAM => upstream.clone(), m::LABEL_KIND => kind.as_str())
                .increment(1);
            }
            if matches!(error, ProxyError::BadRequest(_)) {
                metrics::counter!(m::BAD_REQUESTS_TOTAL).increment(1);
            }
            tracing::debug!(%error, "answered by the proxy");
            (error.into_response(), None)
        }
    };
    let (parts, body) = response.into_parts();
    let done = RequestDone {
        shared,
        class,
        status: parts.status,
        started,
        _inflight: inflight,
        _on_connection: on_connection,
    };
    Response::from_parts(parts, OnEnd::new(body, done))
}

type Forwarded = (Response<ProxyBody>, Option<InflightGuard>);

async fn route_and_forward(
    shared: &Arc<Shared>,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> (ClassLabel, Result<Forwarded, ProxyError>) {
    if req.version() <= Version::HTTP_11 {
        if let Verdict::Ambiguous(why) = conn.verdicts.next_request() {
            return (
                ClassLabel::None,
                Err(ProxyError::BadRequest(why.to_string())),
            );
        }
    }
    // A declared length over the limit is refused before anything is read or forwarded.
    let declared = req.body().size_hint().lower();
    if let Some(limit) = conn.max_body_bytes.filter(|limit| declared > *limit) {
        let declared = Some(declared);
        return (
            ClassLabel::None,
            Err(ProxyError::PayloadTooLarge { limit, declared }),
        );
    }
    let generation = shared.generation.load();
    let path = req.uri().path();
    if generation
        .config
        .server
        .probe_paths
        .iter()
        .any(|p| p == path)
    {
        return (ClassLabel::None, Ok((probe(shared), None)));
    }
    let host = request_host(&req).unwrap_or_default();
    let Some(route) = generation.routes.find(host, path) else {
        let error = ProxyError::NoRoute {
            host: host.to_string(),
            path: path.to_string(),
        };
        return (ClassLabel::None, Err(error));
    };
    let route = route.clone();
    drop(generation);
    let class = ClassLabel::Route(route.class);
    let mut pending = None;
    if let Some(cache) = &route.http_cache {
        match cache.lookup(&req, host).await {
            Lookup::Respond(response) => return (class, Ok((response, None))),
            Lookup::Forward(p) => pending = Some(p),
        }
    }
    // The host as the header value sent on. It came from the `Host` header unless the
    // request target carried an authority; the header's value is reused without a copy.
    let host = match req.uri().authority() {
        _ if host.is_empty() => None,
        None => req.headers().get(header::HOST).cloned(),
        Some(_) => HeaderValue::from_str(host).ok(),
    };
    let mut req = req;
    if let Some(p) = &mut pending {
        p.prepare(req.headers_mut());
    }
    let reservation = match admit(&route).await {
        Ok(reservation) => reservation,
        Err(error) => {
            let stale = matches!(error, ProxyError::Shed { .. })
                .then(|| pending.as_ref().and_then(|p| p.stale_on_shed()))
                .flatten();
            return match stale {
                Some(response) => (class, Ok((response, None))),
                None => (class, Err(error)),
            };
        }
    };
    let result = forward(&route, reservation, conn, req, host).await;
    match (result, pending) {
        (Ok((response, inflight)), Some(p)) => (class, Ok((p.finish(response), inflight))),
        (result, _) => (class, result),
    }
}

/// Admission: shed (429) or queue (critical) by the upstream's utilisation.
async fn admit(route: &Route) -> Result<Reservation, ProxyError> {
    let upstream = &route.upstream;
    let decided = upstream
        .admission
        .admit(route.class, route.threshold, &route.counters, upstream)
        .await;
    decided.map_err(|rejection| match rejection {
        Rejection::Shed {
            class,
            signal,
            threshold,
            retry_after,
        } => ProxyError::Shed {
            upstream: upstream.name.clone(),
            class,
            utilisation: signal.utilisation,
            threshold,
            signal: signal.source.as_str(),
            retry_after,
        },
        Rejection::QueueFull {
            signal,
            retry_after,
        } => ProxyError::Overloaded {
            upstream: upstream.name.clone(),
            utilisation: signal.utilisation,
            why: "the critical queue is full",
            retry_after,
        },
        Rejection::QueueTimeout {
            signal,
            retry_after,
            predicted,
        } => ProxyError::Overloaded {
            upstream: upstream.name.clone(),
            utilisation: signal.utilisation,
            why: if predicted {
                "the critical queue drains too slowly to serve this request within its timeout"
            } else {
                "no slot freed within the critical queue timeout"
            },
            retry_after,
        },
    })
}

/// The answer to a probe on the data port: 200 while serving, 503 while draining.
fn probe(shared: &Shared) -> Response<ProxyBody> {
    metrics::counter!(m::PROBES_TOTAL).increment(1);
    let draining = shared.draining.load(Ordering::Relaxed);
    let (status, body) = if draining {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"status\":\"DRAINING\"}\n",
        )
    } else {
        (StatusCode::OK, "{\"status\":\"UP\"}\n")
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The request's host: the `Host` header (HTTP/1) or the URI authority (HTTP/2).
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

async fn forward(
    route: &Route,
    reservation: Reservation,
    conn: &ConnInfo,
    req: Request<Incoming>,
    host: Option<HeaderValue>,
) -> Result<Forwarded, ProxyError> {
    let upstream = &route.upstream;
    let upstream_error =
        |backend: &str, kind: UpstreamErrorKind, detail: String| ProxyError::Upstream {
            upstream: upstream.name.clone(),
            backend: backend.to_string(),
            kind,
            detail,
        };
    let Some(backend) = upstream.pick() else {
        return Err(upstream_error(
            "-",
            UpstreamErrorKind::NoHealthyBackend,
            "no backend passes its health check".to_string(),
        ));
    };

    let (mut parts, body) = req.into_parts();
    let received = parts.version;

    // Read the first body frame before anything is sent upstream, so a request with
    // broken chunk framing gets a 400 and the backend never sees it. A request without
    // a body needs none of this, nor the watch: there is nothing to go wrong.
    let (body, client_body) = if body.is_end_stream() {
        (crate::http::body::empty(), None)
    } else {
        let mut body = body;
        let first = match body.frame().await {
            Some(Ok(frame)) => Some(frame),
            Some(Err(e)) => {
                return Err(ProxyError::BadRequest(format!(
                    "malformed request body: {e}"
                )));
            }
            None => None,
        };
        let body = Prepend::new(first, body).map_err(BoxError::from);
        let (body, watch) = WatchedBody::new(body, conn.max_body_bytes);
        (body.boxed_unsync(), Some(watch))
    };

    // HTTP/1.1 to an origin: `/path?query` on the request line.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path_and_query);
    }
    parts.version = Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers);
    // The client's body is already on its way; a 100-continue handshake with the
    // backend would only add a round trip.
    parts.headers.remove(header::EXPECT);
    if let Some(value) = &host {
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, value.clone());
        }
    }
    headers::add_forwarded(&mut parts.headers, &conn.client_address, host);
    headers::append_via(&mut parts.headers, received);

    let inflight_at_start = upstream.inflight();
    let inflight = reservation.bind(&backend);
    let request = Request::from_parts(parts, body);
    let sent = Instant::now();
    let result = upstream.send(&backend, request).await;
    let dropped = matches!(&result, Err(e) if e.kind == UpstreamErrorKind::HeaderTimeout);
    upstream
        .admission
        .on_response(sent.elapsed(), inflight_at_start, dropped);
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            return Err(match client_body.and_then(|watch| watch.fault()) {
                Some(fault) => ProxyError::from_client_body(fault, &error.detail),
                None => upstream_error(&backend.authority, error.kind, error.detail),
            });
        }
    };

    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::append_via(&mut parts.headers, Version::HTTP_11);
    Ok((Response::from_parts(parts, body), Some(inflight)))
}
