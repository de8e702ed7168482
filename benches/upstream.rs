//! Stale keep-alive connections: what callers see when the backend's keep-alive
//! timeout is shorter than the proxy's idle timeout (the misconfiguration behind
//! "Connection prematurely closed BEFORE response" incidents), through loadgate
//! with its retry-once on stale reuse, loadgate with that retry off, and nginx.
//!
//! The backend is the simulated Tomcat with `keepAliveTimeout` 200 ms and
//! `maxKeepAliveRequests` 100; it announces neither (no `Keep-Alive` header), like
//! Tomcat. loadgate keeps idle connections 5 s, nginx 60 s (`upstream { keepalive
//! 64; keepalive_timeout 60s; }`, `proxy_next_upstream` at its default). The load
//! is two generators at once, on one thread of this process:
//! - steady: a few closed-loop keep-alive connections sending GETs back to back
//!   (the throughput figure; they keep the proxy's most recent connections hot);
//! - waves: 64 connections send one request each at the same moment (7 in 8 GET,
//!   1 in 8 POST with a body), then all pause for a time drawn around the backend's
//!   keep-alive timeout. Each wave reuses pooled connections idle since the last
//!   one, some of them just as the backend closes them.
//!
//! A client-visible error is a transport error, a timeout or a non-2xx answer.
//! The targets run interleaved over several rounds; req/s and latency are medians
//! over rounds, errors are summed. Target (the issue's): 0 GET errors through
//! loadgate with retry on. POST errors are expected everywhere: a POST that may
//! have reached the backend must not be sent twice.
//!
//! Processes: the backend and each loadgate run in a process of their own (this
//! binary re-executed as a helper), nginx as its own master + workers. All traffic
//! stays on 127.0.0.1.
//!
//! ```sh
//! cargo bench --bench upstream
//! LOADGATE_BENCH_SECS=20 LOADGATE_BENCH_ROUNDS=5 cargo bench --bench upstream
//! ```
//!
//! Settings (environment):
//! - `LOADGATE_BENCH_SECS` measured seconds per run (10), `LOADGATE_BENCH_WARMUP_SECS` (1)
//! - `LOADGATE_BENCH_ROUNDS` rounds of all targets (3)
//! - `LOADGATE_BENCH_KEEPALIVE_MS` the backend's keep-alive timeout (200)
//! - `LOADGATE_BENCH_PAUSE_BEFORE_MS`, `LOADGATE_BENCH_PAUSE_AFTER_MS`: the pause between
//!   waves is drawn from [keep-alive − before, keep-alive + after] (8, 2): a wave's
//!   connections went idle over a few milliseconds, so pauses a little under the
//!   timeout make some of them reach it as the next wave reuses them
//! - `LOADGATE_BENCH_WAVE_CONNECTIONS` (64), `LOADGATE_BENCH_STEADY_CONNECTIONS` (4)
//! - `LOADGATE_BENCH_WORKERS` loadgate worker threads = nginx worker_processes (the core count)
//! - `LOADGATE_BENCH_NGINX` path of nginx, or `off` to skip it

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::waves::{WaveRequest, Waves, WavesResult};
use common::{env_or, fmt_us, median, print_table, quantile_us, Load, LoadResult, Process};
use http::Method;
use loadgate::config::Config;
use loadgate::listener::Proxy;
use loadgate::sim::{SimBackend, SimConfig};

/// The first argument of a helper process.
const HELPER: &str = "--upstream-helper";
const PATH: &str = "/api/stale";
/// loadgate's idle timeout: longer than the backend's keep-alive timeout, on purpose.
const LOADGATE_IDLE_MS: u64 = 5_000;
/// The backend's `maxKeepAliveRequests` (Tomcat's default).
const MAX_KEEP_ALIVE_REQUESTS: u32 = 100;
/// One wave connection in this many sends a POST; the others GET.
const POST_EVERY: usize = 8;

struct Settings {
    secs: f64,
    warmup_secs: f64,
    rounds: usize,
    keep_alive_ms: u64,
    pause_before_ms: u64,
    pause_after_ms: u64,
    wave_connections: usize,
    steady_connections: usize,
    workers: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            secs: env_or("LOADGATE_BENCH_SECS", 10.0),
            warmup_secs: env_or("LOADGATE_BENCH_WARMUP_SECS", 1.0),
            rounds: env_or("LOADGATE_BENCH_ROUNDS", 3usize).max(1),
            keep_alive_ms: env_or("LOADGATE_BENCH_KEEPALIVE_MS", 200u64).max(1),
            pause_before_ms: env_or("LOADGATE_BENCH_PAUSE_BEFORE_MS", 8u64),
            pause_after_ms: env_or("LOADGATE_BENCH_PAUSE_AFTER_MS", 2u64),
            wave_connections: env_or("LOADGATE_BENCH_WAVE_CONNECTIONS", 64usize).max(1),
            steady_connections: env_or("LOADGATE_BENCH_STEADY_CONNECTIONS", 4usize),
            workers: env_or("LOADGATE_BENCH_WORKERS", common::cores()).max(1),
        }
    }
}

fn main() {
    common::main_with_helpers("upstream", HELPER, helper_main, || {
        bench(&Settings::from_env())
    });
}

/// One run of one target: the steady stream and the waves, side by side.
struct Run {
    steady: LoadResult,
    waves: WavesResult,
    /// loadgate's stale-reuse counter over the run: (retried, not retryable).
    stale: Option<(u64, u64)>,
}

impl Run {
    /// Successful GETs (both generators) and GET errors.
    fn gets(&self) -> (u64, u64) {
        self.sum(|m| m == Method::GET)
    }

    fn posts(&self) -> (u64, u64) {
        self.sum(|m| m == Method::POST)
    }

    fn sum(&self, pick: impl Fn(Method) -> bool) -> (u64, u64) {
        let mut ok = 0;
        let mut errors = 0;
        if pick(Method::GET) {
            ok += self.steady.ok() as u64;
            errors += self.steady.errors;
        }
        for (i, kind) in self.waves.by_kind.iter().enumerate() {
            if pick(wave_method(i)) {
                ok += kind.ok() as u64;
                errors += kind.errors;
            }
        }
        (ok, errors)
    }

    /// Successful responses per second, both generators.
    fn rps(&self) -> f64 {
        let ok = self.steady.ok() + self.waves.by_kind.iter().map(LoadResult::ok).sum::<usize>();
        ok as f64 / self.steady.duration.as_secs_f64()
    }

    /// Latencies of all successful responses, sorted.
    fn latencies(&self, waves_only: bool) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .waves
            .by_kind
            .iter()
            .flat_map(|k| k.latencies_us.iter().copied())
            .collect();
        if !waves_only {
            all.extend_from_slice(&self.steady.latencies_us);
        }
        all.sort_unstable();
        all
    }
}

fn wave_method(connection: usize) -> Method {
    if connection % POST_EVERY == POST_EVERY - 1 {
        Method::POST
    } else {
        Method::GET
    }
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// loadgate's admin address, for its stale-reuse counter.
    admin: Option<SocketAddr>,
    runs: Vec<Run>,
}

impl Target {
    fn quantile(&self, q: f64, waves_only: bool) -> f64 {
        median(
            &self
                .runs
                .iter()
                .map(|r| quantile_us(&r.latencies(waves_only), q).map_or(f64::NAN, f64::from))
                .collect::<Vec<_>>(),
        )
    }

    fn total(&self, of: impl Fn(&Run) -> (u64, u64)) -> (u64, u64) {
        self.runs
            .iter()
            .map(of)
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    fn stale(&self) -> Option<(u64, u64)> {
        self.runs
            .iter()
            .map(|r| r.stale)
            .try_fold((0, 0), |(a, b), stale| {
                let (c, d) = stale?;
                Some((a + c, b + d))
            })
    }
}

/// `(ok, errors)` as `errors (rate)`.
fn fmt_errors((ok, errors): (u64, u64)) -> String {
    let total = ok + errors;
    if total == 0 {
        return "-".to_string();
    }
    format!("{errors} ({:.3}%)", errors as f64 * 100.0 / total as f64)
}

fn bench(s: &Settings) -> std::io::Result<()> {
    let t = s.keep_alive_ms;
    let pause = (
        Duration::from_millis(t.saturating_sub(s.pause_before_ms)),
        Duration::from_millis(t + s.pause_after_ms),
    );
    println!(
        "upstream: backend keep-alive timeout {t} ms, max {MAX_KEEP_ALIVE_REQUESTS} requests per \
         connection; loadgate idle timeout {LOADGATE_IDLE_MS} ms, nginx upstream keepalive_timeout 60 s"
    );
    println!(
        "load: {} steady GET connection(s) + waves of {} connections (1 in {POST_EVERY} POST) \
         every {}-{} ms; {} s measured after {} s warm-up, {} round(s); loadgate {} worker \
         thread(s), nginx {} worker process(es), {} core(s)",
        s.steady_connections,
        s.wave_connections,
        pause.0.as_millis(),
        pause.1.as_millis(),
        s.secs,
        s.warmup_secs,
        s.rounds,
        s.workers,
        s.workers,
        common::cores(),
    );

    // Declared first so it is dropped (stopped) last, after the proxies in front.
    let (_backend, backend_addr) = Process::spawn_self(
        "sim backend",
        &[
            HELPER.into(),
            "backend".into(),
            s.workers.to_string(),
            t.to_string(),
        ],
    )?;
    let start_loadgate =
        |name: &str, retry: bool| -> std::io::Result<(Process, SocketAddr, SocketAddr)> {
            let admin = SocketAddr::from(([127, 0, 0, 1], common::free_local_port()?));
            let (process, addr) = Process::spawn_self(
                name,
                &[
                    HELPER.into(),
                    "loadgate".into(),
                    s.workers.to_string(),
                    backend_addr.to_string(),
                    admin.to_string(),
                    if retry { "retry" } else { "no-retry" }.into(),
                ],
            )?;
            Ok((process, addr, admin))
        };
    let (_on, on_addr, on_admin) = start_loadgate("loadgate retry on", true)?;
    let (_off, off_addr, off_admin) = start_loadgate("loadgate retry off", false)?;
    let nginx = common::nginx::start_or_skip(|dir, listen| {
        common::nginx::proxy_conf(dir, s.workers, listen, backend_addr)
    });

    let mut targets = vec![
        Target {
            name: "loadgate, retry on",
            addr: on_addr,
            admin: Some(on_admin),
            runs: Vec::new(),
        },
        Target {
            name: "loadgate, retry off",
            addr: off_addr,
            admin: Some(off_admin),
            runs: Vec::new(),
        },
    ];
    if let Some(nginx) = &nginx {
        targets.push(Target {
            name: "nginx",
            addr: nginx.addr,
            admin: None,
            runs: Vec::new(),
        });
    }

    let n = targets.len();
    for round in 0..s.rounds {
        // Each round starts with a different target, so none always runs first or last.
        for k in 0..n {
            let target = &mut targets[(round + k) % n];
            let before = target.admin.map(stale_counts);
            let (steady, waves) = load(s, target.addr, pause);
            let stale = before
                .zip(target.admin.map(stale_counts))
                .and_then(|(b, a)| Some((a?.0.checked_sub(b?.0)?, a?.1.checked_sub(b?.1)?)));
            let run = Run {
                steady,
                waves,
                stale,
            };
            println!(
                "  round {}/{}  {:<20} {:>7.0} req/s  p99 {:>9}  waves {:>3}  GET errors {:>12}  \
                 POST errors {:>12}{}",
                round + 1,
                s.rounds,
                target.name,
                run.rps(),
                fmt_us(quantile_us(&run.latencies(false), 0.99).map_or(f64::NAN, f64::from)),
                run.waves.waves,
                fmt_errors(run.gets()),
                fmt_errors(run.posts()),
                run.stale.map_or(String::new(), |(retried, failed)| format!(
                    "  stale reuses: {retried} retried, {failed} not retried"
                )),
            );
            target.runs.push(run);
        }
    }

    println!();
    println!(
        "medians of {} round(s) (req/s, latency); errors summed over all rounds:",
        s.rounds
    );
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            vec![
                t.name.to_string(),
                format!(
                    "{:.0}",
                    median(&t.runs.iter().map(Run::rps).collect::<Vec<_>>())
                ),
                fmt_us(t.quantile(0.50, false)),
                fmt_us(t.quantile(0.99, false)),
                fmt_us(t.quantile(0.99, true)),
                fmt_errors(t.total(Run::gets)),
                fmt_errors(t.total(Run::posts)),
                t.stale()
                    .map_or("-".to_string(), |(r, f)| format!("{r} / {f}")),
            ]
        })
        .collect();
    print_table(
        &[
            "target",
            "req/s",
            "p50",
            "p99",
            "wave p99",
            "GET errors",
            "POST errors",
            "stale: retried / not",
        ],
        &rows,
    );
    println!(
        "(errors: resets, timeouts and non-2xx seen by the client. stale: loadgate's count of \
         reused connections that died before a response, from its metrics.)"
    );
    if nginx.is_some() {
        println!(
            "(nginx: a request that fails on a cached keep-alive connection is tried once more even \
             with a single server (ngx_http_upstream_next: peer.tries++ when peer.cached), unless it \
             is a POST/PATCH/LOCK that was already sent.)"
        );
    }

    let on = &targets[0];
    let off = &targets[1];
    let (_, on_get_errors) = on.total(Run::gets);
    let (_, off_get_errors) = off.total(Run::gets);
    let stale_seen = on.stale().map_or(0, |(r, f)| r + f) + off_get_errors;
    let nginx_note = targets.get(2).map_or(String::new(), |t| {
        format!(", nginx {} GET errors", t.total(Run::gets).1)
    });
    if stale_seen == 0 {
        println!(
            "verdict: inconclusive: no connection went stale in this run (try another \
             LOADGATE_BENCH_KEEPALIVE_MS / LOADGATE_BENCH_PAUSE_*_MS)"
        );
    } else {
        println!(
            "verdict: loadgate retry on: {on_get_errors} GET errors (target 0: {}); retry off \
             {off_get_errors}{nginx_note}",
            if on_get_errors == 0 { "met" } else { "NOT met" }
        );
    }
    drop(nginx);
    Ok(())
}

/// The steady stream and the waves at once, on one thread of this process.
fn load(s: &Settings, addr: SocketAddr, pause: (Duration, Duration)) -> (LoadResult, WavesResult) {
    let warmup = Duration::from_secs_f64(s.warmup_secs);
    let duration = Duration::from_secs_f64(s.secs);
    let request_timeout = Duration::from_secs(5);
    let steady = Load {
        addr,
        path: PATH.to_string(),
        headers: Vec::new(),
        connections: s.steady_connections,
        warmup,
        duration,
        request_timeout,
    };
    let waves = Waves {
        addr,
        connections: s.wave_connections,
        requests: (0..POST_EVERY)
            .map(|i| WaveRequest {
                method: wave_method(i),
                path: PATH.to_string(),
                body: if wave_method(i) == Method::POST {
                    "order=1"
                } else {
                    ""
                },
            })
            .collect(),
        pause,
        warmup,
        duration,
        request_timeout,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load generator runtime");
    let result = runtime.block_on(async {
        if s.steady_connections == 0 {
            (
                LoadResult {
                    duration,
                    ..LoadResult::default()
                },
                waves.run().await,
            )
        } else {
            tokio::join!(steady.run(), waves.run())
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// loadgate's `loadgate_upstream_stale_reuse_total` by outcome: (retried, not_retryable),
/// read from its admin port's /metrics; `None` if it cannot be read.
fn stale_counts(admin: SocketAddr) -> Option<(u64, u64)> {
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let value = |outcome: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("loadgate_upstream_stale_reuse_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    text.starts_with("HTTP/1.1 200")
        .then(|| (value("retried"), value("not_retryable")))
}

// ---------------------------------------------------------------------------
// Helper processes: the backend and loadgate, each on its own runtime
// ---------------------------------------------------------------------------

fn helper_main(args: &[String]) {
    let arg = |i: usize| -> &str { args.get(i).map_or("", String::as_str) };
    let threads: usize = arg(1).parse().expect("helper: thread count");
    let runtime = common::helper_runtime(threads, "off");
    match arg(0) {
        "backend" => {
            let keep_alive_ms: u64 = arg(2).parse().expect("helper: keep-alive ms");
            let backend = runtime
                .block_on(SimBackend::start(SimConfig {
                    listen: "127.0.0.1:0".parse().expect("address"),
                    workers: 1024,
                    service_time_ms: 0.0,
                    keep_alive_timeout_ms: keep_alive_ms,
                    max_keep_alive_requests: MAX_KEEP_ALIVE_REQUESTS,
                    ..SimConfig::default()
                }))
                .expect("sim backend starts");
            common::announce_and_wait_for_parent(backend.addr());
            runtime.block_on(backend.shutdown());
        }
        "loadgate" => {
            let backend: SocketAddr = arg(2).parse().expect("helper: backend address");
            let admin: SocketAddr = arg(3).parse().expect("helper: admin address");
            let config = loadgate_config(threads, backend, admin, arg(4) == "retry");
            let proxy = runtime
                .block_on(Proxy::start(config))
                .expect("loadgate starts");
            common::announce_and_wait_for_parent(proxy.addr());
            runtime.block_on(proxy.shutdown());
        }
        other => panic!("unknown helper role {other:?}"),
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// One upstream whose idle timeout outlives the backend's keep-alive timeout (the
/// misconfiguration under test); health checks and the actuator poller off, so the
/// only traffic is the bench's. Retry off is `idempotent_methods = []`: a request
/// written on a connection that then dies is answered 502, whatever its method (one
/// never written is still retried; it cannot have reached the backend).
fn loadgate_config(workers: usize, backend: SocketAddr, admin: SocketAddr, retry: bool) -> Config {
    // An empty list turns the replay of written requests off.
    let methods = if retry {
        r#"["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]"#
    } else {
        "[]"
    };
    common::loadgate_config(
        workers,
        backend,
        admin,
        &format!("idle_timeout_ms = {LOADGATE_IDLE_MS}\nretry.idempotent_methods = {methods}"),
        "",
    )
}
