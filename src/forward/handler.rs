//! The request handler of the data plane, as stages over one request:
//! framing check → meaning (host and path normalised) → probe → route → cache →
//! body read ahead → admission → forward → respond.
//!
//! Each stage passes the request on, answers it, or refuses it with a
//! [`ProxyError`], which `http/error.rs` turns into a response in one place. The
//! request's [`RequestDone`] guard travels with it: routing names its route,
//! admission hands it the reservation, and it rides on the response body, so the
//! in-flight count and the request metrics are released when the body ends or is
//! abandoned, not when this function returns. When the access log is on, the guard also
//! carries the request's [`Record`], which each stage fills in (route, admission,
//! backend, cache) and which is logged with the guard. Bodies stream in both directions.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access_log::Record;
use crate::admission::{Decision, Rejection};
use crate::cache::{self, Finished, Lookup};
use crate::forward::meaning::{settle_meaning, Meaning};
use crate::forward::read_ahead::{read_ahead, ClientBody};
use crate::forward::record::{arriving, note, note_backend, own_cache_status};
use crate::forward::routes::Route;
use crate::forward::state::{Generation, Shared};
use crate::http::body::{full, take_ready, BodyWatch, BoxError, ProxyBody, UploadPace};
use crate::http::error::{ProxyError, UpstreamErrorKind};
use crate::http::{headers, rewrite};
use crate::listener::activity::ActiveRequest;
use crate::listener::framing::{FramingVerdicts, Verdict};
use crate::metrics as m;
use crate::metrics::Label as _;
use crate::upstream::{Fallback, OnInformational, Reservation};

/// What the handler knows about the client connection a request arrived on.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as an `X-Forwarded-For` item, formatted once for the connection.
    pub client_address: HeaderValue,
    pub verdicts: FramingVerdicts,
    /// Where a backend's interim (1xx) responses go on to an HTTP/1.1 client: the
    /// connection's [`Interim`](crate::listener::interim::Interim) queue, behind a callback
    /// made once per connection.
    pub interim: OnInformational,
    /// `max_body_bytes` when the connection was accepted.
    pub max_body_bytes: Option<u64>,
    /// `request_buffer_bytes` when the connection was accepted.
    pub request_buffer_bytes: usize,
    /// The upload pace request bodies are held to.
    pub upload: UploadPace,
    /// The peer is one of `trusted_proxies`: its forwarding headers are believed.
    pub trusted: bool,
    /// The TLS session, for a connection that came in over TLS.
    pub tls: Option<std::sync::Arc<crate::listener::tls::TlsInfo>>,
    /// The port the connection came in on: `X-Forwarded-Port` when the request names no host.
    pub local_port: u16,
    /// `forwarded` when the connection was accepted: whether an RFC 7239 element is added.
    pub forwarded: crate::config::ForwardedHeader,
    /// Where a request answered 101 leaves its tunnel for the connection task.
    pub tunnel: crate::listener::tunnel::TunnelSlot,
}

/// One request's completion: records its metrics and frees its upstream slot when
/// dropped, i.e. when its response body is done. The stages fill it in as the request
/// goes: routing sets the route, admission the reservation.
pub struct RequestDone {
    shared: Arc<Shared>,
    status: StatusCode,
    started: Instant,
    reservation: Option<Reservation>,
    /// The route matched: its request series count the request, and its response
    /// header rules apply to every answer on it. `None`: counted as route `none`.
    route: Option<Arc<Route>>,
    /// Keeps the client connection's idle and header timeouts off this request.
    _on_connection: ActiveRequest,
    /// The access log's record of the request; `None` when the log is off.
    log: Option<Box<Record>>,
    /// The request body's watch, once it is read: the bytes read from the client.
    body: Option<Arc<BodyWatch>>,
    /// Response body bytes handed to the client's connection.
    bytes_out: u64,
    /// The response body came to its end (rather than being dropped unfinished).
    ended: bool,
}

impl Drop for RequestDone {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        match &self.route {
            Some(route) => {
                route.metrics.record(self.status, elapsed);
                // The live view's per-second latency figures.
                route.latency.record(elapsed);
            }
            None => self.shared.metrics.record(self.status, elapsed),
        }
        if let Some(mut log) = self.log.take() {
            log.status = self.status.as_u16();
            log.duration = elapsed;
            log.bytes_in = self.body.as_ref().map_or(0, |watch| watch.bytes_read());
            log.bytes_out = self.bytes_out;
            log.completed = self.ended;
            self.shared.access_log.log(*log);
        }
    }
}

pin_project_lite::pin_project! {
    /// The body of every response [`handle`] gives: the response's own body, carrying the
    /// request's [`RequestDone`] until it ends or is dropped, and counting the bytes
    /// handed on (no second boxing per response).
    pub struct HandledBody {
        #[pin]
        inner: ProxyBody,
        done: Option<RequestDone>,
    }
}

impl HandledBody {
    fn new(inner: ProxyBody, mut done: RequestDone) -> HandledBody {
        // A body that is empty from the start is never polled.
        done.ended |= inner.is_end_stream();
        HandledBody {
            inner,
            done: Some(done),
        }
    }
}

impl Body for HandledBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(done) = this.done.as_mut() {
                    done.bytes_out += frame.data_ref().map_or(0, |data| data.len() as u64);
                    // A body that knows it is done is not polled again.
                    done.ended |= this.inner.is_end_stream();
                }
            }
            Poll::Ready(None) => {
                if let Some(mut done) = this.done.take() {
                    done.ended = true;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.done.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Handles one request end to end. `on_connection` marks it in flight on its client
/// connection until the response body ends.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
    on_connection: ActiveRequest,
) -> Response<HandledBody> {
    let log = shared
        .access_log
        .include_query()
        .map(|include_query| arriving(&conn, &req, include_query));
    // hyper sends no body with these, whatever the response's body holds.
    let head = req.method() == Method::HEAD;
    let mut done = RequestDone {
        shared: shared.clone(),
        status: StatusCode::OK,
        started: Instant::now(),
        reservation: None,
        route: None,
        _on_connection: on_connection,
        log,
        body: None,
        bytes_out: 0,
        ended: false,
    };
    let mut response = match serve(&shared, &conn, req, &mut done).await {
        Ok(response) => response,
        Err(error) => refusal(error),
    };
    // On the way out, so answers from the cache and the proxy's own refusals on the
    // route get them too, and a reload changes them at once.
    if let Some(route) = done.route.as_ref() {
        if !route.rewrite.response_headers.is_empty() {
            rewrite::apply(&route.rewrite.response_headers, response.headers_mut());
        }
    }
    done.status = response.status();
    let bodiless = head || matches!(response.status().as_u16(), 100..=199 | 204 | 304);
    done.ended = bodiless;
    note(&mut done.log, |log| {
        log.cache = own_cache_status(response.headers());
    });
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, HandledBody::new(body, done))
}

/// The stages, in order. Each `?` is a refusal; each early `return Ok` an answer given
/// without the backend.
async fn serve(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    done: &mut RequestDone,
) -> Result<Response<ProxyBody>, ProxyError> {
    check_framing(conn, &req)?;
    let generation = shared.generation.load();
    let meaning = settle_meaning(&mut req, generation.config.server.underscores_in_headers)?;
    if is_probe(&generation, &meaning, &req) {
        return Ok(probe(shared));
    }
    let routed = find_route(&generation, meaning, &req)?;
    drop(generation);
    let route = &routed.route;
    done.route = Some(route.clone());
    // A WebSocket handshake goes to the backend with its Upgrade, past the cache.
    let upgrade = take_upgrade(route, &mut req);
    note(&mut done.log, |log| {
        log.route = Some(route.name.clone());
        log.upstream = Some(route.upstream.name.clone());
        log.class = Some(route.class.as_str());
    });

    let mut pending = None;
    // A revalidation may have to be sent again without validators: its head is kept.
    let mut head_for_refetch = None;
    if let Some(cache) = route.http_cache.as_ref().filter(|_| upgrade.is_none()) {
        match cache.lookup(&req, &routed.host).await {
            Lookup::Respond(response) => return Ok(response),
            Lookup::Revalidate(stale, p) => {
                let head = (req.uri().clone(), req.version());
                let background = revalidate_in_background(routed.clone(), conn.clone(), head, p);
                tokio::spawn(background);
                return Ok(stale);
            }
            Lookup::Forward(mut p) => {
                if p.revalidates() {
                    head_for_refetch = Some((req.uri().clone(), req.version()));
                }
                p.prepare(req.headers_mut());
                pending = Some(p);
            }
        }
    }

    let req = read_ahead(conn, req).await?;
    done.body = req.body().watch.clone();
    let (decision, admitted) = admit(route).await;
    note(&mut done.log, |log| log.admission = Some(decision.as_str()));
    let reservation = match admitted {
        Ok(reservation) => done.reservation.insert(reservation),
        // A shed request is answered from a stale copy when the cache allows it.
        Err(error @ ProxyError::Shed { .. }) => {
            let stale = pending.as_ref().and_then(|p| p.stale_on_shed());
            return stale.ok_or(error);
        }
        Err(error) => return Err(error),
    };

    // With a stored copy to answer if the backend fails, an unreachable backend is given
    // up on at once rather than after every connect retry.
    let fallback = match &pending {
        Some(p) if p.has_stale_if_error() => Fallback::StoredCopy,
        _ => Fallback::None,
    };
    let asked = Instant::now();
    let forwarded = forward(&routed, reservation, conn, req, fallback).await;
    note_backend(&mut done.log, reservation, asked);
    // The origin failed: a stored copy within its stale-if-error window answers instead.
    let origin_failed = match &forwarded {
        Err(error) => matches!(error, ProxyError::Upstream { .. }),
        Ok((response, _)) => matches!(response.status().as_u16(), 500 | 502 | 503 | 504),
    };
    if origin_failed {
        if let Some(stale) = pending.as_ref().and_then(|p| p.stale_if_error()) {
            if let Err(error) = &forwarded {
                count_upstream_error(error);
            }
            return Ok(stale);
        }
    }
    let (mut response, mut backend_done) = forwarded?;
    if let Some(client) = upgrade {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return switch(conn, &route.upstream, client, response, done).await;
        }
        // Refused or not understood: an ordinary response, and the connection stays HTTP.
        count_upgrade(&route.upstream, "declined");
    }
    let mut drain = None;
    if let Some(p) = pending {
        let finished = match p.finish(response) {
            Finished::Refetch(mut p) => {
                let head = head_for_refetch.expect("only a revalidation is refetched");
                let mut again = bodiless(head, p.client_headers().clone());
                p.prepare(again.headers_mut());
                let asked = Instant::now();
                // Boxed: a refetch is rare, and its future inline would make every
                // request's future (moved into a box once per request) ~1 KiB larger.
                let forwarded =
                    Box::pin(forward(&routed, reservation, conn, again, Fallback::None)).await;
                note_backend(&mut done.log, reservation, asked);
                let (response, done_again) = forwarded?;
                backend_done = done_again;
                p.finish(response)
            }
            finished => finished,
        };
        response = match finished {
            Finished::Answer(response) => response,
            Finished::AnswerAndDrain(response, body) => {
                drain = Some(body);
                response
            }
            Finished::Refetch(_) => unreachable!("a plain fetch is never refetched"),
        };
    }
    if let Some(drain) = drain {
        // The client has its 304, but the backend is still sending the full response
        // into the store: the request keeps its backend slot until that ends.
        let reservation = done.reservation.take();
        tokio::spawn(async move {
            drain.run().await;
            drop(reservation);
        });
    } else if backend_done {
        // The whole response is here: the backend's worker is free, whatever pace the
        // client reads at, so the request no longer counts against the upstream.
        done.reservation = None;
    }
    Ok(response)
}

/// The protocol a WebSocket opening handshake asks the backend to switch to, kept on the
/// request for [`forward`].
#[derive(Clone)]
struct UpgradeTo(HeaderValue);

/// A WebSocket opening handshake (an HTTP/1.1 GET with `Connection: upgrade` and
/// `Upgrade: websocket`) on a route that proxies them: the client's side of the switch,
/// taken from the request, which is marked to keep its `Upgrade` when forwarded. `None`
/// for any other request; on a route with `websocket = false` the handshake goes on as a
/// plain GET, its `Upgrade` stripped like any hop-by-hop field (RFC 9110 §7.8 lets a
/// server ignore it), and the backend's answer is what the client gets.
fn take_upgrade(route: &Route, req: &mut Request<Incoming>) -> Option<hyper::upgrade::OnUpgrade> {
    if req.version() != Version::HTTP_11 || req.method() != Method::GET {
        return None;
    }
    let protocol = headers::websocket_upgrade(req.headers())?;
    if !route.websocket {
        count_upgrade(&route.upstream, "disabled");
        return None;
    }
    let client = hyper::upgrade::on(&mut *req);
    req.extensions_mut().insert(UpgradeTo(protocol));
    Some(client)
}

/// The backend's `101 Switching Protocols` to a WebSocket handshake, passed on to the
/// client. Its socket and the client's are left to the connection task to splice once the
/// 101 is written (`listener/tunnel.rs`), and the client IO stops treating bytes as HTTP.
/// The request stops counting against the upstream now: a backend serves an open
/// WebSocket without a worker (Tomcat's NIO connector parks it), so counting tunnels as
/// in flight would shed real requests.
async fn switch(
    conn: &ConnInfo,
    upstream: &crate::upstream::Upstream,
    client: hyper::upgrade::OnUpgrade,
    mut response: Response<ProxyBody>,
    done: &mut RequestDone,
) -> Result<Response<ProxyBody>, ProxyError> {
    // The pool left the backend's connection on the 101 response.
    let slot = response
        .extensions_mut()
        .remove::<crate::upstream::UpgradedSlot>();
    let Some(backend) = slot.and_then(|slot| slot.take()) else {
        count_upgrade(upstream, "failed");
        return Err(ProxyError::Upstream {
            upstream: upstream.name.clone(),
            backend: "-".to_string(),
            kind: UpstreamErrorKind::Protocol,
            detail: "the backend's 101 could not be taken over: its connection had ended"
                .to_string(),
        });
    };
    done.reservation = None;
    conn.verdicts.upgraded();
    let tunnel = crate::listener::tunnel::Tunnel::new(client, backend, &upstream.name);
    conn.tunnel.put(tunnel);
    count_upgrade(upstream, "switched");
    Ok(response)
}

/// Counts a WebSocket handshake in `loadgate_upgrades_total`.
fn count_upgrade(upstream: &crate::upstream::Upstream, outcome: &'static str) {
    metrics::counter!(m::UPGRADES_TOTAL,
        m::LABEL_UPSTREAM => upstream.name.clone(), m::LABEL_OUTCOME => outcome)
    .increment(1);
}

/// A GET the cache sends on its own (a refetch, a background revalidation): the
/// client's target and headers, no body.
fn bodiless((uri, version): (Uri, Version), headers: http::HeaderMap) -> Request<ClientBody> {
    let mut req = Request::new(ClientBody {
        body: crate::http::body::empty(),
        watch: None,
    });
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    req
}

/// How long a background revalidation may take to read its response into the store.
const BACKGROUND_BODY_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Revalidates a stale entry after its client was answered with it
/// (stale-while-revalidate): admitted like any request and skipped when it would be
/// shed or queued past its timeout, bounded by the upstream's timeouts, and its
/// response body read into the store within [`BACKGROUND_BODY_LIMIT`].
async fn revalidate_in_background(
    routed: Routed,
    conn: ConnInfo,
    (uri, version): (Uri, Version),
    pending: Box<cache::Pending>,
) {
    let (_, Ok(mut reservation)) = admit(&routed.route).await else {
        return;
    };
    let mut pending = *pending;
    // At most twice: a 304 for another ETag is fetched again, once (`Finished::Refetch`).
    for _ in 0..2 {
        let mut req = bodiless((uri.clone(), version), pending.client_headers().clone());
        pending.prepare(req.headers_mut());
        // The client has its copy already: a backend that cannot be reached is not
        // retried for a revalidation nobody waits on.
        let forwarded = forward(&routed, &mut reservation, &conn, req, Fallback::StoredCopy);
        let Ok((response, _)) = forwarded.await else {
            return;
        };
        match pending.finish(response) {
            Finished::Answer(response) => {
                let stored = response.into_body().collect();
                let _ = tokio::time::timeout(BACKGROUND_BODY_LIMIT, stored).await;
                return;
            }
            Finished::AnswerAndDrain(_, drain) => return drain.run().await,
            Finished::Refetch(again) => pending = again,
        }
    }
}

/// A refusal as the client sees it, counted and logged at debug.
fn refusal(error: ProxyError) -> Response<ProxyBody> {
    count_upstream_error(&error);
    if matches!(
        error,
        ProxyError::BadRequest(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::MethodNotAllowed { .. }
    ) {
        metrics::counter!(m::BAD_REQUESTS_TOTAL).increment(1);
    }
    tracing::debug!(%error, "answered by the proxy");
    error.into_response()
}

/// Counts a failed upstream exchange in `loadgate_upstream_errors_total`, whether the
/// client got the error or a stale copy instead.
fn count_upstream_error(error: &ProxyError) {
    if let ProxyError::Upstream { upstream, kind, .. } = error {
        metrics::counter!(m::UPSTREAM_ERRORS_TOTAL,
            m::LABEL_UPSTREAM => upstream.clone(), m::LABEL_KIND => kind.as_str())
        .increment(1);
    }
}

/// Refuses an HTTP/1 request whose raw bytes framed it ambiguously, and a declared
/// length over the limit, before anything is read or forwarded.
fn check_framing(conn: &ConnInfo, req: &Request<Incoming>) -> Result<(), ProxyError> {
    if req.version() <= Version::HTTP_11 {
        match conn.verdicts.next_request() {
            Verdict::Ok => {}
            Verdict::Ambiguous(why) => return Err(ProxyError::BadRequest(why.to_string())),
            Verdict::Unsupported(why) => return Err(ProxyError::NotImplemented(why.to_string())),
        }
    }
    let declared = req.body().size_hint().lower();
    if let Some(limit) = conn.max_body_bytes.filter(|limit| declared > *limit) {
        let declared = Some(declared);
        return Err(ProxyError::PayloadTooLarge { limit, declared });
    }
    Ok(())
}

fn is_probe<B>(generation: &Generation, meaning: &Meaning, req: &Request<B>) -> bool {
    let path = meaning.route_path(req);
    generation
        .config
        .server
        .probe_paths
        .iter()
        .any(|p| p == path)
}

/// A request matched to its route.
#[derive(Clone)]
struct Routed {
    route: Arc<Route>,
    /// The normalised host it was routed on, as forwarded in `X-Forwarded-Host`; empty
    /// when the request named none.
    host: String,
}

fn find_route<B>(
    generation: &Generation,
    meaning: Meaning,
    req: &Request<B>,
) -> Result<Routed, ProxyError> {
    let name = meaning.host.as_ref().map_or("", |h| h.name());
    let path = meaning.route_path(req);
    let Some(route) = generation.routes.find(name, path) else {
        return Err(ProxyError::NoRoute {
            host: name.to_string(),
            path: path.to_string(),
        });
    };
    Ok(Routed {
        route: route.clone(),
        host: meaning.host.map(|h| h.authority).unwrap_or_default(),
    })
}

/// Admission: shed (429) or queue (critical) by the upstream's utilisation. Says how the
/// request was admitted or refused, for the access log.
async fn admit(route: &Route) -> (Decision, Result<Reservation, ProxyError>) {
    let upstream = &route.upstream;
    let decided = upstream
        .admission
        .admit_decided(route.class, route.threshold, &route.counters, upstream)
        .await;
    match decided {
        Ok((reservation, decision)) => (decision, Ok(reservation)),
        Err(rejection) => (rejection.decision(), Err(refused(route, rejection))),
    }
}

/// The error a refusal by admission is answered with.
fn refused(route: &Route, rejection: Rejection) -> ProxyError {
    let upstream = &route.upstream;
    match rejection {
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
    }
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

/// The route's rewrites of the request to the backend (`http/rewrite.rs`): its prefix
/// stripped from the path (parameters and query kept), `X-Forwarded-Prefix`, then its
/// request header rules, last, so that they can override loadgate's own forwarding
/// headers. Returns the prefix stripped, if any.
fn rewrite_request<'r>(
    route: &'r Route,
    parts: &mut http::request::Parts,
    trusted: bool,
) -> Result<Option<&'r str>, ProxyError> {
    let mut stripped = None;
    if route.rewrite.strip_path_prefix {
        let prefix = rewrite::stripped_prefix(route.path_prefix());
        if let Some(path) = rewrite::strip_path(parts.uri.path(), prefix) {
            let target = match parts.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            parts.uri = Uri::try_from(target)
                .map_err(|_| ProxyError::BadRequest("an invalid request target".to_string()))?;
            stripped = Some(prefix);
        }
    }
    rewrite::forwarded_prefix(&mut parts.headers, stripped, trusted);
    rewrite::apply(&route.rewrite.request_headers, &mut parts.headers);
    Ok(stripped)
}

/// Puts a backend's `Location` back under the prefix its route stripped
/// ([`rewrite::location_under_prefix`]), when the route does so.
fn rewrite_location(route: &Route, stripped: &str, host: &str, headers: &mut http::HeaderMap) {
    if !route.rewrite.rewrite_location {
        return;
    }
    let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    if let Some(value) = rewrite::location_under_prefix(location, stripped, host)
        .and_then(|location| HeaderValue::from_str(&location).ok())
    {
        headers.insert(header::LOCATION, value);
    }
}

/// Response bytes already arrived with the head that are taken at once, so a small
/// response frees its backend however slowly the client reads ([`take_ready`]).
const RESPONSE_READ_AHEAD: usize = 64 * 1024;

/// Sends the request to a backend of the route's upstream and streams the response
/// back; true when the whole response body has arrived already. `reservation` is the
/// request's slot, bound here to the backend picked.
async fn forward(
    routed: &Routed,
    reservation: &mut Reservation,
    conn: &ConnInfo,
    req: Request<ClientBody>,
    fallback: Fallback,
) -> Result<(Response<ProxyBody>, bool), ProxyError> {
    let upstream = &routed.route.upstream;
    let (mut parts, ClientBody { body, watch }) = req.into_parts();
    let received = parts.version;

    parts.version = Version::HTTP_11;
    // The forwarding fields below add up to seven: room for them at once, rather than the
    // map growing as they come. (On a kept-alive HTTP/1 connection the map is the previous
    // response's, which has that room already: see the pool's `RESPONSE_MAP_ROOM`.)
    parts.headers.reserve(7);
    headers::strip_hop_by_hop(&mut parts.headers);
    let upgrading = parts
        .extensions
        .remove::<UpgradeTo>()
        .is_some_and(|UpgradeTo(protocol)| {
            headers::keep_upgrade(&mut parts.headers, protocol);
            true
        });
    // The client's body is already on its way; a 100-continue handshake with the
    // backend would only add a round trip.
    parts.headers.remove(header::EXPECT);
    // `Host` was set when the request's meaning was settled.
    let host = (!routed.host.is_empty())
        .then(|| parts.headers.get(header::HOST).cloned())
        .flatten();
    let hop = headers::Hop {
        client: &conn.client_address,
        peer: conn.peer.ip(),
        tls: conn.tls.is_some(),
        local_port: conn.local_port,
        trusted: conn.trusted,
        forwarded: conn.forwarded == crate::config::ForwardedHeader::On,
    };
    headers::add_forwarded(&mut parts.headers, &hop, host);
    headers::append_via(&mut parts.headers, received);
    let stripped = rewrite_request(&routed.route, &mut parts, conn.trusted)?;

    let inflight_at_start = upstream.inflight();
    let request = Request::from_parts(parts, body);
    // A backend's 103 Early Hints (or 102) reaches an HTTP/1.1 client as it comes; an
    // HTTP/1.0 client must not get one (RFC 9110 §15.2), and hyper's HTTP/2 server
    // cannot send one. Never stored: only the final response reaches the cache.
    let informational = (received == Version::HTTP_11).then_some(&conn.interim);
    let sent = Instant::now();
    let result = upstream
        .forward(reservation, request, fallback, informational)
        .await;
    let kind = result.as_ref().err().map(|(error, _)| error.kind);
    if kind != Some(UpstreamErrorKind::NoHealthyBackend) {
        let dropped = kind == Some(UpstreamErrorKind::HeaderTimeout);
        upstream
            .admission
            .on_response(sent.elapsed(), inflight_at_start, dropped);
    }
    let response = match result {
        Ok(response) => response,
        Err((error, backend)) => {
            return Err(match watch.and_then(|watch| watch.fault()) {
                Some(fault) => ProxyError::from_client_body(fault, &error.detail),
                None => ProxyError::Upstream {
                    upstream: upstream.name.clone(),
                    backend: backend.map_or_else(|| "-".to_string(), |b| b.authority.clone()),
                    kind: error.kind,
                    detail: error.detail,
                },
            });
        }
    };

    let (mut parts, body) = response.into_parts();
    // Via and X-Request-Id are added to the backend's fields: room for both at once.
    parts.headers.reserve(2);
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrading {
            // The pool took the backend's connection out as for an upgrade; no client
            // can use it, and dropping the response closes it.
            return Err(ProxyError::Upstream {
                upstream: upstream.name.clone(),
                backend: "-".to_string(),
                kind: UpstreamErrorKind::Protocol,
                detail: "101 Switching Protocols to a request that asked for no upgrade"
                    .to_string(),
            });
        }
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut parts.headers);
        let protocol = protocol.unwrap_or(HeaderValue::from_static("websocket"));
        headers::keep_upgrade(&mut parts.headers, protocol);
    } else {
        headers::strip_hop_by_hop(&mut parts.headers);
    }
    headers::append_via(&mut parts.headers, Version::HTTP_11);
    if let Some(stripped) = stripped {
        rewrite_location(&routed.route, stripped, &routed.host, &mut parts.headers);
    }
    // A body that broke off before any of it was read on (cut short, bad chunking) is
    // answered as the failed exchange it is, not with a head and then a cut.
    let (body, ended) =
        take_ready(body, RESPONSE_READ_AHEAD).map_err(|error| ProxyError::Upstream {
            upstream: upstream.name.clone(),
            backend: "-".to_string(),
            kind: UpstreamErrorKind::Protocol,
            detail: format!("the response body broke off: {error}"),
        })?;
    Ok((Response::from_parts(parts, body), ended))
}
