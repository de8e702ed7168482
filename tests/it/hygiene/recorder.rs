//! A recording backend: an HTTP/1.1 server on 127.0.0.1:0 that keeps the exact bytes of
//! every request it reads and answers each with `200 ok` on a keep-alive connection.
//! Not a general server: it reads the framing a proxy sends (Content-Length or chunked)
//! and nothing else, so a test can assert byte for byte what the proxy forwarded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// The answer to `HEAD`: the same head, no body (RFC 9110 §9.3.2).
const OK_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";

/// A running recording backend; it stops when the test's runtime ends.
pub struct Recorder {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Every complete request, in the order it was read.
    requests: Mutex<Vec<Vec<u8>>>,
    /// Every byte read on any connection, complete request or not.
    bytes: AtomicUsize,
    /// Woken each time a request is recorded.
    recorded: Notify,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("recorder binds");
        let addr = listener.local_addr().expect("recorder has an address");
        let seen = Arc::new(Seen::default());
        let accepting = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, accepting.clone()));
            }
        });
        Recorder { addr, seen }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The requests recorded so far.
    pub fn requests(&self) -> Vec<Vec<u8>> {
        self.seen.requests.lock().unwrap().clone()
    }

    /// How many bytes reached this backend, including any incomplete request.
    pub fn bytes_seen(&self) -> usize {
        self.seen.bytes.load(Ordering::SeqCst)
    }

    /// The first `n` requests, once that many have been recorded; `None` if they are
    /// not there within `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Option<Vec<Vec<u8>>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let recorded = self.seen.recorded.notified();
            tokio::pin!(recorded);
            // Registered before the check, so a request recorded in between still wakes us.
            recorded.as_mut().enable();
            {
                let requests = self.seen.requests.lock().unwrap();
                if requests.len() >= n {
                    return Some(requests[..n].to_vec());
                }
            }
            if tokio::time::timeout_at(deadline, recorded).await.is_err() {
                return None;
            }
        }
    }
}

/// Reads requests off one connection until it ends, recording and answering each.
async fn serve(mut stream: TcpStream, seen: Arc<Seen>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some(len) = request_len(&buf) {
            let request: Vec<u8> = buf.drain(..len).collect();
            let head = request.starts_with(b"HEAD ");
            seen.requests.lock().unwrap().push(request);
            seen.recorded.notify_waiters();
            let answer = if head { OK_HEAD } else { OK };
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                seen.bytes.fetch_add(n, Ordering::SeqCst);
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// The length of the complete request at the front of `buf`, if one is there: the head
/// up to its blank line, then a body framed by `Transfer-Encoding: chunked` or
/// `Content-Length` (no body without either).
fn request_len(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let field = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(n, _)| n.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    if field("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        return chunked_len(&buf[head_end..]).map(|body| head_end + body);
    }
    let length: usize = field("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some(head_end + length)
}

/// The length of the complete chunked body at the front of `body`, trailers included.
fn chunked_len(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + find(&body[at..], b"\r\n")?;
        let line = String::from_utf8_lossy(&body[at..line_end]);
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailer fields, then the blank line that ends the message.
            loop {
                let end = at + find(&body[at..], b"\r\n")?;
                let blank = end == at;
                at = end + 2;
                if blank {
                    return Some(at);
                }
            }
        }
        at += size + 2;
        if body.len() < at {
            return None;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
