//! The admin plane, on its own listener (loopback by default): `/metrics`,
//! `/healthz`, `/readyz` and `/status`, and the live view (`live/`: `/`, `/live.json`,
//! `/live/stream`, `/report`). Nothing here is reachable from the data port.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Decision;
use crate::forward::state::Shared;
use crate::metrics::Label as _;

/// How long an admin connection may take to send a request head. hyper's timer also
/// runs while a keep-alive connection waits for its next request, so an admin
/// connection idle this long is closed too; scrapers reconnect.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves the admin endpoints until shutdown; also runs the metrics upkeep. The live
/// view's sampler starts (and takes its first reading) when this is called, not when the
/// returned future is first polled, so no request served before then is missed.
pub fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let live = Arc::new(crate::live::Live::default());
    let sampler = live.start(shared.clone(), shutdown.clone());
    async move {
        serve_with(listener, shared, shutdown, HEADER_READ_TIMEOUT, live).await;
        drop(sampler);
    }
}

/// [`serve`], with the header read timeout as a parameter (tests shorten it).
async fn serve_with(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    header_read_timeout: Duration,
    live: Arc<crate::live::Live>,
) {
    let prometheus = crate::metrics::handle();
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let mut failures = AcceptFailures::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        let (wait, news) = failures.on_error(error.kind());
                        if news {
                            tracing::warn!(%error, retry_in = ?wait,
                                "admin accept failed; backing off until it succeeds");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            _ = shutdown.changed() => break,
                        }
                        continue;
                    }
                };
                if let Some(failed) = failures.on_accept() {
                    tracing::info!(failed, "admin accepting again");
                }
                let shared = shared.clone();
                let asked = Arc::new(AtomicBool::new(false));
                let (live, stopping) = (live.clone(), shutdown.clone());
                let service = service_fn({
                    let asked = asked.clone();
                    move |req| {
                        asked.store(true, Ordering::Relaxed);
                        let shared = shared.clone();
                        let live = crate::live::route(&live, &shared, &req, &stopping);
                        async move {
                            Ok::<_, Infallible>(live.unwrap_or_else(|| {
                                route(&shared, req).map(http_body_util::BodyExt::boxed_unsync)
                            }))
                        }
                    }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                tokio::spawn(serve_connection(connection, asked, header_read_timeout));
            }
            _ = upkeep.tick() => prometheus.run_upkeep(),
            _ = shutdown.changed() => break,
        }
    }
}

/// Runs one admin connection. hyper's header timer covers each HTTP/1 request head
/// once hyper knows the connection is HTTP/1; before that, while the first bytes
/// decide between HTTP/1 and h2c (a stalled `PRI * HTTP/2.0` preface, say), nothing
/// would, so a connection that has not made a first request within the header read
/// timeout is closed here.
async fn serve_connection<C>(connection: C, asked: Arc<AtomicBool>, header_read_timeout: Duration)
where
    C: std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = tokio::time::sleep(header_read_timeout) => {
            if !asked.load(Ordering::Relaxed) {
                tracing::debug!("admin connection sent no request in time; closing it");
                return;
            }
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "admin connection ended with an error");
    }
}

/// The accept loop's failure state: how long to wait before the next accept, and
/// whether a failure is news worth a log line (the first of a run, or a different
/// kind than the one before), so running out of file descriptors logs once, not
/// a thousand times a second.
#[derive(Debug, Default)]
struct AcceptFailures {
    /// The wait after the last failure; `None` while accepts succeed.
    wait: Option<Duration>,
    /// The kind of the current run of failures.
    kind: Option<std::io::ErrorKind>,
    /// Failures in the current run.
    count: u64,
}

impl AcceptFailures {
    /// A failed accept: the wait before the next one (10 ms, doubling to 1 s) and
    /// whether to log it.
    fn on_error(&mut self, kind: std::io::ErrorKind) -> (Duration, bool) {
        let wait = self.wait.map_or(ACCEPT_BACKOFF_MIN, |wait| {
            (wait * 2).min(ACCEPT_BACKOFF_MAX)
        });
        self.wait = Some(wait);
        self.count += 1;
        let news = self.kind != Some(kind);
        self.kind = Some(kind);
        (wait, news)
    }

    /// A successful accept: resets the backoff; `Some(failures)` when it ends a run.
    fn on_accept(&mut self) -> Option<u64> {
        let failed = std::mem::take(&mut self.count);
        self.wait = None;
        self.kind = None;
        (failed > 0).then_some(failed)
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
            let mut body = crate::metrics::handle().render();
            // Read from /proc now: a scrape shows the process as it is.
            crate::metrics::process::render(&mut body);
            let mut response = text(StatusCode::OK, &body);
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

/// `/readyz`: 200 or 503 by [`readiness`], with a JSON body listing every upstream that
/// has no healthy backend and whether that counts against readiness.
fn readyz(shared: &Shared) -> Response<Full<Bytes>> {
    let draining = shared.draining.load(Ordering::Relaxed);
    let generation = shared.generation.load();
    let policy = &generation.config.server.readiness;
    let standings: Vec<Standing> = generation
        .upstreams
        .values()
        .map(|u| Standing {
            name: &u.name,
            can_serve: u.is_ready(),
            required: policy.requires(&u.name),
        })
        .collect();
    let verdict = readiness(draining, &standings);
    let mut reasons: Vec<String> = Vec::new();
    if draining {
        reasons.push("draining".to_string());
    }
    reasons.extend(verdict.down.iter().filter(|d| d.counts).map(Down::why));
    let down: Vec<_> = verdict
        .down
        .iter()
        .map(|d| {
            json!({
                "upstream": d.name,
                "required_for_readiness": d.required,
                "counts": d.counts,
                "why": d.why(),
            })
        })
        .collect();
    if verdict.ready {
        json_response(StatusCode::OK, &json!({"ready": true, "down": down}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reasons": reasons, "down": down}),
        )
    }
}

/// One upstream as readiness weighs it.
#[derive(Debug, Clone, Copy)]
struct Standing<'a> {
    name: &'a str,
    /// A backend has passed its health check (or checks are off).
    can_serve: bool,
    /// `required_for_readiness = true`.
    required: bool,
}

/// An upstream that cannot serve, and whether that makes the proxy unready.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Down<'a> {
    name: &'a str,
    required: bool,
    counts: bool,
}

impl Down<'_> {
    /// What `/readyz` says about it.
    fn why(&self) -> String {
        let name = self.name;
        match (self.counts, self.required) {
            (true, true) => format!(
                "upstream {name:?} has no healthy backend, and it is required for readiness \
                 (required_for_readiness = true)"
            ),
            (true, false) => {
                format!("upstream {name:?} has no healthy backend, and no upstream has one")
            }
            (false, _) => format!(
                "upstream {name:?} has no healthy backend; not counted: it is not \
                 required_for_readiness and another upstream can serve"
            ),
        }
    }
}

/// Whether the proxy is ready, and every upstream that cannot serve.
#[derive(Debug, PartialEq, Eq)]
struct Verdict<'a> {
    ready: bool,
    down: Vec<Down<'a>>,
}

/// The readiness rule, pure: the proxy is ready unless it is draining, an upstream with
/// `required_for_readiness` cannot serve, or no upstream can. One rule for both roles:
/// a sidecar's only upstream down leaves nothing to serve (not ready, so Kubernetes
/// stops sending); an edge proxy with one upstream of several down still serves the
/// others (ready, the down one listed as not counted).
fn readiness<'a>(draining: bool, upstreams: &[Standing<'a>]) -> Verdict<'a> {
    let none_can_serve = !upstreams.iter().any(|u| u.can_serve);
    let down: Vec<Down> = upstreams
        .iter()
        .filter(|u| !u.can_serve)
        .map(|u| Down {
            name: u.name,
            required: u.required,
            counts: u.required || none_can_serve,
        })
        .collect();
    Verdict {
        ready: !draining && !down.iter().any(|d| d.counts),
        down,
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
                "required_for_readiness": generation.config.server.readiness.requires(&u.name),
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
        "coalesced_waiting": cache.coalesced_waiting(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::forward::state::Generation;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn shared() -> Arc<Shared> {
        let config = Config::parse(
            r#"[[route]]
name = "all"
path_prefix = "/"
upstream = "app"
[[upstream]]
name = "app"
backends = ["127.0.0.1:9"]
[upstream.health]
enabled = false
"#,
            "admin-test.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Arc::new(Shared::new(Generation::build(config, None)))
    }

    #[tokio::test]
    async fn half_a_request_head_is_cut_after_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stopped) = watch::channel(false);
        let timeout = Duration::from_millis(200);
        let live = Arc::new(crate::live::Live::default());
        tokio::spawn(serve_with(listener, shared(), stopped, timeout, live));

        // Half an HTTP/1 head, and the start of an h2c preface (still undecided
        // between HTTP/1 and HTTP/2).
        let halves: [&[u8]; 2] = [b"GET /healthz HTTP/1.1\r\nHost: admin\r\n", b"PRI * HTTP/2"];
        for half in halves {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(half).await.unwrap();
            let started = tokio::time::Instant::now();
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the admin port kept {:?} open for 5 s",
                        String::from_utf8_lossy(half)
                    )
                });
            // Closed (EOF, or reset by the server), never answered.
            assert!(read.map_or(true, |_| !rest.starts_with(b"HTTP/1.1 200")));
            assert!(started.elapsed() >= timeout, "closed before the timeout");
        }

        // A whole request in time is still answered.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }

    #[test]
    fn readiness_needs_every_required_upstream_and_at_least_one() {
        const fn up(name: &'static str) -> Standing<'static> {
            Standing {
                name,
                can_serve: true,
                required: false,
            }
        }
        const fn down(name: &'static str) -> Standing<'static> {
            Standing {
                can_serve: false,
                ..up(name)
            }
        }
        const fn required(standing: Standing<'static>) -> Standing<'static> {
            Standing {
                required: true,
                ..standing
            }
        }
        /// What, draining, the upstreams, ready, and the down ones with whether they count.
        type Case = (
            &'static str,
            bool,
            &'static [Standing<'static>],
            bool,
            &'static [(&'static str, bool)],
        );
        const CASES: &[Case] = &[
            ("sidecar up", false, &[up("app")], true, &[]),
            (
                "sidecar down",
                false,
                &[down("app")],
                false,
                &[("app", true)],
            ),
            (
                "sidecar down, required",
                false,
                &[required(down("app"))],
                false,
                &[("app", true)],
            ),
            (
                "edge, one down",
                false,
                &[up("shop"), down("reports")],
                true,
                &[("reports", false)],
            ),
            (
                "edge, all down",
                false,
                &[down("shop"), down("reports")],
                false,
                &[("shop", true), ("reports", true)],
            ),
            (
                "edge, a required one down",
                false,
                &[up("shop"), required(down("reports"))],
                false,
                &[("reports", true)],
            ),
            (
                "edge, a required one up",
                false,
                &[down("shop"), required(up("pay"))],
                true,
                &[("shop", false)],
            ),
            ("draining", true, &[up("app")], false, &[]),
        ];
        for &(what, draining, upstreams, ready, expected) in CASES {
            let verdict = readiness(draining, upstreams);
            assert_eq!(verdict.ready, ready, "{what}");
            let counted: Vec<(&str, bool)> =
                verdict.down.iter().map(|d| (d.name, d.counts)).collect();
            assert_eq!(counted, expected, "{what}");
        }
    }

    #[tokio::test]
    async fn readyz_is_503_while_draining_whatever_the_upstreams() {
        use http_body_util::BodyExt;
        let shared = shared();
        let body = |response: Response<Full<Bytes>>| async move {
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (status, json)
        };
        // Health checks are off: the upstream can serve.
        let (status, json) = body(readyz(&shared)).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(json, json!({"ready": true, "down": []}));
        shared.draining.store(true, Ordering::Relaxed);
        let (status, json) = body(readyz(&shared)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(
            json,
            json!({"ready": false, "reasons": ["draining"], "down": []})
        );
    }

    #[test]
    fn accept_failures_back_off_doubling_to_a_second_and_log_each_change_once() {
        use std::io::ErrorKind::{ConnectionAborted, Other};
        let ms = |d: Duration| d.as_millis();
        let mut failures = AcceptFailures::default();
        let (wait, news) = failures.on_error(Other);
        assert_eq!((ms(wait), news), (10, true));
        let waits: Vec<_> = (0..8).map(|_| failures.on_error(Other)).collect();
        assert_eq!(
            waits.iter().map(|(w, _)| ms(*w)).collect::<Vec<_>>(),
            [20, 40, 80, 160, 320, 640, 1000, 1000]
        );
        assert!(waits.iter().all(|(_, news)| !news), "logged once per run");
        assert_eq!(
            failures.on_error(ConnectionAborted),
            (ACCEPT_BACKOFF_MAX, true)
        );
        assert_eq!(failures.on_accept(), Some(10));
        assert_eq!(failures.on_accept(), None);
        assert_eq!(failures.on_error(Other), (ACCEPT_BACKOFF_MIN, true));
    }
}
