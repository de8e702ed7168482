//! The tower service stack each client connection is served by. The order of the
//! layers matters; each says why it sits where it does.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::{
    SetSensitiveRequestHeadersLayer, SetSensitiveResponseHeadersLayer,
};
use tower_http::trace::TraceLayer;

use crate::activity::Activity;
use crate::proxy::{handle, ConnInfo};
use crate::state::Shared;

/// Request ids: a per-process random prefix and a counter; unique, cheap, sortable.
#[derive(Clone)]
struct RequestIds {
    prefix: u32,
    next: Arc<AtomicU64>,
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:08x}-{n:x}", self.prefix);
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

fn request_ids() -> RequestIds {
    static NEXT: std::sync::OnceLock<RequestIds> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| RequestIds {
        prefix: rand::random(),
        next: Arc::new(AtomicU64::new(1)),
    })
    .clone()
}

/// Boxes a response body into the proxy's one body type.
fn boxed_body<B>(response: http::Response<B>) -> http::Response<crate::body::ProxyBody>
where
    B: http_body::Body<Data = bytes::Bytes, Error = crate::body::BoxError> + Send + 'static,
{
    response.map(|body| body.boxed_unsync())
}

/// Builds the service for one client connection and adapts it for hyper. Each request is
/// marked in flight on the connection's `activity` until its response body ends, so the
/// idle and header timeouts never cut off a request being answered.
pub fn connection_service(
    shared: Arc<Shared>,
    conn: ConnInfo,
    activity: Arc<Activity>,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
            Request<Incoming>,
            Response = http::Response<
                impl http_body::Body<Data = bytes::Bytes, Error = crate::body::BoxError>
                    + Send
                    + 'static,
            >,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
> {
    // Per-request spans cost a few microseconds even when nothing listens, so the
    // trace layers are built only when DEBUG tracing is on for them (decided per
    // connection, so turning logging up takes effect for new connections).
    let trace = tracing::enabled!(target: "tower_http::trace", tracing::Level::DEBUG).then(|| {
        ServiceBuilder::new()
            // Outermost: both branches must answer with the same body type.
            .map_response(boxed_body)
            // Before tracing, so credentials and cookies never reach a log.
            .layer(SetSensitiveRequestHeadersLayer::new([
                AUTHORIZATION,
                PROXY_AUTHORIZATION,
                COOKIE,
            ]))
            .layer(SetSensitiveResponseHeadersLayer::new([SET_COOKIE]))
            .layer(TraceLayer::new_for_http())
            .into_inner()
    });
    let stack = ServiceBuilder::new()
        // First, so the id is in the request the backend receives and in every log line below.
        // A client-supplied X-Request-Id is kept.
        .layer(SetRequestIdLayer::x_request_id(request_ids()))
        // The client gets the same id back, to quote in bug reports.
        .layer(PropagateRequestIdLayer::x_request_id())
        .option_layer(trace)
        .service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            let conn = conn.clone();
            let in_flight = activity.request_started(req.version());
            async move { Ok::<_, Infallible>(handle(shared, conn, req, in_flight).await) }
        });
    hyper_util::service::TowerToHyperService::new(stack)
}
