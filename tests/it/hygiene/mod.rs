//! Request hygiene, end to end over raw sockets: for each case, the status the proxy
//! answers and the bytes each backend received (or that none received any byte). The
//! cases are the acceptance tests of the request rules (README "Request rules"), written
//! from RFC 9110 / 9112 / 9113.
//!
//! ```text
//! hygiene/targets.rs   tables: host and authority, path normalisation, refused targets
//! hygiene/messages.rs  tables: framing (CL / TE / chunks), fields, request line, methods
//! hygiene/mod.rs       the table runs, and the cases that need more than one exchange:
//!                      pipelining, half-close, 100-continue, HTTP/2
//! hygiene/property/    the rules as a property: mutated requests forwarded with the
//!                      meaning they were routed on, or not at all
//! hygiene/case.rs      a case, and the runner that reports every failing case of a table
//! hygiene/rig.rs       one proxy in front of three recording backends, per case
//! hygiene/recorder.rs  the recording backend
//! hygiene/expect.rs    the expected forwarded bytes, and what the proxy adds to them
//! hygiene/client.rs    the raw HTTP/1.1 client; hygiene/h2.rs the h2c one
//! ```

mod case;
mod client;
mod expect;
mod h2;
mod messages;
mod property;
pub mod recorder;
mod rig;
mod targets;

use case::{check_requests, run_table};
use client::{show, RawConn, Response};
use expect::{expected, Expected};
use rig::Backend::{self, Batch, Internal, Public};
use rig::Rig;

#[tokio::test]
async fn host_and_authority() {
    run_table("host", targets::host()).await;
}

#[tokio::test]
async fn paths_are_normalised_before_routing() {
    run_table("path", targets::path()).await;
}

#[tokio::test]
async fn bad_targets_are_refused() {
    run_table("refused target", targets::refused_targets()).await;
}

#[tokio::test]
async fn framing_is_unambiguous() {
    run_table("framing", messages::framing()).await;
}

#[tokio::test]
async fn header_and_request_line_syntax() {
    run_table("syntax", messages::syntax()).await;
}

/// Fails with every difference listed, or passes.
fn verdict(wrong: Vec<String>) {
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The response must be `status` with a problem+json body.
fn expect_status(got: Result<Response, String>, status: u16, what: &str) -> Vec<String> {
    match got {
        Ok(r) if r.status == status && (status < 400 || r.is_problem_json()) => vec![],
        Ok(r) => vec![format!(
            "{what}: {} {:?} {:?} (want {status}{})",
            r.status,
            r.header("content-type"),
            show(&r.body),
            if status >= 400 {
                " with problem+json"
            } else {
                ""
            }
        )],
        Err(why) => vec![format!("{what}: no response: {why} (want {status})")],
    }
}

// Rule 10: pipelined requests are each normalised on their own and answered in order.
#[tokio::test]
async fn pipelined_requests_are_normalised_independently() {
    let rig = Rig::start().await;
    let mut conn = RawConn::open(rig.proxy.addr()).await;
    conn.send(
        b"GET /checkout/../reports/a HTTP/1.1\r\nHost: public.example\r\n\r\n\
          GET /api/%72eports/b HTTP/1.1\r\nHost: Internal.Example.\r\n\r\n",
    )
    .await;
    let mut wrong = expect_status(conn.response().await, 200, "first");
    wrong.extend(expect_status(conn.response().await, 200, "second"));
    let first = expected("GET /reports/a HTTP/1.1", &[("host", "public.example")]);
    let second = expected(
        "GET /api/reports/b HTTP/1.1",
        &[("host", "internal.example")],
    );
    wrong.extend(check_requests(&rig, &[(Batch, &first), (Internal, &second)]).await);
    verdict(wrong);
}

// Rule 10: a bad request behind a good one gets its 400 after the good one's 200, then
// the connection closes; only the good one is forwarded.
#[tokio::test]
async fn pipelined_bad_second_request_is_refused_after_the_first() {
    let bad_seconds = [
        (
            "dot segments above the root",
            "GET /../etc/passwd HTTP/1.1\r\nHost: public.example\r\n\r\n",
        ),
        (
            "two Host lines",
            "GET /x HTTP/1.1\r\nHost: public.example\r\nHost: internal.example\r\n\r\n",
        ),
        (
            "CL.TE",
            "POST /x HTTP/1.1\r\nHost: public.example\r\nContent-Length: 5\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, second) in bad_seconds {
        let rig = Rig::start().await;
        let mut conn = RawConn::open(rig.proxy.addr()).await;
        let first = "GET /reports/a HTTP/1.1\r\nHost: public.example\r\n\r\n";
        conn.send(format!("{first}{second}").as_bytes()).await;
        wrong.extend(expect_status(conn.response().await, 200, what));
        wrong.extend(expect_status(conn.response().await, 400, what));
        if !conn.closed().await {
            wrong.push(format!("{what}: connection left open after the 400"));
        }
        let forwarded = expected("GET /reports/a HTTP/1.1", &[("host", "public.example")]);
        for why in check_requests(&rig, &[(Batch, &forwarded)]).await {
            wrong.push(format!("{what}: {why}"));
        }
    }
    verdict(wrong);
}

// Rule 11: a client may shut its sending side once its request is complete (RFC 9112
// §9.6 leaves half-close to the client); it still gets its response.
#[tokio::test]
async fn half_closed_client_still_gets_its_response() {
    let cases = [
        (
            "GET",
            "GET /reports/x HTTP/1.1\r\nHost: public.example\r\n\r\n",
            expected("GET /reports/x HTTP/1.1", &[("host", "public.example")]),
        ),
        (
            "POST",
            "POST /reports/x HTTP/1.1\r\nHost: public.example\r\nContent-Length: 3\r\n\r\nabc",
            expected(
                "POST /reports/x HTTP/1.1",
                &[("host", "public.example"), ("content-length", "3")],
            )
            .body(b"abc"),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, request, forwarded) in cases {
        let rig = Rig::start().await;
        let mut conn = RawConn::open(rig.proxy.addr()).await;
        conn.send(request.as_bytes()).await;
        conn.shutdown_write().await;
        wrong.extend(expect_status(conn.response().await, 200, what));
        for why in check_requests(&rig, &[(Batch, &forwarded)]).await {
            wrong.push(format!("{what}: {why}"));
        }
    }
    verdict(wrong);
}

// RFC 9110 §10.1.1: the proxy answers `Expect: 100-continue` itself (100, then the body
// flows) and does not forward the expectation: the body is already on its way.
#[tokio::test]
async fn expect_100_continue_is_answered_and_not_forwarded() {
    let rig = Rig::start().await;
    let mut conn = RawConn::open(rig.proxy.addr()).await;
    conn.send(
        b"POST /reports/up HTTP/1.1\r\nHost: public.example\r\nContent-Length: 3\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await;
    let mut wrong = expect_status(conn.response().await, 100, "before the body");
    conn.send(b"abc").await;
    wrong.extend(expect_status(
        conn.final_response().await,
        200,
        "after the body",
    ));
    let forwarded = expected(
        "POST /reports/up HTTP/1.1",
        &[("host", "public.example"), ("content-length", "3")],
    )
    .body(b"abc");
    wrong.extend(check_requests(&rig, &[(Batch, &forwarded)]).await);
    verdict(wrong);
}

/// An HTTP/2 request the proxy must refuse: a 400 with problem+json, or a stream error
/// (RFC 9113 §8.1.1: malformed); never forwarded.
async fn h2_refused(uri: &str, headers: &[(&str, &str)]) {
    let rig = Rig::start().await;
    let answer = h2::send(rig.proxy.addr(), h2::get(uri, headers)).await;
    let mut wrong = Vec::new();
    match &answer {
        h2::Answer::Reset(_) => {}
        h2::Answer::Response {
            status: 400,
            content_type: Some(t),
            body,
        } if t == "application/problem+json" && !body.is_empty() => {}
        other => wrong.push(format!(
            "answered {other} (want 400 problem+json or a reset)"
        )),
    }
    wrong.extend(check_requests(&rig, &[]).await);
    verdict(wrong);
}

/// An HTTP/2 request served with 200 from `backend`, which receives `forwarded`.
async fn h2_served(uri: &str, headers: &[(&str, &str)], backend: Backend, forwarded: Expected) {
    let rig = Rig::start().await;
    let answer = h2::send(rig.proxy.addr(), h2::get(uri, headers)).await;
    let mut wrong = Vec::new();
    if !matches!(answer, h2::Answer::Response { status: 200, .. }) {
        wrong.push(format!("answered {answer} (want 200)"));
    }
    wrong.extend(check_requests(&rig, &[(backend, &forwarded)]).await);
    verdict(wrong);
}

// Rule 12, RFC 9113 §8.3.1: a `host` that differs from `:authority` makes the request
// malformed.
#[tokio::test]
async fn h2_authority_differing_from_host_is_refused() {
    h2_refused("http://public.example/x", &[("host", "internal.example")]).await;
}

// Rule 12: the same path normalisation as HTTP/1.1; the Host comes from `:authority`.
#[tokio::test]
async fn h2_path_is_normalised_and_host_taken_from_authority() {
    let forwarded = expected("GET /reports/x HTTP/1.1", &[])
        .host_added("public.example")
        .received("2");
    h2_served(
        "http://public.example/checkout/../reports/x",
        &[],
        Batch,
        forwarded,
    )
    .await;
}

#[tokio::test]
async fn h2_authority_is_matched_like_host() {
    let forwarded = expected("GET /x HTTP/1.1", &[])
        .host_added("internal.example")
        .received("2");
    h2_served("http://Internal.Example./x", &[], Internal, forwarded).await;
}

#[tokio::test]
async fn h2_encoded_slash_is_refused() {
    h2_refused("http://public.example/reports%2Fx", &[]).await;
}

#[tokio::test]
async fn h2_dot_segments_above_the_root_are_refused() {
    h2_refused("http://public.example/../etc/passwd", &[]).await;
}

// RFC 9113 §8.3.1: `host` equal to `:authority` is allowed; it is forwarded once.
#[tokio::test]
async fn h2_host_equal_to_authority_is_served() {
    let forwarded = expected("GET /x HTTP/1.1", &[("host", "public.example")]).received("2");
    h2_served(
        "http://public.example/x",
        &[("host", "public.example")],
        Public,
        forwarded,
    )
    .await;
}
