//! The raw TOML shapes, as serde reads them. Every key is optional here: defaults come
//! from `super::defaults`, and a missing required key is reported by validation
//! (`validate.rs`), with the line of its table header. Plain data: no checks.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{AccessLogFormat, ActuatorFormat, CachePolicy, ForwardedHeader, RouteClass, ShedMode};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Vec<SocketAddr>>,
    pub(super) probe_paths: Option<Vec<String>>,
    pub(super) drain_timeout_ms: Option<u64>,
    pub(super) shutdown_delay_ms: Option<u64>,
    pub(super) header_read_timeout_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) worker_threads: Option<usize>,
    pub(super) underscores_in_headers: Option<bool>,
    pub(super) trusted_proxies: Option<Vec<String>>,
    pub(super) forwarded: Option<RawForwarded>,
    pub(super) send_timeout_ms: Option<u64>,
    pub(super) request_buffer_bytes: Option<usize>,
    pub(super) body_read_timeout_ms: Option<u64>,
    pub(super) body_min_rate: Option<u64>,
    pub(super) http2_max_concurrent_streams: Option<u32>,
    pub(super) upgrade_idle_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccessLog {
    pub(super) path: Option<String>,
    pub(super) format: Option<AccessLogFormat>,
    pub(super) include_query: Option<bool>,
    pub(super) buffer_lines: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: Option<String>,
    pub(super) backends: Option<Vec<String>>,
    pub(super) max_workers: Option<u32>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) response_header_timeout_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) max_idle_per_backend: Option<usize>,
    pub(super) management_port: Option<u16>,
    pub(super) required_for_readiness: Option<bool>,
    pub(super) health: Option<RawHealth>,
    pub(super) shedding: Option<RawShedding>,
    pub(super) actuator: Option<RawActuator>,
    pub(super) adaptive: Option<RawAdaptive>,
    pub(super) retry: Option<RawRetry>,
    pub(super) tls: Option<super::upstream_tls::RawUpstreamTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) connect_attempts: Option<u32>,
    pub(super) backoff_base_ms: Option<u64>,
    pub(super) backoff_cap_ms: Option<u64>,
    pub(super) idempotent_methods: Option<Vec<String>>,
    pub(super) eject_after_connect_failures: Option<u32>,
    pub(super) eject_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShedding {
    pub(super) mode: Option<RawMode>,
    pub(super) band: Option<f64>,
    pub(super) critical: Option<f64>,
    pub(super) normal: Option<f64>,
    pub(super) sheddable: Option<f64>,
    pub(super) queue_size: Option<usize>,
    pub(super) queue_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawMode {
    Enforce,
    Shadow,
    Off,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawActuator {
    pub(super) enabled: Option<bool>,
    pub(super) format: Option<ActuatorFormat>,
    pub(super) base_url: Option<String>,
    pub(super) interval_ms: Option<u64>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) busy_metric: Option<String>,
    pub(super) max_metric: Option<String>,
    pub(super) connector: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdaptive {
    pub(super) enabled: Option<bool>,
    pub(super) initial_limit: Option<f64>,
    pub(super) min_limit: Option<f64>,
    pub(super) max_limit: Option<f64>,
    pub(super) smoothing: Option<f64>,
    pub(super) tolerance: Option<f64>,
    pub(super) probe_interval_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) enabled: Option<bool>,
    pub(super) path: Option<String>,
    pub(super) interval_ms: Option<u64>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) host: Option<String>,
    pub(super) path_prefix: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) class: Option<RawClass>,
    pub(super) cache: Option<RawCache>,
    pub(super) cache_max_bytes: Option<usize>,
    pub(super) cache_max_object_bytes: Option<usize>,
    pub(super) cache_generate_etag: Option<bool>,
    pub(super) cache_stale_on_shed_ms: Option<u64>,
    pub(super) cache_stale_if_error_ms: Option<u64>,
    pub(super) cache_stale_while_revalidate_ms: Option<u64>,
    pub(super) cache_store_set_cookie: Option<bool>,
    pub(super) cache_coalesce_timeout_ms: Option<u64>,
    pub(super) cache_control_field: Option<String>,
    pub(super) threshold: Option<f64>,
    pub(super) strip_path_prefix: Option<bool>,
    pub(super) rewrite_location: Option<bool>,
    pub(super) request_headers: Option<RawHeaderRules>,
    pub(super) response_headers: Option<RawHeaderRules>,
    pub(super) websocket: Option<bool>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawClass {
    Critical,
    Normal,
    Sheddable,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawCache {
    Off,
    On,
}

impl From<RawClass> for RouteClass {
    fn from(c: RawClass) -> Self {
        match c {
            RawClass::Critical => RouteClass::Critical,
            RawClass::Normal => RouteClass::Normal,
            RawClass::Sheddable => RouteClass::Sheddable,
        }
    }
}

impl From<RawMode> for ShedMode {
    fn from(m: RawMode) -> Self {
        match m {
            RawMode::Enforce => ShedMode::Enforce,
            RawMode::Shadow => ShedMode::Shadow,
            RawMode::Off => ShedMode::Off,
        }
    }
}

impl From<RawCache> for CachePolicy {
    fn from(c: RawCache) -> Self {
        match c {
            RawCache::Off => CachePolicy::Off,
            RawCache::On => CachePolicy::On,
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawForwarded {
    Off,
    On,
}

impl From<RawForwarded> for ForwardedHeader {
    fn from(f: RawForwarded) -> Self {
        match f {
            RawForwarded::Off => ForwardedHeader::Off,
            RawForwarded::On => ForwardedHeader::On,
        }
    }
}

/// `[route.request_headers]` and `[route.response_headers]`: each applied in the order
/// remove, set, add (`config/rewrite.rs`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaderRules {
    pub(super) remove: Option<Vec<String>>,
    pub(super) set: Option<std::collections::BTreeMap<String, RawValues>>,
    pub(super) add: Option<std::collections::BTreeMap<String, RawValues>>,
}

/// A header rule's value: one string, or an array of them for a field sent on several
/// lines (`Set-Cookie`).
pub(super) struct RawValues(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for RawValues {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawValues;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawValues, E> {
                Ok(RawValues(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawValues, A::Error> {
                let mut values = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    values.push(v);
                }
                Ok(RawValues(values))
            }
        }
        d.deserialize_any(Visitor)
    }
}
