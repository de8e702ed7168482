//! Response bodies of the simulated backend: deterministic filler streamed in
//! chunks, and a wrapper that keeps a worker busy until the body has been sent.

use super::etag::etag_from_digest;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use md5::{Digest, Md5};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Filler bodies are sent in chunks of this size.
const CHUNK: usize = 64 * 1024;
/// The filler repeats this line; its length divides `CHUNK`, so every chunk is the same bytes.
const PATTERN: &[u8; 32] = b"loadgate simulated backend data\n";
/// Bound on the per-size digest cache (sizes come from `?size=`, so from clients).
const DIGEST_CACHE_ENTRIES: usize = 1024;
/// Digests of bodies larger than this are computed off the async workers.
const INLINE_DIGEST_LIMIT: usize = 1024 * 1024;

pin_project_lite::pin_project! {
    /// The body of every response the simulated backend sends.
    ///
    /// Whatever it holds (the worker, the connection's in-flight mark) is
    /// released when the last frame has been produced or the body is dropped,
    /// so a slow reader keeps its worker busy, as a Tomcat thread blocked in a write would.
    pub struct SimBody {
        #[pin]
        inner: UnsyncBoxBody<Bytes, BoxError>,
        held: Vec<Box<dyn Send>>,
    }
}

impl SimBody {
    pub(crate) fn new<B>(inner: B) -> SimBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        SimBody {
            inner: inner.map_err(Into::into).boxed_unsync(),
            held: Vec::new(),
        }
    }

    pub(crate) fn empty() -> SimBody {
        SimBody::new(Empty::<Bytes>::new())
    }

    pub(crate) fn full(bytes: impl Into<Bytes>) -> SimBody {
        SimBody::new(Full::new(bytes.into()))
    }

    /// Keeps `guard` alive until the body is finished.
    pub(crate) fn hold(&mut self, guard: impl Send + 'static) {
        self.held.push(Box::new(guard));
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let finished = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if finished {
            this.held.clear();
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

/// `len` bytes of deterministic filler, produced in 64 KiB chunks that share one buffer.
pub(crate) struct FillerBody {
    remaining: usize,
}

impl FillerBody {
    pub(crate) fn new(len: usize) -> FillerBody {
        FillerBody { remaining: len }
    }
}

impl Body for FillerBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = self.remaining.min(CHUNK);
        self.remaining -= len;
        Poll::Ready(Some(Ok(Frame::data(filler_chunk().slice(..len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining as u64)
    }
}

fn filler_chunk() -> &'static Bytes {
    static FILLER: OnceLock<Bytes> = OnceLock::new();
    FILLER.get_or_init(|| PATTERN.iter().copied().cycle().take(CHUNK).collect())
}

/// The first `len` bytes of the filler, in one buffer (tests and small bodies).
pub fn filler_bytes(len: usize) -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(len).collect()
}

/// The Spring-style ETag of a filler body of `len` bytes, computed once per size.
pub(crate) async fn filler_etag(len: usize) -> String {
    static DIGESTS: OnceLock<Mutex<HashMap<usize, [u8; 16]>>> = OnceLock::new();
    let cache = DIGESTS.get_or_init(Default::default);
    let cached = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&len)
        .copied();
    let digest = match cached {
        Some(digest) => digest,
        None => {
            let digest = if len <= INLINE_DIGEST_LIMIT {
                filler_digest(len)
            } else {
                tokio::task::spawn_blocking(move || filler_digest(len))
                    .await
                    .expect("digest task does not panic")
            };
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= DIGEST_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(len, digest);
            digest
        }
    };
    etag_from_digest(&digest)
}

fn filler_digest(len: usize) -> [u8; 16] {
    let chunk = filler_chunk();
    let mut hasher = Md5::new();
    let mut remaining = len;
    while remaining > 0 {
        let n = remaining.min(CHUNK);
        hasher.update(&chunk[..n]);
        remaining -= n;
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::etag::shallow_etag;

    #[tokio::test]
    async fn filler_streams_exactly_len_bytes_in_chunks() {
        let len = 3 * CHUNK + 17;
        let body = FillerBody::new(len);
        assert_eq!(body.size_hint().exact(), Some(len as u64));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), len);
        assert_eq!(&collected[..], &filler_bytes(len)[..]);
    }

    #[tokio::test]
    async fn filler_etag_matches_md5_of_the_whole_body() {
        for len in [0, 1, 31, CHUNK, CHUNK + 1, 2 * CHUNK + 5] {
            assert_eq!(filler_etag(len).await, shallow_etag(&filler_bytes(len)));
        }
    }

    #[tokio::test]
    async fn held_guards_are_released_at_the_end_of_the_body() {
        let marker = std::sync::Arc::new(());
        let mut body = SimBody::new(FillerBody::new(CHUNK + 1));
        body.hold(std::sync::Arc::clone(&marker));
        let mut body = std::pin::pin!(body);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().len(), CHUNK);
        assert_eq!(std::sync::Arc::strong_count(&marker), 2);
        body.frame().await.unwrap().unwrap();
        assert_eq!(std::sync::Arc::strong_count(&marker), 1);
    }
}
