//! A route's rewrites, validated: stripping its path prefix from the forwarded path, and
//! the header rules of the requests it forwards and the responses it gives. Checked
//! here, with the line of each problem; applied in `http/rewrite.rs`.

use http::header::{HeaderName, HeaderValue};

use super::defaults;
use super::raw::{RawHeaderRules, RawRoute, RawValues};
use super::section::{Errors, Section};

/// What a route changes in the requests it forwards and the responses it gives.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRewrite {
    /// Remove the route's `path_prefix` from the forwarded path and say so in
    /// `X-Forwarded-Prefix`. Key `strip_path_prefix`, default false.
    pub strip_path_prefix: bool,
    /// With `strip_path_prefix`, a backend's `Location` that points at the stripped
    /// path space is put back under the prefix. Key `rewrite_location`, default true.
    pub rewrite_location: bool,
    /// `[route.request_headers]`: applied to the request to the backend, after
    /// loadgate's own forwarding headers.
    pub request_headers: HeaderRules,
    /// `[route.response_headers]`: applied to every response the client gets on the
    /// route (from the backend, from the cache, and loadgate's own refusals).
    pub response_headers: HeaderRules,
}

impl Default for RouteRewrite {
    fn default() -> Self {
        RouteRewrite {
            strip_path_prefix: defaults::STRIP_PATH_PREFIX,
            rewrite_location: defaults::REWRITE_LOCATION,
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
        }
    }
}

/// Header rules of one direction, applied in this order: `remove`, then `set` (replaces
/// every value of the field), then `add` (appends to the field). A name appears in one
/// of the three at most.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderRules {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, Vec<HeaderValue>)>,
    pub add: Vec<(HeaderName, Vec<HeaderValue>)>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// Which way a rule acts: the request to the backend or the response to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Direction {
    fn key(self) -> &'static str {
        match self {
            Direction::Request => "request_headers",
            Direction::Response => "response_headers",
        }
    }
}

/// Fields a rule may not touch in either direction: they frame the message or describe
/// one connection, and loadgate sets or strips them itself.
const FRAMING: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Why a rule may not act on `name` (already lowercase), if it may not. `remove` is
/// whether the rule only removes the field.
fn refused(name: &str, direction: Direction, remove: bool) -> Option<&'static str> {
    if FRAMING.contains(&name) {
        return Some(
            "it frames the message or belongs to one connection; loadgate sets and strips \
             it itself",
        );
    }
    match (direction, name) {
        (Direction::Request, "host") => Some(
            "the backend gets the host the request was routed on (set X-Forwarded-Host \
             to tell it another one)",
        ),
        (Direction::Request, "expect") => {
            Some("loadgate sends the request body at once, without waiting for 100 Continue")
        }
        (Direction::Request, "proxy-authorization") => {
            Some("it is meant for a proxy, and loadgate strips it as hop-by-hop")
        }
        (
            Direction::Request,
            "if-none-match" | "if-modified-since" | "if-match" | "if-unmodified-since" | "if-range",
        ) => Some(
            "conditional fields belong to each request: the cache revalidates with them, \
             and a fixed value would make every request conditional",
        ),
        (Direction::Response, "age") => Some(
            "caches after loadgate compute freshness from it (RFC 9111 §5.1): a cached \
             answer must carry its true age",
        ),
        (Direction::Response, "cache-status") if !remove => Some(
            "it is this cache's own statement of what it did (RFC 9211); it may only be \
             removed",
        ),
        _ => None,
    }
}

/// The `strip_path_prefix`, `rewrite_location`, `request_headers` and `response_headers`
/// keys of a route.
pub(super) fn build(s: &Section, errs: &mut Errors, raw: &mut RawRoute) -> RouteRewrite {
    let strip_path_prefix = raw.strip_path_prefix.unwrap_or(defaults::STRIP_PATH_PREFIX);
    if strip_path_prefix {
        let prefix = raw.path_prefix.as_deref().unwrap_or_default();
        if !s.has("path_prefix") || s.dropped("path_prefix") {
            errs.push(
                s.line(&["strip_path_prefix"]),
                s.say("strip_path_prefix needs the route's path_prefix, the part it removes"),
            );
        } else if prefix.trim_end_matches('/').is_empty() {
            errs.push(
                s.line(&["strip_path_prefix"]),
                s.say(format!(
                    "strip_path_prefix with path_prefix {prefix:?} would strip nothing; \
                     remove it, or give a longer path_prefix such as \"/orders\""
                )),
            );
        }
    }
    let rewrite_location = raw.rewrite_location.unwrap_or(defaults::REWRITE_LOCATION);
    if raw.rewrite_location.is_some() && !strip_path_prefix {
        errs.push(
            s.line(&["rewrite_location"]),
            s.say(
                "rewrite_location applies to a route with strip_path_prefix = true; \
                 this route forwards its paths whole, so its backend's redirects already \
                 name them",
            ),
        );
    }
    RouteRewrite {
        strip_path_prefix,
        rewrite_location,
        request_headers: rules(s, errs, raw.request_headers.take(), Direction::Request),
        response_headers: rules(s, errs, raw.response_headers.take(), Direction::Response),
    }
}

/// One `[route.request_headers]` or `[route.response_headers]` table.
fn rules(
    s: &Section,
    errs: &mut Errors,
    raw: Option<RawHeaderRules>,
    direction: Direction,
) -> HeaderRules {
    let Some(raw) = raw else {
        return HeaderRules::default();
    };
    let table = direction.key();
    // Every name once, over the three lists: (name, list it is in).
    let mut seen: Vec<(HeaderName, &'static str)> = Vec::new();
    let mut name_of = |list: &'static str, written: &str, line: usize, errs: &mut Errors| {
        let what = format!("{table}.{list}: {written:?}");
        let Ok(name) = HeaderName::from_bytes(written.as_bytes()) else {
            errs.push(
                line,
                s.say(format!("{what} is not a header field name (RFC 9110 §5.1)")),
            );
            return None;
        };
        if let Some(why) = refused(name.as_str(), direction, list == "remove") {
            errs.push(line, s.say(format!("{what} may not be changed: {why}")));
            return None;
        }
        if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
            let also = if *first == list {
                format!("is listed twice in {list}")
            } else {
                format!("is also in {table}.{first}")
            };
            errs.push(
                line,
                s.say(format!(
                    "{what} {also}; name a field once: remove, then set (replaces), then add \
                     (appends) apply in that order, and set and add take an array for several \
                     values"
                )),
            );
            return None;
        }
        seen.push((name.clone(), list));
        Some(name)
    };

    let mut remove = Vec::new();
    for (i, written) in raw.remove.iter().flatten().enumerate() {
        let line = s.path_elem_line(&[table, "remove"], i);
        if let Some(name) = name_of("remove", written, line, errs) {
            remove.push(name);
        }
    }
    let mut lists = [(Vec::new(), raw.set, "set"), (Vec::new(), raw.add, "add")];
    for (out, raw, list) in &mut lists {
        for (written, RawValues(values)) in raw.take().into_iter().flatten() {
            let line = s.line(&[table, list, &written]);
            let Some(name) = name_of(list, &written, line, errs) else {
                continue;
            };
            if values.is_empty() {
                errs.push(
                    line,
                    s.say(format!(
                        "{table}.{list}: {written:?} has no value; to drop the field, put it in \
                         {table}.remove"
                    )),
                );
                continue;
            }
            let mut checked = Vec::new();
            for value in &values {
                match header_value(value) {
                    Ok(value) => checked.push(value),
                    Err(why) => errs.push(
                        line,
                        s.say(format!("{table}.{list}: {written:?} value {value:?} {why}")),
                    ),
                }
            }
            if checked.len() == values.len() {
                out.push((name, checked));
            }
        }
    }
    let [(set, ..), (add, ..)] = lists;
    HeaderRules { remove, set, add }
}

/// A field value as the config writes it: visible ASCII and spaces, no space at either
/// end (a parser would strip it, so the backend would not see what the file says).
fn header_value(value: &str) -> Result<HeaderValue, &'static str> {
    if !value
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
    {
        return Err(
            "must be printable ASCII: control characters end the field, and other \
                    bytes are read differently by each parser (RFC 9110 §5.5)",
        );
    }
    if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        return Err("has whitespace at an end, which every parser strips (RFC 9110 §5.5)");
    }
    HeaderValue::from_str(value).map_err(|_| "is not a valid field value")
}
