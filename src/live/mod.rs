//! The live view on the admin port: a sampler that keeps the last
//! [`HISTORY`] of per-second figures (utilisation, decisions, latency) in a ring, and
//! the endpoints that show them: `/` (a page drawing them as they come), `/live.json`,
//! `/live/stream` (Server-Sent Events, one sample a second) and `/report` (one HTML
//! file to keep). Not for alerting or long-term storage: Prometheus scrapes `/metrics`.
//!
//! ```text
//! route counters, cache lookups, latency records ─┐ once a second, on the admin runtime
//! upstream signals (admission)                    ─┴▶ Sampler ─▶ ring (15 min) ─▶ /live.json, /report
//!                                                                 └▶ watch ─▶ /live/stream ─▶ /
//! ```

pub mod latency;
mod report;
pub mod sample;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::json;
use tokio::sync::watch;

use crate::config::RouteClass;
use crate::forward::state::{Generation, Shared};
use sample::{Counts, RouteReading, Sample, Sampler, UpstreamReading};

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How far back the ring reaches: 900 samples, a few hundred KiB for a dozen routes.
pub const HISTORY: Duration = Duration::from_secs(15 * 60);
/// Samples the ring holds.
const CAPACITY: usize = (HISTORY.as_secs() / INTERVAL.as_secs()) as usize;
/// The window `/live.json` and `/report` give without `?minutes=`.
const DEFAULT_MINUTES: u64 = 5;

/// The live page, embedded: no files to deploy beside the binary.
const PAGE: &str = include_str!("page.html");

/// The body of every admin response: whole, or streamed (`/live/stream`).
pub type AdminBody = UnsyncBoxBody<Bytes, Infallible>;

/// The samples of the last [`HISTORY`], and the latest one for the streams.
pub struct Live {
    ring: Mutex<VecDeque<Arc<Sample>>>,
    latest: watch::Sender<Option<Arc<Sample>>>,
    /// `/live/stream` responses open now.
    streams: AtomicUsize,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            ring: Mutex::new(VecDeque::with_capacity(CAPACITY)),
            latest: watch::channel(None).0,
            streams: AtomicUsize::new(0),
        }
    }
}

impl Live {
    /// Adds a sample, dropping the oldest past [`HISTORY`], and pushes it to the streams.
    pub fn push(&self, sample: Sample) {
        let sample = Arc::new(sample);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            if ring.len() == CAPACITY {
                ring.pop_front();
            }
            ring.push_back(sample.clone());
        }
        self.latest.send_replace(Some(sample));
    }

    /// The samples of the last `minutes`, oldest first.
    pub fn window(&self, minutes: u64) -> Vec<Arc<Sample>> {
        let wanted = (minutes.saturating_mul(60) / INTERVAL.as_secs()) as usize;
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let skip = ring.len().saturating_sub(wanted);
        ring.iter().skip(skip).cloned().collect()
    }

    /// `/live/stream` responses open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Starts the sampler task on the current runtime; it stops when `shutdown` changes
    /// or the returned handle is dropped.
    pub fn start(
        self: &Arc<Self>,
        shared: Arc<Shared>,
        shutdown: watch::Receiver<bool>,
    ) -> Sampling {
        // The first reading, the baseline the first sample counts from, is taken now:
        // requests served before the task first runs are then counted, not folded in.
        let mut sampler = Sampler::default();
        let (upstreams, routes) = readings(&shared.generation.load());
        let baseline = sampler.sample(unix_ms(SystemTime::now()), upstreams, routes);
        debug_assert!(baseline.is_none(), "the first reading is only a baseline");
        Sampling(tokio::spawn(self.clone().run(sampler, shared, shutdown)))
    }

    /// Takes a sample every [`INTERVAL`] until `shutdown` changes. Missed ticks (a busy
    /// machine) are skipped, not caught up: each sample's span says what it covers.
    async fn run(
        self: Arc<Self>,
        mut sampler: Sampler,
        shared: Arc<Shared>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let first = tokio::time::Instant::now() + INTERVAL;
        let mut tick = tokio::time::interval_at(first, INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let generation = shared.generation.load();
                    let (upstreams, routes) = readings(&generation);
                    if let Some(sample) = sampler.sample(unix_ms(SystemTime::now()), upstreams, routes) {
                        self.push(sample);
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// The sampler task, aborted when dropped (with the admin server that started it).
pub struct Sampling(tokio::task::JoinHandle<()>);

impl Drop for Sampling {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the counters and signals of a generation say now.
fn readings(generation: &Generation) -> (Vec<UpstreamReading>, Vec<RouteReading>) {
    use crate::admission::Decision as D;
    let upstreams = generation
        .upstreams
        .values()
        .map(|u| {
            let admission = &u.admission;
            let signal = admission.signal(u);
            UpstreamReading {
                name: u.name.as_str().into(),
                mode: admission.mode().as_str(),
                utilisation: signal.utilisation,
                local: signal.local,
                reported: signal.reported,
                actuator: u.config.actuator.enabled,
                source: signal.source.as_str(),
                external: signal.external,
                pool: signal.pool,
                inflight: signal.own,
                waiting: admission.queued(),
                max_workers: u.config.max_workers,
                thresholds: RouteClass::ALL.map(|class| admission.threshold(class, None)),
            }
        })
        .collect();
    let routes = generation
        .routes
        .iter()
        .map(|r| {
            let c = &r.counters;
            let cache = r.http_cache.as_ref().map_or(0, |cache| {
                let l = cache.lookups();
                l.hit + l.not_modified + l.stale
            });
            RouteReading {
                name: r.name.as_str().into(),
                upstream: r.upstream.name.as_str().into(),
                class: r.class,
                threshold: r.upstream.admission.threshold(r.class, r.threshold),
                counts: Counts {
                    admitted: c.get(D::Admitted),
                    shed: c.get(D::Shed),
                    queued: c.get(D::Queued),
                    rejected: c.get(D::QueueTimeout) + c.get(D::QueueFull),
                    cache,
                    would_shed: c.get(D::WouldShed) + c.get(D::WouldReject),
                    would_queue: c.get(D::WouldQueue),
                },
                latency: r.latency.snapshot(),
            }
        })
        .collect();
    (upstreams, routes)
}

/// Answers the live view's paths; `None` for any other request (the admin's own).
pub fn route<B>(
    live: &Arc<Live>,
    shared: &Shared,
    req: &Request<B>,
    shutdown: &watch::Receiver<bool>,
) -> Option<Response<AdminBody>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    let window = || minutes(req.uri().query());
    Some(match req.uri().path() {
        "/" => whole(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/live.json" => match window() {
            Ok(minutes) => live_json(live, minutes),
            Err(why) => whole(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", why),
        },
        "/live/stream" => stream(live.clone(), shutdown.clone()),
        "/report" => match window() {
            Ok(minutes) => {
                let now = SystemTime::now();
                let samples = live.window(minutes);
                let html = report::render(&shared.generation.load(), &samples, minutes, now);
                let mut response = whole(StatusCode::OK, "text/html; charset=utf-8", html);
                let name = format!(
                    "attachment; filename=\"loadgate-report-{}.html\"",
                    report::stamp(now)
                );
                let value = HeaderValue::from_str(&name).expect("an ASCII file name");
                response
                    .headers_mut()
                    .insert(header::CONTENT_DISPOSITION, value);
                response
            }
            Err(why) => whole(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", why),
        },
        _ => return None,
    })
}

/// `?minutes=N` (1 ..= 15), default [`DEFAULT_MINUTES`].
fn minutes(query: Option<&str>) -> Result<u64, &'static str> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("minutes="))
    else {
        return Ok(DEFAULT_MINUTES);
    };
    match value.parse::<u64>() {
        Ok(n) if (1..=HISTORY.as_secs() / 60).contains(&n) => Ok(n),
        _ => Err("minutes must be a whole number from 1 to 15\n"),
    }
}

/// `/live.json`: the samples of the window, oldest first.
fn live_json(live: &Live, minutes: u64) -> Response<AdminBody> {
    let samples: Vec<_> = live.window(minutes).iter().map(|s| s.to_json()).collect();
    let body = json!({
        "interval_ms": INTERVAL.as_millis() as u64,
        "history_minutes": HISTORY.as_secs() / 60,
        "minutes": minutes,
        "streams": live.streams(),
        "samples": samples,
    });
    let mut text = serde_json::to_vec(&body).expect("a JSON value serializes");
    text.push(b'\n');
    whole(StatusCode::OK, "application/json", text)
}

/// Counts an open `/live/stream` response until it is dropped: when the client goes
/// away (hyper drops the response body with its connection) or the stream ends.
struct StreamOpen(Arc<Live>);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `/live/stream`: Server-Sent Events, the latest sample at once and each new one as it
/// is taken, as `event: sample` with the sample's JSON on one `data:` line. The body
/// polls a watch channel itself (no task per client), so a client that leaves takes its
/// stream with it; the stream ends when the proxy shuts down.
fn stream(live: Arc<Live>, shutdown: watch::Receiver<bool>) -> Response<AdminBody> {
    live.streams.fetch_add(1, Ordering::Relaxed);
    let open = StreamOpen(live.clone());
    let mut samples = live.latest.subscribe();
    // The latest sample goes out first, unless there is none yet.
    samples.mark_changed();
    let state = (samples, shutdown, open, true);
    let events = futures_util::stream::unfold(
        state,
        |(mut samples, mut shutdown, open, first)| async move {
            let text = if first {
                // Tells EventSource how soon to reconnect after a dropped connection.
                "retry: 2000\n\n".to_string()
            } else {
                loop {
                    tokio::select! {
                        changed = samples.changed() => {
                            changed.ok()?;
                            let sample = samples.borrow_and_update().clone();
                            if let Some(sample) = sample {
                                break format!("event: sample\ndata: {}\n\n", sample.to_json());
                            }
                        }
                        _ = shutdown.changed() => return None,
                    }
                }
            };
            let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(text)));
            Some((frame, (samples, shutdown, open, false)))
        },
    );
    let mut response = Response::new(StreamBody::new(events).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Asks a buffering proxy in between (nginx) to pass each event on at once.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn whole(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64) -> Sample {
        Sample {
            at_ms,
            span_ms: 1000,
            upstreams: Vec::new(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn the_ring_keeps_the_last_fifteen_minutes_and_windows_end_now() {
        let live = Live::default();
        for i in 0..(CAPACITY as u64 + 100) {
            live.push(sample(i * 1000));
        }
        let all = live.window(15);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].at_ms, 100_000, "the oldest 100 were dropped");
        let last = live.window(1);
        assert_eq!(last.len(), 60);
        assert_eq!(last[59].at_ms, (CAPACITY as u64 + 99) * 1000);
        assert_eq!(live.window(60).len(), CAPACITY);
    }

    #[test]
    fn minutes_default_to_five_and_stay_within_the_history() {
        assert_eq!(minutes(None), Ok(5));
        assert_eq!(minutes(Some("x=1&minutes=12")), Ok(12));
        assert!(minutes(Some("minutes=0")).is_err());
        assert!(minutes(Some("minutes=16")).is_err());
        assert!(minutes(Some("minutes=two")).is_err());
    }
}
