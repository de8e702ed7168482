//! Helpers shared by the `harness = false` benches: a closed-loop HTTP/1.1 load
//! generator, latency percentiles and medians, a plain-text table, and helper
//! child processes (the bench binary re-executing itself in another role).
//!
//! Not here: anything about what a bench compares; each bench decides its targets.
#![allow(dead_code)]

pub mod backend;
pub mod haproxy;
pub mod hyper_floor;
pub mod nginx;
pub mod openloop;
#[path = "../../tests/it/support/tomcat.rs"]
pub mod tomcat;
pub mod waves;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Settings from the environment
// ---------------------------------------------------------------------------

/// `name` parsed from the environment, or `default` when unset. A value that does
/// not parse stops the bench with a message instead of being silently ignored.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("{name}={text:?} is not a valid value");
            std::process::exit(2);
        }),
        _ => default,
    }
}

/// The machine's parallelism: what tokio's default multi-thread runtime uses.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------------------
// Closed-loop load generator
// ---------------------------------------------------------------------------

/// One closed-loop run: `connections` HTTP/1.1 keep-alive connections, each sending
/// `GET path` (with `headers`), reading the whole response, and sending the next, for
/// `warmup + duration`. Only requests sent after the warm-up and finished before
/// the end are measured.
#[derive(Debug, Clone)]
pub struct Load {
    pub addr: SocketAddr,
    pub path: String,
    /// Extra request header fields sent with every request, e.g. `If-None-Match`.
    pub headers: Vec<(header::HeaderName, header::HeaderValue)>,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// A request without a complete response after this long counts as an error
    /// and its connection is replaced.
    pub request_timeout: Duration,
}

/// What one closed-loop run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Latency of every measured 2xx or 304 response, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// How many of those were 304 Not Modified (the answer to a conditional GET).
    pub not_modified: u64,
    /// Transport errors, timeouts and other responses in the measured window.
    pub errors: u64,
    pub duration: Duration,
    /// CPU time the watched processes used in the measured window (see
    /// [`Load::run_watching_cpu`]).
    pub cpu: Option<Duration>,
}

impl LoadResult {
    /// Adds what one connection (or stream) measured to this result.
    pub fn absorb(&mut self, one: LoadResult) {
        self.latencies_us.extend_from_slice(&one.latencies_us);
        self.not_modified += one.not_modified;
        self.errors += one.errors;
    }

    /// The result of a run of `duration` from its connections' `tasks`, each stopping by
    /// itself; one not finished by `bound` (a safety net) or failed counts as one error.
    pub async fn gather(
        tasks: Vec<tokio::task::JoinHandle<LoadResult>>,
        duration: Duration,
        bound: tokio::time::Instant,
    ) -> LoadResult {
        let mut result = LoadResult {
            duration,
            ..LoadResult::default()
        };
        for task in tasks {
            match tokio::time::timeout_at(bound, task).await {
                Ok(Ok(one)) => result.absorb(one),
                _ => result.errors += 1,
            }
        }
        result.latencies_us.sort_unstable();
        result
    }

    pub fn ok(&self) -> usize {
        self.latencies_us.len()
    }

    /// Successful responses per second of the measured window.
    pub fn rps(&self) -> f64 {
        self.ok() as f64 / self.duration.as_secs_f64()
    }

    /// CPU time of the watched processes per successful response, in microseconds.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.ok() > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ok() as f64)
    }

    /// The `q`-quantile (0.0..=1.0) of latency, nearest rank; `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        quantile_us(&self.latencies_us, q).map(|us| Duration::from_micros(us.into()))
    }
}

/// Nearest-rank quantile of sorted samples.
pub fn quantile_us(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.saturating_sub(1).min(sorted.len() - 1)])
}

/// A runtime of the load generator's own (`threads` workers; 1 means a current-thread
/// runtime), so it never shares worker threads with the system under test.
pub fn load_runtime(threads: usize) -> tokio::runtime::Runtime {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("load generator runtime")
}

impl Load {
    /// Runs the load on a runtime of its own (`threads` workers; 1 means a
    /// current-thread runtime), so it never shares worker threads with the
    /// system under test. Blocks until the run is over.
    pub fn run_on_own_runtime(&self, threads: usize) -> LoadResult {
        let runtime = load_runtime(threads);
        let result = runtime.block_on(self.run());
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    }

    /// Like [`Load::run_on_own_runtime`], and also measures the CPU time `pids()`
    /// use during the measured window (sampled from another thread; `pids` is
    /// called at each sample, so it may list processes that come and go).
    pub fn run_watching_cpu(
        &self,
        threads: usize,
        pids: impl Fn() -> Vec<u32> + Send + 'static,
    ) -> LoadResult {
        let (warmup, duration) = (self.warmup, self.duration);
        let sampler = std::thread::spawn(move || {
            std::thread::sleep(warmup);
            let before = cpu_time(&pids());
            std::thread::sleep(duration);
            let after = cpu_time(&pids());
            after.zip(before).map(|(a, b)| a.saturating_sub(b))
        });
        let mut result = self.run_on_own_runtime(threads);
        result.cpu = sampler.join().ok().flatten();
        result
    }

    /// Runs the load on the current runtime.
    pub async fn run(&self) -> LoadResult {
        let start = Instant::now();
        let measure_from = start + self.warmup;
        let end = measure_from + self.duration;
        let host = self.addr.to_string();
        let tasks: Vec<_> = (0..self.connections)
            .map(|_| {
                let load = self.clone();
                let host = host.clone();
                tokio::spawn(async move { load.connection(&host, measure_from, end).await })
            })
            .collect();
        // Each task stops by itself at `end`; the bound is only a safety net.
        let bound = end + self.request_timeout + Duration::from_secs(1);
        LoadResult::gather(tasks, self.duration, bound).await
    }

    /// One closed-loop connection; reconnects after an error until `end`.
    async fn connection(&self, host: &str, measure_from: Instant, end: Instant) -> LoadResult {
        let mut out = LoadResult::default();
        let count_error = |out: &mut LoadResult| {
            if Instant::now() >= measure_from {
                out.errors += 1;
            }
        };
        while Instant::now() < end {
            let connected =
                tokio::time::timeout(self.request_timeout, TcpStream::connect(self.addr)).await;
            let Ok(Ok(stream)) = connected else {
                count_error(&mut out);
                // Back off a little so a refused port does not turn into a busy loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
            else {
                count_error(&mut out);
                continue;
            };
            // The connection is driven in this task (no spawn): one task per connection
            // keeps the generator's own cost per request low.
            let mut conn = std::pin::pin!(conn);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    return out;
                }
                let mut request = Request::get(self.path.as_str())
                    .header(header::HOST, host)
                    .body(Empty::new())
                    .expect("valid request");
                for (name, value) in &self.headers {
                    request.headers_mut().append(name, value.clone());
                }
                let exchange = async {
                    let response = sender.send_request(request).await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    Ok::<StatusCode, hyper::Error>(status)
                };
                let deadline = (sent + self.request_timeout).min(end);
                let outcome = tokio::select! {
                    biased;
                    outcome = exchange => Some(outcome),
                    _ = conn.as_mut() => None,
                    () = tokio::time::sleep_until(deadline) => {
                        if deadline >= end {
                            return out; // the run is over; the request in flight is not measured
                        }
                        None
                    }
                };
                let done = Instant::now();
                match outcome {
                    Some(Ok(status))
                        if status.is_success() || status == StatusCode::NOT_MODIFIED =>
                    {
                        if sent >= measure_from && done <= end {
                            let us = done.duration_since(sent).as_micros();
                            out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                            if status == StatusCode::NOT_MODIFIED {
                                out.not_modified += 1;
                            }
                        }
                    }
                    Some(Ok(_)) => count_error(&mut out),
                    // Error, timeout or the peer closed: replace the connection.
                    _ => {
                        count_error(&mut out);
                        break;
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Summaries and tables
// ---------------------------------------------------------------------------

/// The median of `values` (mean of the middle two for an even count); NaN if empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Several closed-loop runs of one target, summarised by medians.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    pub runs: Vec<LoadResult>,
}

impl Runs {
    pub fn rps(&self) -> f64 {
        median(&self.runs.iter().map(LoadResult::rps).collect::<Vec<_>>())
    }

    /// Median over runs of each run's `q`-quantile latency, in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        median(
            &self
                .runs
                .iter()
                .map(|r| quantile_us(&r.latencies_us, q).map_or(f64::NAN, f64::from))
                .collect::<Vec<_>>(),
        )
    }

    /// Median over runs of the CPU time per response, in microseconds (NaN if unknown).
    pub fn cpu_us_per_request(&self) -> f64 {
        median(
            &self
                .runs
                .iter()
                .map(|r| r.cpu_us_per_request().unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        )
    }

    pub fn errors(&self) -> u64 {
        self.runs.iter().map(|r| r.errors).sum()
    }
}

/// Formats microseconds the way people read latencies: `87 µs`, `1.42 ms`.
pub fn fmt_us(us: f64) -> String {
    if us.is_nan() {
        "-".to_string()
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// Prints a left-aligned first column and right-aligned others, padded to fit.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let columns = header.len();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns).map(width).collect();
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 0 {
                text.push_str(&format!("{cell:<w$}", w = widths[0]));
            } else {
                text.push_str(&format!("  {cell:>w$}", w = widths[i]));
            }
        }
        println!("{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

// ---------------------------------------------------------------------------
// Helper processes
// ---------------------------------------------------------------------------

/// How long a helper process may take to report its address.
const HELPER_START: Duration = Duration::from_secs(15);
/// How long a stopped process may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A child process stopped (and reaped) when dropped, even on panic.
pub struct Process {
    name: String,
    child: Child,
    /// Helpers exit when their stdin closes, so they die with the bench.
    stdin: Option<ChildStdin>,
    /// For processes that do not watch stdin: stopped with SIGTERM.
    term_with_signal: bool,
}

impl Process {
    /// Spawns this bench binary again with `args` (it should call [`helper_main`]),
    /// and waits for the address it prints on its first line of stdout.
    pub fn spawn_self(name: &str, args: &[String]) -> std::io::Result<(Process, SocketAddr)> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let process = Process {
            name: name.to_string(),
            child,
            stdin,
            term_with_signal: false,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(HELPER_START).map_err(|_| {
            std::io::Error::other(format!(
                "{name} did not report its address within {HELPER_START:?}"
            ))
        })?;
        let addr = line.trim().parse().map_err(|_| {
            std::io::Error::other(format!(
                "{name} did not start (first line: {:?})",
                line.trim()
            ))
        })?;
        Ok((process, addr))
    }

    /// Wraps a process that is stopped with SIGTERM (e.g. nginx's master).
    pub fn from_child(name: &str, child: Child) -> Process {
        Process {
            name: name.to_string(),
            child,
            stdin: None,
            term_with_signal: true,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks the process to stop, waits up to [`STOP_GRACE`], then kills it.
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        drop(self.stdin.take());
        if self.term_with_signal {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while std::time::Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {}) did not stop within {STOP_GRACE:?}; killing it",
            self.name,
            self.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The helper side of [`Process::spawn_self`]: prints `addr` as the first line of
/// stdout, then blocks until stdin closes (the parent stopped or died).
pub fn announce_and_wait_for_parent(addr: SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{addr}");
    let _ = out.flush();
    drop(out);
    let mut sink = String::new();
    while let Ok(n) = std::io::stdin().lock().read_line(&mut sink) {
        if n == 0 {
            break;
        }
        sink.clear();
    }
}

// ---------------------------------------------------------------------------
// CPU time of processes (Linux /proc; `None` elsewhere)
// ---------------------------------------------------------------------------

/// User + system CPU time used so far by `pids` (each process with all its threads).
pub fn cpu_time(pids: &[u32]) -> Option<Duration> {
    static TICKS_PER_SEC: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let hz = *TICKS_PER_SEC.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    });
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is field 3,
        // utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        ticks += fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    }
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// `pid` and its direct children (e.g. nginx's master and its workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// Waits until `addr` accepts TCP connections, up to `within`.
pub fn wait_until_listening(addr: SocketAddr, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A free port on 127.0.0.1 for a program that cannot bind port 0 and report it.
/// (Another process could take it before it is used; the caller checks.)
pub fn free_local_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The loadgate config the comparison benches run: `workers` worker threads, one
/// upstream `app` on `backend`, health checks and the actuator poller off (they would
/// add backend requests nginx does not make), admission on as in production, and one
/// route for `/`.
/// `upstream_extra` and `route_extra` are TOML lines added to the upstream and route
/// tables (dotted keys such as `retry.idempotent_methods = []` work in the former).
pub fn loadgate_config(
    workers: usize,
    backend: SocketAddr,
    admin: SocketAddr,
    upstream_extra: &str,
    route_extra: &str,
) -> loadgate::config::Config {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
worker_threads = {workers}
[admin]
listen = "{admin}"
[[upstream]]
name = "app"
backends = ["{backend}"]
max_workers = 1024
health.enabled = false
actuator.enabled = false
{upstream_extra}
[[route]]
name = "all"
path_prefix = "/"
upstream = "app"
{route_extra}
"#
    );
    loadgate::config::Config::parse(&text, "bench config").expect("bench config is valid")
}

/// The backend helper role of the comparison benches: the simulated backend answering at
/// once (zero service time, 1024 workers, keep-alive for 60 s with no request limit),
/// served by `runtime`'s worker threads until the parent process says stop.
pub fn serve_instant_backend(runtime: &tokio::runtime::Runtime) {
    use loadgate::sim::{SimBackend, SimConfig};
    let backend = runtime
        .block_on(SimBackend::start(SimConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            workers: 1024,
            service_time_ms: 0.0,
            max_keep_alive_requests: 0,
            keep_alive_timeout_ms: 60_000,
            ..SimConfig::default()
        }))
        .expect("sim backend starts");
    announce_and_wait_for_parent(backend.addr());
    runtime.block_on(backend.shutdown());
}

/// Sets up a helper process: logs to stderr at `default_filter` unless `RUST_LOG`
/// says otherwise, and returns a multi-thread runtime with `threads` workers.
pub fn helper_runtime(threads: usize, default_filter: &str) -> tokio::runtime::Runtime {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("helper runtime")
}

/// The `main` of a bench that re-executes itself for its helper processes: started
/// with `helper_flag` first it runs `helper_main` with the remaining arguments;
/// otherwise it runs `bench` and exits 1 with the error, prefixed by `name`.
pub fn main_with_helpers(
    name: &str,
    helper_flag: &str,
    helper_main: fn(&[String]),
    bench: impl FnOnce() -> std::io::Result<()>,
) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(helper_flag) {
        helper_main(&args[1..]);
        return;
    }
    if let Err(error) = bench() {
        eprintln!("{name}: {error}");
        std::process::exit(1);
    }
}

/// A server binary for a baseline row: `env_var`'s path if it names one (or an error if
/// it says `off`), else `name` on PATH or in `extra_dirs`. The error says why the row is
/// skipped and how to install it.
pub fn find_binary(
    name: &str,
    env_var: &str,
    extra_dirs: &[&str],
    install: &str,
) -> Result<std::path::PathBuf, String> {
    use std::path::{Path, PathBuf};
    match std::env::var(env_var).ok().as_deref() {
        Some("off" | "0" | "no") => return Err(format!("{env_var}=off")),
        Some(path) if !path.is_empty() => {
            return if Path::new(path).is_file() {
                Ok(PathBuf::from(path))
            } else {
                Err(format!("{env_var}={path} is not a file"))
            };
        }
        _ => {}
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            format!("{name} is not installed (not on PATH nor in /usr/sbin; e.g. {install})")
        })
}
