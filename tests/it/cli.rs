//! The `loadgate` binary as a user runs it: `check-config` exit codes and messages,
//! and `run` with a SIGHUP reload (bad file keeps the running config) and a
//! SIGTERM drain that exits 0.

use std::time::{Duration, Instant};

use crate::support::process::{self, Loadgate};
use crate::support::*;

#[test]
fn check_config_accepts_the_reference_and_demo_files() {
    for file in ["config/loadgate.toml", "config/demo.toml"] {
        let out = process::command()
            .args(["check-config", file])
            .output()
            .unwrap();
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
    let out = process::command()
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:9:"), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");
    assert!(stderr.contains("bad.toml:14:"), "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
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
    let mut proxy = Loadgate::run(&config_text(backend.addr(), "/api/orders"));
    let addr = proxy.listening_addr();
    let c = client();
    assert_eq!(
        get(&c, &format!("http://{addr}/api/orders/1")).await.status,
        200
    );

    // A bad file: reported, and the running config stays.
    proxy.write_config("[[route]]\nname = \n");
    proxy.signal("HUP");
    proxy.wait_for("config reload rejected");
    assert_eq!(
        get(&c, &format!("http://{addr}/api/orders/2")).await.status,
        200
    );

    // A good file takes effect for new requests.
    proxy.write_config(&config_text(backend.addr(), "/api/reports"));
    proxy.signal("HUP");
    proxy.wait_for("config reloaded");
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

    proxy.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proxy.try_wait() {
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

#[test]
fn the_demo_names_a_busy_port_and_the_flag_that_moves_it() {
    // Holds a port, as a Spring app on 8080 would.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = process::command()
        .args(["demo", "--port", &port.to_string()])
        .env_remove("LOADGATE_DEMO_PORT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("port {port} (the proxy) is busy"))
            && stderr.contains("--port / LOADGATE_DEMO_PORT"),
        "{stderr}"
    );
    // The same through the environment, for the admin port.
    let out = process::command()
        .arg("demo")
        .env("LOADGATE_DEMO_ADMIN_PORT", port.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("port {port} (the admin port) is busy")),
        "{stderr}"
    );
}
