//! A request the cache could not answer, on its way to the origin and back:
//! [`Pending::prepare`] sets the forwarded validators, [`Pending::stale_on_shed`]
//! offers a stored copy instead of a shed, and [`Pending::finish`] stores the
//! response, refreshes a stale entry from a `304`, or invalidates after an unsafe
//! method.
//!
//! Not here: answering from the store (`lookup.rs`), coalescing and the body that
//! copies into the store while streaming (`fill.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode, Uri};

use super::conditional::{self, Validators, Verdict};
use super::lookup::not_modified;
use super::policy::{self, Freshness, RequestRules, StoreRules};
use super::{fill, key, Entry, Inner, Outcome};
use crate::http::body::ProxyBody;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Forwarded untouched, never stored (method, Range, If-Match, HEAD miss…).
    Bypass,
    /// An unsafe method: invalidate the target on success.
    Invalidate,
    /// A GET miss: fetch the full response and store it.
    Fetch,
    /// A GET with a stored response that must be validated first.
    Revalidate,
}

/// What [`Pending::finish`] made of the origin's response.
pub enum Finished {
    /// The response for the client.
    Answer(Response<ProxyBody>),
    /// The response for the client (a `304` to its own validators), and the origin's
    /// full response still arriving behind it, to be read into the store: the caller
    /// runs `Drain::run` and keeps the request's backend slot until it ends, since
    /// the backend is still sending.
    AnswerAndDrain(Response<ProxyBody>, Drain),
    /// The origin's 304 validated nothing the cache holds (another ETag): the entry is
    /// dropped, and the request must be sent again, unconditionally (RFC 9111 §4.3.4),
    /// then finished with this `Pending`, now a plain miss.
    Refetch(Pending),
}

/// An origin body read into the store with no client waiting for it.
pub struct Drain(Box<fill::StoreBody>);

impl Drain {
    /// Reads the body to its end, storing it, for at most [`fill::DRAIN_LIMIT`].
    pub async fn run(self) {
        fill::drain(*self.0).await;
    }
}

/// A request the cache could not answer; it travels with the request to the origin.
pub struct Pending {
    pub(super) inner: Arc<Inner>,
    pub(super) mode: Mode,
    pub(super) method: Method,
    pub(super) authority: String,
    pub(super) key: String,
    pub(super) request: HeaderMap,
    pub(super) rules: RequestRules,
    pub(super) stale: Option<Arc<Entry>>,
    pub(super) fill: Option<fill::Fill>,
    pub(super) request_time: SystemTime,
    /// Sent again after a `304` for another ETag: without any validators.
    pub(super) refetch: bool,
}

impl Pending {
    /// Adjusts the headers of the request about to be forwarded. A miss keeps the
    /// client's own validators: with nothing stored for the key, a client that holds
    /// the body already gets the origin's `304` instead of a full transfer (a `200`
    /// is stored and its validators evaluated here). A stale entry is revalidated with
    /// its stored validators, and a refetch ([`Finished::Refetch`]) goes out with none.
    pub fn prepare(&mut self, headers: &mut HeaderMap) {
        self.request_time = self.inner.clock.now();
        let keeps_client_validators = self.mode == Mode::Fetch && !self.refetch;
        if !matches!(self.mode, Mode::Fetch | Mode::Revalidate) || keeps_client_validators {
            return;
        }
        headers.remove(header::IF_NONE_MATCH);
        headers.remove(header::IF_MODIFIED_SINCE);
        if let Some(entry) = &self.stale {
            if let Some(etag) = entry.headers.get(header::ETAG) {
                headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
                headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
            }
        }
    }

    /// When shedding would reject this request: a stored copy to answer with
    /// instead, if the route allows it and the response permits serving stale.
    pub fn stale_on_shed(&self) -> Option<Response<ProxyBody>> {
        let limit = self.inner.settings.stale_on_shed?;
        self.serve_stale(limit, "stale-on-shed")
    }

    /// When the origin failed this request (an error status, a connection refused or
    /// reset, a timeout, no backend in rotation): a stored copy to answer with instead,
    /// within the response's `stale-if-error` window or else the route's default
    /// (RFC 5861 §4).
    pub fn stale_if_error(&self) -> Option<Response<ProxyBody>> {
        self.serve_stale(self.stale_if_error_window()?, "stale-if-error")
    }

    /// Whether [`stale_if_error`](Pending::stale_if_error) would answer if the origin
    /// failed now: the forward can then give up on an unreachable backend at once.
    pub fn has_stale_if_error(&self) -> bool {
        let now = self.inner.clock.now();
        self.stale_if_error_window()
            .is_some_and(|limit| self.may_serve_stale(limit, now))
    }

    /// The stored copy's stale-if-error window: its own, else the route's.
    fn stale_if_error_window(&self) -> Option<Duration> {
        let entry = self.stale.as_ref()?;
        entry
            .freshness
            .stale_if_error
            .or(self.inner.settings.stale_if_error)
    }

    /// One rule for every reason to serve stale: a stored copy that may be served stale
    /// at all, at most `limit` past its freshness at `now`.
    fn may_serve_stale(&self, limit: Duration, now: SystemTime) -> bool {
        self.stale.as_ref().is_some_and(|entry| {
            let f = &entry.freshness;
            !(f.no_cache || f.no_stale || self.rules.no_cache || f.staleness(now) > limit)
        })
    }

    /// The stored copy, if [`may_serve_stale`](Pending::may_serve_stale).
    fn serve_stale(&self, limit: Duration, why: &str) -> Option<Response<ProxyBody>> {
        let now = self.inner.clock.now();
        if !self.may_serve_stale(limit, now) {
            return None;
        }
        let entry = self.stale.as_ref()?;
        let f = &entry.freshness;
        let mut response = self
            .inner
            .respond_with(entry, &self.method, &self.request, now);
        self.inner.count(Outcome::Stale);
        self.inner.status_header(
            response.headers_mut(),
            &format!("hit; ttl={}; detail={why}", f.ttl(now)),
        );
        Some(response)
    }

    /// Whether the request goes out as a revalidation of a stored entry (and so may
    /// have to be sent again: [`Finished::Refetch`]).
    pub fn revalidates(&self) -> bool {
        self.mode == Mode::Revalidate
    }

    /// The client's request headers, as the cache saw them before [`prepare`](Pending::prepare).
    pub fn client_headers(&self) -> &HeaderMap {
        &self.request
    }

    /// Takes the origin's response: stores it while it streams, refreshes a stale
    /// entry from a 304, or invalidates after an unsafe method.
    pub fn finish(self, response: Response<ProxyBody>) -> Finished {
        let inner = self.inner.clone();
        let answer = match self.mode {
            Mode::Bypass => {
                let mut response = response;
                if self.method == Method::HEAD && response.status() == StatusCode::OK {
                    // The client gets the stored fields the HEAD left out, too.
                    if let Some(mut fields) = self.freshen_from_head(response.headers()) {
                        if let Some(age) = response.headers().get(header::AGE) {
                            fields.insert(header::AGE, age.clone());
                        }
                        *response.headers_mut() = fields;
                    }
                }
                inner.count(Outcome::Uncacheable);
                inner.status_header(response.headers_mut(), "fwd=bypass");
                response
            }
            Mode::Invalidate => {
                let status = response.status();
                if status.is_success() || status.is_redirection() {
                    self.invalidate_targets(response.headers());
                }
                let mut response = response;
                inner.status_header(response.headers_mut(), "fwd=method");
                response
            }
            Mode::Revalidate if response.status() == StatusCode::NOT_MODIFIED => {
                return self.refresh(response);
            }
            Mode::Fetch | Mode::Revalidate => return self.store(response),
        };
        Finished::Answer(answer)
    }

    fn fwd(&self) -> &'static str {
        if self.rules.no_cache {
            "request"
        } else if self.stale.is_some() {
            "stale"
        } else {
            "miss"
        }
    }

    /// RFC 9111 §4.4: the target and same-origin Location / Content-Location.
    fn invalidate_targets(&self, response: &HeaderMap) {
        self.inner.invalidate(&self.key);
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(value) = response.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let Ok(uri) = value.parse::<Uri>() else {
                continue;
            };
            let same_origin = match uri.authority() {
                None => value.starts_with('/'),
                Some(a) => a.as_str().eq_ignore_ascii_case(&self.authority),
            };
            if let (true, Some(pq)) = (same_origin, uri.path_and_query()) {
                self.inner
                    .invalidate(&key::primary(&self.authority, pq.as_str()));
            }
        }
    }

    /// The origin answered our revalidation with 304: update the stored fields.
    fn refresh(mut self, response: Response<ProxyBody>) -> Finished {
        let inner = self.inner.clone();
        let stale = self.stale.take().expect("revalidation has a stored entry");
        let new_etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(conditional::parse_etag);
        let old_etag = stale
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(conditional::parse_etag);
        let selected = match (new_etag, old_etag) {
            (Some(new), Some(old)) => new.weak_eq(&old),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if !selected {
            // Not a validation of what we hold: drop it, and fetch the response again
            // without validators, as a miss.
            inner.invalidate(&self.key);
            self.mode = Mode::Fetch;
            self.refetch = true;
            return Finished::Refetch(self);
        }
        let now = inner.clock.now();
        let entry = self.freshened(&stale, response.headers(), now);
        let still_storable = policy::storable(
            &Method::GET,
            &self.request,
            entry.status,
            &inner.policy_view(&entry.headers),
            self.store_rules(),
        )
        .is_ok()
            && !self.rules.no_store;
        let mut answer = inner.respond_with(&entry, &self.method, &self.request, now);
        let stored = if still_storable {
            inner.insert(&self.key, entry)
        } else {
            inner.invalidate(&self.key);
            false
        };
        inner.count(Outcome::Revalidated);
        let detail = if stored {
            "fwd=stale; fwd-status=304; stored"
        } else {
            "fwd=stale; fwd-status=304"
        };
        inner.status_header(answer.headers_mut(), detail);
        Finished::Answer(answer)
    }

    /// The stored `entry` with the fields of a `304` or `HEAD` response that validated
    /// it, its freshness computed anew.
    fn freshened(&self, entry: &Entry, validating: &HeaderMap, now: SystemTime) -> Entry {
        let headers = policy::freshen(&entry.headers, validating);
        let mut for_age = headers.clone();
        if let Some(age) = validating.get(header::AGE) {
            for_age.insert(header::AGE, age.clone());
        }
        Entry {
            status: entry.status,
            freshness: Freshness::of(
                entry.status,
                &self.inner.policy_view(&for_age),
                self.request_time,
                now,
            ),
            headers,
            body: entry.body.clone(),
            vary_names: entry.vary_names.clone(),
            vary_values: entry.vary_values.clone(),
        }
    }

    /// RFC 9111 §4.3.5: a `200` to a `HEAD` updates the stored `GET` response it
    /// describes: same validators (or neither has any) and, when it says, the same
    /// length. A `HEAD` that describes another representation leaves the store alone.
    /// Returns the stored fields as updated (what the `HEAD`'s answer then carries), or
    /// `None` when the `HEAD` describes no stored response.
    fn freshen_from_head(&self, head: &HeaderMap) -> Option<HeaderMap> {
        let stored = self.stale.as_ref()?;
        fn field(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
            h.get(name).and_then(|v| v.to_str().ok())
        }
        let validators = |h| {
            let etag = field(h, header::ETAG).and_then(conditional::parse_etag);
            (etag, field(h, header::LAST_MODIFIED))
        };
        let describes = match (validators(head), validators(&stored.headers)) {
            ((Some(new), _), (Some(old), _)) => new.strong_eq(&old),
            ((None, Some(new)), (None, Some(old))) => new == old,
            ((None, None), (None, None)) => true,
            _ => false,
        };
        let same_length = field(head, header::CONTENT_LENGTH)
            .is_none_or(|length| length.parse() == Ok(stored.body.len()));
        if !describes || !same_length {
            return None;
        }
        let now = self.inner.clock.now();
        let entry = self.freshened(stored, head, now);
        let fields = entry.headers.clone();
        if !self.rules.no_store {
            self.inner.insert(&self.key, entry);
        }
        Some(fields)
    }

    fn store_rules(&self) -> StoreRules {
        StoreRules {
            store_set_cookie: self.inner.settings.store_set_cookie,
        }
    }

    /// A full response to a GET we fetched or revalidated: store it while it streams.
    fn store(mut self, response: Response<ProxyBody>) -> Finished {
        let inner = self.inner.clone();
        let (mut parts, body) = response.into_parts();
        let now = inner.clock.now();
        let fwd = self.fwd();
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let policy_view = inner.policy_view(&parts.headers);
        let storable = !self.rules.no_store
            && policy::storable(
                &Method::GET,
                &self.request,
                parts.status,
                &policy_view,
                self.store_rules(),
            )
            .is_ok()
            && length.is_none_or(|l| l <= inner.store.max_object() as u64);
        // The client's own validators were taken off the forwarded request.
        let verdict = if parts.status == StatusCode::OK {
            conditional::evaluate(&self.request, Validators::of(&parts.headers, now))
        } else {
            Verdict::Full
        };
        let outcome = match (&self.stale, storable) {
            (_, false) => Outcome::Uncacheable,
            (Some(_), true) => Outcome::Stale,
            (None, true) => Outcome::Miss,
        };
        inner.count(outcome);
        if !storable {
            self.fill.take();
            let mut response = match verdict {
                Verdict::NotModified => not_modified(&parts.headers),
                Verdict::Full => Response::from_parts(parts, body),
            };
            inner.status_header(response.headers_mut(), &format!("fwd={fwd}"));
            return Finished::Answer(response);
        }
        let names = match key::vary(&parts.headers) {
            key::Vary::Names(names) => names,
            _ => Vec::new(),
        };
        let values = key::values(&self.request, &names);
        let freshness = Freshness::of(parts.status, &policy_view, self.request_time, now);
        let commit = fill::Commit {
            inner: inner.clone(),
            key: self.key.clone(),
            status: parts.status,
            headers: policy::stored_headers(&parts.headers),
            freshness,
            vary_names: names,
            vary_values: values,
            expected: length,
            _fill: self.fill.take(),
        };
        let body = fill::StoreBody::new(body, commit);
        // `stored` says what happened to a body that was whole already; for one still
        // streaming, that it is being stored (it may yet be cut short or refused).
        let status = match body.stored() {
            Some(false) => format!("fwd={fwd}"),
            Some(true) | None => format!("fwd={fwd}; stored"),
        };
        match verdict {
            Verdict::NotModified => {
                // The client gets its 304 now; the body is read into the store behind it.
                let mut response = not_modified(&parts.headers);
                inner.status_header(response.headers_mut(), &status);
                Finished::AnswerAndDrain(response, Drain(Box::new(body)))
            }
            Verdict::Full => {
                inner.status_header(&mut parts.headers, &status);
                Finished::Answer(Response::from_parts(parts, body.boxed()))
            }
        }
    }
}
