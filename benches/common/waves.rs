//! Bursty load with idle gaps: every connection sends one request at the same
//! moment (a wave), all wait for their answers, then all pause for a random time
//! before the next wave. Pauses near a backend's keep-alive timeout make a proxy
//! reuse pooled connections just as the backend closes them.
//!
//! Not here: steady load (that is [`super::Load`], which can run beside this).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::time::Instant;

use super::LoadResult;

/// One kind of request a wave sends.
#[derive(Debug, Clone)]
pub struct WaveRequest {
    pub method: Method,
    pub path: String,
    /// Sent with `Content-Length`; empty means no body.
    pub body: &'static str,
}

/// Waves of `connections` simultaneous requests; connection `i` always sends
/// `requests[i % requests.len()]`. Between waves a pause drawn uniformly from
/// `pause` (inclusive bounds). Measured like [`super::Load`]: requests sent after
/// `warmup` and finished within `duration`.
#[derive(Debug, Clone)]
pub struct Waves {
    pub addr: SocketAddr,
    pub connections: usize,
    pub requests: Vec<WaveRequest>,
    pub pause: (Duration, Duration),
    pub warmup: Duration,
    pub duration: Duration,
    /// A request without a complete response after this long counts as an error.
    pub request_timeout: Duration,
}

/// What a wave run measured, per request kind (same order as [`Waves::requests`]).
#[derive(Debug, Clone, Default)]
pub struct WavesResult {
    pub by_kind: Vec<LoadResult>,
    /// Waves started in the measured window.
    pub waves: u64,
}

impl Waves {
    /// Runs on the current runtime until `warmup + duration` has passed.
    pub async fn run(&self) -> WavesResult {
        assert!(!self.requests.is_empty(), "waves need a request");
        let start = Instant::now();
        let measure_from = start + self.warmup;
        let end = measure_from + self.duration;
        let barrier = Arc::new(Barrier::new(self.connections + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..self.connections)
            .map(|i| {
                let waves = self.clone();
                let kind = waves.requests[i % waves.requests.len()].clone();
                let (barrier, stop) = (barrier.clone(), stop.clone());
                tokio::spawn(async move {
                    waves
                        .connection(&kind, &barrier, &stop, measure_from, end)
                        .await
                })
            })
            .collect();

        let mut waves = 0;
        let mut rng = rand::rngs::StdRng::from_entropy();
        loop {
            let now = Instant::now();
            if now >= end {
                stop.store(true, Ordering::SeqCst);
                barrier.wait().await; // releases the connections to see `stop`
                break;
            }
            if now >= measure_from {
                waves += 1;
            }
            barrier.wait().await; // start of the wave
            barrier.wait().await; // every connection has its answer (or gave up)
            let (lo, hi) = self.pause;
            let pause = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
            tokio::time::sleep(pause).await;
        }

        let mut result = WavesResult {
            by_kind: vec![
                LoadResult {
                    duration: self.duration,
                    ..LoadResult::default()
                };
                self.requests.len()
            ],
            waves,
        };
        for (i, task) in tasks.into_iter().enumerate() {
            let kind = &mut result.by_kind[i % self.requests.len()];
            match tokio::time::timeout(self.request_timeout + Duration::from_secs(1), task).await {
                Ok(Ok(one)) => {
                    kind.latencies_us.extend_from_slice(&one.latencies_us);
                    kind.errors += one.errors;
                }
                _ => kind.errors += 1,
            }
        }
        for kind in &mut result.by_kind {
            kind.latencies_us.sort_unstable();
        }
        result
    }

    /// One connection: per wave, one request; a connection that broke or that the
    /// peer closed while idle is replaced before the next request (the latter is
    /// not an error: a client sees the close and reconnects).
    async fn connection(
        &self,
        kind: &WaveRequest,
        barrier: &Barrier,
        stop: &AtomicBool,
        measure_from: Instant,
        end: Instant,
    ) -> LoadResult {
        let mut out = LoadResult::default();
        let host = self.addr.to_string();
        let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
        loop {
            barrier.wait().await;
            if stop.load(Ordering::SeqCst) {
                return out;
            }
            let sent = Instant::now();
            let outcome = tokio::time::timeout(self.request_timeout, async {
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    sender = Some(connect(self.addr).await?);
                }
                let tx = sender.as_mut().expect("connected");
                tx.ready().await.map_err(|e| e.to_string())?;
                let mut request = Request::builder()
                    .method(kind.method.clone())
                    .uri(kind.path.as_str())
                    .header(header::HOST, host.as_str());
                if !kind.body.is_empty() {
                    request = request.header(header::CONTENT_TYPE, "text/plain");
                }
                let request = request
                    .body(Full::new(Bytes::from_static(kind.body.as_bytes())))
                    .expect("valid request");
                let response = tx.send_request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<StatusCode, String>(status)
            })
            .await;
            let done = Instant::now();
            let measured = sent >= measure_from && done <= end;
            match outcome {
                Ok(Ok(status)) if status.is_success() => {
                    if measured {
                        let us = done.duration_since(sent).as_micros();
                        out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                }
                Ok(Ok(_)) => out.errors += u64::from(measured),
                _ => {
                    out.errors += u64::from(measured);
                    sender = None;
                }
            }
            barrier.wait().await;
        }
    }
}

/// A new HTTP/1.1 client connection whose connection task runs on its own, so a
/// close by the peer while idle is noticed (`is_closed`) before the next request.
async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}
