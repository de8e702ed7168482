//! One second of the live view: what each upstream's utilisation was and what each
//! route did, taken from the cumulative counters the proxy keeps anyway (admission
//! decisions, cache lookups, the latency record) as the difference from the second
//! before. Pure: the sampler in `mod.rs` reads the counters and hands them in here.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::latency::{Spread, BUCKETS};
use crate::config::RouteClass;

/// The cumulative counts of one route, as read from its counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sent to the backend (after waiting in the critical queue, for those that did).
    pub admitted: u64,
    /// Answered 429 by the shedding decision.
    pub shed: u64,
    /// Critical requests that waited in the queue for a slot.
    pub queued: u64,
    /// Critical requests the queue answered 503 (full, or no slot in time).
    pub rejected: u64,
    /// Answered from the route's cache: fresh hits, 304s, stale copies.
    pub cache: u64,
    /// Shadow mode: requests enforce mode would have shed or refused.
    pub would_shed: u64,
    /// Shadow mode: critical requests that would have waited in the queue.
    pub would_queue: u64,
}

impl Counts {
    /// What happened since `before`. A count that went down (a reload gave the route
    /// new counters) counts from zero.
    pub fn since(self, before: Counts) -> Counts {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        Counts {
            admitted: d(self.admitted, before.admitted),
            shed: d(self.shed, before.shed),
            queued: d(self.queued, before.queued),
            rejected: d(self.rejected, before.rejected),
            cache: d(self.cache, before.cache),
            would_shed: d(self.would_shed, before.would_shed),
            would_queue: d(self.would_queue, before.would_queue),
        }
    }

    pub fn add(&mut self, other: Counts) {
        self.admitted += other.admitted;
        self.shed += other.shed;
        self.queued += other.queued;
        self.rejected += other.rejected;
        self.cache += other.cache;
        self.would_shed += other.would_shed;
        self.would_queue += other.would_queue;
    }

    /// Requests decided or answered: admitted, shed, refused by the queue, or from cache.
    pub fn answered(&self) -> u64 {
        self.admitted + self.shed + self.rejected + self.cache
    }

    /// Shed and queue-refused requests as a share of those decided (0 with none).
    pub fn shed_ratio(&self) -> f64 {
        let decided = self.admitted + self.shed + self.rejected;
        if decided == 0 {
            0.0
        } else {
            (self.shed + self.rejected) as f64 / decided as f64
        }
    }

    /// Per second over `span_ms`, as JSON.
    fn rates(&self, span_ms: u64) -> Value {
        let per_s = |n: u64| round(n as f64 * 1000.0 / span_ms.max(1) as f64, 2);
        json!({
            "admitted": per_s(self.admitted),
            "shed": per_s(self.shed),
            "queued": per_s(self.queued),
            "rejected": per_s(self.rejected),
            "cache": per_s(self.cache),
            "would_shed": per_s(self.would_shed),
            "would_queue": per_s(self.would_queue),
        })
    }
}

/// `x` rounded to `digits` decimals, for JSON a person reads.
pub fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// A route's cumulative state as the sampler reads it each second.
#[derive(Debug, Clone)]
pub struct RouteReading {
    pub name: Arc<str>,
    pub upstream: Arc<str>,
    pub class: RouteClass,
    /// The threshold in force for the route (its own, or its upstream's for its class).
    pub threshold: f64,
    pub counts: Counts,
    pub latency: [u64; BUCKETS],
}

/// An upstream's signal as the sampler reads it each second.
#[derive(Debug, Clone)]
pub struct UpstreamReading {
    pub name: Arc<str>,
    /// `enforce` or `shadow`.
    pub mode: &'static str,
    /// The ratio in force: (own + external) ÷ pool.
    pub utilisation: f64,
    /// Own in-flight ÷ pool.
    pub local: f64,
    /// The backends' own busy ÷ max, when a fresh report is in force.
    pub reported: Option<f64>,
    /// Whether the actuator poll is on (without it there is never a reported signal).
    pub actuator: bool,
    /// `local`, `reported` or `adaptive`.
    pub source: &'static str,
    pub external: f64,
    pub pool: f64,
    pub inflight: usize,
    /// Critical requests waiting in the queue now.
    pub waiting: usize,
    pub max_workers: u32,
    /// Thresholds by class, in [`RouteClass::ALL`] order.
    pub thresholds: [f64; 3],
}

/// What one route did in one second.
#[derive(Debug, Clone)]
pub struct RouteSecond {
    pub name: Arc<str>,
    pub upstream: Arc<str>,
    pub class: RouteClass,
    pub threshold: f64,
    pub counts: Counts,
    pub latency: Spread,
}

/// One second of the whole proxy.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The time it covers, in milliseconds (about 1000).
    pub span_ms: u64,
    pub upstreams: Vec<UpstreamReading>,
    pub routes: Vec<RouteSecond>,
}

impl Sample {
    /// The routes of upstream `name`.
    pub fn routes_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a RouteSecond> {
        self.routes.iter().filter(move |r| &*r.upstream == name)
    }

    /// The counts of upstream `name`: its routes' added up.
    pub fn upstream_counts(&self, name: &str) -> Counts {
        let mut counts = Counts::default();
        for route in self.routes_of(name) {
            counts.add(route.counts);
        }
        counts
    }

    /// The latency of upstream `name`'s routes of `class`, merged.
    pub fn upstream_latency(&self, name: &str, class: RouteClass) -> Spread {
        let mut spread = Spread::default();
        for route in self.routes_of(name).filter(|r| r.class == class) {
            spread.add(&route.latency);
        }
        spread
    }

    /// The sample as `/live.json` and `/live/stream` give it.
    pub fn to_json(&self) -> Value {
        let upstreams: Vec<Value> = self
            .upstreams
            .iter()
            .map(|u| {
                let latency: serde_json::Map<String, Value> = RouteClass::ALL
                    .iter()
                    .map(|&class| {
                        let spread = self.upstream_latency(&u.name, class);
                        (class.as_str().to_string(), latency_json(&spread))
                    })
                    .collect();
                let thresholds: serde_json::Map<String, Value> = RouteClass::ALL
                    .iter()
                    .map(|&class| {
                        (
                            class.as_str().to_string(),
                            u.thresholds[class.index()].into(),
                        )
                    })
                    .collect();
                json!({
                    "name": &*u.name,
                    "mode": u.mode,
                    "utilisation": round(u.utilisation, 4),
                    "local": round(u.local, 4),
                    "reported": u.reported.map(|r| round(r, 4)),
                    "actuator": u.actuator,
                    "source": u.source,
                    "external": round(u.external, 2),
                    "pool": round(u.pool, 2),
                    "inflight": u.inflight,
                    "waiting": u.waiting,
                    "max_workers": u.max_workers,
                    "thresholds": thresholds,
                    "rps": self.upstream_counts(&u.name).rates(self.span_ms),
                    "latency_ms": latency,
                })
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                json!({
                    "name": &*r.name,
                    "upstream": &*r.upstream,
                    "class": r.class.as_str(),
                    "threshold": r.threshold,
                    "rps": r.counts.rates(self.span_ms),
                    "latency_ms": latency_json(&r.latency),
                })
            })
            .collect();
        json!({
            "t": self.at_ms,
            "span_ms": self.span_ms,
            "upstreams": upstreams,
            "routes": routes,
        })
    }
}

/// p50 and p99 in milliseconds (null with no requests) and the requests they cover.
fn latency_json(spread: &Spread) -> Value {
    json!({
        "p50": spread.quantile_ms(0.50).map(|v| round(v, 2)),
        "p99": spread.quantile_ms(0.99).map(|v| round(v, 2)),
        "n": spread.count(),
    })
}

/// Turns each second's readings into a [`Sample`]: keeps the last readings by route name.
#[derive(Debug, Default)]
pub struct Sampler {
    previous: Option<(u64, HashMap<Arc<str>, RouteReading>)>,
}

impl Sampler {
    /// The second that ended at `at_ms`; `None` for the first call, which only sets the
    /// baseline (the counts since start are not one second's). A route not seen the
    /// second before (added by a reload) counts from zero.
    pub fn sample(
        &mut self,
        at_ms: u64,
        upstreams: Vec<UpstreamReading>,
        routes: Vec<RouteReading>,
    ) -> Option<Sample> {
        let now: HashMap<Arc<str>, RouteReading> =
            routes.iter().map(|r| (r.name.clone(), r.clone())).collect();
        let (then_ms, before) = self.previous.replace((at_ms, now))?;
        let routes = routes
            .into_iter()
            .map(|r| {
                let (counts, latency) = match before.get(&r.name) {
                    Some(b) => (
                        r.counts.since(b.counts),
                        Spread::between(&b.latency, &r.latency),
                    ),
                    None => (r.counts, Spread::between(&[0; BUCKETS], &r.latency)),
                };
                RouteSecond {
                    name: r.name,
                    upstream: r.upstream,
                    class: r.class,
                    threshold: r.threshold,
                    counts,
                    latency,
                }
            })
            .collect();
        Some(Sample {
            at_ms,
            span_ms: at_ms.saturating_sub(then_ms).max(1),
            upstreams,
            routes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, admitted: u64, shed: u64) -> RouteReading {
        RouteReading {
            name: name.into(),
            upstream: "app".into(),
            class: RouteClass::Normal,
            threshold: 0.85,
            counts: Counts {
                admitted,
                shed,
                ..Counts::default()
            },
            latency: [0; BUCKETS],
        }
    }

    fn upstream() -> UpstreamReading {
        UpstreamReading {
            name: "app".into(),
            mode: "enforce",
            utilisation: 0.5,
            local: 0.5,
            reported: None,
            actuator: false,
            source: "local",
            external: 0.0,
            pool: 16.0,
            inflight: 8,
            waiting: 0,
            max_workers: 16,
            thresholds: [1.0, 0.85, 0.7],
        }
    }

    #[test]
    fn rates_are_differences_of_cumulative_counters_per_second() {
        let mut sampler = Sampler::default();
        // The first reading is a baseline: a thousand requests since start are not a second's.
        let first = sampler.sample(10_000, vec![upstream()], vec![route("orders", 1000, 50)]);
        assert!(first.is_none());
        let second = sampler
            .sample(11_000, vec![upstream()], vec![route("orders", 1030, 60)])
            .expect("a sample");
        assert_eq!(second.routes[0].counts.admitted, 30);
        assert_eq!(second.routes[0].counts.shed, 10);
        // Half a second late: the rate is per second of the span it covers.
        let third = sampler
            .sample(12_500, vec![upstream()], vec![route("orders", 1060, 60)])
            .expect("a sample");
        assert_eq!(third.span_ms, 1500);
        let json = third.to_json();
        assert_eq!(json["routes"][0]["rps"]["admitted"], 20.0);
        assert_eq!(json["upstreams"][0]["rps"]["admitted"], 20.0);
        assert_eq!(json["upstreams"][0]["reported"], Value::Null);
        assert_eq!(json["upstreams"][0]["thresholds"]["sheddable"], 0.7);
    }

    #[test]
    fn a_reload_that_adds_a_route_or_resets_its_counters_counts_from_zero() {
        let mut sampler = Sampler::default();
        sampler.sample(0, vec![], vec![route("orders", 500, 0)]);
        let sample = sampler
            .sample(
                1000,
                vec![],
                vec![route("orders", 3, 0), route("new", 7, 2)],
            )
            .expect("a sample");
        let by_name = |n: &str| sample.routes.iter().find(|r| &*r.name == n).unwrap().counts;
        assert_eq!(
            by_name("orders").admitted,
            3,
            "new counters after a class change"
        );
        assert_eq!(by_name("new").admitted, 7);
        assert_eq!(sample.upstream_counts("app").admitted, 10);
        assert_eq!(sample.upstream_counts("app").shed_ratio(), 2.0 / 12.0);
    }
}
