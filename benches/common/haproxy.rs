//! HAProxy as a comparison target: found on PATH or in /usr/sbin (or named by
//! `LOADGATE_BENCH_HAPROXY`, `off` to skip), run in the foreground (`-db`) from a
//! generated config in a temp dir, stopped by its PID when dropped.
//!
//! Not here: the config itself beyond the process plumbing; each bench writes the
//! config it compares against (see [`overload_conf`] for the overload bench's).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::Process;

/// haproxy on PATH or in the usual sbin directories, unless `LOADGATE_BENCH_HAPROXY`
/// names it or says `off`. The error says why the row is skipped.
pub fn find() -> Result<PathBuf, String> {
    super::find_binary(
        "haproxy",
        "LOADGATE_BENCH_HAPROXY",
        &["/usr/sbin", "/usr/local/sbin"],
        "apt-get install haproxy",
    )
}

/// HAProxy in the foreground with a generated config in a temp dir.
pub struct HaProxy {
    pub addr: SocketAddr,
    // Field order: the process stops before its directory is removed.
    pub process: Process,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// HAProxy with the config `conf(listen)` returns, `listen` being the address it
    /// must listen on. The config is checked (`-c`) first, so a bad one fails with
    /// HAProxy's own message.
    pub fn start_with_conf(
        haproxy: &Path,
        conf: impl FnOnce(SocketAddr) -> String,
    ) -> Result<HaProxy, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = super::free_local_port().map_err(|e| format!("free port: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf_path = dir.path().join("haproxy.cfg");
        std::fs::write(&conf_path, conf(addr))
            .map_err(|e| format!("writing {}: {e}", conf_path.display()))?;
        let check = Command::new(haproxy)
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("spawn: {e}"))?;
        if !check.status.success() {
            return Err(format!(
                "config rejected: {}{}",
                String::from_utf8_lossy(&check.stdout).trim(),
                String::from_utf8_lossy(&check.stderr).trim()
            ));
        }
        let log_path = dir.path().join("stderr.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("log file: {e}"))?;
        let child = Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let mut process = Process::from_child("haproxy", child);
        let listening = super::wait_until_listening(addr, Duration::from_secs(10));
        if !listening || !process.is_running() {
            process.stop();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("not listening on {addr}; stderr: {}", log.trim()));
        }
        Ok(HaProxy {
            addr,
            process,
            _dir: dir,
        })
    }
}

/// HAProxy for a comparison row from the config `conf` builds, or `None` after
/// printing why the row is skipped (not installed, `LOADGATE_BENCH_HAPROXY=off`, or
/// it failed to start).
pub fn start_or_skip(conf: impl FnOnce(SocketAddr) -> String) -> Option<HaProxy> {
    let path = match find() {
        Ok(path) => path,
        Err(why) => {
            println!("haproxy skipped: {why}");
            return None;
        }
    };
    match HaProxy::start_with_conf(&path, conf) {
        Ok(haproxy) => Some(haproxy),
        Err(why) => {
            println!("haproxy skipped: {} failed to start: {why}", path.display());
            None
        }
    }
}

/// What [`overload_conf`] protects.
#[derive(Debug, Clone)]
pub struct OverloadSetup {
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    /// The backend's worker pool: HAProxy sends it at most this many requests at once
    /// and queues the rest.
    pub pool: usize,
    /// Path prefixes of the critical routes (served first from the queue) and the
    /// sheddable ones (answered 429 when the queue is long).
    pub critical_prefix: String,
    pub sheddable_prefix: String,
    /// Queued requests from which sheddable ones get 429.
    pub shed_queue: usize,
    /// How long a request may wait in the queue before HAProxy answers 503.
    pub queue_timeout: Duration,
}

/// HAProxy configured for overload as one would by hand: the server's `maxconn` is the
/// backend's pool, so the backend never queues and HAProxy holds the excess in its own
/// queue; critical requests get an earlier priority class, so they are taken from the
/// queue before any sheddable one; sheddable requests are answered 429 with
/// `Retry-After` while `shed_queue` or more requests wait; a request waiting longer than
/// `queue_timeout` gets 503. Keep-alive on both sides, no logging.
pub fn overload_conf(setup: &OverloadSetup) -> String {
    let OverloadSetup {
        listen,
        backend,
        pool,
        critical_prefix,
        sheddable_prefix,
        shed_queue,
        queue_timeout,
    } = setup;
    let queue_ms = queue_timeout.as_millis();
    format!(
        r#"# generated by benches/common/haproxy.rs
global
    maxconn 8000
    nbthread 2

defaults
    mode http
    option http-keep-alive
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    timeout queue {queue_ms}ms

frontend fe
    bind {listen}
    acl critical path_beg {critical_prefix}
    acl sheddable path_beg {sheddable_prefix}
    # Lower classes leave the queue first.
    http-request set-priority-class int(-10) if critical
    http-request set-priority-class int(10) if sheddable
    http-request return status 429 content-type text/plain string "shed by haproxy" hdr Retry-After 1 if sheddable {{ queue(be) ge {shed_queue} }}
    default_backend be

backend be
    http-reuse always
    server s1 {backend} maxconn {pool}
"#
    )
}
