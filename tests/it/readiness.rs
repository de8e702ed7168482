//! `/readyz` in the two roles: an edge proxy stays ready while one of its upstreams can
//! serve, a sidecar goes unready when its one app is down, and `required_for_readiness`
//! or draining make it 503 whatever else. Real backends and refused ports on 127.0.0.1,
//! read through the admin port as a Kubernetes readiness probe would.

use std::net::SocketAddr;
use std::time::Duration;

use loadgate::config::Config;
use loadgate::listener::Proxy;
use serde_json::json;

use crate::support::*;

/// The longest a health verdict may take to show: `fall` (or `rise`) checks 100 ms
/// apart, each bounded by its 80 ms timeout, plus generous scheduling slack.
const VERDICT_WITHIN: Duration = Duration::from_secs(5);

/// An edge proxy in front of two services, "shop" and "reports", with fast health
/// checks; `reports_required` sets `required_for_readiness` on "reports" (`None`: the
/// default).
fn edge(shop: SocketAddr, reports: SocketAddr, reports_required: Option<bool>) -> Config {
    let required = reports_required
        .map(|r| format!("required_for_readiness = {r}"))
        .unwrap_or_default();
    let health = "health = { interval_ms = 100, timeout_ms = 80, rise = 1, fall = 2 }\n\
                  actuator.enabled = false";
    let text = format!(
        r#"
[server]
listen = ["{LOCAL0}"]
[admin]
listen = "{LOCAL0}"
[[upstream]]
name = "shop"
backends = ["{shop}"]
{health}
[[upstream]]
name = "reports"
backends = ["{reports}"]
{required}
{health}
[[route]]
name = "shop"
path_prefix = "/api/shop"
upstream = "shop"
[[route]]
name = "reports"
path_prefix = "/api/reports"
upstream = "reports"
"#
    );
    Config::parse(&text, "readiness test").unwrap_or_else(|e| panic!("{e}"))
}

/// `/readyz`, polled until it answers `status` or [`VERDICT_WITHIN`] passes; the last answer.
async fn readyz_until(proxy: &Proxy, status: u16) -> Got {
    let deadline = tokio::time::Instant::now() + VERDICT_WITHIN;
    loop {
        let got = admin::readyz(proxy).await;
        if got.status == status || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the upstream `name` has a backend that passed a check (`/status`).
async fn until_upstream_ready(proxy: &Proxy, name: &str) {
    let deadline = tokio::time::Instant::now() + VERDICT_WITHIN;
    loop {
        let status = admin::status(proxy).await;
        let upstreams = status["upstreams"].as_array().unwrap();
        let upstream = upstreams.iter().find(|u| u["name"] == name).unwrap();
        if upstream["ready"] == true {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream {name} never became ready: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn edge_stays_ready_with_one_of_two_upstreams_down_and_lists_it() {
    let shop = TestBackend::new().start().await;
    let reports = closed_port().await;
    let proxy = start_proxy(edge(shop.addr(), reports.addr(), None)).await;

    let got = readyz_until(&proxy, 200).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let body = got.json();
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["down"].as_array().map(Vec::len), Some(1), "{body}");
    let down = &body["down"][0];
    assert_eq!(down["upstream"], "reports", "{body}");
    assert_eq!(down["required_for_readiness"], false, "{body}");
    assert_eq!(down["counts"], false, "{body}");
    assert!(
        down["why"]
            .as_str()
            .is_some_and(|why| why.contains("no healthy backend") && why.contains("not counted")),
        "{body}"
    );

    // Ready is the truth: the shop is served.
    let got = get(&client(), &format!("http://{}/api/shop/1", proxy.addr())).await;
    assert_eq!(got.status, 200);
    assert_eq!(shop.stats().requests("/api/shop/1"), 1);
}

#[tokio::test]
async fn sidecar_goes_unready_when_its_only_upstream_is_down() {
    // The default config of a sidecar: one upstream, nothing marked required.
    let app = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(app.addr())).await;
    let got = readyz_until(&proxy, 200).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json(), json!({"ready": true, "down": []}));

    drop(app);
    let got = readyz_until(&proxy, 503).await;
    assert_eq!(
        got.status,
        503,
        "still ready with its app down: {}",
        got.text()
    );
    let body = got.json();
    assert_eq!(
        body["reasons"],
        json!([r#"upstream "app" has no healthy backend, and no upstream has one"#]),
        "{body}"
    );
    assert_eq!(body["down"][0]["upstream"], "app", "{body}");
    assert_eq!(body["down"][0]["required_for_readiness"], false, "{body}");
    assert_eq!(body["down"][0]["counts"], true, "{body}");
}

#[tokio::test]
async fn required_for_readiness_makes_one_upstream_down_count_and_a_reload_flips_it() {
    let shop = TestBackend::new().start().await;
    let reports = closed_port().await;
    let proxy = start_proxy(edge(shop.addr(), reports.addr(), Some(true))).await;
    until_upstream_ready(&proxy, "shop").await;

    let got = admin::readyz(&proxy).await;
    assert_eq!(got.status, 503, "{}", got.text());
    let body = got.json();
    assert_eq!(
        body["reasons"],
        json!([
            r#"upstream "reports" has no healthy backend, and it is required for readiness (required_for_readiness = true)"#
        ]),
        "{body}"
    );
    assert_eq!(body["down"][0]["required_for_readiness"], true, "{body}");
    assert_eq!(body["down"][0]["counts"], true, "{body}");
    let status = admin::status(&proxy).await;
    let upstreams = status["upstreams"].as_array().unwrap();
    let required: Vec<_> = upstreams
        .iter()
        .map(|u| (u["name"].clone(), u["required_for_readiness"].clone()))
        .collect();
    assert!(
        required.contains(&(json!("reports"), json!(true)))
            && required.contains(&(json!("shop"), json!(false))),
        "{status}"
    );

    // Turned off by a reload: ready at once, since the upstreams (and the health state
    // they have learned) are kept, not rebuilt.
    proxy.apply(edge(shop.addr(), reports.addr(), Some(false)));
    let got = admin::readyz(&proxy).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["down"][0]["counts"], false);
}

#[tokio::test]
async fn draining_is_503_with_every_upstream_up() {
    let shop = TestBackend::new().start().await;
    let reports = TestBackend::new().start().await;
    let proxy = start_proxy(edge(shop.addr(), reports.addr(), None)).await;
    until_upstream_ready(&proxy, "shop").await;
    until_upstream_ready(&proxy, "reports").await;
    assert_eq!(admin::readyz(&proxy).await.status, 200);

    // What shutdown sets first; the admin listener stops accepting right after, so a
    // probe on a connection already open is what would read this.
    proxy
        .shared()
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let got = admin::readyz(&proxy).await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(
        got.json(),
        json!({"ready": false, "reasons": ["draining"], "down": []})
    );
}
