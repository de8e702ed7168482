//! One HTTP/1.1 connection of the simulated backend, with Tomcat's connection
//! rules: idle connections close after `keepAliveTimeout` without a response,
//! and the `maxKeepAliveRequests`-th response carries `Connection: close`.

use super::body::SimBody;
use super::handler::{App, Port};
use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// What the keep-alive watchdog needs to know about one connection.
#[derive(Debug)]
struct ConnState {
    opened: Instant,
    /// Nanoseconds after `opened` of the last byte read or written, or the last response finished.
    last_activity: AtomicU64,
    /// Requests whose response has not been fully sent yet.
    in_flight: AtomicUsize,
    /// Signalled when `in_flight` drops to zero.
    idle: Notify,
    requests: AtomicU32,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            opened: Instant::now(),
            last_activity: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            requests: AtomicU32::new(0),
        }
    }

    fn touch(&self) {
        let nanos = Instant::now().duration_since(self.opened).as_nanos();
        self.last_activity
            .fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    fn last_activity(&self) -> Instant {
        self.opened + Duration::from_nanos(self.last_activity.load(Ordering::SeqCst))
    }
}

/// Marks a request in flight on its connection until the response body is done.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: &Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_one();
        }
    }
}

pin_project_lite::pin_project! {
    /// A socket that records when bytes last moved, for the keep-alive timeout.
    struct ActivityIo<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
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
            this.state.touch();
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
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.state.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.state.touch();
        }
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

/// Serves one accepted connection until the client closes it, Tomcat's rules
/// close it, or `shutdown` turns true.
pub(crate) async fn serve(
    stream: TcpStream,
    app: Arc<App>,
    port: Port,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    app.stats.connection_opened();
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(ActivityIo {
        inner: stream,
        state: Arc::clone(&state),
    });
    let service = {
        let state = Arc::clone(&state);
        let app = Arc::clone(&app);
        service_fn(move |req: Request<Incoming>| {
            let in_flight = InFlight::new(&state);
            let nth = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let app = Arc::clone(&app);
            async move {
                let mut response: Response<SimBody> = app.handle(req, port).await;
                let max = app.cfg.max_keep_alive_requests;
                if max > 0 && nth >= max {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    app.stats.connection_closed_max_requests();
                }
                response.body_mut().hold(in_flight);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut conn = pin!(http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, service));

    let keep_alive = Duration::from_millis(app.cfg.keep_alive_timeout_ms);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "sim connection ended with an error");
                }
                return;
            }
            () = idle_timeout(&state, keep_alive), if !closing && !keep_alive.is_zero() => {
                app.stats.connection_closed_idle();
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = stop_requested(&mut shutdown), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Resolves once the connection has had no request in flight and no traffic for `timeout`.
async fn idle_timeout(state: &ConnState, timeout: Duration) {
    loop {
        if state.in_flight.load(Ordering::SeqCst) > 0 {
            state.idle.notified().await;
            continue;
        }
        let deadline = state.last_activity() + timeout;
        if Instant::now() >= deadline {
            if state.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            continue;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_waits_for_quiet_and_no_request() {
        let state = Arc::new(ConnState::new());
        let timeout = Duration::from_millis(200);
        let start = Instant::now();

        let guard = InFlight::new(&state);
        let waiter = tokio::spawn({
            let state = Arc::clone(&state);
            async move { idle_timeout(&state, timeout).await }
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
    async fn activity_pushes_the_deadline() {
        let state = Arc::new(ConnState::new());
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let waiter = tokio::spawn({
            let state = Arc::clone(&state);
            async move { idle_timeout(&state, timeout).await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        state.touch();
        waiter.await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(350));
    }
}
