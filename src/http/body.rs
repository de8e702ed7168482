//! Body types of the data path: the boxed body every response carries, and a
//! wrapper that runs a guard's `Drop` exactly when a body finishes or is dropped.
//!
//! Bodies are streamed frame by frame; nothing here buffers a whole body. hyper's
//! own connection buffers are the only buffering, so a slow reader makes the proxy
//! stop reading from the other side (backpressure) rather than grow memory.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request forwarded and every response returned.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// Passes `inner` through and drops `guard` at the end of the stream, on error,
    /// or when the body itself is dropped (client went away), whichever is first.
    pub struct OnEnd<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> OnEnd<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        OnEnd {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body, G> Body for OnEnd<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
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

/// How the client's side of a request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Bad chunk framing, a reset, a truncated body.
    Broken,
    /// More than `limit` bytes (`max_body_bytes`).
    TooLarge { limit: u64 },
}

/// The error a [`WatchedBody`] yields once the body passes its size limit.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the {limit}-byte limit")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// What a [`WatchedBody`] reports back to the handler.
#[derive(Debug, Default)]
pub struct BodyWatch {
    /// 0: fine; 1: broken; 2: too large.
    state: AtomicU8,
    limit: AtomicU64,
}

impl BodyWatch {
    pub fn fault(&self) -> Option<BodyFault> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            1 => Some(BodyFault::Broken),
            _ => Some(BodyFault::TooLarge {
                limit: self.limit.load(Ordering::Relaxed),
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that enforces the body size limit as it streams, and remembers
    /// whether and how the client's side of it failed, so a failed upstream exchange can
    /// be blamed on the right party: 413 or 400 for the client, 502 for the backend.
    pub struct WatchedBody<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: Option<u64>,
        watch: Arc<BodyWatch>,
    }
}

impl<B> WatchedBody<B> {
    pub fn new(inner: B, limit: Option<u64>) -> (Self, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch::default());
        (
            WatchedBody {
                inner,
                seen: 0,
                limit,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl<B> Body for WatchedBody<B>
where
    B: Body,
    B::Error: From<BodyTooLarge>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if this.watch.fault().is_some() {
            return Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.remaining() as u64);
                *this.seen = this.seen.saturating_add(len);
                if let Some(limit) = *this.limit {
                    if *this.seen > limit {
                        this.watch.limit.store(limit, Ordering::Relaxed);
                        this.watch.state.store(2, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyTooLarge { limit }.into())));
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.watch.state.store(1, Ordering::Release),
            _ => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(Arc<AtomicUsize>);
    impl Drop for Count {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn guard_drops_when_body_ends() {
        let drops = Arc::new(AtomicUsize::new(0));
        let body = OnEnd::new(Full::new(Bytes::from_static(b"abc")), Count(drops.clone()));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "abc");
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn guard_drops_when_body_is_abandoned() {
        let drops = Arc::new(AtomicUsize::new(0));
        let body = OnEnd::new(Full::new(Bytes::from_static(b"abc")), Count(drops.clone()));
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(body);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    fn chunks(sizes: &[usize]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![b'x'; n]))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn watched_body_passes_a_body_at_the_limit() {
        let (body, watch) = WatchedBody::new(chunks(&[4, 4, 2]), Some(10));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 10);
        assert_eq!(watch.fault(), None);
    }

    #[tokio::test]
    async fn watched_body_fails_once_the_running_total_passes_the_limit() {
        let (mut body, watch) = WatchedBody::new(chunks(&[4, 4, 4, 4]), Some(10));
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyTooLarge>(), "{error}");
        assert_eq!(watch.fault(), Some(BodyFault::TooLarge { limit: 10 }));
        assert!(body.frame().await.is_none(), "nothing after the failure");
    }

    #[tokio::test]
    async fn watched_body_without_limit_records_a_broken_body() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("reset".into()),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let (body, watch) = WatchedBody::new(body, None);
        assert!(body.collect().await.is_err());
        assert_eq!(watch.fault(), Some(BodyFault::Broken));
    }
}

pin_project_lite::pin_project! {
    /// A body that yields `first` (a frame already read, e.g. to validate the framing
    /// before forwarding) and then the rest of `inner`.
    pub struct Prepend<B: Body> {
        first: Option<Frame<B::Data>>,
        #[pin]
        inner: B,
    }
}

impl<B: Body> Prepend<B> {
    pub fn new(first: Option<Frame<B::Data>>, inner: B) -> Self {
        Prepend { first, inner }
    }
}

impl<B: Body> Body for Prepend<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let extra = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |data| bytes::Buf::remaining(data) as u64);
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint.set_lower(inner.lower() + extra);
        hint
    }
}
