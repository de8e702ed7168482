//! The backend a load bench puts under a proxy: a real Tomcat 10 when Debian's
//! `tomcat10` is installed, otherwise loadgate's simulated Tomcat, both with a fixed
//! worker pool and `/api/...` endpoints that hold a worker for a requested time.
//! Also: its utilisation (busy workers / pool) read while the load runs, and a way
//! back to an idle backend between runs.
//!
//! Not here: proxies or load (the bench puts those in front).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loadgate::sim::{SimBackend, SimConfig, SimStats};
use tokio::time::Instant;

use super::tomcat::Tomcat;

/// Which backend to run: `LOADGATE_BENCH_BACKEND` = `auto` (Tomcat when installed,
/// the default), `tomcat` or `sim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Tomcat,
    Sim,
}

impl Choice {
    pub fn from_env() -> Choice {
        match std::env::var("LOADGATE_BENCH_BACKEND").ok().as_deref() {
            None | Some("" | "auto") => Choice::Auto,
            Some("tomcat") => Choice::Tomcat,
            Some("sim") => Choice::Sim,
            Some(other) => {
                eprintln!("LOADGATE_BENCH_BACKEND={other:?}: expected auto, tomcat or sim");
                std::process::exit(2);
            }
        }
    }
}

/// A running backend with `workers` workers.
pub struct Backend {
    workers: usize,
    inner: Inner,
}

enum Inner {
    /// The simulated backend on a runtime of its own; the actuator on the main port,
    /// so actuator requests take a worker as they do on Tomcat.
    Sim {
        backend: Option<SimBackend>,
        runtime: tokio::runtime::Runtime,
    },
    /// `None` only while it is being replaced.
    Tomcat(Option<Tomcat>),
}

impl Backend {
    /// Starts the backend `choice` asks for. `None` only when `Choice::Tomcat` was
    /// asked and Tomcat is not installed (the reason is printed).
    pub fn start(choice: Choice, workers: usize) -> Option<Backend> {
        if choice != Choice::Sim {
            if let Some(tomcat) = Tomcat::start(workers) {
                return Some(Backend {
                    workers,
                    inner: Inner::Tomcat(Some(tomcat)),
                });
            }
            if choice == Choice::Tomcat {
                return None;
            }
            println!("Tomcat is not installed: the simulated backend stands in for it.");
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("sim runtime");
        let backend = Some(start_sim(&runtime, workers));
        Some(Backend {
            workers,
            inner: Inner::Sim { backend, runtime },
        })
    }

    pub fn is_tomcat(&self) -> bool {
        matches!(self.inner, Inner::Tomcat(_))
    }

    /// What the tables call it.
    pub fn label(&self) -> &'static str {
        match self.inner {
            Inner::Sim { .. } => {
                "simulated Tomcat (loadgate sim-backend, actuator on the main port)"
            }
            Inner::Tomcat(_) => "Tomcat 10 (Debian tomcat10, NIO connector)",
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match &self.inner {
            Inner::Sim { backend, .. } => backend.as_ref().expect("sim is running").addr(),
            Inner::Tomcat(tomcat) => tomcat.as_ref().expect("Tomcat is running").addr(),
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The query that makes a work request hold its worker `ms` milliseconds:
    /// Tomcat's webapp reads `ms`, the simulated backend `delay_ms`.
    pub fn work_query(&self, ms: u64) -> String {
        match self.inner {
            Inner::Sim { .. } => format!("delay_ms={ms}"),
            Inner::Tomcat(_) => format!("ms={ms}"),
        }
    }

    /// Reads the busy workers while load runs (see [`BusyProbe`]).
    pub fn probe(&self) -> BusyProbe {
        match &self.inner {
            Inner::Sim { backend, .. } => {
                BusyProbe::Sim(backend.as_ref().expect("sim is running").stats())
            }
            Inner::Tomcat(_) => BusyProbe::Actuator {
                addr: self.addr(),
                client: Box::new(Client::builder(TokioExecutor::new()).build_http()),
            },
        }
    }

    /// Waits up to `within` for the backend to be idle (no worker busy, nothing
    /// queued: what an earlier run left behind has drained). If it is not, replaces it
    /// with a fresh one. Returns true when it had to replace it.
    pub fn settle_or_restart(&mut self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        let probe = self.probe();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("settle runtime");
        while std::time::Instant::now() < deadline {
            if runtime.block_on(probe.idle()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(runtime);
        match &mut self.inner {
            Inner::Sim { backend, runtime } => {
                drop(backend.take());
                *backend = Some(start_sim(runtime, self.workers));
            }
            Inner::Tomcat(tomcat) => {
                // The old JVM stops first: its backlog would compete for the CPU.
                drop(tomcat.take());
                *tomcat = Some(Tomcat::start(self.workers).expect("Tomcat ran a moment ago"));
            }
        }
        true
    }
}

fn start_sim(runtime: &tokio::runtime::Runtime, workers: usize) -> SimBackend {
    runtime
        .block_on(SimBackend::start(SimConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            management_listen: None,
            workers,
            service_time_ms: 50.0,
            // Tomcat's keep-alive rules as the stock server.xml has them (20 s, 100 requests).
            ..SimConfig::default()
        }))
        .expect("sim backend starts")
}

/// A Tomcat probe answered this late waited for a thread (it normally takes 1-2 ms).
const QUEUED: Duration = Duration::from_millis(20);

/// Reads a backend's busy workers: the simulated backend's own counter, or Tomcat's
/// `/actuator/metrics/tomcat.threads.busy` (which takes a worker itself: one less is
/// reported, and while every worker is taken the answer waits in Tomcat's queue).
pub enum BusyProbe {
    Sim(Arc<SimStats>),
    Actuator {
        addr: SocketAddr,
        client: Box<Client<HttpConnector, Empty<Bytes>>>,
    },
}

impl BusyProbe {
    /// Busy workers other than the probe's own request; `None` when the backend did
    /// not answer within 1 s.
    pub async fn busy(&self) -> Option<usize> {
        match self {
            BusyProbe::Sim(stats) => Some(stats.busy()),
            BusyProbe::Actuator { addr, client } => {
                let url = format!("http://{addr}/actuator/metrics/tomcat.threads.busy");
                let request = Request::get(url).body(Empty::new()).expect("valid request");
                let exchange = async {
                    let response = client.request(request).await.ok()?;
                    let body = response.into_body().collect().await.ok()?.to_bytes();
                    let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
                    json["measurements"][0]["value"].as_f64()
                };
                let value = tokio::time::timeout(Duration::from_secs(1), exchange)
                    .await
                    .ok()
                    .flatten()?;
                Some((value.round() as usize).saturating_sub(1))
            }
        }
    }

    /// True when no worker is busy and nothing waits for one (for Tomcat: the probe was
    /// answered within 100 ms, so nothing was queued ahead of it).
    pub async fn idle(&self) -> bool {
        match self {
            BusyProbe::Sim(stats) => stats.busy() == 0 && stats.queued() == 0,
            BusyProbe::Actuator { .. } => {
                let asked = Instant::now();
                let busy = self.busy().await;
                busy == Some(0) && asked.elapsed() < Duration::from_millis(100)
            }
        }
    }

    /// Samples busy / `workers` every `every` until `until`, one read at a time (a
    /// read that waits in the backend's queue delays the next). Each sample is
    /// `(offset from start, utilisation)`, taken when the answer arrives.
    ///
    /// A Tomcat probe that waited [`QUEUED`] or more was queued for a thread: the pool
    /// was full from when it was sent until it was served, and the figure it brings
    /// back is read just as a thread came free, so it is biased low. Such a read is
    /// recorded as a full pool at both ends of its wait instead.
    pub async fn sample(
        &self,
        workers: usize,
        start: Instant,
        until: Instant,
        every: Duration,
    ) -> Vec<(Duration, f64)> {
        let mut samples = Vec::new();
        let mut next = start.max(Instant::now());
        while next < until {
            tokio::time::sleep_until(next).await;
            let asked = start.elapsed();
            if let Some(busy) = self.busy().await {
                let answered = start.elapsed();
                let queued =
                    matches!(self, BusyProbe::Actuator { .. }) && answered - asked >= QUEUED;
                if queued {
                    samples.push((asked, 1.0));
                    samples.push((answered, 1.0));
                } else {
                    samples.push((answered, busy as f64 / workers as f64));
                }
            }
            next = (next + every).max(Instant::now());
        }
        samples
    }
}
