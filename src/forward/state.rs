//! The proxy's shared state: the config generation in force (swapped atomically on
//! reload), the draining flag, and pre-registered per-request metric handles.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access_log::AccessLog;
use crate::config::{Config, TlsConfig};
use crate::forward::routes::RouteTable;
use crate::listener::workers::worker_count;
use crate::metrics as m;
use crate::upstream::Upstream;

/// Everything one config generation needs to serve requests.
pub struct Generation {
    pub config: Config,
    pub routes: RouteTable,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// The TLS of each `[[listener]]` bound at start, in that order.
    pub listeners: Vec<ListenerTls>,
}

/// A started `[[listener]]` and the TLS it serves new connections with.
#[derive(Clone)]
pub struct ListenerTls {
    pub address: SocketAddr,
    pub settings: Option<TlsConfig>,
    pub server: Option<Arc<rustls::ServerConfig>>,
}

impl ListenerTls {
    fn build(address: SocketAddr, settings: Option<&TlsConfig>) -> ListenerTls {
        ListenerTls {
            address,
            settings: settings.cloned(),
            server: settings.map(crate::listener::tls::server_config),
        }
    }
}

/// The listeners of a new generation. Listeners are bound once, at start: after a reload
/// each keeps its address and whether it speaks TLS, and takes the new certificates (and
/// TLS settings) of the `[[listener]]` at the same address. Unchanged TLS settings keep
/// their rustls config, and with it its session cache.
fn listeners(config: &Config, previous: Option<&Generation>) -> Vec<ListenerTls> {
    let Some(previous) = previous else {
        return config
            .listeners
            .iter()
            .map(|l| ListenerTls::build(l.address, l.tls.as_ref()))
            .collect();
    };
    previous
        .listeners
        .iter()
        .map(|old| {
            let new = config.listeners.iter().find(|l| l.address == old.address);
            match new.and_then(|l| l.tls.as_ref()) {
                Some(tls) if old.settings.is_some() && old.settings.as_ref() != Some(tls) => {
                    ListenerTls::build(old.address, Some(tls))
                }
                // Unchanged; or gone, or TLS turned on or off, which takes a restart.
                _ => old.clone(),
            }
        })
        .collect()
}

impl Generation {
    /// Builds a generation. Upstreams whose config did not change are carried over
    /// from `previous`, so their pooled connections, in-flight counts and health
    /// state survive a reload; one whose config changed keeps its backends' health and
    /// ejection state, its in-flight counts, signal history and adaptive limit.
    pub fn build(config: Config, previous: Option<&Generation>) -> Generation {
        let workers = worker_count(config.server.worker_threads);
        let upstreams: BTreeMap<String, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.upstreams.get(&u.name));
                let upstream = match old {
                    Some(old) if old.config == *u => old.clone(),
                    // Changed: rebuilt, keeping the state that still holds.
                    old => Upstream::start_after(u, workers, old.map(|o| &**o)),
                };
                (u.name.clone(), upstream)
            })
            .collect();
        let routes = RouteTable::new(&config.routes, previous.map(|p| &p.routes), |name| {
            upstreams
                .get(name)
                .cloned()
                .expect("config validation guarantees every route names an upstream")
        });
        Generation {
            listeners: listeners(&config, previous),
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
    /// One line per request; off unless `[access_log]` names a path.
    pub access_log: AccessLog,
}

impl Shared {
    pub fn new(generation: Generation) -> Shared {
        Shared {
            generation: ArcSwap::from_pointee(generation),
            draining: AtomicBool::new(false),
            metrics: RequestMetrics::unrouted(),
            access_log: AccessLog::new(),
        }
    }
}

/// The request series of requests no route matched (`route`, `upstream` and `class`
/// `none`); a matched request counts in its route's own series.
pub type RequestMetrics = m::RequestSeries;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_follow_the_status_index() {
        for (code, label) in [
            (101, "1xx"),
            (204, "2xx"),
            (304, "3xx"),
            (429, "4xx"),
            (503, "5xx"),
        ] {
            let status = http::StatusCode::from_u16(code).unwrap();
            assert_eq!(m::STATUS_CLASSES[m::status_class_index(status)], label);
            assert_eq!(m::status_class(status), label);
        }
    }
}
