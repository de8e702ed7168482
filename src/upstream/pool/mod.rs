//! The upstream connection pool: HTTP/1.1 connections per backend, kept idle for
//! reuse below the backend's keep-alive limits, with connect retries (backoff and
//! jitter) and one retry on a fresh connection when a reused one turns out dead.
//!
//! Not here: choosing the backend or taking it out of rotation (`mod.rs`), health
//! checks (`health.rs`), the response-header timeout (wrapped around [`Pool::send`]).
//!
//! This file: the [`Pool`] type, checkout (idle or new) and [`Pool::send`] with its one
//! retry after a stale reuse. The rest of the pool: its counters (`stats.rs`), the idle
//! stacks and their sweep (`idle.rs`), a connection's connect, exchange and check-in
//! (`conn.rs`), the HTTP/1.1 spoken on it (`h1.rs`), the keep-alive policy
//! (`keepalive.rs`).
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
//! `Connection: close`, the connection reached a learned request limit, the request
//! body has not been sent in full (an answer before the upload ended), or the stack
//! is full. An idle entry older than the idle limit is discarded, never reused; a
//! closed one is discarded when found (checkout or sweep).

mod conn;
mod h1;
mod idle;
mod keepalive;
mod stats;

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::header;
use http::{Request, Response};

use super::{Backend, SendError};
use crate::config::RetryConfig;
use crate::http::body::ProxyBody;
use crate::http::error::UpstreamErrorKind;
use conn::{exchange, Conn, Exchanged};
pub use h1::OnInformational;
use h1::{H1Error, Outgoing};
pub(crate) use h1::{Upgraded, UpgradedSlot};
use idle::{Idle, IdleStacks};
pub use stats::PoolStats;
use stats::{Counters, Event, Stale};

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
    /// `[upstream.tls]`: connections are TLS sessions made with this client.
    pub tls: Option<crate::http::tls_client::TlsClient>,
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
    /// Connects in progress to this backend, at most [`MAX_CONNECTS_IN_PROGRESS`].
    connecting: tokio::sync::Semaphore,
}

/// New connections being opened to one backend at once. A burst (an HTTP/2 client's
/// streams, a traffic spike on a cold pool) otherwise opens one connection per request
/// at the same instant and overflows the backend's accept queue (Tomcat's acceptCount
/// is 100), and the refused connects get the backend ejected. Requests past the bound
/// wait for a connect to finish, then open their own.
pub(crate) const MAX_CONNECTS_IN_PROGRESS: usize = 32;

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
                    connecting: tokio::sync::Semaphore::new(MAX_CONNECTS_IN_PROGRESS),
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

    /// Idle connections held right now, over all backends.
    pub(crate) fn idle_count(&self) -> usize {
        self.inner.hosts.iter().map(|h| h.idle.len()).sum()
    }

    /// [`send_with`](Pool::send_with) with the configured connect attempts.
    #[cfg(test)]
    pub(crate) async fn send(
        &self,
        backend: &Arc<Backend>,
        req: Request<ProxyBody>,
    ) -> Result<(Response<ProxyBody>, bool), SendError> {
        let attempts = self.inner.settings.retry.connect_attempts;
        self.send_with(backend, req, attempts, None)
            .await
            .map_err(|failure| failure.error)
    }

    /// Sends `req` to `backend` (one of the pool's) and returns the response, its body
    /// streaming, and whether the request went out on a reused connection. The URI is
    /// sent as it is, so it should be in origin form (`/path?query`); without a `Host`
    /// header, the backend's authority is added as one. A reused connection that dies
    /// before any response byte is retried once, on a new connection, if nothing was
    /// written yet (and no frame taken from its body: a body's first frames go out
    /// with the head) or the request is idempotent with an empty body; otherwise the
    /// answer is a [`UpstreamErrorKind::StaleConnection`] error.
    ///
    /// At most `connect_attempts` tries are made to open a connection; when none opens,
    /// the request comes back unsent ([`SendFailure::unsent`]), free to go to another
    /// backend. The backend's interim responses before the final one go to
    /// `informational`, when given.
    pub(crate) async fn send_with(
        &self,
        backend: &Arc<Backend>,
        mut req: Request<ProxyBody>,
        connect_attempts: u32,
        informational: Option<&OnInformational>,
    ) -> Result<(Response<ProxyBody>, bool), SendFailure> {
        let inner = &self.inner;
        let Some(host) = inner
            .hosts
            .iter()
            .find(|h| Arc::ptr_eq(&h.backend, backend))
        else {
            return Err(SendError {
                kind: UpstreamErrorKind::Protocol,
                detail: format!("{} is not a backend of this upstream", backend.authority),
            }
            .into());
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
        let method = req.method().clone();

        let (conn, reused) = match inner.checkout(host, connect_attempts).await {
            Ok(checked_out) => checked_out,
            Err(error) => {
                return Err(SendFailure {
                    error,
                    unsent: Some(req),
                })
            }
        };
        let (parts, body) = req.into_parts();
        let mut out = Outgoing::encode(parts, body);
        out.informational = informational.cloned();
        // Only a request on a reused connection is ever sent again after being written,
        // and only an idempotent one without a body: its encoded head is kept for that.
        let replay = if reused && idempotent {
            out.replay()
        } else {
            None
        };
        let failed = match exchange(conn, out).await {
            Ok((exchanged, conn)) => return Ok((inner.finish(host, conn, exchanged), reused)),
            Err(failed) => failed,
        };
        if !reused || !failed.stale {
            return Err(exchange_error(&failed.error, "").into());
        }
        // A reused connection died before a response head: the backend closed it as
        // we reused it (keep-alive timeout or request limit).
        let retry = match (failed.unsent, replay) {
            // Never written: safe for any method.
            (Some(unsent), _) => Some(unsent),
            (None, Some(replay)) => Some(replay),
            _ => None,
        };
        let Some(retry) = retry else {
            inner.counters.stale.increment(Stale::NotRetryable);
            let why = if idempotent {
                "its body cannot be replayed".to_string()
            } else {
                format!("{method} is not in retry.idempotent_methods")
            };
            return Err(SendFailure::from(SendError {
                kind: UpstreamErrorKind::StaleConnection,
                detail: format!(
                    "the reused connection to the backend closed before a response ({}); \
                     the {method} request may have reached the backend, so it was not retried ({why})",
                    failed.error
                ),
            }));
        };
        inner.counters.stale.increment(Stale::Retried);
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
        req: Outgoing,
    ) -> Result<(Exchanged, Conn), SendError> {
        let conn = self
            .connect(host, self.settings.retry.connect_attempts)
            .await?;
        exchange(conn, req).await.map_err(|failed| {
            exchange_error(
                &failed.error,
                " (on a new connection, after a reused one had failed)",
            )
        })
    }

    /// An idle connection that is still usable, or a new one.
    async fn checkout(&self, host: &Arc<Host>, attempts: u32) -> Result<(Conn, bool), SendError> {
        loop {
            let popped = host.idle.pop();
            let Some(Idle { mut conn, since }) = popped else {
                break;
            };
            if since.elapsed() >= host.idle_limit(self.settings.idle_timeout) {
                self.counters.event(Event::RetiredIdle);
                continue;
            }
            // One poll reads a close (or bytes nobody asked for) that came while idle.
            let ended = std::future::poll_fn(|cx| Poll::Ready(conn.poll_io(cx).is_ready()));
            if ended.await || conn.is_closed() {
                self.counters.event(Event::ClosedByBackend);
                continue;
            }
            self.counters.event(Event::Reused);
            return Ok((conn, true));
        }
        Ok((Box::pin(self.connect(host, attempts)).await?, false))
    }
}

/// Why [`Pool::send_with`] failed, and the request when it was never sent.
pub(crate) struct SendFailure {
    pub(crate) error: SendError,
    /// The request, untouched, when no connection to the backend could be opened.
    pub(crate) unsent: Option<Request<ProxyBody>>,
}

impl From<SendError> for SendFailure {
    fn from(error: SendError) -> SendFailure {
        SendFailure {
            error,
            unsent: None,
        }
    }
}

fn exchange_error(error: &H1Error, context: &str) -> SendError {
    let detail = match error {
        H1Error::Closed => {
            format!("connection closed by the backend before a complete response{context}")
        }
        error => format!("upstream exchange failed: {error}{context}"),
    };
    SendError {
        kind: UpstreamErrorKind::Protocol,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use crate::http::body::{empty, BoxError};
    use bytes::Bytes;
    use http::Uri;
    use http_body::Body;
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

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

    #[tokio::test]
    async fn connects_to_one_backend_are_bounded_and_the_rest_wait() {
        // A backend whose accept queue is full: further connects hang until they time out.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut pool = pool_for(&addr);
        Arc::get_mut(&mut pool.inner)
            .unwrap()
            .settings
            .connect_timeout = Duration::from_millis(500);
        let pool = Arc::new(pool);
        let backend = pool.inner.hosts[0].backend.clone();
        let burst = MAX_CONNECTS_IN_PROGRESS + 8;
        let started = tokio::time::Instant::now();
        let sends: Vec<_> = (0..burst)
            .map(|_| {
                let (pool, backend) = (pool.clone(), backend.clone());
                let req = request("GET", &addr, "");
                tokio::spawn(async move {
                    let sent = pool.send_with(&backend, req, 1, None);
                    let result = tokio::time::timeout(Duration::from_secs(2), sent).await;
                    let timed_out = matches!(&result,
                        Ok(Err(f)) if f.error.kind == UpstreamErrorKind::ConnectTimeout);
                    timed_out.then(|| started.elapsed())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            pool.inner.hosts[0].connecting.available_permits(),
            0,
            "{MAX_CONNECTS_IN_PROGRESS} connects are in progress"
        );
        let mut connect_timeouts = Vec::new();
        for send in sends {
            connect_timeouts.extend(send.await.unwrap());
        }
        // The first connects time out after 500 ms; those past the bound start only then.
        let last = connect_timeouts.iter().max().copied().unwrap_or_default();
        assert!(
            last >= Duration::from_millis(1_000),
            "the connects past the bound waited for a slot: {} timed out, the last at {last:?}",
            connect_timeouts.len()
        );
        drop(listener);
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
            tls: None,
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

    /// A backend that answers `401` with an empty body as soon as it has read a request
    /// head, then reads (and ignores) whatever else comes on that connection, as a
    /// server refusing an upload before its body arrives. Returns its address and the
    /// connections it accepted.
    async fn early_401_backend() -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
                    if socket.write_all(answer).await.is_err() {
                        return;
                    }
                    while let Ok(k) = socket.read(&mut chunk).await {
                        if k == 0 {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A request body fed through the returned sender; it ends when the sender is dropped.
    fn streamed_body() -> (tokio::sync::mpsc::Sender<Bytes>, ProxyBody) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, BoxError>(http_body::Frame::data(chunk)), rx))
        });
        (tx, http_body_util::StreamBody::new(frames).boxed_unsync())
    }

    /// `future`, or a test failure naming `what` after 5 s.
    async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .unwrap_or_else(|_| panic!("{what}: no result within 5 s"))
    }

    #[tokio::test]
    async fn a_connection_answered_before_its_upload_ended_is_not_reused() {
        let (addr, accepted) = early_401_backend().await;
        let pool = pool_for(&addr);
        let (upload, body) = streamed_body();
        upload
            .send(Bytes::from_static(b"the first part"))
            .await
            .unwrap();
        let post = Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/upload"))
            .body(body)
            .unwrap();
        let (response, reused) = within("the POST", pool.send_absolute(post))
            .await
            .expect("an answer");
        assert_eq!((response.status().as_u16(), reused), (401, false));
        within("the 401 body", response.into_body().collect())
            .await
            .unwrap();

        // The upload is still open (`upload` is alive): its connection must not carry
        // the next request.
        let (response, reused) = within(
            "a GET after the early 401",
            pool.send_absolute(request("GET", &addr, "")),
        )
        .await
        .expect("an answer");
        assert_eq!((response.status().as_u16(), reused), (401, false));
        let stats = pool.stats();
        assert_eq!(
            (stats.opened, stats.reused, stats.discarded),
            (2, 0, 1),
            "{stats:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(upload);
    }

    /// A backend that answers `200 ok` to each request once it has read the request
    /// whole: its head and, for a chunked body, everything up to the last chunk.
    async fn chunked_reading_backend() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let complete = |buf: &[u8]| {
                            let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            if !head.contains("transfer-encoding: chunked") {
                                return Some(end + 4);
                            }
                            let last = b"\r\n0\r\n\r\n";
                            let body = &buf[end + 2..];
                            let at = body.windows(last.len()).position(|w| w == last)?;
                            Some(end + 2 + at + last.len())
                        };
                        while complete(&buf).is_none() {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let used = complete(&buf).unwrap();
                        buf.drain(..used);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_streamed_upload_sent_in_full_leaves_its_connection_reusable() {
        let addr = chunked_reading_backend().await;
        let pool = pool_for(&addr);
        let (upload, body) = streamed_body();
        upload
            .send(Bytes::from_static(b"part one, "))
            .await
            .unwrap();
        upload.send(Bytes::from_static(b"part two")).await.unwrap();
        drop(upload);
        let post = Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/upload"))
            .body(body)
            .unwrap();
        assert!(!within("the POST", send_ok(&pool, post)).await);
        assert!(within("the GET", send_ok(&pool, request("GET", &addr, ""))).await);
        let stats = pool.stats();
        assert_eq!(
            (stats.opened, stats.reused, stats.discarded),
            (1, 1, 0),
            "{stats:?}"
        );
    }

    /// A body of declared length whose frames never say they are the last, as a
    /// client's `Content-Length` body arrives: it is not polled past that many bytes, so
    /// only the count tells that it was sent in full.
    struct Declared(std::collections::VecDeque<Bytes>, u64);

    impl Body for Declared {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }

        fn size_hint(&self) -> http_body::SizeHint {
            http_body::SizeHint::with_exact(self.1)
        }
    }

    #[tokio::test]
    async fn an_upload_of_declared_length_sent_in_full_leaves_its_connection_reusable() {
        let (addr, seen) = closing_backend(1000).await;
        let pool = pool_for(&addr);
        let parts = [b"ab".as_slice(), b"cd", b"e"].map(Bytes::from_static);
        let post = Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/upload"))
            .body(Declared(parts.into(), 5).boxed_unsync())
            .unwrap();
        assert!(!within("the POST", send_ok(&pool, post)).await);
        assert!(within("the GET", send_ok(&pool, request("GET", &addr, ""))).await);
        let stats = pool.stats();
        assert_eq!(
            (stats.opened, stats.reused, stats.discarded),
            (1, 1, 0),
            "{stats:?}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 2);
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
