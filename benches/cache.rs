//! The shared cache next to nginx's `proxy_cache`, measured in one run: its hit path, and
//! serving stored copies while the origin is down.
//!
//! Two kinds of answer straight from the cache, each through loadgate (`cache = "on"`)
//! and through nginx (`proxy_cache` + `proxy_cache_revalidate on`, when installed):
//! - **304**: every client request carries the stored ETag in `If-None-Match`, so the
//!   proxy answers 304 Not Modified from its cache;
//! - **200**: plain GETs answered with the stored body (a ~100-byte JSON document).
//!
//! The origin is the simulated backend with `Cache-Control: max-age=3600`, so
//! nothing expires during the run; each proxy's cache is filled by one smoke-check
//! request before any load, and the bench checks that both proxies really answer
//! from their cache (loadgate's `Cache-Status`, nginx's `$upstream_cache_status`
//! in an `X-Cache-Status` header). The backend's request count is read at the start
//! and end of every timed window and printed per target: it should stay at zero.
//!
//! Closed-loop load (64 keep-alive HTTP/1.1 connections); the targets run
//! interleaved over several rounds and the table shows medians, because shared
//! machines are noisy. Processes: loadgate runs in a process of its own (this
//! binary re-executed in a helper role); nginx as its own master + workers; the
//! backend in this process on a runtime of its own (so its request count can be
//! read directly; it has nothing to do while the caches answer); the load
//! generator in this process on another runtime. All traffic stays on 127.0.0.1.
//!
//! A second table, **stale on error** (`common/cache_outage.rs`), keeps a read route
//! under steady load while its origin is stopped for 5 s: a fresh loadgate and nginx
//! (now with `proxy_cache_use_stale error timeout updating http_500 http_502 http_503
//! http_504`) in front of a simulated origin on a fixed port that sends
//! `Cache-Control: max-age=1, stale-if-error=60` for 100 keys, all stored before the
//! load starts. Each run measures a window with the origin up, then drops the origin's
//! listener (connections are refused) for 5 s, then starts it again on the same port.
//! Entries go stale within a second of the stop, so for most of the outage every
//! answer has to be a stale copy. Per proxy and run: p99 during the outage over p99
//! with the origin up, errors (any status other than 2xx/304, or no answer) during the
//! outage and after the restart, how many answers were served stale, and how long after
//! the restart stale copies were still served. Target: zero errors for stored keys and
//! p99 unchanged (at most 1.5x), nginx measured in the same run. loadgate runs with its
//! defaults here (health checks and the actuator poller on), plus `cache = "on"`.
//!
//! ```sh
//! cargo bench --bench cache
//! LOADGATE_BENCH_SECS=10 LOADGATE_BENCH_ROUNDS=5 cargo bench --bench cache
//! ```
//!
//! Settings (environment):
//! - `LOADGATE_BENCH_SECS` measured seconds per run (5; in the outage row, the window with
//!   the origin up), `LOADGATE_BENCH_WARMUP_SECS` (1)
//! - `LOADGATE_BENCH_ROUNDS` rounds of all targets (3)
//! - `LOADGATE_BENCH_CONNECTIONS` client connections (64)
//! - `LOADGATE_BENCH_WORKERS` loadgate worker threads = nginx worker_processes (the core count)
//! - `LOADGATE_BENCH_CLIENT_THREADS` the load generator's runtime threads (1)
//! - `LOADGATE_BENCH_NGINX` path of nginx, or `off` to skip it (found on PATH or in /usr/sbin)
//! - `LOADGATE_BENCH_CACHE_ROWS` `all` (default), `hits` (the hit-path table) or `stale`
//!   (the stale-on-error table)

mod common;
#[path = "common/cache_outage.rs"]
mod outage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{env_or, fmt_us, median, print_table, Load, LoadResult, Process, Runs};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use loadgate::listener::Proxy;
use loadgate::sim::{SimBackend, SimConfig, SimRoute, SimStats};

/// The first argument of a helper process.
const HELPER: &str = "--cache-helper";
/// The request every target serves.
const PATH: &str = "/api/catalog/42";
/// What the origin says about it: fresh for the whole run.
const CACHE_CONTROL: &str = "max-age=3600";
/// The issue's target: loadgate's req/s over nginx's on 304s from cache.
const TARGET_304_RATIO: f64 = 1.2;

struct Settings {
    secs: f64,
    warmup_secs: f64,
    rounds: usize,
    connections: usize,
    workers: usize,
    client_threads: usize,
    /// Which tables to run: the hit path, stale on error, or both.
    hit_rows: bool,
    stale_rows: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let rows: String = env_or("LOADGATE_BENCH_CACHE_ROWS", "all".to_string());
        if !matches!(rows.as_str(), "all" | "hits" | "stale") {
            eprintln!("LOADGATE_BENCH_CACHE_ROWS={rows:?}: expected all, hits or stale");
            std::process::exit(2);
        }
        Settings {
            secs: env_or("LOADGATE_BENCH_SECS", 5.0),
            warmup_secs: env_or("LOADGATE_BENCH_WARMUP_SECS", 1.0),
            rounds: env_or("LOADGATE_BENCH_ROUNDS", 3usize).max(1),
            connections: env_or("LOADGATE_BENCH_CONNECTIONS", 64usize).max(1),
            workers: env_or("LOADGATE_BENCH_WORKERS", common::cores()).max(1),
            client_threads: env_or("LOADGATE_BENCH_CLIENT_THREADS", 1usize).max(1),
            hit_rows: rows != "stale",
            stale_rows: rows != "hits",
        }
    }
}

fn main() {
    common::main_with_helpers(
        "cache",
        HELPER,
        helper_main,
        || bench(&Settings::from_env()),
    );
}

/// A 200 from the stored body, or a 304 to a matching `If-None-Match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    NotModified,
    Hit,
}

struct Target {
    name: String,
    proxy: &'static str,
    answer: Answer,
    addr: SocketAddr,
    /// The proxy's own process, whose CPU time is measured (with its children: nginx's
    /// workers; listed at each sample, as nginx's cache loader exits after a while).
    pid: u32,
    etag: HeaderValue,
    runs: Runs,
    /// Requests the backend received during each run's timed window.
    backend_requests: Vec<u64>,
    /// Runs in which some answer was not the expected kind (a 200 in a 304 run…).
    wrong_answers: u64,
}

fn bench(s: &Settings) -> std::io::Result<()> {
    if s.hit_rows {
        hit_rows(s)?;
    }
    if s.hit_rows && s.stale_rows {
        println!();
    }
    if s.stale_rows {
        outage::bench(s)?;
    }
    Ok(())
}

/// The hit-path table: 304s and 200s from each proxy's cache.
fn hit_rows(s: &Settings) -> std::io::Result<()> {
    println!(
        "cache: {} connections, {} s measured after {} s warm-up, {} round(s); \
         loadgate {} worker thread(s), nginx {} worker process(es), load generator {} thread(s), \
         {} core(s); GET {PATH} (origin: Cache-Control: {CACHE_CONTROL})",
        s.connections,
        s.secs,
        s.warmup_secs,
        s.rounds,
        s.workers,
        s.workers,
        s.client_threads,
        common::cores(),
    );

    // The backend, in this process on a runtime of its own; dropped last.
    let backend_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let backend = backend_runtime.block_on(SimBackend::start(SimConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        workers: 1024,
        service_time_ms: 0.0,
        max_keep_alive_requests: 0,
        keep_alive_timeout_ms: 60_000,
        routes: vec![SimRoute {
            path_prefix: "/api/catalog".to_string(),
            service_time_ms: None,
            distribution: None,
            cache_control: Some(CACHE_CONTROL.to_string()),
            body_bytes: None,
        }],
        ..SimConfig::default()
    }))?;
    let backend_addr = backend.addr();
    let stats = backend.stats();

    let (loadgate, loadgate_addr) = Process::spawn_self(
        "loadgate",
        &[
            HELPER.into(),
            "loadgate".into(),
            s.workers.to_string(),
            backend_addr.to_string(),
        ],
    )?;
    let nginx = common::nginx::start_or_skip(|dir, listen| {
        nginx_cache_conf(dir, s.workers, listen, backend_addr, "")
    });

    // Fill each cache with one request, and check that it then answers from it.
    let mut proxies = vec![("loadgate", loadgate_addr, loadgate.id())];
    if let Some(nginx) = &nginx {
        proxies.push(("nginx", nginx.addr, nginx.process.id()));
    }
    let mut targets = Vec::new();
    for (proxy, addr, pid) in proxies {
        let before = stats.total_requests();
        let etag = smoke_check(proxy, addr)?;
        println!(
            "smoke check {proxy}: a 200 miss, then a 200 and a 304 from its cache; backend requests {}",
            stats.total_requests() - before
        );
        for answer in [Answer::NotModified, Answer::Hit] {
            let kind = match answer {
                Answer::NotModified => "304 from cache",
                Answer::Hit => "200 from cache",
            };
            targets.push(Target {
                name: format!("{proxy} {kind}"),
                proxy,
                answer,
                addr,
                pid,
                etag: etag.clone(),
                runs: Runs::default(),
                backend_requests: Vec::new(),
                wrong_answers: 0,
            });
        }
    }
    // Interleave: loadgate 304, nginx 304, loadgate 200, nginx 200.
    targets.sort_by_key(|t| (t.answer == Answer::Hit, t.proxy != "loadgate"));

    let n = targets.len();
    for round in 0..s.rounds {
        // Each round starts with a different target, so none always runs first or last.
        for k in 0..n {
            let target = &mut targets[(round + k) % n];
            let (result, backend_requests) = run(s, target, &stats);
            let expected = match target.answer {
                Answer::NotModified => result.ok() as u64,
                Answer::Hit => 0,
            };
            if result.not_modified != expected {
                target.wrong_answers += 1;
            }
            println!(
                "  round {}/{}  {:<22} {:>9.0} req/s  p50 {:>9}  p99 {:>9}  cpu/req {:>7}  \
                 backend reqs {}  304s {}  errors {}",
                round + 1,
                s.rounds,
                target.name,
                result.rps(),
                fmt_us(
                    result
                        .quantile(0.50)
                        .map_or(f64::NAN, |d| d.as_micros() as f64)
                ),
                fmt_us(
                    result
                        .quantile(0.99)
                        .map_or(f64::NAN, |d| d.as_micros() as f64)
                ),
                fmt_cpu(result.cpu_us_per_request().unwrap_or(f64::NAN)),
                backend_requests,
                result.not_modified,
                result.errors,
            );
            target.runs.runs.push(result);
            target.backend_requests.push(backend_requests);
        }
    }

    println!();
    println!("medians of {} round(s):", s.rounds);
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                format!("{:.0}", t.runs.rps()),
                fmt_us(t.runs.quantile_us(0.50)),
                fmt_us(t.runs.quantile_us(0.99)),
                fmt_cpu(t.runs.cpu_us_per_request()),
                t.backend_requests.iter().sum::<u64>().to_string(),
                t.runs.errors().to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "target",
            "req/s",
            "p50",
            "p99",
            "cpu/req",
            "backend reqs",
            "errors",
        ],
        &rows,
    );
    println!(
        "(backend reqs: requests the origin received during the timed windows of all rounds; \
         cpu/req: CPU time of the proxy's own processes per response)"
    );
    for t in targets.iter().filter(|t| t.wrong_answers > 0) {
        println!(
            "WARNING: {}: {} run(s) got answers of the wrong kind (304 vs 200)",
            t.name, t.wrong_answers
        );
    }

    let find = |proxy: &str, answer| {
        targets
            .iter()
            .find(|t| t.proxy == proxy && t.answer == answer)
    };
    let mut met = None;
    for (answer, label) in [(Answer::NotModified, "304"), (Answer::Hit, "200")] {
        let (Some(l), Some(n)) = (find("loadgate", answer), find("nginx", answer)) else {
            println!("loadgate / nginx on {label}s: not measured (see above)");
            continue;
        };
        let rps = l.runs.rps() / n.runs.rps();
        let per_round: Vec<f64> = l
            .runs
            .runs
            .iter()
            .zip(&n.runs.runs)
            .map(|(a, b)| a.rps() / b.rps())
            .collect();
        println!(
            "loadgate / nginx on {label}s from cache: {rps:.2}x req/s, p50 {:.2}x, p99 {:.2}x, \
             cpu/req {:.2}x; req/s by round: {} (median {:.2}x)",
            l.runs.quantile_us(0.50) / n.runs.quantile_us(0.50),
            l.runs.quantile_us(0.99) / n.runs.quantile_us(0.99),
            l.runs.cpu_us_per_request() / n.runs.cpu_us_per_request(),
            per_round
                .iter()
                .map(|r| format!("{r:.2}x"))
                .collect::<Vec<_>>()
                .join(" "),
            median(&per_round),
        );
        if answer == Answer::NotModified {
            let zero = l.backend_requests.iter().all(|&b| b == 0) && l.wrong_answers == 0;
            met = Some((rps, rps >= TARGET_304_RATIO && zero, zero));
        }
    }
    match met {
        Some((rps, ok, zero)) => println!(
            "target: loadgate >= {TARGET_304_RATIO}x nginx req/s on 304s from cache with zero \
             backend requests: {} ({rps:.2}x; backend requests {})",
            if ok { "met" } else { "NOT met" },
            if zero { "zero" } else { "NOT zero" },
        ),
        None => println!("target: not measured without nginx"),
    }
    drop(nginx);
    drop(loadgate);
    backend_runtime.block_on(backend.shutdown());
    Ok(())
}

/// One closed-loop run of `target`, with the backend's request count over its timed window.
fn run(s: &Settings, target: &Target, stats: &Arc<SimStats>) -> (LoadResult, u64) {
    let headers = match target.answer {
        Answer::NotModified => vec![(http::header::IF_NONE_MATCH, target.etag.clone())],
        Answer::Hit => Vec::new(),
    };
    let load = Load {
        addr: target.addr,
        path: PATH.to_string(),
        headers,
        connections: s.connections,
        warmup: Duration::from_secs_f64(s.warmup_secs),
        duration: Duration::from_secs_f64(s.secs),
        request_timeout: Duration::from_secs(5),
    };
    // Sampled like the CPU time: at the end of the warm-up and at the end of the window.
    let counter = {
        let stats = stats.clone();
        let (warmup, duration) = (load.warmup, load.duration);
        std::thread::spawn(move || {
            std::thread::sleep(warmup);
            let before = stats.total_requests();
            std::thread::sleep(duration);
            stats.total_requests() - before
        })
    };
    let pid = target.pid;
    let result = load.run_watching_cpu(s.client_threads, move || common::with_children(pid));
    let backend_requests = counter.join().expect("counter thread");
    (result, backend_requests)
}

/// CPU microseconds with one decimal: `12.3 µs`.
fn fmt_cpu(us: f64) -> String {
    if us.is_nan() {
        "-".to_string()
    } else {
        format!("{us:.1} µs")
    }
}

/// nginx as a shared cache in front of the backend: the proxy config of
/// `proxy_overhead` plus `proxy_cache` (freshness from the origin's Cache-Control),
/// `proxy_cache_revalidate on`, and `$upstream_cache_status` in a response header so
/// the smoke check can see where the answer came from. `location` adds directives to
/// the proxied location (e.g. `proxy_cache_use_stale`).
fn nginx_cache_conf(
    dir: &std::path::Path,
    workers: usize,
    listen: SocketAddr,
    backend: SocketAddr,
    location: &str,
) -> String {
    common::nginx::proxy_conf_with(
        dir,
        workers,
        listen,
        backend,
        "proxy_cache_path {dir}/cache levels=1:2 keys_zone=bench:10m max_size=64m inactive=1h use_temp_path=off;",
        &format!(
            "proxy_cache bench;\n\
             proxy_cache_revalidate on;\n\
             add_header X-Cache-Status $upstream_cache_status always;\n\
             {location}"
        ),
    )
}

/// Fills the proxy's cache and checks it answers from it: a 200 (the miss), a 200
/// hit, and a 304 hit to the ETag. Returns the ETag.
fn smoke_check(proxy: &str, addr: SocketAddr) -> std::io::Result<HeaderValue> {
    let fail = |why: String| std::io::Error::other(format!("{proxy} at {addr}: {why}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let first = runtime
        .block_on(fetch(addr, PATH, &[]))
        .map_err(|e| fail(e.to_string()))?;
    if first.0 != StatusCode::OK {
        return Err(fail(format!("GET {PATH} answered {}", first.0)));
    }
    let etag = first
        .1
        .get(http::header::ETAG)
        .cloned()
        .ok_or_else(|| fail("no ETag on the response".to_string()))?;
    let from_cache = |headers: &HeaderMap| match proxy {
        "nginx" => headers
            .get("x-cache-status")
            .is_some_and(|v| v.as_bytes() == b"HIT"),
        _ => headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("loadgate; hit")),
    };
    let cache_header = |headers: &HeaderMap| {
        format!(
            "cache-status {:?}, x-cache-status {:?}",
            headers.get("cache-status"),
            headers.get("x-cache-status")
        )
    };
    // A proxy may store the response a moment after the client has all of it (nginx
    // renames its cache file when the upstream request is finalised): ask again for
    // up to a second until the answer comes from the cache.
    let mut hit = (StatusCode::OK, HeaderMap::new());
    for _ in 0..50 {
        hit = runtime
            .block_on(fetch(addr, PATH, &[]))
            .map_err(|e| fail(e.to_string()))?;
        if hit.0 != StatusCode::OK || from_cache(&hit.1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if hit.0 != StatusCode::OK || !from_cache(&hit.1) {
        return Err(fail(format!(
            "second GET: {} not from its cache ({})",
            hit.0,
            cache_header(&hit.1)
        )));
    }
    let conditional = runtime
        .block_on(fetch(
            addr,
            PATH,
            &[(http::header::IF_NONE_MATCH, etag.clone())],
        ))
        .map_err(|e| fail(e.to_string()))?;
    if conditional.0 != StatusCode::NOT_MODIFIED || !from_cache(&conditional.1) {
        return Err(fail(format!(
            "GET with If-None-Match: {} not a 304 from its cache ({})",
            conditional.0,
            cache_header(&conditional.1)
        )));
    }
    Ok(etag)
}

/// One GET of `path` on a connection of its own: status and headers.
async fn fetch(
    addr: SocketAddr,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
) -> Result<(StatusCode, HeaderMap), Box<dyn std::error::Error + Send + Sync>> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut request = Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::new())?;
        for (name, value) in headers {
            request.headers_mut().insert(name, value.clone());
        }
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        body.collect().await?;
        Ok((parts.status, parts.headers))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s")?
}

// ---------------------------------------------------------------------------
// Helper process: loadgate on its own runtime
// ---------------------------------------------------------------------------

fn helper_main(args: &[String]) {
    let arg = |i: usize| -> &str { args.get(i).map_or("", String::as_str) };
    let threads: usize = arg(1).parse().expect("helper: thread count");
    let backend: SocketAddr = arg(2).parse().expect("helper: backend address");
    let config = match arg(0) {
        "loadgate" => common::loadgate_config(
            threads,
            backend,
            "127.0.0.1:0".parse().expect("address"),
            "idle_timeout_ms = 60000",
            "cache = \"on\"",
        ),
        outage::HELPER_ROLE => outage::loadgate_config(threads, backend),
        other => panic!("unknown helper role {other:?}"),
    };
    // Requests are served by the proxy's own worker threads; this runtime only
    // starts them (and runs the admin port and, in the outage row, the pollers).
    let runtime = common::helper_runtime(1, "warn");
    let proxy = runtime
        .block_on(Proxy::start(config))
        .expect("loadgate starts");
    common::announce_and_wait_for_parent(proxy.addr());
    runtime.block_on(proxy.shutdown());
    runtime.shutdown_timeout(Duration::from_secs(1));
}
