//! The admin plane, on its own listener (loopback by default): `/metrics`,
//! `/healthz`, `/readyz` and `/status`. Nothing here is reachable from the data port.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Decision;
use crate::forward::state::Shared;
use crate::metrics::Label as _;

/// Serves the admin endpoints until shutdown; also runs the metrics upkeep.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let prometheus = crate::metrics::handle();
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(route(&shared, req)) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            _ = upkeep.tick() => prometheus.run_upkeep(),
            _ = shutdown.changed() => break,
        }
    }
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => {
            for upstream in shared.generation.load().upstreams.values() {
                upstream.publish_gauges();
            }
            let mut response = text(StatusCode::OK, &crate::metrics::handle().render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readyz(shared),
        "/status" => json_response(StatusCode::OK, &status(shared)),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz, /readyz or /status\n",
        ),
    }
}

/// Ready when the config is loaded, the proxy is not draining and every upstream
/// has a backend that passed its health check.
fn readyz(shared: &Shared) -> Response<Full<Bytes>> {
    if shared.draining.load(Ordering::Relaxed) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reasons": ["draining"]}),
        );
    }
    let generation = shared.generation.load();
    let reasons: Vec<String> = generation
        .upstreams
        .values()
        .filter(|u| !u.is_ready())
        .map(|u| format!("upstream {:?} has no healthy backend yet", u.name))
        .collect();
    if reasons.is_empty() {
        json_response(StatusCode::OK, &json!({"ready": true}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reasons": reasons}),
        )
    }
}

/// The `/status` document: routes, upstreams with their backends and in-flight counts.
pub fn status(shared: &Shared) -> serde_json::Value {
    let generation = shared.generation.load();
    let routes: Vec<_> = generation
        .routes
        .iter()
        .map(|r| {
            let c = &r.counters;
            let mut route = json!({
                "name": r.name,
                "path_prefix": r.path_prefix(),
                "upstream": r.upstream.name,
                "class": r.class.as_str(),
                "threshold": r.upstream.admission.threshold(r.class, r.threshold),
                "cache": matches!(r.cache, crate::config::CachePolicy::On),
                "cache_stats": r.http_cache.as_ref().map(cache_status),
                // Both ways the critical queue refuses, together.
                "queue_rejected": c.get(Decision::QueueTimeout) + c.get(Decision::QueueFull),
            });
            // One field per admission decision, from the counters behind the metric.
            for (decision, count) in c.values() {
                route[decision.as_str()] = count.into();
            }
            route
        })
        .collect();
    let upstreams: Vec<_> = generation
        .upstreams
        .values()
        .map(|u| {
            let inflight = u.inflight();
            let admission = &u.admission;
            let backends: Vec<_> = u
                .backends()
                .iter()
                .zip(admission.reports())
                .map(|(b, report)| {
                    let now = tokio::time::Instant::now();
                    let age = report
                        .latest()
                        .map(|r| now.saturating_duration_since(r.at).as_millis() as u64);
                    json!({
                        "address": b.authority,
                        "healthy": b.is_healthy(),
                        "health_confirmed": b.is_confirmed_healthy(),
                        "inflight": b.inflight(),
                        "actuator": {
                            "enabled": u.config.actuator.enabled,
                            "good_polls": report.good_polls(),
                            "failed_polls": report.failed_polls(),
                            "last_error": report.last_error(),
                            "busy": report.latest().map(|r| r.busy),
                            "max": report.latest().map(|r| r.max),
                            "own_at_sample": report.latest().map(|r| r.own),
                            "report_age_ms": age,
                            "external": report.external_now(now),
                        },
                    })
                })
                .collect();
            let signal = admission.signal(u);
            json!({
                "name": u.name,
                "inflight": inflight,
                "max_workers": u.config.max_workers,
                "ready": u.is_ready(),
                "shedding": {
                    "mode": admission.mode().as_str(),
                    "active": admission.is_shedding(),
                    "utilisation": signal.utilisation,
                    "source": signal.source.as_str(),
                    "local": signal.local,
                    "external": signal.external,
                    "pool": signal.pool,
                    "room": signal.room,
                    "reported": signal.reported,
                    "adaptive_limit": admission.adaptive_limit(),
                    "queued": admission.queued(),
                },
                "backends": backends,
            })
        })
        .collect();
    json!({
        "draining": shared.draining.load(Ordering::Relaxed),
        "routes": routes,
        "upstreams": upstreams,
    })
}

/// A route cache's part of `/status`: its fill, evictions and lookups by result.
fn cache_status(cache: &crate::cache::Cache) -> serde_json::Value {
    let stats = cache.stats();
    json!({
        "bytes": stats.bytes,
        "max_bytes": cache.settings().max_bytes,
        "objects": stats.objects,
        "evictions": stats.evictions,
        "lookups": cache.lookups(),
    })
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).expect("a JSON value serializes");
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
