//! Request handling of the simulated backend: the worker pool in front of the
//! `/api/` work endpoints and the actuator, as Tomcat + Spring MVC would answer.

use super::actuator;
use super::body::{filler_etag, FillerBody, SimBody};
use super::etag::{etag_allowed, if_none_match_matches, shallow_etag};
use super::pool::WorkerPool;
use super::stats::SimStats;
use super::{Distribution, SimConfig, SimRoute};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Largest body `?size=` may ask for.
const MAX_BODY_BYTES: usize = 1 << 30;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    /// The application port: every request needs a worker.
    Main,
    /// The management port: actuator only, no worker needed.
    Management,
}

/// State shared by every connection of one simulated backend.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) cfg: SimConfig,
    pub(crate) stats: Arc<SimStats>,
    pool: WorkerPool,
}

/// What one work request should do, after route and query overrides.
#[derive(Debug, Clone, PartialEq)]
struct WorkPlan {
    service_time: Duration,
    cache_control: Option<String>,
    body_bytes: Option<usize>,
}

impl App {
    pub(crate) fn new(cfg: SimConfig) -> App {
        let stats = Arc::new(SimStats::new(cfg.workers));
        App {
            pool: WorkerPool::new(Arc::clone(&stats)),
            stats,
            cfg,
        }
    }

    /// Answers one request; the response body holds the worker until it has been sent.
    pub(crate) async fn handle(&self, req: Request<Incoming>, port: Port) -> Response<SimBody> {
        let path = req.uri().path().to_string();
        self.stats.record_request(req.method().as_str(), &path);
        match port {
            Port::Management if is_actuator(&path) => self.actuator(&path),
            Port::Management => error_response(StatusCode::NOT_FOUND, &path),
            Port::Main => {
                let worker = self.pool.acquire().await;
                let mut response = if path.starts_with("/api/") {
                    self.work(req, &path).await
                } else if is_actuator(&path) && self.cfg.management_listen.is_none() {
                    self.actuator(&path)
                } else {
                    error_response(StatusCode::NOT_FOUND, &path)
                };
                response.body_mut().hold(worker);
                response
            }
        }
    }

    fn actuator(&self, path: &str) -> Response<SimBody> {
        actuator::respond(path, &self.stats, &self.cfg.connector_name)
            .unwrap_or_else(|| error_response(StatusCode::NOT_FOUND, path))
    }

    async fn work(&self, req: Request<Incoming>, path: &str) -> Response<SimBody> {
        let plan = match plan_work(&self.cfg, path, req.uri().query()) {
            Ok(plan) => plan,
            Err(()) => return error_response(StatusCode::BAD_REQUEST, path),
        };
        if !plan.service_time.is_zero() {
            tokio::time::sleep(plan.service_time).await;
        }
        let method = req.method().clone();
        if method == Method::GET || method == Method::HEAD {
            representation(req, path, &plan).await
        } else if !req.body().is_end_stream() {
            echo(req)
        } else {
            let (_, body) = default_body(path);
            json_response(body)
        }
    }
}

fn is_actuator(path: &str) -> bool {
    path == "/actuator" || path.starts_with("/actuator/")
}

/// The route whose `path_prefix` is the longest prefix of `path`.
fn route_for<'a>(cfg: &'a SimConfig, path: &str) -> Option<&'a SimRoute> {
    cfg.routes
        .iter()
        .filter(|route| path.starts_with(&route.path_prefix))
        .max_by_key(|route| route.path_prefix.len())
}

/// Applies the route and the `size` / `delay_ms` query overrides; `Err` on a bad override.
fn plan_work(cfg: &SimConfig, path: &str, query: Option<&str>) -> Result<WorkPlan, ()> {
    let route = route_for(cfg, path);
    let mut plan = WorkPlan {
        service_time: sample_service_time(
            route
                .and_then(|r| r.service_time_ms)
                .unwrap_or(cfg.service_time_ms),
            route
                .and_then(|r| r.distribution)
                .unwrap_or(cfg.distribution),
        ),
        cache_control: route
            .and_then(|r| r.cache_control.clone())
            .or_else(|| cfg.cache_control.clone()),
        body_bytes: route.and_then(|r| r.body_bytes),
    };
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "size" => {
                let size: usize = value.parse().map_err(|_| ())?;
                if size > MAX_BODY_BYTES {
                    return Err(());
                }
                plan.body_bytes = Some(size);
            }
            "delay_ms" => plan.service_time = Duration::from_millis(value.parse().map_err(|_| ())?),
            _ => {}
        }
    }
    Ok(plan)
}

/// One service time drawn from the distribution (`mean_ms` is the fixed time or the mean).
/// `SimBackend::start` keeps the mean within `limits`; a time past what a `Duration`
/// holds would still saturate rather than panic.
fn sample_service_time(mean_ms: f64, distribution: Distribution) -> Duration {
    let ms = match distribution {
        Distribution::Fixed => mean_ms,
        Distribution::Exponential => {
            let u: f64 = rand::random();
            -mean_ms * (1.0 - u).ln()
        }
    };
    if ms > 0.0 {
        Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

/// The small JSON body of a work endpoint: deterministic per path.
fn default_body(path: &str) -> (&'static str, String) {
    let body = serde_json::json!({
        "path": path,
        "message": "hello from the loadgate simulated backend",
    });
    ("application/json", body.to_string())
}

/// GET/HEAD on a work endpoint: body, ETag as `ShallowEtagHeaderFilter` adds it, 304 on a match.
async fn representation(req: Request<Incoming>, path: &str, plan: &WorkPlan) -> Response<SimBody> {
    let (content_type, len, etag, body) = if path == "/api/headers" {
        let json = headers_json(&req);
        (
            "application/json",
            json.len(),
            shallow_etag(json.as_bytes()),
            SimBody::full(json),
        )
    } else if let Some(len) = plan.body_bytes {
        let etag = filler_etag(len).await;
        (
            "application/octet-stream",
            len,
            etag,
            SimBody::new(FillerBody::new(len)),
        )
    } else {
        let (content_type, json) = default_body(path);
        let etag = shallow_etag(json.as_bytes());
        (content_type, json.len(), etag, SimBody::full(json))
    };
    let cache_control = plan.cache_control.as_deref();
    let etag = etag_allowed(cache_control).then_some(etag);
    let mut builder = Response::builder();
    if let Some(cc) = cache_control.and_then(|cc| HeaderValue::from_str(cc).ok()) {
        builder = builder.header(header::CACHE_CONTROL, cc);
    }
    if let Some(etag) = &etag {
        builder = builder.header(header::ETAG, etag.as_str());
        let conditions = req
            .headers()
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok());
        if if_none_match_matches(conditions, etag) {
            return builder
                .status(StatusCode::NOT_MODIFIED)
                .body(SimBody::empty())
                .expect("valid 304");
        }
    }
    builder = builder.header(header::CONTENT_TYPE, content_type);
    let body = if req.method() == Method::HEAD {
        builder = builder.header(header::CONTENT_LENGTH, len);
        SimBody::empty()
    } else {
        body
    };
    builder
        .status(StatusCode::OK)
        .body(body)
        .expect("valid response")
}

/// The request headers as a JSON object, names sorted, each with its list of values.
fn headers_json(req: &Request<Incoming>) -> String {
    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    serde_json::to_string(&headers).expect("headers serialize")
}

/// A request with a body: streamed back as it arrives.
fn echo(req: Request<Incoming>) -> Response<SimBody> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(SimBody::new(req.into_body()))
        .expect("valid echo response")
}

fn json_response(body: String) -> Response<SimBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(SimBody::full(body))
        .expect("valid response")
}

/// Spring Boot's default error body (`BasicErrorController`).
fn error_response(status: StatusCode, path: &str) -> Response<SimBody> {
    let body = serde_json::json!({
        "timestamp": iso_timestamp(SystemTime::now()),
        "status": status.as_u16(),
        "error": status.canonical_reason().unwrap_or(""),
        "path": path,
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(SimBody::full(body.to_string()))
        .expect("valid error response")
}

/// `2024-05-01T12:00:00.123+00:00`, the form Spring's error timestamps take.
fn iso_timestamp(at: SystemTime) -> String {
    let t = crate::civil::Civil::of(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+00:00",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.millisecond
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn route(prefix: &str, ms: f64) -> SimRoute {
        SimRoute {
            path_prefix: prefix.to_string(),
            service_time_ms: Some(ms),
            distribution: None,
            cache_control: Some(format!("max-age={ms}")),
            body_bytes: None,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let cfg = SimConfig {
            routes: vec![
                route("/api/", 1.0),
                route("/api/slow/x", 3.0),
                route("/api/slow", 2.0),
            ],
            ..SimConfig::default()
        };
        assert_eq!(
            route_for(&cfg, "/api/slow/x/y").unwrap().path_prefix,
            "/api/slow/x"
        );
        assert_eq!(
            route_for(&cfg, "/api/slowish").unwrap().path_prefix,
            "/api/slow"
        );
        assert_eq!(route_for(&cfg, "/api/fast").unwrap().path_prefix, "/api/");
        assert!(route_for(&cfg, "/other").is_none());
    }

    #[test]
    fn query_overrides_size_and_delay() {
        let cfg = SimConfig {
            routes: vec![route("/api/a", 50.0)],
            ..SimConfig::default()
        };
        let plan = plan_work(&cfg, "/api/a", None).unwrap();
        assert_eq!(plan.service_time, Duration::from_millis(50));
        assert_eq!(plan.cache_control.as_deref(), Some("max-age=50"));
        let plan = plan_work(&cfg, "/api/a", Some("x=1&size=1024&delay_ms=7")).unwrap();
        assert_eq!(plan.service_time, Duration::from_millis(7));
        assert_eq!(plan.body_bytes, Some(1024));
        assert!(plan_work(&cfg, "/api/a", Some("size=lots")).is_err());
        assert!(plan_work(&cfg, "/api/a", Some("size=99999999999")).is_err());
    }

    #[test]
    fn exponential_samples_average_to_the_mean() {
        let n = 20_000;
        let total: f64 = (0..n)
            .map(|_| sample_service_time(10.0, Distribution::Exponential).as_secs_f64() * 1000.0)
            .sum();
        let mean = total / n as f64;
        assert!((9.0..11.0).contains(&mean), "mean {mean}");
        assert_eq!(
            sample_service_time(0.0, Distribution::Fixed),
            Duration::ZERO
        );
        assert_eq!(
            sample_service_time(-1.0, Distribution::Exponential),
            Duration::ZERO
        );
    }

    #[test]
    fn service_times_too_long_for_a_duration_do_not_panic() {
        let long = sample_service_time(1e300, Distribution::Fixed);
        assert!(long >= Duration::from_secs(3600), "{long:?}");
        let long = sample_service_time(f64::MAX, Distribution::Exponential);
        assert!(long >= Duration::from_secs(3600), "{long:?}");
        assert_eq!(
            sample_service_time(f64::NAN, Distribution::Fixed),
            Duration::ZERO
        );
    }

    #[test]
    fn iso_timestamps_match_spring() {
        let at = UNIX_EPOCH + Duration::from_millis(1_714_564_800_123);
        assert_eq!(iso_timestamp(at), "2024-05-01T12:00:00.123+00:00");
        assert_eq!(iso_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000+00:00");
    }
}
