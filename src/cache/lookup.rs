//! Serving from the store: what [`Cache::lookup`] answers (a fresh hit, a `304`
//! to a conditional, a `206` for a range, `only-if-cached`), and the [`Pending`]
//! it hands back when the origin must answer, after coalescing with a fill already
//! on its way.
//!
//! Not here: what happens to the origin's response (storing, 304 refresh,
//! invalidation, `stale_on_shed`: `pending.rs`) or the body that tees into the
//! store (`fill.rs`).

use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::conditional::{self, Verdict};
use super::pending::{Mode, Pending};
use super::policy::{self, RequestRules};
use super::{fill, key, range, Cache, Entry, Inner, Outcome, CACHE_NAME, CACHE_STATUS};
use crate::http::body::{empty, full, ProxyBody};

/// The result of a lookup.
pub enum Lookup {
    /// Answer with this response; nothing goes to the origin.
    Respond(Response<ProxyBody>),
    /// Forward the request (after [`Pending::prepare`]) and pass the response to
    /// [`Pending::finish`].
    Forward(Box<Pending>),
    /// Answer with this stale response now, and revalidate in the background: send
    /// the request (after [`Pending::prepare`]) and pass the response to
    /// [`Pending::finish`], reading its body so it is stored (RFC 5861 §3).
    Revalidate(Response<ProxyBody>, Box<Pending>),
}

impl Cache {
    /// Looks the request up. `authority` is the request's host (the `Host` header
    /// or the URI authority).
    pub async fn lookup<B>(&self, req: &Request<B>, authority: &str) -> Lookup {
        let inner = &self.inner;
        let method = req.method().clone();
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let key = key::primary(authority, path_and_query);
        let headers = req.headers();
        let rules = RequestRules::of(headers);
        // The hot path first: a usable stored response, answered before anything is
        // copied for a forward (request headers, URI) that will not happen.
        let cacheable = method == Method::GET || method == Method::HEAD;
        if cacheable && !needs_origin(headers) {
            if let Some(entry) = inner.find(&key, headers) {
                let now = inner.clock.now();
                if policy::reusable(&entry.freshness, &rules, now) {
                    let answer = match headers.get(header::RANGE) {
                        None => Some(inner.answer(&entry, &method, headers, now)),
                        Some(range) => inner.answer_range(&entry, &method, headers, range, now),
                    };
                    if let Some(answer) = answer {
                        return Lookup::Respond(answer);
                    }
                }
            }
        }
        let mut pending = Pending {
            inner: inner.clone(),
            mode: Mode::Bypass,
            method: method.clone(),
            authority: authority.to_string(),
            key,
            request: headers.clone(),
            rules,
            stale: None,
            fill: None,
            request_time: inner.clock.now(),
            refetch: false,
        };
        if !cacheable {
            if !method.is_safe() {
                pending.mode = Mode::Invalidate;
            }
            return Lookup::Forward(Box::new(pending));
        }
        // A range the stored response could not answer (none, stale, or a range
        // form served by the origin only) is forwarded as it came and not stored.
        if needs_origin(headers) || headers.contains_key(header::RANGE) {
            inner.count(Outcome::Uncacheable);
            return Lookup::Forward(Box::new(pending));
        }

        let mut waited = false;
        loop {
            let now = inner.clock.now();
            let found = inner.find(&pending.key, headers);
            if let Some(entry) = &found {
                if policy::reusable(&entry.freshness, &rules, now) {
                    return Lookup::Respond(inner.answer(entry, &method, headers, now));
                }
            }
            if rules.only_if_cached {
                inner.count(Outcome::Miss);
                let mut response = Response::new(empty());
                *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                inner.status_header(response.headers_mut(), "fwd=miss; detail=only-if-cached");
                return Lookup::Respond(response);
            }
            pending.stale = found;
            if method == Method::HEAD {
                // A HEAD cannot refresh a stored GET body: forward it as it is.
                return Lookup::Forward(Box::new(pending));
            }
            pending.mode = if pending.stale.is_some() {
                Mode::Revalidate
            } else {
                Mode::Fetch
            };
            if waited || rules.no_cache {
                return Lookup::Forward(Box::new(pending));
            }
            let while_revalidating = pending
                .stale
                .as_ref()
                .filter(|entry| inner.may_serve_while_revalidating(entry, now))
                .map(|entry| inner.stale_while_revalidate(entry, &method, headers, now));
            match fill::join(inner, &pending.key) {
                fill::Joined::Leader(fill) => {
                    pending.fill = Some(fill);
                    return match while_revalidating {
                        Some(stale) => Lookup::Revalidate(stale, Box::new(pending)),
                        None => Lookup::Forward(Box::new(pending)),
                    };
                }
                // Another request is revalidating: the stale copy answers meanwhile.
                fill::Joined::Follower(_) if while_revalidating.is_some() => {
                    return Lookup::Respond(while_revalidating.expect("checked"));
                }
                fill::Joined::Follower(mut done) => {
                    // Too many waiting already: sent on now, through admission.
                    let Some(_waiting) = inner.waiting.try_take(super::MAX_COALESCED_WAITING)
                    else {
                        return Lookup::Forward(Box::new(pending));
                    };
                    let _ =
                        tokio::time::timeout(inner.settings.coalesce_timeout, done.changed()).await;
                    waited = true;
                }
            }
        }
    }
}

impl Inner {
    /// Whether `entry`, stale at `now`, may answer while it is revalidated: within its
    /// `stale-while-revalidate` window (the response's, else the route's) and allowed
    /// to be served stale at all.
    fn may_serve_while_revalidating(&self, entry: &Entry, now: SystemTime) -> bool {
        let f = &entry.freshness;
        let Some(window) = f
            .stale_while_revalidate
            .or(self.settings.stale_while_revalidate)
        else {
            return false;
        };
        !f.no_cache && !f.no_stale && f.staleness(now) <= window
    }

    /// The stale copy answered while a revalidation runs.
    fn stale_while_revalidate(
        &self,
        entry: &Entry,
        method: &Method,
        request: &HeaderMap,
        now: SystemTime,
    ) -> Response<ProxyBody> {
        let mut response = self.respond_with(entry, method, request, now);
        self.count(Outcome::Stale);
        self.status_header(
            response.headers_mut(),
            &format!(
                "hit; ttl={}; detail=stale-while-revalidate",
                entry.freshness.ttl(now)
            ),
        );
        response
    }
}

/// Preconditions the cache does not evaluate need the origin's answer.
fn needs_origin(headers: &HeaderMap) -> bool {
    [
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
    ]
    .iter()
    .any(|h| headers.contains_key(h))
}

impl Inner {
    /// `Cache-Status: loadgate; hit; ttl=<ttl>`, written without `format!`: the
    /// header of every hit.
    fn hit_status_header(headers: &mut HeaderMap, ttl: i64) {
        const PREFIX: &[u8] = b"loadgate; hit; ttl=";
        const _: () = assert!(PREFIX.len() == CACHE_NAME.len() + 11);
        let mut buf = [0u8; PREFIX.len() + 20];
        buf[..PREFIX.len()].copy_from_slice(PREFIX);
        let mut len = PREFIX.len();
        if ttl < 0 {
            buf[len] = b'-';
            len += 1;
        }
        let mut digits = [0u8; 20];
        let mut n = ttl.unsigned_abs();
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let digits = &digits[at..];
        buf[len..len + digits.len()].copy_from_slice(digits);
        len += digits.len();
        if let Ok(value) = HeaderValue::from_bytes(&buf[..len]) {
            headers.append(CACHE_STATUS, value);
        }
    }

    /// Answers a request from a usable stored entry: 304 or the stored response.
    fn answer(
        &self,
        entry: &Entry,
        method: &Method,
        request: &HeaderMap,
        now: SystemTime,
    ) -> Response<ProxyBody> {
        let ttl = entry.freshness.ttl(now);
        let mut response = self.respond_with(entry, method, request, now);
        let outcome = if response.status() == StatusCode::NOT_MODIFIED {
            Outcome::NotModified
        } else {
            Outcome::Hit
        };
        self.count(outcome);
        Inner::hit_status_header(response.headers_mut(), ttl);
        response
    }

    /// Answers a `Range` request from a fresh stored `200`: a `206` with the one
    /// byte range asked for (or the `304` its conditionals call for). `None` when
    /// the origin should answer instead.
    fn answer_range(
        &self,
        entry: &Entry,
        method: &Method,
        request: &HeaderMap,
        range: &HeaderValue,
        now: SystemTime,
    ) -> Option<Response<ProxyBody>> {
        if entry.status != StatusCode::OK {
            return None;
        }
        let received = entry.freshness.response_time;
        // RFC 9110 §13.2.2: preconditions come before the range.
        if conditional::evaluate_stored(request, &entry.headers, received) == Verdict::NotModified {
            return Some(self.answer(entry, method, request, now));
        }
        let len = entry.body.len() as u64;
        let (first, last) = range::single(range.to_str().ok()?, len)?;
        let body = if *method == Method::HEAD {
            empty()
        } else {
            full(entry.body.slice(first as usize..=last as usize))
        };
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let headers = response.headers_mut();
        *headers = entry.headers.clone();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
        let content_range = format!("bytes {first}-{last}/{len}");
        headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&content_range).ok()?,
        );
        headers.insert(
            header::AGE,
            HeaderValue::from(entry.freshness.age(now).as_secs()),
        );
        self.count(Outcome::Hit);
        Inner::hit_status_header(headers, entry.freshness.ttl(now));
        Some(response)
    }

    /// The stored entry as a response to this request (conditionals evaluated), with `Age`.
    pub(super) fn respond_with(
        &self,
        entry: &Entry,
        method: &Method,
        request: &HeaderMap,
        now: SystemTime,
    ) -> Response<ProxyBody> {
        let received = entry.freshness.response_time;
        let verdict = if entry.status.is_success() {
            conditional::evaluate_stored(request, &entry.headers, received)
        } else {
            Verdict::Full
        };
        let mut response = match verdict {
            Verdict::NotModified => not_modified(&entry.headers),
            Verdict::Full => {
                let body = if *method == Method::HEAD {
                    empty()
                } else {
                    full(entry.body.clone())
                };
                let mut response = Response::new(body);
                *response.status_mut() = entry.status;
                *response.headers_mut() = entry.headers.clone();
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
                response
            }
        };
        response.headers_mut().insert(
            header::AGE,
            HeaderValue::from(entry.freshness.age(now).as_secs()),
        );
        response
    }
}

/// A 304 built from a response's header fields (RFC 9110 §15.4.5).
pub(super) fn not_modified(headers: &HeaderMap) -> Response<ProxyBody> {
    const COPY: [HeaderName; 8] = [
        header::ETAG,
        header::CACHE_CONTROL,
        header::EXPIRES,
        header::VARY,
        header::DATE,
        header::CONTENT_LOCATION,
        header::VIA,
        header::LAST_MODIFIED,
    ];
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    let with_etag = headers.contains_key(header::ETAG);
    let out = response.headers_mut();
    out.reserve(COPY.len() + 2);
    for name in &COPY {
        if *name == header::LAST_MODIFIED && with_etag {
            continue;
        }
        for value in headers.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_status_header_matches_the_formatted_one() {
        for ttl in [0, 7, 3600, -1, -86_400, i64::MAX, i64::MIN] {
            let mut headers = HeaderMap::new();
            Inner::hit_status_header(&mut headers, ttl);
            assert_eq!(
                headers.get(CACHE_STATUS).unwrap(),
                format!("{CACHE_NAME}; hit; ttl={ttl}").as_str()
            );
        }
    }
}
