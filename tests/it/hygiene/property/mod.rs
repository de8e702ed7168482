//! The request rules as a property: whatever loadgate forwards means what it routed on.
//! Valid HTTP/1.1 requests, mutated the way attackers and sloppy clients mutate them, go
//! through one proxy. A reference reading of the bytes sent (httparse, the RFC 9112
//! framing rules, and `loadgate::http::target` for the host and path) says what each
//! request means or why the rules refuse it; every request a backend records is parsed
//! on its own and must carry the same method, origin-form target, one `Host` and the
//! same body (no `_` in a field name, no coding but `chunked`), at the backend the route
//! table names, in the order the client's answers came. A request the rules refuse, or
//! that the reference cannot read, reaches no backend, and nothing is forwarded that was
//! not answered. Not for the exact status of a refusal: the tables in `targets.rs` and
//! `messages.rs` pin those.
//!
//! Failures shrink to a small request and print the bytes sent and forwarded; the ones
//! found so far stay in [`REGRESSIONS`]. `PROPTEST_CASES` and `PROPTEST_RNG_SEED`
//! override the fixed case count and seed.
//!
//! ```text
//! property/mod.rs        the two tests, the regression table, the runner's config,
//!                        and one case's run: read, exchange, check
//! property/generate.rs   the generator: valid requests, their mutations, their bytes
//! property/reference.rs  the reference reading: framing, the request rules, the route
//! property/check.rs      the exchange with the rig, and what is wrong with it
//! ```

mod check;
mod generate;
mod reference;

use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

use crate::hygiene::rig::Rig;
use check::{brief, check, exchange};
use generate::{case, Case};
use reference::read;

const CASES: u32 = 512;
const SEED: u64 = 0x10ad_9a7e;

/// Requests the property found forwarded with another meaning than the rules give
/// them, each now checked on every run (as an unmutated case: every request answered
/// as the rules say).
const REGRESSIONS: &[(&str, &[u8])] = &[
    // hyper's client sends no chunked body with GET: the body was dropped.
    (
        "chunked_get_body_is_forwarded",
        b"GET /reports/x HTTP/1.1\r\nHost: public.example\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
    ),
    // The hop-by-hop strip removed the Host routed on: the backend saw its own address.
    (
        "connection_host_keeps_the_routed_host",
        b"GET /x HTTP/1.1\r\nHost: internal.example\r\nConnection: host\r\n\r\n",
    ),
    // After any request with an `Upgrade` field (which the proxy strips and never
    // honours), the framing scanner stopped judging the connection's later requests.
    (
        "upgrade_then_repeated_content_length",
        b"GET / HTTP/1.1\r\nHost: public.example\r\nUpgrade: h2c\r\n\r\n\
          GET / HTTP/1.1\r\nHost: public.example\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    ),
    (
        "upgrade_then_content_length_and_chunked",
        b"GET / HTTP/1.1\r\nHost: public.example\r\nUpgrade: h2c\r\n\r\n\
          POST /reports/x HTTP/1.1\r\nHost: public.example\r\nContent-Length: 6\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
    ),
    (
        "upgrade_then_gzip_chunked",
        b"GET / HTTP/1.1\r\nHost: public.example\r\nUpgrade: websocket\r\n\r\n\
          POST /reports/x HTTP/1.1\r\nHost: public.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "upgrade_then_fragment",
        b"GET / HTTP/1.1\r\nHost: public.example\r\nUpgrade: h2c\r\n\r\n\
          GET /reports#/../checkout HTTP/1.1\r\nHost: public.example\r\n\r\n",
    ),
];

/// The property over [`CASES`] generated cases on one rig, sequentially (what the
/// backends record in between belongs to the case on the wire).
#[test]
fn forwarded_requests_mean_what_was_routed() {
    let runtime = runtime();
    let rig = runtime.block_on(Rig::start());
    let mut runner = TestRunner::new(config());
    let served = std::cell::Cell::new(0usize);
    // What is wrong with one case, with the bytes sent; `None` if nothing is.
    let failure = |case: &Case| -> Option<String> {
        let bytes = case.bytes();
        let strict = case.mutations.is_empty();
        let (wrong, n) = runtime.block_on(run(&rig, &bytes, strict));
        served.set(served.get() + n);
        let sent = brief(&bytes);
        (!wrong.is_empty()).then(|| format!("sent {sent}\n{}", wrong.join("\n")))
    };
    let result = runner.run(&case(), |case| match failure(&case) {
        None => Ok(()),
        Some(why) => Err(TestCaseError::fail(why)),
    });
    if let Err(error) = result {
        let TestError::Fail(_, case) = error else {
            panic!("{error}");
        };
        let (case, why) = reduce(case, failure);
        panic!("{why}\nminimal case: {case:?}");
    }
    // A generator whose requests are all refused would prove nothing.
    let cases = runner.config().cases as usize;
    assert!(
        served.get() >= cases / 4,
        "only {} requests served in {cases} cases",
        served.get()
    );
}

/// The cases found so far, by name, each checked strictly.
#[test]
fn regressions_mean_what_was_routed() {
    let runtime = runtime();
    let rig = runtime.block_on(Rig::start());
    let mut failures = Vec::new();
    for (name, bytes) in REGRESSIONS {
        let (wrong, _) = runtime.block_on(run(&rig, bytes, true));
        if !wrong.is_empty() {
            failures.push(format!("FAIL {name}: {}", wrong.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// proptest deletes list elements only before it shrinks them, so a pipelined request
/// or a mutation that stopped mattering may survive its shrinking: drops each while the
/// case still fails. Returns the smaller case and its failure.
fn reduce(mut case: Case, failure: impl Fn(&Case) -> Option<String>) -> (Case, String) {
    let mut why = failure(&case).unwrap_or_else(|| "(passes when run again)".to_string());
    'smaller: loop {
        let mut smaller = Vec::new();
        for i in (0..case.requests.len()).filter(|_| case.requests.len() > 1) {
            let mut c = case.clone();
            c.requests.remove(i);
            smaller.push(c);
        }
        for i in 0..case.mutations.len() {
            let mut c = case.clone();
            c.mutations.remove(i);
            smaller.push(c);
        }
        for candidate in smaller {
            if let Some(w) = failure(&candidate) {
                (case, why) = (candidate, w);
                continue 'smaller;
            }
        }
        return (case, why);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A fixed case count and seed unless the environment names them; no regression files
/// (the table above keeps what matters, by name).
fn config() -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = CASES;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    config.failure_persistence = None;
    config.max_shrink_iters = 2048;
    config
}

/// Sends `bytes` on one connection and checks the answers and what the backends got;
/// `strict` (unmutated bytes, regressions): every request must also be answered as the
/// rules say, served or refused. Returns what is wrong and how many requests were served.
async fn run(rig: &Rig, bytes: &[u8], strict: bool) -> (Vec<String>, usize) {
    let reading = read(bytes);
    let exchange = exchange(rig, bytes, &reading).await;
    check(&reading, strict, &exchange)
}
