//! One upstream connection's life: opened (connect attempts with backoff), one
//! exchange driven on it, and its check-in: the response body that hands it back to
//! the idle stack at its end, or counts why it is not reused.
//!
//! A connection goes back only when its exchange is over in both directions: the
//! response body read to its end AND the request body sent in full. A backend may
//! answer before the upload has ended (an early 401 or 413 to a slow POST); that
//! connection still carries the rest of the upload, so it is discarded, never lent
//! to the next request.
//!
//! Not here: choosing between an idle connection and a new one, and the retry after a
//! stale reuse (`mod.rs`); the idle stacks (`idle.rs`); parsing the backend's
//! keep-alive limits (`keepalive.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Largest read from a backend connection, and so the largest response chunk. Each
/// read becomes one chunk of the response body, held until the client takes it;
/// hyper's default (~400 KiB) would hold about 1 MiB per slow client (read buffer,
/// chunk in hand, chunk queued); 64 KiB keeps it near 200 KiB at no cost in throughput.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::keepalive::{at_request_limit, parse_keep_alive, wants_close};
use super::stats::Event;
use super::{Host, Inner};
use crate::http::body::{BoxError, ProxyBody};
use crate::http::error::UpstreamErrorKind;
use crate::http::tls_client::UpstreamStream;
use crate::upstream::{fmt_duration, SendError};

/// hyper's side of one upstream connection: the future that reads and writes it,
/// served with upgrades (hyper's type for that cannot be named), so that after a
/// `101 Switching Protocols` its socket passes to `hyper::upgrade::on` on the response.
type ConnIo = dyn Future<Output = hyper::Result<()>> + Send;

/// One HTTP/1.1 connection. Its I/O future is not spawned: the request using the
/// connection drives it from its own task (while waiting for the response head, then
/// from the response body's `poll_frame` until the body ends), so an exchange never
/// hops between tasks or worker threads. An idle connection is not polled at all; a
/// backend close is seen when it is next checked out (or by the sweep).
pub(super) struct Conn {
    pub(super) tx: http1::SendRequest<ProxyBody>,
    /// `None` once the connection has ended (dropping it also fails a request still
    /// queued on `tx`, handing the request back unsent).
    io: Option<Pin<Box<ConnIo>>>,
    /// Requests sent on it so far.
    served: u32,
    /// Further requests the backend allows, from `Keep-Alive: max=N`.
    allowed: Option<u32>,
    /// Whether the request body of the last exchange has been sent in full.
    upload: Upload,
}

impl Conn {
    /// Drives the connection's I/O; `Ready` once it has ended (closed by either side,
    /// or failed).
    pub(super) fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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

    pub(super) fn is_closed(&self) -> bool {
        self.io.is_none() || self.tx.is_closed()
    }
}

impl Inner {
    /// Opens a connection in at most `attempts` tries, each failed one followed by an
    /// exponential backoff with jitter. A TLS handshake the backend refused (a
    /// certificate not trusted, say) is not tried again on this backend: it would
    /// refuse it again.
    pub(super) async fn connect(&self, host: &Host, attempts: u32) -> Result<Conn, SendError> {
        let retry = &self.settings.retry;
        let mut attempt = 1;
        loop {
            // Held while the connection opens: bounds the connects in flight to the host.
            let connecting = host.connecting.acquire().await;
            let (failure, again) = match self.open(host).await {
                Ok(stream) => {
                    host.backend.connect_succeeded();
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
                        io: Some(Box::pin(connection.with_upgrades())),
                        served: 0,
                        allowed: None,
                        upload: Upload::done(),
                    });
                }
                Err(failed) => failed,
            };
            drop(connecting);
            host.backend.connect_failed(retry);
            if attempt >= attempts || !again {
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
            self.counters.connect_retries.increment();
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// A TCP connection to the host, and with `[upstream.tls]` a TLS session over it,
    /// each within the connect timeout. On failure, whether another attempt may fare
    /// better.
    async fn open(&self, host: &Host) -> Result<UpstreamStream, (SendError, bool)> {
        use UpstreamErrorKind::{Connect, ConnectTimeout, Tls};
        let failed = |kind, detail: String, again| Err((SendError { kind, detail }, again));
        let timeout = self.settings.connect_timeout;
        let authority = host.backend.authority.as_str();
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return failed(Connect, format!("cannot connect: {error}"), true),
            Err(_) => {
                let detail = format!("connect timed out after {}", fmt_duration(timeout));
                return failed(ConnectTimeout, detail, true);
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.settings.tls else {
            return Ok(UpstreamStream::Plain(stream));
        };
        match tokio::time::timeout(timeout, tls.handshake(stream, authority)).await {
            Ok(Ok(stream)) => Ok(UpstreamStream::Tls(Box::new(stream))),
            Ok(Err(error)) => failed(Tls, error.detail, !error.refused),
            Err(_) => {
                let detail = format!("TLS handshake not done within {}", fmt_duration(timeout));
                failed(ConnectTimeout, detail, true)
            }
        }
    }

    /// Learns from the response head, decides whether the connection may be reused,
    /// and wraps the body so the connection goes back to the pool when it ends.
    pub(super) fn finish(
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
        let retire = if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Its socket carries the other protocol now (`exchange`): never back to the pool.
            Some(Event::Upgraded)
        } else if close {
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
        if !conn.upload.is_done() {
            // Answered before the upload ended: the rest of it is still to go out on
            // this connection. Dropping the connection closes it.
            counters.event(Event::Discarded);
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
pub(super) struct Failed {
    pub(super) error: hyper::Error,
    /// The request, when hyper gave it back unwritten.
    pub(super) unsent: Option<Request<ProxyBody>>,
    /// The connection broke (closed, reset) rather than the backend speaking bad HTTP.
    pub(super) stale: bool,
}

pub(super) async fn exchange(
    mut conn: Conn,
    req: Request<ProxyBody>,
) -> Result<(Response<Incoming>, Conn), Failed> {
    conn.served += 1;
    let (req, upload) = Upload::track(req);
    conn.upload = upload;
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
        Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            // hyper hands the socket over (to `hyper::upgrade::on` on the response) when
            // its connection future ends, right after the 101 head; driven here so the
            // caller finds the upgrade done.
            std::future::poll_fn(|cx| conn.poll_io(cx)).await;
            Ok((response, conn))
        }
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

/// Whether a request's body has been handed to hyper in full: set by [`Tracked`] when
/// the body ends, read at check-in.
struct Upload(Option<Arc<AtomicBool>>);

impl Upload {
    /// Nothing to send: no body, or the last one went out in full.
    fn done() -> Upload {
        Upload(None)
    }

    fn is_done(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|sent| sent.load(Ordering::Acquire))
    }

    /// Wraps a request body that has something to send so its end is seen.
    fn track(req: Request<ProxyBody>) -> (Request<ProxyBody>, Upload) {
        let body = req.body();
        let declared = body.size_hint().exact();
        // hyper sends neither kind of body: an ended one is no body at all, a declared
        // zero length ends with the head.
        if body.is_end_stream() || declared == Some(0) {
            return (req, Upload::done());
        }
        let sent = Arc::new(AtomicBool::new(false));
        let (parts, inner) = req.into_parts();
        let tracked = Tracked {
            inner,
            left: declared,
            sent: sent.clone(),
        };
        (
            Request::from_parts(parts, tracked.boxed_unsync()),
            Upload(Some(sent)),
        )
    }
}

/// A request body that marks its upload sent once hyper has taken all of it: the
/// end of the stream, its last frame (`is_end_stream` after it, or trailers), or,
/// for a declared length, that many bytes, after which hyper polls no further.
struct Tracked {
    inner: ProxyBody,
    /// Bytes still to go of a declared length.
    left: Option<u64>,
    sent: Arc<AtomicBool>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // `ProxyBody` is a pinned box, so `Tracked` is `Unpin`.
        let this = self.get_mut();
        let polled = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let ended = match &polled {
            None => true,
            Some(Err(_)) => false,
            Some(Ok(frame)) => {
                if let (Some(left), Some(data)) = (this.left.as_mut(), frame.data_ref()) {
                    *left = left.saturating_sub(data.len() as u64);
                }
                frame.is_trailers() || this.left == Some(0) || this.inner.is_end_stream()
            }
        };
        if ended {
            this.sent.store(true, Ordering::Release);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
        crate::upstream::find_source::<std::io::Error>(error).map(|e| e.kind()),
        Some(ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
    )
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
