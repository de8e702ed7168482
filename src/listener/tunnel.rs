//! An upgraded connection (a WebSocket after `101 Switching Protocols`): the client's
//! socket and the backend's spliced, bytes copied both ways as they come, until either
//! side closes, nothing passes either way for `upgrade_idle_timeout_ms`, or the drain
//! deadline passes.
//!
//! The handler leaves the [`Tunnel`] in the connection's [`TunnelSlot`] as it answers
//! 101; hyper's connection future ends once the 101 is written and hands the client
//! socket over, and the connection task then runs the tunnel, still holding the
//! connection's `max_connections` slot and its place in the drain.
//!
//! Not here: deciding to upgrade and forwarding the handshake (`forward/handler.rs`),
//! keeping the backend's connection out of the pool (`upstream/pool/conn.rs`), the client
//! IO's passthrough once upgraded (`framing.rs`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics as m;

/// Both sides of one upgraded connection, before they are spliced.
pub struct Tunnel {
    /// The client's socket, handed over by hyper once the 101 is written.
    client: OnUpgrade,
    /// The backend's socket, taken over from its pooled connection.
    backend: crate::upstream::Upgraded,
    /// The upstream's name, for the open-tunnels gauge.
    upstream: String,
}

impl Tunnel {
    pub(crate) fn new(
        client: OnUpgrade,
        backend: crate::upstream::Upgraded,
        upstream: &str,
    ) -> Tunnel {
        Tunnel {
            client,
            backend,
            upstream: upstream.to_string(),
        }
    }

    /// Splices the two sides until the tunnel ends (see [`splice`]); counted in
    /// `loadgate_upgraded_connections_open` meanwhile. Ends at once when the client's
    /// socket never came (the 101 could not be written).
    pub(super) async fn run(self, idle: Duration, abort: &mut watch::Receiver<bool>) -> Ended {
        let client = match self.client.await {
            Ok(client) => client,
            Err(error) => {
                tracing::debug!(%error, "the client connection ended before its upgrade");
                return Ended::Failed;
            }
        };
        let open = metrics::gauge!(m::UPGRADED_CONNECTIONS_OPEN,
            m::LABEL_UPSTREAM => self.upstream.clone());
        open.increment(1.0);
        let ended = splice(TokioIo::new(client), self.backend, idle, abort).await;
        open.decrement(1.0);
        ended
    }
}

/// Where the handler leaves a connection's [`Tunnel`] when it answers 101; the connection
/// task takes it once hyper is done with the connection. Cheap to clone.
#[derive(Clone, Default)]
pub struct TunnelSlot(Arc<Mutex<Option<Tunnel>>>);

impl std::fmt::Debug for TunnelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSlot").finish_non_exhaustive()
    }
}

impl TunnelSlot {
    pub fn put(&self, tunnel: Tunnel) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tunnel);
    }

    pub(super) fn take(&self) -> Option<Tunnel> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// How long the other side may go on once one side has closed its sending half. A
/// WebSocket is over once either side's TCP stream ends (RFC 6455 §7.1.1: the server
/// closes it after the closing handshake): what may still come is the other side's
/// Close frame, within milliseconds. Without this bound a client that keeps its socket
/// open after the server's close (as some libraries do until they are dropped) would
/// hold the tunnel until the idle timeout.
const HALF_CLOSED_LINGER: Duration = Duration::from_secs(2);

/// Not yet: no side has closed.
const NEVER: u64 = u64::MAX;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// Both sides closed (each side's close passed on to the other), one failed, or one
    /// closed and the other did not follow within [`HALF_CLOSED_LINGER`].
    Closed,
    /// Nothing passed either way for the idle timeout.
    Idle,
    /// The drain deadline passed.
    Drain,
    /// The client's side never came.
    Failed,
}

/// Copies bytes both ways between `client` and `backend` until both have closed (a side
/// that closes has its close passed on: the other's writing half is shut down) or one
/// fails; until [`HALF_CLOSED_LINGER`] after the first close; until no byte has come from
/// either for `idle`; or until `abort` is raised.
/// Both are closed when it returns. Each direction holds one 8 KiB buffer (tokio's
/// `copy_bidirectional`): large WebSocket frames stream through it, and ten thousand
/// idle tunnels cost 160 MiB rather than a frame's worth each.
pub(super) async fn splice<C, B>(
    client: C,
    backend: B,
    idle: Duration,
    abort: &mut watch::Receiver<bool>,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let stamps = Arc::new(Stamps {
        last: AtomicU64::new(0),
        closed: AtomicU64::new(NEVER),
        first_close: tokio::sync::Notify::new(),
    });
    let mut client = Stamped::new(client, started, stamps.clone());
    let mut backend = Stamped::new(backend, started, stamps.clone());
    let at = |ms: u64| started + Duration::from_millis(ms);
    let quiet = async {
        loop {
            let silent = at(stamps.last.load(Ordering::Relaxed)) + idle;
            let closed = stamps.closed.load(Ordering::Relaxed);
            let (due, ended) = match closed {
                NEVER => (silent, Ended::Idle),
                closed if at(closed) + HALF_CLOSED_LINGER < silent => {
                    (at(closed) + HALF_CLOSED_LINGER, Ended::Closed)
                }
                _ => (silent, Ended::Idle),
            };
            if Instant::now() >= due {
                return ended;
            }
            // A first close moves the deadline earlier; a byte only ever later.
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = stamps.first_close.notified(), if closed == NEVER => {}
            }
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
            if let Err(error) = copied {
                tracing::debug!(%error, "upgraded connection ended with an error");
            }
            Ended::Closed
        }
        ended = quiet => ended,
        () = super::raised(abort) => Ended::Drain,
    }
}

/// When the tunnel's sides last read a byte and first read their end, in milliseconds
/// since the splice began.
struct Stamps {
    last: AtomicU64,
    /// [`NEVER`] until a side reads its end.
    closed: AtomicU64,
    /// Told when `closed` is set.
    first_close: tokio::sync::Notify,
}

pin_project_lite::pin_project! {
    /// An IO that notes in its [`Stamps`] when it reads a byte and when it reads its end.
    struct Stamped<IO> {
        #[pin]
        io: IO,
        started: Instant,
        stamps: Arc<Stamps>,
    }
}

impl<IO> Stamped<IO> {
    fn new(io: IO, started: Instant, stamps: Arc<Stamps>) -> Self {
        Stamped {
            io,
            started,
            stamps,
        }
    }
}

impl<IO: AsyncRead> AsyncRead for Stamped<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let ms = u64::try_from(this.started.elapsed().as_millis()).unwrap_or(NEVER - 1);
            if buf.filled().len() > before {
                this.stamps.last.store(ms, Ordering::Relaxed);
            } else if buf.remaining() > 0 {
                // The end of this side's stream: the first one starts the linger.
                let first = this.stamps.closed.compare_exchange(
                    NEVER,
                    ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if first.is_ok() {
                    // A permit is kept if the watcher is not waiting yet.
                    this.stamps.first_close.notify_one();
                }
            }
        }
        polled
    }
}

impl<IO: AsyncWrite> AsyncWrite for Stamped<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tunnel between two in-memory sockets: its far ends, as the client and the
    /// backend hold them, and the running splice.
    fn tunnel(
        idle: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        watch::Sender<bool>,
        tokio::task::JoinHandle<Ended>,
    ) {
        let (client, client_side) = tokio::io::duplex(64 * 1024);
        let (backend, backend_side) = tokio::io::duplex(64 * 1024);
        let (abort, mut aborted) = watch::channel(false);
        let task =
            tokio::spawn(
                async move { splice(client_side, backend_side, idle, &mut aborted).await },
            );
        (client, backend, abort, task)
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_flow_both_ways_and_each_close_is_passed_on() {
        let (mut client, mut backend, _abort, task) = tunnel(Duration::from_secs(60));
        client.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        backend.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        backend.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the backend sees the client's close");
        backend.write_all(b"bye").await.unwrap();
        backend.shutdown().await.unwrap();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye", "the backend may still answer after it");
        assert_eq!(task.await.unwrap(), Ended::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_byte_either_way() {
        let idle = Duration::from_secs(10);
        let (mut client, mut backend, _abort, task) = tunnel(idle);
        let mut got = [0; 1];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            backend.write_all(b"h").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
        }
        assert!(!task.is_finished(), "a heartbeat every 6 s keeps it open");
        let silent = Instant::now();
        assert_eq!(task.await.unwrap(), Ended::Idle);
        assert_eq!(silent.elapsed(), idle);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "both sides are closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_that_does_not_follow_a_close_is_closed_after_the_linger() {
        let (mut client, mut backend, _abort, task) = tunnel(Duration::from_secs(60));
        // The splice is waiting on both sides when the backend closes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        backend.write_all(b"close frame").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"close frame", "the close is passed on");
        // The client keeps its side open and says nothing more.
        let closed = Instant::now();
        assert_eq!(task.await.unwrap(), Ended::Closed);
        assert_eq!(closed.elapsed(), HALF_CLOSED_LINGER);
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_deadline_closes_a_busy_tunnel() {
        let (mut client, mut backend, abort, task) = tunnel(Duration::from_secs(60));
        client.write_all(b"x").await.unwrap();
        abort.send_replace(true);
        assert_eq!(task.await.unwrap(), Ended::Drain);
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        client.read_to_end(&mut rest).await.unwrap();
    }
}
