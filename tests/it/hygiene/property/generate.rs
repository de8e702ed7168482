//! The generator: valid HTTP/1.1 requests (one or two on a connection), mutated the way
//! attackers and sloppy clients mutate them (their lines, then the raw bytes), and the
//! bytes sent for them. Not for what those bytes mean (`reference.rs`) or for sending
//! them (`check.rs`).

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, subsequence, Index};

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
pub(super) struct Request {
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
pub(super) enum Mutation {
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
pub(super) struct Case {
    pub(super) requests: Vec<Request>,
    pub(super) mutations: Vec<(Index, Mutation)>,
}

pub(super) fn case() -> impl Strategy<Value = Case> {
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
    pub(super) fn bytes(&self) -> Vec<u8> {
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
