//! The proxy's shared state: the config generation in force (swapped atomically on
//! reload), the draining flag, and pre-registered per-request metric handles.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::time::Instant;

use arc_swap::ArcSwap;

use crate::config::{Config, RouteClass};
use crate::forward::routes::RouteTable;
use crate::listener::workers::worker_count;
use crate::metrics as m;
use crate::upstream::Upstream;

/// Everything one config generation needs to serve requests.
pub struct Generation {
    pub config: Config,
    pub routes: RouteTable,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
}

impl Generation {
    /// Builds a generation. Upstreams whose config did not change are carried over
    /// from `previous`, so their pooled connections, in-flight counts and health
    /// state survive a reload.
    pub fn build(config: Config, previous: Option<&Generation>) -> Generation {
        let workers = worker_count(config.server.worker_threads);
        let upstreams: BTreeMap<String, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let kept = previous
                    .and_then(|p| p.upstreams.get(&u.name))
                    .filter(|old| old.config == *u)
                    .cloned();
                (
                    u.name.clone(),
                    kept.unwrap_or_else(|| Upstream::start(u, workers)),
                )
            })
            .collect();
        let routes = RouteTable::new(&config.routes, |name| {
            upstreams
                .get(name)
                .cloned()
                .expect("config validation guarantees every route names an upstream")
        });
        Generation {
            config,
            routes,
            upstreams,
        }
    }
}

/// State shared by every connection of one proxy.
pub struct Shared {
    /// The config generation in force; a reload swaps in the next one.
    pub generation: ArcSwap<Generation>,
    /// Set on shutdown: probes answer 503 so load balancers stop sending.
    pub draining: AtomicBool,
    pub metrics: RequestMetrics,
}

impl Shared {
    pub fn new(generation: Generation) -> Shared {
        Shared {
            generation: ArcSwap::from_pointee(generation),
            draining: AtomicBool::new(false),
            metrics: RequestMetrics::new(),
        }
    }
}

/// The `class` label of a request: its route's class, or `none` when no route matched.
#[derive(Debug, Clone, Copy)]
pub enum ClassLabel {
    Route(RouteClass),
    None,
}

impl ClassLabel {
    fn index(self) -> usize {
        match self {
            ClassLabel::Route(RouteClass::Critical) => 0,
            ClassLabel::Route(RouteClass::Normal) => 1,
            ClassLabel::Route(RouteClass::Sheddable) => 2,
            ClassLabel::None => 3,
        }
    }
}

const CLASS_LABELS: [&str; 4] = ["critical", "normal", "sheddable", "none"];
const STATUS_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Request counters and duration histograms, registered once so the hot path does
/// not look metric keys up per request.
pub struct RequestMetrics {
    requests: Vec<[metrics::Counter; 5]>,
    durations: Vec<metrics::Histogram>,
}

impl RequestMetrics {
    fn new() -> RequestMetrics {
        RequestMetrics {
            requests: CLASS_LABELS
                .iter()
                .map(|class| {
                    STATUS_LABELS.map(|status| {
                        metrics::counter!(m::REQUESTS_TOTAL,
                            m::LABEL_CLASS => *class, m::LABEL_STATUS => status)
                    })
                })
                .collect(),
            durations: CLASS_LABELS
                .iter()
                .map(|class| metrics::histogram!(m::REQUEST_DURATION_SECONDS, m::LABEL_CLASS => *class))
                .collect(),
        }
    }

    /// Records one finished request.
    pub fn record(&self, class: ClassLabel, status: http::StatusCode, started: Instant) {
        let status_index = STATUS_LABELS
            .iter()
            .position(|s| *s == m::status_class(status))
            .unwrap_or(4);
        self.requests[class.index()][status_index].increment(1);
        self.durations[class.index()].record(started.elapsed().as_secs_f64());
    }
}
