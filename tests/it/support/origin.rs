//! Origins for what the simulated backend does not do: a scripted HTTP/1.1 server that
//! counts requests and keeps their headers, one that accepts connections and never
//! answers, and one that fails on command (holds, resets, fails its health check).
//! Each stops listening when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

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

/// What a [`FaultyOrigin`] does with a request (health checks aside) when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers it from the script.
    None,
    /// Reads it and never answers; the connection stays open until the peer closes it.
    Hold,
    /// Reads it, then resets the connection (RST) without a byte of response.
    Reset,
}

/// An origin that fails on command: [`FaultyOrigin::fail`] sets what it does with the
/// requests that arrive next, [`FaultyOrigin::fail_health_checks`] turns its health
/// check (`/actuator/health`, answered at once and not counted) to 503.
///
/// Every answer says `Connection: close` and closes its connection, so each request
/// arrives on a connection of its own and meets the fault in force when it arrives,
/// never one set for an earlier request on a pooled connection.
pub struct FaultyOrigin {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    fault: Arc<Mutex<Fault>>,
    healthy: Arc<AtomicBool>,
    /// Aborting it drops the listener and every connection (held ones too).
    server: JoinHandle<()>,
}

/// What one [`FaultyOrigin`] connection needs.
struct FaultyState {
    count: Arc<AtomicUsize>,
    fault: Arc<Mutex<Fault>>,
    healthy: Arc<AtomicBool>,
    script: Arc<Script>,
}

impl FaultyOrigin {
    /// Answers with `script(request, n)` (n = 1 for the first request) until told to fail.
    pub async fn start(
        script: impl Fn(&http::request::Parts, usize) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> FaultyOrigin {
        let listener = TcpListener::bind(LOCAL0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FaultyState {
            count: Arc::new(AtomicUsize::new(0)),
            fault: Arc::new(Mutex::new(Fault::None)),
            healthy: Arc::new(AtomicBool::new(true)),
            script: Arc::new(script),
        });
        let (count, fault, healthy) = (
            state.count.clone(),
            state.fault.clone(),
            state.healthy.clone(),
        );
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(serve_faulty(stream, state.clone()));
            }
        });
        FaultyOrigin {
            addr,
            count,
            fault,
            healthy,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What to do with the requests that arrive from now on.
    pub fn fail(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Answers health checks with 503 from now on.
    pub fn fail_health_checks(&self) {
        self.healthy.store(false, Ordering::SeqCst);
    }

    /// Requests received (answered, held or reset), health checks aside.
    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyOrigin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One connection of a [`FaultyOrigin`]: one request, then closed (or reset, or held).
async fn serve_faulty(mut stream: TcpStream, state: Arc<FaultyState>) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut fields);
    if !matches!(parsed.parse(&head), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut request = Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    for field in parsed.headers.iter() {
        request = request.header(field.name, field.value);
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let response = if parts.uri.path() == "/actuator/health" {
        let status = if state.healthy.load(Ordering::SeqCst) {
            200
        } else {
            503
        };
        respond(status, &[], "")
    } else {
        let n = state.count.fetch_add(1, Ordering::SeqCst) + 1;
        let fault = *state.fault.lock().unwrap();
        match fault {
            Fault::None => (state.script)(&parts, n),
            Fault::Hold => {
                // Until the peer gives up on it.
                let _ = stream.read_to_end(&mut Vec::new()).await;
                return;
            }
            Fault::Reset => {
                // SO_LINGER 0: closing sends RST, not FIN.
                let _ = stream.set_zero_linger();
                return;
            }
        }
    };
    let _ = write_closing(&mut stream, response).await;
}

/// The next connection to `listener` whose request is not a health check, with its head
/// read: for a test's own origin that writes its answer byte by byte. Health checks
/// (`/actuator/health`) are answered 200 and closed.
pub async fn next_request(listener: &TcpListener) -> TcpStream {
    loop {
        let (mut stream, _) = listener.accept().await.unwrap();
        let Some(head) = read_head(&mut stream).await else {
            continue;
        };
        if !head.starts_with(b"GET /actuator/health ") {
            return stream;
        }
        tokio::spawn(async move { write_closing(&mut stream, respond(200, &[], "")).await });
    }
}

/// Reads a request head (GET-style, no body) within 5 s; `None` if the peer closed first.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(head)
}

/// Writes `response` with `Content-Length` and `Connection: close`, then closes the
/// connection once the peer has (within 5 s).
async fn write_closing(
    stream: &mut TcpStream,
    response: Response<Full<Bytes>>,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut Vec::new())).await;
    Ok(())
}
