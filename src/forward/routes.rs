//! Request → route: which upstream serves a request, its class and cache policy.
//!
//! Matching is by host (exact beats wildcard beats any) and then by the longest
//! path prefix on a segment boundary: `/api/orders` matches `/api/orders` and
//! `/api/orders/7`, not `/api/ordersarchive`. It holds no I/O; a route's cache,
//! counters and metric handles are handed from one config generation to the next.

use std::sync::Arc;

use crate::admission::RouteCounters;
use crate::cache::Cache;
use crate::config::{CachePolicy, RouteClass, RouteConfig, RouteRewrite};
use crate::live::latency::LatencyRecord;
use crate::metrics::RequestSeries;
use crate::upstream::Upstream;

/// A route ready to serve: its config plus the upstream it forwards to.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub class: RouteClass,
    pub cache: CachePolicy,
    /// The route's shared HTTP cache, when `cache = "on"`.
    pub http_cache: Option<Cache>,
    pub upstream: Arc<Upstream>,
    /// Overrides the upstream's threshold for this route's class.
    pub threshold: Option<f64>,
    /// Whether a WebSocket upgrade is proxied (`websocket`).
    pub websocket: bool,
    /// Admission counts, for `/status` and `loadgate_admission_decisions_total` (kept
    /// across reloads with the route's class and upstream: its labels).
    pub counters: Arc<RouteCounters>,
    /// The route's `loadgate_requests_total` and `loadgate_request_duration_seconds`
    /// handles, labelled with its name, upstream and class (kept across reloads with them).
    pub metrics: Arc<RequestSeries>,
    /// Prefix stripping and header rules (`http/rewrite.rs`).
    pub rewrite: RouteRewrite,
    /// How long its requests took, for the live view (kept across reloads by name).
    pub latency: Arc<LatencyRecord>,
    host: HostMatch,
    path_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// `*.example.com` is stored as `.example.com`.
    Suffix(String),
    Exact(String),
}

impl HostMatch {
    fn parse(host: Option<&str>) -> HostMatch {
        match host {
            None => HostMatch::Any,
            Some(h) => match h.strip_suffix('.').unwrap_or(h).strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            },
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
            HostMatch::Exact(exact) => host == exact,
        }
    }

    /// Higher is more specific; used to order the table.
    fn specificity(&self) -> (u8, usize) {
        match self {
            HostMatch::Any => (0, 0),
            HostMatch::Suffix(s) => (1, s.len()),
            HostMatch::Exact(_) => (2, 0),
        }
    }
}

/// True when `path` is `prefix` or lies below it on a segment boundary.
fn path_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

/// The ordered route table of one config generation.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table; `upstream_of` returns the upstream a route names (validated by
    /// config). A route of the same name in `previous` (the generation a reload
    /// replaces) hands over its counters and metric handles when its class and upstream
    /// name (their labels) are unchanged, and its cache when
    /// the cache settings, the upstream and what the backend is asked (prefix stripping,
    /// request header rules) are unchanged: a reload keeps what still holds.
    pub fn new(
        configs: &[RouteConfig],
        previous: Option<&RouteTable>,
        mut upstream_of: impl FnMut(&str) -> Arc<Upstream>,
    ) -> RouteTable {
        let mut routes: Vec<Arc<Route>> = configs
            .iter()
            .map(|c| {
                let before = previous.and_then(|p| p.routes.iter().find(|r| r.name == c.name));
                // Registered here, once per generation, so no request looks a metric up.
                let same_labels =
                    before.filter(|r| r.class == c.class && r.upstream.name == c.upstream);
                let counters = same_labels.map_or_else(
                    || Arc::new(RouteCounters::for_route(&c.name, &c.upstream, c.class)),
                    |r| r.counters.clone(),
                );
                let metrics = same_labels.map_or_else(
                    || Arc::new(RequestSeries::new(&c.name, &c.upstream, c.class.as_str())),
                    |r| r.metrics.clone(),
                );
                let upstream = upstream_of(&c.upstream);
                // The same upstream object: a changed upstream config builds a new one.
                let kept_cache = before
                    .filter(|r| Arc::ptr_eq(&r.upstream, &upstream) && r.cache == c.cache)
                    .filter(|r| r.asks_the_same(&c.rewrite))
                    .and_then(|r| r.http_cache.clone())
                    .filter(|cache| *cache.settings() == c.cache_settings);
                Arc::new(Route {
                    name: c.name.clone(),
                    class: c.class,
                    cache: c.cache,
                    http_cache: (c.cache == CachePolicy::On).then(|| {
                        kept_cache.unwrap_or_else(|| {
                            Cache::new(&c.name, &c.upstream, c.cache_settings.clone())
                        })
                    }),
                    upstream,
                    threshold: c.threshold,
                    websocket: c.websocket,
                    counters,
                    metrics,
                    rewrite: c.rewrite.clone(),
                    latency: before.map_or_else(Default::default, |r| r.latency.clone()),
                    host: HostMatch::parse(c.host.as_deref()),
                    path_prefix: c.path_prefix.clone(),
                })
            })
            .collect();
        // Most specific host first, then longest prefix; a stable sort keeps file order for ties.
        routes.sort_by(|a, b| {
            (b.host.specificity(), b.path_prefix.len())
                .cmp(&(a.host.specificity(), a.path_prefix.len()))
        });
        RouteTable { routes }
    }

    /// The route for a request, by its normalised host name (lowercase, no port, no
    /// trailing dot: [`Host::name`](crate::http::target::Host::name)) and path.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && path_matches(&r.path_prefix, path))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

impl Route {
    pub fn path_prefix(&self) -> &str {
        &self.path_prefix
    }

    /// Whether this route asks the backend what a route with `rewrite` would: its stored
    /// responses answer for the other only then (the response rules change what clients
    /// see, not what is stored).
    fn asks_the_same(&self, rewrite: &RouteRewrite) -> bool {
        self.rewrite.strip_path_prefix == rewrite.strip_path_prefix
            && self.rewrite.request_headers == rewrite.request_headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CachePolicy, RouteClass, RouteConfig};
    use crate::upstream::Upstream;

    fn route(name: &str, host: Option<&str>, prefix: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host: host.map(str::to_string),
            path_prefix: prefix.into(),
            upstream: "app".into(),
            class: RouteClass::Normal,
            cache: CachePolicy::Off,
            cache_settings: Default::default(),
            threshold: None,
            rewrite: Default::default(),
            websocket: true,
        }
    }

    fn table(routes: &[RouteConfig]) -> RouteTable {
        let upstream = Arc::new(Upstream::for_tests("app"));
        RouteTable::new(routes, None, |_| upstream.clone())
    }

    fn found(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        let host = crate::http::target::host(host).expect("a valid host");
        t.find(host.name(), path).map(|r| r.name.clone())
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let t = table(&[
            route("root", None, "/"),
            route("api", None, "/api"),
            route("orders", None, "/api/orders"),
        ]);
        assert_eq!(found(&t, "x", "/api/orders/7").as_deref(), Some("orders"));
        assert_eq!(found(&t, "x", "/api/orders").as_deref(), Some("orders"));
        assert_eq!(found(&t, "x", "/api/ordersarchive").as_deref(), Some("api"));
        assert_eq!(found(&t, "x", "/apix").as_deref(), Some("root"));
        assert_eq!(found(&t, "x", "/").as_deref(), Some("root"));
    }

    #[test]
    fn no_match_is_none() {
        let t = table(&[route("api", None, "/api")]);
        assert_eq!(found(&t, "x", "/other"), None);
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any() {
        let t = table(&[
            route("any", None, "/"),
            route("wild", Some("*.example.com"), "/"),
            route("exact", Some("api.example.com"), "/"),
        ]);
        assert_eq!(
            found(&t, "API.example.com:8080", "/a").as_deref(),
            Some("exact")
        );
        assert_eq!(found(&t, "www.example.com", "/a").as_deref(), Some("wild"));
        assert_eq!(found(&t, "example.com", "/a").as_deref(), Some("any"));
        assert_eq!(found(&t, "[::1]:8080", "/a").as_deref(), Some("any"));
    }

    #[test]
    fn host_specific_route_wins_over_longer_any_host_prefix() {
        let t = table(&[
            route("deep", None, "/api/orders"),
            route("hosted", Some("shop.example"), "/"),
        ]);
        assert_eq!(
            found(&t, "shop.example", "/api/orders/1").as_deref(),
            Some("hosted")
        );
        assert_eq!(found(&t, "other", "/api/orders/1").as_deref(), Some("deep"));
    }
}
