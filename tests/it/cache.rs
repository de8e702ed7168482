//! The shared HTTP cache end to end: the real proxy in front of the simulated
//! backend or a tiny scripted origin, asserting what a client sees and how many
//! requests reach the origin.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use loadgate::cache::{CacheSettings, CacheStats};
use loadgate::config::{CachePolicy, Config};
use loadgate::http::body::empty;
use loadgate::listener::Proxy;
use loadgate::sim::SimBackend;

use crate::support::origin::{next_request, respond, Origin};
use crate::support::*;

/// A path, the request headers to send, and the origin requests two GETs cause.
type Case<'a> = (&'a str, &'a [(&'static str, &'a str)], usize);

fn cached_config(backend: SocketAddr, settings: CacheSettings) -> Config {
    let mut config = proxy_config(backend);
    for route in &mut config.routes {
        route.cache = CachePolicy::On;
        route.cache_settings = settings.clone();
    }
    config
}

fn stats(proxy: &Proxy, route: &str) -> CacheStats {
    let generation = proxy.shared().generation.load();
    let route = generation.routes.iter().find(|r| r.name == route).unwrap();
    route.http_cache.as_ref().unwrap().stats()
}

async fn get_with(client: &TestClient, url: &str, headers: &[(&'static str, &str)]) -> Got {
    let mut req = Request::get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    send(client, req.body(empty()).unwrap()).await
}

async fn sim_with_cache_control(cache_control: &str) -> SimBackend {
    TestBackend::new()
        .cache_control(cache_control)
        .start()
        .await
}

#[tokio::test]
async fn fresh_hit_answers_304_and_the_backend_count_does_not_move() {
    let sim = sim_with_cache_control("max-age=60").await;
    let proxy = start_proxy(cached_config(sim.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/catalog/1", proxy.addr());

    let first = get(&client, &url).await;
    assert_eq!(first.status, 200);
    let etag = first.header("etag").expect("sim sends an ETag").to_string();
    assert!(first.header("cache-status").unwrap().contains("fwd=miss"));
    assert_eq!(sim.stats().requests("/api/catalog/1"), 1);

    let hit = get(&client, &url).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.body, first.body);
    assert!(hit.header("age").is_some());
    assert!(hit
        .header("cache-status")
        .unwrap()
        .starts_with("loadgate; hit"));

    let not_modified = get_with(&client, &url, &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    assert_eq!(not_modified.header("cache-control"), Some("max-age=60"));
    assert!(not_modified.header("age").is_some());
    assert!(not_modified.header("date").is_some());

    // Weak, list and `*` forms match too; a different tag gets the stored 200.
    let weak = format!("W/{etag}");
    let list = format!("\"nope\", {etag}");
    for inm in [weak.as_str(), list.as_str(), "*"] {
        let got = get_with(&client, &url, &[("if-none-match", inm)]).await;
        assert_eq!(got.status, 304, "If-None-Match: {inm}");
    }
    let other = get_with(&client, &url, &[("if-none-match", "\"other\"")]).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.body, first.body);
    assert!(other.header("age").is_some());

    assert_eq!(
        sim.stats().requests("/api/catalog/1"),
        1,
        "all answered from the cache"
    );
}

#[tokio::test]
async fn if_none_match_takes_precedence_over_if_modified_since() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("etag", "\"v1\""),
                ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ],
            "body",
        )
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/p", proxy.addr());
    assert_eq!(get(&client, &url).await.status, 200);
    let later = "Tue, 01 Jan 2030 00:00:00 GMT";
    let earlier = "Sun, 01 Jan 2023 00:00:00 GMT";
    let ims_only = get_with(&client, &url, &[("if-modified-since", later)]).await;
    assert_eq!(ims_only.status, 304);
    let ims_old = get_with(&client, &url, &[("if-modified-since", earlier)]).await;
    assert_eq!(ims_old.status, 200);
    let both = get_with(
        &client,
        &url,
        &[("if-none-match", "\"v2\""), ("if-modified-since", later)],
    )
    .await;
    assert_eq!(
        both.status, 200,
        "a failed If-None-Match wins over If-Modified-Since"
    );
    let both = get_with(
        &client,
        &url,
        &[("if-none-match", "\"v1\""), ("if-modified-since", earlier)],
    )
    .await;
    assert_eq!(both.status, 304);
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn stale_entry_is_revalidated_and_updated_from_the_304() {
    let origin = Origin::start(Duration::ZERO, |req, n| {
        if req
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            respond(
                304,
                &[
                    ("etag", "\"v1\""),
                    ("cache-control", "max-age=60"),
                    ("x-version", "2"),
                ],
                "",
            )
        } else {
            let _ = n;
            respond(
                200,
                &[
                    ("etag", "\"v1\""),
                    ("cache-control", "max-age=0"),
                    ("x-version", "1"),
                ],
                "the body",
            )
        }
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/r", proxy.addr());

    let first = get(&client, &url).await;
    assert_eq!((first.status, first.header("x-version")), (200, Some("1")));

    let second = get(&client, &url).await;
    assert_eq!(origin.requests(), 2, "stale: revalidated with the origin");
    assert_eq!(
        origin.last_headers().get("if-none-match").unwrap(),
        "\"v1\"",
        "the origin saw a conditional request"
    );
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "the body");
    assert_eq!(
        second.header("x-version"),
        Some("2"),
        "headers updated from the 304"
    );
    assert_eq!(second.header("cache-control"), Some("max-age=60"));
    assert!(second
        .header("cache-status")
        .unwrap()
        .contains("fwd=stale; fwd-status=304"));
    assert!(second.header("age").is_some());

    let third = get(&client, &url).await;
    assert_eq!(third.header("x-version"), Some("2"));
    assert_eq!(third.text(), "the body");
    assert_eq!(origin.requests(), 2, "fresh again after the 304");

    // A conditional client request on a stale entry gets its own 304.
    let stale_proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let url = format!("http://{}/api/r", stale_proxy.addr());
    let _ = get(&client, &url).await;
    let cond = get_with(&client, &url, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(cond.status, 304);
    assert_eq!(
        cond.header("x-version"),
        None,
        "304 carries only the listed fields"
    );
}

#[tokio::test]
async fn a_304_for_another_etag_is_refetched_not_passed_to_an_unconditional_client() {
    // The stored entry is "abcdef"; the origin's 304 to the revalidation names
    // "ghijkl", so it validates nothing we hold (RFC 9111 §4.3.4) and the client,
    // who asked unconditionally, must get a full response (RFC 9110 §15.4.5).
    let origin = Origin::start(Duration::ZERO, |req, n| match n {
        1 => respond(
            200,
            &[("etag", "\"abcdef\""), ("cache-control", "max-age=0")],
            "old body",
        ),
        _ if req.headers.contains_key("if-none-match") => respond(
            304,
            &[("etag", "\"ghijkl\""), ("cache-control", "max-age=60")],
            "",
        ),
        _ => respond(
            200,
            &[("etag", "\"ghijkl\""), ("cache-control", "max-age=60")],
            "new body",
        ),
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/r", proxy.addr());

    assert_eq!(get(&client, &url).await.text(), "old body");
    let second = get(&client, &url).await;
    assert_eq!(
        second.status, 200,
        "never a 304 to a request without validators"
    );
    assert_eq!(second.text(), "new body");
    assert_eq!(second.header("etag"), Some("\"ghijkl\""));
    assert_eq!(origin.requests(), 3, "stored, revalidated, fetched again");
    assert!(
        !origin.last_headers().contains_key("if-none-match"),
        "the second fetch is unconditional"
    );
    let third = get(&client, &url).await;
    assert_eq!((third.status, third.text()), (200, "new body".to_string()));
    assert_eq!(origin.requests(), 3, "the refetched response was stored");
}

#[tokio::test]
async fn a_failing_origin_is_answered_from_a_stored_copy_within_its_stale_if_error_window() {
    // Each path is stored once (already stale), then the origin fails it.
    let origin = Origin::start(Duration::ZERO, |req, _| {
        let stored = !req.headers.contains_key("if-none-match");
        let path = req.uri.path();
        let cache_control = match path {
            "/api/own-window" => "max-age=0, stale-if-error=60",
            "/api/past-window" => "max-age=0, stale-if-error=60",
            "/api/must-revalidate" => "max-age=0, must-revalidate",
            _ => "max-age=0",
        };
        // Stored 100 s old: past its own 60 s window.
        let age = if path == "/api/past-window" {
            "100"
        } else {
            "0"
        };
        if stored && !req.headers.contains_key("x-second") {
            respond(
                200,
                &[
                    ("etag", "\"v1\""),
                    ("cache-control", cache_control),
                    ("age", age),
                ],
                "stored",
            )
        } else {
            respond(503, &[], "down")
        }
    })
    .await;
    let settings = CacheSettings {
        stale_if_error: Some(Duration::from_secs(300)),
        ..CacheSettings::default()
    };
    let proxy = start_proxy(cached_config(origin.addr(), settings)).await;
    let plain = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();

    for (proxy, path, want) in [
        // The route's default window covers a response that sends none.
        (&proxy, "/api/default-window", 200),
        // The response's own window wins.
        (&proxy, "/api/own-window", 200),
        (&plain, "/api/own-window", 200),
        // Past its window, or never to be served stale: the error passes through.
        (&proxy, "/api/past-window", 503),
        (&proxy, "/api/must-revalidate", 503),
        // No window at all (no default, none in the response).
        (&plain, "/api/default-window", 503),
    ] {
        let url = format!("http://{}{path}", proxy.addr());
        assert_eq!(get(&client, &url).await.text(), "stored", "{path} stored");
        let failed = get(&client, &url).await;
        assert_eq!(failed.status, want, "{path} through {}", proxy.addr());
        if want == 200 {
            assert_eq!(failed.text(), "stored");
            let status = failed.header("cache-status").unwrap();
            assert!(status.contains("detail=stale-if-error"), "{status}");
            assert!(failed.header("age").is_some());
        } else {
            assert_eq!(failed.text(), "down");
        }
    }
}

#[tokio::test]
async fn a_stored_copy_answers_when_the_backend_is_gone() {
    // `connection: close`, so no pooled connection outlives the origin.
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(
            200,
            &[
                ("cache-control", "max-age=0, stale-if-error=60"),
                ("connection", "close"),
            ],
            "stored",
        )
    })
    .await;
    let mut config = cached_config(origin.addr(), CacheSettings::default());
    // Without health checks the request goes to the dead address and is refused.
    config.upstreams[0].health.enabled = false;
    name_upstream(&mut config, "gone");
    let retry = config.upstreams[0].retry.clone();
    let proxy = start_proxy(config).await;
    let client = client();
    let url = format!("http://{}/api/r", proxy.addr());
    assert_eq!(get(&client, &url).await.text(), "stored");
    let shared = proxy.shared().clone();
    let connect_retries = || {
        shared.generation.load().upstreams["gone"]
            .pool_stats()
            .connect_retries
    };
    let errors = |kind: &'static str| {
        let labels = [("upstream", "gone"), ("kind", kind)];
        let proxy = &proxy;
        async move { admin::counter(proxy, "loadgate_upstream_errors_total", &labels).await }
    };

    let addr = origin.addr();
    drop(origin);
    // Its listener closes when its task is next polled: from then on, connects are refused.
    let mut refused = false;
    for _ in 0..250 {
        refused = tokio::net::TcpStream::connect(addr).await.is_err();
        if refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the origin's port still accepts connections");
    let answered = get(&client, &url).await;
    assert_eq!((answered.status, answered.text().as_str()), (200, "stored"));
    assert!(answered
        .header("cache-status")
        .unwrap()
        .contains("detail=stale-if-error"));
    assert_eq!(
        connect_retries(),
        0,
        "with a copy to answer, one connect attempt and no backoff"
    );
    assert_eq!(errors("connect").await, 1.0);
    let never_stored = format!("http://{}/api/never-stored", proxy.addr());
    let other = get(&client, &never_stored).await;
    assert_eq!(
        other.status, 502,
        "nothing stored: the error passes through"
    );
    assert_eq!(
        connect_retries(),
        u64::from(retry.connect_attempts - 1),
        "with nothing to fall back on, every connect attempt is made"
    );

    // Once failed connects eject the only backend, a request with a copy does not try it.
    let ejected = || shared.generation.load().upstreams["gone"].backends()[0].is_ejected();
    for _ in 0..retry.eject_after_connect_failures {
        if ejected() {
            break;
        }
        assert_eq!(get(&client, &never_stored).await.status, 502);
    }
    assert!(
        ejected(),
        "each refused request counts its connect attempts"
    );
    let connects = errors("connect").await;
    let answered = get(&client, &url).await;
    assert_eq!((answered.status, answered.text().as_str()), (200, "stored"));
    assert_eq!(errors("connect").await, connects, "no connect was tried");
    assert_eq!(errors("no_healthy_backend").await, 1.0);
    // Without a copy, the ejected only backend is still tried.
    assert_eq!(get(&client, &never_stored).await.status, 502);
    assert_eq!(errors("connect").await, connects + 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_answers_at_once_while_one_background_request_revalidates_it() {
    // Stored already stale, with a minute of stale-while-revalidate; the origin takes
    // a second to answer the revalidation, with a new version.
    let slow = Origin::start(Duration::from_secs(1), |_, n| match n {
        1 => respond(
            200,
            &[("cache-control", "max-age=0, stale-while-revalidate=60")],
            "v1",
        ),
        _ => respond(200, &[("cache-control", "max-age=60")], "v2"),
    })
    .await;
    let proxy = start_proxy(cached_config(slow.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/r", proxy.addr());
    assert_eq!(get(&client, &url).await.text(), "v1");

    // 100 at once: every one is answered from the stale copy (none waits for the
    // revalidation, which would answer v2), and exactly one revalidation goes out.
    let answers: Vec<_> = (0..100)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    for answer in answers {
        let got = answer.await.unwrap();
        assert_eq!((got.status, got.text().as_str()), (200, "v1"));
        let status = got.header("cache-status").unwrap();
        assert!(status.contains("detail=stale-while-revalidate"), "{status}");
    }
    assert!(
        eventually(Duration::from_secs(5), || slow.requests() == 2).await,
        "one revalidation: {} origin requests",
        slow.requests()
    );
    // Once it is back, the new version is fresh in the store.
    let mut refreshed = false;
    for _ in 0..50 {
        let got = get(&client, &url).await;
        if got.text() == "v2" {
            assert!(got.header("cache-status").unwrap().contains("hit"));
            refreshed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refreshed, "the background revalidation stored v2");
    assert_eq!(slow.requests(), 2, "and nothing more went to the origin");
}

#[tokio::test]
async fn a_reload_keeps_the_cache_and_counters_of_routes_it_does_not_change() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(200, &[("cache-control", "max-age=60")], "stored")
    })
    .await;
    let config = cached_config(origin.addr(), CacheSettings::default());
    let proxy = start_proxy(config.clone()).await;
    let client = client();
    let url = format!("http://{}/api/orders/1", proxy.addr());
    assert_eq!(get(&client, &url).await.text(), "stored");
    assert_eq!(origin.requests(), 1);
    let admitted = || async {
        admin::status(&proxy).await["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "api")
            .unwrap()["admitted"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(admitted().await, 1);

    // A reload that changes another route: this one keeps its store and its counts.
    let mut reloaded = config.clone();
    reloaded.routes[1].threshold = Some(0.5);
    proxy.apply(reloaded);
    let hit = get(&client, &url).await;
    assert!(hit.header("cache-status").unwrap().contains("hit"));
    assert_eq!(origin.requests(), 1, "answered from the kept store");
    let url2 = format!("http://{}/api/orders/2", proxy.addr());
    assert_eq!(get(&client, &url2).await.status, 200);
    assert_eq!(admitted().await, 2, "counting on from before the reload");

    // Changing its cache settings starts it afresh.
    let mut changed = config;
    changed.routes[2].cache_settings.max_bytes = 1 << 20;
    proxy.apply(changed);
    assert_eq!(get(&client, &url).await.text(), "stored");
    assert_eq!(origin.requests(), 3, "a new store: fetched again");
}

#[tokio::test]
async fn a_conditional_miss_carries_the_clients_validators_to_the_origin() {
    // A browser that already holds the body asks with its ETag while the cache holds
    // nothing: the origin's 304 reaches it without a full transfer.
    let origin = Origin::start(Duration::ZERO, |req, _| {
        let matches = req
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"");
        if matches {
            respond(
                304,
                &[("etag", "\"v1\""), ("cache-control", "max-age=60")],
                "",
            )
        } else {
            respond(
                200,
                &[("etag", "\"v1\""), ("cache-control", "max-age=60")],
                "body",
            )
        }
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/conditional-miss", proxy.addr());

    let first = get_with(&client, &url, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(first.status, 304);
    assert!(first.body.is_empty());
    assert_eq!(first.header("etag"), Some("\"v1\""));
    assert_eq!(
        origin.last_headers().get("if-none-match").unwrap(),
        "\"v1\"",
        "the client's validator went to the origin"
    );
    assert!(first.header("cache-status").unwrap().contains("fwd=miss"));
    assert_eq!(stats(&proxy, "api").objects, 0, "a 304 stores nothing");

    // A client without the body gets it, and it is stored.
    let second = get(&client, &url).await;
    assert_eq!((second.status, second.text()), (200, "body".to_string()));
    assert!(!origin.last_headers().contains_key("if-none-match"));
    // A client with another version is answered from the store: 200, no origin request.
    let third = get_with(&client, &url, &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((third.status, third.text()), (200, "body".to_string()));
    assert_eq!(origin.requests(), 2);
}

#[tokio::test]
async fn a_targeted_cache_control_field_gives_this_cache_its_own_lifetime() {
    // Browsers are told to revalidate every time; this cache may keep the response a
    // minute (RFC 9213).
    let origin = Origin::start(Duration::ZERO, |req, n| {
        let targeted = if req.uri.path().ends_with("/broken") {
            "max-age=60,"
        } else {
            "max-age=60"
        };
        respond(
            200,
            &[
                ("cache-control", "no-cache"),
                ("loadgate-cache-control", targeted),
                ("etag", &format!("\"{n}\"")),
            ],
            format!("v{n}"),
        )
    })
    .await;
    let settings = CacheSettings {
        targeted_field: Some(http::HeaderName::from_static("loadgate-cache-control")),
        ..CacheSettings::default()
    };
    let proxy = start_proxy(cached_config(origin.addr(), settings)).await;
    let client = client();
    let url = format!("http://{}/api/targeted", proxy.addr());

    let first = get(&client, &url).await;
    assert_eq!(first.text(), "v1");
    let hit = get(&client, &url).await;
    assert_eq!(hit.text(), "v1", "the targeted max-age=60 made it fresh");
    assert!(hit
        .header("cache-status")
        .unwrap()
        .starts_with("loadgate; hit"));
    assert_eq!(
        hit.header("cache-control"),
        Some("no-cache"),
        "clients still get the backend's Cache-Control"
    );
    assert_eq!(hit.header("loadgate-cache-control"), Some("max-age=60"));
    assert_eq!(origin.requests(), 1);

    // An invalid targeted value is ignored: Cache-Control (no-cache) applies.
    let broken = format!("http://{}/api/broken", proxy.addr());
    assert_eq!(get(&client, &broken).await.text(), "v2");
    assert_eq!(get(&client, &broken).await.text(), "v3");

    // A route that names no targeted field reads Cache-Control only.
    let plain = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let url = format!("http://{}/api/targeted", plain.addr());
    assert_eq!(get(&client, &url).await.text(), "v4");
    assert_eq!(get(&client, &url).await.text(), "v5");
}

#[tokio::test]
async fn origin_200_replaces_a_stale_entry() {
    let origin = Origin::start(Duration::ZERO, |_, n| {
        respond(
            200,
            &[
                ("cache-control", "max-age=0"),
                ("etag", &format!("\"{n}\"")),
            ],
            format!("v{n}"),
        )
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/x", proxy.addr());
    assert_eq!(get(&client, &url).await.text(), "v1");
    assert_eq!(get(&client, &url).await.text(), "v2");
    assert_eq!(origin.last_headers().get("if-none-match").unwrap(), "\"1\"");
}

#[tokio::test]
async fn vary_keys_variants_by_the_named_request_headers() {
    let origin = Origin::start(Duration::ZERO, |req, _| {
        let accept = req
            .headers
            .get("accept")
            .map_or("none", |v| v.to_str().unwrap())
            .to_string();
        respond(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept")],
            accept,
        )
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/v", proxy.addr());
    assert_eq!(
        get_with(&client, &url, &[("accept", "text/a")])
            .await
            .text(),
        "text/a"
    );
    assert_eq!(
        get_with(&client, &url, &[("accept", "text/b")])
            .await
            .text(),
        "text/b"
    );
    assert_eq!(origin.requests(), 2);
    assert_eq!(
        get_with(&client, &url, &[("accept", "text/a")])
            .await
            .text(),
        "text/a"
    );
    assert_eq!(
        get_with(&client, &url, &[("accept", "text/b")])
            .await
            .text(),
        "text/b"
    );
    assert_eq!(
        origin.requests(),
        2,
        "both variants answered from the cache"
    );
    assert_eq!(get(&client, &url).await.text(), "none");
    assert_eq!(origin.requests(), 3, "an absent header is its own variant");
}

#[tokio::test]
async fn vary_star_never_matches() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(200, &[("cache-control", "max-age=60"), ("vary", "*")], "x")
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/star", proxy.addr());
    get(&client, &url).await;
    get(&client, &url).await;
    assert_eq!(origin.requests(), 2);
}

#[tokio::test]
async fn private_responses_are_not_shared() {
    let origin = Origin::start(Duration::ZERO, |req, _| {
        let cc = match req.uri.path() {
            "/api/private" => "private, max-age=60",
            "/api/no-store" => "no-store",
            "/api/auth-public" => "public, max-age=60",
            _ => "max-age=60",
        };
        let mut headers = vec![("cache-control", cc)];
        if req.uri.path() == "/api/cookie" {
            headers.push(("set-cookie", "session=1"));
        }
        respond(200, &headers, "x")
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let base = format!("http://{}", proxy.addr());
    let auth = [("authorization", "Bearer secret")];
    let cases: [Case; 5] = [
        ("/api/private", &[], 2),
        ("/api/no-store", &[], 2),
        ("/api/cookie", &[], 2),
        ("/api/auth", &auth, 2),
        ("/api/auth-public", &auth, 1),
    ];
    for (path, headers, expected) in cases {
        let before = origin.requests();
        for _ in 0..2 {
            let got = get_with(&client, &format!("{base}{path}"), headers).await;
            assert_eq!(got.status, 200);
        }
        assert_eq!(origin.requests() - before, expected, "{path}");
    }
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_target_and_location() {
    let origin = Origin::start(Duration::ZERO, |req, n| {
        if req.method == http::Method::POST {
            respond(201, &[("location", "/api/items/7")], "")
        } else {
            respond(200, &[("cache-control", "max-age=60")], format!("{n}"))
        }
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let list = format!("http://{}/api/items", proxy.addr());
    let item = format!("http://{}/api/items/7", proxy.addr());
    get(&client, &list).await;
    get(&client, &item).await;
    get(&client, &list).await;
    get(&client, &item).await;
    assert_eq!(origin.requests(), 2);
    let post = send(&client, Request::post(&list).body(body("new")).unwrap()).await;
    assert_eq!(post.status, 201);
    assert_eq!(origin.requests(), 3);
    get(&client, &list).await;
    get(&client, &item).await;
    assert_eq!(
        origin.requests(),
        5,
        "both the target and Location were invalidated"
    );
}

#[tokio::test]
async fn concurrent_misses_send_one_request_to_the_origin() {
    let origin = Origin::start(Duration::from_millis(300), |_, n| {
        respond(
            200,
            &[("cache-control", "max-age=60")],
            format!("response {n}"),
        )
    })
    .await;
    let mut config = cached_config(origin.addr(), CacheSettings::default());
    config.upstreams[0].max_idle_per_backend = 200;
    config.upstreams[0].max_workers = 1000;
    let proxy = start_proxy(config).await;
    let client = client();
    let url = format!("http://{}/api/hot", proxy.addr());
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    for task in tasks {
        let got = task.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "response 1");
    }
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn a_response_over_the_object_limit_streams_through_uncached() {
    let sim = sim_with_cache_control("max-age=60").await;
    let settings = CacheSettings {
        max_object_bytes: 16 * 1024,
        ..CacheSettings::default()
    };
    let proxy = start_proxy(cached_config(sim.addr(), settings)).await;
    let client = client();
    let url = format!("http://{}/api/big?size=200000", proxy.addr());
    let first = get(&client, &url).await;
    assert_eq!(first.status, 200);
    assert!(first.body.len() >= 200_000);
    let second = get(&client, &url).await;
    assert_eq!(second.body, first.body);
    assert_eq!(sim.stats().requests("/api/big"), 2);
    assert_eq!(stats(&proxy, "api").objects, 0);

    let small = format!("http://{}/api/small?size=1000", proxy.addr());
    get(&client, &small).await;
    get(&client, &small).await;
    assert_eq!(
        sim.stats().requests("/api/small"),
        1,
        "small responses are still stored"
    );
}

#[tokio::test]
async fn the_byte_bound_holds_after_thousands_of_keys() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(200, &[("cache-control", "max-age=60")], vec![b'x'; 700])
    })
    .await;
    let max_bytes = 128 * 1024;
    let settings = CacheSettings {
        max_bytes,
        max_object_bytes: 8 * 1024,
        ..CacheSettings::default()
    };
    let proxy = start_proxy(cached_config(origin.addr(), settings)).await;
    let client = client();
    for i in 0..3000 {
        let got = get(&client, &format!("http://{}/api/k/{i}", proxy.addr())).await;
        assert_eq!(got.status, 200);
    }
    let s = stats(&proxy, "api");
    assert!(s.bytes as usize <= max_bytes, "{s:?}");
    assert!(s.objects > 10, "{s:?}");
    assert!(s.evictions > 0, "{s:?}");
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let sim = sim_with_cache_control("max-age=60").await;
    let proxy = start_proxy(cached_config(sim.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/h", proxy.addr());
    let got = get(&client, &url).await;
    let head = send(&client, Request::head(&url).body(empty()).unwrap()).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length").unwrap(),
        got.body.len().to_string()
    );
    assert!(head.header("age").is_some());
    assert_eq!(sim.stats().requests("/api/h"), 1);
}

#[tokio::test]
async fn a_strong_etag_is_generated_when_the_origin_sends_none() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(200, &[("cache-control", "max-age=60")], "hello")
    })
    .await;
    let settings = CacheSettings {
        generate_etag: true,
        ..CacheSettings::default()
    };
    let proxy = start_proxy(cached_config(origin.addr(), settings)).await;
    let client = client();
    let url = format!("http://{}/api/e", proxy.addr());
    get(&client, &url).await;
    let hit = get(&client, &url).await;
    let etag = hit.header("etag").expect("generated").to_string();
    assert_eq!(
        etag, "\"5d41402abc4b2a76b9719d911017c592\"",
        "md5 of the body"
    );
    let cond = get_with(&client, &url, &[("if-none-match", &etag)]).await;
    assert_eq!(cond.status, 304);
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn cache_off_routes_are_untouched() {
    let sim = sim_with_cache_control("max-age=60").await;
    let proxy = start_proxy(proxy_config(sim.addr())).await;
    let client = client();
    let url = format!("http://{}/api/off", proxy.addr());
    let got = get(&client, &url).await;
    assert!(got.header("cache-status").is_none());
    get(&client, &url).await;
    assert_eq!(sim.stats().requests("/api/off"), 2);
}

#[tokio::test]
async fn status_shows_each_cached_routes_fill_and_lookups() {
    let sim = sim_with_cache_control("max-age=60").await;
    let proxy = start_proxy(cached_config(sim.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/s", proxy.addr());
    let first = get(&client, &url).await;
    let etag = first.header("etag").unwrap().to_string();
    get(&client, &url).await;
    let cond = get_with(&client, &url, &[("if-none-match", &etag)]).await;
    assert_eq!(cond.status, 304);

    let status = admin::status(&proxy).await;
    let routes = status["routes"].as_array().unwrap();
    let api = routes.iter().find(|r| r["name"] == "api").unwrap();
    let cache = &api["cache_stats"];
    assert_eq!(cache["objects"], 1, "{cache:#}");
    assert!(cache["bytes"].as_u64().unwrap() >= first.body.len() as u64);
    assert_eq!(cache["max_bytes"], CacheSettings::default().max_bytes);
    assert_eq!(cache["evictions"], 0);
    let lookups = &cache["lookups"];
    assert_eq!(
        (&lookups["miss"], &lookups["hit"], &lookups["not_modified"]),
        (&1.into(), &1.into(), &1.into()),
        "{lookups:#}"
    );
    assert_eq!(lookups["stale"], 0);

    // A route without the cache has no cache stats.
    let plain = start_proxy(proxy_config(sim.addr())).await;
    let status = admin::status(&plain).await;
    assert!(status["routes"][0]["cache_stats"].is_null(), "{status:#}");
}

/// Shedding is about to reject a GET whose stored copy went stale: the client gets
/// that copy (within `cache_stale_on_shed_ms` past its freshness) and the backend sees
/// nothing; past the limit, or with nothing stored, the client gets the 429.
#[tokio::test]
async fn a_stale_copy_is_served_instead_of_a_429_while_shedding() {
    let origin = Origin::start(Duration::ZERO, |req, n| match req.uri.path() {
        // Stale as soon as stored.
        "/api/reports/recent" => respond(
            200,
            &[("cache-control", "max-age=0"), ("etag", "\"r1\"")],
            "recent report",
        ),
        // Already 90 s past its freshness when it arrives (Age 100 > max-age 10).
        "/api/reports/old" => respond(
            200,
            &[("cache-control", "max-age=10"), ("age", "100")],
            "old report",
        ),
        _ => respond(200, &[("cache-control", "no-store")], format!("{n}")),
    })
    .await;
    let settings = CacheSettings {
        stale_on_shed: Some(Duration::from_secs(30)),
        ..CacheSettings::default()
    };
    let mut config = cached_config(origin.addr(), settings);
    // The sheddable route sheds everything from 3 of 16 workers busy (0.05 + band 0.10 <
    // 3/16), so a few held requests are enough to make the decision certain.
    config.routes[1].threshold = Some(0.05);
    let proxy = start_proxy(config).await;
    let client = client();
    let base = format!("http://{}", proxy.addr());

    let recent = get(&client, &format!("{base}/api/reports/recent")).await;
    assert_eq!(recent.status, 200);
    assert_eq!(
        get(&client, &format!("{base}/api/reports/old"))
            .await
            .status,
        200
    );
    assert_eq!(origin.requests(), 2);
    assert_eq!(stats(&proxy, "reports").objects, 2);

    // Four critical requests held in flight at the origin: utilisation 4/16.
    let held: Vec<_> = (0..4)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{base}/api/checkout/hold?i={i}"));
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || origin.requests() == 6).await,
        "the held requests reached the origin"
    );
    let upstream = proxy.shared().generation.load().upstreams["app"].clone();
    assert_eq!(upstream.inflight(), 4);

    let got = get(&client, &format!("{base}/api/reports/recent")).await;
    assert_eq!(got.status, 200, "the stale copy instead of a 429");
    assert_eq!(got.text(), "recent report");
    assert_eq!(got.header("etag"), Some("\"r1\""));
    assert!(got.header("age").is_some(), "an Age header");
    let cache_status = got.header("cache-status").unwrap();
    assert!(
        cache_status.starts_with("loadgate; hit") && cache_status.contains("detail=stale-on-shed"),
        "{cache_status}"
    );
    // A conditional request is answered from the stale copy too.
    let cond = get_with(
        &client,
        &format!("{base}/api/reports/recent"),
        &[("if-none-match", "\"r1\"")],
    )
    .await;
    assert_eq!(cond.status, 304);
    assert!(cond
        .header("cache-status")
        .unwrap()
        .contains("detail=stale-on-shed"));
    assert_eq!(origin.requests(), 6, "the backend count did not move");

    // Past the limit (90 s stale > 30 s), and with nothing stored: the 429.
    let old = get(&client, &format!("{base}/api/reports/old")).await;
    assert_eq!(old.status, 429, "beyond cache_stale_on_shed_ms");
    let none = get(&client, &format!("{base}/api/reports/never-stored")).await;
    assert_eq!(none.status, 429);
    // A request that asks for a fresh answer is not given a stale one.
    let no_cache = get_with(
        &client,
        &format!("{base}/api/reports/recent"),
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(no_cache.status, 429);
    assert_eq!(origin.requests(), 6);
    assert_eq!(stats(&proxy, "reports").objects, 2);

    origin.release();
    for task in held {
        assert_eq!(task.await.unwrap().status, 200);
    }
    let lookups = proxy
        .shared()
        .generation
        .load()
        .routes
        .iter()
        .find(|r| r.name == "reports")
        .unwrap()
        .http_cache
        .as_ref()
        .unwrap()
        .lookups();
    assert_eq!(lookups.stale, 2, "{lookups:?}");
}

/// Without `cache_stale_on_shed_ms` a shed GET gets its 429 even with a copy stored.
#[tokio::test]
async fn without_stale_on_shed_the_429_stands() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(200, &[("cache-control", "max-age=0")], "report")
    })
    .await;
    let mut config = cached_config(origin.addr(), CacheSettings::default());
    config.routes[1].threshold = Some(0.05);
    let proxy = start_proxy(config).await;
    let client = client();
    let base = format!("http://{}", proxy.addr());
    assert_eq!(
        get(&client, &format!("{base}/api/reports/r")).await.status,
        200
    );
    let held: Vec<_> = (0..4)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{base}/api/checkout/hold?i={i}"));
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || origin.requests() == 5).await);
    let got = get(&client, &format!("{base}/api/reports/r")).await;
    assert_eq!(got.status, 429);
    origin.release();
    for task in held {
        assert_eq!(task.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn any_final_status_with_explicit_freshness_is_reused() {
    // RFC 9111 §3: explicit freshness makes any final status storable; the cache
    // needs to understand the status only under `must-understand`.
    let origin = Origin::start(Duration::ZERO, |req, _| match req.uri.path() {
        "/api/500" => respond(500, &[("cache-control", "max-age=60")], "oops"),
        "/api/599" => respond(599, &[("cache-control", "max-age=60")], "odd"),
        "/api/204" => respond(204, &[("cache-control", "max-age=60")], ""),
        _ => respond(
            599,
            &[("cache-control", "max-age=60, no-store, must-understand")],
            "odd",
        ),
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    for (path, status, body) in [
        ("/api/500", 500, "oops"),
        ("/api/599", 599, "odd"),
        ("/api/204", 204, ""),
    ] {
        let url = format!("http://{}{path}", proxy.addr());
        let first = get(&client, &url).await;
        assert_eq!((first.status, first.text().as_str()), (status, body));
        let hit = get(&client, &url).await;
        assert_eq!((hit.status, hit.text().as_str()), (status, body), "{path}");
        assert!(
            hit.header("cache-status").unwrap().contains("hit"),
            "{path} answered from the cache"
        );
    }
    assert_eq!(origin.requests(), 3, "one origin request per status");

    let url = format!("http://{}/api/599-must-understand", proxy.addr());
    assert_eq!(get(&client, &url).await.status, 599);
    assert_eq!(get(&client, &url).await.status, 599);
    assert_eq!(
        origin.requests(),
        5,
        "an unknown status under must-understand is not stored"
    );
}

#[tokio::test]
async fn age_is_read_from_its_first_member_and_an_invalid_one_is_ignored() {
    let origin = Origin::start(Duration::ZERO, |req, _| {
        let age = match req.uri.path() {
            "/api/list" => "7200, 0",
            "/api/param" => "7200;foo",
            _ => "abc",
        };
        respond(200, &[("cache-control", "max-age=3600"), ("age", age)], "x")
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let list = format!("http://{}/api/list", proxy.addr());
    get(&client, &list).await;
    get(&client, &list).await;
    assert_eq!(
        origin.requests(),
        2,
        "`Age: 7200, 0` is 7200: older than max-age, so stale"
    );
    let param = format!("http://{}/api/param", proxy.addr());
    get(&client, &param).await;
    get(&client, &param).await;
    assert_eq!(
        origin.requests(),
        4,
        "`Age: 7200;foo` is 7200, its parameter dropped: stale"
    );
    let text = format!("http://{}/api/text", proxy.addr());
    get(&client, &text).await;
    let hit = get(&client, &text).await;
    assert_eq!(origin.requests(), 5, "`Age: abc` is ignored: still fresh");
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!(age < 60, "the invalid Age did not count: {age}");
}

#[tokio::test]
async fn expires_is_read_in_every_http_date_format_but_not_other_zones() {
    // RFC 9110 §5.6.7: a recipient must accept IMF-fixdate, RFC 850 and asctime;
    // case and a wrong day name do not change the instant. An invalid Expires means
    // already expired (RFC 9111 §5.3).
    let origin = Origin::start(Duration::ZERO, |req, _| {
        let expires = match req.uri.path() {
            "/api/asctime" => "Thu Aug  8 02:01:18 2050",
            "/api/rfc850" => "Thursday, 18-Aug-50 02:01:18 GMT",
            "/api/upper" => "THU, 18 AUG 2050 02:01:18 gmt",
            _ => "Thu, 18 Aug 2050 02:01:18 UTC",
        };
        respond(200, &[("expires", expires)], "x")
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    for path in ["/api/asctime", "/api/rfc850", "/api/upper"] {
        let url = format!("http://{}{path}", proxy.addr());
        get(&client, &url).await;
        let hit = get(&client, &url).await;
        assert!(
            hit.header("cache-status").unwrap().contains("hit"),
            "{path} is fresh"
        );
    }
    assert_eq!(origin.requests(), 3);
    let url = format!("http://{}/api/utc", proxy.addr());
    get(&client, &url).await;
    get(&client, &url).await;
    assert_eq!(origin.requests(), 5, "an Expires in UTC is invalid: stale");
}

#[tokio::test]
async fn a_byte_range_is_cut_from_a_stored_complete_response() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(
            200,
            &[("cache-control", "max-age=3600"), ("x-stored", "1")],
            "0123456789A",
        )
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/bytes", proxy.addr());
    assert_eq!(get(&client, &url).await.text(), "0123456789A");
    for (range, body, content_range) in [
        ("bytes=0-1", "01", "bytes 0-1/11"),
        ("bytes=1-", "123456789A", "bytes 1-10/11"),
        ("bytes=-1", "A", "bytes 10-10/11"),
    ] {
        let got = get_with(&client, &url, &[("range", range)]).await;
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(got.text(), body, "{range}");
        assert_eq!(got.header("content-range"), Some(content_range));
        assert_eq!(got.header("x-stored"), Some("1"), "stored fields kept");
        assert!(got.header("age").is_some());
    }
    assert_eq!(origin.requests(), 1, "every range answered from the store");

    // Several ranges are the origin's to answer; nothing is stored from it.
    let multi = get_with(&client, &url, &[("range", "bytes=0-1,3-4")]).await;
    assert_eq!(multi.status, 200, "this origin ignores Range");
    assert_eq!(origin.requests(), 2);
    assert_eq!(get(&client, &url).await.text(), "0123456789A");
    assert_eq!(origin.requests(), 2, "the stored response is still there");
}

#[tokio::test]
async fn accept_language_variants_match_whatever_the_tag_case() {
    let origin = Origin::start(Duration::ZERO, |_, _| {
        respond(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            "bonjour",
        )
    })
    .await;
    let proxy = start_proxy(cached_config(origin.addr(), CacheSettings::default())).await;
    let client = client();
    let url = format!("http://{}/api/greeting", proxy.addr());
    get_with(&client, &url, &[("accept-language", "fr-FR, en")]).await;
    let hit = get_with(&client, &url, &[("accept-language", "fr-fr, EN")]).await;
    assert_eq!(hit.text(), "bonjour");
    assert_eq!(origin.requests(), 1, "language tags are case-insensitive");
    get_with(&client, &url, &[("accept-language", "en, fr-FR")]).await;
    assert_eq!(
        origin.requests(),
        2,
        "the order is kept: a backend may pick the first of equal weights"
    );
}

#[tokio::test]
async fn the_body_read_into_the_store_behind_a_304_keeps_its_backend_slot() {
    // An origin that ignores the client's If-None-Match and sends the whole 200: the
    // client gets its 304 at once, while the body still arrives into the store. The
    // backend is busy sending it, so the request stays in flight until it ends.
    let listener = tokio::net::TcpListener::bind(LOCAL0).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (rest_tx, rest_rx) = tokio::sync::oneshot::channel::<()>();
    let origin = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = next_request(&listener).await;
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\netag: \"v1\"\r\ncache-control: max-age=60\r\n\
                  content-length: 10\r\n\r\nabc",
            )
            .await
            .unwrap();
        let _ = rest_rx.await;
        stream.write_all(b"defghij").await.unwrap();
        // Held open until the proxy is done with the connection.
        let _ = stream.read(&mut [0u8; 64]).await;
    });
    let proxy = start_proxy(cached_config(addr, CacheSettings::default())).await;
    let shared = proxy.shared().clone();
    let inflight = move || shared.generation.load().upstreams["app"].inflight();
    let client = client();
    let url = format!("http://{}/api/drained", proxy.addr());

    let answered = get_with(&client, &url, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(answered.status, 304);
    assert_eq!(inflight(), 1, "the backend is still sending the body");

    rest_tx.send(()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || inflight() == 0).await,
        "the slot is released once the body is in"
    );
    assert!(eventually(Duration::from_secs(5), || stats(&proxy, "api").objects == 1).await);
    let hit = get(&client, &url).await;
    assert_eq!((hit.status, hit.text()), (200, "abcdefghij".to_string()));
    origin.abort();
}

#[tokio::test]
async fn early_hints_reach_an_http11_client_as_they_come_and_are_never_stored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The origin sends `103 Early Hints`, then waits for the test before its 200.
    let listener = tokio::net::TcpListener::bind(LOCAL0).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (final_tx, mut final_rx) = tokio::sync::mpsc::channel::<()>(4);
    let origin = tokio::spawn(async move {
        loop {
            let mut stream = next_request(&listener).await;
            stream
                .write_all(
                    b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\
                      connection: x-hop\r\nx-hop: 1\r\n\r\n",
                )
                .await
                .unwrap();
            final_rx.recv().await.unwrap();
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 2\r\n\
                      connection: close\r\n\r\nok",
                )
                .await
                .unwrap();
        }
    });
    let proxy = start_proxy(cached_config(addr, CacheSettings::default())).await;
    let request = |version: &str| {
        format!("GET /api/hints HTTP/{version}\r\nhost: a\r\nconnection: close\r\n\r\n")
    };

    // HTTP/1.1: the 103 arrives while the origin still holds its final response.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    stream.write_all(request("1.1").as_bytes()).await.unwrap();
    let hint = read_until(&mut stream, "\r\n\r\n").await;
    assert!(hint.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{hint}");
    assert!(
        hint.contains("link: </style.css>; rel=preload\r\n"),
        "{hint}"
    );
    assert!(
        !hint.contains("x-hop"),
        "hop-by-hop fields stay behind: {hint}"
    );
    final_tx.send(()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let last = String::from_utf8_lossy(&rest).into_owned();
    assert!(last.starts_with("HTTP/1.1 200 OK\r\n"), "{last}");
    assert!(last.ends_with("\r\n\r\nok"), "{last}");
    assert!(!last.to_ascii_lowercase().contains("link:"), "{last}");

    // The stored response is the final one alone: no 103, no hint fields.
    let hit = raw_exchange(proxy.addr(), request("1.1").as_bytes()).await;
    assert!(hit.starts_with("HTTP/1.1 200 OK\r\n"), "{hit}");
    assert!(hit.contains("cache-status: loadgate; hit"), "{hit}");
    assert!(!hit.to_ascii_lowercase().contains("link:"), "{hit}");

    // HTTP/1.0 clients never get an interim response (RFC 9110 §15.2).
    let other = "GET /api/hints-10 HTTP/1.0\r\nhost: a\r\n\r\n";
    let exchange = tokio::spawn(raw_exchange(proxy.addr(), other.as_bytes()));
    final_tx.send(()).await.unwrap();
    let old = exchange.await.unwrap();
    assert!(old.starts_with("HTTP/1.0 200 OK\r\n"), "{old}");
    assert!(!old.contains("103"), "{old}");

    // On a kept-alive connection, a second request's hint comes between the responses.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let keep_alive = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
    for path in ["/api/kept-1", "/api/kept-2"] {
        stream.write_all(keep_alive(path).as_bytes()).await.unwrap();
        let hint = read_until(&mut stream, "\r\n\r\n").await;
        assert!(
            hint.starts_with("HTTP/1.1 103 Early Hints\r\n"),
            "{path}: {hint}"
        );
        final_tx.send(()).await.unwrap();
        let last = read_until(&mut stream, "\r\n\r\nok").await;
        assert!(last.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {last}");
    }
    origin.abort();
}

/// Reads from `stream` until what it has read ends with `end`, within 5 s.
async fn read_until(stream: &mut tokio::net::TcpStream, end: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).ends_with(end) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("within 5 s")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}
