//! The tower service stack each client connection is served by. The order of the
//! layers matters; each says why it sits where it does.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::FutureExt;
use http::header::{HeaderName, AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_http::sensitive_headers::{
    SetSensitiveRequestHeadersLayer, SetSensitiveResponseHeadersLayer,
};
use tower_http::trace::TraceLayer;

use crate::forward::handler::{handle, ConnInfo, HandledBody};
use crate::forward::state::Shared;
use crate::http::body::ProxyBody;
use crate::listener::activity::Activity;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request ids: a per-process random prefix and a counter; unique, cheap, sortable.
struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn get() -> &'static RequestIds {
        static IDS: std::sync::OnceLock<RequestIds> = std::sync::OnceLock::new();
        IDS.get_or_init(|| RequestIds {
            prefix: rand::random(),
            next: AtomicU64::new(1),
        })
    }

    /// The next id, `{prefix:08x}-{n:x}`, written without `format!`.
    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 8 + 1 + 16];
        let mut len = hex_into(&mut buf[..8], u64::from(self.prefix), 8);
        buf[len] = b'-';
        len += 1;
        len += hex_into(&mut buf[len..], n, 1);
        // Shared from the start (`from_owner`), so the clone for the response is a
        // reference count, not the copy a vector-backed `Bytes` makes on its first clone.
        let id = bytes::Bytes::from_owner(buf).slice(..len);
        HeaderValue::from_maybe_shared(id).expect("hex digits and a dash are a valid header value")
    }
}

/// Writes `n` in lowercase hex, at least `min_digits` digits (zero-padded), to the
/// front of `out`; returns the number of bytes written.
fn hex_into(out: &mut [u8], n: u64, min_digits: usize) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (16 - n.leading_zeros() as usize / 4).max(min_digits);
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        *slot = DIGITS[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    digits
}

/// Sets `x-request-id` on the request unless the client sent one (so it is in the
/// request the backend receives and in every log line below), and puts the same id on
/// the response unless it has one already (the client can quote it in bug reports).
/// What tower-http's `SetRequestIdLayer` + `PropagateRequestIdLayer` do, without the
/// per-request `format!` and the `RequestId` extensions nothing here reads.
#[derive(Clone)]
struct RequestIdService<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<Incoming>> for RequestIdService<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = WithRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        // One hash of the name, whether the client sent an id or not.
        let id = match req.headers_mut().entry(X_REQUEST_ID) {
            http::header::Entry::Occupied(sent) => sent.get().clone(),
            http::header::Entry::Vacant(slot) => slot.insert(RequestIds::get().next()).clone(),
        };
        WithRequestId {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RequestIdService`].
    struct WithRequestId<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, B, E> Future for WithRequestId<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(mut id) = this.id.take() {
            // Never indexed by HTTP/2's header compression (RFC 7541 §6.2.3): a value
            // that is new in every response would only push the fields that repeat (Via,
            // Content-Type) out of the connection's table, and the encoder compares each
            // new id with every id still in the table (~5% of the CPU of an HTTP/2
            // request). HTTP/1 ignores the mark.
            id.set_sensitive(true);
            if let http::header::Entry::Vacant(slot) = response.headers_mut().entry(X_REQUEST_ID) {
                slot.insert(id);
            }
        }
        Poll::Ready(Ok(response))
    }
}

/// The body of every response the stack gives: the handler's own, or (with DEBUG
/// tracing) the trace layer's, boxed.
type StackBody = Either<HandledBody, ProxyBody>;

/// Boxes the trace layer's response body into the stack's body type.
fn traced_body<B>(response: Response<B>) -> Response<StackBody>
where
    B: http_body::Body<Data = bytes::Bytes, Error = crate::http::body::BoxError> + Send + 'static,
{
    response.map(|body| Either::Right(body.boxed_unsync()))
}

/// Builds the service for one client connection and adapts it for hyper. Each request is
/// marked in flight on the connection's `activity` until its response body ends, so the
/// idle and header timeouts never cut off a request being answered.
pub fn connection_service(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    activity: Arc<Activity>,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
            Request<Incoming>,
            Response = Response<StackBody>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
> {
    let handler = tower::service_fn(move |req: Request<Incoming>| {
        let in_flight = activity.request_started(req.version());
        // Boxed, and `map` rather than an `async` block: the handler's future is large,
        // and every layer above (and hyper's task per HTTP/2 stream) moves what it is
        // given; a box moves as one pointer.
        Box::pin(handle(shared.clone(), conn.clone(), req, in_flight)).map(Ok::<_, Infallible>)
    });
    // Per-request spans cost a few microseconds even when nothing listens, so the
    // trace layers are built only when DEBUG tracing is on for them (decided per
    // connection, so turning logging up takes effect for new connections).
    let traced = tracing::enabled!(target: "tower_http::trace", tracing::Level::DEBUG);
    let inner = if traced {
        tower::util::Either::Right(
            ServiceBuilder::new()
                .map_response(traced_body)
                // Before tracing, so credentials and cookies never reach a log.
                .layer(SetSensitiveRequestHeadersLayer::new([
                    AUTHORIZATION,
                    PROXY_AUTHORIZATION,
                    COOKIE,
                ]))
                .layer(SetSensitiveResponseHeadersLayer::new([SET_COOKIE]))
                .layer(TraceLayer::new_for_http())
                .service(handler.clone()),
        )
    } else {
        tower::util::Either::Left(
            ServiceBuilder::new()
                .map_response(|response: Response<HandledBody>| response.map(Either::Left))
                .service(handler),
        )
    };
    // Outermost, so the id is in every log line and in the request the backend receives.
    hyper_util::service::TowerToHyperService::new(RequestIdService { inner })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_response_gets_the_request_id_marked_never_to_be_indexed() {
        let id = RequestIds::get().next();
        let respond = |response: Response<()>| WithRequestId {
            inner: std::future::ready(Ok::<_, Infallible>(response)),
            id: Some(id.clone()),
        };
        let response = respond(Response::new(())).await.unwrap();
        let sent = &response.headers()[X_REQUEST_ID];
        assert_eq!(sent, id);
        assert!(
            sent.is_sensitive(),
            "HPACK would index a value that never repeats"
        );
        // A response that names its own id keeps it, as it was.
        let mut own = Response::new(());
        own.headers_mut()
            .insert(X_REQUEST_ID, HeaderValue::from_static("backend-7"));
        let response = respond(own).await.unwrap();
        assert_eq!(response.headers()[X_REQUEST_ID], "backend-7");
        assert!(!response.headers()[X_REQUEST_ID].is_sensitive());
    }

    #[test]
    fn request_ids_are_prefix_dash_counter_in_hex() {
        let ids = RequestIds {
            prefix: 0xab,
            next: AtomicU64::new(0x1f),
        };
        assert_eq!(ids.next(), "000000ab-1f");
        assert_eq!(ids.next(), "000000ab-20");
        let ids = RequestIds {
            prefix: u32::MAX,
            next: AtomicU64::new(u64::MAX),
        };
        assert_eq!(ids.next(), "ffffffff-ffffffffffffffff");
        let ids = RequestIds {
            prefix: 0x1234_5678,
            next: AtomicU64::new(0),
        };
        assert_eq!(ids.next(), "12345678-0");
    }
}
