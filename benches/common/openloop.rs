//! Open-loop, constant-arrival load: every request has a scheduled send time and is
//! sent then, whether or not earlier ones have been answered, and its latency counts
//! from that *scheduled* time. A target that falls behind cannot slow the generator
//! down and so hide its queueing (coordinated omission).
//!
//! A run is a [`Plan`]: a list of requests, each with its offset from the start, its
//! address and path, and how many times it is re-sent at once when answered 429 or
//! 503 (a client retrying a rejection). The result keeps every attempt of every
//! request (when it was sent, when it ended, its status), so the caller can cut the
//! run into phases and windows as it likes.
//!
//! Not here: what is sent when (the bench builds the plan), closed-loop load (that is
//! [`super::Load`]).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// One request of a plan.
#[derive(Debug, Clone)]
pub struct Planned {
    /// When to send it, from the start of the run.
    pub at: Duration,
    pub addr: SocketAddr,
    /// Path and query, e.g. `/api/checkout?ms=50`.
    pub path: String,
    /// The caller's label (e.g. the route class), carried into the [`Outcome`].
    pub kind: usize,
    /// Re-sends at once after a 429 or 503, on top of the first attempt.
    pub retries: u32,
}

/// What a run sends.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub requests: Vec<Planned>,
}

impl Plan {
    /// Adds `rate` requests per second from `from` for `length`, evenly spaced, the
    /// first `phase` (0..1) of a gap after `from`. `request(i)` makes the i-th one;
    /// its `at` is overwritten with the scheduled time.
    pub fn constant_rate(
        &mut self,
        from: Duration,
        length: Duration,
        rate: f64,
        phase: f64,
        mut request: impl FnMut(usize) -> Planned,
    ) {
        if rate <= 0.0 {
            return;
        }
        let gap = 1.0 / rate;
        let count = (length.as_secs_f64() * rate).round() as usize;
        for i in 0..count {
            let mut planned = request(i);
            planned.at = from + Duration::from_secs_f64(gap * (i as f64 + phase));
            self.requests.push(planned);
        }
    }

    /// Adds `count` requests all scheduled at `at` (a burst).
    pub fn burst(&mut self, at: Duration, count: usize, mut request: impl FnMut(usize) -> Planned) {
        for i in 0..count {
            let mut planned = request(i);
            planned.at = at;
            self.requests.push(planned);
        }
    }

    /// When the last request is scheduled.
    pub fn last_at(&self) -> Duration {
        self.requests.iter().map(|r| r.at).max().unwrap_or_default()
    }
}

/// One attempt of a request; times are offsets from the start of the run.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub sent: Duration,
    pub ended: Duration,
    /// `None`: no complete answer (timeout, refused, reset).
    pub status: Option<u16>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }

    /// Answered 429 or 503: the target turned it away.
    pub fn rejected(&self) -> bool {
        matches!(self.status, Some(429 | 503))
    }
}

/// What happened to one planned request.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: usize,
    pub scheduled: Duration,
    /// At least one; more when rejections were retried.
    pub attempts: Vec<Attempt>,
}

impl Outcome {
    /// The attempt whose answer the client kept.
    pub fn last(&self) -> &Attempt {
        self.attempts.last().expect("every outcome has an attempt")
    }

    pub fn ok(&self) -> bool {
        self.last().ok()
    }

    /// From the scheduled send time to the end of the last attempt.
    pub fn latency(&self) -> Duration {
        self.last().ended.saturating_sub(self.scheduled)
    }
}

/// An HTTP/1.1 keep-alive client for open-loop runs: a new connection whenever no
/// idle one is free, as many as the load needs.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        // Below every target's idle timeout, so a pooled connection is rarely reused
        // just as the server closes it.
        .pool_idle_timeout(Duration::from_secs(3))
        .build(connector)
}

/// Runs `plan` on the current runtime from `start` (which may be a little in the
/// future, so the first requests are not late). Each attempt gets `timeout`; the
/// outcomes come back in plan order once every request has ended.
pub async fn run(plan: &Plan, start: Instant, timeout: Duration) -> Vec<Outcome> {
    let client = client();
    let mut order: Vec<usize> = (0..plan.requests.len()).collect();
    order.sort_by_key(|&i| plan.requests[i].at);
    let mut tasks = Vec::with_capacity(order.len());
    // One dispatcher sends every request at its time; a dispatcher running late makes
    // the latency of the late requests longer, as it should.
    for i in order {
        let planned = plan.requests[i].clone();
        tokio::time::sleep_until(start + planned.at).await;
        let client = client.clone();
        tasks.push((
            i,
            tokio::spawn(async move { send(&client, planned, start, timeout).await }),
        ));
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; plan.requests.len()];
    for (i, task) in tasks {
        outcomes[i] = Some(task.await.expect("request task"));
    }
    outcomes
        .into_iter()
        .map(|o| o.expect("every request ran"))
        .collect()
}

async fn send(
    client: &Client<HttpConnector, Empty<Bytes>>,
    planned: Planned,
    start: Instant,
    timeout: Duration,
) -> Outcome {
    let url = format!("http://{}{}", planned.addr, planned.path);
    let mut attempts = Vec::with_capacity(1);
    loop {
        let sent = start.elapsed();
        let request = Request::get(url.as_str())
            .body(Empty::new())
            .expect("valid request");
        let exchange = async {
            let response = client.request(request).await.ok()?;
            let status = response.status().as_u16();
            response.into_body().collect().await.ok()?;
            Some(status)
        };
        let status = tokio::time::timeout(timeout, exchange).await.ok().flatten();
        let attempt = Attempt {
            sent,
            ended: start.elapsed(),
            status,
        };
        attempts.push(attempt);
        if !attempt.rejected() || attempts.len() > planned.retries as usize {
            break;
        }
    }
    Outcome {
        kind: planned.kind,
        scheduled: planned.at,
        attempts,
    }
}
