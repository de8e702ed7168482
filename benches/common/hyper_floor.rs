//! The least a proxy built on hyper can cost: a reference row for the benchmarks,
//! not a proxy anyone should run.
//!
//! It has loadgate's runtime layout (one current-thread runtime per worker thread,
//! each accepting from the same listener, each with its own stack of idle upstream
//! connections) and hyper's HTTP/1.1 server and client, and nothing else: no header
//! rewriting, no timeouts, no metrics, no routing, no error answers (a failed
//! exchange closes the client connection). Whatever loadgate costs above this row is
//! loadgate's own work; what this row costs above nginx is hyper's.
//!
//! With a rustls server config ([`start_tls`]) it terminates TLS first, as loadgate does
//! (tokio-rustls, ALPN `h2` served by hyper's HTTP/2 server); the backend side stays
//! HTTP/1.1 over plain TCP.

use std::cell::RefCell;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

thread_local! {
    /// This worker thread's idle upstream connections, the last returned on top.
    static IDLE: RefCell<Vec<SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

/// Starts `threads` worker threads serving on `listener`, forwarding every request to
/// `backend`. They run until the process exits.
pub fn start(listener: TcpListener, backend: SocketAddr, threads: usize) {
    start_with(listener, backend, threads, None);
}

/// [`start`], terminating TLS with `tls` on every accepted connection.
pub fn start_tls(
    listener: TcpListener,
    backend: SocketAddr,
    threads: usize,
    tls: Arc<rustls::ServerConfig>,
) {
    start_with(listener, backend, threads, Some(tls));
}

fn start_with(
    listener: TcpListener,
    backend: SocketAddr,
    threads: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    listener
        .set_nonblocking(true)
        .expect("listener can be non-blocking");
    for _ in 0..threads {
        let listener = listener.try_clone().expect("listener clones");
        let tls = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        std::thread::spawn(move || worker(listener, backend, tls));
    }
}

fn worker(listener: TcpListener, backend: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime builds");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener registers");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let tls = tls.clone();
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |req| forward(backend, req));
                let Some(tls) = tls else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    return;
                };
                let Ok(stream) = tls.accept(stream).await else {
                    return;
                };
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let _ = hyper::server::conn::http2::Builder::new(LocalExec)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            });
        }
    });
}

/// Runs HTTP/2 stream tasks on the worker thread's `LocalSet`.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

async fn forward(
    backend: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Returning>, Box<dyn std::error::Error + Send + Sync>> {
    let mut sender = loop {
        match IDLE.with(|idle| idle.borrow_mut().pop()) {
            Some(mut sender) => {
                if sender.ready().await.is_ok() {
                    break sender;
                }
            }
            None => {
                let stream = tokio::net::TcpStream::connect(backend).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::task::spawn_local(connection);
                break sender;
            }
        }
    };
    let response = sender.send_request(req).await?;
    if response.body().is_end_stream() {
        // Nobody polls an empty body: the exchange is over now.
        IDLE.with(|idle| idle.borrow_mut().push(sender));
        return Ok(response.map(|body| Returning { body, sender: None }));
    }
    Ok(response.map(|body| Returning {
        body,
        sender: Some(sender),
    }))
}

/// A response body that puts its connection back on the idle stack at its end.
struct Returning {
    body: Incoming,
    sender: Option<SendRequest<Incoming>>,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(sender) = self.sender.take() {
                IDLE.with(|idle| idle.borrow_mut().push(sender));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
