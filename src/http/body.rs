//! Body types of the data path: the boxed body every response carries, a wrapper that
//! runs a guard's `Drop` exactly when a body finishes or is dropped, and the request
//! body's watch (size limit, upload pace).
//!
//! Bodies are streamed frame by frame. The one exception is a small request body, which
//! the handler reads in full before the request takes a backend worker
//! (`request_buffer_bytes`); otherwise hyper's own connection buffers are the only
//! buffering, so a slow reader makes the proxy stop reading from the other side
//! (backpressure) rather than grow memory.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

pub use crate::config::UploadPace;

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
    /// Slower than the upload pace allows ([`UploadPace`]).
    TooSlow,
}

/// How long an upload may take before its average rate is held to the minimum, so a
/// slow start (TCP slow start, a client reading a file) is not cut off.
pub const MIN_RATE_GRACE: Duration = Duration::from_secs(5);

/// When an upload started at `start` that has sent `seen` bytes, the last of them at
/// `last_byte`, falls behind `pace` if nothing more arrives.
fn falls_behind_at(pace: &UploadPace, start: Instant, last_byte: Instant, seen: u64) -> Instant {
    let idle = last_byte + pace.read_timeout;
    if pace.min_rate == 0 {
        return idle;
    }
    // `seen` bytes keep the average at `min_rate` until `start + seen / min_rate`.
    let covered = Duration::from_secs_f64(seen as f64 / pace.min_rate as f64);
    idle.min(start + covered.max(MIN_RATE_GRACE))
}

/// The error a [`WatchedBody`] yields once the upload falls behind its pace.
#[derive(Debug, thiserror::Error)]
#[error("request body arrived too slowly")]
pub struct BodyTooSlow;

/// The error a [`WatchedBody`] yields once the body passes its size limit.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the {limit}-byte limit")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// What a [`WatchedBody`] reports back to the handler.
#[derive(Debug, Default)]
pub struct BodyWatch {
    /// 0: fine; 1: broken; 2: too large; 3: too slow.
    state: AtomicU8,
    limit: AtomicU64,
    /// Body bytes read from the client so far.
    read: AtomicU64,
}

impl BodyWatch {
    /// Body bytes read from the client so far (for the access log).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    pub fn fault(&self) -> Option<BodyFault> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            1 => Some(BodyFault::Broken),
            3 => Some(BodyFault::TooSlow),
            _ => Some(BodyFault::TooLarge {
                limit: self.limit.load(Ordering::Relaxed),
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that enforces the body size limit and the upload pace as it
    /// streams, and remembers whether and how the client's side of it failed, so a
    /// failed upstream exchange can be blamed on the right party: 413, 408 or 400 for
    /// the client, 502 for the backend.
    pub struct WatchedBody<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: Option<u64>,
        pace: Option<UploadPace>,
        start: Instant,
        last_byte: Instant,
        // Wakes the body when the upload would fall behind its pace; set while the
        // client sends nothing.
        timer: Option<Pin<Box<Sleep>>>,
        watch: Arc<BodyWatch>,
    }
}

impl<B> WatchedBody<B> {
    /// Watches `inner` from now: at most `limit` bytes, at `pace` or faster.
    pub fn new(inner: B, limit: Option<u64>, pace: Option<UploadPace>) -> (Self, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch::default());
        let now = Instant::now();
        (
            WatchedBody {
                inner,
                seen: 0,
                limit,
                pace,
                start: now,
                last_byte: now,
                timer: None,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl<B> Body for WatchedBody<B>
where
    B: Body,
    B::Error: From<BodyTooLarge> + From<BodyTooSlow>,
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
            Poll::Pending => {
                if let Some(pace) = this.pace {
                    let behind = falls_behind_at(pace, *this.start, *this.last_byte, *this.seen);
                    if Instant::now() >= behind {
                        this.watch.state.store(3, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyTooSlow.into())));
                    }
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(behind)));
                    if timer.deadline() != behind {
                        timer.as_mut().reset(behind);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        // The deadline passed between the clock read and the poll.
                        cx.waker().wake_by_ref();
                    }
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.remaining() as u64);
                if len > 0 && this.pace.is_some() {
                    *this.last_byte = Instant::now();
                }
                *this.seen = this.seen.saturating_add(len);
                this.watch.read.store(*this.seen, Ordering::Relaxed);
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

/// Takes the frames of `body` that have already arrived, up to `limit` bytes, without
/// waiting for more. Returns the body (those frames, then the rest) and whether it has
/// ended: a small response usually arrives with its head, and once it is all here the
/// backend is done with it however slowly the client reads. A streaming response (server-
/// sent events, a long download) is not held back: only what is ready is taken. A body
/// that has already failed is the error: nothing of the response has been sent yet, so
/// the caller can still answer with an error of its own rather than a cut-short body.
pub fn take_ready(body: ProxyBody, limit: usize) -> Result<(ProxyBody, bool), BoxError> {
    Ok(match ready_frames(body, limit) {
        // Nothing had arrived: the body as it was, without another layer.
        (Taken::None, Rest::Ended(body)) => (body, true),
        (frames, Rest::Ended(_)) => (frames.into_body(), true),
        (_, Rest::Failed(error)) => return Err(error),
        (Taken::None, Rest::More(body)) => (body, false),
        (frames, Rest::More(body)) => (Prepend::new(frames.into_vec(), body).boxed_unsync(), false),
    })
}

/// The frames of `body` when all of it has arrived already; otherwise the body as it
/// was (what was taken of it first, then the rest, its error included).
pub fn take_whole(body: ProxyBody) -> Result<Vec<Frame<Bytes>>, ProxyBody> {
    let (frames, rest) = ready_frames(body, usize::MAX);
    let frames = frames.into_vec();
    let rest = match rest {
        Rest::Ended(_) => return Ok(frames),
        Rest::Failed(error) => Failed(Some(error)).boxed_unsync(),
        Rest::More(body) if frames.is_empty() => return Err(body),
        Rest::More(body) => body,
    };
    Err(Prepend::new(frames, rest).boxed_unsync())
}

/// What follows the frames [`ready_frames`] took.
enum Rest {
    /// The body has ended (it is given back, spent).
    Ended(ProxyBody),
    Failed(BoxError),
    More(ProxyBody),
}

/// Frames taken from a body. Most responses arrive as one data frame, which is kept
/// without allocating a vector for it.
enum Taken {
    None,
    One(Frame<Bytes>),
    Many(Vec<Frame<Bytes>>),
}

impl Taken {
    fn push(&mut self, frame: Frame<Bytes>) {
        *self = match std::mem::replace(self, Taken::None) {
            Taken::None => Taken::One(frame),
            Taken::One(first) => Taken::Many(vec![first, frame]),
            Taken::Many(mut frames) => {
                frames.push(frame);
                Taken::Many(frames)
            }
        };
    }

    fn into_vec(self) -> Vec<Frame<Bytes>> {
        match self {
            Taken::None => Vec::new(),
            Taken::One(frame) => vec![frame],
            Taken::Many(frames) => frames,
        }
    }

    /// The frames as a whole body; the usual single data frame as a plain full body.
    fn into_body(self) -> ProxyBody {
        match self {
            Taken::None => empty(),
            Taken::One(frame) if frame.is_data() => full(frame.into_data().expect("a data frame")),
            frames => Prepend::new(frames.into_vec(), empty()).boxed_unsync(),
        }
    }
}

impl From<Vec<Frame<Bytes>>> for Taken {
    fn from(mut frames: Vec<Frame<Bytes>>) -> Taken {
        match frames.len() {
            0 => Taken::None,
            1 => Taken::One(frames.pop().expect("one frame")),
            _ => Taken::Many(frames),
        }
    }
}

/// The frames of `body` already arrived, up to `limit` bytes (the frame that passes it
/// included), and what follows them.
fn ready_frames(mut body: ProxyBody, limit: usize) -> (Taken, Rest) {
    use futures_util::FutureExt;
    let mut frames = Taken::None;
    let mut read = 0;
    while read < limit && !body.is_end_stream() {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len());
                frames.push(frame);
            }
            Some(None) => return (frames, Rest::Ended(body)),
            // The error is the client's to see after the frames before it.
            Some(Some(Err(error))) => return (frames, Rest::Failed(error)),
            None => break,
        }
    }
    if body.is_end_stream() {
        (frames, Rest::Ended(body))
    } else {
        (frames, Rest::More(body))
    }
}

/// A whole body from its frames; the usual single data frame as a plain full body.
pub fn from_frames(frames: Vec<Frame<Bytes>>) -> ProxyBody {
    Taken::from(frames).into_body()
}

/// A body that fails with its error at once.
struct Failed(Option<BoxError>);

impl Body for Failed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.take().map(Err))
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
        let (body, watch) = WatchedBody::new(chunks(&[4, 4, 2]), Some(10), None);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 10);
        assert_eq!(watch.fault(), None);
    }

    #[tokio::test]
    async fn watched_body_fails_once_the_running_total_passes_the_limit() {
        let (mut body, watch) = WatchedBody::new(chunks(&[4, 4, 4, 4]), Some(10), None);
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyTooLarge>(), "{error}");
        assert_eq!(watch.fault(), Some(BodyFault::TooLarge { limit: 10 }));
        assert!(body.frame().await.is_none(), "nothing after the failure");
    }

    #[tokio::test]
    async fn watched_body_without_limit_records_a_broken_body() {
        let (body, watch) = WatchedBody::new(failing_after_two_bytes(), None, None);
        assert!(body.collect().await.is_err());
        assert_eq!(watch.fault(), Some(BodyFault::Broken));
    }

    /// A body fed by hand: each `send` is one data frame; dropping the sender ends it.
    fn fed() -> (tokio::sync::mpsc::UnboundedSender<&'static [u8]>, ProxyBody) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<&'static [u8]>();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let bytes = rx.recv().await?;
            Some((Ok(Frame::data(Bytes::from_static(bytes))), rx))
        });
        (tx, http_body_util::StreamBody::new(stream).boxed_unsync())
    }

    /// Reads `body` to its end or first error; the time it took and how it ended.
    async fn drain(
        mut body: impl Body<Error = BoxError> + Unpin,
    ) -> (Duration, Result<(), BoxError>) {
        let start = Instant::now();
        loop {
            match body.frame().await {
                None => return (start.elapsed(), Ok(())),
                Some(Err(e)) => return (start.elapsed(), Err(e)),
                Some(Ok(_)) => {}
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_that_pauses_past_the_read_timeout_is_too_slow() {
        let pace = UploadPace {
            read_timeout: Duration::from_secs(2),
            min_rate: 0,
        };
        let (tx, body) = fed();
        let (body, watch) = WatchedBody::new(body, None, Some(pace));
        let reader = tokio::spawn(drain(body));
        tx.send(b"ab").unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        tx.send(b"cd").unwrap();
        // 2 s after the last byte, at 3.5 s; the sender is still open.
        let (took, ended) = reader.await.unwrap();
        assert!(ended.unwrap_err().is::<BodyTooSlow>());
        assert_eq!(took, Duration::from_millis(3_500));
        assert_eq!(watch.fault(), Some(BodyFault::TooSlow));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_below_the_minimum_rate_is_too_slow_after_the_grace() {
        let pace = UploadPace {
            read_timeout: Duration::from_secs(60),
            min_rate: 100,
        };
        // 300 bytes keep 100 B/s until 3 s, inside the 5 s grace: cut at 5 s.
        let (tx, body) = fed();
        let (body, _) = WatchedBody::new(body, None, Some(pace));
        tx.send(&[b'x'; 300]).unwrap();
        let (took, ended) = drain(body).await;
        assert!(ended.is_err());
        assert_eq!(took, MIN_RATE_GRACE);
        // 1000 bytes keep it until 10 s.
        let (tx, body) = fed();
        let (body, _) = WatchedBody::new(body, None, Some(pace));
        tx.send(&[b'x'; 1000]).unwrap();
        let (took, ended) = drain(body).await;
        assert!(ended.is_err());
        assert_eq!(took, Duration::from_secs(10));
        // A body that ends in time is fine, however slow its start.
        let (tx, body) = fed();
        let (body, watch) = WatchedBody::new(body, None, Some(pace));
        let reader = tokio::spawn(drain(body));
        tokio::time::sleep(Duration::from_secs(4)).await;
        tx.send(&[b'x'; 600]).unwrap();
        drop(tx);
        assert!(reader.await.unwrap().1.is_ok());
        assert_eq!(watch.fault(), None);
    }

    /// Two bytes, then a reset.
    fn failing_after_two_bytes() -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("reset".into()),
        ];
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn take_ready_takes_what_has_arrived_and_keeps_the_rest() {
        let (whole, ended) = take_ready(chunks(&[3, 4]), 1024).unwrap();
        assert!(ended, "a body that is all here has ended");
        assert_eq!(whole.collect().await.unwrap().to_bytes().len(), 7);

        let (tx, body) = fed();
        tx.send(b"head").unwrap();
        let (body, ended) = take_ready(body, 1024).unwrap();
        assert!(!ended, "the sender is still open");
        tx.send(b"tail").unwrap();
        drop(tx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "headtail");

        assert!(
            take_ready(failing_after_two_bytes(), 1024).is_err(),
            "a body that failed before anything was sent is the error"
        );
    }

    #[tokio::test]
    async fn take_whole_gives_the_frames_of_an_ended_body_and_keeps_any_other() {
        let frames = take_whole(chunks(&[3, 4])).unwrap_or_else(|_| panic!("all here"));
        let lengths: Vec<usize> = frames
            .iter()
            .filter_map(|f| f.data_ref().map(Bytes::len))
            .collect();
        assert_eq!(lengths, [3, 4]);

        let (tx, body) = fed();
        tx.send(b"head").unwrap();
        let body = take_whole(body).expect_err("the sender is still open");
        tx.send(b"tail").unwrap();
        drop(tx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "headtail");

        let mut body = take_whole(failing_after_two_bytes()).expect_err("it failed");
        assert!(body.frame().await.unwrap().is_ok());
        assert!(
            body.frame().await.unwrap().is_err(),
            "the error still reaches the client"
        );
    }
}

pin_project_lite::pin_project! {
    /// A body that yields `first` (frames already read: to validate the framing before
    /// forwarding, or a whole small body read ahead) and then the rest of `inner`.
    pub struct Prepend<B: Body> {
        first: VecDeque<Frame<B::Data>>,
        #[pin]
        inner: B,
    }
}

impl<B: Body> Prepend<B> {
    pub fn new(first: Vec<Frame<B::Data>>, inner: B) -> Self {
        Prepend {
            first: VecDeque::from(first),
            inner,
        }
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
        if let Some(frame) = this.first.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let extra: u64 = self
            .first
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|data| bytes::Buf::remaining(data) as u64)
            .sum();
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint.set_lower(inner.lower() + extra);
        hint
    }
}
