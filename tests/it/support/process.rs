//! The `loadgate` binary as a user runs it: `loadgate run --config FILE` as a child
//! process, with its config file, its log lines and the signals it is sent.
//!
//! The waits here block the calling thread (the child is another process); tests that
//! use them run on a multi-thread runtime.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The longest a log line is waited for.
const LOG_WITHIN: Duration = Duration::from_secs(20);

/// The `loadgate` binary cargo built for these tests.
pub fn command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgate"))
}

/// `loadgate run` on a config file of its own, logging at info level. Killed (and
/// reaped) when dropped, so a failed assertion leaves no process behind.
pub struct Loadgate {
    child: Child,
    lines: mpsc::Receiver<String>,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loadgate {
    /// Writes `config` (TOML) to a file in a temporary directory and starts
    /// `loadgate run --config` on it.
    pub fn run(config: &str) -> Loadgate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loadgate.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = command()
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        Loadgate {
            child,
            lines,
            config: path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Replaces the config file (the running process reads it on SIGHUP).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
    }

    /// The next log line containing `needle`, skipping the lines before it; panics
    /// after 20 s without one.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + LOG_WITHIN;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        panic!("no log line containing {needle:?}");
    }

    /// Waits for the "proxy listening" line and returns the address it names.
    pub fn listening_addr(&self) -> SocketAddr {
        self.logged_addr("proxy listening")
    }

    /// Waits for the "admin listening" line and returns the address it names.
    pub fn admin_addr(&self) -> SocketAddr {
        self.logged_addr("admin listening")
    }

    /// The `addr=` of the first log line containing `needle`.
    fn logged_addr(&self, needle: &str) -> SocketAddr {
        let line = self.wait_for(needle);
        line.split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in the log line {line:?}"))
    }

    /// Sends the signal `name` (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Loadgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
