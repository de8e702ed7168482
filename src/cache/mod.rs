//! The shared HTTP cache of a route (RFC 9111 shared cache, RFC 9110 §13
//! conditional requests, RFC 9211 `Cache-Status`).
//!
//! The proxy calls it twice per request: [`Cache::lookup`] before admission
//! (a usable stored response is answered here; otherwise a [`Pending`] says how to
//! forward), and [`Pending::finish`] with the upstream's response (store it while
//! it streams to the client, refresh a stale entry from a 304, invalidate after an
//! unsafe method). The rules themselves live in pure modules:
//!
//! ```text
//! key.rs          primary key (authority + path + query), Vary → secondary key
//! policy.rs       storable? freshness lifetime, age, reuse rules, 304 header update
//! conditional.rs  If-None-Match / If-Modified-Since against a stored response
//! date.rs         HTTP-date parsing, lenient on case and day name
//! range.rs        a single byte range, answered from a stored complete response
//! store.rs        TinyUFO bounded by bytes and object size, with counters
//! fill.rs         the body that tees into the store while streaming; coalescing
//! ```
//!
//! Not here: the routing decision (`cache = "on"` per route, `routes.rs`) and the
//! shedding decision (`admission/`); [`Pending::stale_on_shed`] only offers a
//! stored copy when the proxy is about to shed.

pub mod conditional;
pub mod date;
mod fill;
pub mod key;
pub mod policy;
pub mod range;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use tokio::sync::watch;

use crate::http::body::{empty, full, ProxyBody};
use crate::metrics as m;
use conditional::{Validators, Verdict};
use policy::{Freshness, RequestRules, StoreRules};
use store::Store;

/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "loadgate";
/// Fixed per-entry cost added to its bytes (structs, key, map slots).
const ENTRY_OVERHEAD: usize = 256;
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Per-route cache settings: a config setting, declared in `config/`.
pub use crate::config::CacheSettings;

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// As stored: no hop-by-hop fields, no `Age`.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub freshness: Freshness,
    /// The request headers named by `Vary`, with the values the storing request had.
    vary_names: Vec<HeaderName>,
    vary_values: Vec<Option<String>>,
}

impl Entry {
    fn cost(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        let vary: usize = self
            .vary_values
            .iter()
            .map(|v| v.as_ref().map_or(0, String::len) + 32)
            .sum();
        self.body.len() + headers + vary + ENTRY_OVERHEAD
    }
}

/// What the store holds under a key.
#[derive(Clone)]
enum Slot {
    /// Under a primary key whose response varies: the header names to key variants by.
    Variants(Arc<[HeaderName]>),
    Response(Arc<Entry>),
}

/// Counts for `/status` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub bytes: u64,
    pub objects: u64,
    pub evictions: u64,
}

/// Lookups by result since the cache was made (the `result` label of
/// `loadgate_cache_lookups_total`, for `/status` and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LookupCounts {
    pub hit: u64,
    pub not_modified: u64,
    pub miss: u64,
    pub stale: u64,
    pub revalidated: u64,
    pub uncacheable: u64,
}

/// Wall-clock time read through tokio's clock, so tests can pause and advance it.
struct Clock {
    system: SystemTime,
    instant: tokio::time::Instant,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            system: SystemTime::now(),
            instant: tokio::time::Instant::now(),
        }
    }
    fn now(&self) -> SystemTime {
        self.system + self.instant.elapsed()
    }
}

/// The cache of one route.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("route", &self.inner.route)
            .field("settings", &self.inner.settings)
            .field("stats", &self.stats())
            .finish()
    }
}

struct Inner {
    route: String,
    settings: CacheSettings,
    store: Store<Slot>,
    /// Primary keys with a request on its way to the origin; followers wait on it.
    inflight: Mutex<HashMap<String, watch::Receiver<()>>>,
    /// Bytes buffered by bodies being stored, and the bound on them.
    buffering: AtomicUsize,
    buffer_budget: usize,
    clock: Clock,
    /// Lookups by [`Outcome`], indexed by `Outcome as usize`.
    lookups: [AtomicU64; Outcome::COUNT],
    /// `loadgate_cache_lookups_total` for this route by outcome, registered once
    /// (a lookup by name and label per request would cost more than the hit itself).
    lookup_metrics: [metrics::Counter; Outcome::COUNT],
}

/// The result of a lookup.
pub enum Lookup {
    /// Answer with this response; nothing goes to the origin.
    Respond(Response<ProxyBody>),
    /// Forward the request (after [`Pending::prepare`]) and pass the response to
    /// [`Pending::finish`].
    Forward(Box<Pending>),
}

/// The lookup outcome label of `loadgate_cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    NotModified,
    Miss,
    Stale,
    Revalidated,
    Uncacheable,
}

impl Outcome {
    const COUNT: usize = 6;
    const ALL: [Outcome; Outcome::COUNT] = [
        Outcome::Hit,
        Outcome::NotModified,
        Outcome::Miss,
        Outcome::Stale,
        Outcome::Revalidated,
        Outcome::Uncacheable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::NotModified => "not_modified",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
            Outcome::Uncacheable => "uncacheable",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwarded untouched, never stored (method, Range, If-Match, HEAD miss…).
    Bypass,
    /// An unsafe method: invalidate the target on success.
    Invalidate,
    /// A GET miss: fetch the full response and store it.
    Fetch,
    /// A GET with a stored response that must be validated first.
    Revalidate,
}

/// A request the cache could not answer; it travels with the request to the origin.
pub struct Pending {
    inner: Arc<Inner>,
    mode: Mode,
    method: Method,
    authority: String,
    key: String,
    request: HeaderMap,
    rules: RequestRules,
    stale: Option<Arc<Entry>>,
    fill: Option<fill::Fill>,
    request_time: SystemTime,
}

impl Cache {
    pub fn new(route: &str, settings: CacheSettings) -> Cache {
        let store = Store::new(settings.max_bytes, settings.max_object_bytes);
        let buffer_budget = (store.max_object() * 8).max(settings.max_bytes / 4);
        Cache {
            inner: Arc::new(Inner {
                route: route.to_string(),
                settings,
                store,
                inflight: Mutex::new(HashMap::new()),
                buffering: AtomicUsize::new(0),
                buffer_budget,
                clock: Clock::new(),
                lookups: Default::default(),
                lookup_metrics: Outcome::ALL.map(|o| {
                    metrics::counter!(m::CACHE_LOOKUPS_TOTAL,
                        m::LABEL_ROUTE => route.to_string(), m::LABEL_RESULT => o.as_str())
                }),
            }),
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.inner.settings
    }

    pub fn stats(&self) -> CacheStats {
        let s = &self.inner.store;
        CacheStats {
            bytes: s.bytes(),
            objects: s.objects(),
            evictions: s.evictions(),
        }
    }

    pub fn lookups(&self) -> LookupCounts {
        let n = |o: Outcome| self.inner.lookups[o as usize].load(Ordering::Relaxed);
        LookupCounts {
            hit: n(Outcome::Hit),
            not_modified: n(Outcome::NotModified),
            miss: n(Outcome::Miss),
            stale: n(Outcome::Stale),
            revalidated: n(Outcome::Revalidated),
            uncacheable: n(Outcome::Uncacheable),
        }
    }

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
            match fill::join(inner, &pending.key) {
                fill::Joined::Leader(fill) => {
                    pending.fill = Some(fill);
                    return Lookup::Forward(Box::new(pending));
                }
                fill::Joined::Follower(mut done) => {
                    let _ =
                        tokio::time::timeout(inner.settings.coalesce_timeout, done.changed()).await;
                    waited = true;
                }
            }
        }
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
    fn count(&self, outcome: Outcome) {
        self.lookups[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.lookup_metrics[outcome as usize].increment(1);
    }

    fn publish(&self) {
        let route = self.route.clone();
        metrics::gauge!(m::CACHE_STORED_BYTES, m::LABEL_ROUTE => route.clone())
            .set(self.store.bytes() as f64);
        metrics::gauge!(m::CACHE_STORED_OBJECTS, m::LABEL_ROUTE => route.clone())
            .set(self.store.objects() as f64);
        metrics::counter!(m::CACHE_EVICTIONS_TOTAL, m::LABEL_ROUTE => route)
            .absolute(self.store.evictions());
    }

    /// The stored response for a request to `key` with these headers, fresh or not.
    fn find(&self, key: &str, request: &HeaderMap) -> Option<Arc<Entry>> {
        match self.store.get(key)? {
            Slot::Response(entry) => Some(entry),
            Slot::Variants(names) => {
                let values = key::values(request, &names);
                match self.store.get(&key::secondary(key, &names, &values))? {
                    Slot::Response(e)
                        if e.vary_names[..] == names[..] && e.vary_values == values =>
                    {
                        Some(e)
                    }
                    _ => None,
                }
            }
        }
    }

    /// Stores `entry` for `key`; false when it does not fit.
    fn insert(&self, key: &str, entry: Entry) -> bool {
        let cost = entry.cost();
        let stored = if entry.vary_names.is_empty() {
            self.store.put(key, Slot::Response(Arc::new(entry)), cost)
        } else {
            let names: Arc<[HeaderName]> = entry.vary_names.clone().into();
            let secondary = key::secondary(key, &names, &entry.vary_values);
            let cost_names =
                names.iter().map(|n| n.as_str().len() + 32).sum::<usize>() + ENTRY_OVERHEAD;
            self.store
                .put(&secondary, Slot::Response(Arc::new(entry)), cost)
                && self.store.put(key, Slot::Variants(names), cost_names)
        };
        self.publish();
        stored
    }

    fn invalidate(&self, key: &str) {
        self.store.remove(key);
        self.publish();
    }

    fn status_header(&self, headers: &mut HeaderMap, params: &str) {
        let value = format!("{CACHE_NAME}; {params}");
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.append(CACHE_STATUS, value);
        }
    }

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
    fn respond_with(
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
fn not_modified(headers: &HeaderMap) -> Response<ProxyBody> {
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

impl Pending {
    /// Adjusts the headers of the request about to be forwarded: a miss is fetched
    /// whole (the client's own validators are evaluated here afterwards), a stale
    /// entry is revalidated with its stored validators.
    pub fn prepare(&mut self, headers: &mut HeaderMap) {
        self.request_time = self.inner.clock.now();
        if !matches!(self.mode, Mode::Fetch | Mode::Revalidate) {
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
        let entry = self.stale.as_ref()?;
        let f = &entry.freshness;
        let now = self.inner.clock.now();
        if f.no_cache || f.no_stale || self.rules.no_cache || f.staleness(now) > limit {
            return None;
        }
        let mut response = self
            .inner
            .respond_with(entry, &self.method, &self.request, now);
        self.inner.count(Outcome::Stale);
        self.inner.status_header(
            response.headers_mut(),
            &format!("hit; ttl={}; detail=stale-on-shed", f.ttl(now)),
        );
        Some(response)
    }

    /// Takes the origin's response: stores it while it streams, refreshes a stale
    /// entry from a 304, or invalidates after an unsafe method.
    pub fn finish(self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        let inner = self.inner.clone();
        match self.mode {
            Mode::Bypass => {
                inner.count(Outcome::Uncacheable);
                let mut response = response;
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
                self.refresh(response)
            }
            Mode::Fetch | Mode::Revalidate => self.store(response),
        }
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
    fn refresh(mut self, response: Response<ProxyBody>) -> Response<ProxyBody> {
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
            // Not a validation of what we hold: drop it and pass the 304 on.
            inner.invalidate(&self.key);
            inner.count(Outcome::Stale);
            let mut response = response;
            inner.status_header(response.headers_mut(), "fwd=stale; fwd-status=304");
            return response;
        }
        let now = inner.clock.now();
        let headers = policy::freshen(&stale.headers, response.headers());
        let mut for_age = headers.clone();
        if let Some(age) = response.headers().get(header::AGE) {
            for_age.insert(header::AGE, age.clone());
        }
        let entry = Entry {
            status: stale.status,
            freshness: Freshness::of(stale.status, &for_age, self.request_time, now),
            headers,
            body: stale.body.clone(),
            vary_names: stale.vary_names.clone(),
            vary_values: stale.vary_values.clone(),
        };
        let still_storable = policy::storable(
            &Method::GET,
            &self.request,
            entry.status,
            &entry.headers,
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
        answer
    }

    fn store_rules(&self) -> StoreRules {
        StoreRules {
            store_set_cookie: self.inner.settings.store_set_cookie,
        }
    }

    /// A full response to a GET we fetched or revalidated: store it while it streams.
    fn store(mut self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        let inner = self.inner.clone();
        let (mut parts, body) = response.into_parts();
        let now = inner.clock.now();
        let fwd = self.fwd();
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let storable = !self.rules.no_store
            && policy::storable(
                &Method::GET,
                &self.request,
                parts.status,
                &parts.headers,
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
            return response;
        }
        let names = match key::vary(&parts.headers) {
            key::Vary::Names(names) => names,
            _ => Vec::new(),
        };
        let values = key::values(&self.request, &names);
        let freshness = Freshness::of(parts.status, &parts.headers, self.request_time, now);
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
        inner.status_header(&mut parts.headers, &format!("fwd={fwd}; stored"));
        match verdict {
            Verdict::NotModified => {
                // The client gets its 304 now; the body is read into the store behind it.
                let response = not_modified(&parts.headers);
                tokio::spawn(fill::drain(body));
                let mut response = response;
                inner.status_header(response.headers_mut(), &format!("fwd={fwd}; stored"));
                response
            }
            Verdict::Full => Response::from_parts(parts, body.boxed()),
        }
    }
}

#[cfg(test)]
mod tests;
