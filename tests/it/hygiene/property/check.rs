//! One case against the rig: the exchange (send the bytes, read the answers, collect
//! what each backend recorded meanwhile) and the check of it against the reference
//! reading: every request forwarded parsed on its own and compared with its meaning.
//! Not for what the bytes mean (`reference.rs`): this file only compares.

use std::time::Duration;

use tokio::time::Instant;

use super::reference::{dechunk, Framed, Meaning, Reading};
use crate::hygiene::client::{show, RawConn, Response};
use crate::hygiene::rig::{Backend, Rig};

pub(super) struct Exchange {
    responses: Vec<Response>,
    /// Why the client read no more responses.
    end: String,
    /// The requests each backend (at its address) recorded during the exchange, in order.
    forwarded: Vec<(Backend, String, Vec<Vec<u8>>)>,
    /// Bytes that reached a backend without making a complete request.
    stray: usize,
}

/// How an exchange ends well: the proxy closes once it has answered.
const CLOSED: &str = "closed without a response";

/// Sends `bytes` on a fresh connection, half-closes, and reads responses until the proxy
/// closes. The rig is shared, so what the backends recorded meanwhile is this case's.
pub(super) async fn exchange(rig: &Rig, bytes: &[u8], reading: &Reading) -> Exchange {
    let before: Vec<(usize, usize)> = rig
        .all()
        .iter()
        .map(|(_, r)| (r.requests().len(), r.bytes_seen()))
        .collect();
    let mut conn = RawConn::open(rig.proxy.addr()).await;
    conn.send(bytes).await;
    conn.shutdown_write().await;
    let mut responses = Vec::new();
    let end = loop {
        let next = match reading.is_head(responses.len()) {
            true => conn.response_to_head().await,
            false => conn.response().await,
        };
        // The proxy may not have parsed a `HEAD` it refuses as one, and answer with a
        // body: the last answer, on a connection that closes, whatever follows.
        let last = |r: &Response| {
            responses.len() >= reading.requests.len()
                || (reading.is_head(responses.len()) && r.header("connection") == Some("close"))
        };
        match next {
            Ok(response) if last(&response) => {
                responses.push(response);
                break match conn.eof().await {
                    true => CLOSED.to_string(),
                    false => "left open after answering the tail".to_string(),
                };
            }
            Ok(response) => responses.push(response),
            Err(why) => break why,
        }
    };
    // Part of a large body cut short may still be on its way to a backend: let it
    // arrive, so that it counts here and not in the next case.
    if reading.methods.len() > reading.requests.len() && bytes.len() > 64 * 1024 {
        settle(rig).await;
    }
    let mut forwarded = Vec::new();
    let mut stray = 0;
    for ((backend, recorder), (requests, bytes)) in rig.all().into_iter().zip(before) {
        let got = recorder.requests().split_off(requests);
        let complete: usize = got.iter().map(Vec::len).sum();
        stray += (recorder.bytes_seen() - bytes).saturating_sub(complete);
        forwarded.push((backend, recorder.addr().to_string(), got));
    }
    Exchange {
        responses,
        end,
        forwarded,
        stray,
    }
}

/// Waits until no backend has read a byte for 50 ms (at most 1 s).
async fn settle(rig: &Rig) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut seen = rig.bytes_forwarded();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = rig.bytes_forwarded();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// What is wrong with the exchange, and how many requests were served.
pub(super) fn check(reading: &Reading, strict: bool, exchange: &Exchange) -> (Vec<String>, usize) {
    let sent = &reading.requests;
    let mut wrong = Vec::new();
    // (backend, request index, meaning) of each response a backend gave, in order.
    let mut served: Vec<(Backend, usize, &Meaning)> = Vec::new();
    for (i, response) in exchange.responses.iter().enumerate() {
        let request = sent.get(i);
        let from_backend = response.status == 200 && (response.body == b"ok" || reading.is_head(i));
        match (request.map(|s| &s.meaning), from_backend) {
            (Some(Ok(meaning)), true) => served.push((meaning.backend, i, meaning)),
            (Some(Err(why)), true) => wrong.push(format!(
                "request {i} was served; the rules refuse it ({why})"
            )),
            (None, true) => wrong.push(format!(
                "response {i} came from a backend; the bytes hold {} requests ({})",
                sent.len(),
                reading.tail.as_deref().unwrap_or("then nothing")
            )),
            (_, false) if response.status < 400 => {
                wrong.push(format!("response {i}: {} from the proxy", response.status))
            }
            (_, false) => {}
        }
        let rules = match request.map(|s| s.meaning.is_ok()) {
            Some(true) => "serve it",
            Some(false) => "refuse it",
            None => "refuse the tail",
        };
        if strict && (rules == "serve it") != from_backend {
            wrong.push(format!(
                "request {i} answered {} (the rules {rules})",
                response.status
            ));
        }
    }
    let extra = usize::from(reading.tail.is_some());
    if exchange.responses.len() > sent.len() + extra {
        wrong.push(format!(
            "{} responses; the bytes hold {} requests",
            exchange.responses.len(),
            sent.len()
        ));
    }
    // A refusal may close the connection; until one, every request is answered.
    let owed = sent
        .iter()
        .position(|s| s.meaning.is_err())
        .map_or(sent.len(), |i| i + 1);
    if strict && exchange.responses.len() < owed {
        wrong.push(format!(
            "{} of {} requests answered ({})",
            exchange.responses.len(),
            sent.len(),
            exchange.end
        ));
    }
    if exchange.end != CLOSED {
        wrong.push(format!("after the responses: {}", exchange.end));
    }
    for (backend, addr, got) in &exchange.forwarded {
        let want: Vec<&(Backend, usize, &Meaning)> =
            served.iter().filter(|(b, ..)| b == backend).collect();
        if got.len() != want.len() {
            let indices: Vec<usize> = want.iter().map(|(_, i, _)| *i).collect();
            let got: Vec<String> = got.iter().map(|r| brief(r)).collect();
            wrong.push(format!(
                "{backend:?} got {} requests (want those of responses {indices:?}): {}",
                got.len(),
                got.join(" + ")
            ));
            continue;
        }
        for (raw, (_, i, meaning)) in got.iter().zip(want) {
            for why in check_forwarded(raw, &sent[*i].method, meaning, addr) {
                wrong.push(format!(
                    "request {i} at {backend:?}: {why}; forwarded {}",
                    brief(raw)
                ));
            }
        }
    }
    // A body over the read-ahead buffer is streamed: one cut short (or badly chunked
    // later on) may have reached a backend in part.
    let streamed = reading.methods.len() > sent.len();
    if exchange.stray > 0 && !streamed {
        wrong.push(format!(
            "{} bytes of an incomplete request reached a backend",
            exchange.stray
        ));
    }
    (wrong, served.len())
}

/// What differs between the request the backend at `addr` read (`raw`) and `want`.
fn check_forwarded(raw: &[u8], method: &str, want: &Meaning, addr: &str) -> Vec<String> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut slots);
    let head_len = match head.parse(raw) {
        Ok(httparse::Status::Complete(len)) => len,
        other => return vec![format!("unparseable: {other:?}")],
    };
    let mut wrong = Vec::new();
    if head.method != Some(method) {
        wrong.push(format!("method {:?} (sent {method:?})", head.method));
    }
    if head.path != Some(want.target.as_str()) {
        wrong.push(format!("target {:?} (want {:?})", head.path, want.target));
    }
    let values = |name: &str| -> Vec<String> {
        head.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .collect()
    };
    // With no host named, the backend's address is the Host, and no X-Forwarded-Host.
    let host = want.host.as_deref();
    for (name, want) in [
        ("host", Some(host.unwrap_or(addr))),
        ("x-forwarded-host", host),
    ] {
        if values(name) != Vec::from_iter(want) {
            wrong.push(format!("{name} {:?} (want {want:?})", values(name)));
        }
    }
    if let Some(h) = head.headers.iter().find(|h| h.name.contains('_')) {
        wrong.push(format!("a field named {:?}", h.name));
    }
    let te = values("transfer-encoding");
    let cl = values("content-length");
    let rest = &raw[head_len..];
    let body = match (te.as_slice(), cl.as_slice()) {
        ([], []) => Some(rest.to_vec()).filter(|_| rest.is_empty()),
        ([], [len]) => Some(rest.to_vec()).filter(|_| len.parse() == Ok(rest.len())),
        ([te], []) if te == "chunked" => match dechunk(rest) {
            Framed::Done {
                body,
                len,
                trailers,
            } if len == rest.len() => {
                let misplaced = ["host", "content-length", "transfer-encoding"];
                if let Some(t) = trailers.iter().find(|t| misplaced.contains(&t.as_str())) {
                    wrong.push(format!("a trailer field {t:?}"));
                }
                Some(body)
            }
            _ => None,
        },
        _ => None,
    };
    match body {
        Some(body) if body == want.body => {}
        Some(body) => wrong.push(format!(
            "a body of {} bytes {:?} (sent {} bytes {:?})",
            body.len(),
            brief(&body),
            want.body.len(),
            brief(&want.body)
        )),
        None => wrong.push(format!(
            "framing Transfer-Encoding {te:?} Content-Length {cl:?} over {} bytes",
            rest.len()
        )),
    }
    wrong
}

/// Bytes for a failure message, as [`show`] gives them but with a long run of one byte
/// (the large payload) written as its length.
pub(super) fn brief(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = bytes;
    while let Some(&first) = rest.first() {
        let run = rest.iter().take_while(|&&b| b == first).count();
        match run {
            ..=16 => out.push_str(&show(&rest[..run])),
            _ => out.push_str(&format!("<{run} x {}>", show(&[first]))),
        }
        rest = &rest[run..];
    }
    out
}
