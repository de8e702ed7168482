//! The proxy core end to end: real sockets on 127.0.0.1, the simulated backend,
//! and assertions on what a client and the backend see.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use loadgate::http::body::empty;

use crate::support::*;

#[tokio::test]
async fn get_is_forwarded_and_marked_with_via_and_request_id() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let got = get(&client(), &format!("http://{}/api/orders/1", proxy.addr())).await;
    assert_eq!(got.status, 200);
    assert!(got.header("etag").is_some_and(|e| e.starts_with("\"0")));
    assert_eq!(got.header("via"), Some("1.1 loadgate"));
    assert!(got.header("x-request-id").is_some());
    assert_eq!(backend.stats().requests("/api/orders/1"), 1);
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let got = get(
        &h2c_client(),
        &format!("http://{}/api/orders/2", proxy.addr()),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(backend.stats().requests("/api/orders/2"), 1);
    let headers = get(
        &h2c_client(),
        &format!("http://{}/api/headers", proxy.addr()),
    )
    .await;
    let seen = headers.text().to_ascii_lowercase();
    assert!(seen.contains("2 loadgate"), "Via names HTTP/2: {seen}");
    // Each response has its own request id (sent as never-indexed fields in HPACK).
    let ids = [&got, &headers].map(|g| g.header("x-request-id").map(str::to_string));
    assert!(ids[0].is_some() && ids[1].is_some(), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn sized_post_of_two_mebibytes_streams_through() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let payload: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("http://{}/api/echo", proxy.addr()))
        .header("content-length", payload.len())
        .body(body(payload.clone()))
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), payload.len());
    assert!(got.body == payload, "echoed body differs");
    assert_eq!(backend.stats().requests_by_method("POST", "/api/echo"), 1);
}

#[tokio::test]
async fn chunked_post_streams_through() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks: Vec<Result<Frame<Bytes>, loadgate::http::body::BoxError>> =
        (0..20).map(|_| Ok(Frame::data(chunk.clone()))).collect();
    let streamed = StreamBody::new(stream::iter(chunks)).boxed_unsync();
    let req = Request::post(format!("http://{}/api/echo", proxy.addr()))
        .body(streamed)
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), 20 * 64 * 1024);
}

#[tokio::test]
async fn large_response_streams_through() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let size = 3 * 1024 * 1024 + 17;
    let got = get(
        &client(),
        &format!("http://{}/api/big?size={size}", proxy.addr()),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), size);
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarded_headers_added() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let request = "GET /api/headers HTTP/1.1\r\n\
        Host: shop.example\r\n\
        Connection: close, X-Secret\r\n\
        X-Secret: do-not-forward\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Proxy-Connection: keep-alive\r\n\
        Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n\
        X-Forwarded-For: 203.0.113.9\r\n\
        Authorization: Bearer end-to-end\r\n\r\n";
    let response = raw_exchange(proxy.addr(), request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = response.to_ascii_lowercase();
    let body = &seen[seen.find("\r\n\r\n").unwrap()..];
    for gone in [
        "x-secret",
        "keep-alive",
        "\"te\"",
        "proxy-connection",
        "proxy-authorization",
    ] {
        assert!(!body.contains(gone), "{gone} reached the backend: {body}");
    }
    // The client is no trusted proxy: its X-Forwarded-For is replaced, not appended to.
    assert!(
        body.contains("\"x-forwarded-for\":[\"127.0.0.1\"]"),
        "{body}"
    );
    assert!(!body.contains("203.0.113.9"), "{body}");
    assert!(body.contains("x-forwarded-proto"), "{body}");
    assert!(body.contains("shop.example"), "{body}");
    assert!(body.contains("1.1 loadgate"), "{body}");
    assert!(
        body.contains("bearer end-to-end"),
        "end-to-end headers stay: {body}"
    );
}

#[tokio::test]
async fn ambiguous_framing_gets_400_and_never_reaches_the_backend() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let both = "POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
        Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
    let response = raw_exchange(proxy.addr(), both.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("application/problem+json"), "{response}");

    let te_first = "POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
        Content-Length: 4\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
    let response = raw_exchange(proxy.addr(), te_first.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    let bad_chunk = "POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        zz\r\nabcd\r\n0\r\n\r\n";
    let response = raw_exchange(proxy.addr(), bad_chunk.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    assert_eq!(
        backend.stats().requests("/api/echo"),
        0,
        "the backend saw a bad request"
    );
}

#[tokio::test]
async fn unreachable_backend_gives_502_problem_json() {
    let dead = closed_port().await;
    let mut config = proxy_config(dead.addr());
    config.upstreams[0].health.enabled = false;
    let proxy = start_proxy(config).await;
    let got = get(&client(), &format!("http://{}/api/orders", proxy.addr())).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("content-type"), Some("application/problem+json"));
    let problem = got.json();
    assert_eq!(problem["upstream"], "app");
    assert_eq!(problem["cause"], "connect");
    // The backend's address and the error chain go to the log, not to the client.
    let detail = problem["detail"].as_str().unwrap();
    assert!(!detail.contains(&dead.to_string()), "{detail}");
}

#[tokio::test]
async fn stalled_backend_gives_504_within_the_header_timeout() {
    let backend = TestBackend::new().start().await;
    let mut config = proxy_config(backend.addr());
    config.upstreams[0].response_header_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let started = std::time::Instant::now();
    let got = get(
        &client(),
        &format!("http://{}/api/slow?delay_ms=5000", proxy.addr()),
    )
    .await;
    assert_eq!(got.status, 504);
    assert_eq!(got.json()["cause"], "header_timeout");
    assert!(started.elapsed() < Duration::from_secs(4), "504 came late");
}

#[tokio::test]
async fn probe_path_is_answered_locally() {
    let backend = TestBackend::new().start().await;
    let mut config = proxy_config(backend.addr());
    config.upstreams[0].health.enabled = false;
    let proxy = start_proxy(config).await;
    for _ in 0..3 {
        let got = get(&client(), &format!("http://{}/healthz", proxy.addr())).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.json()["status"], "UP");
    }
    assert_eq!(backend.stats().total_requests(), 0, "health checks are off");
}

#[tokio::test]
async fn unmatched_request_gets_404_naming_the_path() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let got = get(&client(), &format!("http://{}/nothing/here", proxy.addr())).await;
    assert_eq!(got.status, 404);
    assert!(got.text().contains("/nothing/here"), "{}", got.text());
    assert_eq!(backend.stats().requests("/nothing/here"), 0);
}

#[tokio::test]
async fn admin_endpoints_report_state() {
    let backend = TestBackend::new().start().await;
    let mut config = proxy_config(backend.addr());
    name_upstream(&mut config, "admin_test");
    let proxy = start_proxy(config).await;
    let c = client();
    assert_eq!(admin::fetch(&proxy, "/healthz").await.status, 200);

    // Ready once the backend passed a health check.
    let mut ready = false;
    for _ in 0..100 {
        if admin::readyz(&proxy).await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "/readyz never became ready");

    let got = get(&c, &format!("http://{}/api/orders/9", proxy.addr())).await;
    assert_eq!(got.status, 200);
    let status = admin::status(&proxy).await;
    assert_eq!(status["routes"].as_array().unwrap().len(), 3);
    let upstream = &status["upstreams"][0];
    assert_eq!(upstream["name"], "admin_test");
    assert_eq!(upstream["inflight"], 0);
    assert_eq!(upstream["backends"][0]["healthy"], true);

    let answered = [
        ("route", "api"),
        ("upstream", "admin_test"),
        ("class", "normal"),
        ("status", "2xx"),
    ];
    let requests = "loadgate_requests_total";
    assert_eq!(
        admin::counter_settles(&proxy, requests, &answered, 1.0).await,
        1.0
    );
    let metrics = admin::metrics(&proxy).await;
    assert!(metrics.contains("loadgate_request_duration_seconds_bucket"));
    assert!(metrics.contains("loadgate_upstream_inflight{upstream=\"admin_test\"} 0"));
}

#[tokio::test]
async fn readyz_fails_while_every_backend_is_down() {
    let dead = closed_port().await;
    let proxy = start_proxy(proxy_config(dead.addr())).await;
    let got = admin::readyz(&proxy).await;
    assert_eq!(got.status, 503);
    assert!(got.text().contains("no healthy backend"), "{}", got.text());
}

#[tokio::test]
async fn inflight_counts_until_the_response_body_ends() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let c = client();
    let url = format!("http://{}/api/slow?delay_ms=400", proxy.addr());
    let pending: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            let url = url.clone();
            tokio::spawn(async move { get(&c, &url).await.status })
        })
        .collect();
    let shared = proxy.shared().clone();
    let upstream = || shared.generation.load().upstreams["app"].inflight();
    assert!(eventually(Duration::from_secs(3), || upstream() == 3).await);
    for p in pending {
        assert_eq!(p.await.unwrap(), 200);
    }
    assert!(eventually(Duration::from_secs(3), || upstream() == 0).await);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let addr = proxy.addr();
    let c = client();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { get(&c, &format!("http://{addr}/api/slow?delay_ms=300")).await })
    };
    assert!(eventually(Duration::from_secs(3), || backend.stats().busy() == 1).await);
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("shutdown finishes within the drain deadline");
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200, "in-flight request was cut off");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shutdown_turns_unready_at_once_and_keeps_serving_through_the_delay() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let (addr, admin_addr) = (proxy.addr(), proxy.admin_addr());
    let c = client();
    let delay = Duration::from_millis(1_500);
    let started = tokio::time::Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown_after(delay));

    // Readiness says so at once, on the admin port and on the data port's probe path.
    let ready = get(&c, &format!("http://{admin_addr}/readyz")).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("draining"));
    assert_eq!(get(&c, &format!("http://{addr}/healthz")).await.status, 503);

    // Until the delay ends, new connections are accepted and requests served: a client
    // on a fresh connection each time sees no refusal and no reset.
    let mut served = 0;
    while started.elapsed() < delay - Duration::from_millis(300) {
        let fresh = client();
        let got = get(&fresh, &format!("http://{addr}/api/orders/{served}")).await;
        assert_eq!(got.status, 200, "during the delay, request {served}");
        served += 1;
    }
    assert!(served > 0);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown ends after the delay and the drain")
        .unwrap();
    assert!(
        started.elapsed() >= delay,
        "the listeners stayed open for the delay"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "closed after the delay"
    );
}

#[tokio::test]
async fn forwarding_headers_are_kept_from_trusted_proxies_and_replaced_from_others() {
    let origin = crate::support::origin::Origin::start(Duration::ZERO, |_, _| {
        crate::support::origin::respond(200, &[], "ok")
    })
    .await;
    let claims = [
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
        ("x-forwarded-port", "443"),
    ];
    let send_claims = |proxy: std::net::SocketAddr| async move {
        let mut req = Request::get(format!("http://{proxy}/api/orders/1"));
        for (n, v) in claims {
            req = req.header(n, v);
        }
        send(&client(), req.body(empty()).unwrap()).await
    };

    // The client (127.0.0.1) is an ingress the config trusts.
    let mut config = proxy_config(origin.addr());
    config.server.trusted_proxies = vec![loadgate::config::Cidr::parse("127.0.0.0/8").unwrap()];
    let trusting = start_proxy(config).await;
    assert_eq!(send_claims(trusting.addr()).await.status, 200);
    let seen = origin.last_headers();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(
        seen["x-forwarded-proto"], "https",
        "TLS ended at the ingress"
    );
    assert_eq!(seen["x-forwarded-host"], "shop.example");
    assert_eq!(seen["x-forwarded-port"], "443");

    // By default nobody is trusted: the claims are replaced.
    let default = start_proxy(proxy_config(origin.addr())).await;
    assert_eq!(send_claims(default.addr()).await.status, 200);
    let seen = origin.last_headers();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_ne!(seen["x-forwarded-host"], "shop.example");
    // The port in the Host the client sent (the proxy's own address).
    assert_eq!(
        seen["x-forwarded-port"],
        default.addr().port().to_string().as_str()
    );
}

#[tokio::test]
async fn empty_body_methods_work() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(proxy_config(backend.addr())).await;
    let req = Request::delete(format!("http://{}/api/orders/4", proxy.addr()))
        .body(empty())
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        backend
            .stats()
            .requests_by_method("DELETE", "/api/orders/4"),
        1
    );
}
