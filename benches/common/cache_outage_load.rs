//! The load of the cache bench's stale-on-error row: closed-loop HTTP/1.1 over a set of
//! paths, every request kept with its send time, latency and what it got (a fresh
//! answer, a stale copy and why, an error), so a run can be cut into windows by send
//! time afterwards: the origin up, down, back.
//!
//! Not here: the origin, the proxies and the table (`cache_outage.rs`); load that keeps
//! no times (`common::Load`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::common;

/// A request without a whole answer after this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What one request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// A 2xx or 304 not marked stale: a fresh hit or the origin's answer.
    Fresh,
    /// A 2xx or 304 served from a stale copy because the origin failed: loadgate's
    /// `Cache-Status` says `detail=stale-if-error`, nginx's `$upstream_cache_status`
    /// is STALE.
    StaleOnError,
    /// A stale copy served while another request revalidates the entry (nginx's
    /// UPDATING, loadgate's `detail=stale-while-revalidate`): nginx does this with the
    /// origin up too, as `proxy_cache_use_stale updating` allows.
    StaleWhileUpdating,
    /// Any other status.
    Status(u16),
    /// Refused, reset, closed or timed out.
    NoAnswer,
}

/// One request of a run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was sent, from the start of the run.
    pub sent: Duration,
    pub latency_us: u32,
    pub got: Got,
}

/// What an answer was, from its status and the proxy's cache-status header.
pub fn got(status: StatusCode, headers: &HeaderMap) -> Got {
    if !(status.is_success() || status == StatusCode::NOT_MODIFIED) {
        return Got::Status(status.as_u16());
    }
    let loadgate = headers
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let nginx = headers
        .get("x-cache-status")
        .map_or(&b""[..], |v| v.as_bytes());
    if loadgate.contains("detail=stale-if-error") || nginx == b"STALE" {
        Got::StaleOnError
    } else if loadgate.contains("detail=stale") || nginx == b"UPDATING" {
        Got::StaleWhileUpdating
    } else {
        Got::Fresh
    }
}

/// Closed-loop load from `start` to `end` on `connections` keep-alive connections,
/// each request for the next of `paths` in turn (one counter for all connections).
/// Returns every request, in the order they were sent.
pub async fn run(
    addr: SocketAddr,
    paths: Vec<String>,
    connections: usize,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Vec<Sample> {
    let next = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(paths);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (next, paths) = (next.clone(), paths.clone());
            tokio::spawn(async move { connection(addr, &next, &paths, start, end).await })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        // Each task stops by itself at `end`; the bound is only a safety net.
        let bound = end + REQUEST_TIMEOUT + Duration::from_secs(1);
        if let Ok(Ok(one)) = tokio::time::timeout_at(bound, task).await {
            samples.extend(one);
        }
    }
    samples.sort_by_key(|s| s.sent);
    samples
}

async fn connection(
    addr: SocketAddr,
    next: &AtomicUsize,
    paths: &[String],
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Vec<Sample> {
    let host = addr.to_string();
    let mut samples = Vec::new();
    let record = |samples: &mut Vec<Sample>, sent: tokio::time::Instant, got: Got| {
        let latency = sent.elapsed().as_micros();
        samples.push(Sample {
            sent: sent.duration_since(start),
            latency_us: u32::try_from(latency).unwrap_or(u32::MAX),
            got,
        });
    };
    tokio::time::sleep_until(start).await;
    while tokio::time::Instant::now() < end {
        let sent = tokio::time::Instant::now();
        let connected =
            tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
        let Ok(Ok(stream)) = connected else {
            record(&mut samples, sent, Got::NoAnswer);
            // Back off a little so a refused port does not turn into a busy loop.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            record(&mut samples, sent, Got::NoAnswer);
            continue;
        };
        let mut conn = std::pin::pin!(conn);
        loop {
            let sent = tokio::time::Instant::now();
            if sent >= end {
                return samples;
            }
            let path = &paths[next.fetch_add(1, Ordering::Relaxed) % paths.len()];
            let request = Request::get(path.as_str())
                .header(header::HOST, host.as_str())
                .body(Empty::new())
                .expect("valid request");
            let exchange = async {
                let response = sender.send_request(request).await?;
                let (parts, body) = response.into_parts();
                body.collect().await?;
                Ok::<Got, hyper::Error>(got(parts.status, &parts.headers))
            };
            // A request still in flight at `end` is not cut off: it may be the slow
            // one, and it was sent inside the run.
            let outcome = tokio::select! {
                biased;
                outcome = exchange => outcome.ok(),
                _ = conn.as_mut() => None,
                () = tokio::time::sleep_until(sent + REQUEST_TIMEOUT) => None,
            };
            match outcome {
                Some(got) => record(&mut samples, sent, got),
                None => {
                    record(&mut samples, sent, Got::NoAnswer);
                    break; // replace the connection
                }
            }
        }
    }
    samples
}

// ---------------------------------------------------------------------------
// Windows of a run
// ---------------------------------------------------------------------------

/// The requests sent within one window of a run.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Latency of every 2xx/304 answer, sorted.
    pub latencies_us: Vec<u32>,
    pub stale: u64,
    /// Errors by kind: `"502"`, `"no answer"`.
    pub errors: BTreeMap<String, u64>,
    pub secs: f64,
}

impl Window {
    pub fn cut(samples: &[Sample], from: Duration, to: Duration) -> Window {
        let mut window = Window {
            secs: to.saturating_sub(from).as_secs_f64(),
            ..Window::default()
        };
        for sample in samples.iter().filter(|s| s.sent >= from && s.sent < to) {
            match sample.got {
                Got::Fresh | Got::StaleOnError | Got::StaleWhileUpdating => {
                    window.latencies_us.push(sample.latency_us);
                    window.stale += u64::from(sample.got != Got::Fresh);
                }
                Got::Status(code) => *window.errors.entry(code.to_string()).or_default() += 1,
                Got::NoAnswer => *window.errors.entry("no answer".to_string()).or_default() += 1,
            }
        }
        window.latencies_us.sort_unstable();
        window
    }

    pub fn errors(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.secs
    }

    pub fn p99_us(&self) -> f64 {
        common::quantile_us(&self.latencies_us, 0.99).map_or(f64::NAN, f64::from)
    }

    pub fn max_us(&self) -> f64 {
        self.latencies_us
            .last()
            .map_or(f64::NAN, |&us| f64::from(us))
    }

    /// `502 x 3, no answer x 1`, or `none`.
    pub fn error_kinds(&self) -> String {
        if self.errors.is_empty() {
            return "none".to_string();
        }
        self.errors
            .iter()
            .map(|(kind, n)| format!("{kind} x {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
