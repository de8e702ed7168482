//! Origins for what the simulated backend does not do: a scripted HTTP/1.1 server that
//! counts requests and keeps their headers, and one that accepts connections and never
//! answers. Each stops listening when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::LOCAL0;

type Script = dyn Fn(&http::request::Parts, usize) -> Response<Full<Bytes>> + Send + Sync;

/// A scripted origin: answers with `script(request, n)` (n = 1 for the first
/// request) after `delay`, counting requests and keeping their headers. Requests
/// to a path containing `/hold` wait until [`Origin::release`], so a test can keep
/// requests in flight for as long as it needs, without depending on timing.
/// Health checks (`/actuator/health`) are answered at once and not counted (n = 0).
pub struct Origin {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    hold: tokio::sync::watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Origin {
    pub async fn start(
        delay: Duration,
        script: impl Fn(&http::request::Parts, usize) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Origin {
        let listener = TcpListener::bind(LOCAL0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let (hold, released) = tokio::sync::watch::channel(false);
        let (c, s) = (count.clone(), seen.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, s, script) = (c.clone(), s.clone(), script.clone());
                let released = released.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (c, s, script) = (c.clone(), s.clone(), script.clone());
                        let mut released = released.clone();
                        async move {
                            let (parts, _) = req.into_parts();
                            let n = if parts.uri.path() == "/actuator/health" {
                                0
                            } else {
                                s.lock().unwrap().push(parts.headers.clone());
                                c.fetch_add(1, Ordering::SeqCst) + 1
                            };
                            if n > 0 {
                                tokio::time::sleep(delay).await;
                            }
                            if parts.uri.path().contains("/hold") {
                                let _ = released.wait_for(|r| *r).await;
                            }
                            Ok::<_, Infallible>(script(&parts, n))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin {
            addr,
            count,
            seen,
            hold,
            server,
        }
    }

    /// An origin that answers every request with `status` and `body`, at once.
    pub async fn canned(status: u16, body: &'static str) -> Origin {
        Origin::start(Duration::ZERO, move |_, _| respond(status, &[], body)).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Lets every held request (and any later one) be answered.
    pub fn release(&self) {
        self.hold.send_replace(true);
    }

    /// Requests received, health checks aside.
    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The headers of the last request received, health checks aside.
    pub fn last_headers(&self) -> HeaderMap {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A response for an [`Origin`] script.
pub fn respond(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    for (n, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

/// An origin that accepts connections and holds them open without ever answering.
pub struct Stalled {
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Stalled {
    pub async fn start() -> Stalled {
        let listener = TcpListener::bind(LOCAL0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Stalled { addr, server }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.server.abort();
    }
}
