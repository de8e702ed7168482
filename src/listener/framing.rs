//! Detection of ambiguous HTTP/1.1 request framing on inbound connections.
//!
//! hyper's HTTP/1 server accepts a request carrying both `Content-Length` and
//! `Transfer-Encoding: chunked`: it drops the `Content-Length` header and frames the
//! body as chunked, so the request handler cannot tell that the request was ambiguous.
//! Our policy (permitted by RFC 9112 §6.1 and §6.3) is to answer such requests with 400
//! and never forward them.
//!
//! [`wrap`] puts a [`FramingIo`] around the connection's IO. It passes every byte through
//! unchanged and lets an IO-free scanner observe the bytes hyper reads, message by message.
//! The scanner records one [`Verdict`] per request head; the service takes them in order
//! through [`FramingVerdicts::next_request`].
//!
//! This is a detector, not a parser: whatever it does not understand (HTTP/2 prior
//! knowledge, `CONNECT`, malformed heads or chunks, oversized heads) switches it
//! to passthrough for the rest of the connection, and hyper remains the authority that
//! rejects malformed messages. Its chunked decoding follows hyper's decoder, so both
//! agree on where each message ends.
//!
//! Once the connection is upgraded (a WebSocket after `101 Switching Protocols`,
//! [`FramingVerdicts::upgraded`]), its bytes are no longer HTTP: the wrapper passes them
//! both ways untouched, scanning nothing, rewriting nothing and writing no interim
//! response between them.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::interim::Interim;
use crate::http::headers::{ends_in_chunked, parse_digits};

/// Largest request head scanned; equal to hyper's default maximum read buffer, so every
/// head hyper accepts with default settings fits.
pub(crate) const MAX_HEAD: usize = 8192 + 4096 * 100;
// Every head hyper accepts under the largest `max_header_bytes` config allows (its size
// check can overshoot by one read) fits, or the framing check would be skipped for it.
const _: () = assert!(2 * crate::config::MAX_HEADER_BYTES_LIMIT <= MAX_HEAD);
/// Header slots for parsing a head; above hyper's default limit of 100.
const MAX_HEADERS: usize = 256;

/// The scanner's judgement of one request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Framing is unambiguous, or the scanner recorded nothing for this request.
    Ok,
    /// Framing is ambiguous; the request must be answered with 400 and not forwarded.
    Ambiguous(&'static str),
    /// The body has a transfer coding the proxy does not apply (e.g. `gzip, chunked`):
    /// answered 501 (RFC 9112 §6.1) and not forwarded.
    Unsupported(&'static str),
}

/// Verdicts recorded but not yet taken. Scanning stops after any verdict but `Ok`, so
/// the queue is always some number of `Ok`s followed by at most one refusal; storing it
/// as a counter keeps memory constant however many requests a client pipelines.
#[derive(Debug, Default)]
struct Pending {
    oks: u64,
    ambiguous: Option<Verdict>,
}

impl Pending {
    fn push(&mut self, verdict: Verdict) {
        debug_assert!(
            self.ambiguous.is_none(),
            "nothing can follow an Ambiguous verdict"
        );
        match verdict {
            Verdict::Ok if self.ambiguous.is_none() => self.oks = self.oks.saturating_add(1),
            Verdict::Ok => {}
            refusal => {
                if self.ambiguous.is_none() {
                    self.ambiguous = Some(refusal);
                }
            }
        }
    }

    fn pop(&mut self) -> Option<Verdict> {
        if self.oks > 0 {
            self.oks -= 1;
            Some(Verdict::Ok)
        } else {
            self.ambiguous.take()
        }
    }

    fn is_empty(&self) -> bool {
        self.oks == 0 && self.ambiguous.is_none()
    }

    /// Moves all of `other` to the back of `self`; nothing can follow an `Ambiguous`.
    fn append(&mut self, other: &mut Pending) {
        let other = std::mem::take(other);
        debug_assert!(self.ambiguous.is_none() || other.is_empty());
        if self.ambiguous.is_none() {
            self.oks = self.oks.saturating_add(other.oks);
            self.ambiguous = other.ambiguous;
        }
    }
}

/// Position inside a chunked body; mirrors the states of hyper's chunked decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Accumulating a request head; `eol` tracks a possible end of head, as in hyper's
    /// `is_complete_fast`: 1 after `\n`, 2 after `\n\r`, 0 otherwise.
    Head {
        eol: u8,
    },
    /// Skipping a `Content-Length` body with this many bytes left (never 0).
    Body(u64),
    Chunked(Chunk),
    /// Gave up; observe nothing more on this connection.
    Passthrough,
}

/// Incremental, IO-free scanner over the inbound byte stream of one HTTP/1 connection.
#[derive(Debug)]
struct Scanner {
    state: State,
    head: Vec<u8>,
}

impl Scanner {
    fn new() -> Self {
        Scanner {
            state: State::Head { eol: 0 },
            head: Vec::new(),
        }
    }

    fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Observes the next bytes of the stream, recording one verdict per complete head.
    fn feed(&mut self, mut bytes: &[u8], out: &mut Pending) {
        while !bytes.is_empty() {
            match self.state {
                State::Passthrough => return,
                State::Head { .. } => {
                    let used = self.feed_head(bytes, out);
                    bytes = &bytes[used..];
                }
                State::Body(left) | State::Chunked(Chunk::Data(left)) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = match (self.state, left - n) {
                        (State::Body(_), 0) => State::Head { eol: 0 },
                        (State::Body(_), rest) => State::Body(rest),
                        (_, 0) => State::Chunked(Chunk::DataCr),
                        (_, rest) => State::Chunked(Chunk::Data(rest)),
                    };
                }
                State::Chunked(chunk) => {
                    self.state = chunk_step(chunk, bytes[0]);
                    bytes = &bytes[1..];
                }
            }
        }
    }

    /// Consumes head bytes from non-empty `bytes` and returns how many were used.
    fn feed_head(&mut self, bytes: &[u8], out: &mut Pending) -> usize {
        let State::Head { mut eol } = self.state else {
            unreachable!("feed_head outside of a head");
        };
        let mut used = 0;
        if self.head.is_empty() {
            // Empty lines before a request line are skipped, as httparse does.
            used = bytes
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n'))
                .unwrap_or(bytes.len());
        }
        let mut end = None;
        let mut i = used;
        while i < bytes.len() {
            if eol == 0 {
                // Only a line feed can start an end of head: skip to the next one.
                match bytes[i..].iter().position(|&b| b == b'\n') {
                    Some(at) => i += at,
                    None => break,
                }
            }
            eol = match (bytes[i], eol) {
                (b'\n', 1 | 2) => {
                    end = Some(i + 1);
                    break;
                }
                (b'\n', _) => 1,
                (b'\r', 1) => 2,
                _ => 0,
            };
            i += 1;
        }
        let take = end.unwrap_or(bytes.len());
        if self.head.is_empty() && end.is_some() && take - used <= MAX_HEAD {
            // The whole head is in this read (the usual case): judge it where it lies.
            self.state = State::Head { eol: 0 };
            self.judge_head(&bytes[used..take], out);
            return take;
        }
        if self.head.len() + (take - used) > MAX_HEAD {
            self.state = State::Passthrough;
            self.head = Vec::new();
            return bytes.len();
        }
        self.head.extend_from_slice(&bytes[used..take]);
        self.state = State::Head { eol };
        if end.is_some() {
            self.finish_head(out);
        }
        take
    }

    /// Parses and judges the complete head in `self.head`, then moves to its body.
    fn finish_head(&mut self, out: &mut Pending) {
        let head = std::mem::take(&mut self.head);
        self.judge_head(&head, out);
        if !self.is_passthrough() {
            // Keep the allocation for the next head.
            self.head = head;
            self.head.clear();
        }
    }

    /// Parses and judges one complete head, then moves to its body.
    fn judge_head(&mut self, head: &[u8], out: &mut Pending) {
        // Uninitialised slots: zeroing 256 of them would cost more than the parse.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, &mut headers) {
            Ok(httparse::Status::Complete(len)) if len == head.len() => {
                let (verdict, next) = judge(&req);
                out.push(verdict);
                self.state = next;
            }
            // Anything else (including httparse errors such as the HTTP/2 preface's
            // `HTTP/2.0` version) is left to hyper.
            _ => self.state = State::Passthrough,
        }
        if self.is_passthrough() {
            self.head = Vec::new();
        }
    }
}

/// Judges a parsed head and returns the state its message continues in.
fn judge(req: &httparse::Request<'_, '_>) -> (Verdict, State) {
    let mut cl_lines = 0;
    let mut cl: Option<u64> = None;
    let mut cl_invalid = false;
    let mut cl_conflict = false;
    let mut te_last: Option<&[u8]> = None;
    // Transfer codings over every Transfer-Encoding line: how many are `chunked`, and
    // whether any is something else.
    let mut te_chunked = 0;
    let mut te_other = false;
    // After CONNECT the bytes are no longer HTTP/1 messages (the proxy refuses it and
    // closes). An `Upgrade` header is not an upgrade: the proxy answers no 101 (it strips
    // the header as hop-by-hop), so the requests pipelined after it are still requests
    // and must still be judged.
    let tunnel = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl_lines += 1;
            match parse_digits(h.value) {
                Some(n) if cl.is_some_and(|prev| prev != n) => cl_conflict = true,
                Some(n) => cl = Some(n),
                None => cl_invalid = true,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_last = Some(h.value);
            for coding in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                match coding {
                    b"" => {}
                    c if c.eq_ignore_ascii_case(b"chunked") => te_chunked += 1,
                    _ => te_other = true,
                }
            }
        }
    }
    let ambiguous = |why| (Verdict::Ambiguous(why), State::Passthrough);
    if cl_lines > 0 && te_last.is_some() {
        return ambiguous("both Content-Length and Transfer-Encoding");
    }
    if cl_invalid {
        return ambiguous("invalid Content-Length value");
    }
    if cl_conflict {
        return ambiguous("conflicting Content-Length values");
    }
    // RFC 9110 §8.6 lets a recipient take equal repeated values as one; a proxy that
    // forwards them leaves the backend to read them its own way, so they are refused.
    if cl_lines > 1 {
        return ambiguous("more than one Content-Length field");
    }
    // A fragment is never sent in a request target (RFC 9112 §3.2); hyper drops it
    // silently, so the request would be routed on a target the client did not send.
    if req.path.is_some_and(|p| p.contains('#')) {
        return ambiguous("a fragment in the request target");
    }
    let next = match (te_last, cl) {
        // As in hyper, only the last Transfer-Encoding line decides.
        (Some(te), _) if !ends_in_chunked(te) => {
            return ambiguous("Transfer-Encoding does not end in chunked")
        }
        // RFC 9112 §6.1: chunked is applied at most once.
        (Some(_), _) if te_chunked > 1 => return ambiguous("chunked applied more than once"),
        // A coding before chunked (e.g. gzip) would be lost when the body is re-framed
        // for the backend: refused as not implemented (RFC 9112 §6.1).
        (Some(_), _) if te_other => {
            return (
                Verdict::Unsupported("a transfer coding other than chunked"),
                State::Passthrough,
            )
        }
        _ if tunnel => State::Passthrough,
        (Some(_), _) => State::Chunked(Chunk::Start),
        (None, Some(n)) if n > 0 => State::Body(n),
        (None, _) => State::Head { eol: 0 },
    };
    (Verdict::Ok, next)
}

/// One byte of a chunked body outside chunk data; malformed input gives up.
fn chunk_step(chunk: Chunk, b: u8) -> State {
    let hex = (b as char).to_digit(16).map(u64::from);
    let next = match (chunk, b) {
        (Chunk::Start, _) => hex.map(Chunk::Size),
        (Chunk::Size(size), _) if hex.is_some() => size
            .checked_mul(16)
            .and_then(|s| s.checked_add(hex.unwrap_or_default()))
            .map(Chunk::Size),
        (Chunk::Size(size) | Chunk::SizeLws(size), b'\t' | b' ') => Some(Chunk::SizeLws(size)),
        (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b';') => {
            Some(Chunk::Extension(size))
        }
        (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b'\r') => {
            Some(Chunk::SizeLf(size))
        }
        (Chunk::Extension(_), b'\n') => None,
        (Chunk::Extension(size), _) => Some(Chunk::Extension(size)),
        (Chunk::SizeLf(0), b'\n') => Some(Chunk::EndCr),
        (Chunk::SizeLf(size), b'\n') => Some(Chunk::Data(size)),
        (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
        (Chunk::DataLf, b'\n') => Some(Chunk::Start),
        (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
        (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
        (Chunk::EndCr | Chunk::Trailer, _) => Some(Chunk::Trailer),
        (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
        (Chunk::EndLf, b'\n') => return State::Head { eol: 0 },
        _ => None,
    };
    next.map_or(State::Passthrough, State::Chunked)
}

/// The per-connection handle the request service uses: one verdict per HTTP/1 request,
/// in order. Cheap to clone; all clones share one queue.
#[derive(Debug, Clone)]
pub struct FramingVerdicts {
    pending: Arc<Mutex<Pending>>,
    /// Shared with the [`FramingIo`]: set once the connection carries another protocol.
    upgraded: Arc<AtomicBool>,
}

impl FramingVerdicts {
    /// Called by the service exactly once per HTTP/1.x request, in arrival order. Returns
    /// the verdict the scanner recorded for that message, or [`Verdict::Ok`] if it recorded
    /// none (it gave up and is in passthrough).
    ///
    /// Alignment relies on hyper dispatching the HTTP/1 requests of a connection strictly
    /// in order, and only after it has read the whole head. The scanner sees those bytes
    /// as hyper reads them, so the verdict for request k is recorded before the service
    /// asks for it. Heads the scanner judged but hyper rejected never reach the service,
    /// but hyper closes the connection after such a rejection, so no later request is
    /// misaligned.
    pub fn next_request(&self) -> Verdict {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.pop().unwrap_or(Verdict::Ok)
    }

    /// The connection switches protocols with the response about to be written (a
    /// `101`): from hyper's next write on, every byte passes through untouched, both ways.
    /// Called before hyper writes the `101`, which is itself no refusal to rewrite.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// Wraps the inbound connection's IO, delegating reads and writes unchanged while
    /// scanning the bytes hyper reads; hyper's own bare refusal of a request it cannot
    /// parse is the one write it changes (`refusal.rs`), and a backend's interim (1xx)
    /// responses are the one write it adds, between hyper's own (`interim.rs`).
    #[derive(Debug)]
    pub struct FramingIo<IO> {
        #[pin]
        io: IO,
        scanner: Scanner,
        pending: Arc<Mutex<Pending>>,
        replacing: Option<Replacing>,
        interim: Interim,
        upgraded: Arc<AtomicBool>,
    }
}

/// A write being sent as other bytes: hyper's refusal head, as a problem response.
#[derive(Debug)]
struct Replacing {
    bytes: Vec<u8>,
    written: usize,
    /// The length of hyper's buffer, reported written once all of `bytes` are.
    stands_for: usize,
}

impl<IO> FramingIo<IO> {
    /// The connection carries another protocol now ([`FramingVerdicts::upgraded`]).
    fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }
}

impl<IO: AsyncWrite> FramingIo<IO> {
    /// Interim responses queued go out before hyper's bytes (`interim.rs`).
    fn before_hyper_writes(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        this.interim.before_hyper_writes(this.io, cx)
    }

    /// Writes the replacement under way to its end; `Ready(n)` reports hyper's `n` bytes.
    fn poll_replacing(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        let Some(replacing) = this.replacing.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        let Replacing { bytes, written, .. } = replacing;
        std::task::ready!(poll_write_all(this.io.as_mut(), cx, bytes, written))?;
        let n = replacing.stands_for;
        *this.replacing = None;
        Poll::Ready(Ok(n))
    }
}

/// Writes `bytes` from `*written` on to their end, advancing `*written`: bytes the
/// wrapper writes on its own between hyper's.
pub(super) fn poll_write_all<IO: AsyncWrite>(
    mut io: Pin<&mut IO>,
    cx: &mut Context<'_>,
    bytes: &[u8],
    written: &mut usize,
) -> Poll<io::Result<()>> {
    while *written < bytes.len() {
        match std::task::ready!(io.as_mut().poll_write(cx, &bytes[*written..]))? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            n => *written += n,
        }
    }
    Poll::Ready(Ok(()))
}

/// Wraps `io` and returns the wrapper for hyper plus the verdict handle for the service.
/// Interim responses given to `interim` are written between hyper's writes.
pub fn wrap<IO>(io: IO, interim: Interim) -> (FramingIo<IO>, FramingVerdicts) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    let upgraded = Arc::new(AtomicBool::new(false));
    let verdicts = FramingVerdicts {
        pending: Arc::clone(&pending),
        upgraded: Arc::clone(&upgraded),
    };
    let io = FramingIo {
        io,
        scanner: Scanner::new(),
        pending,
        replacing: None,
        interim,
        upgraded,
    };
    (io, verdicts)
}

impl<IO: AsyncRead> AsyncRead for FramingIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_upgraded() {
            return self.project().io.poll_read(cx, buf);
        }
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            if !this.scanner.is_passthrough() {
                let mut fresh = Pending::default();
                this.scanner
                    .feed(buf.filled().get(before..).unwrap_or_default(), &mut fresh);
                if !fresh.is_empty() {
                    let mut shared = this.pending.lock().unwrap_or_else(|e| e.into_inner());
                    shared.append(&mut fresh);
                }
            }
        }
        result
    }
}

impl<IO: AsyncWrite> AsyncWrite for FramingIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_upgraded() && self.replacing.is_none() {
            return self.project().io.poll_write(cx, buf);
        }
        std::task::ready!(self.as_mut().before_hyper_writes(cx))?;
        if self.replacing.is_none() {
            match super::refusal::rewrite(buf) {
                Some(bytes) => {
                    *self.as_mut().project().replacing = Some(Replacing {
                        bytes,
                        written: 0,
                        stands_for: buf.len(),
                    })
                }
                None => return self.project().io.poll_write(cx, buf),
            }
        }
        self.poll_replacing(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_upgraded() && self.replacing.is_none() {
            return self.project().io.poll_write_vectored(cx, bufs);
        }
        std::task::ready!(self.as_mut().before_hyper_writes(cx))?;
        if self.replacing.is_some() {
            return self.poll_replacing(cx);
        }
        // hyper queues a message head as a buffer of its own: a refusal head is the last
        // buffer. What comes before it is written first, so it arrives alone.
        let last = bufs.iter().rposition(|b| !b.is_empty());
        if let Some(last) = last {
            if let Some(bytes) = super::refusal::rewrite(&bufs[last]) {
                if bufs[..last].iter().any(|b| !b.is_empty()) {
                    return self.project().io.poll_write_vectored(cx, &bufs[..last]);
                }
                *self.as_mut().project().replacing = Some(Replacing {
                    bytes,
                    written: 0,
                    stands_for: bufs[last].len(),
                });
                return self.poll_replacing(cx);
            }
        }
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_upgraded() {
            return self.project().io.poll_flush(cx);
        }
        let mut this = self.project();
        // hyper flushes the IO only once its own buffer is written, and on every turn
        // of its connection loop while the service runs: the moment to send an interim
        // response that came meanwhile.
        this.interim.hyper_flushed();
        this.interim.register_connection(cx);
        std::task::ready!(this.interim.poll_write_to(this.io.as_mut(), cx))?;
        this.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const CL_TE: &str =
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    const BOTH: Verdict = Verdict::Ambiguous("both Content-Length and Transfer-Encoding");
    const OK: Verdict = Verdict::Ok;

    fn scan(chunks: &[&[u8]]) -> Vec<Verdict> {
        let (mut scanner, mut pending) = (Scanner::new(), Pending::default());
        for chunk in chunks {
            scanner.feed(chunk, &mut pending);
        }
        std::iter::from_fn(|| pending.pop()).collect()
    }

    /// Verdicts for `input`, checked to be the same byte by byte and for every split in two.
    fn scan_splits(input: &str) -> Vec<Verdict> {
        let bytes = input.as_bytes();
        let whole = scan(&[bytes]);
        assert_eq!(
            scan(&bytes.chunks(1).collect::<Vec<_>>()),
            whole,
            "byte by byte"
        );
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(scan(&[a, b]), whole, "split at {at}");
        }
        whole
    }

    fn scan_str(input: &str) -> Vec<Verdict> {
        scan(&[input.as_bytes()])
    }

    #[test]
    fn pipelined_gets() {
        let input = format!("{GET}{GET}\r\nGET /x HTTP/1.0\r\n\r\n");
        assert_eq!(scan_splits(&input), [OK, OK, OK]);
    }

    #[test]
    fn content_length_body_is_skipped() {
        let body = "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let len = body.len();
        let input = format!("POST / HTTP/1.1\r\nContent-Length: {len}\r\n\r\n{body}{GET}");
        assert_eq!(scan_splits(&input), [OK, OK]);
        let zero = format!("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n{GET}");
        assert_eq!(scan_splits(&zero), [OK, OK]);
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers() {
        // The second chunk carries the first 10 bytes of a request head as data.
        let input = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;name=val\r\nhello\r\nA \t;x\r\n{CL_TE:.10}\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n\
             POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n{GET}"
        );
        assert_eq!(scan_splits(&input), [OK, OK, OK]);
    }

    #[test]
    fn codings_other_than_chunked_are_not_implemented_and_chunked_is_applied_once() {
        let unsupported = Verdict::Unsupported("a transfer coding other than chunked");
        let twice = Verdict::Ambiguous("chunked applied more than once");
        for (te, want) in [
            ("gzip, chunked", &unsupported),
            ("gzip\r\nTransfer-Encoding: chunked", &unsupported),
            ("chunked, chunked", &twice),
            ("chunked\r\nTransfer-Encoding: chunked", &twice),
        ] {
            let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n{GET}");
            assert_eq!(scan_splits(&input), std::slice::from_ref(want), "{te:?}");
        }
    }

    #[test]
    fn a_fragment_in_the_target_is_refused() {
        let why = Verdict::Ambiguous("a fragment in the request target");
        let input = format!("GET /reports#x HTTP/1.1\r\nHost: a\r\n\r\n{GET}");
        assert_eq!(scan_str(&input), [why]);
    }

    #[test]
    fn content_length_and_transfer_encoding_in_either_order() {
        let te_first = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
        for head in [CL_TE, te_first] {
            assert_eq!(
                scan_splits(&format!("{GET}{head}{GET}")),
                [OK, BOTH],
                "{head:?}"
            );
        }
        let lower = "POST / HTTP/1.1\r\ncontent-LENGTH: 3\r\nTRANSFER-encoding: chunked\r\n\r\n";
        assert_eq!(scan_str(lower), [BOTH]);
        let body = format!("POST / HTTP/1.1\r\nCONTENT-length: 3\r\n\r\nabc{GET}");
        assert_eq!(scan_str(&body), [OK, OK]);
    }

    #[test]
    fn transfer_encoding_must_end_in_chunked() {
        let why = Verdict::Ambiguous("Transfer-Encoding does not end in chunked");
        for te in [
            "gzip",
            "chunked, gzip",
            "",
            "chunked\r\nTransfer-Encoding: gzip",
        ] {
            let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n{GET}");
            assert_eq!(scan_str(&input), std::slice::from_ref(&why), "{te:?}");
        }
    }

    #[test]
    fn content_length_values() {
        let head = |cls: &str| format!("POST / HTTP/1.1\r\n{cls}\r\n\r\n");
        let same = head("Content-Length: 3\r\ncontent-length: 3") + "abc" + GET;
        let why = Verdict::Ambiguous("more than one Content-Length field");
        assert_eq!(scan_str(&same), [why]);
        let differ = head("Content-Length: 3\r\nContent-Length: 4");
        let why = Verdict::Ambiguous("conflicting Content-Length values");
        assert_eq!(scan_str(&differ), [why]);
        let why = Verdict::Ambiguous("invalid Content-Length value");
        for bad in ["+3", "3, 3", "0x3", "99999999999999999999"] {
            let input = head(&format!("Content-Length: {bad}"));
            assert_eq!(scan_str(&input), std::slice::from_ref(&why), "{bad:?}");
        }
    }

    #[test]
    fn h2_preface_is_passthrough() {
        let input = format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{CL_TE}");
        assert_eq!(scan_splits(&input), []);
    }

    #[test]
    fn an_upgrade_header_does_not_stop_the_scan() {
        // The proxy never answers 101, so what follows is still requests.
        let upgrade = "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(scan_splits(&format!("{upgrade}{CL_TE}")), [OK, BOTH]);
    }

    #[test]
    fn gives_up_on_what_it_does_not_understand() {
        let chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for prefix in [
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            &format!("{chunked}zz\r\n"),
            &format!("{chunked}0\n\n"),
        ] {
            assert_eq!(scan_str(&format!("{prefix}{CL_TE}")), [OK], "{prefix:?}");
        }
        assert_eq!(
            scan_str(&format!("GET / HTTP/1.1\r\nBad Header\r\n\r\n{CL_TE}")),
            []
        );

        let (mut scanner, mut pending) = (Scanner::new(), Pending::default());
        scanner.feed(b"GET / HTTP/1.1\r\nX: ", &mut pending);
        scanner.feed(&vec![b'a'; MAX_HEAD], &mut pending);
        assert!(scanner.is_passthrough() && scanner.head.capacity() == 0);
        scanner.feed(b"\r\n\r\n", &mut pending);
        assert!(pending.is_empty());
    }

    #[test]
    fn verdicts_are_constant_size_and_in_order() {
        let (mut scanner, mut pending) = (Scanner::new(), Pending::default());
        scanner.feed((GET.repeat(5000) + CL_TE + GET).as_bytes(), &mut pending);
        assert_eq!(
            (pending.oks, pending.ambiguous.clone()),
            (
                5000,
                Some(Verdict::Ambiguous(
                    "both Content-Length and Transfer-Encoding"
                ))
            )
        );
        let (_, verdicts) = wrap((), Interim::default());
        verdicts.pending.lock().unwrap().append(&mut pending);
        let clone = verdicts.clone();
        assert!((0..5000).all(|_| clone.next_request() == OK));
        assert_eq!(
            [verdicts.next_request(), verdicts.next_request()],
            [BOTH, OK]
        );
        fn shareable<T: Send + Sync + Clone + 'static>(_: &T) {}
        shareable(&verdicts);
    }

    #[tokio::test]
    async fn framing_io_passes_bytes_through() {
        let (mut client, server) = tokio::io::duplex(16);
        let (mut io, verdicts) = wrap(server, Interim::default());
        let input = format!("{GET}POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd{CL_TE}");
        let sent = input.clone();
        let peer = tokio::spawn(async move {
            client.write_all(sent.as_bytes()).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut seen = Vec::new();
        io.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, input.as_bytes());
        io.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(peer.await.unwrap(), b"HTTP/1.1 400 Bad Request\r\n\r\n");
        let got: Vec<_> = (0..4).map(|_| verdicts.next_request()).collect();
        assert_eq!(got, [OK, OK, BOTH, OK]);
    }

    #[tokio::test]
    async fn an_upgraded_connection_passes_bytes_untouched_both_ways() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let interim = Interim::default();
        let (mut io, verdicts) = wrap(server, interim.clone());
        let handshake =
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        client.write_all(handshake.as_bytes()).await.unwrap();
        let mut head = vec![0; handshake.len()];
        io.read_exact(&mut head).await.unwrap();
        assert_eq!(verdicts.next_request(), OK);
        verdicts.upgraded();
        // A backend 1xx queued now must not land in the other protocol's bytes.
        interim.send(
            http::StatusCode::from_u16(103).unwrap(),
            &http::HeaderMap::new(),
        );
        // Bytes that would be a refusal head, and bytes that would frame a request
        // ambiguously, are payload now.
        let refusal: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 08:43:36 GMT\r\n\r\n";
        io.write_all(refusal).await.unwrap();
        io.flush().await.unwrap();
        let mut echoed = vec![0; refusal.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, refusal);
        client.write_all(CL_TE.as_bytes()).await.unwrap();
        let mut payload = vec![0; CL_TE.len()];
        io.read_exact(&mut payload).await.unwrap();
        assert_eq!(payload, CL_TE.as_bytes());
        assert_eq!(verdicts.next_request(), OK, "nothing was scanned");
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "no interim response written: {rest:?}");
    }
}
