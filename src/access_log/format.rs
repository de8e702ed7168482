//! One access log line from one request's [`Record`]: a JSON object, or the NCSA common
//! or combined format. Pure: no I/O and no clock, so every field and every escaping rule
//! is tested here.
//!
//! Not here: when records are made (the handler fills one in as a request goes through
//! its stages) and how lines reach the file (`mod.rs`).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::{Method, Version};

use crate::civil::Civil;
use crate::config::AccessLogFormat;

/// What one request did, as the access log tells it. Text the client chose (path,
/// query, user agent, referer) is kept as the bytes it sent and escaped when written.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request head arrived.
    pub time: SystemTime,
    /// The client's address (the peer of the connection).
    pub client: SocketAddr,
    /// `None` for a request refused before its head could be read (malformed, or too
    /// large): its line has no method, path or protocol, as nothing of them is known.
    pub method: Option<Method>,
    /// The host the request named (`Host` or the target's authority), as sent.
    pub host: Option<Box<[u8]>>,
    /// The path of the request target as the client sent it, before normalisation.
    pub path: Box<str>,
    /// The query, when the log includes it and the request had one.
    pub query: Option<Box<str>>,
    pub version: Version,
    pub status: u16,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes handed to the client's connection.
    pub bytes_out: u64,
    /// From the request head to the end of the response body.
    pub duration: Duration,
    /// From sending the request to the backend to its response head; `None` when no
    /// backend was asked.
    pub upstream_time: Option<Duration>,
    pub route: Option<String>,
    pub upstream: Option<String>,
    /// The backend asked (`host:port`), when one was.
    pub backend: Option<String>,
    /// The route's class.
    pub class: Option<&'static str>,
    /// What admission did (`admitted`, `queued`, `shed`, `would_shed`, ...); `None`
    /// when the request did not reach admission (a cache hit, a probe, a refusal).
    pub admission: Option<&'static str>,
    /// The cache's own `Cache-Status` entry, without the cache's name (`hit; ttl=30`,
    /// `fwd=miss; stored`); `None` on routes without a cache.
    pub cache: Option<Box<[u8]>>,
    pub request_id: Option<Box<[u8]>>,
    pub user_agent: Option<Box<[u8]>>,
    pub referer: Option<Box<[u8]>>,
    /// `TLSv1.2` / `TLSv1.3` for a connection that came in over TLS.
    pub tls_version: Option<&'static str>,
    /// The server name the TLS client asked for.
    pub sni: Option<String>,
    /// False when the response body did not end: the client went away or the backend
    /// failed mid-body.
    pub completed: bool,
}

impl Record {
    /// A record of a request with nothing known yet beyond its head's basics.
    pub fn new(time: SystemTime, client: SocketAddr, method: Method, path: &str) -> Record {
        Record {
            time,
            client,
            method: Some(method),
            host: None,
            path: path.into(),
            query: None,
            version: Version::HTTP_11,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            upstream_time: None,
            route: None,
            upstream: None,
            backend: None,
            class: None,
            admission: None,
            cache: None,
            request_id: None,
            user_agent: None,
            referer: None,
            tls_version: None,
            sni: None,
            completed: true,
        }
    }

    /// A request hyper refused on its own before the handler saw it, answering `status`
    /// (400 for a head it could not parse, 431 for one larger than its buffer, 414 for a
    /// target over 64 KiB): who sent it and what they got, all that is known. `time` is
    /// when the refusal ended the connection, the head's arrival not being known.
    pub fn refused(time: SystemTime, client: SocketAddr, status: u16) -> Record {
        let mut record = Record::new(time, client, Method::GET, "");
        record.method = None;
        record.status = status;
        record
    }
}

/// Appends `record` to `out` as one line in `format`, newline included.
pub fn write_line(out: &mut Vec<u8>, record: &Record, format: AccessLogFormat) {
    match format {
        AccessLogFormat::Json => write_json(out, record),
        AccessLogFormat::Common => write_common(out, record, false),
        AccessLogFormat::Combined => write_common(out, record, true),
    }
    out.push(b'\n');
}

/// `HTTP/1.1` and the like, as a request line names its protocol.
pub fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

fn write_json(out: &mut Vec<u8>, r: &Record) {
    out.extend_from_slice(b"{\"time\":\"");
    rfc3339_millis(out, r.time);
    out.push(b'"');
    let key = |out: &mut Vec<u8>, name: &str| {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
    };
    let string = |out: &mut Vec<u8>, name: &str, value: &[u8]| {
        key(out, name);
        json_string(out, value);
    };
    let number = |out: &mut Vec<u8>, name: &str, value: &dyn std::fmt::Display| {
        key(out, name);
        out.extend_from_slice(value.to_string().as_bytes());
    };
    string(out, "client", r.client.ip().to_string().as_bytes());
    number(out, "client_port", &r.client.port());
    if let Some(method) = &r.method {
        string(out, "method", method.as_str().as_bytes());
    }
    if let Some(host) = &r.host {
        string(out, "host", host);
    }
    if r.method.is_some() {
        string(out, "path", r.path.as_bytes());
    }
    if let Some(query) = &r.query {
        string(out, "query", query.as_bytes());
    }
    if r.method.is_some() {
        string(out, "protocol", protocol(r.version).as_bytes());
    }
    number(out, "status", &r.status);
    number(out, "bytes_in", &r.bytes_in);
    number(out, "bytes_out", &r.bytes_out);
    number(out, "duration_ms", &Millis(r.duration));
    if let Some(upstream_time) = r.upstream_time {
        number(out, "upstream_ms", &Millis(upstream_time));
    }
    let texts: [(&str, Option<&[u8]>); 11] = [
        ("route", r.route.as_deref().map(str::as_bytes)),
        ("upstream", r.upstream.as_deref().map(str::as_bytes)),
        ("backend", r.backend.as_deref().map(str::as_bytes)),
        ("class", r.class.map(str::as_bytes)),
        ("admission", r.admission.map(str::as_bytes)),
        ("cache", r.cache.as_deref()),
        ("request_id", r.request_id.as_deref()),
        ("user_agent", r.user_agent.as_deref()),
        ("referer", r.referer.as_deref()),
        ("tls_version", r.tls_version.map(str::as_bytes)),
        ("sni", r.sni.as_deref().map(str::as_bytes)),
    ];
    for (name, value) in texts {
        if let Some(value) = value {
            string(out, name, value);
        }
    }
    if !r.completed {
        out.extend_from_slice(b",\"completed\":false");
    }
    out.push(b'}');
}

/// A duration in milliseconds with microsecond precision: `12.345`.
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let micros = self.0.as_micros();
        write!(f, "{}.{:03}", micros / 1000, micros % 1000)
    }
}

/// `value` as a JSON string. Bytes that are not UTF-8 become U+FFFD; quotes,
/// backslashes and control characters (DEL included) are escaped.
fn json_string(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    for chunk in value.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                c if c < ' ' || c == '\u{7f}' => {
                    out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
                }
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

/// `host - - [day/Mon/year:HH:MM:SS +0000] "METHOD path PROTOCOL" status bytes`, and
/// for combined ` "referer" "user agent"`; absent values are `-`.
fn write_common(out: &mut Vec<u8>, r: &Record, combined: bool) {
    out.extend_from_slice(r.client.ip().to_string().as_bytes());
    out.extend_from_slice(b" - - [");
    clf_time(out, r.time);
    out.extend_from_slice(b"] \"");
    match &r.method {
        Some(method) => {
            quoted_text(out, method.as_str().as_bytes());
            out.push(b' ');
            quoted_text(out, r.path.as_bytes());
            if let Some(query) = &r.query {
                out.push(b'?');
                quoted_text(out, query.as_bytes());
            }
            out.push(b' ');
            out.extend_from_slice(protocol(r.version).as_bytes());
        }
        // No request line was read, as Apache and nginx write it.
        None => out.push(b'-'),
    }
    out.extend_from_slice(format!("\" {} ", r.status).as_bytes());
    if r.bytes_out == 0 {
        out.push(b'-');
    } else {
        out.extend_from_slice(r.bytes_out.to_string().as_bytes());
    }
    if combined {
        for value in [&r.referer, &r.user_agent] {
            out.extend_from_slice(b" \"");
            match value {
                Some(value) => quoted_text(out, value),
                None => out.push(b'-'),
            }
            out.push(b'"');
        }
    }
}

/// Text inside a quoted field of the common format, escaped as Apache's `mod_log_config`
/// does: `\"` and `\\`, `\n` `\r` `\t`, and any other byte that is not printable ASCII
/// as `\xhh`, so a value can neither end its field nor start a new line.
fn quoted_text(out: &mut Vec<u8>, value: &[u8]) {
    for &b in value {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b' '..=b'~' => out.push(b),
            b => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
        }
    }
}

/// `2024-05-01T12:00:00.123Z`.
fn rfc3339_millis(out: &mut Vec<u8>, time: SystemTime) {
    let Civil {
        year,
        month,
        day,
        hour,
        minute,
        second,
        millisecond,
    } = Civil::of(time);
    let text = format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millisecond:03}Z"
    );
    out.extend_from_slice(text.as_bytes());
}

/// `01/May/2024:12:00:00 +0000`, the common log format's time.
fn clf_time(out: &mut Vec<u8>, time: SystemTime) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = Civil::of(time);
    let month = MONTHS[t.month as usize - 1];
    let text = format!(
        "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000",
        t.day, t.year, t.hour, t.minute, t.second
    );
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// 2024-02-29T23:59:58.042Z.
    fn leap_day() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_709_251_198_042)
    }

    fn full_record() -> Record {
        let mut r = Record::new(
            leap_day(),
            "10.1.2.3:54321".parse().unwrap(),
            Method::GET,
            "/api/orders/7",
        );
        r.host = Some(b"api.example.com".as_slice().into());
        r.query = Some("page=2".into());
        r.status = 200;
        r.bytes_in = 12;
        r.bytes_out = 2326;
        r.duration = Duration::from_micros(12_345);
        r.upstream_time = Some(Duration::from_micros(9_001));
        r.route = Some("orders".into());
        r.upstream = Some("app".into());
        r.backend = Some("127.0.0.1:8081".into());
        r.class = Some("normal");
        r.admission = Some("admitted");
        r.cache = Some(b"fwd=miss; stored".as_slice().into());
        r.request_id = Some(b"0000abcd-1f".as_slice().into());
        r.user_agent = Some(b"curl/8.5.0".as_slice().into());
        r.referer = Some(b"https://shop.example/cart".as_slice().into());
        r.tls_version = Some("TLSv1.3");
        r.sni = Some("api.example.com".into());
        r
    }

    fn line(record: &Record, format: AccessLogFormat) -> String {
        let mut out = Vec::new();
        write_line(&mut out, record, format);
        String::from_utf8(out).expect("every line is UTF-8")
    }

    fn json(record: &Record) -> serde_json::Value {
        let text = line(record, AccessLogFormat::Json);
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text:?}"
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn times_are_utc_calendar_dates() {
        let mut out = Vec::new();
        rfc3339_millis(&mut out, leap_day());
        assert_eq!(out, b"2024-02-29T23:59:58.042Z");
        let mut out = Vec::new();
        clf_time(&mut out, leap_day());
        assert_eq!(out, b"29/Feb/2024:23:59:58 +0000");
        for (secs, expected) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, "2000-02-29T00:00:00.000Z"),
            (4_102_444_799, "2099-12-31T23:59:59.000Z"),
            (1_735_689_600, "2025-01-01T00:00:00.000Z"),
        ] {
            let mut out = Vec::new();
            rfc3339_millis(&mut out, UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn a_json_line_names_every_field() {
        assert_eq!(
            json(&full_record()),
            serde_json::json!({
                "time": "2024-02-29T23:59:58.042Z",
                "client": "10.1.2.3",
                "client_port": 54321,
                "method": "GET",
                "host": "api.example.com",
                "path": "/api/orders/7",
                "query": "page=2",
                "protocol": "HTTP/1.1",
                "status": 200,
                "bytes_in": 12,
                "bytes_out": 2326,
                "duration_ms": 12.345,
                "upstream_ms": 9.001,
                "route": "orders",
                "upstream": "app",
                "backend": "127.0.0.1:8081",
                "class": "normal",
                "admission": "admitted",
                "cache": "fwd=miss; stored",
                "request_id": "0000abcd-1f",
                "user_agent": "curl/8.5.0",
                "referer": "https://shop.example/cart",
                "tls_version": "TLSv1.3",
                "sni": "api.example.com",
            })
        );
    }

    #[test]
    fn absent_fields_are_left_out_and_an_unfinished_body_says_so() {
        let mut r = Record::new(leap_day(), "[::1]:8080".parse().unwrap(), Method::HEAD, "/");
        r.version = Version::HTTP_2;
        r.status = 404;
        r.completed = false;
        assert_eq!(
            json(&r),
            serde_json::json!({
                "time": "2024-02-29T23:59:58.042Z",
                "client": "::1",
                "client_port": 8080,
                "method": "HEAD",
                "path": "/",
                "protocol": "HTTP/2",
                "status": 404,
                "bytes_in": 0,
                "bytes_out": 0,
                "duration_ms": 0.0,
                "completed": false,
            })
        );
    }

    #[test]
    fn hostile_text_stays_one_valid_json_line() {
        let mut r = full_record();
        let agent: &[u8] =
            b"evil\" \\ \n{\"status\":1}\r\t\x00\x1b[31m\x7f caf\xc3\xa9 \xff\xfe end";
        r.user_agent = Some(agent.into());
        r.path = "/a\"b\\c/%0A/\u{2028}".into();
        r.referer = Some(b"\"},{\"x\":\"".as_slice().into());
        let text = line(&r, AccessLogFormat::Json);
        assert!(
            !text.as_bytes()[..text.len() - 1]
                .iter()
                .any(|b| *b < b' ' || *b == 0x7f),
            "{text:?}"
        );
        let parsed = json(&r);
        assert_eq!(
            parsed["user_agent"],
            "evil\" \\ \n{\"status\":1}\r\t\u{0}\u{1b}[31m\u{7f} café \u{fffd}\u{fffd} end"
        );
        assert_eq!(parsed["path"], "/a\"b\\c/%0A/\u{2028}");
        assert_eq!(parsed["referer"], "\"},{\"x\":\"");
        assert_eq!(parsed["status"], 200, "injected keys change nothing");
    }

    #[test]
    fn common_and_combined_lines_are_what_log_analysers_read() {
        let r = full_record();
        assert_eq!(
            line(&r, AccessLogFormat::Common),
            "10.1.2.3 - - [29/Feb/2024:23:59:58 +0000] \"GET /api/orders/7?page=2 HTTP/1.1\" \
             200 2326\n"
        );
        assert_eq!(
            line(&r, AccessLogFormat::Combined),
            "10.1.2.3 - - [29/Feb/2024:23:59:58 +0000] \"GET /api/orders/7?page=2 HTTP/1.1\" \
             200 2326 \"https://shop.example/cart\" \"curl/8.5.0\"\n"
        );
        let mut bare = Record::new(leap_day(), "[::1]:1".parse().unwrap(), Method::POST, "/x");
        bare.version = Version::HTTP_10;
        bare.status = 502;
        assert_eq!(
            line(&bare, AccessLogFormat::Combined),
            "::1 - - [29/Feb/2024:23:59:58 +0000] \"POST /x HTTP/1.0\" 502 - \"-\" \"-\"\n"
        );
    }

    #[test]
    fn a_request_refused_before_its_head_was_read_has_no_request_line() {
        let r = Record::refused(leap_day(), "10.1.2.3:40000".parse().unwrap(), 431);
        assert_eq!(
            line(&r, AccessLogFormat::Combined),
            "10.1.2.3 - - [29/Feb/2024:23:59:58 +0000] \"-\" 431 - \"-\" \"-\"\n"
        );
        let parsed = json(&r);
        assert_eq!(parsed["status"], 431);
        assert_eq!(parsed["client"], "10.1.2.3");
        for absent in [
            "method",
            "path",
            "protocol",
            "route",
            "upstream",
            "admission",
        ] {
            assert!(parsed.get(absent).is_none(), "{absent} in {parsed}");
        }
    }

    #[test]
    fn common_format_escapes_quotes_and_control_bytes() {
        let mut r = full_record();
        r.query = None;
        r.path = "/q\"uote\\d".into();
        r.user_agent = Some(b"a\"b\nc\rd\te\x00f\x1bg\x7fh\xc3\xa9".as_slice().into());
        r.referer = Some(b"\" 200 1 \"forged".as_slice().into());
        let text = line(&r, AccessLogFormat::Combined);
        assert_eq!(
            text,
            "10.1.2.3 - - [29/Feb/2024:23:59:58 +0000] \"GET /q\\\"uote\\\\d HTTP/1.1\" 200 2326 \
             \"\\\" 200 1 \\\"forged\" \"a\\\"b\\nc\\rd\\te\\x00f\\x1bg\\x7fh\\xc3\\xa9\"\n"
        );
        // Every quote inside a field is escaped: splitting on unescaped quotes gives
        // exactly the request line, referer and user agent.
        let unescaped = text
            .as_bytes()
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'"' && text.as_bytes()[i - 1] != b'\\')
            .count();
        assert_eq!(unescaped, 6);
    }
}
