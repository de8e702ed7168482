//! Reloads that keep what still holds: an upstream whose config changed keeps its
//! backends' health, its in-flight count (requests started before the reload still
//! count, and release into the new generation), read through `/status`.

use std::time::Duration;

use loadgate::config::Config;
use loadgate::listener::Proxy;
use serde_json::Value;

use crate::support::origin::Origin;
use crate::support::*;

fn config_text(up: &str, down: &str, health: &str, band: f64) -> String {
    format!(
        r#"
[server]
listen = ["{LOCAL0}"]
[admin]
listen = "{LOCAL0}"
[[upstream]]
name = "kept-state"
backends = ["{up}", "{down}"]
max_workers = 8
actuator.enabled = false
shedding.band = {band}
health = {health}
[[route]]
name = "all"
path_prefix = "/"
upstream = "kept-state"
"#
    )
}

async fn upstream_status(proxy: &Proxy) -> Value {
    let status = admin::status(proxy).await;
    status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "kept-state")
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_changed_upstream_keeps_its_backends_health_and_the_requests_in_flight() {
    let origin = Origin::canned(200, "hello").await;
    let down = closed_port().await;
    let (up, down) = (origin.addr().to_string(), down.addr().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loadgate.toml");
    let checks = "{ interval_ms = 50, timeout_ms = 40, rise = 1, fall = 1 }";
    let text = config_text(&up, &down, checks, 0.1);
    std::fs::write(&path, &text).unwrap();
    let proxy = start_proxy(Config::parse(&text, "reload test").unwrap()).await;

    // The closed port is marked down by the checks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while upstream_status(&proxy).await["backends"][1]["healthy"] != false {
        assert!(tokio::time::Instant::now() < deadline, "never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A request held at the backend is in flight across the reload.
    let url = format!("http://{}/api/hold", proxy.addr());
    let held = tokio::spawn(async move { get(&client(), &url).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while upstream_status(&proxy).await["inflight"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A changed upstream (its shedding band, and no more health checks): a rebuilt
    // upstream would start with both backends healthy and nothing in flight.
    std::fs::write(&path, config_text(&up, &down, "{ enabled = false }", 0.2)).unwrap();
    proxy.reload_from_file(&path).unwrap();
    let after = upstream_status(&proxy).await;
    assert_eq!(after["backends"][1]["healthy"], false, "{after}");
    assert_eq!(after["backends"][0]["inflight"], 1, "{after}");
    assert_eq!(after["inflight"], 1, "{after}");

    origin.release();
    assert_eq!(held.await.unwrap().status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while upstream_status(&proxy).await["inflight"] != 0 {
        assert!(tokio::time::Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // New requests go to the backend still up, never to the one still marked down.
    for _ in 0..4 {
        let got = get(&client(), &format!("http://{}/api/x", proxy.addr())).await;
        assert_eq!(got.status, 200);
    }
    proxy.shutdown().await;
}
