//! Overload: what callers see when offered load passes the backend's capacity.
//!
//! An open-loop, constant-arrival generator sends requests on schedule whether or
//! not earlier ones returned, and measures latency from the *scheduled* send time,
//! so coordinated omission cannot hide queueing. The simulated backend has a fixed
//! capacity (20 workers × 50 ms = 400 req/s). Offered load is 0.5×, 1×, 2× and 4×
//! that, a 1:4 mix of critical and sheddable requests, through:
//! - loadgate enforcing, with the default thresholds (sheddable 0.70);
//! - loadgate enforcing, with sheddable at 0.90 (band 0.10), tuned for goodput;
//! - loadgate with shedding off (plain pass-through);
//! - nginx as plain pass-through, when installed.
//!
//! Printed per target and load: goodput (2xx/s), admitted (2xx) p50/p99, shed %
//! (429), critical success %, and errors (timeouts, 5xx). Targets at 4×: goodput
//! ≥ 95% of capacity, admitted p99 ≤ 2× the p99 at 0.5×, critical success ≥ 99.9%.
//! A micro-benchmark of the admission decision (target < 1 µs) comes first.
//!
//! Run: `cargo bench --bench overload`. Settings (environment):
//! - `LOADGATE_BENCH_SECS` seconds per load level (default 5)
//! - `LOADGATE_BENCH_NGINX` path of nginx, or `off` to skip it

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loadgate::admission::Slots;
use loadgate::config::{Config, RouteClass, ShedMode};
use loadgate::server::Proxy;
use loadgate::sim::{SimBackend, SimConfig};
use tokio::time::Instant;

const WORKERS: usize = 20;
const SERVICE_MS: f64 = 50.0;
const CAPACITY: f64 = WORKERS as f64 * 1000.0 / SERVICE_MS;
const LOADS: [f64; 4] = [0.5, 1.0, 2.0, 4.0];
/// One request in this many is critical; the rest are sheddable.
const CRITICAL_EVERY: usize = 5;
/// A request unanswered after this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let secs: f64 = common::env_or("LOADGATE_BENCH_SECS", 5.0);
    let duration = Duration::from_secs_f64(secs);
    println!("## admission decision (micro-benchmark)\n");
    decision_micro_bench();

    println!(
        "\n## overload: backend capacity {CAPACITY:.0} req/s ({WORKERS} workers x {SERVICE_MS} ms), \
         {secs} s per level, 1 in {CRITICAL_EVERY} requests critical\n"
    );
    let backend_rt = runtime(1);
    let backend = backend_rt
        .block_on(SimBackend::start(SimConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: WORKERS,
            service_time_ms: SERVICE_MS,
            max_keep_alive_requests: 0,
            keep_alive_timeout_ms: 60_000,
            ..SimConfig::default()
        }))
        .expect("backend starts");

    let targets: Vec<(&str, Option<(ShedMode, f64)>)> = vec![
        (
            "loadgate enforce (defaults)",
            Some((ShedMode::Enforce, 0.70)),
        ),
        (
            "loadgate enforce (sheddable 0.90)",
            Some((ShedMode::Enforce, 0.90)),
        ),
        ("loadgate shedding off", Some((ShedMode::Off, 0.70))),
        ("nginx pass-through", None),
    ];
    let mut rows = Vec::new();
    let mut verdicts = Vec::new();
    for (name, setup) in targets {
        let proxy_rt = runtime(2);
        let (addr, _guard): (SocketAddr, Box<dyn std::any::Any>) = match setup {
            Some((mode, sheddable)) => {
                let proxy = proxy_rt
                    .block_on(Proxy::start(config(backend.addr(), mode, sheddable)))
                    .expect("proxy starts");
                (proxy.addr(), Box::new(proxy))
            }
            None => match common::nginx::start_or_skip(|dir, listen| {
                common::nginx::proxy_conf(dir, 2, listen, backend.addr())
            }) {
                Some(nginx) => (nginx.addr, Box::new(nginx)),
                None => continue,
            },
        };
        let load_rt = runtime(1);
        let mut results = Vec::new();
        for factor in LOADS {
            let result = load_rt.block_on(open_loop(addr, CAPACITY * factor, duration));
            // Let the backlog of a pass-through target drain before the next level.
            std::thread::sleep(Duration::from_millis(500));
            rows.push(result.row(name, factor, duration));
            results.push((factor, result));
        }
        verdicts.push((name, verdict(&results, duration)));
    }
    common::print_table(
        &[
            "target",
            "load",
            "goodput/s",
            "of capacity",
            "admitted p50",
            "admitted p99",
            "shed",
            "critical ok",
            "errors",
        ],
        &rows,
    );
    println!("\nTargets at 4x: goodput >= 95% of capacity, admitted p99 <= 2x the p99 at 0.5x, critical success >= 99.9%");
    for (name, verdict) in verdicts {
        println!("{name}: {verdict}");
    }
    backend_rt.block_on(backend.shutdown());
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

fn config(backend: SocketAddr, mode: ShedMode, sheddable: f64) -> Config {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[[upstream]]
name = "bench"
backends = ["{backend}"]
max_workers = {WORKERS}
[upstream.health]
enabled = false
[upstream.actuator]
enabled = false
[upstream.shedding]
mode = "{mode}"
sheddable = {sheddable}
[[route]]
name = "checkout"
path_prefix = "/api/checkout"
upstream = "bench"
class = "critical"
[[route]]
name = "reports"
path_prefix = "/api/reports"
upstream = "bench"
class = "sheddable"
"#,
        mode = mode.as_str()
    );
    Config::parse(&text, "overload bench").expect("bench config is valid")
}

#[derive(Default)]
struct LevelResult {
    sent: usize,
    ok_latencies_us: Vec<u32>,
    ok_in_window: usize,
    shed: usize,
    errors: usize,
    critical_sent: usize,
    critical_ok: usize,
}

impl LevelResult {
    fn goodput(&self, duration: Duration) -> f64 {
        self.ok_in_window as f64 / duration.as_secs_f64()
    }

    fn p(&self, q: f64) -> f64 {
        common::quantile_us(&self.ok_latencies_us, q).map_or(f64::NAN, f64::from)
    }

    fn critical_success(&self) -> f64 {
        100.0 * self.critical_ok as f64 / self.critical_sent.max(1) as f64
    }

    fn row(&self, name: &str, factor: f64, duration: Duration) -> Vec<String> {
        vec![
            name.to_string(),
            format!("{factor}x"),
            format!("{:.0}", self.goodput(duration)),
            format!("{:.1}%", 100.0 * self.goodput(duration) / CAPACITY),
            common::fmt_us(self.p(0.50)),
            common::fmt_us(self.p(0.99)),
            format!("{:.1}%", 100.0 * self.shed as f64 / self.sent.max(1) as f64),
            format!("{:.2}%", self.critical_success()),
            self.errors.to_string(),
        ]
    }
}

fn verdict(results: &[(f64, LevelResult)], duration: Duration) -> String {
    let at = |f: f64| results.iter().find(|(x, _)| *x == f).map(|(_, r)| r);
    let (Some(low), Some(high)) = (at(0.5), at(4.0)) else {
        return "incomplete".to_string();
    };
    let goodput = high.goodput(duration) / CAPACITY;
    let p99_ratio = high.p(0.99) / low.p(0.99);
    let critical = high.critical_success();
    let mark = |ok: bool| if ok { "ok" } else { "MISSED" };
    format!(
        "goodput {:.1}% [{}], p99 4x/0.5x {:.2} [{}], critical {:.2}% [{}]",
        100.0 * goodput,
        mark(goodput >= 0.95),
        p99_ratio,
        mark(p99_ratio <= 2.0),
        critical,
        mark(critical >= 99.9)
    )
}

/// Sends `rate` requests per second for `duration`, each at its scheduled time.
async fn open_loop(addr: SocketAddr, rate: f64, duration: Duration) -> LevelResult {
    let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(4096)
            .build_http();
    let total = (rate * duration.as_secs_f64()) as usize;
    let gap = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(50);
    let window_end = start + duration;
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let scheduled = start + gap * i as u32;
        let critical = i % CRITICAL_EVERY == 0;
        let path = if critical {
            "/api/checkout"
        } else {
            "/api/reports"
        };
        let url = format!("http://{addr}{path}");
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(scheduled).await;
            let request = Request::get(url)
                .body(http_body_util::Empty::new())
                .unwrap();
            let exchange = async {
                let response = client.request(request).await.ok()?;
                let status = response.status().as_u16();
                response.into_body().collect().await.ok()?;
                Some(status)
            };
            let status = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .ok()
                .flatten();
            (critical, status, scheduled.elapsed(), Instant::now())
        }));
    }
    let mut result = LevelResult {
        sent: total,
        ..LevelResult::default()
    };
    for task in tasks {
        let (critical, status, latency, finished) = task.await.expect("request task");
        result.critical_sent += usize::from(critical);
        match status {
            Some(200..=299) => {
                result
                    .ok_latencies_us
                    .push(latency.as_micros().min(u32::MAX as u128) as u32);
                if finished <= window_end {
                    result.ok_in_window += 1;
                }
                result.critical_ok += usize::from(critical);
            }
            Some(429) => result.shed += 1,
            _ => result.errors += 1,
        }
    }
    result.ok_latencies_us.sort_unstable();
    result
}

/// The admission decision for one request, end to end in memory: read the signal,
/// decide, reserve the in-flight slot, release it. Medians of several runs.
fn decision_micro_bench() {
    loadgate::metrics::handle();
    let rt = runtime(1);
    let upstream = Arc::new(loadgate::upstream::Upstream::for_tests("decision-bench"));
    let counters = loadgate::admission::RouteCounters::default();
    let iterations = 200_000;
    let mut per_op_ns = Vec::new();
    for _ in 0..7 {
        let started = std::time::Instant::now();
        rt.block_on(async {
            for _ in 0..iterations {
                let reservation = upstream
                    .admission
                    .admit(RouteClass::Sheddable, None, &counters, &upstream)
                    .await;
                drop(std::hint::black_box(reservation));
            }
        });
        per_op_ns.push(started.elapsed().as_nanos() as f64 / f64::from(iterations));
    }
    // The pure decision alone, for comparison.
    let started = std::time::Instant::now();
    let mut admitted = 0u32;
    for i in 0..iterations {
        let utilisation = f64::from(i % 100) / 100.0;
        let outcome = loadgate::admission::decision::decide(
            RouteClass::Sheddable,
            0.7,
            0.1,
            std::hint::black_box(utilisation),
            0.5,
        );
        admitted += u32::from(outcome == loadgate::admission::decision::Outcome::Admit);
    }
    let pure_ns = started.elapsed().as_nanos() as f64 / f64::from(iterations);
    std::hint::black_box(admitted);
    assert_eq!(upstream.inflight(), 0, "every reservation was released");
    common::print_table(
        &["what", "per request (median of 7)", "target"],
        &[
            vec![
                "signal + decide + reserve + release".to_string(),
                format!("{:.0} ns", common::median(&per_op_ns)),
                "< 1 µs".to_string(),
            ],
            vec![
                "decide() alone".to_string(),
                format!("{pure_ns:.1} ns"),
                String::new(),
            ],
        ],
    );
}
