//! Keep-alive policy: parsing a backend's `Keep-Alive` and `Connection` headers, the
//! idle limit and request limit they imply, and the limits a [`Host`] learns from them.
//!
//! Not here: acting on the policy (reusing, retiring or returning a connection:
//! `mod.rs`, `conn.rs`, `idle.rs`). Everything here but the learning is pure.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderMap};

use super::Host;

impl Host {
    pub(super) fn idle_limit(&self, configured: Duration) -> Duration {
        let learned = self.learned_timeout_ms.load(Ordering::Relaxed);
        idle_limit(
            configured,
            (learned > 0).then(|| Duration::from_millis(learned)),
        )
    }

    pub(super) fn learned_max(&self) -> Option<u32> {
        Some(self.learned_max.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// The backend closed a connection after `served` requests: the same count twice
    /// in a row becomes the learned limit (one early close, e.g. after an error, is not).
    pub(super) fn observe_close_after(&self, served: u32) {
        if served < 2 {
            return;
        }
        if self.max_candidate.swap(served, Ordering::Relaxed) == served {
            self.learned_max.store(served, Ordering::Relaxed);
        }
    }
}

/// How long a connection may stay idle: the configured timeout, lowered to ¾ of the
/// backend's own `Keep-Alive: timeout` when it announced one, so we retire it first.
pub(crate) fn idle_limit(configured: Duration, learned: Option<Duration>) -> Duration {
    learned.map_or(configured, |t| configured.min(t.mul_f64(0.75)))
}

/// True when a connection must not carry another request: the backend allows at most
/// one more (`Keep-Alive: max` ≤ 1, keeping the last slot, where a backend that closes
/// without saying so would fail us), or it has served the learned limit.
pub(crate) fn at_request_limit(served: u32, allowed: Option<u32>, learned: Option<u32>) -> bool {
    allowed.is_some_and(|n| n <= 1) || learned.is_some_and(|max| served >= max)
}

/// The parameters of a `Keep-Alive` response header.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    pub timeout: Option<Duration>,
    pub max: Option<u32>,
}

/// Parses `Keep-Alive: timeout=5, max=100` (RFC 2068 §19.7.1; parameters in any order,
/// case-insensitive, unknown ones ignored, invalid values ignored).
pub(crate) fn parse_keep_alive(headers: &HeaderMap) -> KeepAlive {
    const KEEP_ALIVE: header::HeaderName = header::HeaderName::from_static("keep-alive");
    let mut parsed = KeepAlive::default();
    let params = headers
        .get_all(KEEP_ALIVE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        let name = name.trim();
        if name.eq_ignore_ascii_case("timeout") {
            if let Ok(secs) = value.parse::<u64>() {
                parsed.timeout = Some(Duration::from_secs(secs));
            }
        } else if name.eq_ignore_ascii_case("max") {
            parsed.max = value.parse().ok().or(parsed.max);
        }
    }
    parsed
}

/// True when the `Connection` header carries the `close` option.
pub(crate) fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn keep_alive_header_is_parsed() {
        let ka = parse_keep_alive(&headers(&[("keep-alive", "timeout=5, max=100")]));
        assert_eq!(ka.timeout, Some(Duration::from_secs(5)));
        assert_eq!(ka.max, Some(100));
        let ka = parse_keep_alive(&headers(&[("Keep-Alive", "MAX=7 ,Timeout=\"2\", foo=bar")]));
        assert_eq!(ka.timeout, Some(Duration::from_secs(2)));
        assert_eq!(ka.max, Some(7));
        assert_eq!(
            parse_keep_alive(&headers(&[("keep-alive", "timeout=x, max")])),
            KeepAlive::default()
        );
        assert_eq!(parse_keep_alive(&HeaderMap::new()), KeepAlive::default());
    }

    #[test]
    fn connection_close_is_found_among_options() {
        assert!(wants_close(&headers(&[("connection", "close")])));
        assert!(wants_close(&headers(&[("connection", "Upgrade, Close")])));
        assert!(!wants_close(&headers(&[("connection", "keep-alive")])));
        assert!(!wants_close(&HeaderMap::new()));
    }

    #[test]
    fn idle_limit_stays_below_an_announced_keep_alive() {
        let four = Duration::from_secs(4);
        assert_eq!(idle_limit(four, None), four);
        assert_eq!(idle_limit(four, Some(Duration::from_secs(60))), four);
        assert_eq!(
            idle_limit(four, Some(Duration::from_secs(2))),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn request_limit_keeps_the_last_slot_free() {
        assert!(!at_request_limit(1, None, None));
        assert!(!at_request_limit(1, Some(2), None));
        assert!(at_request_limit(1, Some(1), None));
        assert!(at_request_limit(1, Some(0), None));
        assert!(!at_request_limit(99, None, Some(100)));
        assert!(at_request_limit(100, None, Some(100)));
    }
}
