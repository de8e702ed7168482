//! Request bodies read ahead before admission, so a slow upload never holds a backend
//! worker: in full when they fit `request_buffer_bytes` (within a process-wide budget),
//! else their first frames; broken framing, a body over the limit or slower than the
//! upload pace is refused here, before the backend sees anything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Method, Request};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::forward::handler::ConnInfo;
use crate::http::body::{BodyWatch, BoxError, OnEnd, Prepend, ProxyBody, WatchedBody};
use crate::http::error::ProxyError;

/// The most bytes of request bodies read ahead at once, over all connections; past it,
/// bodies stream (after their first frame) instead of waiting in memory.
const READ_AHEAD_BUDGET: usize = 64 * 1024 * 1024;

/// Bytes of request bodies read ahead and not yet sent on, over the whole proxy.
static READ_AHEAD_HELD: AtomicUsize = AtomicUsize::new(0);

/// A share of [`READ_AHEAD_BUDGET`], given back when dropped.
struct ReadAheadShare(usize);

impl ReadAheadShare {
    fn take(bytes: usize) -> Option<ReadAheadShare> {
        READ_AHEAD_HELD
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= READ_AHEAD_BUDGET).then_some(held + bytes)
            })
            .ok()
            .map(|_| ReadAheadShare(bytes))
    }
}

impl Drop for ReadAheadShare {
    fn drop(&mut self) {
        READ_AHEAD_HELD.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// A request body on its way on: what was read ahead, then the rest as it arrives,
/// watched for size and pace. `watch` is `None` for a request without a body.
pub(super) struct ClientBody {
    pub(super) body: ProxyBody,
    pub(super) watch: Option<Arc<BodyWatch>>,
}

/// Reads the request body ahead, before the request takes a backend worker: in full
/// when it fits `request_buffer_bytes` (so a slow upload never holds a worker), else
/// its first frames. Either way a body with broken framing, over the size limit or
/// slower than the upload pace is refused here, and the backend never sees it.
pub(super) async fn read_ahead(
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Request<ClientBody>, ProxyError> {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        let body = ClientBody {
            body: crate::http::body::empty(),
            watch: None,
        };
        return Ok(Request::from_parts(parts, body));
    }
    let body = body.map_err(BoxError::from);
    let (mut body, watch) = WatchedBody::new(body, conn.max_body_bytes, Some(conn.upload));
    // The buffer this body may use: all of a declared length that fits, else the limit.
    let want = match body.size_hint().upper() {
        Some(declared) => conn.request_buffer_bytes.min(declared as usize),
        None => conn.request_buffer_bytes,
    };
    let share = ReadAheadShare::take(want);
    let limit = share.as_ref().map_or(0, |s| s.0);
    let mut frames = Vec::new();
    let mut read = 0;
    let mut ended = false;
    // At least one frame is read, to check the framing before anything is sent.
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                read += frame.data_ref().map_or(0, |d| d.len());
                frames.push(frame);
                if read >= limit {
                    break;
                }
            }
            Some(Err(error)) => {
                return Err(match watch.fault() {
                    Some(fault) => ProxyError::from_client_body(fault, &error.to_string()),
                    None => ProxyError::BadRequest(format!("malformed request body: {error}")),
                });
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let body = if ended {
        // All of it is here: sent on with its exact length as Content-Length, whatever
        // framing the client used (hyper would send a chunked GET body as no body).
        Prepend::new(frames, crate::http::body::empty()).boxed_unsync()
    } else if matches!(parts.method, Method::GET | Method::HEAD)
        && body.size_hint().exact().is_none()
    {
        // hyper sends no body of unknown length with GET or HEAD; refused rather than
        // forwarded without it.
        return Err(ProxyError::BadRequest(
            "a GET or HEAD body of unknown length, larger than request_buffer_bytes".to_string(),
        ));
    } else {
        Prepend::new(frames, body).boxed_unsync()
    };
    let body = ClientBody {
        body: match share {
            Some(share) => OnEnd::new(body, share).boxed_unsync(),
            None => body,
        },
        watch: Some(watch),
    };
    Ok(Request::from_parts(parts, body))
}
