//! The proxy's own errors and the one table that turns each into an HTTP response.
//!
//! Everything the proxy answers by itself on the data path (no route, bad framing,
//! an upstream that is down or slow) goes through [`ProxyError::into_response`], so
//! status codes and `application/problem+json` bodies (RFC 9457) are decided here
//! and nowhere else.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::config::RouteClass;
use crate::http::body::{full, BodyFault, ProxyBody};

/// Why an upstream exchange failed; also the `kind` label of the upstream error metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The TCP connection could not be opened (refused, unreachable).
    Connect,
    /// The TCP connection was not opened within the connect timeout.
    ConnectTimeout,
    /// No response head arrived within the response-header timeout.
    HeaderTimeout,
    /// The connection broke, or the backend spoke broken HTTP, before a response head.
    Protocol,
    /// A reused connection died before any response byte and the request could not be
    /// retried (not idempotent, or its body cannot be replayed): it may have reached the backend.
    StaleConnection,
    /// Every backend of the upstream is failing its health check.
    NoHealthyBackend,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::HeaderTimeout => "header_timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::StaleConnection => "stale_connection",
            UpstreamErrorKind::NoHealthyBackend => "no_healthy_backend",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },

    #[error("bad request: {0}")]
    BadRequest(String),

    #[error("upstream {upstream:?} ({backend}): {detail}")]
    Upstream {
        upstream: String,
        backend: String,
        kind: UpstreamErrorKind,
        detail: String,
    },

    #[error("request body is larger than the {limit}-byte limit{}",
        declared.map_or(String::new(), |n| format!(" (Content-Length: {n})")))]
    PayloadTooLarge { limit: u64, declared: Option<u64> },

    #[error("the proxy is shutting down")]
    ShuttingDown,

    #[error("upstream {upstream:?} is at {:.0}% utilisation ({signal} signal); {} requests are shed above {:.0}%",
        utilisation * 100.0, class.as_str(), threshold * 100.0)]
    Shed {
        upstream: String,
        class: RouteClass,
        utilisation: f64,
        threshold: f64,
        signal: &'static str,
        retry_after: u64,
    },

    #[error("upstream {upstream:?} is at its hard limit ({:.0}% utilisation) and {why}", utilisation * 100.0)]
    Overloaded {
        upstream: String,
        utilisation: f64,
        why: &'static str,
        retry_after: u64,
    },
}

impl ProxyError {
    /// The error to answer when forwarding failed because the client's body did.
    pub fn from_client_body(fault: BodyFault, detail: &str) -> ProxyError {
        match fault {
            BodyFault::TooLarge { limit } => ProxyError::PayloadTooLarge {
                limit,
                declared: None,
            },
            BodyFault::Broken => {
                ProxyError::BadRequest(format!("request body broke off while forwarding: {detail}"))
            }
        }
    }

    /// The single error → status table.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Upstream { kind, .. } => match kind {
                UpstreamErrorKind::Connect
                | UpstreamErrorKind::Protocol
                | UpstreamErrorKind::StaleConnection => StatusCode::BAD_GATEWAY,
                UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::HeaderTimeout => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                UpstreamErrorKind::NoHealthyBackend => StatusCode::SERVICE_UNAVAILABLE,
            },
            ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Shed { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// How long a client should wait before retrying, when the answer is "not now".
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::Upstream {
                kind: UpstreamErrorKind::NoHealthyBackend,
                ..
            }
            | ProxyError::ShuttingDown => Some(Duration::from_secs(1)),
            ProxyError::Shed { retry_after, .. } | ProxyError::Overloaded { retry_after, .. } => {
                Some(Duration::from_secs(*retry_after))
            }
            _ => None,
        }
    }

    /// An `application/problem+json` response (RFC 9457) describing the error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut problem = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        match &self {
            ProxyError::Upstream { upstream, kind, .. } => {
                problem["upstream"] = upstream.clone().into();
                problem["cause"] = kind.as_str().into();
            }
            ProxyError::Shed {
                upstream,
                class,
                utilisation,
                threshold,
                signal,
                ..
            } => {
                problem["upstream"] = upstream.clone().into();
                problem["route_class"] = class.as_str().into();
                problem["utilisation"] = round2(*utilisation).into();
                problem["threshold"] = (*threshold).into();
                problem["signal"] = (*signal).into();
            }
            ProxyError::Overloaded {
                upstream,
                utilisation,
                ..
            } => {
                problem["upstream"] = upstream.clone().into();
                problem["route_class"] = "critical".into();
                problem["utilisation"] = round2(*utilisation).into();
            }
            _ => {}
        }
        let mut body = serde_json::to_vec(&problem).expect("a JSON value serializes");
        body.push(b'\n');
        let mut response = Response::new(full(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
        }
        if matches!(self, ProxyError::BadRequest(_)) {
            // The framing of this connection can no longer be trusted (RFC 9112 §6.3).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ProxyError::PayloadTooLarge { .. }) {
            // The rest of the body is not read: close rather than drain it (RFC 9110 §15.5.14).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(kind: UpstreamErrorKind) -> ProxyError {
        ProxyError::Upstream {
            upstream: "app".into(),
            backend: "127.0.0.1:1".into(),
            kind,
            detail: "x".into(),
        }
    }

    #[test]
    fn status_table() {
        use UpstreamErrorKind::*;
        let cases = [
            (upstream(Connect), 502),
            (upstream(Protocol), 502),
            (upstream(StaleConnection), 502),
            (upstream(ConnectTimeout), 504),
            (upstream(HeaderTimeout), 504),
            (upstream(NoHealthyBackend), 503),
            (ProxyError::BadRequest("x".into()), 400),
            (
                ProxyError::NoRoute {
                    host: "h".into(),
                    path: "/".into(),
                },
                404,
            ),
            (ProxyError::ShuttingDown, 503),
            (
                ProxyError::PayloadTooLarge {
                    limit: 10,
                    declared: Some(11),
                },
                413,
            ),
            (
                ProxyError::from_client_body(BodyFault::TooLarge { limit: 10 }, "x"),
                413,
            ),
            (ProxyError::from_client_body(BodyFault::Broken, "x"), 400),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
        }
    }

    #[test]
    fn shed_is_429_with_retry_after_and_names_class_and_utilisation() {
        let error = ProxyError::Shed {
            upstream: "app".into(),
            class: RouteClass::Sheddable,
            utilisation: 0.8123,
            threshold: 0.7,
            signal: "local",
            retry_after: 3,
        };
        assert_eq!(error.status(), 429);
        let response = error.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    #[test]
    fn payload_too_large_closes_the_connection() {
        let response = ProxyError::PayloadTooLarge {
            limit: 1024,
            declared: Some(4096),
        }
        .into_response();
        assert_eq!(response.status(), 413);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn problem_json_names_upstream_and_cause() {
        let response = upstream(UpstreamErrorKind::HeaderTimeout).into_response();
        assert_eq!(response.status(), 504);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
        let unavailable = upstream(UpstreamErrorKind::NoHealthyBackend).into_response();
        assert_eq!(unavailable.headers()[header::RETRY_AFTER], "1");
    }
}
