//! HTTP/1.1 spoken to a backend on one pooled connection: the request head written
//! from the forwarded request, its body framed (length or chunked) and sent while the
//! response is read, the response head parsed, and its body unframed as it arrives.
//!
//! Why not hyper's client: its connection runs behind a channel (the request goes in
//! through an mpsc queue, the response comes back through a oneshot), built for a
//! connection shared by tasks. A pooled connection here is only ever used by the one
//! request holding it, from that request's task, so the channel was pure cost; and
//! hyper consumes the request, so a copy of its head had to be kept to replay it after
//! a stale reuse, where the encoded head bytes serve now.
//!
//! The response side is strict, as an intermediary's must be (RFC 9112 §6.3, §7.1): a
//! response with both `Transfer-Encoding` and `Content-Length`, with differing lengths,
//! with a malformed chunk, or with an obs-folded field is refused, never guessed at;
//! a body that ends early is an error, never a short response passed off as whole.
//!
//! Not here: the connection's life in the pool (`conn.rs`); deciding what is sent
//! (`forward/handler.rs`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::body::{BoxError, ProxyBody};
use crate::http::headers::{ends_in_chunked, parse_digits};
use crate::http::tls_client::UpstreamStream;

/// The largest response head (status line and fields) accepted.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// The most fields a response head (or a trailer section) may have.
const MAX_FIELDS: usize = 100;
/// The longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// The first read of an exchange asks for this much; a read that fills what it asked
/// for doubles the next one, up to [`MAX_READ`].
const FIRST_READ: usize = 8 * 1024;
/// Largest read from a backend connection, and so the largest response chunk: each read
/// becomes one chunk of the response body, held until the client takes it, so a slow
/// client holds about three of them (read, in hand, queued).
pub(super) const MAX_READ: usize = 64 * 1024;
/// Request body bytes buffered before they are written (more waits for the socket).
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Why an exchange with a backend failed.
#[derive(Debug)]
pub(crate) enum H1Error {
    /// The backend closed the connection before a complete response.
    Closed,
    /// Reading from or writing to the connection failed.
    Io(io::Error),
    /// What the backend sent is not a valid HTTP/1.1 response.
    Invalid(&'static str),
    /// The request body failed (or did not match its declared length) as it was sent.
    Body(BoxError),
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Closed => f.write_str("connection closed before a complete response"),
            H1Error::Io(error) => write!(f, "{error}"),
            H1Error::Invalid(why) => write!(f, "invalid response from the backend: {why}"),
            H1Error::Body(error) => write!(f, "the request body failed: {error}"),
        }
    }
}

impl std::error::Error for H1Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            H1Error::Io(error) => Some(error),
            H1Error::Body(error) => Some(error.as_ref()),
            _ => None,
        }
    }
}

impl H1Error {
    /// Whether the connection itself is gone (closed, reset, cut short), rather than the
    /// backend speaking bad HTTP or the request body failing.
    pub(super) fn is_broken_connection(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            H1Error::Closed => true,
            H1Error::Io(error) => matches!(
                error.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ),
            H1Error::Invalid(_) | H1Error::Body(_) => false,
        }
    }
}

/// The fields a response's map has room for at least. It needs room for the backend's
/// fields and the two the proxy adds to every response (Via, X-Request-Id); but on an
/// HTTP/1 client connection hyper keeps the map of each response it writes, emptied, as
/// the map of the connection's next request, to which the proxy adds up to eight
/// (`X-Request-Id` and the forwarding fields). Sized for one response alone (~8 fields)
/// it grew on every next request, a rehash and a reallocation (~750 instructions, 2% of
/// a proxied request over TLS); 24 is a browser's ~15 request fields and those eight.
/// The price is memory: the map takes ~2.6 KiB instead of ~1.3 KiB, and hyper holds one
/// on each idle kept-alive client connection.
const RESPONSE_MAP_ROOM: usize = 24;

/// A callback for the interim (1xx) responses before the final one, `100 Continue` and
/// `101 Switching Protocols` excepted; given with the request to [`super::Pool::send_with`].
/// A parameter rather than a request extension: the extension map is a hash table
/// allocated per request (~550 instructions of an HTTP/1.1 request that never sees a 1xx).
#[derive(Clone)]
pub struct OnInformational(pub std::sync::Arc<InformationalFn>);

type InformationalFn = dyn Fn(StatusCode, &HeaderMap) + Send + Sync;

/// A request ready for the wire: its head encoded, its body and how it is framed.
pub(super) struct Outgoing {
    /// Request line and fields, ending with the empty line.
    pub(super) head: Bytes,
    /// `None` when the request has no body to send.
    pub(super) body: Option<(ProxyBody, Coding)>,
    /// A `HEAD` request: its response has no body whatever its fields say.
    pub(super) head_method: bool,
    pub(super) informational: Option<OnInformational>,
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Coding {
    /// `Content-Length`: exactly this many bytes.
    Length(u64),
    Chunked,
}

impl Outgoing {
    /// Encodes `parts` (origin-form target, HTTP/1.1) and decides the body's framing as
    /// hyper's client did: a body that has ended is no body; a `Transfer-Encoding` from
    /// the request is kept, `chunked` last; otherwise a `Content-Length` from the
    /// request, else the body's exact size, else chunked (`GET`, `HEAD`: no body).
    pub(super) fn encode(mut parts: Parts, body: ProxyBody) -> Outgoing {
        let coding = request_coding(&mut parts, &body);
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        // A Vec rather than `BytesMut`: its appends are cheaper, and it becomes `Bytes`
        // without a copy. Sized by a guess (fields run ~40 bytes) rather than a pass
        // over the fields; a long head grows it.
        let mut head = Vec::with_capacity(target.len() + 32 + 48 * parts.headers.len());
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Outgoing {
            head: Bytes::from(head),
            body: coding.map(|coding| (body, coding)),
            head_method: parts.method == Method::HEAD,
            informational: None,
        }
    }

    /// The request again, for a retry on another connection; `None` when it has a body
    /// (a streamed body is gone once sent).
    pub(super) fn replay(&self) -> Option<Outgoing> {
        self.body.is_none().then(|| Outgoing {
            head: self.head.clone(),
            body: None,
            head_method: self.head_method,
            informational: self.informational.clone(),
        })
    }
}

/// The body's framing, with the request's fields made to say it; `None` for no body.
fn request_coding(parts: &mut Parts, body: &ProxyBody) -> Option<Coding> {
    let headers = &mut parts.headers;
    if body.is_end_stream() {
        headers.remove(header::TRANSFER_ENCODING);
        // What is declared is what is sent: a length with no body to follow would have
        // the backend read the next request as this one's body.
        // (Most such requests are GETs without the field: one lookup for them.)
        if headers.contains_key(header::CONTENT_LENGTH)
            && content_length(headers).ok().flatten() != Some(0)
        {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        return None;
    }
    if let Some(te) = headers.get(header::TRANSFER_ENCODING).cloned() {
        headers.remove(header::CONTENT_LENGTH);
        if !ends_chunked(std::iter::once(&te)) {
            let value = format!("{}, chunked", String::from_utf8_lossy(te.as_bytes()));
            let value = HeaderValue::try_from(value)
                .unwrap_or_else(|_| HeaderValue::from_static("chunked"));
            headers.insert(header::TRANSFER_ENCODING, value);
        }
        return Some(Coding::Chunked);
    }
    if let Some(length) = content_length(headers).ok().flatten() {
        return (length > 0).then_some(Coding::Length(length));
    }
    if let Some(length) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        return (length > 0).then_some(Coding::Length(length));
    }
    if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
        return None;
    }
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Some(Coding::Chunked)
}

/// Whether the last transfer coding named is `chunked`.
fn ends_chunked<'a>(values: impl DoubleEndedIterator<Item = &'a HeaderValue>) -> bool {
    values.last().is_some_and(|v| ends_in_chunked(v.as_bytes()))
}

/// The one length all `Content-Length` fields (and list members) agree on; `None` when
/// there is none, an error when they are invalid or disagree.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, H1Error> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for member in value.as_bytes().split(|&b| b == b',') {
            let member = member.trim_ascii();
            let n = parse_digits(member)
                .filter(|_| member.len() <= 19)
                .ok_or(H1Error::Invalid("an invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Invalid("Content-Length values that differ"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// One backend connection's bytes: the stream, what was read of it and not yet used,
/// and what is still to be written.
pub(super) struct Io {
    stream: UpstreamStream,
    read: BytesMut,
    /// How much the next read asks for.
    next_read: usize,
    write: BytesMut,
}

impl Io {
    pub(super) fn new(stream: UpstreamStream) -> Io {
        Io {
            stream,
            read: BytesMut::new(),
            next_read: FIRST_READ,
            write: BytesMut::new(),
        }
    }

    /// Reads more into the read buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = self.next_read;
        if self.read.capacity() - self.read.len() < want / 2 {
            self.read.reserve(want);
        }
        let room = self.read.capacity() - self.read.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.read
        ))?;
        if n == room && self.next_read < MAX_READ {
            self.next_read *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes the write buffer out in full and flushes it.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.stream).poll_write(cx, &self.write))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.write.advance(n);
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Readies an idle connection's buffers for its next exchange: reads start small
    /// again, and a buffer grown for a large body is let go, so an idle connection
    /// holds a few KiB rather than what its largest exchange needed.
    pub(super) fn settle(&mut self) {
        // `capacity()` is only what is left of the allocation after the bytes handed out;
        // reads that grew say the allocation itself is large, and a small response read
        // into it next (its fields, a body the cache keeps) would keep all of it alive.
        if self.next_read > FIRST_READ || self.read.capacity() > 2 * FIRST_READ {
            self.read = BytesMut::new();
        }
        self.next_read = FIRST_READ;
        if self.write.capacity() > 2 * FIRST_READ {
            self.write = BytesMut::new();
        }
    }

    /// Whether bytes were read that no response used.
    pub(super) fn has_unread(&self) -> bool {
        !self.read.is_empty()
    }

    /// Whether an idle connection has ended: closed or reset by the backend, or sent
    /// bytes nobody asked for (it cannot be trusted with a request then). `Pending`
    /// while it is quietly open.
    pub(super) fn poll_idle_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.poll_fill(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(()),
        }
    }

    /// The stream and any bytes read past the response head, for the protocol a `101`
    /// switched to.
    fn into_upgraded(self) -> Upgraded {
        Upgraded {
            stream: self.stream,
            pending: self.read.freeze(),
        }
    }
}

/// The request being sent: its body still to go, and how far it got.
pub(super) struct Sending {
    body: Option<(ProxyBody, Coding)>,
    /// The head and all of the body are written.
    done: bool,
    /// Any byte of this request reached the socket.
    wrote: bool,
    /// A frame was taken from the body.
    touched: bool,
    /// Sending failed. A write that failed leaves the response to be read on (the
    /// backend may have answered, an early 413 say); a body that failed ends the
    /// exchange.
    failed: Option<H1Error>,
}

impl Sending {
    pub(super) fn start(io: &mut Io, out: &mut Outgoing) -> Sending {
        io.write.clear();
        io.write.extend_from_slice(&out.head);
        Sending {
            body: out.body.take(),
            done: false,
            wrote: false,
            touched: false,
            failed: None,
        }
    }

    /// Whether any byte of the request reached the socket.
    pub(super) fn wrote(&self) -> bool {
        self.wrote
    }

    /// Whether the body is as it was given: no frame taken from it.
    pub(super) fn untouched(&self) -> bool {
        !self.touched
    }

    /// The body, for sending again elsewhere (see [`untouched`](Sending::untouched)).
    pub(super) fn take_body(&mut self) -> Option<(ProxyBody, Coding)> {
        self.body.take()
    }

    /// The request body's failure, once.
    pub(super) fn take_body_failure(&mut self) -> Option<H1Error> {
        match self.failed {
            Some(H1Error::Body(_)) => self.failed.take(),
            _ => None,
        }
    }

    /// Whether the request, body included, went out in full.
    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// Sends what can be sent now; `Ready` once it all went out or sending failed.
    pub(super) fn poll(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<()> {
        if self.done || self.failed.is_some() {
            return Poll::Ready(());
        }
        loop {
            if let Err(error) = self.fill(io, cx) {
                self.failed = Some(error);
                return Poll::Ready(());
            }
            if io.write.is_empty() && self.body.is_some() {
                // Waiting for the body.
                return Poll::Pending;
            }
            let before = io.write.len();
            let written = io.poll_write_out(cx);
            self.wrote |= io.write.len() < before;
            match written {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => {
                    self.failed = Some(H1Error::Io(error));
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) if self.body.is_none() => {
                    self.done = true;
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) => {}
            }
        }
    }

    /// Moves body frames that are ready into the write buffer, framed, up to its high
    /// water mark.
    fn fill(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Result<(), H1Error> {
        while io.write.len() < WRITE_HIGH_WATER {
            let Some((body, coding)) = self.body.as_mut() else {
                return Ok(());
            };
            let frame = match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Err(error))) => return Err(H1Error::Body(error)),
                Poll::Ready(Some(Ok(frame))) => Some(frame),
                Poll::Ready(None) => None,
            };
            self.touched = true;
            let ended = match frame {
                None => true,
                Some(frame) => match frame.into_data() {
                    Ok(data) => {
                        put_data(&mut io.write, coding, &data)?;
                        // A declared length is all there is: the body is not polled past
                        // it (a client's body may not say it has ended until polled again).
                        *coding == Coding::Length(0) || body.is_end_stream()
                    }
                    Err(frame) => {
                        if let (Coding::Chunked, Ok(trailers)) = (*coding, frame.into_trailers()) {
                            io.write.put_slice(b"0\r\n");
                            put_trailers(&mut io.write, &trailers);
                            io.write.put_slice(b"\r\n");
                            self.body = None;
                            return Ok(());
                        }
                        false
                    }
                },
            };
            if ended {
                match *coding {
                    Coding::Length(0) => {}
                    Coding::Length(_) => {
                        return Err(H1Error::Body(
                            "the body ended before its Content-Length".into(),
                        ))
                    }
                    Coding::Chunked => io.write.put_slice(b"0\r\n\r\n"),
                }
                self.body = None;
            }
        }
        Ok(())
    }
}

fn put_data(write: &mut BytesMut, coding: &mut Coding, data: &Bytes) -> Result<(), H1Error> {
    if data.is_empty() {
        return Ok(());
    }
    match coding {
        Coding::Length(left) => {
            let len = data.len() as u64;
            if len > *left {
                return Err(H1Error::Body(
                    "the body is longer than its Content-Length".into(),
                ));
            }
            *left -= len;
            write.put_slice(data);
        }
        Coding::Chunked => {
            write.put_slice(format!("{:X}\r\n", data.len()).as_bytes());
            write.put_slice(data);
            write.put_slice(b"\r\n");
        }
    }
    Ok(())
}

/// Trailer fields, those that may be trailers (RFC 9110 §6.5.1) only.
fn put_trailers(write: &mut BytesMut, trailers: &HeaderMap) {
    for (name, value) in trailers {
        if is_framing_or_routing(name) {
            continue;
        }
        write.put_slice(name.as_str().as_bytes());
        write.put_slice(b": ");
        write.put_slice(value.as_bytes());
        write.put_slice(b"\r\n");
    }
}

fn is_framing_or_routing(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::HOST
            | header::TRAILER
            | header::CONNECTION
            | header::CONTENT_TYPE
            | header::CONTENT_ENCODING
            | header::CONTENT_RANGE
    )
}

/// A parsed response head.
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
    /// The backend's reason phrase when it is not the usual one for the status.
    pub(super) reason: Option<hyper::ext::ReasonPhrase>,
}

/// Reads the response head: the final one, interim ones passed to `informational` (or
/// skipped) on the way; for a `101`, the head as it is.
pub(super) fn poll_head(
    io: &mut Io,
    cx: &mut Context<'_>,
    informational: Option<&OnInformational>,
) -> Poll<Result<Head, H1Error>> {
    loop {
        if let Some(head) = parse_head(&mut io.read)? {
            if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                if head.status != StatusCode::CONTINUE {
                    if let Some(OnInformational(callback)) = informational {
                        callback(head.status, &head.headers);
                    }
                }
                continue;
            }
            return Poll::Ready(Ok(head));
        }
        match std::task::ready!(io.poll_fill(cx)) {
            Ok(0) => return Poll::Ready(Err(H1Error::Closed)),
            Ok(_) => {}
            Err(error) => return Poll::Ready(Err(H1Error::Io(error))),
        }
    }
}

/// Parses a response head at the start of `buf`, taking it off; `None` while it is
/// incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, H1Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    // Where each field's name and value sit in the head: the head becomes one shared
    // buffer that the values are slices of.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_FIELDS];
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(H1Error::Invalid("a response head larger than 64 KiB"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Invalid(
                "more than 100 fields in the response head",
            ))
        }
        Err(_) => return Err(H1Error::Invalid("a malformed response head")),
    };
    if len > MAX_HEAD {
        return Err(H1Error::Invalid("a response head larger than 64 KiB"));
    }
    // Where a slice httparse gave sits in `buf`. An empty one may not point into it
    // (httparse gives a literal `""` for a missing or non-ASCII reason phrase): it is
    // an empty span at 0, as it reads the same from anywhere.
    let range = buf.as_ptr_range();
    let offset = |s: &[u8]| {
        let at = s.as_ptr();
        if s.is_empty() || !range.contains(&at) {
            return 0;
        }
        (at as usize - range.start as usize) as u32
    };
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let name = field.name.as_bytes();
        *span = (
            offset(name),
            name.len() as u32,
            offset(field.value),
            field.value.len() as u32,
        );
    }
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let code = response.code.unwrap_or_default();
    let reason = response
        .reason
        .filter(|r| !r.is_empty())
        .map(|r| (offset(r.as_bytes()), r.len()));
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("an invalid status code"))?;
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity((count + 2).max(RESPONSE_MAP_ROOM));
    for &(name_at, name_len, value_at, value_len) in &spans[..count] {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len as usize])
            .map_err(|_| H1Error::Invalid("an invalid field name"))?;
        let value = head.slice(value_at..value_at + value_len as usize);
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| H1Error::Invalid("an invalid field value"))?;
        headers.append(name, value);
    }
    let reason = reason.and_then(|(at, len)| {
        let at = at as usize;
        let phrase = &head[at..at + len];
        let usual = status.canonical_reason().map(str::as_bytes);
        (usual != Some(phrase))
            .then(|| hyper::ext::ReasonPhrase::try_from(head.slice(at..at + len)).ok())
            .flatten()
    });
    Ok(Some(Head {
        status,
        version,
        headers,
        reason,
    }))
}

/// How a response body is framed (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body: a response to `HEAD`, a 1xx, 204 or 304, or `Content-Length: 0`.
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

impl Framing {
    pub(super) fn of(head: &Head, head_method: bool) -> Result<Framing, H1Error> {
        let status = head.status;
        if head_method
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Framing::Empty);
        }
        let headers = &head.headers;
        if headers.contains_key(header::TRANSFER_ENCODING) {
            if headers.contains_key(header::CONTENT_LENGTH) {
                return Err(H1Error::Invalid(
                    "both Transfer-Encoding and Content-Length",
                ));
            }
            if head.version == Version::HTTP_10 {
                return Err(H1Error::Invalid(
                    "Transfer-Encoding in an HTTP/1.0 response",
                ));
            }
            return Ok(
                if ends_chunked(headers.get_all(header::TRANSFER_ENCODING).iter()) {
                    Framing::Chunked
                } else {
                    Framing::UntilClose
                },
            );
        }
        Ok(match content_length(headers)? {
            Some(0) => Framing::Empty,
            Some(length) => Framing::Length(length),
            None => Framing::UntilClose,
        })
    }
}

/// Where a chunked body's decoding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

/// A response body being read off its connection.
pub(super) struct Reader {
    framing: Framing,
    chunk: Chunk,
    done: bool,
}

impl Reader {
    pub(super) fn new(framing: Framing) -> Reader {
        Reader {
            framing,
            chunk: Chunk::Size,
            done: framing == Framing::Empty,
        }
    }

    /// Whether the body has been read to its end.
    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// The body's length, when the head declared it.
    pub(super) fn exact_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    /// The next frame of the body: data as it arrives, then trailers if any; `None`
    /// at its end.
    pub(super) fn poll_frame(
        &mut self,
        io: &mut Io,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.step(&mut io.read) {
                Err(error) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(error)));
                }
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if self.done => return Poll::Ready(None),
                Ok(None) => {}
            }
            match std::task::ready!(io.poll_fill(cx)) {
                Ok(0) if self.framing == Framing::UntilClose => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(H1Error::Closed)));
                }
                Ok(_) => {}
                Err(error) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(H1Error::Io(error))));
                }
            }
        }
    }

    /// Decodes what `buf` holds: a frame, or `None` when more must be read (or the
    /// body has ended: `done`).
    fn step(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, H1Error> {
        match self.framing {
            Framing::Empty => {
                self.done = true;
                Ok(None)
            }
            Framing::UntilClose => Ok((!buf.is_empty()).then(|| Frame::data(buf.split().freeze()))),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let left = left - n as u64;
                self.framing = Framing::Length(left);
                self.done = left == 0;
                Ok(Some(Frame::data(buf.split_to(n).freeze())))
            }
            Framing::Chunked => self.step_chunked(buf),
        }
    }

    fn step_chunked(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, H1Error> {
        loop {
            match self.chunk {
                Chunk::Size => {
                    let Some((line, size)) = chunk_size(buf)? else {
                        return Ok(None);
                    };
                    buf.advance(line);
                    self.chunk = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - n as u64;
                    self.chunk = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                    return Ok(Some(Frame::data(buf.split_to(n).freeze())));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Invalid("a chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.done = true;
                        return Ok(None);
                    }
                    let Some(trailers) = trailer_section(buf)? else {
                        return Ok(None);
                    };
                    self.done = true;
                    return Ok(Some(Frame::trailers(trailers)));
                }
            }
        }
    }
}

/// A chunk-size line at the start of `buf`: its length (CRLF included) and the size it
/// gives; `None` while incomplete. Extensions are skipped, but must be free of control
/// characters; a bare LF ends nothing.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, H1Error> {
    let invalid = || H1Error::Invalid("a malformed chunk size");
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == buf.len() {
        return if digits > 16 {
            Err(invalid())
        } else {
            Ok(None)
        };
    }
    if digits == 0 || digits > 16 {
        return Err(invalid());
    }
    let size = buf[..digits].iter().fold(0u64, |n, &d| {
        let d = (d as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(d)
    });
    let rest = &buf[digits..];
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        if rest.len() + digits > MAX_CHUNK_LINE || rest.contains(&b'\n') {
            return Err(invalid());
        }
        return Ok(None);
    };
    let ext = &rest[..cr];
    let ext_ok = ext.is_empty()
        || (ext.trim_ascii_start().first() == Some(&b';')
            && ext.iter().all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f)));
    if !ext_ok || digits + cr + 2 > MAX_CHUNK_LINE {
        return Err(invalid());
    }
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((digits + cr + 2, size))),
        Some(_) => Err(invalid()),
    }
}

/// A trailer section ending in an empty line at the start of `buf`, taken off it;
/// `None` while incomplete.
fn trailer_section(buf: &mut BytesMut) -> Result<Option<HeaderMap>, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let (len, parsed) = match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(H1Error::Invalid("a trailer section larger than 64 KiB"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(H1Error::Invalid("a malformed trailer section")),
    };
    let mut trailers = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| H1Error::Invalid("an invalid trailer field name"))?;
        if is_framing_or_routing(&name) {
            continue;
        }
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| H1Error::Invalid("an invalid trailer field value"))?;
        trailers.append(name, value);
    }
    buf.advance(len);
    Ok(Some(trailers))
}

/// A backend connection after `101 Switching Protocols`, for the protocol it switched
/// to: bytes the backend sent right behind the 101 come first.
pub(crate) struct Upgraded {
    stream: UpstreamStream,
    pending: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The backend side of a `101` response, as a response extension, taken by the handler
/// to splice it to the client's.
pub(crate) struct UpgradedSlot(pub(crate) std::sync::Arc<std::sync::Mutex<Option<Upgraded>>>);

impl Clone for UpgradedSlot {
    fn clone(&self) -> Self {
        UpgradedSlot(self.0.clone())
    }
}

impl UpgradedSlot {
    pub(super) fn new(io: Io) -> UpgradedSlot {
        UpgradedSlot(std::sync::Arc::new(std::sync::Mutex::new(Some(
            io.into_upgraded(),
        ))))
    }

    /// The backend's connection, once.
    pub(crate) fn take(&self) -> Option<Upgraded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::BodyExt;

    fn encoded(req: Request<ProxyBody>) -> (String, Option<Coding>) {
        let (parts, body) = req.into_parts();
        let out = Outgoing::encode(parts, body);
        let coding = out.body.as_ref().map(|(_, coding)| *coding);
        (String::from_utf8(out.head.to_vec()).unwrap(), coding)
    }

    fn full(body: &'static str) -> ProxyBody {
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    /// A body of unknown length.
    fn streamed(body: &'static str) -> ProxyBody {
        let frames =
            futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from(body)))]);
        http_body_util::StreamBody::new(frames).boxed_unsync()
    }

    #[test]
    fn a_request_head_is_encoded_with_the_framing_its_body_needs() {
        let get = Request::get("/a?b=1")
            .header("host", "app")
            .body(crate::http::body::empty())
            .unwrap();
        assert_eq!(
            encoded(get),
            ("GET /a?b=1 HTTP/1.1\r\nhost: app\r\n\r\n".to_string(), None)
        );

        let sized = Request::post("/").body(full("hello")).unwrap();
        assert_eq!(
            encoded(sized),
            (
                "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n".to_string(),
                Some(Coding::Length(5))
            )
        );

        let unknown = Request::post("/").body(streamed("hello")).unwrap();
        assert_eq!(
            encoded(unknown),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_string(),
                Some(Coding::Chunked)
            )
        );

        // A GET with a body of unknown length sends none, as hyper's client did.
        let get_streamed = Request::get("/").body(streamed("x")).unwrap();
        assert_eq!(encoded(get_streamed).1, None);

        // The request's own Content-Length wins over the body's size.
        let declared = Request::put("/")
            .header("content-length", "3")
            .body(streamed("abc"))
            .unwrap();
        assert_eq!(encoded(declared).1, Some(Coding::Length(3)));
    }

    fn head_of(raw: &str) -> Result<Option<Head>, H1Error> {
        parse_head(&mut BytesMut::from(raw))
    }

    #[test]
    fn a_response_head_is_parsed_once_complete() {
        assert!(head_of("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        let head =
            head_of("HTTP/1.1 404 Gone Fishing\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok")
                .unwrap()
                .unwrap();
        assert_eq!(head.status, StatusCode::NOT_FOUND);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["content-length"], "2");
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(
            head.reason.as_ref().map(|r| r.as_bytes()),
            Some(&b"Gone Fishing"[..]),
            "a reason phrase that is not the usual one is kept"
        );
        let usual = head_of("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(usual.reason.is_none());
        assert_eq!(usual.version, Version::HTTP_10);
    }

    #[test]
    fn heads_without_a_reason_phrase_or_with_empty_values_are_read() {
        // httparse gives such phrases and values as slices that may lie outside the
        // buffer read.
        for raw in [
            "HTTP/1.1 200\r\n\r\n",
            "HTTP/1.1 200 \r\n\r\n",
            "HTTP/1.1 200\n\n",
            "HTTP/1.1 200 \u{e7}a va\r\n\r\n",
        ] {
            let head = head_of(raw).unwrap().unwrap_or_else(|| panic!("{raw:?}"));
            assert_eq!(head.status, StatusCode::OK, "{raw:?}");
        }
        let head = head_of("HTTP/1.1 204\r\nX-Empty:\r\nX-Blank: \r\nX-A: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.headers["x-empty"], "");
        assert_eq!(head.headers["x-blank"], "");
        assert_eq!(head.headers["x-a"], "a");
    }

    #[test]
    fn a_malformed_or_oversized_response_head_is_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX A: 1\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "ICY 200 OK\r\n\r\n",
        ] {
            assert!(head_of(raw).is_err(), "{raw:?}");
        }
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}", "a".repeat(MAX_HEAD + 1));
        assert!(head_of(&big).is_err(), "a head over 64 KiB");
        let many: String = (0..=MAX_FIELDS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(head_of(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).is_err());
    }

    fn framing(raw: &str, head_method: bool) -> Result<Framing, H1Error> {
        Framing::of(&head_of(raw).unwrap().unwrap(), head_method)
    }

    #[test]
    fn a_response_body_is_framed_as_rfc_9112_says_or_refused() {
        use Framing::*;
        let ok = |raw: &str| framing(raw, false).unwrap();
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"),
            Length(7)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"),
            Length(7)
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), Empty);
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Chunked
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Chunked
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            UntilClose
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), UntilClose);
        assert_eq!(
            ok("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
            Empty
        );
        assert_eq!(
            ok("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
            Empty
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap(),
            Empty,
            "the answer to HEAD"
        );
        for raw in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(framing(raw, false).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn chunk_size_lines_are_read_strictly() {
        assert_eq!(chunk_size(b"4\r\nRust").unwrap(), Some((3, 4)));
        assert_eq!(chunk_size(b"1aF\r\n").unwrap(), Some((5, 0x1af)));
        assert_eq!(chunk_size(b"4;name=value\r\n").unwrap(), Some((14, 4)));
        assert_eq!(chunk_size(b"4 ;name\r\n").unwrap(), Some((9, 4)));
        for partial in [&b""[..], b"4", b"4;ext", b"4\r"] {
            assert_eq!(chunk_size(partial).unwrap(), None, "{partial:?}");
        }
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"4\n",
            b"4\rx",
            b"4 x\r\n",
            b"4;a\x00b\r\n",
            b"4;a\nb\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(chunk_size(bad).is_err(), "{bad:?}");
        }
        let long = format!("4;{}", "a".repeat(MAX_CHUNK_LINE));
        assert!(chunk_size(long.as_bytes()).is_err(), "an endless extension");
    }

    /// Everything `reader` makes of `wire`, fed in pieces of `step` bytes.
    fn decode(
        framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut reader = Reader::new(framing);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(frame) = reader.step(&mut buf)? {
                match frame.into_data() {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
        }
        assert!(reader.is_done(), "the body ended");
        Ok((data, trailers))
    }

    #[test]
    fn chunked_bodies_are_decoded_in_any_split_with_their_trailers() {
        let wire = b"4\r\nRust\r\n6;ext=1\r\n is ok\r\n0\r\nX-Sum: 9\r\nContent-Length: 1\r\n\r\n";
        for step in [1, 2, 5, wire.len()] {
            let (data, trailers) = decode(Framing::Chunked, wire, step).unwrap();
            assert_eq!(data, b"Rust is ok");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["x-sum"], "9");
            assert!(
                !trailers.contains_key("content-length"),
                "framing fields dropped"
            );
        }
        let (data, trailers) = decode(Framing::Chunked, b"2\r\nok\r\n0\r\n\r\n", 3).unwrap();
        assert_eq!((data.as_slice(), trailers), (&b"ok"[..], None));

        assert!(decode(Framing::Chunked, b"2\r\nokX\r\n0\r\n\r\n", 64).is_err());
        assert!(decode(Framing::Chunked, b"2\r\nok\r\nzz\r\n", 64).is_err());
    }

    /// A connection's `Io` over loopback, and the backend's end of it.
    async fn loopback_io() -> (Io, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (backend, _) = listener.accept().await.unwrap();
        (Io::new(UpstreamStream::Plain(stream)), backend)
    }

    #[tokio::test]
    async fn an_idle_connection_lets_go_of_buffers_grown_for_a_large_exchange() {
        let (mut io, _backend) = loopback_io().await;
        io.read.reserve(MAX_READ);
        io.write.reserve(WRITE_HIGH_WATER);
        io.next_read = MAX_READ;
        io.settle();
        assert!(io.read.capacity() <= 2 * FIRST_READ);
        assert!(io.write.capacity() <= 2 * FIRST_READ);
        assert_eq!(io.next_read, FIRST_READ, "reads start small again");

        io.read.reserve(FIRST_READ);
        let kept = io.read.capacity();
        io.settle();
        assert_eq!(
            io.read.capacity(),
            kept,
            "a small buffer is kept for the next exchange"
        );
    }

    #[tokio::test]
    async fn bytes_the_backend_sent_right_behind_its_101_come_first_after_the_switch() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut io, mut backend) = loopback_io().await;
        // The head and a first frame of the new protocol, read together.
        io.read
            .extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n\r\nfirst");
        let head = parse_head(&mut io.read).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
        let mut upgraded = io.into_upgraded();
        upgraded.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        backend.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello", "writes go to the backend");
        backend.write_all(b" then the rest").await.unwrap();
        drop(backend);
        let mut got = String::new();
        upgraded.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "first then the rest");
    }

    #[test]
    fn a_length_body_ends_at_its_length() {
        let (data, _) = decode(Framing::Length(5), b"hello", 2).unwrap();
        assert_eq!(data, b"hello");
        let mut reader = Reader::new(Framing::Length(2));
        let mut buf = BytesMut::from(&b"okHTTP/1.1"[..]);
        let frame = reader.step(&mut buf).unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ok");
        assert!(reader.is_done());
        assert_eq!(&buf[..], b"HTTP/1.1", "bytes past the body are left");
    }
}
