//! Per-route rewrites: the path prefix stripped (what the backend receives, and
//! `X-Forwarded-Prefix` by the peer's trust) and put back into the backend's redirects,
//! request header rules (including over
//! loadgate's own forwarding headers), and response header rules on every answer the
//! client gets on the route: from the backend, from the cache (a hit and a 304), and a
//! 429 shed. Rules change on reload.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use loadgate::config::{CachePolicy, Cidr, Config, HeaderRules, RouteConfig};
use loadgate::http::body::empty;

use crate::support::origin::{respond, Origin};
use crate::support::{client, eventually, get, proxy_config, send, start_proxy, Got};

/// An origin that answers every request with the target it received as its body.
async fn echo_origin() -> Origin {
    Origin::start(Duration::ZERO, |parts, _| {
        respond(
            200,
            &[("x-powered-by", "Tomcat"), ("vary", "Accept-Encoding")],
            parts.uri.to_string(),
        )
    })
    .await
}

/// A route like the test config's `api` route, for `prefix`.
fn route(config: &Config, name: &str, prefix: &str) -> RouteConfig {
    RouteConfig {
        name: name.to_string(),
        path_prefix: prefix.to_string(),
        ..config.routes[2].clone()
    }
}

/// The route of `config` named `name`.
fn route_mut<'a>(config: &'a mut Config, name: &str) -> &'a mut RouteConfig {
    config.routes.iter_mut().find(|r| r.name == name).unwrap()
}

fn header(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes()).unwrap()
}

fn values(list: &[&'static str]) -> Vec<HeaderValue> {
    list.iter().map(|v| HeaderValue::from_static(v)).collect()
}

fn all<'a>(headers: &'a http::HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

/// `/orders` stripped, and a catch-all route that strips nothing.
fn stripping_config(origin: SocketAddr) -> Config {
    let mut config = proxy_config(origin);
    let mut orders = route(&config, "orders", "/orders");
    orders.rewrite.strip_path_prefix = true;
    let rest = route(&config, "rest", "/");
    config.routes.extend([orders, rest]);
    config
}

async fn get_with(proxy: SocketAddr, path: &str, fields: &[(&str, &str)]) -> Got {
    let mut req = Request::get(format!("http://{proxy}{path}"));
    for (n, v) in fields {
        req = req.header(*n, *v);
    }
    send(&client(), req.body(empty()).unwrap()).await
}

#[tokio::test]
async fn the_backend_receives_the_path_without_the_prefix() {
    let origin = echo_origin().await;
    let proxy = start_proxy(stripping_config(origin.addr())).await;
    for (sent, received) in [
        ("/orders", "/"),
        ("/orders/", "/"),
        ("/orders/api/x", "/api/x"),
        ("/orders/api/x?page=2&sort=id", "/api/x?page=2&sort=id"),
        ("/orders?q=1", "/?q=1"),
        // Parameters are kept: the stripped segment's move onto the first one left.
        ("/orders/api;v=2/x", "/api;v=2/x"),
        ("/orders;jsessionid=A1/api/x?q", "/api;jsessionid=A1/x?q"),
        ("/orders;jsessionid=A1", "/;jsessionid=A1"),
        // Routed on the normalised path, stripped from it.
        ("/shop/../orders//api/./x", "/api/x"),
        ("/%6Frders/api", "/api"),
    ] {
        let got = get_with(proxy.addr(), sent, &[]).await;
        assert_eq!(got.status, 200, "{sent}");
        assert_eq!(got.text(), received, "{sent}");
        let seen = origin.last_headers();
        assert_eq!(all(&seen, "x-forwarded-prefix"), vec!["/orders"], "{sent}");
    }
    // A prefix matches on a segment boundary: /ordersx is the catch-all's, unstripped.
    let got = get_with(proxy.addr(), "/ordersx/api", &[]).await;
    assert_eq!(got.text(), "/ordersx/api");
    assert!(!origin.last_headers().contains_key("x-forwarded-prefix"));
}

#[tokio::test]
async fn x_forwarded_prefix_is_replaced_from_clients_and_prepended_from_trusted_proxies() {
    let origin = echo_origin().await;
    let claim = [("x-forwarded-prefix", "//evil.example")];

    let default = start_proxy(stripping_config(origin.addr())).await;
    let got = get_with(default.addr(), "/orders/api", &claim).await;
    assert_eq!(got.text(), "/api");
    assert_eq!(
        all(&origin.last_headers(), "x-forwarded-prefix"),
        vec!["/orders"],
        "a client's claim is replaced"
    );
    get_with(default.addr(), "/other", &claim).await;
    assert!(
        !origin.last_headers().contains_key("x-forwarded-prefix"),
        "and removed on a route that strips nothing"
    );

    // The client (127.0.0.1) is an ingress that stripped its own prefix, /shop.
    let mut config = stripping_config(origin.addr());
    config.server.trusted_proxies = vec![Cidr::parse("127.0.0.0/8").unwrap()];
    let trusting = start_proxy(config).await;
    let from_ingress = [("x-forwarded-prefix", "/shop")];
    get_with(trusting.addr(), "/orders/api", &from_ingress).await;
    assert_eq!(
        all(&origin.last_headers(), "x-forwarded-prefix"),
        vec!["/shop, /orders"],
        "the outer prefix first: Spring joins them into /shop/orders"
    );
    get_with(trusting.addr(), "/other", &from_ingress).await;
    assert_eq!(
        all(&origin.last_headers(), "x-forwarded-prefix"),
        vec!["/shop"]
    );
}

#[tokio::test]
async fn request_header_rules_apply_after_the_forwarding_headers() {
    let origin = echo_origin().await;
    let mut config = proxy_config(origin.addr());
    let mut orders = route(&config, "orders", "/orders");
    orders.rewrite.request_headers = HeaderRules {
        remove: vec![header("x-debug"), header("x-forwarded-for")],
        set: vec![
            (header("x-env"), values(&["prod"])),
            (header("x-forwarded-proto"), values(&["https"])),
        ],
        add: vec![(header("x-tag"), values(&["a", "b"]))],
    };
    config.routes.push(orders);
    let proxy = start_proxy(config).await;

    let fields = [
        ("x-debug", "1"),
        ("x-env", "dev"),
        ("x-tag", "client"),
        ("x-forwarded-proto", "http"),
    ];
    assert_eq!(
        get_with(proxy.addr(), "/orders/1", &fields).await.status,
        200
    );
    let seen = origin.last_headers();
    assert!(!seen.contains_key("x-debug"));
    assert!(
        !seen.contains_key("x-forwarded-for"),
        "a forwarding header loadgate set is removed by the rule"
    );
    assert_eq!(all(&seen, "x-env"), vec!["prod"]);
    assert_eq!(
        all(&seen, "x-forwarded-proto"),
        vec!["https"],
        "the rule overrides loadgate's own value"
    );
    assert_eq!(all(&seen, "x-tag"), vec!["client", "a", "b"]);
    assert_eq!(all(&seen, "via"), vec!["1.1 loadgate"]);

    // Another route has no rules: the request goes as before.
    get_with(proxy.addr(), "/api/orders/1", &fields).await;
    let seen = origin.last_headers();
    assert_eq!(all(&seen, "x-debug"), vec!["1"]);
    assert_eq!(all(&seen, "x-env"), vec!["dev"]);
    assert_eq!(all(&seen, "x-forwarded-for"), vec!["127.0.0.1"]);
}

/// Rules that a browser-facing route typically has: CORS set, the server's banner
/// removed, `Vary` added to.
fn response_rules(origin: &str) -> HeaderRules {
    HeaderRules {
        remove: vec![header("x-powered-by")],
        set: vec![(
            header("access-control-allow-origin"),
            vec![HeaderValue::from_str(origin).unwrap()],
        )],
        add: vec![(header("vary"), values(&["Origin"]))],
    }
}

#[track_caller]
fn assert_rules_applied(got: &Got, origin: &str, what: &str) {
    assert!(!got.headers.contains_key("x-powered-by"), "{what}");
    assert_eq!(
        all(&got.headers, "access-control-allow-origin"),
        vec![origin],
        "{what}"
    );
    assert_eq!(
        all(&got.headers, "vary").last(),
        Some(&"Origin"),
        "{what}: {:?}",
        got.headers
    );
}

#[tokio::test]
async fn response_header_rules_apply_to_backend_cache_and_304_answers_and_change_on_reload() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(
            200,
            &[
                ("x-powered-by", "Tomcat"),
                ("etag", "\"v1\""),
                ("cache-control", "max-age=600"),
                ("vary", "Accept-Encoding"),
            ],
            "catalog",
        )
    })
    .await;
    let mut config = proxy_config(origin.addr());
    let mut catalog = route(&config, "catalog", "/catalog");
    catalog.cache = CachePolicy::On;
    catalog.rewrite.response_headers = response_rules("https://shop.example");
    config.routes.push(catalog.clone());
    let proxy = start_proxy(config.clone()).await;

    let miss = get_with(proxy.addr(), "/catalog/1", &[]).await;
    assert_eq!(miss.status, 200);
    assert!(miss.header("cache-status").unwrap().contains("fwd=miss"));
    assert_rules_applied(&miss, "https://shop.example", "from the backend");
    assert_eq!(
        all(&miss.headers, "vary"),
        vec!["Accept-Encoding", "Origin"]
    );

    let hit = get_with(proxy.addr(), "/catalog/1", &[]).await;
    assert_eq!(hit.status, 200);
    assert!(
        hit.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.text(), "catalog");
    assert_rules_applied(&hit, "https://shop.example", "a hit");

    let not_modified = get_with(proxy.addr(), "/catalog/1", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(not_modified.status, 304);
    assert_rules_applied(
        &not_modified,
        "https://shop.example",
        "a 304 from the cache",
    );
    assert_eq!(
        origin.requests(),
        1,
        "the hit and the 304 came from the cache"
    );

    // A reload changes the rules at once, for what is already stored too: the rules are
    // applied on the way out, not stored.
    catalog.rewrite.response_headers = response_rules("https://admin.example");
    *config.routes.last_mut().unwrap() = catalog;
    proxy.apply(config);
    let hit = get_with(proxy.addr(), "/catalog/1", &[]).await;
    assert!(
        hit.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        hit.headers
    );
    assert_rules_applied(&hit, "https://admin.example", "a hit after the reload");
    assert_eq!(origin.requests(), 1, "the cache was kept across the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_shed_on_the_route_gets_its_response_rules() {
    let origin = Origin::start(Duration::ZERO, |_, _| respond(200, &[], "ok")).await;
    let mut config = proxy_config(origin.addr());
    config.upstreams[0].max_workers = 2;
    config.upstreams[0].health.enabled = false;
    // The test config's sheddable route.
    let reports = route_mut(&mut config, "reports");
    reports.rewrite.response_headers = response_rules("https://shop.example");
    let proxy = start_proxy(config).await;

    // Two requests held by the backend fill its pool of two.
    let c = client();
    let held: Vec<_> = (0..2)
        .map(|i| {
            let c = c.clone();
            let url = format!("http://{}/api/hold/{i}", proxy.addr());
            tokio::spawn(async move { get(&c, &url).await.status })
        })
        .collect();
    let shared = proxy.shared().clone();
    assert!(
        eventually(Duration::from_secs(5), || shared
            .generation
            .load()
            .upstreams["app"]
            .inflight()
            == 2)
        .await,
        "the two held requests are in flight"
    );
    let shed = get_with(proxy.addr(), "/api/reports/daily", &[]).await;
    assert_eq!(shed.status, 429, "{}", shed.text());
    assert!(shed.header("retry-after").is_some());
    assert_rules_applied(&shed, "https://shop.example", "a 429 shed");
    // The held requests are on the `api` route, which has no rules.
    origin.release();
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    let other = get_with(proxy.addr(), "/api/orders/1", &[]).await;
    assert!(!other.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn stripping_and_request_rules_change_on_reload() {
    let origin = echo_origin().await;
    let mut config = stripping_config(origin.addr());
    let proxy = start_proxy(config.clone()).await;
    assert_eq!(
        get_with(proxy.addr(), "/orders/api", &[]).await.text(),
        "/api"
    );

    let orders = route_mut(&mut config, "orders");
    orders.rewrite.strip_path_prefix = false;
    orders.rewrite.request_headers.set = vec![(header("x-env"), values(&["prod"]))];
    proxy.apply(config);
    let got = get_with(proxy.addr(), "/orders/api", &[]).await;
    assert_eq!(got.text(), "/orders/api");
    let seen = origin.last_headers();
    assert!(!seen.contains_key("x-forwarded-prefix"));
    assert_eq!(all(&seen, "x-env"), vec!["prod"]);
}

/// An origin that redirects as a backend unaware of the stripped prefix does (and, for
/// `/aware`, as one that read `X-Forwarded-Prefix`).
async fn redirecting_origin() -> Origin {
    Origin::start(Duration::ZERO, |parts, _| {
        let host = parts
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let location = match parts.uri.path() {
            "/relative" => "/login?next=%2Fcart".to_string(),
            "/absolute" => format!("http://{host}/login"),
            "/aware" => "/orders/login".to_string(),
            "/elsewhere" => "https://sso.example/login".to_string(),
            _ => "next".to_string(),
        };
        respond(302, &[("location", location.as_str())], "")
    })
    .await
}

#[tokio::test]
async fn a_backend_redirect_is_put_back_under_the_stripped_prefix() {
    let origin = redirecting_origin().await;
    let proxy = start_proxy(stripping_config(origin.addr())).await;
    let host = format!("127.0.0.1:{}", proxy.addr().port());
    for (path, location) in [
        ("/orders/relative", "/orders/login?next=%2Fcart".to_string()),
        ("/orders/absolute", format!("http://{host}/orders/login")),
        // Already under the prefix, another host, or relative to the client's URL.
        ("/orders/aware", "/orders/login".to_string()),
        ("/orders/elsewhere", "https://sso.example/login".to_string()),
        ("/orders/a/b", "next".to_string()),
        // A route that strips nothing leaves it alone.
        ("/relative", "/login?next=%2Fcart".to_string()),
    ] {
        let got = get_with(proxy.addr(), path, &[]).await;
        assert_eq!(got.status, 302, "{path}");
        assert_eq!(got.header("location"), Some(location.as_str()), "{path}");
    }

    let mut config = stripping_config(origin.addr());
    let orders = route_mut(&mut config, "orders");
    orders.rewrite.rewrite_location = false;
    let kept = start_proxy(config).await;
    let got = get_with(kept.addr(), "/orders/relative", &[]).await;
    assert_eq!(
        got.header("location"),
        Some("/login?next=%2Fcart"),
        "rewrite_location = false"
    );
}
