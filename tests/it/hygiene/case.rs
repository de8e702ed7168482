//! One raw-socket case and the runner of a table of them. Each case gets a rig of its
//! own (proxy + three recorders), so cases run concurrently and what a backend
//! recorded belongs to that case alone. A table reports every failing case, not only
//! the first.

use crate::hygiene::client::{show, RawConn};
use crate::hygiene::expect::{expected, normalise, same_request, Expected};
use crate::hygiene::rig::{Backend, Rig};

/// How long a forwarded request may take to show at its backend once the client has
/// its response (it is recorded before the backend answers, so this is a bound only).
const RECORDED_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Case {
    pub name: &'static str,
    /// Bytes written to the proxy in one write.
    pub request: Vec<u8>,
    /// The statuses that are right; the first is the one the fix should give.
    pub status: &'static [u16],
    pub forwarded: Forwarded,
    /// The proxy must close the connection after answering.
    pub closes: bool,
    /// Refused by the HTTP/1 parser before any request reaches loadgate's handler
    /// (its answer is rewritten into problem+json on the way out: listener/refusal.rs).
    pub by_parser: bool,
}

pub enum Forwarded {
    /// No byte reaches any backend.
    Nothing,
    /// Exactly one request, these bytes, at this backend; nothing anywhere else.
    To(Backend, Expected),
}

pub const PUBLIC: &str = "public.example";

/// `GET target` with one `Host` line.
pub fn get(target: &str, host: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// The backend's view of a clean `GET target` for `host`.
pub fn got_get(target: &str, host: &str) -> Expected {
    expected(&format!("GET {target} HTTP/1.1"), &[("host", host)])
}

/// A `POST /` to public.example with `fields` (each ending in CRLF) and `body`.
pub fn post(fields: &str, body: &str) -> String {
    format!("POST / HTTP/1.1\r\nHost: {PUBLIC}\r\n{fields}\r\n{body}")
}

/// A case answered by the proxy itself: `status`, nothing forwarded.
pub fn refused(name: &'static str, request: &str, status: &'static [u16]) -> Case {
    Case {
        name,
        request: request.as_bytes().to_vec(),
        status,
        forwarded: Forwarded::Nothing,
        closes: false,
        by_parser: false,
    }
}

/// A case served with 200 from `backend`, which receives exactly `expected`.
pub fn served(name: &'static str, request: &str, backend: Backend, expected: Expected) -> Case {
    Case {
        name,
        request: request.as_bytes().to_vec(),
        status: &[200],
        forwarded: Forwarded::To(backend, expected),
        closes: false,
        by_parser: false,
    }
}

impl Case {
    /// The proxy must also close the connection (framing it cannot trust, CONNECT).
    pub fn closes(mut self) -> Self {
        self.closes = true;
        self
    }

    /// The HTTP/1 parser refuses it (see [`Case::by_parser`]); it also closes.
    pub fn by_parser(mut self) -> Self {
        self.by_parser = true;
        self.closes = true;
        self
    }
}

/// Runs every case, each on its own rig, all at once; panics listing every failure.
pub async fn run_table(table: &str, cases: Vec<Case>) {
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names in {table} are unique");
    let total = cases.len();
    let results = futures_util::future::join_all(cases.into_iter().map(|case| async move {
        let name = case.name;
        (name, run(case).await)
    }))
    .await;
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|(name, result)| result.err().map(|why| format!("FAIL {name}: {why}")))
        .collect();
    if !failures.is_empty() {
        panic!(
            "{} of {total} {table} cases fail:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// One case on a fresh rig: `Err` describes everything that differed.
async fn run(case: Case) -> Result<(), String> {
    let rig = Rig::start().await;
    let mut conn = RawConn::open(rig.proxy.addr()).await;
    conn.send(&case.request).await;
    let mut wrong = Vec::new();
    match conn.final_response().await {
        Ok(response) => {
            if !case.status.contains(&response.status) {
                wrong.push(format!(
                    "status {} (want {:?})",
                    response.status, case.status
                ));
            }
            if response.status >= 400 && !response.is_problem_json() {
                wrong.push(format!(
                    "{} without a problem+json body (content-type {:?}, body {:?})",
                    response.status,
                    response.header("content-type"),
                    show(&response.body)
                ));
            }
        }
        Err(why) => wrong.push(format!("no response: {why} (want {:?})", case.status)),
    }
    wrong.extend(check_forwarded(&rig, &case.forwarded).await);
    if case.closes && !conn.closed().await {
        wrong.push("connection left open (want it closed)".to_string());
    }
    match wrong.is_empty() {
        true => Ok(()),
        false => Err(wrong.join("; ")),
    }
}

/// What differs between what the backends received and `want`.
async fn check_forwarded(rig: &Rig, want: &Forwarded) -> Vec<String> {
    match want {
        Forwarded::Nothing => check_requests(rig, &[]).await,
        Forwarded::To(backend, expected) => check_requests(rig, &[(*backend, expected)]).await,
    }
}

/// What differs between what the backends received and `want`: these requests, in this
/// order at each backend, and nothing else anywhere (no byte at all when `want` is empty).
pub async fn check_requests(rig: &Rig, want: &[(Backend, &Expected)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (backend, recorder) in rig.all() {
        let here: Vec<Vec<u8>> = want
            .iter()
            .filter(|(b, _)| *b == backend)
            .map(|(_, e)| e.bytes(recorder.addr(), rig.proxy.addr()))
            .collect();
        if here.is_empty() {
            continue;
        }
        let got = rig.wait_for(backend, here.len(), RECORDED_WITHIN).await;
        let same = got.is_some_and(|got| {
            got.iter()
                .zip(&here)
                .all(|(got, want)| same_request(got, want))
        });
        if !same {
            let wanted: Vec<String> = here.iter().map(|w| show(w)).collect();
            wrong.push(format!(
                "forwarded {} (want {backend:?}: {})",
                describe(rig),
                wanted.join(" + ")
            ));
        }
    }
    let everywhere: usize = rig.all().iter().map(|(_, r)| r.requests().len()).sum();
    if want.is_empty() && rig.bytes_forwarded() > 0 {
        wrong.push(format!("forwarded {} (want nothing)", describe(rig)));
    } else if everywhere > want.len() {
        wrong.push(format!(
            "{everywhere} requests forwarded (want {}): {}",
            want.len(),
            describe(rig)
        ));
    }
    wrong
}

/// Everything the backends got, for a failure message.
fn describe(rig: &Rig) -> String {
    let requests = rig.forwarded();
    if requests.is_empty() {
        let bytes = rig.bytes_forwarded();
        return match bytes {
            0 => "nothing".to_string(),
            n => format!("{n} bytes of an incomplete request"),
        };
    }
    requests
        .iter()
        .map(|(backend, raw)| format!("{backend:?}: {}", show(&normalise(raw))))
        .collect::<Vec<_>>()
        .join(" + ")
}
