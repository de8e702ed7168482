//! Filling the cache: coalescing concurrent misses for one key behind one origin
//! request, and the body that copies the response into the store as it streams.
//!
//! The client is never delayed: each frame is passed on as soon as it arrives, and
//! a clone of its bytes (a reference count, not a copy) is kept. Buffering stops
//! and is dropped the moment the body passes the object limit or the cache's
//! buffering budget, so a large response streams through and is never held whole.
//!
//! Not here: whether a response is stored and with what headers and freshness
//! (`pending.rs`), or answering from the store (`lookup.rs`).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use md5::{Digest, Md5};
use tokio::sync::watch;

use super::{Entry, Inner};
use crate::cache::policy::Freshness;
use crate::http::body::{from_frames, take_whole, BoxError, ProxyBody};

/// Held by the one request filling a key; followers wake when it is dropped.
pub struct Fill {
    inner: Arc<Inner>,
    key: String,
    _done: watch::Sender<()>,
}

impl Drop for Fill {
    fn drop(&mut self) {
        // Removed before `_done` drops, so woken followers do not find it again.
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

pub enum Joined {
    Leader(Fill),
    Follower(watch::Receiver<()>),
}

/// Becomes the filler of `key`, or a follower of the request already filling it.
pub fn join(inner: &Arc<Inner>, key: &str) -> Joined {
    let mut map = inner.inflight.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(done) = map.get(key) {
        return Joined::Follower(done.clone());
    }
    let (tx, rx) = watch::channel(());
    map.insert(key.to_string(), rx);
    Joined::Leader(Fill {
        inner: inner.clone(),
        key: key.to_string(),
        _done: tx,
    })
}

/// Everything needed to store a response once its body is complete.
pub struct Commit {
    pub inner: Arc<Inner>,
    pub key: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub freshness: Freshness,
    pub vary_names: Vec<HeaderName>,
    pub vary_values: Vec<Option<String>>,
    /// `Content-Length`, when the origin sent one: a shorter body is not stored.
    pub expected: Option<u64>,
    pub _fill: Option<Fill>,
}

struct Buffer {
    commit: Commit,
    chunks: Vec<Bytes>,
    len: usize,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.commit
            .inner
            .buffering
            .fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl Buffer {
    /// Keeps `data`; false when that would pass the object limit or the budget.
    fn keep(&mut self, data: &Bytes) -> bool {
        let inner = &self.commit.inner;
        let n = data.len();
        if self.len + n > inner.store.max_object() {
            return false;
        }
        let before = inner.buffering.fetch_add(n, Ordering::Relaxed);
        self.len += n;
        self.chunks.push(data.clone());
        before + n <= inner.buffer_budget
    }

    /// Stores the body kept; false when it is not stored (shorter than its
    /// `Content-Length`, or refused by the store).
    fn store(mut self) -> bool {
        if self
            .commit
            .expected
            .is_some_and(|expected| expected != self.len as u64)
        {
            return false;
        }
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            // A copy of its own: the chunk is a slice of the read buffer of the
            // connection it came on, and kept as it is it would keep all of that alive
            // for as long as the entry lives, far past what the entry is counted at.
            1 => Bytes::copy_from_slice(&self.chunks.pop().expect("one chunk")),
            _ => {
                let mut all = BytesMut::with_capacity(self.len);
                for chunk in self.chunks.drain(..) {
                    all.extend_from_slice(&chunk);
                }
                all.freeze()
            }
        };
        let c = &mut self.commit;
        if c.inner.settings.generate_etag
            && c.status == StatusCode::OK
            && !c.headers.contains_key(header::ETAG)
        {
            let digest = Md5::digest(&body);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            if let Ok(value) = HeaderValue::from_str(&format!("\"{hex}\"")) {
                c.headers.insert(header::ETAG, value);
            }
        }
        let entry = Entry {
            status: c.status,
            headers: owned(&c.headers),
            body,
            freshness: c.freshness,
            vary_names: std::mem::take(&mut c.vary_names),
            vary_values: std::mem::take(&mut c.vary_values),
        };
        c.inner.insert(&c.key, entry)
        // `self` drops here: the budget is released, then the fill guard wakes followers.
    }
}

/// A response body passed through to the client and copied into the store.
pub struct StoreBody {
    inner: ProxyBody,
    buffer: Option<Buffer>,
    /// Whether it was stored, when that was settled before the body was sent on.
    stored: Option<bool>,
}

impl StoreBody {
    pub fn new(inner: ProxyBody, commit: Commit) -> StoreBody {
        let mut buffer = Buffer {
            commit,
            chunks: Vec::new(),
            len: 0,
        };
        // A body all here already (most answers arrive with their head, and an empty one
        // may never be polled at all) is stored now, so the response can say whether
        // it was. A longer one is kept as it streams past.
        match take_whole(inner) {
            Ok(frames) => {
                let kept = frames
                    .iter()
                    .filter_map(Frame::data_ref)
                    .all(|data| buffer.keep(data));
                let stored = kept && buffer.store();
                StoreBody {
                    inner: from_frames(frames),
                    buffer: None,
                    stored: Some(stored),
                }
            }
            Err(inner) => StoreBody {
                inner,
                buffer: Some(buffer),
                stored: None,
            },
        }
    }

    /// `Some(stored)` when the body was whole before it was sent on, so whether it was
    /// stored is known; `None` while that waits for the body's end.
    pub fn stored(&self) -> Option<bool> {
        self.stored
    }

    pub fn boxed(self) -> ProxyBody {
        BodyExt::boxed_unsync(self)
    }
}

impl Body for StoreBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let keep = this.buffer.as_mut().is_some_and(|b| b.keep(data));
                    if !keep {
                        this.buffer = None;
                    }
                }
                // A body of known length may be dropped right after its last byte,
                // without being polled to its end: store as soon as it is complete.
                let complete = this.inner.is_end_stream()
                    || this
                        .buffer
                        .as_ref()
                        .is_some_and(|b| b.commit.expected.is_some_and(|e| e == b.len as u64));
                if complete {
                    if let Some(buffer) = this.buffer.take() {
                        buffer.store();
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(buffer) = this.buffer.take() {
                    buffer.store();
                }
            }
            Poll::Ready(Some(Err(_))) => this.buffer = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The longest a body is read into the store behind a client that was answered 304.
pub const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a body to its end (storing it), for a client that was answered 304, for at
/// most [`DRAIN_LIMIT`]: a backend trickling the body must not hold its connection
/// (and a worker) with no client waiting. Cut off, the body is not stored.
pub async fn drain(body: StoreBody) {
    let _ = tokio::time::timeout(DRAIN_LIMIT, body.collect()).await;
}

/// `headers` with values of their own: a response's field values are slices of the
/// buffer its head was read into, which a stored entry would otherwise keep alive.
fn owned(headers: &HeaderMap) -> HeaderMap {
    let mut own = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        own.append(name.clone(), copy);
    }
    own
}
