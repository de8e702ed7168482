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

use std::time::Duration;

use loadgate::http::target;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, subsequence, Index};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

use crate::hygiene::client::{show, RawConn, Response};
use crate::hygiene::rig::Backend::{self, Batch, Internal, Public};
use crate::hygiene::rig::Rig;
use tokio::time::Instant;

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

// ---------------------------------------------------------------------------------
// The generator: valid requests, then mutations of their lines and of the raw bytes.

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"];
/// Path segments: route prefixes, dot-segments, parameters, escapes of unreserved and
/// other characters, empty segments (`//`), a malformed escape.
const SEGMENTS: &[&str] = &[
    "reports",
    "checkout",
    "api/reports",
    "cart/items",
    "cart",
    "x",
    "a.b",
    ".",
    "..",
    "..;x",
    ".;x",
    "%2e%2e;x",
    "..%3b",
    "",
    "%72eports",
    "%2e",
    "%2E%2e",
    "%7Euser",
    "%c3%a9",
    "%3B",
    "reports;v=1",
    "cart;jsessionid=1",
    "r%65ports",
    "%zz",
];
const QUERIES: &[&str] = &["q=1", "a=../b", "c=%2f&d=%7e", "", "x=/reports"];
const HOSTS: &[&str] = &[
    "public.example",
    "internal.example",
    "Internal.Example.",
    "PUBLIC.EXAMPLE.",
    "internal.example:8080",
    "public.example.:80",
    "other.example",
    "[::1]:8080",
];
const FIELDS: &[&str] = &[
    "Accept: */*",
    "User-Agent: proptest",
    "X-Forwarded-For: 203.0.113.9",
    "Connection: keep-alive",
    "Cookie: a=b",
    "X-Trace: 1",
    "Upgrade: h2c",
];
/// Body payloads: two shaped like a chunked end and a whole request, and [`LARGE`].
const PAYLOADS: &[&str] = &[
    "abc",
    "hello world",
    "0\r\n\r\n",
    "GET /x HTTP/1.1\r\nHost: internal.example\r\n\r\n",
    LARGE,
];
/// Stands for a payload over `request_buffer_bytes` (64 KiB), which is streamed.
const LARGE: &str = "<70000 bytes>";
const AUTHORITIES: &[&str] = &[
    "http://public.example",
    "http://internal.example",
    "http://Internal.Example.:8080",
    "HTTP://public.example",
    "https://internal.example",
    "http://user@internal.example",
    "http://public.example:80x",
];
const HOST_VALUES: &[&str] = &[
    " public.example ",
    "\tinternal.example",
    "",
    "public.example, internal.example",
    "public.example:",
    "internal.example/x",
    "a b",
];
const TRANSFER_ENCODINGS: &[&str] = &[
    "chunked",
    "CHUNKED",
    "\tchunked",
    "chunked ",
    "gzip, chunked",
    "chunked, gzip",
    "identity",
    "chunked, chunked",
    "xchunked",
];
const CONTENT_LENGTHS: &[&str] = &["0", "3", "+3", "3, 3", "03", "", "99999999999999999999"];
/// What a `Connection` line names: RFC 9110 §7.6.1 has the proxy remove those fields.
const CONNECTION_TOKENS: &[&str] = &[
    "close",
    "host",
    "content-length",
    "x-trace",
    "Host, X-Trace",
    "transfer-encoding",
];
const INSERTED: &[u8] = b"\r\n\0\\ \t#_";
/// Whole targets: asterisk-form, authority-form, absolute-form without a path.
const TARGETS: &[&str] = &[
    "*",
    "public.example:80",
    "http://internal.example",
    "http://public.example?q=1",
];
const OTHER_METHODS: &[&str] = &["CONNECT", "PURGE", "TRACE"];
/// Trailer fields after the last chunk: framing and routing fields have no business
/// there (RFC 9110 §6.5.1).
const TRAILERS: &[&str] = &[
    "Host: internal.example",
    "Content-Length: 5",
    "Transfer-Encoding: chunked",
    "X-Trace: 2",
];

/// A valid request, before any mutation.
#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    segments: Vec<&'static str>,
    query: Option<&'static str>,
    host: &'static str,
    fields: Vec<&'static str>,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    Empty,
    Length(&'static str),
    Chunked(Vec<&'static str>),
}

#[derive(Debug, Clone)]
enum Mutation {
    /// A field line sent twice.
    DuplicateField(Index),
    /// A field line left out.
    DropField(Index),
    /// `HTTP/1.0` in the request line.
    Http10,
    /// The whole target replaced.
    Target(&'static str),
    /// Another method.
    Method(&'static str),
    /// A trailer field after a chunked body's last chunk.
    Trailer(&'static str),
    /// A second `Host` line, before field `at`.
    SecondHost(&'static str, Index),
    /// The target in absolute-form, with this scheme and authority.
    AbsoluteForm(&'static str),
    /// The `Host` value replaced.
    HostValue(&'static str),
    /// A `Transfer-Encoding` line added before field `at`.
    TransferEncoding(&'static str, Index),
    /// A `Content-Length` line added before field `at`.
    ContentLength(&'static str, Index),
    /// A `Connection` line naming fields.
    Connection(&'static str),
    /// A space between a field name and its colon.
    SpaceBeforeColon(Index),
    /// A field value moved onto an obs-fold line.
    ObsFold(Index),
    /// The first `-` of a field name made `_` (or `_x` appended).
    Underscore(Index),
    /// A field name in uppercase.
    NameUppercase(Index),
    /// The method in lowercase.
    MethodLowercase,
    /// The `at`th `/` or `.` of the path percent-encoded, in upper or lower hex.
    PercentEncode(Index, bool),
    /// A field line ended by a bare LF.
    BareLf(Index),
    /// A byte inserted anywhere in the bytes sent.
    Insert(Index, u8),
    /// A byte of the bytes sent left out.
    Delete(Index),
    /// The bytes sent cut short.
    Truncate(Index),
}

/// One connection's bytes: one or two pipelined requests, then mutations, each applied
/// to the request its index picks (raw-byte ones to all the bytes, last).
#[derive(Debug, Clone)]
struct Case {
    requests: Vec<Request>,
    mutations: Vec<(Index, Mutation)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        vec(request(), 1..=2),
        vec((any::<Index>(), mutation()), 0..=3),
    )
        .prop_map(|(requests, mutations)| Case {
            requests,
            mutations,
        })
}

fn request() -> impl Strategy<Value = Request> {
    let body = prop_oneof![
        Just(Body::Empty),
        select(PAYLOADS).prop_map(Body::Length),
        vec(select(PAYLOADS), 1..=2).prop_map(Body::Chunked),
    ];
    (
        select(METHODS),
        vec(select(SEGMENTS), 0..=4),
        option::of(select(QUERIES)),
        select(HOSTS),
        subsequence(FIELDS, 0..=2),
        body,
    )
        .prop_map(|(method, segments, query, host, fields, body)| Request {
            method,
            segments,
            query,
            host,
            fields,
            body,
        })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    use Mutation::*;
    let at = any::<Index>;
    prop_oneof![
        at().prop_map(DuplicateField),
        at().prop_map(DropField),
        Just(Http10),
        select(TARGETS).prop_map(Target),
        select(OTHER_METHODS).prop_map(Method),
        select(TRAILERS).prop_map(Trailer),
        (select(HOSTS), at()).prop_map(|(h, i)| SecondHost(h, i)),
        select(AUTHORITIES).prop_map(AbsoluteForm),
        select(HOST_VALUES).prop_map(HostValue),
        (select(TRANSFER_ENCODINGS), at()).prop_map(|(v, i)| TransferEncoding(v, i)),
        (select(CONTENT_LENGTHS), at()).prop_map(|(v, i)| ContentLength(v, i)),
        select(CONNECTION_TOKENS).prop_map(Connection),
        at().prop_map(SpaceBeforeColon),
        at().prop_map(ObsFold),
        at().prop_map(Underscore),
        at().prop_map(NameUppercase),
        Just(MethodLowercase),
        (at(), any::<bool>()).prop_map(|(i, upper)| PercentEncode(i, upper)),
        at().prop_map(BareLf),
        (at(), select(INSERTED)).prop_map(|(i, b)| Insert(i, b)),
        at().prop_map(Delete),
        at().prop_map(Truncate),
    ]
}

impl Case {
    fn bytes(&self) -> Vec<u8> {
        let mut messages: Vec<Message> = self.requests.iter().map(Request::message).collect();
        for (which, mutation) in &self.mutations {
            let n = messages.len();
            messages[which.index(n)].mutate(mutation);
        }
        let mut bytes: Vec<u8> = messages.iter().flat_map(Message::bytes).collect();
        for (_, mutation) in &self.mutations {
            match mutation {
                Mutation::Insert(at, byte) => bytes.insert(at.index(bytes.len() + 1), *byte),
                Mutation::Delete(at) if !bytes.is_empty() => {
                    bytes.remove(at.index(bytes.len()));
                }
                Mutation::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
                _ => {}
            }
        }
        bytes
    }
}

/// A request as lines: the request line and each field line with its line end.
struct Message {
    line: String,
    fields: Vec<Vec<u8>>,
    body: Vec<u8>,
}

impl Request {
    fn message(&self) -> Message {
        let mut target = format!("/{}", self.segments.join("/"));
        if let Some(query) = self.query {
            target = format!("{target}?{query}");
        }
        let mut fields = vec![format!("Host: {}", self.host)];
        fields.extend(self.fields.iter().map(|f| f.to_string()));
        let body = match &self.body {
            Body::Empty => String::new(),
            Body::Length(payload) => {
                let payload = expand(payload);
                fields.push(format!("Content-Length: {}", payload.len()));
                payload
            }
            Body::Chunked(chunks) => {
                fields.push("Transfer-Encoding: chunked".to_string());
                let mut body: String = chunks
                    .iter()
                    .map(|c| expand(c))
                    .map(|c| format!("{:x}\r\n{c}\r\n", c.len()))
                    .collect();
                body.push_str("0\r\n\r\n");
                body
            }
        };
        Message {
            line: format!("{} {target} HTTP/1.1", self.method),
            fields: fields.iter().map(|f| field(f)).collect(),
            body: body.into_bytes(),
        }
    }
}

fn expand(payload: &str) -> String {
    match payload {
        LARGE => "a".repeat(70_000),
        small => small.to_string(),
    }
}

fn field(line: &str) -> Vec<u8> {
    format!("{line}\r\n").into_bytes()
}

impl Message {
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line).into_bytes();
        out.extend(self.fields.concat());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Field `at`, if there is any field.
    fn field(&mut self, at: &Index) -> Option<&mut Vec<u8>> {
        let n = self.fields.len();
        (n > 0).then(|| &mut self.fields[at.index(n)])
    }

    fn mutate(&mut self, mutation: &Mutation) {
        use Mutation::*;
        let name_end = |f: &[u8]| f.iter().position(|&b| b == b':').unwrap_or(0);
        match mutation {
            DuplicateField(at) => {
                if let Some(f) = self.field(at).cloned() {
                    let i = at.index(self.fields.len());
                    self.fields.insert(i, f);
                }
            }
            DropField(at) => {
                if !self.fields.is_empty() {
                    self.fields.remove(at.index(self.fields.len()));
                }
            }
            Http10 => self.line = self.line.replace("HTTP/1.1", "HTTP/1.0"),
            Target(target) => {
                let parts: Vec<&str> = self.line.splitn(3, ' ').collect();
                if let [method, _, version] = parts.as_slice() {
                    self.line = format!("{method} {target} {version}");
                }
            }
            Method(method) => {
                let rest = self.line.split_once(' ').unwrap_or_default().1;
                self.line = format!("{method} {rest}");
            }
            Trailer(trailer) => {
                if self.body.ends_with(b"0\r\n\r\n") {
                    let at = self.body.len() - 2;
                    self.body.splice(at..at, field(trailer));
                }
            }
            SecondHost(host, at) => self.insert(at, &format!("Host: {host}")),
            TransferEncoding(value, at) => self.insert(at, &format!("Transfer-Encoding: {value}")),
            ContentLength(value, at) => self.insert(at, &format!("Content-Length: {value}")),
            Connection(tokens) => self.fields.push(field(&format!("Connection: {tokens}"))),
            AbsoluteForm(authority) => {
                if let Some((method, rest)) = self.line.split_once(" /") {
                    self.line = format!("{method} {authority}/{rest}");
                }
            }
            HostValue(value) => {
                let host = self
                    .fields
                    .iter_mut()
                    .find(|f| f.to_ascii_lowercase().starts_with(b"host:"));
                if let Some(host) = host {
                    *host = field(&format!("Host: {value}"));
                }
            }
            SpaceBeforeColon(at) => {
                if let Some(f) = self.field(at) {
                    f.insert(name_end(f), b' ');
                }
            }
            ObsFold(at) => {
                if let Some(f) = self.field(at) {
                    let colon = name_end(f);
                    f.splice(colon + 1..colon + 1, *b"\r\n ");
                }
            }
            Underscore(at) => {
                if let Some(f) = self.field(at) {
                    let end = name_end(f);
                    match f[..end].iter().position(|&b| b == b'-') {
                        Some(dash) => f[dash] = b'_',
                        None => {
                            f.splice(end..end, *b"_x");
                        }
                    }
                }
            }
            NameUppercase(at) => {
                if let Some(f) = self.field(at) {
                    let end = name_end(f);
                    f[..end].make_ascii_uppercase();
                }
            }
            MethodLowercase => {
                let (method, rest) = self.line.split_once(' ').unwrap_or_default();
                self.line = format!("{} {rest}", method.to_ascii_lowercase());
            }
            PercentEncode(at, upper) => self.percent_encode(at, *upper),
            BareLf(at) => {
                if let Some(f) = self.field(at) {
                    if f.ends_with(b"\r\n") {
                        f.remove(f.len() - 2);
                    }
                }
            }
            Insert(..) | Delete(..) | Truncate(..) => {}
        }
    }

    fn insert(&mut self, at: &Index, line: &str) {
        let i = at.index(self.fields.len() + 1);
        self.fields.insert(i, field(line));
    }

    /// Encodes one `/` (not the first) or `.` of the path as `%2F` / `%2E`.
    fn percent_encode(&mut self, at: &Index, upper: bool) {
        let start = self.line.find(' ').map_or(0, |i| i + 1);
        let end = self.line[start..]
            .find(['?', ' '])
            .map_or(self.line.len(), |i| start + i);
        let spots: Vec<usize> = (start + 1..end)
            .filter(|&i| matches!(self.line.as_bytes()[i], b'/' | b'.'))
            .collect();
        if spots.is_empty() {
            return;
        }
        let i = spots[at.index(spots.len())];
        let hex = match (self.line.as_bytes()[i], upper) {
            (b'/', true) => "%2F",
            (b'/', false) => "%2f",
            (_, true) => "%2E",
            (_, false) => "%2e",
        };
        self.line.replace_range(i..=i, hex);
    }
}

// ---------------------------------------------------------------------------------
// The reference reading: what the bytes sent mean under the request rules.

/// One request as the reference reads it.
#[derive(Debug)]
struct Sent {
    method: String,
    /// What it must be forwarded as, or why the rules refuse it.
    meaning: Result<Meaning, String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Meaning {
    /// The origin-form target: the normalised path and the query as sent.
    target: String,
    /// The normalised authority; an absolute-form target's wins over `Host`. `None`
    /// for an HTTP/1.0 request that names none: the backend's address is sent.
    host: Option<String>,
    backend: Backend,
    body: Vec<u8>,
}

struct Reading {
    requests: Vec<Sent>,
    /// Why the bytes after the last request have no meaning (incomplete, unparseable,
    /// ambiguously framed); `None` when they are used up.
    tail: Option<String>,
    /// The methods of the requests read, and of the one in the tail if its head parsed:
    /// a response to `HEAD` has no body.
    methods: Vec<String>,
}

impl Reading {
    fn is_head(&self, i: usize) -> bool {
        self.methods.get(i).is_some_and(|m| m == "HEAD")
    }
}

fn read(bytes: &[u8]) -> Reading {
    let mut requests = Vec::new();
    let mut methods = Vec::new();
    let mut rest = bytes;
    let tail = loop {
        // Empty lines before a request line are skipped (RFC 9112 §2.2).
        if rest.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            break None;
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Request::new(&mut slots);
        let head_len = match head.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => break Some("an incomplete head".to_string()),
            Err(e) => break Some(format!("an unparseable head ({e})")),
        };
        let method = head.method.unwrap_or_default().to_string();
        let http10 = head.version == Some(0);
        methods.push(method.clone());
        let target = head.path.unwrap_or_default().to_string();
        let fields: Vec<(String, String)> = head
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value);
                (
                    h.name.to_ascii_lowercase(),
                    value.trim_matches([' ', '\t']).to_string(),
                )
            })
            .collect();
        let (body, body_len) = match framing(&fields, http10, &rest[head_len..]) {
            Framed::Done { body, len, .. } => (body, len),
            Framed::Incomplete => break Some("an incomplete body".to_string()),
            Framed::Bad(why) => break Some(why),
        };
        let chunked = fields.iter().any(|(n, _)| n == "transfer-encoding");
        let meaning = meaning(&method, &target, http10, &fields, (body, chunked));
        requests.push(Sent { method, meaning });
        rest = &rest[head_len + body_len..];
    };
    Reading {
        requests,
        tail,
        methods,
    }
}

enum Framed {
    /// The body, the bytes it took, and the names of its trailer fields.
    Done {
        body: Vec<u8>,
        len: usize,
        trailers: Vec<String>,
    },
    Incomplete,
    Bad(String),
}

/// RFC 9112 §6.3 with the proxy's refusals (rule 6): `Transfer-Encoding` must be
/// `chunked` alone, without `Content-Length`, and not on HTTP/1.0; one `Content-Length`
/// of digits.
fn framing(fields: &[(String, String)], http10: bool, rest: &[u8]) -> Framed {
    let values = |name: &str| -> Vec<&str> {
        fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let te = values("transfer-encoding");
    let cl = values("content-length");
    if !te.is_empty() {
        let codings: Vec<&str> = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let chunked = codings.len() == 1 && codings[0].eq_ignore_ascii_case("chunked");
        if !chunked || !cl.is_empty() || http10 {
            return Framed::Bad(format!(
                "framing Transfer-Encoding {te:?} Content-Length {cl:?}"
            ));
        }
        return dechunk(rest);
    }
    match cl.as_slice() {
        [] => Framed::Done {
            body: Vec::new(),
            len: 0,
            trailers: Vec::new(),
        },
        [v] if !v.is_empty() && v.len() < 19 && v.bytes().all(|b| b.is_ascii_digit()) => {
            let len: usize = v.parse().expect("digits");
            match rest.get(..len) {
                Some(body) => Framed::Done {
                    body: body.to_vec(),
                    len,
                    trailers: Vec::new(),
                },
                None => Framed::Incomplete,
            }
        }
        _ => Framed::Bad(format!("framing Content-Length {cl:?}")),
    }
}

/// A chunked body at the front of `rest`, read the way hyper's decoder reads it: hex
/// size, optional whitespace and extension, CRLF, data, CRLF; after the last chunk,
/// trailer lines up to an empty one.
fn dechunk(rest: &[u8]) -> Framed {
    let crlf = |at: usize| match (rest.get(at), rest.get(at + 1)) {
        (Some(b'\r'), Some(b'\n')) => Some(true),
        (None, _) | (Some(b'\r'), None) => None,
        _ => Some(false),
    };
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let start = at;
        let mut size: u64 = 0;
        while let Some(digit) = rest.get(at).and_then(|&b| char::from(b).to_digit(16)) {
            match size
                .checked_mul(16)
                .and_then(|s| s.checked_add(digit.into()))
            {
                Some(s) => size = s,
                None => return Framed::Bad("chunk size overflow".to_string()),
            }
            at += 1;
        }
        if at == start {
            return match rest.get(at) {
                None => Framed::Incomplete,
                Some(_) => Framed::Bad("no chunk size".to_string()),
            };
        }
        while matches!(rest.get(at), Some(b' ' | b'\t')) {
            at += 1;
        }
        if rest.get(at) == Some(&b';') {
            while let Some(&b) = rest.get(at).filter(|&&b| b != b'\r') {
                if b == b'\n' {
                    return Framed::Bad("LF in a chunk extension".to_string());
                }
                at += 1;
            }
        }
        match crlf(at) {
            Some(true) => at += 2,
            Some(false) => return Framed::Bad("chunk size line".to_string()),
            None => return Framed::Incomplete,
        }
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(end) = find(&rest[at..], b"\r\n") else {
                    return Framed::Incomplete;
                };
                let line = String::from_utf8_lossy(&rest[at..at + end]);
                at += end + 2;
                match line.split_once(':') {
                    _ if end == 0 => {
                        return Framed::Done {
                            body,
                            len: at,
                            trailers,
                        }
                    }
                    Some((name, _)) => trailers.push(name.trim().to_ascii_lowercase()),
                    None => return Framed::Bad(format!("trailer line {line:?}")),
                }
            }
        }
        let Some(data) = usize::try_from(size)
            .ok()
            .and_then(|size| rest.get(at..at.checked_add(size)?))
        else {
            return Framed::Incomplete;
        };
        body.extend_from_slice(data);
        at += data.len();
        match crlf(at) {
            Some(true) => at += 2,
            Some(false) => return Framed::Bad("chunk data not ended by CRLF".to_string()),
            None => return Framed::Incomplete,
        }
    }
}

/// The request rules (README "Request rules") for one parsed request.
fn meaning(
    method: &str,
    target: &str,
    http10: bool,
    fields: &[(String, String)],
    (body, chunked): (Vec<u8>, bool),
) -> Result<Meaning, String> {
    if method == "CONNECT" {
        return Err("CONNECT".to_string());
    }
    // hyper cannot send a GET or HEAD body of unknown length: one past the read-ahead
    // buffer (`request_buffer_bytes`, 64 KiB) is refused.
    if chunked && matches!(method, "GET" | "HEAD") && body.len() >= 64 * 1024 {
        return Err("a chunked GET/HEAD body past the read-ahead".to_string());
    }
    if target.contains('#') {
        return Err("a fragment".to_string());
    }
    // Absolute-form: any RFC 3986 scheme (loadgate, like hyper, does not insist on
    // `http`), then the authority up to the path or query.
    let scheme = target.split_once("://").filter(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let (authority, path_and_query) = match scheme {
        Some((_, rest)) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            (Some(&rest[..end]), &rest[end..])
        }
        None if target.starts_with('/') => (None, target),
        None => return Err(format!("target {target:?}")),
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    let hosts: Vec<&str> = fields
        .iter()
        .filter(|(n, _)| n == "host")
        .map(|(_, v)| v.as_str())
        .collect();
    let host = match (authority, hosts.as_slice()) {
        (_, [_, _, ..]) => return Err("two Host lines".to_string()),
        (_, []) if !http10 => return Err("no Host on HTTP/1.1".to_string()),
        (Some(authority), _) => Some(authority),
        (None, [host]) => Some(*host),
        (None, []) => None,
    };
    let host = host
        .map(target::host)
        .transpose()
        .map_err(|e| format!("host: {e}"))?;
    let path = target::path(path).map_err(|e| format!("path: {e}"))?;
    let target = match query {
        Some(query) => format!("{}?{query}", path.forward),
        None => path.forward.to_string(),
    };
    Ok(Meaning {
        target,
        backend: route(host.as_ref().map_or("", |h| h.name()), &path.route),
        host: host.map(|h| h.authority),
        body,
    })
}

/// The rig's route table (see `rig.rs`).
fn route(host: &str, path: &str) -> Backend {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if host == "internal.example" {
        Internal
    } else if under("/checkout") {
        Public
    } else if ["/reports", "/api/reports", "/cart/items"]
        .into_iter()
        .any(under)
    {
        Batch
    } else {
        Public
    }
}

// ---------------------------------------------------------------------------------
// The exchange and the check.

struct Exchange {
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
async fn exchange(rig: &Rig, bytes: &[u8], reading: &Reading) -> Exchange {
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
fn check(reading: &Reading, strict: bool, exchange: &Exchange) -> (Vec<String>, usize) {
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
fn brief(bytes: &[u8]) -> String {
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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
