//! Unit tests of the cache layer: lookup, store while streaming, revalidate, coalesce.

use super::*;
use crate::http::body::{full, BoxError, ProxyBody};
use http::header;
use http::{Request, Response};
use http_body_util::BodyExt;

fn get(path: &str) -> Request<()> {
    Request::get(path).body(()).unwrap()
}

fn origin(headers: &[(&'static str, &str)], body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    for (n, v) in headers {
        r.headers_mut()
            .append(*n, HeaderValue::from_str(v).unwrap());
    }
    r
}

async fn forward(
    cache: &Cache,
    req: &Request<()>,
    response: Response<ProxyBody>,
) -> Response<ProxyBody> {
    match cache.lookup(req, "example.com").await {
        Lookup::Respond(_) | Lookup::Revalidate(..) => panic!("expected a miss"),
        Lookup::Forward(mut p) => {
            let mut headers = req.headers().clone();
            p.prepare(&mut headers);
            let response = match p.finish(response) {
                Finished::Answer(response) => response,
                Finished::AnswerAndDrain(response, drain) => {
                    tokio::spawn(drain.run());
                    response
                }
                Finished::Refetch(_) => panic!("expected an answer"),
            };
            let (parts, body) = response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            Response::from_parts(parts, full(body))
        }
    }
}

#[tokio::test]
async fn stores_a_miss_and_answers_the_next_lookup() {
    let cache = Cache::new("t", "app", CacheSettings::default());
    let req = get("/a");
    forward(
        &cache,
        &req,
        origin(&[("cache-control", "max-age=60")], "hello"),
    )
    .await;
    assert_eq!(cache.stats().objects, 1);
    match cache.lookup(&req, "example.com").await {
        Lookup::Respond(r) => {
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["age"], "0");
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hello");
        }
        Lookup::Forward(_) | Lookup::Revalidate(..) => panic!("expected a hit"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_body_read_behind_a_304_is_cut_off_at_the_drain_limit() {
    let cache = Cache::new("t", "app", CacheSettings::default());
    // The client holds "v1" already; the origin's 200 starts a body that never ends.
    let mut req = get("/a");
    req.headers_mut()
        .insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\""));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(1);
    let body = http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|frame| (frame, rx))
    }));
    let mut response = Response::new(body.boxed_unsync());
    response
        .headers_mut()
        .insert(header::ETAG, HeaderValue::from_static("\"v1\""));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=60"),
    );
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
    let answered = forward(&cache, &req, response).await;
    assert_eq!(answered.status(), StatusCode::NOT_MODIFIED);
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"abc"))))
        .await
        .unwrap();

    let started = tokio::time::Instant::now();
    let dropped = tokio::time::timeout(2 * fill::DRAIN_LIMIT, tx.closed()).await;
    assert!(dropped.is_ok(), "the body behind the 304 was never dropped");
    assert_eq!(
        started.elapsed(),
        fill::DRAIN_LIMIT,
        "the body is dropped at the limit"
    );
    assert_eq!(cache.stats().objects, 0, "a body cut off is not stored");
}

#[tokio::test]
async fn a_head_response_freshens_the_stored_get_it_describes() {
    let cache = Cache::new("t", "app", CacheSettings::default());
    let stored = [
        ("cache-control", "max-age=0"),
        ("etag", "\"v1\""),
        ("x-version", "1"),
    ];
    forward(&cache, &get("/a"), origin(&stored, "hello")).await;
    let head = Request::head("/a").body(()).unwrap();

    // Another representation (another ETag): the store is left alone.
    let other = [("cache-control", "max-age=60"), ("etag", "\"v2\"")];
    let answered = forward(&cache, &head, origin(&other, "")).await;
    assert!(
        answered.headers().get("x-version").is_none(),
        "its answer is the backend's alone"
    );
    assert!(
        matches!(
            cache.lookup(&get("/a"), "example.com").await,
            Lookup::Forward(_)
        ),
        "still stale"
    );

    // The same one (same ETag and length): its fields and freshness are taken.
    let same = [
        ("cache-control", "max-age=60"),
        ("etag", "\"v1\""),
        ("x-version", "2"),
        ("content-length", "5"),
    ];
    let answered = forward(&cache, &head, origin(&same, "")).await;
    assert_eq!(answered.headers()["x-version"], "2", "the HEAD's own field");

    // A HEAD answer that leaves a stored field out gets it from the store.
    let stale_again = [
        ("cache-control", "max-age=0"),
        ("etag", "\"v1\""),
        ("x-stored-only", "kept"),
    ];
    forward(&cache, &get("/b"), origin(&stale_again, "hello")).await;
    let head_b = Request::head("/b").body(()).unwrap();
    let bare = [("etag", "\"v1\""), ("cache-control", "max-age=60")];
    let answered = forward(&cache, &head_b, origin(&bare, "")).await;
    assert_eq!(answered.headers()["x-stored-only"], "kept");
    assert_eq!(answered.headers()["cache-control"], "max-age=60");
    let body = answered.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());

    match cache.lookup(&get("/a"), "example.com").await {
        Lookup::Respond(r) => {
            assert_eq!(r.headers()["x-version"], "2");
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hello", "the stored body is kept");
        }
        _ => panic!("fresh again after the HEAD"),
    }
}

#[tokio::test]
async fn an_invalidated_variant_does_not_come_back_when_another_is_stored() {
    let cache = Cache::new("t", "app", CacheSettings::default());
    let with_language = |language: &'static str| {
        let mut req = get("/v");
        req.headers_mut()
            .insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static(language));
        req
    };
    let varying = |body| {
        origin(
            &[("cache-control", "max-age=60"), ("vary", "accept-language")],
            body,
        )
    };
    let (de, fr) = (with_language("de"), with_language("fr"));
    forward(&cache, &de, varying("alt")).await;
    assert!(matches!(
        cache.lookup(&de, "example.com").await,
        Lookup::Respond(_)
    ));

    // A POST to the target invalidates it; then the fr variant is stored anew.
    cache.inner.invalidate(&key::primary("example.com", "/v"));
    forward(&cache, &fr, varying("neu")).await;
    assert!(matches!(
        cache.lookup(&fr, "example.com").await,
        Lookup::Respond(_)
    ));
    assert!(
        matches!(cache.lookup(&de, "example.com").await, Lookup::Forward(_)),
        "the de variant stored before the invalidation stays unreachable"
    );
}

#[tokio::test(start_paused = true)]
async fn misses_past_the_waiting_bound_are_sent_on_at_once() {
    let cache = Cache::new("t", "app", CacheSettings::default());
    let req = Arc::new(get("/hot"));
    // The first miss leads the fetch and holds it.
    let Lookup::Forward(leader) = cache.lookup(&req, "example.com").await else {
        panic!("expected a miss");
    };
    let mut followers = tokio::task::JoinSet::new();
    for _ in 0..MAX_COALESCED_WAITING {
        let (cache, req) = (cache.clone(), req.clone());
        followers.spawn(async move {
            matches!(cache.lookup(&req, "example.com").await, Lookup::Forward(_))
        });
    }
    // Each follower waits on the leader's fetch.
    while cache.coalesced_waiting() < MAX_COALESCED_WAITING {
        tokio::task::yield_now().await;
    }
    let started = tokio::time::Instant::now();
    let Lookup::Forward(_) = cache.lookup(&req, "example.com").await else {
        panic!("expected to be sent on");
    };
    assert_eq!(
        started.elapsed(),
        std::time::Duration::ZERO,
        "one more is sent on without waiting"
    );
    assert_eq!(cache.coalesced_waiting(), MAX_COALESCED_WAITING);

    // The leader's fetch ends without storing: the followers go on, their places freed.
    drop(leader);
    while let Some(sent_on) = followers.join_next().await {
        assert!(sent_on.unwrap());
    }
    assert_eq!(cache.coalesced_waiting(), 0);
}

#[tokio::test]
async fn cache_status_says_stored_only_for_a_whole_body_the_store_took() {
    let settings = CacheSettings {
        max_bytes: 64 << 10,
        max_object_bytes: 4096,
        ..CacheSettings::default()
    };
    let cache = Cache::new("t", "app", settings);
    let fresh = [("cache-control", "max-age=60")];
    // No Content-Length: only the body, whole already, shows it is over the limit.
    let over: &'static str = "x".repeat(5000).leak();
    let large = forward(&cache, &get("/large"), origin(&fresh, over)).await;
    assert_eq!(large.headers()[CACHE_STATUS], "loadgate; fwd=miss");
    assert_eq!(cache.stats().objects, 0);

    let small = forward(&cache, &get("/small"), origin(&fresh, "0123")).await;
    assert_eq!(small.headers()[CACHE_STATUS], "loadgate; fwd=miss; stored");
    assert_eq!(cache.stats().objects, 1);
}
