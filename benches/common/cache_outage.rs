//! The cache bench's "stale on error" row: a cached read route under steady load
//! whose origin is stopped for 5 s, through loadgate and nginx in the same run.
//!
//! Each run, per proxy: every key fetched through the proxy first (all stored, none
//! served stale), then closed-loop load over the keys: a window with the origin up,
//! the origin's listener dropped for [`OUTAGE`] (connections refused), the origin
//! started again on the same port, and a little more load. Every request is
//! timestamped, and the windows are cut by send time afterwards.
//!
//! Not here: the hit-path rows and the helper process (`benches/cache.rs`); the load
//! itself and its windows (`cache_outage_load.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use loadgate::sim::{SimBackend, SimConfig, SimRoute};

use super::common::{self, fmt_us, median, print_table, Process};
use super::{fetch, nginx_cache_conf, Settings, HELPER};
use load::{Got, Window};

#[path = "cache_outage_load.rs"]
mod load;

/// The helper role that runs loadgate with [`loadgate_config`].
pub const HELPER_ROLE: &str = "loadgate-stale";
/// How many keys the load cycles over; all are stored before it starts.
const KEYS: usize = 100;
/// Key `i` is this prefix and `i`.
const KEY_PREFIX: &str = "/api/stale/";
/// What the origin says about every key: stale after a second, so within a second of
/// the stop every answer must be a stale copy, and usable stale on error for a minute,
/// far longer than a run. Sent by the origin rather than set with loadgate's
/// `cache_stale_if_error_ms` so that both proxies work from the same response: nginx
/// reads `stale-if-error` too (below its `proxy_cache_use_stale`), while a route key
/// would be a loadgate-only setting. A Spring origin that sends no such header would
/// need the route key instead; the rule that serves the copy is the same.
const ORIGIN_CACHE_CONTROL: &str = "max-age=1, stale-if-error=60";
/// nginx's side of the issue's comparison.
const NGINX_USE_STALE: &str =
    "proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;";
/// How long the origin is down.
const OUTAGE: Duration = Duration::from_secs(5);
/// Load kept up after the origin is back, to see errors while the proxy reconnects.
const AFTER: Duration = Duration::from_secs(2);
/// Room in the schedule for stopping and starting the origin.
const SLACK: Duration = Duration::from_secs(1);
/// A stale copy served this close to the end of the load means the proxy had not
/// gone back to the origin yet.
const STILL_STALE: Duration = Duration::from_millis(200);
/// How long a proxy may take to reach the origin again before a run.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// "p99 unchanged": p99 during the outage at most this times p99 with the origin up,
/// in the same run. Not 1.0: on a shared machine two windows of the same load move
/// p99 by tens of percent.
const TARGET_P99_RATIO: f64 = 1.5;

/// The path of key `i`.
fn key(i: usize) -> String {
    format!("{KEY_PREFIX}{}", i % KEYS)
}

/// loadgate's configuration for this row: its defaults (health checks and the actuator
/// poller on, the stock retry and ejection rules, the default pool) except
/// - the worker threads, set to nginx's worker processes (both are the core count by default);
/// - the listen and admin ports: any free port on 127.0.0.1, so nothing else is disturbed;
/// - `cache = "on"` on the route: the scenario is a cached read route.
///
/// The stale-if-error window comes from the origin's `Cache-Control` (see
/// [`ORIGIN_CACHE_CONTROL`]), not from the route.
pub fn loadgate_config(threads: usize, backend: SocketAddr) -> loadgate::config::Config {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
worker_threads = {threads}
[admin]
listen = "127.0.0.1:0"
[[upstream]]
name = "app"
backends = ["{backend}"]
[[route]]
name = "catalog"
path_prefix = "/"
upstream = "app"
cache = "on"
"#
    );
    loadgate::config::Config::parse(&text, "cache outage bench config")
        .expect("bench config is valid")
}

// ---------------------------------------------------------------------------
// The origin: stopped and started again on the same port
// ---------------------------------------------------------------------------

/// The simulated backend on a fixed 127.0.0.1 port, on a runtime of its own. Stopping
/// it drops its listener (a connect is refused) and closes its idle connections after
/// the requests in flight; starting it binds the same port again (`SO_REUSEADDR`).
struct Origin {
    runtime: tokio::runtime::Runtime,
    config: SimConfig,
    running: Option<SimBackend>,
}

impl Origin {
    fn start() -> std::io::Result<Origin> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let port = common::free_local_port()?;
        let config = SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            // The simulated Tomcat's stock pool and keep-alive rules; no service time,
            // so the window with the origin up measures the caches, not the origin.
            service_time_ms: 0.0,
            routes: vec![SimRoute {
                path_prefix: KEY_PREFIX.trim_end_matches('/').to_string(),
                service_time_ms: None,
                distribution: None,
                cache_control: Some(ORIGIN_CACHE_CONTROL.to_string()),
                body_bytes: None,
            }],
            ..SimConfig::default()
        };
        let mut origin = Origin {
            runtime,
            config,
            running: None,
        };
        origin.restart()?;
        Ok(origin)
    }

    fn addr(&self) -> SocketAddr {
        self.config.listen
    }

    /// Stops accepting at once; waits for the requests in flight (bounded by the
    /// simulated backend's grace period).
    fn stop(&mut self) {
        if let Some(backend) = self.running.take() {
            self.runtime.block_on(backend.shutdown());
        }
    }

    /// Starts it on its port again: a few tries over a second, in case the port is
    /// still held a moment.
    fn restart(&mut self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self
                .runtime
                .block_on(SimBackend::start(self.config.clone()))
            {
                Ok(backend) => {
                    self.running = Some(backend);
                    return Ok(());
                }
                Err(error) if Instant::now() < deadline => {
                    eprintln!("origin: binding {} again: {error}; retrying", self.addr());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => return Err(error),
            }
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// The row
// ---------------------------------------------------------------------------

/// One run through one proxy.
struct Run {
    up: Window,
    outage: Window,
    after: Window,
    /// How long after the origin's restart the proxy still served stale copies as if
    /// the origin were failing.
    stale_until: Until,
}

/// When the last stale copy on error after the restart was served.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// Sent this long after the restart, within the load.
    During(Duration),
    /// Still served as the load ended; every key was fresh again this long after the
    /// restart, found by asking after the load.
    AfterLoad(Duration),
}

impl Until {
    fn secs(self) -> f64 {
        match self {
            Until::During(d) | Until::AfterLoad(d) => d.as_secs_f64(),
        }
    }
}

impl Run {
    fn p99_ratio(&self) -> f64 {
        self.outage.p99_us() / self.up.p99_us()
    }
}

struct Target {
    proxy: &'static str,
    addr: SocketAddr,
    runs: Vec<Run>,
}

/// Measures the row and prints its table.
pub fn bench(s: &Settings) -> std::io::Result<()> {
    let mut origin = Origin::start()?;
    println!(
        "stale on error: {} connections over {KEYS} keys ({KEY_PREFIX}0..{}); per run {} s \
         warm-up, {} s with the origin up, the origin stopped for {} s (connections \
         refused), {} s after it is back; {} round(s); origin on {} with Cache-Control: \
         {ORIGIN_CACHE_CONTROL}",
        s.connections,
        KEYS - 1,
        s.warmup_secs,
        s.secs,
        OUTAGE.as_secs(),
        AFTER.as_secs(),
        s.rounds,
        origin.addr(),
    );
    let (loadgate, loadgate_addr) = Process::spawn_self(
        "loadgate",
        &[
            HELPER.into(),
            HELPER_ROLE.into(),
            s.workers.to_string(),
            origin.addr().to_string(),
        ],
    )?;
    let nginx = common::nginx::start_or_skip(|dir, listen| {
        nginx_cache_conf(dir, s.workers, listen, origin.addr(), NGINX_USE_STALE)
    });
    let mut targets = vec![Target {
        proxy: "loadgate",
        addr: loadgate_addr,
        runs: Vec::new(),
    }];
    if let Some(nginx) = &nginx {
        targets.push(Target {
            proxy: "nginx",
            addr: nginx.addr,
            runs: Vec::new(),
        });
    }

    let n = targets.len();
    for round in 0..s.rounds {
        for k in 0..n {
            let target = &mut targets[(round + k) % n];
            let run = run(s, target, &mut origin)?;
            println!(
                "  round {}/{}  {:<9} up: {:>6.0} req/s p99 {:>9} | down: {:>6.0} req/s p99 \
                 {:>9} ({:.2}x) max {:>9}, {} of {} answers stale, errors: {} | after: errors: \
                 {}, stale on error until {}",
                round + 1,
                s.rounds,
                target.proxy,
                run.up.rps(),
                fmt_us(run.up.p99_us()),
                run.outage.rps(),
                fmt_us(run.outage.p99_us()),
                run.p99_ratio(),
                fmt_us(run.outage.max_us()),
                run.outage.stale,
                run.outage.latencies_us.len(),
                run.outage.error_kinds(),
                run.after.error_kinds(),
                fmt_until(run.stale_until),
            );
            target.runs.push(run);
        }
    }
    drop(nginx);
    drop(loadgate);
    drop(origin);
    report(s, &targets);
    Ok(())
}

/// One run through `target`: ready, load with the origin up, down, and up again.
fn run(s: &Settings, target: &Target, origin: &mut Origin) -> std::io::Result<Run> {
    fill(target)?;
    let up_from = Duration::from_secs_f64(s.warmup_secs);
    let stop_at = up_from + Duration::from_secs_f64(s.secs);
    let length = stop_at + OUTAGE + SLACK + AFTER;
    // A moment ahead, so every connection starts on time.
    let start = Instant::now() + Duration::from_millis(50);
    let (addr, connections, threads) = (target.addr, s.connections, s.client_threads);
    let paths: Vec<String> = (0..KEYS).map(key).collect();
    let (samples, restarted_at) = std::thread::scope(|scope| {
        let load = scope.spawn(move || {
            let runtime = common::load_runtime(threads);
            let start = tokio::time::Instant::from_std(start);
            let samples =
                runtime.block_on(load::run(addr, paths, connections, start, start + length));
            runtime.shutdown_timeout(Duration::from_secs(1));
            samples
        });
        sleep_until(start + stop_at);
        origin.stop();
        sleep_until(start + stop_at + OUTAGE);
        let restarted = origin.restart();
        let restarted_at = start.elapsed();
        let samples = load.join().expect("load thread");
        restarted.map(|()| (samples, restarted_at))
    })?;
    let last_stale = samples
        .iter()
        .rev()
        .find(|s| s.got == Got::StaleOnError)
        .map_or(Duration::ZERO, |s| s.sent);
    let stale_until = if last_stale + STILL_STALE >= length {
        // Still serving stale copies as the load ended: ask until every key is fresh
        // again, and count from the restart.
        fill(target)?;
        Until::AfterLoad(start.elapsed().saturating_sub(restarted_at))
    } else {
        Until::During(last_stale.saturating_sub(restarted_at))
    };
    Ok(Run {
        up: Window::cut(&samples, up_from, stop_at),
        outage: Window::cut(&samples, stop_at, restarted_at),
        after: Window::cut(&samples, restarted_at, length),
        stale_until,
    })
}

fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

/// Fetches every key through the proxy until each is a 200 that is not a stale copy:
/// after it every key is stored, and the proxy reaches the origin again (a proxy may
/// keep serving stale copies for a while after an outage).
fn fill(target: &Target) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + READY_WITHIN;
    for i in 0..KEYS {
        loop {
            let answer = runtime.block_on(fetch(target.addr, &key(i), &[]));
            let last = match answer {
                Ok((status, headers)) if load::got(status, &headers) == Got::Fresh => break,
                Ok((status, headers)) => format!("{status}, {:?}", load::got(status, &headers)),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "{} did not store {} within {READY_WITHIN:?} (last answer: {last})",
                    target.proxy,
                    key(i)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Seconds with two decimals, `>` when found only after the load.
fn fmt_until(until: Until) -> String {
    match until {
        Until::During(d) => format!("{:.2} s", d.as_secs_f64()),
        Until::AfterLoad(d) => format!(">{:.2} s", d.as_secs_f64()),
    }
}

fn report(s: &Settings, targets: &[Target]) {
    println!();
    println!(
        "stale on error, medians of {} round(s) (errors and stale answers: totals):",
        s.rounds
    );
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            let med = |f: fn(&Run) -> f64| median(&t.runs.iter().map(f).collect::<Vec<_>>());
            let sum = |f: fn(&Run) -> u64| t.runs.iter().map(f).sum::<u64>();
            let answered = sum(|r| r.outage.latencies_us.len() as u64);
            vec![
                t.proxy.to_string(),
                format!("{:.0}", med(|r| r.up.rps())),
                format!("{:.0}", med(|r| r.outage.rps())),
                fmt_us(med(|r| r.up.p99_us())),
                fmt_us(med(|r| r.outage.p99_us())),
                format!("{:.2}x", med(Run::p99_ratio)),
                format!(
                    "{:.1}%",
                    100.0 * sum(|r| r.outage.stale) as f64 / answered.max(1) as f64
                ),
                sum(|r| r.outage.errors()).to_string(),
                sum(|r| r.after.errors()).to_string(),
                format!(
                    "{}{:.2} s",
                    if t.runs
                        .iter()
                        .any(|r| matches!(r.stale_until, Until::AfterLoad(_)))
                    {
                        ">"
                    } else {
                        ""
                    },
                    med(|r| r.stale_until.secs())
                ),
            ]
        })
        .collect();
    print_table(
        &[
            "proxy",
            "req/s up",
            "req/s down",
            "p99 up",
            "p99 down",
            "p99 down/up",
            "stale answers down",
            "errors down",
            "errors after",
            "stale until",
        ],
        &rows,
    );
    println!(
        "(up: the origin running; down: from its stop to its restart ({} s); after: the {} s \
         after; stale answers: share of the answers while down served from a stale copy; \
         stale until: from the restart to the last copy served stale because of an error \
         (nginx STALE, loadgate detail=stale-if-error); > when it was still \
         serving them as the load ended)",
        OUTAGE.as_secs(),
        AFTER.as_secs(),
    );
    for t in targets {
        for (i, r) in t.runs.iter().enumerate() {
            if r.outage.errors() + r.after.errors() > 0 {
                println!(
                    "{} round {}: errors while down: {}; after the restart: {}",
                    t.proxy,
                    i + 1,
                    r.outage.error_kinds(),
                    r.after.error_kinds()
                );
            }
        }
    }

    let verdict = |t: &Target| {
        let errors: u64 = t.runs.iter().map(|r| r.outage.errors()).sum();
        let stale: u64 = t.runs.iter().map(|r| r.outage.stale).sum();
        let ratio = median(&t.runs.iter().map(Run::p99_ratio).collect::<Vec<_>>());
        (errors, stale, ratio)
    };
    let nginx = match targets.iter().find(|t| t.proxy == "nginx") {
        Some(t) => {
            let (errors, _, ratio) = verdict(t);
            format!("nginx in the same run: {errors} errors, p99 {ratio:.2}x")
        }
        None => "nginx skipped (see above)".to_string(),
    };
    let (errors, stale, ratio) = verdict(&targets[0]);
    let met = errors == 0 && ratio <= TARGET_P99_RATIO && stale > 0;
    println!(
        "target: zero errors for stored keys while the origin is down {} s, and p99 unchanged \
         (p99 down <= {TARGET_P99_RATIO}x p99 up, same run): {} (loadgate: {errors} errors, \
         p99 {ratio:.2}x; {nginx})",
        OUTAGE.as_secs(),
        if met { "met" } else { "NOT met" },
    );
    for t in targets {
        if verdict(t).1 == 0 {
            println!(
                "WARNING: {}: no answer while the origin was down was a stale copy, so the \
                 row proves nothing for it",
                t.proxy
            );
        }
    }
}
