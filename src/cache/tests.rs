//! Unit tests of the cache layer: lookup, store while streaming, revalidate, coalesce.

use super::*;
use crate::http::body::{full, ProxyBody};
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
    let cache = Cache::new("t", CacheSettings::default());
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
