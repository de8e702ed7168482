//! The `loadgate` binary as a user runs it: `check-config` exit codes and messages,
//! and `run` with a SIGHUP reload (bad file keeps the running config) and a
//! SIGTERM drain that exits 0.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn loadgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgate"))
}

#[test]
fn check_config_accepts_the_reference_and_demo_files() {
    for file in ["config/loadgate.toml", "config/demo.toml"] {
        let out = loadgate().args(["check-config", file]).output().unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_config_lists_every_error_with_its_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[[upstream]]
name = "app"
backends = ["127.0.0.1:8081"]

[[route]]
name = "a"
path_prefix = "/a"
upstream = "app"
colour = "blue"

[[route]]
name = "b"
path_prefix = "/b"
upstream = "missing"
"#,
    )
    .unwrap();
    let out = loadgate().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:9:"), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");
    assert!(stderr.contains("bad.toml:14:"), "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
}

/// Kills the child on drop so a failed assertion leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn config_text(backend: std::net::SocketAddr, prefix: &str) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:0"]
drain_timeout_ms = 2000

[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
backends = ["{backend}"]

[upstream.health]
enabled = false

[[route]]
name = "main"
path_prefix = "{prefix}"
upstream = "app"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_keeps_the_old_config_on_a_bad_file() {
    let backend = TestBackend::new().start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loadgate.toml");
    std::fs::write(&path, config_text(backend.addr(), "/api/orders")).unwrap();

    let child = loadgate()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let stderr = child.0.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match lines_rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        panic!("no log line containing {needle:?}");
    };
    let line = wait_for("proxy listening");
    let addr = line
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("log line names the address")
        .to_string();
    let c = client();
    assert_eq!(
        get(&c, &format!("http://{addr}/api/orders/1")).await.status,
        200
    );

    // A bad file: reported, and the running config stays.
    std::fs::write(&path, "[[route]]\nname = \n").unwrap();
    signal(&child.0, "HUP");
    wait_for("config reload rejected");
    assert_eq!(
        get(&c, &format!("http://{addr}/api/orders/2")).await.status,
        200
    );

    // A good file takes effect for new requests.
    std::fs::write(&path, config_text(backend.addr(), "/api/reports")).unwrap();
    signal(&child.0, "HUP");
    wait_for("config reloaded");
    assert_eq!(
        get(&c, &format!("http://{addr}/api/orders/3")).await.status,
        404
    );
    assert_eq!(
        get(&c, &format!("http://{addr}/api/reports/1"))
            .await
            .status,
        200
    );

    signal(&child.0, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "loadgate did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
}
