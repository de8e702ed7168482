//! The settings types of one upstream or route that other layers run on: the actuator
//! poller's, the adaptive limit's and the cache's. Plain data with their defaults (read
//! from `super::defaults`) and the pure checks the validator calls.
//!
//! Not here: what uses them. Behaviour on these types (poll URLs, metric names, repairing
//! adaptive settings) is written as `impl` blocks beside its users in `admission/`.

use std::time::Duration;

use serde::Deserialize;

use super::defaults;

/// Which actuator endpoint the poller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActuatorFormat {
    /// `/actuator/metrics/{busy}` and `/actuator/metrics/{max}`: two requests per poll.
    #[default]
    Json,
    /// `/actuator/prometheus`: one request per poll (needs micrometer-registry-prometheus).
    Prometheus,
}

impl ActuatorFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ActuatorFormat::Json => "json",
            ActuatorFormat::Prometheus => "prometheus",
        }
    }
}

/// How to poll one upstream's actuator.
#[derive(Clone, Debug, PartialEq)]
pub struct ActuatorSettings {
    /// Poll at all. Default true.
    pub enabled: bool,
    /// Default JSON (`/actuator/metrics/...`, two requests per poll).
    pub format: ActuatorFormat,
    /// Scheme, host and port the actuator is served on, without `/actuator`, e.g.
    /// `http://127.0.0.1:8082` for `management.server.port`. `None`: the backend's own address.
    pub base_url: Option<String>,
    /// Default 250 ms. A report older than 3 intervals no longer counts.
    pub interval: Duration,
    /// Bound on one whole poll (connect, both requests, bodies). Default 200 ms.
    pub timeout: Duration,
    /// Metric name overrides, spelt as `format` spells them (Jetty JSON:
    /// `jetty.threads.busy` / `jetty.threads.config.max`). `None`: Tomcat's names.
    pub busy_metric: Option<String>,
    pub max_metric: Option<String>,
    /// The connector (`name` tag, e.g. `http-nio-8080`) to read when there are several.
    /// `None`: Prometheus picks the busiest connector; JSON reads the sum over all of them.
    pub connector: Option<String>,
}

impl Default for ActuatorSettings {
    fn default() -> Self {
        ActuatorSettings {
            enabled: defaults::ACTUATOR_ENABLED,
            format: ActuatorFormat::Json,
            base_url: None,
            interval: Duration::from_millis(defaults::ACTUATOR_INTERVAL_MS),
            timeout: Duration::from_millis(defaults::ACTUATOR_TIMEOUT_MS),
            busy_metric: None,
            max_metric: None,
            connector: None,
        }
    }
}

// The rules for these settings live beside them, so the validator needs nothing outside
// `config/`. What the poller does with them (`urls`, `metric_names`, `stale_after`,
// `on_main_connector`) is in `admission/poller.rs`.
impl ActuatorSettings {
    /// What is wrong with these settings, for the config validator; empty when usable.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.interval.is_zero() {
            problems.push("actuator interval must be above 0".to_string());
        }
        if self.timeout.is_zero() {
            problems.push("actuator timeout must be above 0".to_string());
        } else if self.timeout >= self.interval {
            problems.push(format!(
                "actuator timeout ({:?}) must be shorter than the interval ({:?})",
                self.timeout, self.interval
            ));
        }
        if let Some(base) = &self.base_url {
            match base.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() =>
                {
                    if uri.path().trim_end_matches('/').ends_with("/actuator") {
                        problems.push(format!(
                            "actuator base_url {base:?} must not include /actuator, \
                             e.g. \"http://127.0.0.1:8082\""
                        ));
                    }
                }
                _ => problems.push(format!(
                    "actuator base_url {base:?} must be an http:// or https:// URL with a host, \
                     e.g. \"http://127.0.0.1:8082\""
                )),
            }
        }
        for (which, name) in [
            ("busy_metric", &self.busy_metric),
            ("max_metric", &self.max_metric),
        ] {
            if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                problems.push(format!("actuator {which} must not be empty"));
            }
        }
        problems
    }
}

/// Tuning of one adaptive limit. Check with [`AdaptiveSettings::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveSettings {
    /// Limit before anything is learned.
    pub initial_limit: f64,
    /// The floor: the limit never goes below it (probes included).
    pub min_limit: f64,
    /// The ceiling.
    pub max_limit: f64,
    /// How far the limit moves toward its target per sample, in (0, 1].
    pub smoothing: f64,
    /// Short RTT may exceed the baseline by this factor before the limit shrinks.
    pub tolerance: f64,
    /// Mean time between min-RTT probes, jittered ±50%.
    pub probe_interval: Duration,
}

impl Default for AdaptiveSettings {
    fn default() -> Self {
        Self {
            initial_limit: defaults::ADAPTIVE_INITIAL_LIMIT,
            min_limit: defaults::ADAPTIVE_MIN_LIMIT,
            max_limit: defaults::ADAPTIVE_MAX_LIMIT,
            smoothing: defaults::ADAPTIVE_SMOOTHING,
            tolerance: defaults::ADAPTIVE_TOLERANCE,
            probe_interval: Duration::from_millis(defaults::ADAPTIVE_PROBE_INTERVAL_MS),
        }
    }
}

// `validate` lives beside the type because the validator calls it; `repaired`, which only
// the limit itself uses, is in `admission/adaptive.rs`.
impl AdaptiveSettings {
    /// Rejects settings that make no sense, for the config layer to report.
    pub fn validate(&self) -> Result<(), &'static str> {
        let finite = [self.initial_limit, self.min_limit, self.max_limit]
            .iter()
            .chain([self.smoothing, self.tolerance].iter())
            .all(|v| v.is_finite());
        if !finite {
            return Err("adaptive settings must be finite numbers");
        }
        if self.min_limit < 1.0 {
            return Err("adaptive min_limit must be at least 1");
        }
        if self.max_limit < self.min_limit {
            return Err("adaptive max_limit must be at least min_limit");
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err("adaptive smoothing must be in (0, 1]");
        }
        if self.tolerance < 1.0 {
            return Err("adaptive tolerance must be at least 1");
        }
        if self.probe_interval.is_zero() {
            return Err("adaptive probe_interval must be positive");
        }
        Ok(())
    }
}

/// Per-route cache settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// Bound on the bytes stored. Default 64 MiB.
    pub max_bytes: usize,
    /// Responses larger than this stream through uncached. Default 1 MiB, at most 64 MiB.
    pub max_object_bytes: usize,
    /// Add a strong ETag (md5 of the body) to stored 200s that have none. Default off.
    pub generate_etag: bool,
    /// When shedding would reject a GET, answer from a stored copy up to this far
    /// past its freshness instead. Default `None` (off).
    pub stale_on_shed: Option<Duration>,
    /// When the origin fails a GET (500, 502, 503, 504, a refused or reset connection,
    /// a timeout, no backend in rotation), answer from a stored copy up to this far past
    /// its freshness instead, for responses that carry no `stale-if-error` of their
    /// own. Default `None` (only what the response allows).
    pub stale_if_error: Option<Duration>,
    /// Answer a GET from a stored copy up to this far past its freshness while one
    /// request revalidates it in the background, for responses that carry no
    /// `stale-while-revalidate` of their own. Default `None`.
    pub stale_while_revalidate: Option<Duration>,
    /// Store responses carrying `Set-Cookie`. Default off.
    pub store_set_cookie: bool,
    /// How long concurrent misses wait for the one request sent for them. Default 5 s.
    pub coalesce_timeout: Duration,
    /// A targeted cache-control field (RFC 9213), e.g. `CDN-Cache-Control` or
    /// `Loadgate-Cache-Control`: when a response carries a valid one, its directives
    /// decide this cache's storing and freshness instead of `Cache-Control` and
    /// `Expires`. Default `None` (off).
    pub targeted_field: Option<http::HeaderName>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_bytes: defaults::CACHE_MAX_BYTES,
            max_object_bytes: defaults::CACHE_MAX_OBJECT_BYTES,
            generate_etag: defaults::CACHE_GENERATE_ETAG,
            stale_on_shed: None,
            stale_if_error: None,
            stale_while_revalidate: None,
            store_set_cookie: defaults::CACHE_STORE_SET_COOKIE,
            coalesce_timeout: Duration::from_millis(defaults::CACHE_COALESCE_TIMEOUT_MS),
            targeted_field: None,
        }
    }
}

/// An IP network, `10.0.0.0/8` or `fd00::/8`, or one address (`192.0.2.7`): a peer of
/// `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr[/prefix]`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or network (a.b.c.d/n, x::/n)"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = |a: IpAddr| -> (u128, u32) {
            match a {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((net, width), (addr, addr_width)) = (bits(self.addr), bits(ip));
        if width != addr_width {
            return false;
        }
        let host_bits = width - u32::from(self.prefix);
        host_bits >= width || (net >> host_bits) == (addr >> host_bits)
    }
}

#[cfg(test)]
mod cidr_tests {
    use super::Cidr;

    #[test]
    fn networks_contain_their_addresses() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped"
        );
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.1.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("203.0.113.1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "host",
            "10.0.0.0/x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
