//! What a client sees of what a backend sends, through loadgate's own HTTP/1.1 client
//! (`upstream/pool/h1.rs`): ambiguous or broken responses refused (a 502, or a response
//! cut short), never guessed at; good ones passed on whole; a backend connection reused
//! only when its exchange ended cleanly; request bodies framed as the backend expects.
//!
//! The backend is a raw TCP listener writing scripted bytes, so it can send what no
//! HTTP library would; the proxy runs its default configuration
//! ([`default_config`](crate::support::default_config)). Not here: the pool against backends that close keep-alive
//! connections (`upstream.rs`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loadgate::listener::Proxy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use crate::support::*;

/// The longest any one step of a test waits for the proxy or the backend.
const WAIT: Duration = Duration::from_secs(5);

/// A backend that answers every request with `response`, keeping the connection open,
/// and a proxy in front of it.
async fn proxy_to(response: &'static str) -> (Backend, Proxy) {
    let backend = Backend::start(move |_| answer(response)).await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    (backend, proxy)
}

fn url(proxy: &Proxy, path: &str) -> String {
    format!("http://{}{path}", proxy.addr())
}

const GET: &str = "GET /api/x HTTP/1.1\r\nHost: shop.example\r\n\r\n";

#[tokio::test]
async fn a_status_line_without_a_reason_phrase_is_read() {
    let (_backend, proxy) = proxy_to("HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok").await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "ok");
}

// ---- Responses refused: the client gets a 502 --------------------------------------

#[tokio::test]
async fn a_response_with_both_transfer_encoding_and_content_length_is_a_502() {
    let (backend, proxy) = proxy_to(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(got.json()["cause"], "protocol", "{}", got.text());
    assert_eq!(backend.received().len(), 1, "sent once, not retried");
}

#[tokio::test]
async fn differing_content_lengths_are_a_502() {
    let (backend, proxy) =
        proxy_to("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!").await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(got.json()["cause"], "protocol", "{}", got.text());
    assert_eq!(backend.received().len(), 1);
}

#[tokio::test]
async fn a_content_length_repeated_with_one_value_is_accepted() {
    let (_backend, proxy) = proxy_to("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello").await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "hello");
}

#[tokio::test]
async fn an_obs_folded_header_line_is_a_502() {
    let (backend, proxy) = proxy_to(
        "HTTP/1.1 200 OK\r\nX-Folded: first part\r\n  continued\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(backend.received().len(), 1);
}

#[tokio::test]
async fn a_response_head_over_64_kib_is_a_502() {
    let big = "a".repeat(70 * 1024);
    let response = format!("HTTP/1.1 200 OK\r\nX-Big: {big}\r\nContent-Length: 2\r\n\r\nok");
    let backend = Backend::start(move |_| answer(response.clone())).await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(backend.received().len(), 1);
}

#[tokio::test]
async fn a_body_already_broken_when_its_head_arrives_is_a_502() {
    // One write: the bad chunk is in the proxy's hands before anything went to the
    // client, so it answers with an error rather than a head and then a cut.
    let (backend, proxy) =
        proxy_to("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n").await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(got.json()["cause"], "protocol", "{}", got.text());
    assert_eq!(backend.received().len(), 1, "sent once, not retried");
}

// ---- Bodies that break after the head: the client's response is cut short ----------

#[tokio::test]
async fn a_body_shorter_than_its_content_length_reaches_the_client_cut_short() {
    // The backend closes once the client has the first bytes: the response has begun.
    // (Closed with the head, it is a 502: see the test above.)
    let gate = Arc::new(Notify::new());
    let opened = gate.clone();
    let backend = Backend::start(move |_| {
        answer_and_close("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello").then(&opened, "")
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    client.send(GET.as_bytes()).await;
    client.read_until(b"hello").await;
    gate.notify_one();
    let (bytes, ended) = client.rest().await;
    assert!(ended, "the connection stays open after a short body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let end = text.find("\r\n\r\n").expect("a response head") + 4;
    let head = text[..end].to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{text}");
    assert!(head.contains("\r\ncontent-length: 10\r\n"), "{text}");
    assert!(
        bytes.len() - end < 10,
        "a complete body reached the client: {text:?}"
    );
}

#[tokio::test]
async fn a_malformed_chunk_size_cuts_the_chunked_response_short() {
    // The bad chunk comes once the client has the first one: the response has begun.
    let gate = Arc::new(Notify::new());
    let opened = gate.clone();
    let backend = Backend::start(move |_| {
        answer_and_close("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .then(&opened, "zz\r\nworld\r\n0\r\n\r\n")
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    client.send(GET.as_bytes()).await;
    client.read_until(b"hello\r\n").await;
    gate.notify_one();
    let (bytes, ended) = client.rest().await;
    assert!(ended, "the connection stays open after a broken body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let end = text.find("\r\n\r\n").expect("a response head") + 4;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text[..end]
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{text}"
    );
    assert!(!text.ends_with("0\r\n\r\n"), "{text:?}");
    assert!(
        matches!(dechunk(&bytes[end..]), Ok(None)),
        "the chunked body must not end: {text:?}"
    );
    assert!(!text.contains("world"), "{text:?}");
}

// ---- Good responses: passed on whole -------------------------------------------------

#[tokio::test]
async fn a_close_delimited_body_arrives_whole_and_its_connection_is_not_reused() {
    let backend = Backend::start(|request| {
        answer_and_close(format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of {} until the close",
            request.path
        ))
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    let first = client.get("/api/first").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "all of /api/first until the close");
    let second = client.get("/api/second").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "all of /api/second until the close");
    let connections: Vec<usize> = backend.received().iter().map(|r| r.connection).collect();
    assert_eq!(
        connections,
        [1, 2],
        "a new backend connection for the second"
    );
}

#[tokio::test]
async fn chunk_extensions_and_trailers_leave_the_body_whole() {
    let (_backend, proxy) = proxy_to(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
         5;name=value\r\nhello\r\n\
         7 ; quoted=\"a b;c\";flag\r\n, world\r\n\
         1;x\r\n!\r\n\
         0;last=yes\r\nX-Checksum: abc123\r\nX-Other: 1\r\n\r\n",
    )
    .await;
    let got = get(&client(), &url(&proxy, "/api/x")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "hello, world!");
}

#[tokio::test]
async fn sequential_requests_share_one_backend_connection() {
    let backend = Backend::start(|request| {
        let body = &request.path["/api/".len()..];
        answer(format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    for name in ["one", "two"] {
        let got = client.get(&format!("/api/{name}")).await;
        assert_eq!((got.status, got.text().as_str()), (200, name));
    }
    let received = backend.received();
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/api/one", "/api/two"]);
    assert_eq!(backend.connections(), 1, "both requests on one connection");
}

#[tokio::test]
async fn bytes_after_a_complete_response_keep_its_connection_out_of_the_pool() {
    let backend = Backend::start(|request| {
        if request.path == "/api/first" {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE")
        } else {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        }
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    let first = client.get("/api/first").await;
    assert_eq!((first.status, first.text().as_str()), (200, "ok"));
    let second = client.get("/api/second").await;
    assert_eq!((second.status, second.text().as_str()), (200, "second"));
    let seen: Vec<(usize, String)> = backend
        .received()
        .into_iter()
        .map(|r| (r.connection, r.path))
        .collect();
    assert_eq!(
        seen,
        [
            (1, "/api/first".to_string()),
            (2, "/api/second".to_string())
        ],
        "the polluted connection was reused"
    );
}

#[tokio::test]
async fn a_head_response_has_no_body_and_its_connection_is_reused() {
    let backend = Backend::start(|request| {
        if request.method == "HEAD" {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        } else {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
        }
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    client
        .send(b"HEAD /api/x HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    let head = client.response(true).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("100"));
    assert!(head.body.is_empty());
    // Any body bytes after the HEAD response would come before the GET's status line.
    let got = client.get("/api/x").await;
    assert_eq!((got.status, got.text().as_str()), (200, "get"));
    let seen: Vec<(usize, String)> = backend
        .received()
        .into_iter()
        .map(|r| (r.connection, r.method))
        .collect();
    assert_eq!(seen, [(1, "HEAD".to_string()), (1, "GET".to_string())]);
}

#[tokio::test]
async fn an_unrequested_100_continue_is_not_passed_to_the_client() {
    let (_backend, proxy) =
        proxy_to("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
            .await;
    let mut client = RawClient::connect(&proxy).await;
    let got = client.get("/api/x").await;
    assert_eq!(got.status, 200, "the first response the client reads");
    assert_eq!(got.text(), "final");
}

// ---- Request bodies: framed as the backend expects -----------------------------------

#[tokio::test]
async fn a_chunked_upload_reaches_the_backend_chunked_and_whole() {
    let backend =
        Backend::start(|_| answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    // Larger than the 64 KiB read ahead, so it streams rather than being sent sized.
    let payload: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    let mut request =
        b"POST /api/upload HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for chunk in payload.chunks(30_000) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut client = RawClient::connect(&proxy).await;
    client.send(&request).await;
    let got = client.response(false).await;
    assert_eq!((got.status, got.text().as_str()), (200, "ok"));

    let received = backend.received();
    assert_eq!(received.len(), 1);
    let upload = &received[0];
    assert_eq!(upload.header("transfer-encoding"), Some("chunked"));
    assert_eq!(upload.header("content-length"), None);
    let decoded = dechunk(&upload.wire_body)
        .expect("well-formed chunks")
        .expect("a complete chunked body");
    assert_eq!(decoded.1, upload.wire_body.len());
    assert!(decoded.0 == payload, "the body the backend decoded differs");
}

#[tokio::test]
async fn a_sized_upload_reaches_the_backend_with_its_exact_length() {
    let backend =
        Backend::start(|_| answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    // One body read ahead in full, one larger than the read ahead, streamed.
    let sizes = [1_000, 300 * 1024];
    for size in sizes {
        let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let mut request = format!(
            "POST /api/upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {size}\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(&payload);
        client.send(&request).await;
        let got = client.response(false).await;
        assert_eq!((got.status, got.text().as_str()), (200, "ok"));
        let upload = backend.received().pop().unwrap();
        assert_eq!(
            upload.header("content-length"),
            Some(size.to_string().as_str())
        );
        assert_eq!(upload.header("transfer-encoding"), None);
        assert!(upload.body == payload, "the {size}-byte body differs");
    }
    // Nothing past either body was taken by the backend for a request of its own.
    assert_eq!(backend.received().len(), sizes.len());
}

#[tokio::test]
async fn a_413_sent_before_the_upload_was_read_reaches_the_client() {
    let backend = Backend::answering_after_the_head(|_| {
        answer_and_close(
            "HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\n\
             Content-Length: 9\r\nConnection: close\r\n\r\ntoo large",
        )
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let size = 8 * 1024 * 1024;
    let mut request = format!(
        "POST /api/upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {size}\r\n\r\n"
    )
    .into_bytes();
    request.resize(request.len() + size, b'x');

    let stream = TcpStream::connect(proxy.addr()).await.expect("connects");
    let (read, mut write) = stream.into_split();
    // The whole upload goes out while the answer is read, as a client's would.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        write
    });
    let got = tokio::time::timeout(WAIT, Wire::new(read).answer(false))
        .await
        .expect("a response within 5 s")
        .expect("a complete response");
    writer.abort();
    assert_eq!(got.status, 413, "{}", got.text());
    assert_eq!(got.text(), "too large");
    assert_eq!(backend.received().len(), 1);
}

#[tokio::test]
async fn an_upload_that_breaks_after_the_backend_answered_ends_the_response() {
    // The backend answers at once with a response that streams while the upload goes
    // on; the client's body then turns out malformed. The backend would wait for the
    // rest of the upload forever, so the proxy ends the response and the connection.
    let backend = Backend::answering_after_the_head(|_| {
        answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    })
    .await;
    let proxy = start_proxy(default_config(backend.addr())).await;
    let mut client = RawClient::connect(&proxy).await;
    // More than the 64 KiB read ahead, so the request is forwarded while it streams.
    let chunk = 70 * 1024;
    let mut request = format!(
        "POST /api/upload HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n{chunk:x}\r\n"
    )
    .into_bytes();
    request.resize(request.len() + chunk, b'x');
    request.extend_from_slice(b"\r\n");
    client.send(&request).await;
    client.read_until(b"first").await;
    client.send(b"zz\r\n").await;
    let (bytes, ended) = client.rest().await;
    assert!(
        ended,
        "the response waits on a backend that waits on the upload: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

// ---- The scripted backend ------------------------------------------------------------

/// One request as the backend read it.
#[derive(Debug, Clone)]
struct Received {
    /// Which of the backend's connections it came on, from 1 (health checks and
    /// actuator polls, on connections of their own, are not counted).
    connection: usize,
    method: String,
    path: String,
    headers: Fields,
    /// The body, unframed (empty when the backend answered after the head).
    body: Vec<u8>,
    /// The body as it came, framing and all.
    wire_body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }
}

/// What the backend writes in answer to a request, and whether it closes then.
struct Reply {
    bytes: Vec<u8>,
    /// Written after `bytes` once the gate opens.
    later: Option<(Arc<Notify>, Vec<u8>)>,
    close: bool,
}

impl Reply {
    /// Writes `bytes` too, once `gate` is notified.
    fn then(mut self, gate: &Arc<Notify>, bytes: impl Into<Vec<u8>>) -> Reply {
        self.later = Some((gate.clone(), bytes.into()));
        self
    }
}

/// `bytes`, written as they are; the connection stays open for the next request.
fn answer(bytes: impl Into<Vec<u8>>) -> Reply {
    Reply {
        bytes: bytes.into(),
        later: None,
        close: false,
    }
}

/// `bytes`, then the backend closes the connection.
fn answer_and_close(bytes: impl Into<Vec<u8>>) -> Reply {
    Reply {
        bytes: bytes.into(),
        later: None,
        close: true,
    }
}

type Script = dyn Fn(&Received) -> Reply + Send + Sync;

/// A raw HTTP/1.1 backend on 127.0.0.1: reads each request (head, and its body by its
/// `Content-Length` or chunked framing) and writes what the script returns, any
/// number of requests per connection. `/actuator/*` requests (the proxy's health checks
/// and actuator polls) are answered aside and not recorded. Stops when dropped.
struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Aborting it drops the listener and every connection.
    server: JoinHandle<()>,
}

struct Shared {
    script: Box<Script>,
    /// Whether a request's body is read before the script answers it.
    reads_bodies: bool,
    connections: AtomicUsize,
    received: Mutex<Vec<Received>>,
}

impl Backend {
    async fn start(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Backend {
        Backend::spawn(true, Box::new(script)).await
    }

    /// A backend that answers once it has a request's head, never reading its body.
    async fn answering_after_the_head(
        script: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        Backend::spawn(false, Box::new(script)).await
    }

    async fn spawn(reads_bodies: bool, script: Box<Script>) -> Backend {
        let listener = TcpListener::bind(LOCAL0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            script,
            reads_bodies,
            connections: AtomicUsize::new(0),
            received: Mutex::new(Vec::new()),
        });
        let state = shared.clone();
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(serve(stream, state.clone()));
            }
        });
        Backend {
            addr,
            shared,
            server,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections that carried a request, health checks and actuator polls aside.
    fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The requests read so far, in order.
    fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const HEALTHY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"UP\"}";
const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";

/// One backend connection: requests answered until the peer closes or a reply closes.
async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let mut wire = Wire::new(stream);
    let mut connection = None;
    while let Some(head) = wire.head().await {
        let Some((method, path, headers)) = parse_request(&head) else {
            return;
        };
        if path.starts_with("/actuator/") {
            let answer = if path == "/actuator/health" {
                HEALTHY
            } else {
                NOT_FOUND
            };
            if wire.stream.write_all(answer).await.is_err() {
                return;
            }
            continue;
        }
        let number = *connection
            .get_or_insert_with(|| shared.connections.fetch_add(1, Ordering::SeqCst) + 1);
        let mut request = Received {
            connection: number,
            method,
            path,
            headers,
            body: Vec::new(),
            wire_body: Vec::new(),
        };
        if shared.reads_bodies {
            let chunked = request
                .header("transfer-encoding")
                .is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"));
            let body = if chunked {
                wire.chunked().await
            } else {
                match request.header("content-length").map(|n| n.trim().parse()) {
                    None => Some((Vec::new(), Vec::new())),
                    Some(Ok(n)) => wire.exactly(n).await.map(|b| (b.clone(), b)),
                    Some(Err(_)) => None,
                }
            };
            let Some((body, wire_body)) = body else {
                return;
            };
            (request.body, request.wire_body) = (body, wire_body);
        }
        let reply = (shared.script)(&request);
        shared.received.lock().unwrap().push(request);
        let _ = wire.stream.write_all(&reply.bytes).await;
        if let Some((gate, bytes)) = reply.later {
            gate.notified().await;
            let _ = wire.stream.write_all(&bytes).await;
        }
        if reply.close {
            let _ = wire.stream.shutdown().await;
            return;
        }
    }
}

/// Method, target and fields (names lowercased) of a request head.
fn parse_request(head: &[u8]) -> Option<(String, String, Fields)> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut fields);
    request.parse(head).ok()?.is_complete().then_some(())?;
    Some((
        request.method?.to_string(),
        request.path?.to_string(),
        fields_of(request.headers),
    ))
}

/// Header fields: names lowercased, values as sent, in the order sent.
type Fields = Vec<(String, String)>;

fn fields_of(headers: &[httparse::Header<'_>]) -> Fields {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

// ---- Raw HTTP/1.1 on either side -------------------------------------------------------

/// A client connection to the proxy, spoken in raw bytes, so a test sees exactly what
/// the proxy sends on it.
struct RawClient(Wire<TcpStream>);

impl RawClient {
    async fn connect(proxy: &Proxy) -> RawClient {
        RawClient(Wire::new(
            TcpStream::connect(proxy.addr()).await.expect("connects"),
        ))
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.0.stream.write_all(bytes))
            .await
            .expect("the proxy takes the request within 5 s")
            .expect("writes");
    }

    /// A `GET` of `path` on this connection and its response.
    async fn get(&mut self, path: &str) -> Answer {
        let request = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n");
        self.send(request.as_bytes()).await;
        self.response(false).await
    }

    /// The next response, within 5 s; `to_head`: the answer to a `HEAD` (no body).
    async fn response(&mut self, to_head: bool) -> Answer {
        tokio::time::timeout(WAIT, self.0.answer(to_head))
            .await
            .expect("a response within 5 s")
            .expect("a complete response")
    }

    /// Reads until `needle` has come (kept for [`rest`](RawClient::rest)), within 5 s.
    async fn read_until(&mut self, needle: &[u8]) {
        let found = tokio::time::timeout(WAIT, async {
            while find(&self.0.buf, needle).is_none() {
                if !self.0.fill().await {
                    return false;
                }
            }
            true
        })
        .await;
        let seen = String::from_utf8_lossy(&self.0.buf);
        assert_eq!(found, Ok(true), "{needle:?} did not come; got {seen:?}");
    }

    /// Everything until the proxy ends the connection, and whether it did within 5 s.
    async fn rest(&mut self) -> (Vec<u8>, bool) {
        let ended = tokio::time::timeout(WAIT, async { while self.0.fill().await {} })
            .await
            .is_ok();
        (std::mem::take(&mut self.0.buf), ended)
    }
}

/// A response as a raw client read it.
struct Answer {
    status: u16,
    headers: Fields,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One end of a raw HTTP/1.1 connection: its stream and the bytes read and not yet used.
struct Wire<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + Unpin> Wire<S> {
    fn new(stream: S) -> Wire<S> {
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more; false once the stream has ended (closed or reset).
    async fn fill(&mut self) -> bool {
        self.buf.reserve(16 * 1024);
        matches!(self.stream.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// The next head, its empty line included; `None` when the stream ends first.
    async fn head(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                return Some(self.buf.drain(..end + 4).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn exactly(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// A chunked body: its data, and its bytes as they came.
    async fn chunked(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        loop {
            match dechunk(&self.buf) {
                Ok(Some((data, used))) => return Some((data, self.buf.drain(..used).collect())),
                Ok(None) if self.fill().await => {}
                _ => return None,
            }
        }
    }

    /// The next response, read by its framing; `None` if the stream ends first.
    async fn answer(&mut self, to_head: bool) -> Option<Answer> {
        let head = self.head().await?;
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut fields);
        response.parse(&head).ok()?.is_complete().then_some(())?;
        let status = response.code?;
        let headers = fields_of(response.headers);
        let bodiless = to_head || status < 200 || status == 204 || status == 304;
        let chunked = field(&headers, "transfer-encoding").is_some_and(|te| te.contains("chunked"));
        let body = if bodiless {
            Vec::new()
        } else if chunked {
            self.chunked().await?.0
        } else if let Some(length) = field(&headers, "content-length") {
            self.exactly(length.parse().ok()?).await?
        } else {
            while self.fill().await {}
            std::mem::take(&mut self.buf)
        };
        Some(Answer {
            status,
            headers,
            body,
        })
    }
}

/// Decodes a chunked body at the start of `buf`: its data and how many bytes it took;
/// `Ok(None)` while incomplete. Extensions and trailers are skipped.
fn dechunk(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let Some(line) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let size_line = String::from_utf8_lossy(&buf[at..at + line]).into_owned();
        let digits = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(digits, 16)
            .map_err(|_| format!("a malformed chunk size line: {size_line:?}"))?;
        at += line + 2;
        if size == 0 {
            // The trailer section, up to its empty line.
            loop {
                let Some(line) = find(&buf[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += line + 2;
                if line == 0 {
                    return Ok(Some((data, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        data.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("a chunk not followed by CRLF".to_string());
        }
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
