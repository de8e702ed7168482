//! The request handler of the data plane, as stages over one request:
//! framing check → probe → route → cache → admission → forward → respond.
//!
//! Each stage passes the request on, answers it, or refuses it with a
//! [`ProxyError`], which `http/error.rs` turns into a response in one place. The
//! request's [`RequestDone`] guard travels with it: routing names its class,
//! admission hands it the reservation, and it rides on the response body, so the
//! in-flight count and the request metrics are released when the body ends or is
//! abandoned, not when this function returns. Bodies stream in both directions.

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
use crate::forward::state::{ClassLabel, Generation, Shared};
use crate::http::body::{full, BoxError, OnEnd, Prepend, ProxyBody, WatchedBody};
use crate::http::error::{ProxyError, UpstreamErrorKind};
use crate::http::headers;
use crate::listener::activity::ActiveRequest;
use crate::listener::framing::{FramingVerdicts, Verdict};
use crate::metrics as m;
use crate::upstream::Reservation;

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

/// One request's completion: records its metrics and frees its upstream slot when
/// dropped, i.e. when its response body is done. The stages fill it in as the request
/// goes: routing sets the class, admission the reservation.
pub struct RequestDone {
    shared: Arc<Shared>,
    class: ClassLabel,
    status: StatusCode,
    started: Instant,
    reservation: Option<Reservation>,
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
    let mut done = RequestDone {
        shared: shared.clone(),
        class: ClassLabel::None,
        status: StatusCode::OK,
        started: Instant::now(),
        reservation: None,
        _on_connection: on_connection,
    };
    let response = match serve(&shared, &conn, req, &mut done).await {
        Ok(response) => response,
        Err(error) => refusal(error),
    };
    done.status = response.status();
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, OnEnd::new(body, done))
}

/// The stages, in order. Each `?` is a refusal; each early `return Ok` an answer given
/// without the backend.
async fn serve(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
    done: &mut RequestDone,
) -> Result<Response<ProxyBody>, ProxyError> {
    check_framing(conn, &req)?;
    let generation = shared.generation.load();
    if is_probe(&generation, &req) {
        return Ok(probe(shared));
    }
    let routed = find_route(&generation, &req)?;
    drop(generation);
    let route = &routed.route;
    done.class = ClassLabel::Route(route.class);

    let mut req = req;
    let mut pending = None;
    if let Some(cache) = &route.http_cache {
        match cache.lookup(&req, routed.host()).await {
            Lookup::Respond(response) => return Ok(response),
            Lookup::Forward(mut p) => {
                p.prepare(req.headers_mut());
                pending = Some(p);
            }
        }
    }

    let reservation = match admit(route).await {
        Ok(reservation) => done.reservation.insert(reservation),
        // A shed request is answered from a stale copy when the cache allows it.
        Err(error @ ProxyError::Shed { .. }) => {
            let stale = pending.as_ref().and_then(|p| p.stale_on_shed());
            return stale.ok_or(error);
        }
        Err(error) => return Err(error),
    };

    let response = forward(&routed, reservation, conn, req).await?;
    Ok(match pending {
        Some(p) => p.finish(response),
        None => response,
    })
}

/// A refusal as the client sees it, counted and logged at debug.
fn refusal(error: ProxyError) -> Response<ProxyBody> {
    if let ProxyError::Upstream { upstream, kind, .. } = &error {
        metrics::counter!(m::UPSTREAM_ERRORS_TOTAL,
            m::LABEL_UPSTREAM => upstream.clone(), m::LABEL_KIND => kind.as_str())
        .increment(1);
    }
    if matches!(error, ProxyError::BadRequest(_)) {
        metrics::counter!(m::BAD_REQUESTS_TOTAL).increment(1);
    }
    tracing::debug!(%error, "answered by the proxy");
    error.into_response()
}

/// Refuses an HTTP/1 request whose raw bytes framed it ambiguously, and a declared
/// length over the limit, before anything is read or forwarded.
fn check_framing(conn: &ConnInfo, req: &Request<Incoming>) -> Result<(), ProxyError> {
    if req.version() <= Version::HTTP_11 {
        if let Verdict::Ambiguous(why) = conn.verdicts.next_request() {
            return Err(ProxyError::BadRequest(why.to_string()));
        }
    }
    let declared = req.body().size_hint().lower();
    if let Some(limit) = conn.max_body_bytes.filter(|limit| declared > *limit) {
        let declared = Some(declared);
        return Err(ProxyError::PayloadTooLarge { limit, declared });
    }
    Ok(())
}

fn is_probe<B>(generation: &Generation, req: &Request<B>) -> bool {
    let path = req.uri().path();
    generation
        .config
        .server
        .probe_paths
        .iter()
        .any(|p| p == path)
}

/// A request matched to its route.
struct Routed {
    route: Arc<Route>,
    /// The host it was routed on: the target's authority, else the `Host` header,
    /// whose value is reused without a copy. Empty when the request named none.
    host: HeaderValue,
}

impl Routed {
    fn host(&self) -> &str {
        self.host.to_str().unwrap_or_default()
    }
}

fn find_route<B>(generation: &Generation, req: &Request<B>) -> Result<Routed, ProxyError> {
    let host = request_host(req).unwrap_or_default();
    let path = req.uri().path();
    let Some(route) = generation.routes.find(host, path) else {
        return Err(ProxyError::NoRoute {
            host: host.to_string(),
            path: path.to_string(),
        });
    };
    let host = match req.uri().authority() {
        _ if host.is_empty() => HeaderValue::from_static(""),
        None => req
            .headers()
            .get(header::HOST)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("")),
        Some(_) => HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static("")),
    };
    Ok(Routed {
        route: route.clone(),
        host,
    })
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

/// Sends the request to a backend of the route's upstream and streams the response
/// back. `reservation` is the request's slot, bound here to the backend picked.
async fn forward(
    routed: &Routed,
    reservation: &mut Reservation,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let upstream = &routed.route.upstream;
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
    let host = (!routed.host.is_empty()).then(|| routed.host.clone());
    if let Some(value) = &host {
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, value.clone());
        }
    }
    headers::add_forwarded(&mut parts.headers, &conn.client_address, host);
    headers::append_via(&mut parts.headers, received);

    let inflight_at_start = upstream.inflight();
    reservation.bind(&backend);
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
    Ok(Response::from_parts(parts, body))
}
