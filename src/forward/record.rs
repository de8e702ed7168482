//! The access log's record of one request, as the handler's stages fill it in: who asked
//! for what when it arrives, then the backend, and the cache's say on the response.
//! Plain functions over the record; writing it is `access_log/`'s job.

use std::time::SystemTime;

use http::Request;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::access_log::Record;
use crate::cache;
use crate::forward::handler::ConnInfo;
use crate::upstream::Reservation;

/// Fills in the access log's record, when the log is on.
pub(super) fn note(log: &mut Option<Box<Record>>, fill: impl FnOnce(&mut Record)) {
    if let Some(log) = log.as_deref_mut() {
        fill(log);
    }
}

/// Notes the backend the request was sent to, and how long it took to answer with a
/// head (added up over a refetch); nothing when no backend was asked.
pub(super) fn note_backend(
    log: &mut Option<Box<Record>>,
    reservation: &Reservation,
    asked: Instant,
) {
    note(log, |log| {
        if let Some(backend) = reservation.backend() {
            log.backend = Some(backend.authority.clone());
            let before = log.upstream_time.unwrap_or_default();
            log.upstream_time = Some(before + asked.elapsed());
        }
    });
}

/// The access log's record of a request as it arrives: who asked for what.
pub(super) fn arriving(
    conn: &ConnInfo,
    req: &Request<Incoming>,
    include_query: bool,
) -> Box<Record> {
    let uri = req.uri();
    let method = req.method().clone();
    let mut log = Record::new(SystemTime::now(), conn.peer, method, uri.path());
    log.version = req.version();
    if include_query {
        log.query = uri.query().map(Into::into);
    }
    let field = |name: &str| req.headers().get(name).map(|v| v.as_bytes().into());
    log.host = match uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes().into()),
        None => field("host"),
    };
    log.request_id = field("x-request-id");
    log.user_agent = field("user-agent");
    log.referer = field("referer");
    if let Some(tls) = &conn.tls {
        log.tls_version = Some(tls.version);
        log.sni = tls.sni.clone();
    }
    Box::new(log)
}

/// This cache's own entry of a response's `Cache-Status`, without the cache's name.
pub(super) fn own_cache_status(headers: &http::HeaderMap) -> Option<Box<[u8]>> {
    headers
        .get_all(cache::CACHE_STATUS)
        .iter()
        .filter_map(|value| value.as_bytes().strip_prefix(b"loadgate; "))
        .next_back()
        .map(Into::into)
}
