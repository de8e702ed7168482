//! The upstream connection pool: HTTP/1.1 connections per backend, kept idle for
//! reuse below the backend's keep-alive limits, with connect retries (backoff and
//! jitter) and one retry on a fresh connection when a reused one turns out dead.
//!
//! Not here: choosing the backend or taking it out of rotation (`mod.rs`), health
//! checks (`health.rs`), the response-header timeout (wrapped around [`Pool::send`]).
//!
//! # Idle list: LIFO
//! Each backend's idle connections are a stack: the connection returned last is
//! reused first. The hottest connection is the one least likely to have reached the
//! backend's keep-alive timeout, and the surplus at the bottom of the stack ages out
//! through the idle timeout, so the pool shrinks to what the load needs. FIFO would
//! reuse the longest-idle connection first, the one most likely to be stale, and keep
//! every connection barely alive.
//!
//! # One stack per worker thread
//! A connection is registered with the event loop of the worker thread that opened it
//! (see `server.rs`). Each backend keeps one idle stack per worker thread, and a
//! request only takes connections from its own thread's stack, so a response is read by
//! the same event loop that runs the request: no wake-up crosses threads. A thread that
//! has none opens one; `max_idle` bounds the stacks together.
//!
//! # A connection's life
//! connect (≤ `connect_attempts` tries) → request → response head → body streamed to
//! the caller → at the body's end, back on the idle stack unless the backend said
//! `Connection: close`, the connection reached a learned request limit, or the stack
//! is full. An idle entry older than the idle limit is discarded, never reused; a
//! closed one is discarded when found (checkout or sweep).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// Largest read from a backend connection, and so the largest response chunk. Each
/// read becomes one chunk of the response body, held until the client takes it;
/// hyper's default (~400 KiB) would hold about 1 MiB per slow client (read buffer,
/// chunk in hand, chunk queued); 64 KiB keeps it near 200 KiB at no cost in throughput.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{fmt_duration, Backend, SendError};
use crate::config::RetryConfig;
use crate::http::body::{empty, BoxError, ProxyBody};
use crate::http::error::UpstreamErrorKind;
use crate::metrics as m;

/// The pool's settings, taken from the upstream's config.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    /// Idle connections older than this are discarded (lowered by a learned `Keep-Alive: timeout`).
    pub idle_timeout: Duration,
    /// Idle connections kept per backend; 0 disables reuse.
    pub max_idle: usize,
    pub connect_timeout: Duration,
    pub retry: RetryConfig,
    /// The proxy's worker threads: one idle stack each, plus one for other threads.
    pub workers: usize,
}

/// What the pool has done since it started; the same figures as its metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub opened: u64,
    pub reused: u64,
    pub retired_idle: u64,
    pub retired_max: u64,
    pub closed_by_backend: u64,
    pub discarded: u64,
    pub stale_retried: u64,
    pub stale_not_retryable: u64,
    pub connect_retries: u64,
}

/// A connection event, the `event` label of the connections metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// A new TCP connection was opened.
    Opened,
    /// An idle connection was taken for a request.
    Reused,
    /// Idle longer than the idle limit: closed by us before the backend does.
    RetiredIdle,
    /// Reached the backend's request limit (`Keep-Alive: max`, or a learned one).
    RetiredMax,
    /// The backend closed it, or said it would (`Connection: close`).
    ClosedByBackend,
    /// Not reusable: the idle stack was full, or the response body was not read to its end.
    Discarded,
}

const EVENTS: [Event; 6] = [
    Event::Opened,
    Event::Reused,
    Event::RetiredIdle,
    Event::RetiredMax,
    Event::ClosedByBackend,
    Event::Discarded,
];

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Opened => "opened",
            Event::Reused => "reused",
            Event::RetiredIdle => "retired_idle",
            Event::RetiredMax => "retired_max",
            Event::ClosedByBackend => "closed_by_backend",
            Event::Discarded => "discarded",
        }
    }
}

/// A metric counter with a local copy, so tests and `/status` can read it directly.
struct Count {
    metric: metrics::Counter,
    value: AtomicU64,
}

impl Count {
    fn new(metric: metrics::Counter) -> Count {
        Count {
            metric,
            value: AtomicU64::new(0),
        }
    }

    fn inc(&self) {
        self.metric.increment(1);
        self.value.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

struct Counters {
    events: [Count; EVENTS.len()],
    stale_retried: Count,
    stale_not_retryable: Count,
    connect_retries: Count,
}

impl Counters {
    fn new(upstream: &str) -> Counters {
        let stale = |outcome: &'static str| {
            Count::new(metrics::counter!(m::UPSTREAM_STALE_REUSE_TOTAL,
                m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_OUTCOME => outcome))
        };
        Counters {
            events: EVENTS.map(|event| {
                Count::new(metrics::counter!(m::UPSTREAM_CONNECTIONS_TOTAL,
                    m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_EVENT => event.as_str()))
            }),
            stale_retried: stale("retried"),
            stale_not_retryable: stale("not_retryable"),
            connect_retries: Count::new(metrics::counter!(m::UPSTREAM_CONNECT_RETRIES_TOTAL,
                m::LABEL_UPSTREAM => upstream.to_string())),
        }
    }

    fn event(&self, event: Event) {
        self.events[event as usize].inc();
    }
}

/// The pool of one upstream: one [`Host`] per backend.
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PoolSettings,
    hosts: Vec<Arc<Host>>,
    counters: Counters,
}

/// One backend's idle connections and what the pool has learned about its limits.
struct Host {
    backend: Arc<Backend>,
    idle: IdleStacks,
    /// From `Keep-Alive: timeout=N`, in milliseconds; 0 while unknown.
    learned_timeout_ms: AtomicU64,
    /// Requests per connection after which the backend closes, seen twice in a row; 0 while unknown.
    learned_max: AtomicU32,
    /// The last request count at which the backend closed a connection.
    max_candidate: AtomicU32,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One backend's idle connections: a stack per worker thread, each pushed and popped
/// at the end (LIFO; see the module docs for both choices).
struct IdleStacks {
    /// Indexed by [`crate::listener::workers::worker_index`] modulo the length; slot 0 serves
    /// threads that are not workers (tests, the admin runtime).
    stacks: Box<[Mutex<Vec<Idle>>]>,
    /// Connections on all stacks together.
    count: AtomicUsize,
}

impl IdleStacks {
    /// One stack per worker thread plus the non-worker slot.
    fn new(workers: usize) -> IdleStacks {
        IdleStacks {
            stacks: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
            count: AtomicUsize::new(0),
        }
    }

    /// The calling thread's stack.
    fn mine(&self) -> &Mutex<Vec<Idle>> {
        &self.stacks[crate::listener::workers::worker_index() % self.stacks.len()]
    }

    /// The connection the calling thread returned last.
    fn pop(&self) -> Option<Idle> {
        let popped = lock(self.mine()).pop();
        if popped.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        popped
    }

    /// Keeps `conn` on the calling thread's stack, unless `max` are kept already.
    fn push(&self, conn: Conn, max: usize) -> Result<(), Conn> {
        if self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(conn);
        }
        lock(self.mine()).push(Idle {
            conn,
            since: Instant::now(),
        });
        Ok(())
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Keeps, on every stack, the entries for which `keep` returns true.
    fn retain(&self, mut keep: impl FnMut(&mut Idle) -> bool) {
        for stack in self.stacks.iter() {
            let mut stack = lock(stack);
            let before = stack.len();
            stack.retain_mut(&mut keep);
            self.count
                .fetch_sub(before - stack.len(), Ordering::Relaxed);
        }
    }
}

/// hyper's side of one upstream connection: the future that reads and writes it.
type ConnIo = http1::Connection<TokioIo<TcpStream>, ProxyBody>;

/// One HTTP/1.1 connection. Its I/O future is not spawned: the request using the
/// connection drives it from its own task (while waiting for the response head, then
/// from the response body's `poll_frame` until the body ends), so an exchange never
/// hops between tasks or worker threads. An idle connection is not polled at all; a
/// backend close is seen when it is next checked out (or by the sweep).
struct Conn {
    tx: http1::SendRequest<ProxyBody>,
    /// `None` once the connection has ended (dropping it also fails a request still
    /// queued on `tx`, handing the request back unsent).
    io: Option<Pin<Box<ConnIo>>>,
    /// Requests sent on it so far.
    served: u32,
    /// Further requests the backend allows, from `Keep-Alive: max=N`.
    allowed: Option<u32>,
}

impl Conn {
    /// Drives the connection's I/O; `Ready` once it has ended (closed by either side,
    /// or failed).
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(());
        };
        let result = std::task::ready!(io.as_mut().poll(cx));
        if let Err(error) = result {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
        self.io = None;
        Poll::Ready(())
    }

    fn is_closed(&self) -> bool {
        self.io.is_none() || self.tx.is_closed()
    }
}

impl Host {
    fn idle_limit(&self, configured: Duration) -> Duration {
        let learned = self.learned_timeout_ms.load(Ordering::Relaxed);
        idle_limit(
            configured,
            (learned > 0).then(|| Duration::from_millis(learned)),
        )
    }

    fn learned_max(&self) -> Option<u32> {
        Some(self.learned_max.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// The backend closed a connection after `served` requests: the same count twice
    /// in a row becomes the learned limit (one early close, e.g. after an error, is not).
    fn observe_close_after(&self, served: u32) {
        if served < 2 {
            return;
        }
        if self.max_candidate.swap(served, Ordering::Relaxed) == served {
            self.learned_max.store(served, Ordering::Relaxed);
        }
    }
}

impl Pool {
    pub(crate) fn new(upstream: &str, settings: PoolSettings, backends: &[Arc<Backend>]) -> Pool {
        let hosts = backends
            .iter()
            .map(|backend| {
                Arc::new(Host {
                    backend: backend.clone(),
                    idle: IdleStacks::new(settings.workers),
                    learned_timeout_ms: AtomicU64::new(0),
                    learned_max: AtomicU32::new(0),
                    max_candidate: AtomicU32::new(0),
                })
            })
            .collect();
        Pool {
            inner: Arc::new(Inner {
                settings,
                hosts,
                counters: Counters::new(upstream),
            }),
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        let e = |event: Event| c.events[event as usize].get();
        PoolStats {
            opened: e(Event::Opened),
            reused: e(Event::Reused),
            retired_idle: e(Event::RetiredIdle),
            retired_max: e(Event::RetiredMax),
            closed_by_backend: e(Event::ClosedByBackend),
            discarded: e(Event::Discarded),
            stale_retried: c.stale_retried.get(),
            stale_not_retryable: c.stale_not_retryable.get(),
            connect_retries: c.connect_retries.get(),
        }
    }

    /// Idle connections held right now, over all backends.
    pub(crate) fn idle_count(&self) -> usize {
        self.inner.hosts.iter().map(|h| h.idle.len()).sum()
    }

    /// Drops idle connections past their idle limit or closed by the backend.
    pub(crate) fn sweep(&self) {
        let inner = &self.inner;
        let now = Instant::now();
        for host in &inner.hosts {
            let limit = host.idle_limit(inner.settings.idle_timeout);
            let mut dropped = Vec::new();
            // Idle connections are not polled by anyone; one poll here reads a close
            // from the backend. The waker is a no-op: whoever reuses the connection
            // polls it again with its own.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            host.idle.retain(|entry| {
                let event = if now.duration_since(entry.since) >= limit {
                    Some(Event::RetiredIdle)
                } else if entry.conn.poll_io(&mut cx).is_ready() || entry.conn.is_closed() {
                    Some(Event::ClosedByBackend)
                } else {
                    None
                };
                dropped.extend(event);
                event.is_none()
            });
            for event in dropped {
                inner.counters.event(event);
            }
        }
    }

    /// Spawns the background sweep, every half idle timeout (at least every 50 ms).
    pub(crate) fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let pool = Pool {
            inner: self.inner.clone(),
        };
        let every = (self.inner.settings.idle_timeout / 2).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                pool.sweep();
            }
        })
    }

    /// Sends `req` to `backend` (one of the pool's) and returns the response, its body
    /// streaming, and whether the request went out on a reused connection. The URI is
    /// sent as it is, so it should be in origin form (`/path?query`); without a `Host`
    /// header, the backend's authority is added as one. A reused connection that dies
    /// before any response byte is retried once, on a new connection, if nothing was
    /// written yet or the request is idempotent with an empty body; otherwise the answer
    /// is a [`UpstreamErrorKind::StaleConnection`] error.
    pub(crate) async fn send(
        &self,
        backend: &Arc<Backend>,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<ProxyBody>, bool), SendError> {
        let inner = &self.inner;
        let Some(host) = inner
            .hosts
            .iter()
            .find(|h| Arc::ptr_eq(&h.backend, backend))
        else {
            return Err(SendError {
                kind: UpstreamErrorKind::Protocol,
                detail: format!("{} is not a backend of this upstream", backend.authority),
            });
        };
        if !req.headers().contains_key(header::HOST) {
            if let Some(value) = &backend.host_header {
                req.headers_mut().insert(header::HOST, value.clone());
            }
        }
        let idempotent = inner
            .settings
            .retry
            .idempotent_methods
            .contains(req.method());
        let replay = Replay::of(&req);
        let method = req.method().clone();

        let (conn, reused) = inner.checkout(host).await?;
        let failed = match exchange(conn, req).await {
            Ok((response, conn)) => return Ok((inner.finish(host, conn, response), reused)),
            Err(failed) => failed,
        };
        if !reused || !failed.stale {
            return Err(exchange_error(&failed.error, ""));
        }
        // A reused connection died before a response head: the backend closed it as
        // we reused it (keep-alive timeout or request limit).
        let retry = match (failed.unsent, replay) {
            // Never written: safe for any method.
            (Some(unsent), _) => Some(unsent),
            (None, Some(replay)) if idempotent => Some(replay.request()),
            _ => None,
        };
        let Some(retry) = retry else {
            inner.counters.stale_not_retryable.inc();
            let why = if idempotent {
                "its body cannot be replayed".to_string()
            } else {
                format!("{method} is not in retry.idempotent_methods")
            };
            return Err(SendError {
                kind: UpstreamErrorKind::StaleConnection,
                detail: format!(
                    "the reused connection to the backend closed before a response ({}); \
                     the {method} request may have reached the backend, so it was not retried ({why})",
                    cause(&failed.error)
                ),
            });
        };
        inner.counters.stale_retried.inc();
        tracing::debug!(backend = %host.backend.authority, %method, error = %failed.error,
            "reused connection died before a response; retrying once on a new connection");
        // Boxed, as is every path an exchange rarely takes: the future of `send` is built
        // and moved for every request, so it is kept to the size the common path needs.
        let (response, conn) = Box::pin(inner.exchange_on_new_connection(host, retry)).await?;
        Ok((inner.finish(host, conn, response), false))
    }
}

impl Inner {
    /// The retry after a reused connection failed: `req` on a connection of its own.
    async fn exchange_on_new_connection(
        &self,
        host: &Host,
        req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let conn = self.connect(host).await?;
        exchange(conn, req).await.map_err(|failed| {
            exchange_error(
                &failed.error,
                " (on a new connection, after a reused one had failed)",
            )
        })
    }

    /// An idle connection that is still usable, or a new one.
    async fn checkout(&self, host: &Arc<Host>) -> Result<(Conn, bool), SendError> {
        loop {
            let popped = host.idle.pop();
            let Some(Idle { mut conn, since }) = popped else {
                break;
            };
            if since.elapsed() >= host.idle_limit(self.settings.idle_timeout) {
                self.counters.event(Event::RetiredIdle);
                continue;
            }
            // The connection may still be finishing the previous exchange (nobody
            // polled it since); driving it until `tx` is ready does that, and ends when
            // the backend has closed the connection meanwhile.
            let usable = std::future::poll_fn(|cx| {
                if conn.poll_io(cx).is_ready() {
                    return Poll::Ready(false);
                }
                conn.tx.poll_ready(cx).map(|ready| ready.is_ok())
            });
            if !usable.await || conn.is_closed() {
                self.counters.event(Event::ClosedByBackend);
                continue;
            }
            self.counters.event(Event::Reused);
            return Ok((conn, true));
        }
        Ok((Box::pin(self.connect(host)).await?, false))
    }

    /// Opens a connection, retrying failed attempts after an exponential backoff with jitter.
    async fn connect(&self, host: &Host) -> Result<Conn, SendError> {
        let retry = &self.settings.retry;
        let timeout = self.settings.connect_timeout;
        let authority = host.backend.authority.as_str();
        let mut attempt = 1;
        loop {
            let failure = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
                Ok(Ok(stream)) => {
                    host.backend.connect_succeeded();
                    let _ = stream.set_nodelay(true);
                    let (tx, connection) = http1::Builder::new()
                        .max_buf_size(UPSTREAM_READ_BUFFER)
                        .handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| SendError {
                            kind: UpstreamErrorKind::Protocol,
                            detail: format!("HTTP/1.1 handshake failed: {e}"),
                        })?;
                    self.counters.event(Event::Opened);
                    return Ok(Conn {
                        tx,
                        io: Some(Box::pin(connection)),
                        served: 0,
                        allowed: None,
                    });
                }
                Ok(Err(error)) => SendError {
                    kind: UpstreamErrorKind::Connect,
                    detail: format!("cannot connect: {error}"),
                },
                Err(_) => SendError {
                    kind: UpstreamErrorKind::ConnectTimeout,
                    detail: format!("connect timed out after {}", fmt_duration(timeout)),
                },
            };
            host.backend.connect_failed(retry);
            if attempt >= retry.connect_attempts {
                let mut failure = failure;
                if attempt > 1 {
                    failure.detail = format!("{} ({attempt} attempts)", failure.detail);
                }
                return Err(failure);
            }
            let delay = backoff(
                attempt,
                retry.backoff_base,
                retry.backoff_cap,
                rand::random(),
            );
            self.counters.connect_retries.inc();
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Learns from the response head, decides whether the connection may be reused,
    /// and wraps the body so the connection goes back to the pool when it ends.
    fn finish(
        self: &Arc<Self>,
        host: &Arc<Host>,
        mut conn: Conn,
        response: Response<Incoming>,
    ) -> Response<ProxyBody> {
        let headers = response.headers();
        let keep_alive = parse_keep_alive(headers);
        if let Some(timeout) = keep_alive.timeout {
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            host.learned_timeout_ms.store(ms, Ordering::Relaxed);
        }
        if keep_alive.max.is_some() {
            conn.allowed = keep_alive.max;
        }
        let close = wants_close(headers) || response.version() < Version::HTTP_11;
        if close {
            host.observe_close_after(conn.served);
        }
        let retire = if close {
            Some(Event::ClosedByBackend)
        } else if at_request_limit(conn.served, conn.allowed, host.learned_max()) {
            Some(Event::RetiredMax)
        } else {
            None
        };
        let (parts, body) = response.into_parts();
        let mut checkin = CheckIn {
            pool: self.clone(),
            host: host.clone(),
            conn: Some(conn),
            retire,
        };
        if body.is_end_stream() {
            // Nobody will poll an empty body to its end: the exchange is over now.
            checkin.give_back();
        }
        let body = PooledBody {
            inner: body,
            checkin: Some(checkin),
        };
        Response::from_parts(parts, body.boxed_unsync())
    }
}

/// Returns a connection to its host's idle stack, or counts why it is not.
struct CheckIn {
    pool: Arc<Inner>,
    host: Arc<Host>,
    conn: Option<Conn>,
    retire: Option<Event>,
}

impl CheckIn {
    fn give_back(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let counters = &self.pool.counters;
        if let Some(event) = self.retire {
            counters.event(event);
            return;
        }
        if conn.is_closed() {
            counters.event(Event::ClosedByBackend);
            return;
        }
        if self
            .host
            .idle
            .push(conn, self.pool.settings.max_idle)
            .is_err()
        {
            counters.event(Event::Discarded);
        }
    }
}

impl Drop for CheckIn {
    fn drop(&mut self) {
        // Body dropped or failed before its end: hyper closes the connection.
        if self.conn.take().is_some() {
            self.pool.counters.event(Event::Discarded);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that hands its connection back to the pool at its end.
    struct PooledBody {
        #[pin]
        inner: Incoming,
        checkin: Option<CheckIn>,
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        // The connection's I/O is driven from here until the body ends (see `Conn`).
        if let Some(conn) = this.checkin.as_mut().and_then(|c| c.conn.as_mut()) {
            let _ = conn.poll_io(cx);
        }
        let polled = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &polled {
            None => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => {
                this.checkin.take();
                false
            }
        };
        if ended {
            if let Some(mut checkin) = this.checkin.take() {
                checkin.give_back();
            }
        }
        Poll::Ready(polled.map(|frame| frame.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A failed exchange on one connection.
struct Failed {
    error: hyper::Error,
    /// The request, when hyper gave it back unwritten.
    unsent: Option<Request<ProxyBody>>,
    /// The connection broke (closed, reset) rather than the backend speaking bad HTTP.
    stale: bool,
}

async fn exchange(
    mut conn: Conn,
    req: Request<ProxyBody>,
) -> Result<(Response<Incoming>, Conn), Failed> {
    conn.served += 1;
    let mut response = std::pin::pin!(conn.tx.try_send_request(req));
    // Drive the connection in this task while waiting for the response head. When
    // the connection ends first, dropping it fails the response future (or hands the
    // request back unsent), so this always finishes.
    let result = std::future::poll_fn(|cx| {
        let _ = conn.poll_io(cx);
        response.as_mut().poll(cx)
    })
    .await;
    match result {
        Ok(response) => Ok((response, conn)),
        Err(mut error) => {
            let unsent = error.take_message();
            let error = error.into_error();
            let stale = unsent.is_some() || is_broken_connection(&error);
            Err(Failed {
                error,
                unsent,
                stale,
            })
        }
    }
}

/// The head of a request whose body is empty, kept to send it again.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    /// `Some` when the body is empty (no body or `Content-Length: 0`); a streamed body
    /// is gone once sent, so such a request cannot be replayed.
    fn of(req: &Request<ProxyBody>) -> Option<Replay> {
        let body = req.body();
        let empty = body.is_end_stream() || body.size_hint().exact() == Some(0);
        empty.then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> Request<ProxyBody> {
        let mut req = Request::new(empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// True for errors that mean the connection itself is gone: closed, reset, cut short.
fn is_broken_connection(error: &hyper::Error) -> bool {
    if error.is_user() || error.is_parse() {
        return false;
    }
    if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
        return true;
    }
    use std::io::ErrorKind::*;
    matches!(
        super::find_source::<std::io::Error>(error).map(|e| e.kind()),
        Some(ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
    )
}

fn cause(error: &hyper::Error) -> String {
    if error.is_incomplete_message() {
        "connection closed before a complete response".to_string()
    } else {
        match super::find_source::<std::io::Error>(error) {
            Some(io) => io.to_string(),
            None => error.to_string(),
        }
    }
}

fn exchange_error(error: &hyper::Error, context: &str) -> SendError {
    let detail = if error.is_incomplete_message() {
        format!("connection closed by the backend before a complete response{context}")
    } else {
        format!("upstream exchange failed: {}{context}", cause(error))
    };
    SendError {
        kind: UpstreamErrorKind::Protocol,
        detail,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The wait before connect attempt `attempt + 1`: `base · 2^(attempt−1)`, capped at
/// `cap`, then scaled into [½, 1] of itself by `jitter` ∈ [0, 1) ("equal jitter": many
/// proxies retrying at once spread out, and every wait is at least half the nominal one).
pub(crate) fn backoff(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let nominal = base.saturating_mul(factor).min(cap);
    nominal.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// How long a connection may stay idle: the configured timeout, lowered to ¾ of the
/// backend's own `Keep-Alive: timeout` when it announced one, so we retire it first.
pub(crate) fn idle_limit(configured: Duration, learned: Option<Duration>) -> Duration {
    learned.map_or(configured, |t| configured.min(t.mul_f64(0.75)))
}

/// True when a connection must not carry another request: the backend allows at most
/// one more (`Keep-Alive: max` ≤ 1, keeping the last slot, where a backend that closes
/// without saying so would fail us), or it has served the learned limit.
pub(crate) fn at_request_limit(served: u32, allowed: Option<u32>, learned: Option<u32>) -> bool {
    allowed.is_some_and(|n| n <= 1) || learned.is_some_and(|max| served >= max)
}

/// The parameters of a `Keep-Alive` response header.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    pub timeout: Option<Duration>,
    pub max: Option<u32>,
}

/// Parses `Keep-Alive: timeout=5, max=100` (RFC 2068 §19.7.1; parameters in any order,
/// case-insensitive, unknown ones ignored, invalid values ignored).
pub(crate) fn parse_keep_alive(headers: &HeaderMap) -> KeepAlive {
    let mut parsed = KeepAlive::default();
    let params = headers
        .get_all("keep-alive")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            "timeout" => {
                if let Ok(secs) = value.parse::<u64>() {
                    parsed.timeout = Some(Duration::from_secs(secs));
                }
            }
            "max" => parsed.max = value.parse().ok().or(parsed.max),
            _ => {}
        }
    }
    parsed
}

/// True when the `Connection` header carries the `close` option.
pub(crate) fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use http::header::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn keep_alive_header_is_parsed() {
        let ka = parse_keep_alive(&headers(&[("keep-alive", "timeout=5, max=100")]));
        assert_eq!(ka.timeout, Some(Duration::from_secs(5)));
        assert_eq!(ka.max, Some(100));
        let ka = parse_keep_alive(&headers(&[("Keep-Alive", "MAX=7 ,Timeout=\"2\", foo=bar")]));
        assert_eq!(ka.timeout, Some(Duration::from_secs(2)));
        assert_eq!(ka.max, Some(7));
        assert_eq!(
            parse_keep_alive(&headers(&[("keep-alive", "timeout=x, max")])),
            KeepAlive::default()
        );
        assert_eq!(parse_keep_alive(&HeaderMap::new()), KeepAlive::default());
    }

    #[test]
    fn connection_close_is_found_among_options() {
        assert!(wants_close(&headers(&[("connection", "close")])));
        assert!(wants_close(&headers(&[("connection", "Upgrade, Close")])));
        assert!(!wants_close(&headers(&[("connection", "keep-alive")])));
        assert!(!wants_close(&HeaderMap::new()));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered_into_the_upper_half() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(1));
        let ms = |attempt, jitter| backoff(attempt, base, cap, jitter).as_millis();
        assert_eq!(ms(1, 1.0), 100);
        assert_eq!(ms(2, 1.0), 200);
        assert_eq!(ms(3, 1.0), 400);
        assert_eq!(ms(4, 1.0), 800);
        assert_eq!(ms(5, 1.0), 1000);
        assert_eq!(ms(40, 1.0), 1000);
        assert_eq!(ms(1, 0.0), 50);
        assert_eq!(ms(5, 0.0), 500);
        assert_eq!(ms(2, 0.5), 150);
    }

    #[test]
    fn idle_limit_stays_below_an_announced_keep_alive() {
        let four = Duration::from_secs(4);
        assert_eq!(idle_limit(four, None), four);
        assert_eq!(idle_limit(four, Some(Duration::from_secs(60))), four);
        assert_eq!(
            idle_limit(four, Some(Duration::from_secs(2))),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn request_limit_keeps_the_last_slot_free() {
        assert!(!at_request_limit(1, None, None));
        assert!(!at_request_limit(1, Some(2), None));
        assert!(at_request_limit(1, Some(1), None));
        assert!(at_request_limit(1, Some(0), None));
        assert!(!at_request_limit(99, None, Some(100)));
        assert!(at_request_limit(100, None, Some(100)));
    }

    /// A backend that answers the first `answered` requests on each connection, then
    /// reads the next one and closes without a response: a stale keep-alive connection
    /// that took the request. Returns its address and the requests it read.
    async fn closing_backend(answered: usize) -> (String, Arc<AtomicU64>) {
        backend_answering(answered, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await
    }

    async fn backend_answering(answered: usize, ok: &'static [u8]) -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let seen = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0..=answered {
                        // Read one request head (the tests send small bodies in the same packet).
                        loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                                if buf.len() >= end + 4 + len {
                                    buf.drain(..end + 4 + len);
                                    break;
                                }
                            }
                            let mut chunk = [0u8; 1024];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        seen.fetch_add(1, Ordering::SeqCst);
                        if n == answered {
                            return; // closes with the request unanswered
                        }
                        if socket.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    fn pool_for(authority: &str) -> Pool {
        let config = UpstreamConfig {
            backends: vec![authority.to_string()],
            ..crate::upstream::Upstream::for_tests("pool_unit").config
        };
        let backends = vec![Arc::new(Backend::new("pool_unit", authority))];
        let settings = PoolSettings {
            idle_timeout: Duration::from_secs(5),
            max_idle: 8,
            connect_timeout: Duration::from_secs(1),
            retry: config.retry,
            workers: 1,
        };
        Pool::new("pool_unit", settings, &backends)
    }

    fn request(method: &str, authority: &str, body: &'static str) -> Request<ProxyBody> {
        let body = if body.is_empty() {
            empty()
        } else {
            crate::http::body::full(body)
        };
        Request::builder()
            .method(method)
            .uri(format!("http://{authority}/x"))
            .body(body)
            .unwrap()
    }

    impl Pool {
        /// Sends `req`, its URI absolute, to the backend it names, in origin form.
        async fn send_absolute(
            &self,
            mut req: Request<ProxyBody>,
        ) -> Result<(Response<ProxyBody>, bool), SendError> {
            let authority = req.uri().authority().unwrap().as_str().to_string();
            let backend = self
                .inner
                .hosts
                .iter()
                .find(|h| h.backend.authority == authority)
                .map(|h| h.backend.clone())
                .unwrap();
            *req.uri_mut() = Uri::from(req.uri().path_and_query().unwrap().clone());
            self.send(&backend, req).await
        }
    }

    async fn send_ok(pool: &Pool, req: Request<ProxyBody>) -> bool {
        let (response, reused) = pool.send_absolute(req).await.expect("an answer");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        reused
    }

    #[tokio::test]
    async fn connection_is_reused_after_the_body_is_read() {
        let (addr, seen) = closing_backend(1000).await;
        let pool = pool_for(&addr);
        assert!(!send_ok(&pool, request("GET", &addr, "")).await);
        assert_eq!(pool.idle_count(), 1);
        assert!(send_ok(&pool, request("GET", &addr, "")).await);
        assert!(send_ok(&pool, request("POST", &addr, "abc")).await);
        let stats = pool.stats();
        assert_eq!((stats.opened, stats.reused), (1, 2), "{stats:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idempotent_request_on_a_dead_reused_connection_is_retried_once() {
        let (addr, seen) = closing_backend(1).await;
        let pool = pool_for(&addr);
        assert!(!send_ok(&pool, request("GET", &addr, "")).await);
        // Reuses the pooled connection, which takes the request and closes: retried on
        // a new connection, which answers.
        assert!(!send_ok(&pool, request("GET", &addr, "")).await);
        let stats = pool.stats();
        assert_eq!(stats.stale_retried, 1, "{stats:?}");
        assert_eq!((stats.opened, stats.reused), (2, 1), "{stats:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn post_on_a_dead_reused_connection_is_not_retried() {
        let (addr, seen) = closing_backend(1).await;
        let pool = pool_for(&addr);
        send_ok(&pool, request("GET", &addr, "")).await;
        let error = pool
            .send_absolute(request("POST", &addr, "order"))
            .await
            .expect_err("not retried");
        assert_eq!(error.kind, UpstreamErrorKind::StaleConnection);
        assert!(
            error.detail.contains("may have reached the backend"),
            "{}",
            error.detail
        );
        assert!(error.detail.contains("not retried"), "{}", error.detail);
        assert_eq!(pool.stats().stale_not_retryable, 1);
        assert_eq!(seen.load(Ordering::SeqCst), 2, "the POST was sent once");
    }

    #[tokio::test]
    async fn an_empty_idempotent_list_turns_the_stale_retry_off() {
        let (addr, seen) = closing_backend(1).await;
        let mut pool = pool_for(&addr);
        let settings = &mut Arc::get_mut(&mut pool.inner).unwrap().settings;
        settings.retry.idempotent_methods.clear();
        send_ok(&pool, request("GET", &addr, "")).await;
        let error = pool
            .send_absolute(request("GET", &addr, ""))
            .await
            .expect_err("not retried");
        assert_eq!(error.kind, UpstreamErrorKind::StaleConnection);
        assert!(
            error
                .detail
                .contains("GET is not in retry.idempotent_methods"),
            "{}",
            error.detail
        );
        assert_eq!(pool.stats().stale_not_retryable, 1);
        assert_eq!(pool.stats().stale_retried, 0);
        assert_eq!(seen.load(Ordering::SeqCst), 2, "the GET was sent once");
    }

    #[tokio::test]
    async fn put_with_a_body_is_not_replayed() {
        let (addr, _) = closing_backend(1).await;
        let pool = pool_for(&addr);
        send_ok(&pool, request("GET", &addr, "")).await;
        let error = pool
            .send_absolute(request("PUT", &addr, "doc"))
            .await
            .unwrap_err();
        assert_eq!(error.kind, UpstreamErrorKind::StaleConnection);
        assert!(
            error.detail.contains("cannot be replayed"),
            "{}",
            error.detail
        );
    }

    #[tokio::test]
    async fn idle_connections_past_the_limit_are_not_reused() {
        let (addr, _) = closing_backend(1000).await;
        let mut pool = pool_for(&addr);
        Arc::get_mut(&mut pool.inner).unwrap().settings.idle_timeout = Duration::from_millis(50);
        send_ok(&pool, request("GET", &addr, "")).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!send_ok(&pool, request("GET", &addr, "")).await);
        let stats = pool.stats();
        assert_eq!((stats.opened, stats.retired_idle), (2, 1), "{stats:?}");
        tokio::time::sleep(Duration::from_millis(80)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(pool.stats().retired_idle, 2);
    }

    #[tokio::test]
    async fn keep_alive_limits_are_learned_and_honoured() {
        let (addr, _) = backend_answering(
            1000,
            b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=2, max=1\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        let pool = pool_for(&addr);
        send_ok(&pool, request("GET", &addr, "")).await;
        // max=1: the last request slot is left unused, the connection retired.
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(pool.stats().retired_max, 1);
        let host = &pool.inner.hosts[0];
        assert_eq!(
            host.idle_limit(Duration::from_secs(5)),
            Duration::from_millis(1500)
        );
    }

    #[tokio::test]
    async fn connection_close_is_not_pooled() {
        let (addr, _) = backend_answering(
            1000,
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        let pool = pool_for(&addr);
        send_ok(&pool, request("GET", &addr, "")).await;
        send_ok(&pool, request("GET", &addr, "")).await;
        let stats = pool.stats();
        assert_eq!(
            (stats.opened, stats.reused, stats.closed_by_backend),
            (2, 0, 2)
        );
    }
}
