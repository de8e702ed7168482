//! What one connection is doing: when bytes last moved, how many requests are in flight,
//! and when the next request head started arriving; plus the waits built on that record.
//!
//! The waits are not woken when the record changes: that would cost a task wake-up and
//! a timer reset on every request. A wait checks the record at most `tick` apart instead,
//! where `tick` is the shortest timeout that a change could start. Any deadline a change
//! starts is then at least one `tick` away, so the next check, which comes sooner, sees
//! it in time, and every deadline is still met exactly.
//!
//! Shared by the proxy's client connections (`listener/mod.rs`: header read, keep-alive
//! idle and send timeouts) and the simulated backend (`sim/conn.rs`: Tomcat's keepAliveTimeout). Closing
//! the connection when a wait ends is the caller's business, not this module's.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Version;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// `head_started` when no byte has arrived since the connection went idle.
const NONE: u64 = u64::MAX;

/// The activity record of one connection. Times are nanoseconds after `opened`.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// The last byte read or written, or the last response finished.
    last_io: AtomicU64,
    /// When the connection last went idle: the last response finished (0: opened).
    idle_since: AtomicU64,
    /// The first byte read since the connection went idle, i.e. the start of the next head.
    head_started: AtomicU64,
    /// Requests whose response body has not ended yet.
    in_flight: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// A request on this connection was HTTP/2.
    http2: AtomicBool,
    /// Since when a write has found the socket full with no write getting through
    /// (`NONE`: not blocked): the client is not reading.
    write_blocked_since: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            last_io: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            write_blocked_since: AtomicU64::new(NONE),
        })
    }

    fn now(&self) -> u64 {
        let nanos = Instant::now().duration_since(self.opened).as_nanos();
        u64::try_from(nanos).unwrap_or(NONE - 1)
    }

    fn at(&self, nanos: u64) -> Instant {
        self.opened + Duration::from_nanos(nanos)
    }

    /// Records the outcome of one write to the socket.
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.write_unblocked();
                self.touch();
            }
            Poll::Pending => self.write_blocked(),
            Poll::Ready(_) => {}
        }
    }

    /// Bytes were written. While a request is in flight nothing waits on `last_io` (the
    /// end of the request sets it), so the clock is read only when none is.
    fn touch(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            self.last_io.fetch_max(self.now(), Ordering::SeqCst);
        }
    }

    /// A write found the socket full. Only the first such write of a stall reads the
    /// clock; a client that keeps reading never stalls for long.
    fn write_blocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) == NONE {
            let _ = self.write_blocked_since.compare_exchange(
                NONE,
                self.now(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// A write got through: whatever stall there was is over.
    fn write_unblocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) != NONE {
            self.write_blocked_since.store(NONE, Ordering::SeqCst);
        }
    }

    /// Bytes were read: with no request in flight, the first byte of the next head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return;
        }
        let now = self.now();
        self.last_io.fetch_max(now, Ordering::SeqCst);
        let _ = self
            .head_started
            .compare_exchange(NONE, now, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Marks a request in flight until the returned guard is dropped; attach the guard to
    /// the response body so the request counts until its body has ended or been abandoned.
    pub fn request_started(self: &Arc<Self>, version: Version) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::SeqCst);
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        ActiveRequest(Arc::clone(self))
    }

    /// Requests started on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn snapshot(&self) -> Snapshot {
        let head = self.head_started.load(Ordering::SeqCst);
        Snapshot {
            in_flight: self.in_flight.load(Ordering::SeqCst),
            requests: self.requests.load(Ordering::SeqCst),
            http2: self.http2.load(Ordering::Relaxed),
            idle_since: self.idle_since.load(Ordering::SeqCst),
            head_started: (head != NONE).then_some(head),
            write_blocked_since: match self.write_blocked_since.load(Ordering::SeqCst) {
                NONE => None,
                since => Some(since),
            },
        }
    }

    /// Resolves once the connection has had no request in flight and no traffic for
    /// `timeout` (the simulated Tomcat's keepAliveTimeout). Checks at least every
    /// `timeout`: the end of a request starts no shorter deadline (see the module docs).
    pub async fn quiet_for(&self, timeout: Duration) {
        loop {
            let now = Instant::now();
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep_until(now + timeout).await;
                continue;
            }
            let deadline = self.at(self.last_io.load(Ordering::SeqCst)) + timeout;
            if now >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Resolves when a client connection has outlived its header read or idle timeout;
    /// see `client_deadline` for which applies when. Checks at least every
    /// `min(header_read, idle)`: neither a starting head nor the end of a request can
    /// start a shorter deadline (see the module docs).
    pub async fn client_expiry(&self, limits: ClientTimeouts) -> Expiry {
        let tick = limits.header_read.min(limits.idle).min(limits.send);
        loop {
            let now = Instant::now();
            let next_check = now + tick;
            let wake = match client_deadline(&self.snapshot(), limits) {
                Some((at, expiry)) => {
                    let deadline = self.at(at);
                    if now >= deadline {
                        return expiry;
                    }
                    deadline.min(next_check)
                }
                None => next_check,
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Ends a request's in-flight mark on drop; see [`Activity::request_started`].
#[derive(Debug)]
pub struct ActiveRequest(Arc<Activity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = activity.now();
        activity.last_io.fetch_max(now, Ordering::SeqCst);
        if activity.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            activity.idle_since.store(now, Ordering::SeqCst);
            activity.head_started.store(NONE, Ordering::SeqCst);
        }
    }
}

/// The two client-side timeouts of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// For a request head, from its first byte (or, for the first request, from accept)
    /// to its last.
    pub header_read: Duration,
    /// For a keep-alive connection with nothing in flight and no head started.
    pub idle: Duration,
    /// For a response the client does not read: from the first write that found the
    /// socket full with nothing getting through since.
    pub send: Duration,
}

/// Which timeout ended a connection; the `kind` label of the timeout metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Header,
    Idle,
    Send,
}

impl Expiry {
    pub fn as_str(self) -> &'static str {
        match self {
            Expiry::Header => "header",
            Expiry::Idle => "idle",
            Expiry::Send => "send",
        }
    }
}

/// The parts of [`Activity`] the deadline depends on. Times in nanoseconds after accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    in_flight: usize,
    requests: u64,
    http2: bool,
    idle_since: u64,
    head_started: Option<u64>,
    write_blocked_since: Option<u64>,
}

/// When a client connection in state `s` must close, and why; `None` while a request is
/// in flight (a slow response or a slow upload is not idle).
///
/// - Before its first request, a connection gets `header_read` from accept: opening a
///   connection and sending nothing is the cheapest slowloris there is.
/// - Between HTTP/1.1 requests it may sit idle for `idle`; the first byte of the next
///   head starts the `header_read` clock, so a head trickled in a byte at a time is cut
///   off even though bytes keep moving.
/// - HTTP/2 frames between requests (PING, WINDOW_UPDATE) are not request heads, so an
///   idle HTTP/2 connection gets `idle` from its last response, whatever it reads.
/// - Whatever else holds, a connection whose writes have found its socket full for
///   `send`, with nothing getting through, is closed: its client has stopped reading.
fn client_deadline(s: &Snapshot, limits: ClientTimeouts) -> Option<(u64, Expiry)> {
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(NONE - 1);
    if let Some(since) = s.write_blocked_since {
        return Some((since.saturating_add(nanos(limits.send)), Expiry::Send));
    }
    if s.in_flight > 0 {
        return None;
    }
    if s.requests == 0 {
        return Some((nanos(limits.header_read), Expiry::Header));
    }
    match s.head_started {
        Some(started) if !s.http2 => Some((
            started.saturating_add(nanos(limits.header_read)),
            Expiry::Header,
        )),
        _ => Some((
            s.idle_since.saturating_add(nanos(limits.idle)),
            Expiry::Idle,
        )),
    }
}

pin_project_lite::pin_project! {
    /// A socket that reports to its [`Activity`] when bytes move.
    pub struct ActivityIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.bytes_read();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        this.activity.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        this.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ClientTimeouts = ClientTimeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(75),
        send: Duration::from_secs(60),
    };
    const S: u64 = 1_000_000_000;
    /// A 1 s header timeout against a minute of idle and send time.
    const SHORT_HEADER: ClientTimeouts = ClientTimeouts {
        header_read: Duration::from_secs(1),
        idle: Duration::from_secs(60),
        send: Duration::from_secs(60),
    };

    fn idle_h1(idle_since: u64, head_started: Option<u64>) -> Snapshot {
        Snapshot {
            in_flight: 0,
            requests: 1,
            http2: false,
            idle_since,
            head_started,
            write_blocked_since: None,
        }
    }

    #[test]
    fn deadlines_by_state() {
        let fresh = Snapshot {
            requests: 0,
            head_started: Some(3 * S),
            ..idle_h1(0, None)
        };
        assert_eq!(
            client_deadline(&fresh, LIMITS),
            Some((10 * S, Expiry::Header)),
            "the first head is timed from accept"
        );
        let busy = Snapshot {
            in_flight: 1,
            ..idle_h1(0, Some(S))
        };
        assert_eq!(client_deadline(&busy, LIMITS), None);
        assert_eq!(
            client_deadline(&idle_h1(20 * S, None), LIMITS),
            Some((95 * S, Expiry::Idle))
        );
        assert_eq!(
            client_deadline(&idle_h1(20 * S, Some(50 * S)), LIMITS),
            Some((60 * S, Expiry::Header)),
            "a started head shortens the deadline"
        );
        let h2 = Snapshot {
            http2: true,
            ..idle_h1(20 * S, Some(50 * S))
        };
        assert_eq!(
            client_deadline(&h2, LIMITS),
            Some((95 * S, Expiry::Idle)),
            "HTTP/2 control frames are not heads"
        );
        let stalled = Snapshot {
            in_flight: 1,
            write_blocked_since: Some(30 * S),
            ..idle_h1(0, None)
        };
        assert_eq!(
            client_deadline(&stalled, LIMITS),
            Some((90 * S, Expiry::Send)),
            "a response the client does not read is timed even in flight"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_expires_after_the_send_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = ClientTimeouts {
            header_read: Duration::from_secs(1),
            idle: Duration::from_secs(60),
            send: Duration::from_secs(5),
        };
        let activity = Activity::new();
        // A socket whose peer buffers 64 bytes and reads only when told to.
        let (ours, mut client) = tokio::io::duplex(64);
        let mut io = ActivityIo::new(ours, Arc::clone(&activity));
        let _request = activity.request_started(Version::HTTP_11);
        let start = Instant::now();
        let waiter = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { activity.client_expiry(limits).await }
        });
        let writer = tokio::spawn(async move { io.write_all(&[b'x'; 1024]).await });

        tokio::time::sleep(Duration::from_secs(3)).await;
        // The client reads a little: the stall starts again from the next full socket.
        let mut some = [0u8; 64];
        client.read_exact(&mut some).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !waiter.is_finished(),
            "3 s since the client last read, of 5"
        );
        assert_eq!(waiter.await.unwrap(), Expiry::Send);
        assert_eq!(Instant::now() - start, Duration::from_secs(8));
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_for_waits_for_quiet_and_no_request() {
        let activity = Activity::new();
        let timeout = Duration::from_millis(200);
        let start = Instant::now();

        let guard = activity.request_started(Version::HTTP_11);
        let waiter = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { activity.quiet_for(timeout).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !waiter.is_finished(),
            "a request in flight keeps the connection"
        );
        drop(guard);
        waiter.await.unwrap();
        assert!(Instant::now() - start >= Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_pushes_the_quiet_deadline() {
        let activity = Activity::new();
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let waiter = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { activity.quiet_for(timeout).await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        activity.touch();
        waiter.await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(350));
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_is_timed_from_its_first_byte() {
        let limits = SHORT_HEADER;
        let activity = Activity::new();
        let start = Instant::now();
        drop(activity.request_started(Version::HTTP_11));
        let waiter = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { activity.client_expiry(limits).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "idle for 5 s of 60");
        activity.bytes_read();
        assert_eq!(waiter.await.unwrap(), Expiry::Header);
        assert_eq!(Instant::now() - start, Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_idle_timeout() {
        let limits = SHORT_HEADER;
        let activity = Activity::new();
        let start = Instant::now();
        let guard = activity.request_started(Version::HTTP_11);
        let waiter = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { activity.client_expiry(limits).await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!waiter.is_finished(), "a request in flight is not idle");
        drop(guard);
        assert_eq!(waiter.await.unwrap(), Expiry::Idle);
        assert_eq!(Instant::now() - start, Duration::from_secs(90));
    }
}
