//! RFC 9111 rules for a shared cache, as pure functions: may this response be
//! stored, how long is it fresh, how old is it, may it be reused for this request,
//! and how a 304 refreshes the stored header fields.
//!
//! Storability, freshness and age are computed here from RFC 9111 directly, plus
//! loadgate's own rules (`Set-Cookie`, `Vary: *`). The `http-cache-semantics`
//! crate follows RFC 7234: it refuses statuses it does not know even with explicit
//! freshness, ignores `Date` in the age calculation and treats `proxy-revalidate`
//! as zero freshness.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};

/// RFC 9111 §1.2.2: a delta-seconds too large to represent is this.
const DELTA_MAX: u64 = 2_147_483_648;
/// Heuristic freshness is 10% of the time since Last-Modified, at most a day.
const HEURISTIC_CAP: Duration = Duration::from_secs(24 * 3600);
/// Statuses that are heuristically cacheable (RFC 9110 §15.1).
const HEURISTIC_STATUSES: &[u16] = &[200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// Parsed `Cache-Control` directives: names lower-cased, values unquoted.
/// A directive repeated with different values is kept as `Conflict`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives(HashMap<String, Value>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    None,
    Some(String),
    Conflict,
}

impl Directives {
    pub fn parse(headers: &HeaderMap) -> Directives {
        let mut map: HashMap<String, Value> = HashMap::new();
        for line in headers.get_all(header::CACHE_CONTROL) {
            let Ok(line) = line.to_str() else { continue };
            for part in split_list(line) {
                let (name, value) = match part.split_once('=') {
                    Some((n, v)) => (n.trim(), Value::Some(unquote(v.trim()).to_string())),
                    None => (part.trim(), Value::None),
                };
                if name.is_empty() {
                    continue;
                }
                let name = name.to_ascii_lowercase();
                match map.get(&name) {
                    Some(old) if *old != value => {
                        map.insert(name, Value::Conflict);
                    }
                    Some(_) => {}
                    None => {
                        map.insert(name, value);
                    }
                }
            }
        }
        Directives(map)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The delta-seconds value of `name`: `None` when absent, `Some(0)` when invalid
    /// or given more than once with different values (treated as stale).
    pub fn seconds(&self, name: &str) -> Option<u64> {
        match self.0.get(name)? {
            Value::Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                Some(v.parse::<u64>().map_or(DELTA_MAX, |n| n.min(DELTA_MAX)))
            }
            _ => Some(0),
        }
    }

    /// Like `seconds`, but a directive present without a value is `Some(None)`.
    pub fn optional_seconds(&self, name: &str) -> Option<Option<u64>> {
        match self.0.get(name)? {
            Value::None => Some(None),
            _ => Some(self.seconds(name)),
        }
    }
}

/// Splits a list on commas that are not inside a quoted string.
fn split_list(line: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&line[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&line[start..]);
    parts
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// Why a response is not stored (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// The rules of RFC 9111 §3 for a shared cache (method, status, no-store,
    /// private, Authorization, no explicit or default freshness).
    Rfc9111,
    SetCookie,
    VaryStar,
    Partial,
}

/// loadgate's options that change what is stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreRules {
    /// Store responses that carry `Set-Cookie` (off by default).
    pub store_set_cookie: bool,
}

/// Decides whether a shared cache may store `status`/`response` for the request
/// (RFC 9111 §3, §3.5 and §5.2.2). The status code only matters through
/// `must-understand` and heuristic freshness: a response with explicit freshness
/// is storable whatever its final status, as RFC 9111 says (RFC 7234 required the
/// cache to understand the status, which is why `http-cache-semantics` is not
/// asked here).
pub fn storable(
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    response: &HeaderMap,
    rules: StoreRules,
) -> Result<(), NotStorable> {
    if status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Err(NotStorable::Partial);
    }
    if response.contains_key(header::SET_COOKIE) && !rules.store_set_cookie {
        return Err(NotStorable::SetCookie);
    }
    if crate::cache::key::vary(response) == crate::cache::key::Vary::Any {
        return Err(NotStorable::VaryStar);
    }
    if *method != Method::GET || status.is_informational() {
        return Err(NotStorable::Rfc9111);
    }
    let cc = Directives::parse(response);
    let mut no_store = cc.has("no-store");
    if cc.has("must-understand") {
        // §5.2.2.3: store only a status the cache understands, and then ignore no-store.
        if !is_understood(status) {
            return Err(NotStorable::Rfc9111);
        }
        no_store = false;
    }
    if no_store || cc.has("private") || Directives::parse(request).has("no-store") {
        return Err(NotStorable::Rfc9111);
    }
    // §3.5: a shared cache stores an answer to an authenticated request only when
    // the response says it may.
    if request.contains_key(header::AUTHORIZATION)
        && !(cc.has("public") || cc.has("s-maxage") || cc.has("must-revalidate"))
    {
        return Err(NotStorable::Rfc9111);
    }
    let explicit = cc.has("public")
        || cc.has("max-age")
        || cc.has("s-maxage")
        || response.contains_key(header::EXPIRES);
    if explicit || HEURISTIC_STATUSES.contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(NotStorable::Rfc9111)
    }
}

fn is_understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 302 | 303 | 307 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// What the cache remembers about a stored response's freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Freshness lifetime (RFC 9111 §4.2.1).
    pub lifetime: Duration,
    /// `corrected_initial_age` (RFC 9111 §4.2.3).
    pub initial_age: Duration,
    /// When the response was received.
    pub response_time: SystemTime,
    /// `no-cache` (unqualified or qualified): never reused without revalidation.
    pub no_cache: bool,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served stale.
    pub no_stale: bool,
    /// `stale-if-error=N` (RFC 5861 §4): how long past its lifetime the response may be
    /// served when the origin fails.
    pub stale_if_error: Option<Duration>,
    /// `stale-while-revalidate=N` (RFC 5861 §3): how long past its lifetime the
    /// response may be served while one revalidation runs in the background.
    pub stale_while_revalidate: Option<Duration>,
}

impl Freshness {
    /// Computes freshness for a response received at `response_time` for a request
    /// sent at `request_time`.
    pub fn of(
        status: StatusCode,
        headers: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Freshness {
        let cc = Directives::parse(headers);
        Freshness {
            lifetime: lifetime(status, headers, &cc, response_time),
            initial_age: initial_age(headers, request_time, response_time),
            response_time,
            no_cache: cc.has("no-cache"),
            no_stale: cc.has("must-revalidate") || cc.has("proxy-revalidate") || cc.has("s-maxage"),
            stale_if_error: cc.seconds("stale-if-error").map(Duration::from_secs),
            stale_while_revalidate: cc
                .seconds("stale-while-revalidate")
                .map(Duration::from_secs),
        }
    }

    /// `current_age` at `now`.
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.response_time).unwrap_or_default()
    }

    pub fn is_fresh(&self, now: SystemTime) -> bool {
        !self.no_cache && self.lifetime > self.age(now)
    }

    /// How far past its lifetime the response is at `now` (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.age(now).saturating_sub(self.lifetime)
    }

    /// Seconds of freshness left (negative once stale), for `Cache-Status: ttl=`.
    pub fn ttl(&self, now: SystemTime) -> i64 {
        self.lifetime.as_secs() as i64 - self.age(now).as_secs() as i64
    }
}

fn date(headers: &HeaderMap, name: HeaderName) -> Option<Result<SystemTime, ()>> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return Some(Err(()));
    }
    Some(
        first
            .to_str()
            .ok()
            .and_then(crate::cache::date::parse)
            .ok_or(()),
    )
}

/// RFC 9111 §4.2.1 for a shared cache: s-maxage, max-age, Expires − Date, then a
/// heuristic only for heuristically cacheable statuses or `public` responses.
fn lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &Directives,
    response_time: SystemTime,
) -> Duration {
    if let Some(s) = cc.seconds("s-maxage") {
        return Duration::from_secs(s);
    }
    if let Some(s) = cc.seconds("max-age") {
        return Duration::from_secs(s);
    }
    let date_value = match date(headers, header::DATE) {
        Some(Ok(d)) => d,
        _ => response_time,
    };
    match date(headers, header::EXPIRES) {
        Some(Ok(expires)) => return expires.duration_since(date_value).unwrap_or_default(),
        // An invalid Expires (e.g. "0") means already expired.
        Some(Err(())) => return Duration::ZERO,
        None => {}
    }
    if !(HEURISTIC_STATUSES.contains(&status.as_u16()) || cc.has("public")) {
        return Duration::ZERO;
    }
    match date(headers, header::LAST_MODIFIED) {
        Some(Ok(modified)) => date_value
            .duration_since(modified)
            .map(|d| (d / 10).min(HEURISTIC_CAP))
            .unwrap_or_default(),
        _ => Duration::ZERO,
    }
}

/// The `Age` of a response in seconds (RFC 9111 §5.1): the first member of the
/// first field line, as a list-based value is read, without any `;` parameters (Age
/// has none, and reading the number makes the response older, never younger); `None`
/// when that is not a delta-seconds (negative, fractional, text), which is then
/// ignored. A value too large to represent is 2147483648 (§1.2.2).
pub fn age_value(headers: &HeaderMap) -> Option<u64> {
    let line = headers.get(header::AGE)?.to_str().ok()?;
    let first = line.split(',').next()?;
    let first = first.split(';').next()?.trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(first.parse::<u64>().map_or(DELTA_MAX, |n| n.min(DELTA_MAX)))
}

/// RFC 9111 §4.2.3 `corrected_initial_age`.
fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let age_value = age_value(headers).map_or(Duration::ZERO, Duration::from_secs);
    let apparent_age = match date(headers, header::DATE) {
        Some(Ok(d)) => response_time.duration_since(d).unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or_default();
    apparent_age.max(age_value + response_delay)
}

/// What the request allows (RFC 9111 §5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRules {
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    pub min_fresh: Option<u64>,
    /// `Some(None)`: any staleness accepted.
    pub max_stale: Option<Option<u64>>,
}

impl RequestRules {
    pub fn of(request: &HeaderMap) -> RequestRules {
        let cc = Directives::parse(request);
        let pragma_no_cache = !request.contains_key(header::CACHE_CONTROL)
            && request.get_all(header::PRAGMA).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
            });
        RequestRules {
            no_cache: cc.has("no-cache") || pragma_no_cache,
            no_store: cc.has("no-store"),
            only_if_cached: cc.has("only-if-cached"),
            max_age: cc.seconds("max-age"),
            min_fresh: cc.seconds("min-fresh"),
            max_stale: cc.optional_seconds("max-stale"),
        }
    }
}

/// May a stored response with `freshness` answer this request without contacting
/// the origin (RFC 9111 §4.2, §4.2.4, §5.2.1)?
pub fn reusable(freshness: &Freshness, rules: &RequestRules, now: SystemTime) -> bool {
    if rules.no_cache || freshness.no_cache {
        return false;
    }
    let age = freshness.age(now);
    if rules
        .max_age
        .is_some_and(|max| age > Duration::from_secs(max))
    {
        return false;
    }
    let left = freshness.lifetime.saturating_sub(age);
    if rules
        .min_fresh
        .is_some_and(|min| left < Duration::from_secs(min))
    {
        return false;
    }
    if freshness.is_fresh(now) {
        return true;
    }
    match rules.max_stale {
        Some(limit) if !freshness.no_stale => {
            limit.is_none_or(|s| freshness.staleness(now) <= Duration::from_secs(s))
        }
        _ => false,
    }
}

/// Header fields never stored or copied from a 304 into a stored response.
const NOT_STORED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authentication-info",
    "age",
];
/// Excluded from the update by a 304 (RFC 9111 §3.2): the stored body depends on them.
const NOT_UPDATED: &[&str] = &["content-length", "content-encoding", "content-range"];

/// The header fields of a response as stored.
pub fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in NOT_STORED {
        out.remove(*name);
    }
    out
}

/// RFC 9111 §3.2 / §4.3.4: the stored fields updated from a 304: each field the 304
/// carries replaces all stored lines of that field, except the excluded ones.
pub fn freshen(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut out = stored.clone();
    for name in not_modified.keys() {
        if NOT_STORED.contains(&name.as_str()) || NOT_UPDATED.contains(&name.as_str()) {
            continue;
        }
        out.remove(name);
        for value in not_modified.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn h(fields: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in fields {
            m.append(*n, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn date_at(secs: u64) -> String {
        httpdate::fmt_http_date(t(secs))
    }

    fn can_store(req: &[(&'static str, &str)], status: u16, res: &[(&'static str, &str)]) -> bool {
        storable(
            &Method::GET,
            &h(req),
            StatusCode::from_u16(status).unwrap(),
            &h(res),
            StoreRules::default(),
        )
        .is_ok()
    }

    #[test]
    fn parses_directives_case_insensitively_with_quotes() {
        let d = Directives::parse(&h(&[(
            "cache-control",
            "Max-Age=\"60\", NO-CACHE=\"a, b\"",
        )]));
        assert_eq!(d.seconds("max-age"), Some(60));
        assert!(d.has("no-cache"));
        let d = Directives::parse(&h(&[
            ("cache-control", "max-age=60"),
            ("cache-control", "max-age=30"),
        ]));
        assert_eq!(
            d.seconds("max-age"),
            Some(0),
            "conflicting values mean stale"
        );
        let d = Directives::parse(&h(&[(
            "cache-control",
            "max-age=abc, s-maxage=99999999999999",
        )]));
        assert_eq!(d.seconds("max-age"), Some(0));
        assert_eq!(d.seconds("s-maxage"), Some(DELTA_MAX));
    }

    #[test]
    fn shared_cache_storability() {
        assert!(can_store(&[], 200, &[("cache-control", "max-age=60")]));
        assert!(
            can_store(&[], 200, &[("etag", "\"x\"")]),
            "200 is cacheable by default"
        );
        assert!(!can_store(&[], 200, &[("cache-control", "no-store")]));
        assert!(!can_store(&[], 200, &[("cache-control", "NO-STORE")]));
        assert!(!can_store(
            &[],
            200,
            &[("cache-control", "private, max-age=60")]
        ));
        assert!(!can_store(
            &[("cache-control", "no-store")],
            200,
            &[("cache-control", "max-age=60")]
        ));
        assert!(!can_store(
            &[],
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
        ));
        assert!(!can_store(
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "*")]
        ));
        assert!(!can_store(&[], 206, &[("cache-control", "max-age=60")]));
        assert!(!can_store(&[], 302, &[]), "302 needs explicit freshness");
        assert!(can_store(&[], 302, &[("cache-control", "max-age=60")]));
        assert!(can_store(&[], 200, &[("cache-control", "no-cache")]));
        assert!(can_store(
            &[],
            200,
            &[("cache-control", "no-store, must-understand")]
        ));
    }

    #[test]
    fn authorization_needs_explicit_permission() {
        let auth = [("authorization", "Bearer x")];
        assert!(!can_store(&auth, 200, &[("cache-control", "max-age=60")]));
        assert!(can_store(
            &auth,
            200,
            &[("cache-control", "public, max-age=60")]
        ));
        assert!(can_store(&auth, 200, &[("cache-control", "s-maxage=60")]));
        assert!(can_store(
            &auth,
            200,
            &[("cache-control", "must-revalidate, max-age=60")]
        ));
    }

    #[test]
    fn set_cookie_can_be_allowed() {
        let rules = StoreRules {
            store_set_cookie: true,
        };
        let res = h(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]);
        assert!(storable(&Method::GET, &HeaderMap::new(), StatusCode::OK, &res, rules).is_ok());
    }

    fn fresh(res: &[(&'static str, &str)], received: u64) -> Freshness {
        Freshness::of(StatusCode::OK, &h(res), t(received), t(received))
    }

    #[test]
    fn lifetime_precedence() {
        let d = date_at(0);
        let exp = date_at(100);
        assert_eq!(
            fresh(&[("cache-control", "max-age=10, s-maxage=20")], 0)
                .lifetime
                .as_secs(),
            20
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=10"), ("expires", &exp)], 0)
                .lifetime
                .as_secs(),
            10
        );
        assert_eq!(
            fresh(&[("date", &d), ("expires", &exp)], 0)
                .lifetime
                .as_secs(),
            100
        );
        assert_eq!(
            fresh(&[("date", &d), ("expires", "0")], 0)
                .lifetime
                .as_secs(),
            0
        );
        let lm = date_at(0);
        let d = date_at(1000);
        assert_eq!(
            fresh(&[("date", &d), ("last-modified", &lm)], 1000)
                .lifetime
                .as_secs(),
            100
        );
        // A resource changed 5 s ago is fresh for a tenth of that: no floor.
        let recent = fresh(&[("date", &d), ("last-modified", &date_at(995))], 1000);
        assert_eq!(recent.lifetime, Duration::from_millis(500));
        assert!(!recent.is_fresh(t(1001)));
        let heuristic_302 = Freshness::of(
            StatusCode::FOUND,
            &h(&[("date", &d), ("last-modified", &lm)]),
            t(1000),
            t(1000),
        );
        assert_eq!(
            heuristic_302.lifetime,
            Duration::ZERO,
            "302 is not heuristically cacheable"
        );
    }

    #[test]
    fn age_uses_date_age_and_delay() {
        // Date 10 s before receipt: apparent age 10.
        let f = Freshness::of(
            StatusCode::OK,
            &h(&[("date", &date_at(90))]),
            t(100),
            t(100),
        );
        assert_eq!(f.age(t(100)).as_secs(), 10);
        assert_eq!(f.age(t(105)).as_secs(), 15);
        // Age header plus the response delay wins over a smaller apparent age.
        let f = Freshness::of(
            StatusCode::OK,
            &h(&[("date", &date_at(100)), ("age", "30")]),
            t(98),
            t(100),
        );
        assert_eq!(f.age(t(100)).as_secs(), 32);
    }

    #[test]
    fn age_is_the_first_member_of_the_first_line() {
        let age = |lines: &[&str]| {
            let fields: Vec<(&'static str, &str)> = lines.iter().map(|l| ("age", *l)).collect();
            age_value(&h(&fields))
        };
        assert_eq!(age(&["7200, 0"]), Some(7200));
        assert_eq!(age(&["0, 7200"]), Some(0));
        assert_eq!(age(&["0", "7200"]), Some(0));
        assert_eq!(age(&["7200", "0"]), Some(7200));
        assert_eq!(age(&["99999999999999999999"]), Some(DELTA_MAX));
        // Parameters are not part of Age: the number before them counts.
        assert_eq!(age(&["3600;foo=bar"]), Some(3600));
        assert_eq!(age(&["3600 ; 5"]), Some(3600));
        for invalid in ["abc", "-7200", "7200.0", "", ";3600"] {
            assert_eq!(age(&[invalid]), None, "{invalid:?} is ignored");
        }
    }

    #[test]
    fn reuse_rules() {
        let f = fresh(&[("cache-control", "max-age=60")], 0);
        let none = RequestRules::of(&HeaderMap::new());
        assert!(reusable(&f, &none, t(59)));
        assert!(!reusable(&f, &none, t(60)));
        let rules = |v: &str| RequestRules::of(&h(&[("cache-control", v)]));
        assert!(!reusable(&f, &rules("no-cache"), t(1)));
        assert!(!reusable(&f, &rules("max-age=5"), t(10)));
        assert!(!reusable(&f, &rules("min-fresh=30"), t(40)));
        assert!(reusable(&f, &rules("max-stale=10"), t(65)));
        assert!(!reusable(&f, &rules("max-stale=10"), t(75)));
        assert!(reusable(&f, &rules("max-stale"), t(7500)));
        let strict = fresh(&[("cache-control", "max-age=60, must-revalidate")], 0);
        assert!(!reusable(&strict, &rules("max-stale"), t(65)));
        let no_cache = fresh(&[("cache-control", "no-cache, max-age=60")], 0);
        assert!(!reusable(&no_cache, &none, t(1)));
        let pragma = RequestRules::of(&h(&[("pragma", "no-cache")]));
        assert!(!reusable(&f, &pragma, t(1)));
    }

    #[test]
    fn freshen_replaces_and_adds_but_keeps_body_fields() {
        let stored = h(&[
            ("content-length", "10"),
            ("cache-control", "max-age=1"),
            ("x-old", "1"),
            ("link", "<a>"),
            ("link", "<b>"),
        ]);
        let update = h(&[
            ("content-length", "0"),
            ("cache-control", "max-age=60"),
            ("x-new", "2"),
            ("link", "<c>"),
            ("connection", "close"),
        ]);
        let out = freshen(&stored, &update);
        assert_eq!(out["content-length"], "10");
        assert_eq!(out["cache-control"], "max-age=60");
        assert_eq!(out["x-old"], "1");
        assert_eq!(out["x-new"], "2");
        assert_eq!(out.get_all("link").iter().count(), 1);
        assert!(!out.contains_key("connection"));
    }
}
