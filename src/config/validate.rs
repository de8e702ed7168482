//! Semantic checks of each section, and the conversion of the raw TOML structs to the
//! validated config types. Every default is taken from `super::defaults`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::raw::{
    RawAccessLog, RawActuator, RawAdaptive, RawAdmin, RawRetry, RawRoute, RawServer, RawShedding,
    RawUpstream,
};
use super::section::{Errors, Section};
use super::{
    defaults, usable_service_time_ms, AccessLogConfig, AccessLogTarget, ActuatorSettings,
    AdaptiveSettings, AdminConfig, CachePolicy, CacheSettings, Cidr, HealthConfig, Readiness,
    RetryConfig, RouteClass, RouteConfig, ServerConfig, SheddingConfig, SimConfig, Thresholds,
    UpstreamConfig, CACHE_MAX_OBJECT_BYTES_LIMIT, MAX_ACCESS_LOG_BUFFER_LINES,
    MAX_HEADER_BYTES_LIMIT, MAX_WORKER_THREADS, MIN_HEADER_BYTES, SIM_MAX_SERVICE_TIME_MS,
};

pub(super) fn build_server(section: Option<&mut Section>, errs: &mut Errors) -> ServerConfig {
    let default = ServerConfig::default();
    let Some(s) = section else {
        return default;
    };
    let Some(raw) = s.deserialize::<RawServer>(errs) else {
        return default;
    };
    let s = &*s;
    let header_read_timeout = s.millis(
        errs,
        &["header_read_timeout_ms"],
        raw.header_read_timeout_ms,
        defaults::HEADER_READ_TIMEOUT_MS,
    );
    let idle_timeout = s.millis(
        errs,
        &["idle_timeout_ms"],
        raw.idle_timeout_ms,
        defaults::CLIENT_IDLE_TIMEOUT_MS,
    );
    let send_timeout = s.millis(
        errs,
        &["send_timeout_ms"],
        raw.send_timeout_ms,
        defaults::SEND_TIMEOUT_MS,
    );
    let upgrade_idle_timeout = s.millis(
        errs,
        &["upgrade_idle_timeout_ms"],
        raw.upgrade_idle_timeout_ms,
        defaults::UPGRADE_IDLE_TIMEOUT_MS,
    );
    let body_read_timeout = s.millis(
        errs,
        &["body_read_timeout_ms"],
        raw.body_read_timeout_ms,
        defaults::BODY_READ_TIMEOUT_MS,
    );
    let http2_max_concurrent_streams = raw
        .http2_max_concurrent_streams
        .unwrap_or(default.http2_max_concurrent_streams);
    if http2_max_concurrent_streams == 0 {
        errs.push(
            s.line(&["http2_max_concurrent_streams"]),
            s.say(
                "http2_max_concurrent_streams must be greater than 0: with 0 an HTTP/2 client \
                 can send no request",
            ),
        );
    }
    let mut trusted_proxies = Vec::new();
    for (i, text) in raw.trusted_proxies.iter().flatten().enumerate() {
        match Cidr::parse(text) {
            Ok(cidr) => trusted_proxies.push(cidr),
            Err(why) => errs.push(
                s.elem_line("trusted_proxies", i),
                s.say(format!("trusted_proxies[{i}]: {why}")),
            ),
        }
    }
    let max_header_bytes = raw.max_header_bytes.unwrap_or(default.max_header_bytes);
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES_LIMIT).contains(&max_header_bytes) {
        errs.push(
            s.line(&["max_header_bytes"]),
            s.say(format!(
                "max_header_bytes = {max_header_bytes} must be between {MIN_HEADER_BYTES} \
                 (hyper's smallest read buffer) and {MAX_HEADER_BYTES_LIMIT} (larger heads would \
                 escape the request-smuggling check); the default is {}",
                defaults::MAX_HEADER_BYTES
            )),
        );
    }
    let max_connections = raw.max_connections.unwrap_or(default.max_connections);
    if max_connections == 0 {
        errs.push(
            s.line(&["max_connections"]),
            s.say(
                "max_connections must be greater than 0: with 0 every client connection is refused",
            ),
        );
    }
    let worker_threads = raw.worker_threads.unwrap_or(default.worker_threads);
    if worker_threads > MAX_WORKER_THREADS {
        errs.push(
            s.line(&["worker_threads"]),
            s.say(format!(
                "worker_threads = {worker_threads} is more than {MAX_WORKER_THREADS}; \
                 0 (the default) starts one per core"
            )),
        );
    }
    ServerConfig {
        listen: raw.listen.unwrap_or(default.listen),
        probe_paths: raw.probe_paths.unwrap_or(default.probe_paths),
        drain_timeout: raw
            .drain_timeout_ms
            .map_or(default.drain_timeout, Duration::from_millis),
        shutdown_delay: raw
            .shutdown_delay_ms
            .map_or(default.shutdown_delay, Duration::from_millis),
        header_read_timeout,
        idle_timeout,
        max_header_bytes,
        max_body_bytes: match raw.max_body_bytes {
            Some(0) => None,
            Some(limit) => Some(limit),
            None => default.max_body_bytes,
        },
        max_connections,
        worker_threads,
        underscores_in_headers: raw
            .underscores_in_headers
            .unwrap_or(default.underscores_in_headers),
        trusted_proxies,
        forwarded: raw.forwarded.map_or(default.forwarded, Into::into),
        request_buffer_bytes: raw
            .request_buffer_bytes
            .unwrap_or(default.request_buffer_bytes),
        upload: crate::config::UploadPace {
            read_timeout: body_read_timeout,
            min_rate: raw.body_min_rate.unwrap_or(default.upload.min_rate),
        },
        send_timeout,
        http2_max_concurrent_streams,
        upgrade_idle_timeout,
        // Filled in from the `[[upstream]]` tables.
        readiness: default.readiness,
    }
}

/// Builds `[access_log]`: `None` (off) when it names no `path`.
pub(super) fn build_access_log(
    section: Option<&mut Section>,
    errs: &mut Errors,
) -> Option<AccessLogConfig> {
    let s = section?;
    let raw = s.deserialize::<RawAccessLog>(errs)?;
    let s = &*s;
    let buffer_lines = raw
        .buffer_lines
        .unwrap_or(defaults::ACCESS_LOG_BUFFER_LINES);
    if !(1..=MAX_ACCESS_LOG_BUFFER_LINES).contains(&buffer_lines) {
        errs.push(
            s.line(&["buffer_lines"]),
            s.say(format!(
                "buffer_lines = {buffer_lines} must be between 1 and {MAX_ACCESS_LOG_BUFFER_LINES}; \
                 the default is {}",
                defaults::ACCESS_LOG_BUFFER_LINES
            )),
        );
    }
    let target = match raw.path.as_deref() {
        None => return None,
        Some("stdout") => AccessLogTarget::Stdout,
        Some(path) if path.trim().is_empty() => {
            errs.push(
                s.line(&["path"]),
                s.say(
                    "path is empty; give a file path, or \"stdout\", or leave path out to turn \
                     the access log off",
                ),
            );
            return None;
        }
        Some(path) => AccessLogTarget::File(path.into()),
    };
    Some(AccessLogConfig {
        target,
        format: raw.format.unwrap_or(defaults::ACCESS_LOG_FORMAT),
        include_query: raw
            .include_query
            .unwrap_or(defaults::ACCESS_LOG_INCLUDE_QUERY),
        buffer_lines,
    })
}

pub(super) fn build_admin(section: Option<&mut Section>, errs: &mut Errors) -> AdminConfig {
    let raw = match section {
        Some(s) => s.deserialize::<RawAdmin>(errs),
        None => None,
    };
    AdminConfig {
        listen: raw.and_then(|r| r.listen).unwrap_or(defaults::ADMIN_LISTEN),
    }
}

/// Checks of `[server]` that need `[admin]` too.
pub(super) fn check_listeners(
    server: &ServerConfig,
    server_sec: Option<&Section>,
    admin: &AdminConfig,
    admin_sec: Option<&Section>,
    has_listener_tables: bool,
    errs: &mut Errors,
) {
    let elem_line = |i: usize| server_sec.map_or(1, |s| s.elem_line("listen", i));
    let label = "[server]";
    if server.listen.is_empty() && !has_listener_tables {
        let line = server_sec.map_or(1, |s| s.line(&["listen"]));
        errs.push(
            line,
            format!(
                "{label}: listen is empty; give at least one address, e.g. [\"127.0.0.1:8080\"], or a [[listener]]"
            ),
        );
    }
    for (i, addr) in server.listen.iter().enumerate() {
        if let Some(j) = server.listen[..i].iter().position(|a| same_port(a, addr)) {
            errs.push(
                elem_line(i),
                format!(
                    "{label}: listen[{i}] {addr} clashes with listen[{j}] {}",
                    server.listen[j]
                ),
            );
        }
        if !same_port(addr, &admin.listen) {
            continue;
        }
        let admin_line = admin_sec.map_or(1, |s| s.line(&["listen"]));
        if server_sec.is_some() {
            errs.push(
                elem_line(i),
                format!(
                    "{label}: listen[{i}] {addr} clashes with [admin] listen {} (line {admin_line}); \
                     the admin plane needs its own port",
                    admin.listen
                ),
            );
        } else {
            errs.push(
                admin_line,
                format!(
                    "[admin]: listen {} clashes with the default [server] listen {addr}; \
                     the admin plane needs its own port",
                    admin.listen
                ),
            );
        }
    }
    if let Some(sec) = server_sec {
        for (i, path) in server.probe_paths.iter().enumerate() {
            if !path.starts_with('/') {
                errs.push(
                    sec.elem_line("probe_paths", i),
                    format!(
                        "{label}: probe_paths[{i}] {path:?} must start with '/', e.g. \"/{path}\""
                    ),
                );
            }
        }
    }
}

/// Two listen addresses that cannot both be bound: same non-zero port, and the same IP or,
/// in one address family, either one the wildcard. (Whether `[::]` also takes IPv4 depends
/// on the OS, so mixed families are left to the bind.)
pub(super) fn same_port(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

/// Why a `[sim]` service time is refused: the simulated backend would refuse it at start.
fn service_time_range() -> String {
    format!("must be a number of milliseconds from 0 to {SIM_MAX_SERVICE_TIME_MS} (one hour)")
}

pub(super) fn build_sim(
    section: &mut Section,
    server: &ServerConfig,
    admin: &AdminConfig,
    errs: &mut Errors,
) -> Option<SimConfig> {
    let sim = section.deserialize::<SimConfig>(errs)?;
    let say = |text: String| format!("[sim]: {text}");
    if sim.workers == 0 {
        errs.push(
            section.line(&["workers"]),
            say("workers must be greater than 0".into()),
        );
    }
    if !usable_service_time_ms(sim.service_time_ms) {
        errs.push(
            section.line(&["service_time_ms"]),
            say(format!(
                "service_time_ms = {:?} {}",
                sim.service_time_ms,
                service_time_range()
            )),
        );
    }
    let mut taken: Vec<(&str, SocketAddr)> = server
        .listen
        .iter()
        .map(|a| ("[server] listen", *a))
        .collect();
    taken.push(("[admin] listen", admin.listen));
    for (key, addr) in [
        ("listen", Some(sim.listen)),
        ("management_listen", sim.management_listen),
    ] {
        let Some(addr) = addr else { continue };
        if let Some((what, _)) = taken.iter().find(|(_, a)| same_port(a, &addr)) {
            errs.push(
                section.line(&[key]),
                say(format!(
                    "{key} {addr} clashes with {what}; the simulated backend needs its own port"
                )),
            );
        }
    }
    for (i, route) in sim.routes.iter().enumerate() {
        if !route.path_prefix.starts_with('/') {
            errs.push(
                section.elem_line("routes", i),
                say(format!(
                    "routes[{i}].path_prefix {:?} must start with '/'",
                    route.path_prefix
                )),
            );
        }
        if let Some(ms) = route
            .service_time_ms
            .filter(|ms| !usable_service_time_ms(*ms))
        {
            errs.push(
                section.elem_key_line("routes", i, "service_time_ms"),
                say(format!(
                    "routes[{i}].service_time_ms = {ms:?} {}",
                    service_time_range()
                )),
            );
        }
    }
    Some(sim)
}

/// Builds one `[[upstream]]`; its `required_for_readiness` key goes to `readiness`
/// (see [`Readiness`] for why it is not kept in the [`UpstreamConfig`]).
pub(super) fn build_upstream(
    section: &mut Section,
    readiness: &mut Readiness,
    base: &std::path::Path,
    errs: &mut Errors,
) -> Option<UpstreamConfig> {
    let raw = section.deserialize::<RawUpstream>(errs)?;
    let s = &*section;

    let name = raw.name.unwrap_or_default();
    if !s.has("name") {
        errs.push(
            s.header,
            s.say("missing key `name`; every upstream needs a unique name"),
        );
    } else if !s.dropped("name") && !valid_upstream_name(&name) {
        errs.push(
            s.line(&["name"]),
            s.say(format!(
                "name {name:?} must be non-empty and use only a-z, 0-9, '_' and '-'"
            )),
        );
    }

    let backends = raw.backends.unwrap_or_default();
    if !s.has("backends") {
        errs.push(
            s.header,
            s.say("missing key `backends`; list the backends as \"host:port\", e.g. backends = [\"127.0.0.1:8081\"]"),
        );
    } else if backends.is_empty() && !s.dropped("backends") {
        errs.push(
            s.line(&["backends"]),
            s.say("backends is empty; give at least one \"host:port\""),
        );
    }
    for (i, backend) in backends.iter().enumerate() {
        if let Err(why) = check_backend(backend) {
            errs.push(
                s.elem_line("backends", i),
                s.say(format!("backends[{i}] {why}")),
            );
        } else if let Some(j) = backends[..i].iter().position(|b| b == backend) {
            errs.push(
                s.elem_line("backends", i),
                s.say(format!(
                    "backends[{i}] {backend:?} is listed twice (also backends[{j}])"
                )),
            );
        }
    }

    let max_workers = raw.max_workers.unwrap_or(defaults::MAX_WORKERS);
    if max_workers == 0 {
        errs.push(
            s.line(&["max_workers"]),
            s.say("max_workers must be greater than 0: it is the backend's worker pool size (Tomcat maxThreads)"),
        );
    }
    let connect_timeout = s.millis(
        errs,
        &["connect_timeout_ms"],
        raw.connect_timeout_ms,
        defaults::CONNECT_TIMEOUT_MS,
    );
    let response_header_timeout = s.millis(
        errs,
        &["response_header_timeout_ms"],
        raw.response_header_timeout_ms,
        defaults::RESPONSE_HEADER_TIMEOUT_MS,
    );
    let idle_timeout = s.millis(
        errs,
        &["idle_timeout_ms"],
        raw.idle_timeout_ms,
        defaults::IDLE_TIMEOUT_MS,
    );

    let h = raw.health.unwrap_or_default();
    let path = h.path.unwrap_or_else(|| defaults::HEALTH_PATH.to_string());
    if !path.starts_with('/') {
        errs.push(
            s.line(&["health", "path"]),
            s.say(format!(
                "health.path {path:?} must start with '/', e.g. \"/actuator/health\""
            )),
        );
    } else if path == "/" {
        errs.push(
            s.line(&["health", "path"]),
            s.say(
                "health.path must not be \"/\": probes to / create sessions and load in the backend; \
                 use a health endpoint such as \"/actuator/health\"",
            ),
        );
    }
    let interval = s.millis(
        errs,
        &["health", "interval_ms"],
        h.interval_ms,
        defaults::HEALTH_INTERVAL_MS,
    );
    let timeout = s.millis(
        errs,
        &["health", "timeout_ms"],
        h.timeout_ms,
        defaults::HEALTH_TIMEOUT_MS,
    );
    if !timeout.is_zero()
        && !interval.is_zero()
        && timeout >= interval
        && !s.dropped("health.timeout_ms")
        && !s.dropped("health.interval_ms")
    {
        let line = if h.timeout_ms.is_some() {
            s.line(&["health", "timeout_ms"])
        } else {
            s.line(&["health", "interval_ms"])
        };
        errs.push(
            line,
            s.say(format!(
                "health.timeout_ms ({}) must be less than health.interval_ms ({}), so one probe ends before the next starts",
                timeout.as_millis(),
                interval.as_millis()
            )),
        );
    }
    let rise = h.rise.unwrap_or(defaults::HEALTH_RISE);
    let fall = h.fall.unwrap_or(defaults::HEALTH_FALL);
    for (key, v) in [("rise", rise), ("fall", fall)] {
        if v == 0 {
            errs.push(
                s.line(&["health", key]),
                s.say(format!("health.{key} must be at least 1")),
            );
        }
    }

    if raw
        .required_for_readiness
        .unwrap_or(defaults::REQUIRED_FOR_READINESS)
    {
        readiness.required.push(name.clone());
    }

    let shedding = build_shedding(s, raw.shedding.unwrap_or_default(), errs);
    let actuator = build_actuator(s, raw.actuator.unwrap_or_default(), errs);
    let adaptive = build_adaptive(s, raw.adaptive.unwrap_or_default(), errs);
    let retry = build_retry(s, raw.retry.unwrap_or_default(), errs);
    let tls = super::upstream_tls::build_upstream_tls(s, raw.tls, &backends, base, errs);
    if tls.is_none()
        && actuator
            .base_url
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"))
    {
        errs.push(
            s.line(&["actuator", "base_url"]),
            s.say(
                "actuator base_url is https:// but the upstream has no [upstream.tls]; \
                 add one (its ca_file and server_name are used for the polls too)",
            ),
        );
    }

    Some(UpstreamConfig {
        name,
        backends,
        max_workers,
        connect_timeout,
        response_header_timeout,
        idle_timeout,
        max_idle_per_backend: raw
            .max_idle_per_backend
            .unwrap_or(defaults::MAX_IDLE_PER_BACKEND),
        management_port: raw.management_port.inspect(|port| {
            if *port == 0 {
                errs.push(
                    s.line(&["management_port"]),
                    s.say("management_port must be a port number, 1 to 65535"),
                );
            }
        }),
        health: HealthConfig {
            enabled: h.enabled.unwrap_or(defaults::HEALTH_ENABLED),
            path,
            interval,
            timeout,
            rise,
            fall,
        },
        shedding,
        actuator,
        adaptive,
        retry,
        tls,
    })
}

/// A utilisation ratio key: finite and in (0, 1].
fn check_ratio(s: &Section, errs: &mut Errors, path: &[&str], value: f64) {
    if !(value.is_finite() && value > 0.0 && value <= 1.0) {
        errs.push(
            s.line(path),
            s.say(format!(
                "{} = {value} must be a utilisation ratio in (0, 1], e.g. 0.85 for 85%",
                path.join(".")
            )),
        );
    }
}

fn build_shedding(s: &Section, raw: RawShedding, errs: &mut Errors) -> SheddingConfig {
    let default = SheddingConfig::default();
    let thresholds = Thresholds {
        critical: raw.critical.unwrap_or(default.thresholds.critical),
        normal: raw.normal.unwrap_or(default.thresholds.normal),
        sheddable: raw.sheddable.unwrap_or(default.thresholds.sheddable),
    };
    for (key, value) in [
        ("critical", thresholds.critical),
        ("normal", thresholds.normal),
        ("sheddable", thresholds.sheddable),
    ] {
        check_ratio(s, errs, &["shedding", key], value);
    }
    let band = raw.band.unwrap_or(default.band);
    if !(band.is_finite() && (0.0..=1.0).contains(&band)) {
        errs.push(
            s.line(&["shedding", "band"]),
            s.say(format!(
                "shedding.band = {band} must be in [0, 1]; 0 sheds everything at the threshold at once"
            )),
        );
    }
    let queue_timeout = s.millis(
        errs,
        &["shedding", "queue_timeout_ms"],
        raw.queue_timeout_ms,
        defaults::QUEUE_TIMEOUT_MS,
    );
    SheddingConfig {
        mode: raw.mode.map_or(default.mode, Into::into),
        thresholds,
        band,
        queue_size: raw.queue_size.unwrap_or(default.queue_size),
        queue_timeout,
    }
}

fn build_actuator(s: &Section, raw: RawActuator, errs: &mut Errors) -> ActuatorSettings {
    let default = ActuatorSettings::default();
    let millis =
        |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
    let settings = ActuatorSettings {
        enabled: raw.enabled.unwrap_or(default.enabled),
        format: raw.format.unwrap_or(default.format),
        base_url: raw.base_url,
        interval: millis(raw.interval_ms, default.interval),
        timeout: millis(raw.timeout_ms, default.timeout),
        busy_metric: raw.busy_metric,
        max_metric: raw.max_metric,
        connector: raw.connector,
    };
    // The rules live with the settings type (`settings.rs`); each problem is reported at the table.
    for problem in settings.problems() {
        errs.push(s.line(&["actuator"]), s.say(problem));
    }
    settings
}

fn build_retry(s: &Section, raw: RawRetry, errs: &mut Errors) -> RetryConfig {
    let default = RetryConfig::default();
    let connect_attempts = raw.connect_attempts.unwrap_or(default.connect_attempts);
    if connect_attempts == 0 {
        errs.push(
            s.line(&["retry", "connect_attempts"]),
            s.say("retry.connect_attempts must be at least 1 (the first attempt counts)"),
        );
    }
    let ms = |d: Duration| d.as_millis() as u64;
    let backoff_base = s.millis(
        errs,
        &["retry", "backoff_base_ms"],
        raw.backoff_base_ms,
        ms(default.backoff_base),
    );
    let backoff_cap = s.millis(
        errs,
        &["retry", "backoff_cap_ms"],
        raw.backoff_cap_ms,
        ms(default.backoff_cap),
    );
    if backoff_cap < backoff_base && !backoff_base.is_zero() && !backoff_cap.is_zero() {
        errs.push(
            s.line(&["retry", "backoff_cap_ms"]),
            s.say(format!(
                "retry.backoff_cap_ms ({}) must not be less than retry.backoff_base_ms ({})",
                backoff_cap.as_millis(),
                backoff_base.as_millis()
            )),
        );
    }
    let idempotent_methods = match raw.idempotent_methods {
        None => default.idempotent_methods,
        Some(names) => names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let method = http::Method::from_bytes(name.trim().as_bytes()).ok();
                if method.is_none() || name.trim().is_empty() {
                    errs.push(
                        s.line(&["retry", "idempotent_methods"]),
                        s.say(format!(
                            "retry.idempotent_methods[{i}] {name:?} is not an HTTP method"
                        )),
                    );
                }
                method
            })
            .collect(),
    };
    let eject_duration = s.millis(
        errs,
        &["retry", "eject_ms"],
        raw.eject_ms,
        ms(default.eject_duration),
    );
    RetryConfig {
        connect_attempts,
        backoff_base,
        backoff_cap,
        idempotent_methods,
        eject_after_connect_failures: raw
            .eject_after_connect_failures
            .unwrap_or(default.eject_after_connect_failures),
        eject_duration,
    }
}

fn build_adaptive(s: &Section, raw: RawAdaptive, errs: &mut Errors) -> Option<AdaptiveSettings> {
    let default = AdaptiveSettings::default();
    let probe_interval = s.millis(
        errs,
        &["adaptive", "probe_interval_ms"],
        raw.probe_interval_ms,
        default.probe_interval.as_millis() as u64,
    );
    let settings = AdaptiveSettings {
        initial_limit: raw.initial_limit.unwrap_or(default.initial_limit),
        min_limit: raw.min_limit.unwrap_or(default.min_limit),
        max_limit: raw.max_limit.unwrap_or(default.max_limit),
        smoothing: raw.smoothing.unwrap_or(default.smoothing),
        tolerance: raw.tolerance.unwrap_or(default.tolerance),
        probe_interval,
    };
    if let Err(why) = settings.validate() {
        errs.push(s.line(&["adaptive"]), s.say(format!("[adaptive]: {why}")));
    }
    raw.enabled
        .unwrap_or(defaults::ADAPTIVE_ENABLED)
        .then_some(settings)
}

pub(super) fn build_route(
    section: &mut Section,
    known: &[&str],
    errs: &mut Errors,
) -> Option<RouteConfig> {
    let mut raw = section.deserialize::<RawRoute>(errs)?;
    let s = &*section;
    let cache_settings = cache_settings(s, errs, &raw);
    let rewrite = super::rewrite::build(s, errs, &mut raw);

    let name = raw.name.unwrap_or_default();
    if !s.has("name") {
        errs.push(
            s.header,
            s.say("missing key `name`; every route needs a unique name"),
        );
    } else if name.trim().is_empty() && !s.dropped("name") {
        errs.push(s.line(&["name"]), s.say("name must not be empty"));
    }

    let host = raw.host.map(|h| h.to_ascii_lowercase());
    if let Some(h) = &host {
        if let Err(why) = check_host(h) {
            errs.push(s.line(&["host"]), s.say(why));
        }
    }

    let path_prefix = raw.path_prefix.unwrap_or_default();
    if !s.has("path_prefix") {
        errs.push(
            s.header,
            s.say("missing key `path_prefix`; e.g. path_prefix = \"/api/orders\" (\"/\" matches every path)"),
        );
    } else if !path_prefix.starts_with('/') && !s.dropped("path_prefix") {
        errs.push(
            s.line(&["path_prefix"]),
            s.say(format!("path_prefix {path_prefix:?} must start with '/'")),
        );
    }

    let upstream = raw.upstream.unwrap_or_default();
    if !s.has("upstream") {
        errs.push(
            s.header,
            s.say(format!(
                "missing key `upstream`; name the [[upstream]] to send to ({})",
                known_list(known)
            )),
        );
    } else if !s.dropped("upstream") && !known.contains(&upstream.as_str()) {
        errs.push(
            s.line(&["upstream"]),
            s.say(format!(
                "upstream {upstream:?} is not defined ({})",
                known_list(known)
            )),
        );
    }

    Some(RouteConfig {
        name,
        host,
        path_prefix,
        upstream,
        class: raw.class.map_or(RouteClass::Normal, Into::into),
        cache: raw.cache.map_or(CachePolicy::Off, Into::into),
        cache_settings,
        threshold: raw
            .threshold
            .inspect(|t| check_ratio(s, errs, &["threshold"], *t)),
        rewrite,
        websocket: raw.websocket.unwrap_or(defaults::ROUTE_WEBSOCKET),
    })
}

fn cache_settings(s: &Section, errs: &mut Errors, raw: &RawRoute) -> CacheSettings {
    let d = CacheSettings::default();
    let max_bytes = raw.cache_max_bytes.unwrap_or(d.max_bytes);
    let settings = CacheSettings {
        max_bytes,
        // Left out, the object limit follows a small cache_max_bytes down.
        max_object_bytes: raw
            .cache_max_object_bytes
            .unwrap_or(d.max_object_bytes.min(max_bytes)),
        generate_etag: raw.cache_generate_etag.unwrap_or(d.generate_etag),
        stale_on_shed: raw.cache_stale_on_shed_ms.map(Duration::from_millis),
        stale_if_error: raw.cache_stale_if_error_ms.map(Duration::from_millis),
        stale_while_revalidate: raw
            .cache_stale_while_revalidate_ms
            .map(Duration::from_millis),
        store_set_cookie: raw.cache_store_set_cookie.unwrap_or(d.store_set_cookie),
        coalesce_timeout: raw
            .cache_coalesce_timeout_ms
            .map_or(d.coalesce_timeout, Duration::from_millis),
        targeted_field: raw.cache_control_field.as_deref().and_then(|name| {
            let field = targeted_field(name);
            if let Err(why) = &field {
                errs.push(s.line(&["cache_control_field"]), s.say(why));
            }
            field.ok()
        }),
    };
    if settings.max_bytes == 0 {
        errs.push(
            s.line(&["cache_max_bytes"]),
            s.say("cache_max_bytes must be greater than 0"),
        );
    }
    if settings.max_object_bytes > CACHE_MAX_OBJECT_BYTES_LIMIT {
        errs.push(
            s.line(&["cache_max_object_bytes"]),
            s.say(format!(
                "cache_max_object_bytes must be at most {CACHE_MAX_OBJECT_BYTES_LIMIT}"
            )),
        );
    } else if settings.max_object_bytes > settings.max_bytes && settings.max_bytes > 0 {
        errs.push(
            s.line(&["cache_max_object_bytes"]),
            s.say(format!(
                "cache_max_object_bytes ({}) must not exceed cache_max_bytes ({})",
                settings.max_object_bytes, settings.max_bytes
            )),
        );
    }
    settings
}

fn known_list(known: &[&str]) -> String {
    if known.is_empty() {
        "no [[upstream]] is defined".to_string()
    } else {
        format!("known: {}", known.join(", "))
    }
}

pub(super) fn check_unique_names(sections: &[Section], kind: &str, errs: &mut Errors) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for s in sections {
        let Some(name) = s.str_value("name") else {
            continue;
        };
        let line = s.line(&["name"]);
        if let Some(first) = seen.get(name) {
            errs.push(
                line,
                s.say(format!("name {name:?} is already used by the {kind} at line {first}; names must be unique")),
            );
        } else {
            seen.insert(name, line);
        }
    }
}

pub(super) fn check_unique_matches(
    sections: &[Section],
    routes: &[Option<RouteConfig>],
    errs: &mut Errors,
) {
    let mut seen: HashMap<(Option<&str>, &str), (&str, usize)> = HashMap::new();
    for (s, route) in sections.iter().zip(routes) {
        let Some(r) = route else { continue };
        if !s.has("path_prefix") || s.dropped("path_prefix") || s.dropped("host") {
            continue;
        }
        let line = s.line(&["path_prefix"]);
        let key = (r.host.as_deref(), r.path_prefix.as_str());
        if let Some((first, first_line)) = seen.get(&key) {
            errs.push(
                line,
                s.say(format!(
                    "host and path_prefix are the same as route {first:?} (line {first_line}), so this route could never match"
                )),
            );
        } else {
            seen.insert(key, (r.name.as_str(), line));
        }
    }
}

fn valid_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `host:port`, `[v6]:port`; no scheme, no path, port 1-65535.
fn check_backend(backend: &str) -> Result<(), String> {
    let example = "write host:port, e.g. \"127.0.0.1:8081\"";
    if backend.contains("://") {
        return Err(format!("{backend:?} must not have a scheme; {example}"));
    }
    if backend.contains('/') {
        return Err(format!("{backend:?} must not have a path; {example}"));
    }
    let split = match backend.strip_prefix('[') {
        Some(rest) => rest.split_once("]:"),
        None => backend
            .rsplit_once(':')
            .filter(|(host, _)| !host.contains(':')),
    };
    let Some((host, port)) = split else {
        return Err(format!("{backend:?} has no port; {example}"));
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{backend:?} has no valid host; {example}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!(
            "{backend:?}: port {port:?} is not a port number (1-65535)"
        )),
    }
}

/// Exact host names, `*.suffix` wildcards, IP literals. Already lowercased.
fn check_host(host: &str) -> Result<(), String> {
    let hint = "write an exact name (\"api.example.com\") or a wildcard (\"*.example.com\")";
    if host.starts_with('[') && host.ends_with(']') && host.len() > 2 {
        return Ok(());
    }
    let bare = host.strip_prefix("*.").unwrap_or(host);
    if bare.contains(':') {
        return Err(format!(
            "host {host:?} must not have a port: routes match the Host header without its port"
        ));
    }
    let ok = !bare.is_empty()
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("host {host:?} is not a host name; {hint}"))
    }
}

/// The `cache_control_field` of a route: a header field name other than the ones whose
/// meaning is fixed (RFC 9213 §2.1 asks for a field of its own per cache or class).
fn targeted_field(name: &str) -> Result<http::HeaderName, String> {
    let field = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("cache_control_field {name:?} is not a header field name"))?;
    if field == http::header::CACHE_CONTROL || field == http::header::EXPIRES {
        return Err(format!(
            "cache_control_field {name:?} names a field the cache already reads; \
             name a targeted one, such as \"CDN-Cache-Control\" or \"Loadgate-Cache-Control\""
        ));
    }
    Ok(field)
}
