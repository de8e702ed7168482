//! The proxy's own errors and the one table that turns each into an HTTP response.
//!
//! Everything the proxy answers by itself on the data path (no route, bad framing,
//! an upstream that is down or slow) goes through [`ProxyError::into_response`], so
//! status codes and `application/problem+json` bodies (RFC 9457) are decided here
//! and nowhere else. A client is told what went wrong in plain words; which backend
//! failed and the error chain behind it go to the log, never into the body.

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
    /// The TCP connection was not opened within the connect timeout, or its TLS
    /// handshake did not end within it.
    ConnectTimeout,
    /// The TLS handshake with the backend failed: its certificate is not trusted or not
    /// for the name verified, no protocol in common, or the connection broke off.
    Tls,
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
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::HeaderTimeout => "header_timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::StaleConnection => "stale_connection",
            UpstreamErrorKind::NoHealthyBackend => "no_healthy_backend",
        }
    }

    /// Every kind, to register each upstream's error series at zero. A kind added to the
    /// enum must be added here too (`every_error_kind_is_in_all` stops compiling until it is).
    pub const ALL: [UpstreamErrorKind; 7] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Tls,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::HeaderTimeout,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::StaleConnection,
        UpstreamErrorKind::NoHealthyBackend,
    ];

    /// What a client is told about the failure: what went wrong, in plain words. The
    /// backend's address and the error chain behind it stay in the log.
    pub fn client_detail(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "could not connect to the upstream",
            UpstreamErrorKind::ConnectTimeout => "the upstream did not accept a connection in time",
            UpstreamErrorKind::Tls => "could not establish a secure connection to the upstream",
            UpstreamErrorKind::HeaderTimeout => "the upstream did not answer in time",
            UpstreamErrorKind::Protocol => {
                "the upstream connection failed or the upstream sent an invalid response"
            }
            UpstreamErrorKind::StaleConnection => {
                "the upstream connection closed before a response; the request may have \
                 reached the upstream, so it was not retried"
            }
            UpstreamErrorKind::NoHealthyBackend => "no backend of the upstream is healthy",
        }
    }
}

/// The methods the proxy forwards, as the `Allow` header of a 405 lists them.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS";

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

    /// The request body arrived slower than the upload pace allows.
    #[error("the request body arrived too slowly")]
    RequestTimeout,

    /// A request the proxy cannot frame or forward, such as an unsupported transfer coding.
    #[error("not implemented: {0}")]
    NotImplemented(String),

    /// A method the proxy does not forward (CONNECT).
    #[error("method {method} is not supported by the proxy")]
    MethodNotAllowed { method: String },

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
    /// `detail`, the upstream exchange's error chain, goes to the log, not to the client.
    pub fn from_client_body(fault: BodyFault, detail: &str) -> ProxyError {
        match fault {
            BodyFault::TooLarge { limit } => ProxyError::PayloadTooLarge {
                limit,
                declared: None,
            },
            BodyFault::Broken => {
                tracing::debug!(%detail, "request body broke off while forwarding");
                ProxyError::BadRequest("request body broke off while forwarding".into())
            }
            BodyFault::TooSlow => ProxyError::RequestTimeout,
        }
    }

    /// The single error → status table.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Upstream { kind, .. } => match kind {
                UpstreamErrorKind::Connect
                | UpstreamErrorKind::Tls
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

    /// The `detail` of the problem document: the error's own words, except for an
    /// upstream failure, whose backend address and error chain are not the client's
    /// business (they are logged when the response is built).
    fn client_detail(&self) -> String {
        match self {
            ProxyError::Upstream { kind, .. } => kind.client_detail().to_string(),
            _ => self.to_string(),
        }
    }

    /// An `application/problem+json` response (RFC 9457) describing the error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut problem = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.client_detail(),
        });
        match &self {
            ProxyError::Upstream {
                upstream,
                backend,
                kind,
                detail,
            } => {
                tracing::debug!(%upstream, %backend, kind = kind.as_str(), %detail,
                    "upstream failed; answered {}", status.as_u16());
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
        if matches!(
            self,
            ProxyError::PayloadTooLarge { .. } | ProxyError::RequestTimeout
        ) {
            // The rest of the body is not read: close rather than drain it (RFC 9110 §15.5.14).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ProxyError::NotImplemented(_)) {
            // A transfer coding the proxy cannot decode leaves the body's end unknown
            // (RFC 9112 §6.1): nothing after it on this connection can be framed.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ProxyError::MethodNotAllowed { .. }) {
            headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            // What follows a CONNECT is tunnel bytes, not a request: close rather than
            // read them as one.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// An error and its sources, e.g. "client error (Connect): tcp connect error: Connection
/// refused": hyper-util's own words say nothing of a refused connection or an untrusted
/// certificate. For health checks and actuator polls, which report why they failed.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
            (upstream(Tls), 502),
            (upstream(Protocol), 502),
            (upstream(StaleConnection), 502),
            (upstream(ConnectTimeout), 504),
            (upstream(HeaderTimeout), 504),
            (upstream(NoHealthyBackend), 503),
            (ProxyError::BadRequest("x".into()), 400),
            (ProxyError::RequestTimeout, 408),
            (ProxyError::from_client_body(BodyFault::TooSlow, "x"), 408),
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
            (
                ProxyError::NotImplemented("transfer coding gzip".into()),
                501,
            ),
            (
                ProxyError::MethodNotAllowed {
                    method: "CONNECT".into(),
                },
                405,
            ),
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
    fn a_too_slow_upload_is_408_and_closes_the_connection() {
        let response = ProxyError::RequestTimeout.into_response();
        assert_eq!(response.status(), 408);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    fn body_text(response: Response<ProxyBody>) -> String {
        use http_body_util::BodyExt;
        let body = futures_util::FutureExt::now_or_never(response.into_body().collect())
            .expect("a full body is ready at once")
            .expect("a full body does not fail")
            .to_bytes();
        String::from_utf8(body.to_vec()).expect("problem+json is UTF-8")
    }

    #[test]
    fn clients_learn_neither_the_backend_address_nor_the_error_chain() {
        use UpstreamErrorKind::*;
        let internal = "cannot connect: Connection refused (os error 111) (3 attempts)";
        for kind in [
            Connect,
            ConnectTimeout,
            Tls,
            HeaderTimeout,
            Protocol,
            StaleConnection,
            NoHealthyBackend,
        ] {
            let error = ProxyError::Upstream {
                upstream: "app".into(),
                backend: "10.1.2.3:8080".into(),
                kind,
                detail: internal.into(),
            };
            let body = body_text(error.into_response());
            assert!(!body.contains("10.1.2.3"), "{body}");
            assert!(!body.contains("os error"), "{body}");
            assert!(!body.contains("attempts"), "{body}");
            let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(problem["upstream"], "app", "{body}");
            assert_eq!(problem["cause"], kind.as_str(), "{body}");
            assert_eq!(problem["detail"], kind.client_detail(), "{body}");
        }
    }

    #[test]
    fn a_broken_client_body_keeps_the_upstream_error_chain_out_of_the_answer() {
        let error = ProxyError::from_client_body(
            BodyFault::Broken,
            "upstream exchange failed: error from user's Body stream",
        );
        let body = body_text(error.into_response());
        assert!(!body.contains("user's Body stream"), "{body}");
        assert!(body.contains("request body broke off"), "{body}");
    }

    #[test]
    fn method_not_allowed_lists_the_allowed_methods_and_closes() {
        let response = ProxyError::MethodNotAllowed {
            method: "CONNECT".into(),
        }
        .into_response();
        assert_eq!(response.status(), 405);
        assert_eq!(
            response.headers()[header::ALLOW],
            "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
        );
        assert_eq!(response.headers()[header::CONNECTION], "close");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let problem: serde_json::Value = serde_json::from_str(&body_text(response)).unwrap();
        assert_eq!(problem["status"], 405);
        assert!(problem["detail"].as_str().unwrap().contains("CONNECT"));
    }

    #[test]
    fn not_implemented_is_problem_json_and_closes() {
        let response =
            ProxyError::NotImplemented("transfer coding \"gzip\" is not supported".into())
                .into_response();
        assert_eq!(response.status(), 501);
        assert_eq!(response.headers()[header::CONNECTION], "close");
        assert!(response.headers().get(header::ALLOW).is_none());
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let problem: serde_json::Value = serde_json::from_str(&body_text(response)).unwrap();
        assert_eq!(problem["status"], 501);
        assert_eq!(problem["title"], "Not Implemented");
        assert!(problem["detail"].as_str().unwrap().contains("gzip"));
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
        let problem: serde_json::Value = serde_json::from_str(&body_text(response)).unwrap();
        assert_eq!(problem["upstream"], "app");
        assert_eq!(problem["cause"], "header_timeout");
        assert_eq!(problem["detail"], "the upstream did not answer in time");
        let unavailable = upstream(UpstreamErrorKind::NoHealthyBackend).into_response();
        assert_eq!(unavailable.headers()[header::RETRY_AFTER], "1");
        let problem: serde_json::Value = serde_json::from_str(&body_text(unavailable)).unwrap();
        assert_eq!(problem["detail"], "no backend of the upstream is healthy");
    }

    #[test]
    fn every_error_kind_is_in_all() {
        use UpstreamErrorKind::*;
        let every = [
            Connect,
            Tls,
            ConnectTimeout,
            HeaderTimeout,
            Protocol,
            StaleConnection,
            NoHealthyBackend,
        ];
        for kind in every {
            // No wildcard: a new kind stops this compiling until it is listed above.
            match kind {
                Connect | Tls | ConnectTimeout | HeaderTimeout | Protocol | StaleConnection
                | NoHealthyBackend => {}
            }
            assert!(
                UpstreamErrorKind::ALL.contains(&kind),
                "{kind:?} is not in ALL"
            );
        }
        assert_eq!(UpstreamErrorKind::ALL.len(), every.len());
    }
}
