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

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use super::h1::{self, Framing, H1Error, Head, Io, Outgoing, Reader, Sending, UpgradedSlot};
use super::keepalive::{at_request_limit, parse_keep_alive, wants_close};
use super::stats::Event;
use super::{Host, Inner};
use crate::http::body::BoxError;
use crate::http::error::UpstreamErrorKind;
use crate::http::tls_client::UpstreamStream;
use crate::upstream::{fmt_duration, SendError};

/// One HTTP/1.1 connection (`h1.rs` speaks it). It is never polled by a task of its
/// own: the request using the connection drives it (while waiting for the response
/// head, then from the response body's `poll_frame` until the body ends), so an
/// exchange never hops between tasks or worker threads. An idle connection is not
/// polled at all; a backend close is seen when it is next checked out (or by the sweep).
pub(super) struct Conn {
    /// `None` once the connection has ended.
    io: Option<Io>,
    /// Requests sent on it so far.
    served: u32,
    /// Further requests the backend allows, from `Keep-Alive: max=N`.
    allowed: Option<u32>,
}

impl Conn {
    /// For an idle connection: `Ready` once it has ended (closed by the backend, or sent
    /// bytes nobody asked for).
    pub(super) fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(());
        };
        std::task::ready!(io.poll_idle_end(cx));
        self.io = None;
        Poll::Ready(())
    }

    pub(super) fn is_closed(&self) -> bool {
        self.io.is_none()
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
                    self.counters.event(Event::Opened);
                    return Ok(Conn {
                        io: Some(Io::new(stream)),
                        served: 0,
                        allowed: None,
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
        exchanged: Exchanged,
    ) -> Response<crate::http::body::ProxyBody> {
        let Exchanged {
            head,
            sending,
            framing,
        } = exchanged;
        let keep_alive = parse_keep_alive(&head.headers);
        if let Some(timeout) = keep_alive.timeout {
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            host.learned_timeout_ms.store(ms, Ordering::Relaxed);
        }
        if keep_alive.max.is_some() {
            conn.allowed = keep_alive.max;
        }
        let close = wants_close(&head.headers) || head.version < Version::HTTP_11;
        if close {
            host.observe_close_after(conn.served);
        }
        let upgraded = head.status == StatusCode::SWITCHING_PROTOCOLS;
        let retire = if upgraded {
            // Its socket carries the other protocol now: never back to the pool.
            Some(Event::Upgraded)
        } else if close || framing == Framing::UntilClose {
            Some(Event::ClosedByBackend)
        } else if at_request_limit(conn.served, conn.allowed, host.learned_max()) {
            Some(Event::RetiredMax)
        } else {
            None
        };
        let mut response = Response::new(());
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        if let Some(reason) = head.reason {
            response.extensions_mut().insert(reason);
        }
        if upgraded {
            if let Some(io) = conn.io.take() {
                response.extensions_mut().insert(UpgradedSlot::new(io));
            }
        }
        let mut checkin = CheckIn {
            pool: self.clone(),
            host: host.clone(),
            conn: Some(conn),
            retire,
        };
        let reader = Reader::new(framing);
        if reader.is_done() {
            // Nobody will poll an empty body to its end: the exchange is over now.
            checkin.give_back(sending.is_done());
            return response.map(|()| crate::http::body::empty());
        }
        let body = PooledBody {
            sending,
            reader,
            checkin: Some(checkin),
        };
        response.map(|()| body.boxed_unsync())
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
    /// The exchange is over: back to the idle stack if the connection can carry
    /// another one; `upload_done` says whether the request went out in full.
    fn give_back(&mut self, upload_done: bool) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let counters = &self.pool.counters;
        if let Some(event) = self.retire {
            counters.event(event);
            return;
        }
        let Some(io) = conn.io.as_mut() else {
            counters.event(Event::ClosedByBackend);
            return;
        };
        if !upload_done || io.has_unread() {
            // Answered before the upload ended: the rest of it is still to go out on
            // this connection. Or the backend sent more than its response. Dropping
            // the connection closes it.
            counters.event(Event::Discarded);
            return;
        }
        io.settle();
        if !self.host.idle.push(conn, self.pool.settings.max_idle) {
            counters.event(Event::Discarded);
        }
    }

    fn io(&mut self) -> Option<&mut Io> {
        self.conn.as_mut().and_then(|c| c.io.as_mut())
    }
}

impl Drop for CheckIn {
    fn drop(&mut self) {
        // Body dropped or failed before its end: dropping the connection closes it.
        if self.conn.take().is_some() {
            self.pool.counters.event(Event::Discarded);
        }
    }
}

/// A response body read off its connection, which goes back to the pool at its end.
struct PooledBody {
    /// The request body, when the backend answered before it was all sent: sent on
    /// while the response is read.
    sending: Sending,
    reader: Reader,
    /// `None` once the body has ended or failed.
    checkin: Option<CheckIn>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(io) = this.checkin.as_mut().and_then(CheckIn::io) else {
            return Poll::Ready(None);
        };
        let _ = this.sending.poll(io, cx);
        if let Some(error) = this.sending.take_body_failure() {
            // The backend still waits for the rest of the upload: its response may never
            // end. Dropping the connection closes it.
            this.checkin.take();
            return Poll::Ready(Some(Err(error.into())));
        }
        let polled = std::task::ready!(this.reader.poll_frame(io, cx));
        match &polled {
            Some(Err(_)) => {
                this.checkin.take();
            }
            _ if this.reader.is_done() => {
                if let Some(mut checkin) = this.checkin.take() {
                    checkin.give_back(this.sending.is_done());
                }
            }
            _ => {}
        }
        Poll::Ready(polled.map(|frame| frame.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.exact_length() {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}

/// A response head received on a connection, and what goes with it.
pub(super) struct Exchanged {
    head: Head,
    /// The request body, still being sent if the backend answered early.
    sending: Sending,
    framing: Framing,
}

/// A failed exchange on one connection.
pub(super) struct Failed {
    pub(super) error: H1Error,
    /// The request, when none of it was written (or taken from its body).
    pub(super) unsent: Option<Outgoing>,
    /// The connection broke (closed, reset) rather than the backend speaking bad HTTP.
    pub(super) stale: bool,
}

/// Sends `out` on `conn` and reads the response head. The request body goes out
/// alongside; a backend may answer before it has all arrived.
pub(super) async fn exchange(
    mut conn: Conn,
    mut out: Outgoing,
) -> Result<(Exchanged, Conn), Failed> {
    conn.served += 1;
    let Some(io) = conn.io.as_mut() else {
        return Err(Failed {
            error: H1Error::Closed,
            unsent: Some(out),
            stale: true,
        });
    };
    let mut sending = Sending::start(io, &mut out);
    let result = std::future::poll_fn(|cx| {
        let _ = sending.poll(io, cx);
        if let Some(error) = sending.take_body_failure() {
            // The backend waits for the rest of the body: no answer will come.
            return Poll::Ready(Err(error));
        }
        h1::poll_head(io, cx, out.informational.as_ref())
    })
    .await;
    let head = match result {
        Ok(head) => head,
        Err(error) => {
            let stale = error.is_broken_connection();
            let unsent = (!sending.wrote() && sending.untouched()).then(|| {
                out.body = sending.take_body();
                out
            });
            return Err(Failed {
                error,
                unsent,
                stale,
            });
        }
    };
    if head.status == StatusCode::SWITCHING_PROTOCOLS && !sending.is_done() {
        // The switch comes after the request (RFC 9110 §7.8): what follows it on the
        // connection is the new protocol's, and the rest of the request would be too.
        return Err(Failed {
            error: H1Error::Invalid("a 101 before the request was sent in full"),
            unsent: None,
            stale: false,
        });
    }
    let framing = match Framing::of(&head, out.head_method) {
        Ok(framing) => framing,
        Err(error) => {
            return Err(Failed {
                error,
                unsent: None,
                stale: false,
            })
        }
    };
    Ok((
        Exchanged {
            head,
            sending,
            framing,
        },
        conn,
    ))
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
