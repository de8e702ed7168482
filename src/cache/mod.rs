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
//! targeted.rs     a targeted field (RFC 9213, `CDN-Cache-Control`) read in place
//!                 of `Cache-Control` on routes that name one
//! lookup.rs       serving from the store: `Cache::lookup`, hits, 304s, ranges
//! pending.rs      the forwarded request: prepare, finish (store, 304 refresh,
//!                 invalidate), stale-on-shed
//! fill.rs         the body that tees into the store while streaming; coalescing
//! ```
//!
//! This file holds the [`Cache`] itself: its settings, stats and lookup counts,
//! and the store operations both sides share (find, insert, invalidate).
//!
//! Not here: the routing decision (`cache = "on"` per route, `routes.rs`) and the
//! shedding decision (`admission/`); [`Pending::stale_on_shed`] only offers a
//! stored copy when the proxy is about to shed.

pub mod conditional;
pub mod date;
mod fill;
pub mod key;
mod lookup;
mod pending;
pub mod policy;
pub mod range;
pub mod store;
pub mod targeted;

pub use lookup::Lookup;
pub use pending::{Finished, Pending};

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use tokio::sync::watch;

use crate::metrics::{self as m, CounterTable, Label as _};
use policy::Freshness;
use store::Store;

/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "loadgate";
/// The most requests of one route that wait for another's fetch at once. Past it, a
/// miss is sent on at once, through admission like any request: a stampede on a slow
/// key is then shed by the upstream's load, not parked without bound.
pub const MAX_COALESCED_WAITING: usize = 4096;
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
    /// Under a primary key whose response varies: how its variants are keyed.
    Variants(Arc<Variants>),
    Response(Arc<Entry>),
}

/// The variants of one primary key: the request header names they are keyed by, and
/// the generation they were stored under. A new generation starts whenever the
/// primary key's slot is made anew (after an invalidation, an eviction, or a response
/// with other names), so variants stored before it can never be found again: an
/// invalidated `de` variant does not come back when an `fr` one is stored.
struct Variants {
    names: Vec<HeaderName>,
    generation: u64,
}

impl Variants {
    /// The store key of the variant for these request header values.
    fn key(&self, primary: &str, values: &[Option<String>]) -> String {
        let mut key = key::secondary(primary, &self.names, values);
        key.push_str(&format!("\n#{}", self.generation));
        key
    }
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
    /// The next [`Variants`] generation.
    generations: std::sync::atomic::AtomicU64,
    /// Primary keys with a request on its way to the origin; followers wait on it.
    inflight: Mutex<HashMap<String, watch::Receiver<()>>>,
    /// Followers waiting now, at most [`MAX_COALESCED_WAITING`].
    waiting: m::Slots,
    /// Bytes buffered by bodies being stored, and the bound on them.
    buffering: AtomicUsize,
    buffer_budget: usize,
    clock: Clock,
    /// `loadgate_cache_lookups_total` for this route by outcome, registered once
    /// (a lookup by name and label per request would cost more than the hit itself).
    lookups: CounterTable<Outcome>,
}

crate::metrics::label_values! {
    /// The lookup outcome, the `result` label of `loadgate_cache_lookups_total`.
    pub enum Outcome {
        Hit => "hit",
        NotModified => "not_modified",
        Miss => "miss",
        Stale => "stale",
        Revalidated => "revalidated",
        Uncacheable => "uncacheable",
    }
}

impl Cache {
    /// The cache of route `route`, which sends to `upstream` (the labels of its lookups).
    pub fn new(route: &str, upstream: &str, settings: CacheSettings) -> Cache {
        let store = Store::new(settings.max_bytes, settings.max_object_bytes);
        let buffer_budget = (store.max_object() * 8).max(settings.max_bytes / 4);
        Cache {
            inner: Arc::new(Inner {
                route: route.to_string(),
                settings,
                store,
                generations: std::sync::atomic::AtomicU64::new(0),
                inflight: Mutex::new(HashMap::new()),
                waiting: m::Slots::new(metrics::gauge!(m::CACHE_COALESCED_WAITING,
                    m::LABEL_ROUTE => route.to_string())),
                buffering: AtomicUsize::new(0),
                buffer_budget,
                clock: Clock::new(),
                lookups: CounterTable::new(|o: Outcome| {
                    metrics::counter!(m::CACHE_LOOKUPS_TOTAL,
                        m::LABEL_ROUTE => route.to_string(), m::LABEL_UPSTREAM => upstream.to_string(),
                        m::LABEL_RESULT => o.as_str())
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

    /// Requests waiting now for another request's fetch of the same key.
    pub fn coalesced_waiting(&self) -> usize {
        self.inner.waiting.held()
    }

    pub fn lookups(&self) -> LookupCounts {
        let n = |o: Outcome| self.inner.lookups.get(o);
        LookupCounts {
            hit: n(Outcome::Hit),
            not_modified: n(Outcome::NotModified),
            miss: n(Outcome::Miss),
            stale: n(Outcome::Stale),
            revalidated: n(Outcome::Revalidated),
            uncacheable: n(Outcome::Uncacheable),
        }
    }
}

impl Inner {
    /// A response's fields as this route's cache reads its rules from them: with a
    /// targeted field configured and present, that field in place of `Cache-Control`.
    fn policy_view<'a>(&self, headers: &'a HeaderMap) -> std::borrow::Cow<'a, HeaderMap> {
        targeted::view(headers, self.settings.targeted_field.as_ref())
    }

    fn count(&self, outcome: Outcome) {
        self.lookups.increment(outcome);
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
            Slot::Variants(variants) => {
                let values = key::values(request, &variants.names);
                match self.store.get(&variants.key(key, &values))? {
                    Slot::Response(e)
                        if e.vary_names == variants.names && e.vary_values == values =>
                    {
                        Some(e)
                    }
                    _ => None,
                }
            }
        }
    }

    /// Stores `entry` for `key`; false when it does not fit (or TinyLFU refuses it).
    /// A varying response is stored under its primary key's current [`Variants`],
    /// made first: a variant is never stored where no lookup can reach it.
    fn insert(&self, key: &str, entry: Entry) -> bool {
        let cost = entry.cost();
        let stored = if entry.vary_names.is_empty() {
            self.store.put(key, Slot::Response(Arc::new(entry)), cost)
        } else {
            let current = match self.store.get(key) {
                Some(Slot::Variants(v)) if v.names == entry.vary_names => Some(v),
                _ => None,
            };
            let variants = match current {
                Some(variants) => Some(variants),
                None => {
                    let variants = Arc::new(Variants {
                        names: entry.vary_names.clone(),
                        generation: self.generations.fetch_add(1, Ordering::Relaxed),
                    });
                    let cost = variants
                        .names
                        .iter()
                        .map(|n| n.as_str().len() + 32)
                        .sum::<usize>()
                        + ENTRY_OVERHEAD;
                    self.store
                        .put(key, Slot::Variants(variants.clone()), cost)
                        .then_some(variants)
                }
            };
            variants.is_some_and(|variants| {
                let secondary = variants.key(key, &entry.vary_values);
                self.store
                    .put(&secondary, Slot::Response(Arc::new(entry)), cost)
            })
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
}

#[cfg(test)]
mod tests;
