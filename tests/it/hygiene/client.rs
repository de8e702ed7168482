//! A raw HTTP/1.1 client: writes bytes exactly as given, and reads responses one at a
//! time (pipelined ones too), each read bounded by [`READ_TIMEOUT`]. It parses only what
//! it needs to split responses apart: status line, headers, a Content-Length or chunked
//! body.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single response (or the close after it) may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// One response as the client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Names lowercased, values as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True for the proxy's own error answers: an RFC 9457 body.
    pub fn is_problem_json(&self) -> bool {
        self.header("content-type") == Some("application/problem+json") && !self.body.is_empty()
    }
}

/// One client connection to the proxy.
pub struct RawConn {
    stream: TcpStream,
    /// Bytes read but not yet parsed into a response.
    buf: Vec<u8>,
    eof: bool,
}

impl RawConn {
    pub async fn open(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connects to the proxy");
        RawConn {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes `bytes` as one write. An error (the proxy closed early) is ignored: the
    /// responses read next say what happened.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Half-closes: no more bytes from the client, the read side stays open.
    pub async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// The next response, interim (1xx) ones included; `Err` says why there is none
    /// (timeout, closed, unparseable bytes).
    pub async fn response(&mut self) -> Result<Response, String> {
        self.next_response(false).await
    }

    /// The next response, read as the answer to a `HEAD` request: a head only, whatever
    /// its Content-Length says (RFC 9110 §9.3.2).
    pub async fn response_to_head(&mut self) -> Result<Response, String> {
        self.next_response(true).await
    }

    async fn next_response(&mut self, to_head: bool) -> Result<Response, String> {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            match parse_response(&self.buf, to_head) {
                Parsed::Complete(response, len) => {
                    self.buf.drain(..len);
                    return Ok(response);
                }
                Parsed::Garbage(why) => return Err(format!("unparseable response: {why}")),
                Parsed::Incomplete if self.eof => {
                    return Err(match self.buf.is_empty() {
                        true => "closed without a response".to_string(),
                        false => format!("closed mid-response: {:?}", show(&self.buf)),
                    });
                }
                Parsed::Incomplete => {}
            }
            if !self.fill(deadline).await {
                return Err(format!(
                    "no complete response within {READ_TIMEOUT:?} (have {:?})",
                    show(&self.buf)
                ));
            }
        }
    }

    /// The next final response, skipping interim (1xx) ones.
    pub async fn final_response(&mut self) -> Result<Response, String> {
        loop {
            let response = self.response().await?;
            if response.status >= 200 {
                return Ok(response);
            }
        }
    }

    /// True if the proxy closes the connection (EOF or reset) within [`READ_TIMEOUT`]
    /// without sending anything more.
    pub async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        while !self.eof {
            if !self.fill(deadline).await {
                return false;
            }
        }
        self.buf.is_empty()
    }

    /// True if the proxy closes the connection within [`READ_TIMEOUT`], whatever it
    /// sends first.
    pub async fn eof(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        while !self.eof {
            if !self.fill(deadline).await {
                return false;
            }
        }
        true
    }

    /// Reads once more into `buf`; false if the deadline passed first.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                true
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
}

/// Bytes for a failure message: printable ASCII as is, the rest escaped.
pub fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

enum Parsed {
    Complete(Response, usize),
    Incomplete,
    Garbage(String),
}

/// `to_head`: the response to a `HEAD` request, which has no body.
fn parse_response(buf: &[u8], to_head: bool) -> Parsed {
    let Some(head_len) = find(buf, b"\r\n\r\n").map(|at| at + 4) else {
        return Parsed::Incomplete;
    };
    let head = String::from_utf8_lossy(&buf[..head_len - 4]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line
        .strip_prefix("HTTP/1.1 ")
        .or(status_line.strip_prefix("HTTP/1.0 "))
    {
        Some(rest) => rest.get(..3).and_then(|code| code.parse::<u16>().ok()),
        None => None,
    };
    let Some(status) = status else {
        return Parsed::Garbage(format!("status line {status_line:?}"));
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let field = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let rest = &buf[head_len..];
    let (body, body_len) = if to_head || status < 200 || status == 204 || status == 304 {
        (Vec::new(), 0)
    } else if field("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        match dechunk(rest) {
            Some(done) => done,
            None => return Parsed::Incomplete,
        }
    } else if let Some(length) = field("content-length") {
        let Ok(length) = length.parse::<usize>() else {
            return Parsed::Garbage(format!("content-length {length:?}"));
        };
        if rest.len() < length {
            return Parsed::Incomplete;
        }
        (rest[..length].to_vec(), length)
    } else {
        // Delimited by the close (RFC 9112 §6.3): only complete at EOF, which the
        // caller cannot tell us here; none of the proxy's answers are framed this way.
        return Parsed::Garbage("a response body without Content-Length".to_string());
    };
    let response = Response {
        status,
        headers,
        body,
    };
    Parsed::Complete(response, head_len + body_len)
}

/// The decoded chunked body at the front of `rest` and its encoded length.
fn dechunk(rest: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&rest[at..], b"\r\n")?;
        let line = String::from_utf8_lossy(&rest[at..line_end]);
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            loop {
                let end = at + find(&rest[at..], b"\r\n")?;
                let blank = end == at;
                at = end + 2;
                if blank {
                    return Some((body, at));
                }
            }
        }
        if rest.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[at..at + size]);
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
