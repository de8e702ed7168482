//! Overload: what callers see when offered load passes the backend's capacity, with
//! loadgate in front as shipped (its default configuration) and, in the same run,
//! nginx as a plain pass-through and HAProxy configured for overload by hand.
//!
//! The backend is a real Tomcat 10 when Debian's `tomcat10` is installed, otherwise
//! loadgate's simulated Tomcat with its actuator on the main port (so actuator polls
//! take a worker, as on Tomcat). 8 workers, 50 ms of work per request: capacity
//! 160 req/s. Routes: `/api/checkout` critical, `/api/reports` sheddable.
//!
//! Load is open-loop and constant-arrival (`common/openloop.rs`): every request is
//! sent at its scheduled time whether or not earlier ones returned, and its latency
//! counts from that scheduled time, so queueing cannot hide behind a slow client.
//! Critical requests arrive at a quarter of capacity throughout; the rest of the load
//! is sheddable. Each scenario starts with 1 s at 0.5x (not measured). Scenarios:
//! 1. steady 0.5x;
//! 2. a step to 2x, 4x and 10x, then 2 s back at 0.5x;
//! 3. dependency slowdown: work goes from 50 to 500 ms for 2 x SECS, then back, at 1x
//!    (critical at a quarter of the *slowed* capacity here: a quarter of the normal
//!    one would need 2.5x the slowed pool by itself);
//! 4. a burst of 150 critical requests at once (1 ms of work each);
//! 5. a retry storm at 4x: sheddable clients re-send every 429/503 up to 3 times at once;
//! 6. two loadgate instances in front of one backend, each taking half of 4x;
//! 7. bypass: 6 closed-loop clients straight to the backend (three quarters of the
//!    pool) while the proxy carries critical load plus 2x sheddable;
//! 8. 4x where sheddable work takes 500 ms (critical stays 50 ms).
//!
//! Per target and scenario: goodput (work served / capacity), critical success and
//! p99 (over the overload and the 2 s after it, against the unloaded p99 measured
//! first straight at the backend), sheddable success, the sheddable requests shed
//! while the backend's own busy/max was under 70% (polled every 50 ms, in 100 ms
//! windows), errors, and how long shedding lasts once the load drops. A summary
//! checks loadgate against the targets. A micro-benchmark of the admission decision
//! comes first.
//!
//! Run: `cargo bench --bench overload`. Settings (environment):
//! - `LOADGATE_BENCH_SECS` seconds of each overload (default 4; the slowdown lasts twice
//!   that); with the default the whole bench takes about 5 minutes on 2 cores
//! - `LOADGATE_BENCH_BACKEND` `auto` (Tomcat when installed), `tomcat` or `sim`
//! - `LOADGATE_BENCH_ONLY` comma-separated scenarios to run: steady, step, slowdown,
//!   burst, retry, two, bypass, expensive (default all)
//! - `LOADGATE_BENCH_NGINX`, `LOADGATE_BENCH_HAPROXY` path of the binary, or `off`

mod common;
#[path = "common/overload_report.rs"]
mod report;
#[path = "common/overload_scenarios.rs"]
mod scenarios;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::backend::{Backend, Choice};
use common::openloop::{self, Plan, Planned};
use loadgate::admission::Slots;
use loadgate::config::{Config, RouteClass};
use loadgate::listener::Proxy;
use report::{Measured, Recorded};
use scenarios::{scenarios, Phase, Scenario};
use tokio::time::Instant;

/// The backend's pool (Tomcat `maxThreads`).
const WORKERS: usize = 8;
/// Work per request, normally.
const WORK_MS: u64 = 50;
/// Work per request while the dependency is slow, and for expensive sheddable work.
const SLOW_MS: u64 = 500;
const CAPACITY: f64 = WORKERS as f64 * 1000.0 / WORK_MS as f64;
/// Critical requests per second: a quarter of capacity.
const CRITICAL_RATE: f64 = CAPACITY / 4.0;
/// Critical requests per second in the slowdown: a quarter of the *slowed* capacity.
/// (A quarter of the normal one would alone need 2.5x the slowed pool, and no proxy
/// could keep its critical promises.)
const SLOW_CRITICAL_RATE: f64 = CRITICAL_RATE * WORK_MS as f64 / SLOW_MS as f64;
/// Requests in the burst, and the work of each.
const BURST: usize = 150;
const BURST_MS: u64 = 1;
/// Re-sends of a rejected sheddable request in the retry storm.
const RETRIES: u32 = 3;
/// Closed-loop clients sending straight to the backend in the bypass scenario.
const BYPASS_CLIENTS: usize = 6;
/// A caller gives up on an attempt after this long (counted as an error).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Load at which the step scenarios start and end.
const BASE_LOAD: f64 = 0.5;
/// How long the load stays at 0.5x after an overload.
const TAIL: Duration = Duration::from_secs(2);
/// Not measured: lets every target warm its connections and read the actuator once.
const WARMUP: Duration = Duration::from_secs(1);
/// Utilisation below which shedding a sheddable request counts as premature.
const SHED_LINE: f64 = 0.7;
const UTIL_EVERY: Duration = Duration::from_millis(50);
const UTIL_WINDOW: Duration = Duration::from_millis(100);
/// Route paths, as loadgate's and HAProxy's configs name them.
const CHECKOUT: &str = "/api/checkout";
const REPORTS: &str = "/api/reports";
/// Outcome kinds.
const CRITICAL: usize = 0;
const SHEDDABLE: usize = 1;

fn main() {
    let began = std::time::Instant::now();
    let secs: f64 = common::env_or("LOADGATE_BENCH_SECS", 4.0);
    let only: String = common::env_or("LOADGATE_BENCH_ONLY", String::new());
    let wanted = |key: &str| only.is_empty() || only.split(',').any(|k| k.trim() == key);
    println!("## admission decision (micro-benchmark)\n");
    decision_micro_bench();

    let Some(mut backend) = Backend::start(Choice::from_env(), WORKERS) else {
        eprintln!("overload: LOADGATE_BENCH_BACKEND=tomcat but Tomcat is not installed");
        std::process::exit(1);
    };
    let load_rt = runtime(1);
    println!(
        "\n## overload: {}\n\ncapacity {CAPACITY:.0} req/s ({WORKERS} workers x {WORK_MS} ms); \
         critical {CRITICAL_RATE:.0} req/s ({CHECKOUT}), the rest sheddable ({REPORTS}); \
         {secs} s per overload; client timeout {CLIENT_TIMEOUT:?}\n",
        backend.label()
    );
    let targets = available_targets();
    let unloaded = unloaded_p99(&backend, &load_rt);
    println!(
        "unloaded critical p99, straight at the backend ({WORK_MS} ms work): {unloaded:.1} ms\n"
    );
    println!("{}\n", report::LEGEND);

    let mut results: HashMap<(String, Target), Measured> = HashMap::new();
    for group in scenarios(Duration::from_secs_f64(secs)) {
        if !wanted(group.key) {
            continue;
        }
        println!("### {}\n", group.title);
        let mut rows = Vec::new();
        for scenario in &group.scenarios {
            for &target in &targets {
                if scenario.instances > 1 && target != Target::Loadgate {
                    continue;
                }
                eprintln!(
                    "overload [{:>3.0} s]: {} / {}",
                    began.elapsed().as_secs_f64(),
                    scenario.key,
                    target.name(1)
                );
                if backend.settle_or_restart(settle_time(&backend)) {
                    eprintln!("overload: the backend had not drained; started a fresh one");
                }
                let Some(measured) = run(scenario, target, &backend, &load_rt) else {
                    continue;
                };
                rows.push(measured.row(target.name(scenario.instances), scenario, unloaded));
                results.insert((scenario.key.clone(), target), measured);
            }
        }
        report::print_markdown(&report::COLUMNS, &rows);
        if !group.note.is_empty() {
            println!("\n{}", group.note);
        }
        println!();
    }
    report::summary(&results, unloaded);
    eprintln!("overload: done in {:.0} s", began.elapsed().as_secs_f64());
}

fn settle_time(backend: &Backend) -> Duration {
    if backend.is_tomcat() {
        Duration::from_secs(4)
    } else {
        Duration::from_secs(1)
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Loadgate,
    Nginx,
    HaProxy,
}

impl Target {
    fn name(self, instances: usize) -> String {
        match self {
            Target::Loadgate if instances > 1 => format!("loadgate x{instances} (defaults)"),
            Target::Loadgate => "loadgate (defaults)".to_string(),
            Target::Nginx => "nginx pass-through".to_string(),
            Target::HaProxy => "HAProxy (maxconn 8, priority queue, 429)".to_string(),
        }
    }
}

/// loadgate always; nginx and HAProxy when installed (otherwise says why not).
fn available_targets() -> Vec<Target> {
    let mut targets = vec![Target::Loadgate];
    match common::nginx::find() {
        Ok(_) => targets.push(Target::Nginx),
        Err(why) => println!("nginx rows skipped: {why}"),
    }
    match common::haproxy::find() {
        Ok(_) => targets.push(Target::HaProxy),
        Err(why) => println!("HAProxy rows skipped: {why}"),
    }
    targets
}

/// A running target. [`Stack::stop`] drains loadgate (bounded); nginx and HAProxy get
/// SIGTERM by their PID when dropped.
enum Stack {
    Loadgate(Vec<(tokio::runtime::Runtime, Proxy)>),
    Nginx(common::nginx::Nginx),
    HaProxy(common::haproxy::HaProxy),
}

impl Stack {
    fn start(target: Target, instances: usize, backend: SocketAddr) -> Option<Stack> {
        match target {
            Target::Loadgate => Some(Stack::Loadgate(
                (0..instances)
                    .map(|_| {
                        // Admin, health checks and actuator polls run here; the data
                        // plane on loadgate's own worker threads.
                        let rt = runtime(1);
                        let proxy = rt
                            .block_on(Proxy::start(loadgate_config(backend)))
                            .expect("loadgate starts");
                        (rt, proxy)
                    })
                    .collect(),
            )),
            Target::Nginx => common::nginx::start_or_skip(|dir, listen| {
                common::nginx::proxy_conf(dir, 2, listen, backend)
            })
            .map(Stack::Nginx),
            Target::HaProxy => common::haproxy::start_or_skip(|listen| {
                common::haproxy::overload_conf(&common::haproxy::OverloadSetup {
                    listen,
                    backend,
                    pool: WORKERS,
                    critical_prefix: CHECKOUT.to_string(),
                    sheddable_prefix: REPORTS.to_string(),
                    shed_queue: WORKERS,
                    queue_timeout: Duration::from_secs(1),
                })
            })
            .map(Stack::HaProxy),
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Stack::Loadgate(proxies) => proxies.iter().map(|(_, p)| p.addr()).collect(),
            Stack::Nginx(nginx) => vec![nginx.addr],
            Stack::HaProxy(haproxy) => vec![haproxy.addr],
        }
    }

    fn stop(self) {
        if let Stack::Loadgate(proxies) = self {
            for (rt, proxy) in proxies {
                // Bounded: requests still in flight would hold the drain for 30 s.
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(3), proxy.shutdown()).await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

/// loadgate as shipped: only the listeners (port 0), the backend, its pool size and
/// the two routes are set; everything else (thresholds, the actuator poller, health
/// checks, worker threads) is the default.
fn loadgate_config(backend: SocketAddr) -> Config {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[[upstream]]
name = "app"
backends = ["{backend}"]
max_workers = {WORKERS}
[[route]]
name = "checkout"
path_prefix = "{CHECKOUT}"
upstream = "app"
class = "critical"
[[route]]
name = "reports"
path_prefix = "{REPORTS}"
upstream = "app"
class = "sheddable"
"#
    );
    Config::parse(&text, "overload bench").expect("bench config is valid")
}

// ---------------------------------------------------------------------------
// Running a scenario
// ---------------------------------------------------------------------------

fn run(
    scenario: &Scenario,
    target: Target,
    backend: &Backend,
    load_rt: &tokio::runtime::Runtime,
) -> Option<Measured> {
    let stack = Stack::start(target, scenario.instances, backend.addr())?;
    let addrs = stack.addrs();
    let (plan, work_ms) = build_plan(scenario, &addrs, backend);
    let total: Duration = scenario.phases.iter().map(|p| p.length).sum();
    let probe = backend.probe();
    let bypass = bypass_phase(scenario).map(|(from, phase)| {
        let load = common::Load {
            addr: backend.addr(),
            path: format!("/api/bypass?{}", backend.work_query(WORK_MS)),
            headers: Vec::new(),
            connections: phase.bypass,
            warmup: Duration::ZERO,
            duration: phase.length,
            request_timeout: CLIENT_TIMEOUT,
        };
        (from, load)
    });
    let (outcomes, samples, bypass_ok) = load_rt.block_on(async {
        let start = Instant::now() + Duration::from_millis(100);
        let bypass = async {
            let Some((from, load)) = &bypass else {
                return 0;
            };
            tokio::time::sleep_until(start + *from).await;
            load.run().await.ok()
        };
        tokio::join!(
            openloop::run(&plan, start, CLIENT_TIMEOUT),
            probe.sample(WORKERS, start, start + total, UTIL_EVERY),
            bypass
        )
    });
    stack.stop();
    let recorded = Recorded {
        outcomes,
        work_ms,
        samples,
        bypass_ok,
    };
    Some(Measured::from(scenario, &recorded))
}

/// The phase with bypassing clients, and when it starts.
fn bypass_phase(scenario: &Scenario) -> Option<(Duration, &Phase)> {
    let mut from = Duration::ZERO;
    for phase in &scenario.phases {
        if phase.bypass > 0 {
            return Some((from, phase));
        }
        from += phase.length;
    }
    None
}

/// The requests of a scenario: per phase a critical and a sheddable stream (offset by
/// half a gap from each other), spread over `addrs` in turn, plus any burst.
fn build_plan(scenario: &Scenario, addrs: &[SocketAddr], backend: &Backend) -> (Plan, Vec<u64>) {
    let mut plan = Plan::default();
    let mut work_ms = Vec::new();
    let mut from = Duration::ZERO;
    for phase in &scenario.phases {
        let streams = [
            (
                CRITICAL,
                CHECKOUT,
                phase.critical_rate,
                phase.critical_ms,
                0,
                0.0,
            ),
            (
                SHEDDABLE,
                REPORTS,
                phase.sheddable_rate,
                phase.sheddable_ms,
                phase.retries,
                0.5,
            ),
        ];
        for (kind, route, rate, ms, retries, offset) in streams {
            let path = format!("{route}?{}", backend.work_query(ms));
            plan.constant_rate(from, phase.length, rate, offset, |i| Planned {
                at: Duration::ZERO,
                addr: addrs[i % addrs.len()],
                path: path.clone(),
                kind,
                retries,
            });
            work_ms.resize(plan.requests.len(), ms);
        }
        let path = format!("{CHECKOUT}?{}", backend.work_query(BURST_MS));
        plan.burst(from, phase.burst, |i| Planned {
            at: Duration::ZERO,
            addr: addrs[i % addrs.len()],
            path: path.clone(),
            kind: CRITICAL,
            retries: 0,
        });
        work_ms.resize(plan.requests.len(), BURST_MS);
        from += phase.length;
    }
    (plan, work_ms)
}

/// Critical p99 straight at the backend with no other load: 10 requests to warm up,
/// then 100 at 25 per second (so the p99 is not just the slowest one).
fn unloaded_p99(backend: &Backend, load_rt: &tokio::runtime::Runtime) -> f64 {
    let path = format!("{CHECKOUT}?{}", backend.work_query(WORK_MS));
    let plan = |count: usize| {
        let mut plan = Plan::default();
        plan.constant_rate(
            Duration::ZERO,
            Duration::from_secs_f64(count as f64 / 25.0),
            25.0,
            0.0,
            |_| Planned {
                at: Duration::ZERO,
                addr: backend.addr(),
                path: path.clone(),
                kind: CRITICAL,
                retries: 0,
            },
        );
        plan
    };
    let (_, measured) = load_rt.block_on(async {
        let warm = openloop::run(&plan(10), Instant::now(), CLIENT_TIMEOUT).await;
        let measured = openloop::run(&plan(100), Instant::now(), CLIENT_TIMEOUT).await;
        (warm, measured)
    });
    let mut latencies: Vec<u32> = measured
        .iter()
        .filter(|o| o.ok())
        .map(|o| micros(o.latency()))
        .collect();
    latencies.sort_unstable();
    common::quantile_us(&latencies, 0.99).map_or(f64::NAN, |us| f64::from(us) / 1000.0)
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// The admission decision
// ---------------------------------------------------------------------------

/// The admission decision for one request, end to end in memory: read the signal,
/// decide, reserve the in-flight slot, release it. Medians of several runs.
fn decision_micro_bench() {
    loadgate::metrics::handle();
    let rt = runtime(1);
    let upstream = Arc::new(loadgate::upstream::Upstream::for_tests("decision-bench"));
    let counters = loadgate::admission::RouteCounters::for_route(
        "decision-bench",
        "decision-bench",
        loadgate::config::RouteClass::Sheddable,
    );
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
