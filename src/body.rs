//! Body types of the data path: the boxed body every response carries, and a
//! wrapper that runs a guard's `Drop` exactly when a body finishes or is dropped.
//!
//! Bodies are streamed frame by frame; nothing here buffers a whole body. hyper's
//! own connection buffers are the only buffering, so a slow reader makes the proxy
//! stop reading from the other side (backpressure) rather than grow memory.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
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

pin_project_lite::pin_project! {
    /// A request body that remembers whether the client's side of it failed
    /// (bad chunk framing, a reset), so a failed upstream exchange can be blamed
    /// on the right party: 400 for the client, 502 for the backend.
    pub struct WatchedBody<B> {
        #[pin]
        inner: B,
        failed: Arc<AtomicBool>,
    }
}

impl<B> WatchedBody<B> {
    pub fn new(inner: B) -> (Self, Arc<AtomicBool>) {
        let failed = Arc::new(AtomicBool::new(false));
        (
            WatchedBody {
                inner,
                failed: failed.clone(),
            },
            failed,
        )
    }
}

impl<B: Body> Body for WatchedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            this.failed.store(true, Ordering::Relaxed);
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
