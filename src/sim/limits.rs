//! The ranges the simulated backend's numbers must stay in, checked where its settings
//! come in: the `sim-backend` flags (through [`parse_service_time_ms`] and
//! [`parse_workers`], so clap names the flag and the value) and [`check`], which
//! [`SimBackend::start`](super::SimBackend::start) runs on every config, `[sim]`
//! sections included.
//!
//! Not here: the settings themselves (`config/sim.rs`, plain data), nor the
//! service-time bound, which `config/` owns so that `check-config` applies it too.

use super::SimConfig;

/// The longest service time accepted, in milliseconds: one hour. The bound is
/// config's, so `check-config` rejects what this module would refuse at start.
pub const MAX_SERVICE_TIME_MS: f64 = crate::config::SIM_MAX_SERVICE_TIME_MS;

/// The largest worker pool or connection limit accepted; a semaphore cannot hold
/// `usize::MAX` permits, and no Tomcat runs a million threads.
pub const MAX_WORKERS: usize = 1_000_000;

/// Why a service time (the value, in milliseconds) is unusable, if it is.
pub fn check_service_time_ms(ms: f64) -> Result<(), String> {
    if ms.is_finite() && (0.0..=MAX_SERVICE_TIME_MS).contains(&ms) {
        Ok(())
    } else {
        Err(format!(
            "must be a number of milliseconds from 0 to {MAX_SERVICE_TIME_MS} (one hour)"
        ))
    }
}

/// Why a worker pool size is unusable, if it is.
pub fn check_workers(workers: usize) -> Result<(), String> {
    if (1..=MAX_WORKERS).contains(&workers) {
        Ok(())
    } else {
        Err(format!("must be from 1 to {MAX_WORKERS}"))
    }
}

/// Parses `--service-time-ms` for clap.
pub fn parse_service_time_ms(text: &str) -> Result<f64, String> {
    let ms: f64 = text
        .trim()
        .parse()
        .map_err(|_| "must be a number of milliseconds".to_string())?;
    check_service_time_ms(ms).map(|()| ms)
}

/// Parses `--workers` for clap.
pub fn parse_workers(text: &str) -> Result<usize, String> {
    let workers: usize = text
        .trim()
        .parse()
        .map_err(|_| "must be a whole number".to_string())?;
    check_workers(workers).map(|()| workers)
}

/// Every number of `cfg` that the backend cannot run with, one message each, naming
/// the setting and its value; empty when all are usable.
pub fn check(cfg: &SimConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(why) = check_workers(cfg.workers) {
        problems.push(format!("workers {} {why}", cfg.workers));
    }
    if cfg.max_connections > MAX_WORKERS {
        problems.push(format!(
            "max_connections {} must be at most {MAX_WORKERS}",
            cfg.max_connections
        ));
    }
    if let Err(why) = check_service_time_ms(cfg.service_time_ms) {
        problems.push(format!("service_time_ms {:?} {why}", cfg.service_time_ms));
    }
    for (i, route) in cfg.routes.iter().enumerate() {
        let Some(ms) = route.service_time_ms else {
            continue;
        };
        if let Err(why) = check_service_time_ms(ms) {
            problems.push(format!(
                "routes[{i}].service_time_ms {ms:?} ({}) {why}",
                route.path_prefix
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimRoute;

    #[test]
    fn service_times_from_zero_to_one_hour_pass() {
        for ms in [0.0, 0.25, 20.0, MAX_SERVICE_TIME_MS] {
            assert_eq!(check_service_time_ms(ms), Ok(()), "{ms}");
        }
        for ms in [
            -5.0,
            -0.001,
            MAX_SERVICE_TIME_MS + 1.0,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert!(check_service_time_ms(ms).is_err(), "{ms}");
        }
    }

    #[test]
    fn flags_parse_only_usable_values() {
        assert_eq!(parse_service_time_ms("12.5"), Ok(12.5));
        for text in ["", "fast", "1e300", "NaN", "inf", "-5"] {
            assert!(parse_service_time_ms(text).is_err(), "{text:?}");
        }
        assert_eq!(parse_workers("200"), Ok(200));
        for text in ["0", "-1", "1000001", "18446744073709551615", "many"] {
            assert!(parse_workers(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn check_names_every_bad_setting_with_its_value() {
        let route = |ms| SimRoute {
            path_prefix: "/api/slow".into(),
            service_time_ms: Some(ms),
            distribution: None,
            cache_control: None,
            body_bytes: None,
        };
        assert!(check(&SimConfig::default()).is_empty());
        let cfg = SimConfig {
            workers: 0,
            max_connections: usize::MAX,
            service_time_ms: f64::NAN,
            routes: vec![route(10.0), route(1e300)],
            ..SimConfig::default()
        };
        let problems = check(&cfg);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("workers 0 "), "{problems:?}");
        assert!(problems[1].starts_with("max_connections "), "{problems:?}");
        assert!(
            problems[2].starts_with("service_time_ms NaN "),
            "{problems:?}"
        );
        assert!(
            problems[3].starts_with("routes[1].service_time_ms 1e300 (/api/slow) "),
            "{problems:?}"
        );
    }
}
