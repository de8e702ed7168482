//! What loadgate costs on the request path, next to nginx, measured in one run.
//!
//! Closed-loop load (64 keep-alive HTTP/1.1 connections) against the simulated
//! backend with zero service time, directly, then through loadgate, then through
//! nginx (when installed) with as many worker processes as loadgate has worker
//! threads. The targets run interleaved over several rounds and the table shows
//! medians, because shared machines are noisy.
//!
//! One more row, the "hyper floor" (`common/hyper_floor.rs`), is hyper's HTTP/1.1
//! server and client with loadgate's thread layout and nothing else. It splits the
//! gap to nginx into what loadgate's own work costs and what the HTTP library does.
//!
//! Processes: the backend, loadgate and the floor each run in a process of their own (this
//! binary re-executed in a helper role, each on its own multi-thread tokio
//! runtime); nginx runs as its own master + workers; the load generator runs in
//! this process on its own runtime. Nothing under test shares a runtime or a
//! process with the load generator. All traffic stays on 127.0.0.1.
//!
//! ```sh
//! cargo bench --bench proxy_overhead
//! LOADGATE_BENCH_SECS=10 LOADGATE_BENCH_ROUNDS=5 cargo bench --bench proxy_overhead
//! ```
//!
//! Settings (environment):
//! - `LOADGATE_BENCH_SECS` measured seconds per run (5), `LOADGATE_BENCH_WARMUP_SECS` (1)
//! - `LOADGATE_BENCH_ROUNDS` rounds of all targets (3)
//! - `LOADGATE_BENCH_CONNECTIONS` client connections (64)
//! - `LOADGATE_BENCH_WORKERS` loadgate worker threads = nginx worker_processes (the core count)
//! - `LOADGATE_BENCH_BACKEND_THREADS` the backend's runtime threads (the core count)
//! - `LOADGATE_BENCH_CLIENT_THREADS` the load generator's runtime threads (1)
//! - `LOADGATE_BENCH_NGINX` path of nginx, or `off` to skip it (found on PATH or in /usr/sbin)

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{env_or, fmt_us, median, print_table, Load, Process, Runs};
use loadgate::listener::Proxy;

/// The first argument of a helper process.
const HELPER: &str = "--proxy-overhead-helper";
/// The request every target serves.
const PATH: &str = "/api/anything";
/// The issue's target: loadgate's req/s over nginx's, with p99 no worse.
const TARGET_RPS_RATIO: f64 = 1.1;

struct Settings {
    secs: f64,
    warmup_secs: f64,
    rounds: usize,
    connections: usize,
    workers: usize,
    backend_threads: usize,
    client_threads: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            secs: env_or("LOADGATE_BENCH_SECS", 5.0),
            warmup_secs: env_or("LOADGATE_BENCH_WARMUP_SECS", 1.0),
            rounds: env_or("LOADGATE_BENCH_ROUNDS", 3usize).max(1),
            connections: env_or("LOADGATE_BENCH_CONNECTIONS", 64usize).max(1),
            workers: env_or("LOADGATE_BENCH_WORKERS", common::cores()).max(1),
            backend_threads: env_or("LOADGATE_BENCH_BACKEND_THREADS", common::cores()).max(1),
            client_threads: env_or("LOADGATE_BENCH_CLIENT_THREADS", 1usize).max(1),
        }
    }
}

fn main() {
    common::main_with_helpers("proxy_overhead", HELPER, helper_main, || {
        bench(&Settings::from_env())
    });
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The target's own processes, whose CPU time is measured (for the proxies,
    /// the proxy alone, not the backend behind it).
    pids: Vec<u32>,
    runs: Runs,
}

fn bench(s: &Settings) -> std::io::Result<()> {
    println!(
        "proxy_overhead: {} connections, {} s measured after {} s warm-up, {} round(s); \
         loadgate {} worker thread(s), nginx {} worker process(es), backend {} thread(s), \
         load generator {} thread(s), {} core(s)",
        s.connections,
        s.secs,
        s.warmup_secs,
        s.rounds,
        s.workers,
        s.workers,
        s.backend_threads,
        s.client_threads,
        common::cores(),
    );

    // Declared first so they are dropped (stopped) last, after the proxies in front.
    let (backend, backend_addr) = Process::spawn_self(
        "sim backend",
        &[
            HELPER.into(),
            "backend".into(),
            s.backend_threads.to_string(),
        ],
    )?;
    let (loadgate, loadgate_addr) = Process::spawn_self(
        "loadgate",
        &[
            HELPER.into(),
            "loadgate".into(),
            s.workers.to_string(),
            backend_addr.to_string(),
        ],
    )?;
    let (floor, floor_addr) = Process::spawn_self(
        "hyper floor",
        &[
            HELPER.into(),
            "hyper-floor".into(),
            s.workers.to_string(),
            backend_addr.to_string(),
        ],
    )?;
    let nginx = common::nginx::start_or_skip(|dir, listen| {
        common::nginx::proxy_conf(dir, s.workers, listen, backend_addr)
    });

    let mut targets = vec![
        Target {
            name: "backend direct",
            addr: backend_addr,
            pids: vec![backend.id()],
            runs: Runs::default(),
        },
        Target {
            name: "loadgate",
            addr: loadgate_addr,
            pids: vec![loadgate.id()],
            runs: Runs::default(),
        },
        Target {
            name: "hyper floor",
            addr: floor_addr,
            pids: vec![floor.id()],
            runs: Runs::default(),
        },
    ];
    if let Some(nginx) = &nginx {
        targets.push(Target {
            name: "nginx",
            addr: nginx.addr,
            // The master and its workers.
            pids: common::with_children(nginx.process.id()),
            runs: Runs::default(),
        });
    }
    for target in &targets {
        check_serves(target.name, target.addr)?;
    }

    let load = |addr| Load {
        addr,
        path: PATH.to_string(),
        headers: Vec::new(),
        connections: s.connections,
        warmup: Duration::from_secs_f64(s.warmup_secs),
        duration: Duration::from_secs_f64(s.secs),
        request_timeout: Duration::from_secs(5),
    };
    let n = targets.len();
    for round in 0..s.rounds {
        // Each round starts with a different target, so none always runs first or last.
        for k in 0..n {
            let target = &mut targets[(round + k) % n];
            let pids = target.pids.clone();
            let result = load(target.addr).run_watching_cpu(s.client_threads, move || pids.clone());
            println!(
                "  round {}/{}  {:<15} {:>9.0} req/s  p50 {:>9}  p99 {:>9}  cpu/req {:>7}  errors {}",
                round + 1,
                s.rounds,
                target.name,
                result.rps(),
                fmt_us(result.quantile(0.50).map_or(f64::NAN, |d| d.as_micros() as f64)),
                fmt_us(result.quantile(0.99).map_or(f64::NAN, |d| d.as_micros() as f64)),
                fmt_cpu(result.cpu_us_per_request().unwrap_or(f64::NAN)),
                result.errors,
            );
            target.runs.runs.push(result);
        }
    }

    println!();
    println!("medians of {} round(s):", s.rounds);
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            vec![
                t.name.to_string(),
                format!("{:.0}", t.runs.rps()),
                fmt_us(t.runs.quantile_us(0.50)),
                fmt_us(t.runs.quantile_us(0.99)),
                fmt_cpu(t.runs.cpu_us_per_request()),
                t.runs.errors().to_string(),
            ]
        })
        .collect();
    print_table(
        &["target", "req/s", "p50", "p99", "cpu/req", "errors"],
        &rows,
    );
    println!(
        "(cpu/req: CPU time of the target's own processes per response; for the proxies \
         the proxy alone, without the backend. It varies less with machine noise than req/s.)"
    );

    let [direct, loadgate, floor, rest @ ..] = targets.as_slice() else {
        unreachable!("direct, loadgate and the hyper floor are always measured")
    };
    println!(
        "loadgate / backend direct: {:.2}x req/s, p99 {:.2}x",
        loadgate.runs.rps() / direct.runs.rps(),
        loadgate.runs.quantile_us(0.99) / direct.runs.quantile_us(0.99),
    );
    println!(
        "loadgate / hyper floor: {:.2}x req/s, {:.2}x cpu/req  (the floor: hyper server and \
         client alone, in loadgate's thread layout, with no header rewriting, timeouts or metrics)",
        loadgate.runs.rps() / floor.runs.rps(),
        loadgate.runs.cpu_us_per_request() / floor.runs.cpu_us_per_request(),
    );
    if let Some(nginx) = rest.first() {
        println!(
            "hyper floor / nginx: {:.2}x req/s, p99 {:.2}x, {:.2}x cpu/req  (the most a proxy \
             on hyper can reach here)",
            floor.runs.rps() / nginx.runs.rps(),
            floor.runs.quantile_us(0.99) / nginx.runs.quantile_us(0.99),
            floor.runs.cpu_us_per_request() / nginx.runs.cpu_us_per_request(),
        );
    }
    match rest.first() {
        Some(nginx) => {
            let rps = loadgate.runs.rps() / nginx.runs.rps();
            let p99 = loadgate.runs.quantile_us(0.99) / nginx.runs.quantile_us(0.99);
            let per_round: Vec<String> = loadgate
                .runs
                .runs
                .iter()
                .zip(&nginx.runs.runs)
                .map(|(l, n)| format!("{:.2}x", l.rps() / n.rps()))
                .collect();
            let cpu = loadgate.runs.cpu_us_per_request() / nginx.runs.cpu_us_per_request();
            let met = rps >= TARGET_RPS_RATIO && p99 <= 1.0;
            println!(
                "loadgate / nginx: {rps:.2}x req/s, p99 {p99:.2}x   \
                 (target: >= {TARGET_RPS_RATIO}x req/s, p99 no worse: {})",
                if met { "met" } else { "NOT met" }
            );
            println!("loadgate / nginx: {cpu:.2}x cpu/req");
            println!(
                "loadgate / nginx req/s by round: {}  (median {:.2}x)",
                per_round.join(" "),
                median(
                    &loadgate
                        .runs
                        .runs
                        .iter()
                        .zip(&nginx.runs.runs)
                        .map(|(l, n)| l.rps() / n.rps())
                        .collect::<Vec<_>>()
                )
            );
        }
        None => println!("loadgate / nginx: not measured (see above)"),
    }
    drop(nginx);
    Ok(())
}

/// CPU microseconds with one decimal: `12.3 µs`.
fn fmt_cpu(us: f64) -> String {
    if us.is_nan() {
        "-".to_string()
    } else {
        format!("{us:.1} µs")
    }
}

/// One plain GET before any load, so a misconfigured target fails loudly instead of
/// showing up as a row of errors.
fn check_serves(name: &str, addr: SocketAddr) -> std::io::Result<()> {
    let probe = Load {
        addr,
        path: PATH.to_string(),
        headers: Vec::new(),
        connections: 1,
        warmup: Duration::ZERO,
        duration: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
    };
    let result = probe.run_on_own_runtime(1);
    if result.ok() == 0 {
        return Err(std::io::Error::other(format!(
            "{name} at {addr} does not answer GET {PATH} with a 2xx ({} errors)",
            result.errors
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Helper processes: the backend and loadgate, each on its own runtime
// ---------------------------------------------------------------------------

fn helper_main(args: &[String]) {
    let arg = |i: usize| -> &str { args.get(i).map_or("", String::as_str) };
    let threads: usize = arg(1).parse().expect("helper: thread count");
    let runtime = common::helper_runtime(threads, "warn");
    match arg(0) {
        "backend" => common::serve_instant_backend(&runtime),
        "loadgate" => {
            let backend: SocketAddr = arg(2).parse().expect("helper: backend address");
            // `threads` worker threads serve requests; `runtime` only starts them.
            let proxy = runtime
                .block_on(Proxy::start(common::loadgate_config(
                    threads,
                    backend,
                    "127.0.0.1:0".parse().expect("address"),
                    "idle_timeout_ms = 60000",
                    "",
                )))
                .expect("loadgate starts");
            common::announce_and_wait_for_parent(proxy.addr());
            runtime.block_on(proxy.shutdown());
        }
        "hyper-floor" => {
            let backend: SocketAddr = arg(2).parse().expect("helper: backend address");
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").expect("hyper floor binds a port");
            let addr = listener.local_addr().expect("bound address");
            common::hyper_floor::start(listener, backend, threads);
            common::announce_and_wait_for_parent(addr);
        }
        other => panic!("unknown helper role {other:?}"),
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}
