//! RFC 9110 §13 conditional requests, evaluated by the cache against a stored
//! response: entity-tag parsing, weak and strong comparison, `If-None-Match`
//! lists and `*`, and `If-None-Match` taking precedence over `If-Modified-Since`.
//!
//! Pure functions, no I/O. Preconditions that need the origin (`If-Match`,
//! `If-Unmodified-Since`, `If-Range`) are not evaluated here: the cache forwards
//! such requests (see `mod.rs`).

use std::time::SystemTime;

use http::header::{self, HeaderMap};

/// An entity tag (RFC 9110 §8.8.3). `opaque` is the quoted string, quotes included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityTag<'a> {
    pub weak: bool,
    pub opaque: &'a str,
}

impl EntityTag<'_> {
    /// Weak comparison: the opaque tags match, either or both may be weak.
    pub fn weak_eq(&self, other: &EntityTag<'_>) -> bool {
        self.opaque == other.opaque
    }

    /// Strong comparison: neither is weak and the opaque tags match.
    pub fn strong_eq(&self, other: &EntityTag<'_>) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }
}

/// Parses one entity tag from the start of `s`; returns it and the rest.
fn parse_one(s: &str) -> Option<(EntityTag<'_>, &str)> {
    let (weak, rest) = match s.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let body = rest.strip_prefix('"')?;
    let end = body.find('"')?;
    // etagc = %x21 / %x23-7E / obs-text
    if !body[..end]
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
    {
        return None;
    }
    let opaque = &rest[..end + 2];
    Some((EntityTag { weak, opaque }, &body[end + 1..]))
}

/// Parses a whole `ETag` field value; `None` when it is not exactly one valid tag.
pub fn parse_etag(value: &str) -> Option<EntityTag<'_>> {
    let (tag, rest) = parse_one(value.trim())?;
    rest.trim().is_empty().then_some(tag)
}

/// An `If-None-Match` (or `If-Match`) field value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagList<'a> {
    Any,
    Tags(Vec<EntityTag<'a>>),
}

/// Parses the field lines of `If-None-Match`; `None` when absent or invalid
/// (an invalid field is ignored, as if absent).
pub fn parse_tag_list<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<TagList<'a>> {
    let mut tags = Vec::new();
    let mut any = false;
    let mut seen_line = false;
    for line in lines {
        seen_line = true;
        let mut rest = line;
        loop {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                break;
            }
            if let Some(after) = rest.strip_prefix('*') {
                any = true;
                rest = after;
                continue;
            }
            let (tag, after) = parse_one(rest)?;
            tags.push(tag);
            rest = after.trim_start_matches([' ', '\t']);
            if !(rest.is_empty() || rest.starts_with(',')) {
                return None;
            }
        }
    }
    match (seen_line, any, tags.is_empty()) {
        (false, _, _) => None,
        (true, true, true) => Some(TagList::Any),
        // `*` mixed with tags is invalid.
        (true, true, false) => None,
        (true, false, true) => None,
        (true, false, false) => Some(TagList::Tags(tags)),
    }
}

/// What the stored response offers to evaluate conditions against.
#[derive(Debug, Clone, Copy)]
pub struct Validators<'a> {
    pub etag: Option<&'a str>,
    /// `Last-Modified`, else `Date`, else the time the response was received
    /// (RFC 9111 §4.3.2).
    pub last_modified: Option<SystemTime>,
}

impl<'a> Validators<'a> {
    pub fn of(headers: &'a HeaderMap, received: SystemTime) -> Validators<'a> {
        let date = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::cache::date::parse)
        };
        Validators {
            etag: headers.get(header::ETAG).and_then(|v| v.to_str().ok()),
            last_modified: date(header::LAST_MODIFIED)
                .or_else(|| date(header::DATE))
                .or(Some(received)),
        }
    }
}

/// The outcome of evaluating a GET/HEAD request's conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answer 304 Not Modified.
    NotModified,
    /// Answer with the full stored response.
    Full,
}

/// Evaluates `If-None-Match` (weak comparison, lists, `*`) and, only when it is
/// absent, `If-Modified-Since`, for a GET or HEAD request (RFC 9110 §13.2.2).
pub fn evaluate(request: &HeaderMap, stored: Validators<'_>) -> Verdict {
    evaluate_lazily(request, stored.etag, || stored.last_modified)
}

/// [`evaluate`] against a stored response's header fields: its dates are parsed
/// only when the request's conditions need them (not for an `If-None-Match`).
pub fn evaluate_stored(request: &HeaderMap, stored: &HeaderMap, received: SystemTime) -> Verdict {
    let etag = stored.get(header::ETAG).and_then(|v| v.to_str().ok());
    evaluate_lazily(request, etag, || {
        Validators::of(stored, received).last_modified
    })
}

fn evaluate_lazily(
    request: &HeaderMap,
    etag: Option<&str>,
    last_modified: impl FnOnce() -> Option<SystemTime>,
) -> Verdict {
    let inm = parse_tag_list(
        request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    if let Some(list) = inm {
        return match list {
            // The stored response is a current representation.
            TagList::Any => Verdict::NotModified,
            TagList::Tags(tags) => {
                let current = etag.and_then(parse_etag);
                match current {
                    Some(current) if tags.iter().any(|t| t.weak_eq(&current)) => {
                        Verdict::NotModified
                    }
                    _ => Verdict::Full,
                }
            }
        };
    }
    // If-None-Match was present but invalid: ignored, and so is nothing else.
    let mut ims = request.get_all(header::IF_MODIFIED_SINCE).iter();
    let (Some(value), None) = (ims.next(), ims.next()) else {
        return Verdict::Full;
    };
    let Some(since) = value.to_str().ok().and_then(crate::cache::date::parse) else {
        return Verdict::Full;
    };
    match last_modified() {
        Some(modified) if modified <= since => Verdict::NotModified,
        _ => Verdict::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::Duration;

    fn tag(s: &str) -> EntityTag<'_> {
        parse_etag(s).unwrap()
    }

    #[test]
    fn parses_strong_and_weak_tags() {
        assert_eq!(
            tag("\"abc\""),
            EntityTag {
                weak: false,
                opaque: "\"abc\""
            }
        );
        assert_eq!(
            tag(" W/\"abc\" "),
            EntityTag {
                weak: true,
                opaque: "\"abc\""
            }
        );
        assert_eq!(tag("\"\"").opaque, "\"\"");
        assert!(parse_etag("abc").is_none());
        assert!(parse_etag("\"abc").is_none());
        assert!(parse_etag("w/\"abc\"").is_none(), "W/ is case-sensitive");
        assert!(parse_etag("\"a\" \"b\"").is_none());
        assert!(parse_etag("\"a b\"").is_none(), "space is not an etagc");
    }

    #[test]
    fn weak_and_strong_comparison_table() {
        // RFC 9110 §8.8.3.2 example table.
        let cases = [
            ("W/\"1\"", "W/\"1\"", false, true),
            ("W/\"1\"", "W/\"2\"", false, false),
            ("W/\"1\"", "\"1\"", false, true),
            ("\"1\"", "\"1\"", true, true),
        ];
        for (a, b, strong, weak) in cases {
            assert_eq!(tag(a).strong_eq(&tag(b)), strong, "{a} vs {b}");
            assert_eq!(tag(a).weak_eq(&tag(b)), weak, "{a} vs {b}");
        }
    }

    #[test]
    fn parses_lists_with_commas_inside_tags() {
        let list = parse_tag_list(["\"a,b\", W/\"c\"", "\"d\""]).unwrap();
        let TagList::Tags(tags) = list else {
            panic!("not a tag list")
        };
        let opaque: Vec<_> = tags.iter().map(|t| t.opaque).collect();
        assert_eq!(opaque, ["\"a,b\"", "\"c\"", "\"d\""]);
        assert!(tags[1].weak);
        assert_eq!(parse_tag_list(["*"]), Some(TagList::Any));
        assert_eq!(parse_tag_list([" * "]), Some(TagList::Any));
        assert_eq!(parse_tag_list(["*, \"a\""]), None);
        assert_eq!(parse_tag_list(["\"a\" junk"]), None);
        assert_eq!(parse_tag_list(Vec::<&str>::new()), None);
        assert_eq!(parse_tag_list([""]), None);
    }

    fn request(fields: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn stored(etag: Option<&str>, modified: u64) -> Validators<'_> {
        Validators {
            etag,
            last_modified: Some(at(modified)),
        }
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let s = stored(Some("\"v1\""), 0);
        let eval = |v| evaluate(&request(&[("if-none-match", v)]), s);
        assert_eq!(eval("\"v1\""), Verdict::NotModified);
        assert_eq!(eval("W/\"v1\""), Verdict::NotModified);
        assert_eq!(eval("\"v2\""), Verdict::Full);
        assert_eq!(eval("\"v0\", \"v1\""), Verdict::NotModified);
        assert_eq!(eval("*"), Verdict::NotModified);
        let weak = stored(Some("W/\"v1\""), 0);
        assert_eq!(
            evaluate(&request(&[("if-none-match", "\"v1\"")]), weak),
            Verdict::NotModified
        );
    }

    #[test]
    fn if_none_match_without_stored_etag_matches_only_star() {
        let s = stored(None, 0);
        assert_eq!(
            evaluate(&request(&[("if-none-match", "\"v1\"")]), s),
            Verdict::Full
        );
        assert_eq!(
            evaluate(&request(&[("if-none-match", "*")]), s),
            Verdict::NotModified
        );
    }

    #[test]
    fn if_none_match_takes_precedence_over_if_modified_since() {
        let s = stored(Some("\"v1\""), 0);
        let later = httpdate::fmt_http_date(at(100));
        // IMS alone would say 304; a non-matching INM says 200.
        let h = request(&[
            ("if-none-match", "\"other\""),
            ("if-modified-since", &later),
        ]);
        assert_eq!(evaluate(&h, s), Verdict::Full);
        // IMS alone would say 200; a matching INM says 304.
        let earlier = httpdate::fmt_http_date(at(0) - Duration::from_secs(100));
        let h = request(&[("if-none-match", "\"v1\""), ("if-modified-since", &earlier)]);
        assert_eq!(evaluate(&h, s), Verdict::NotModified);
    }

    #[test]
    fn if_modified_since_compares_dates() {
        let s = stored(None, 100);
        let eval = |secs: u64| {
            let v = httpdate::fmt_http_date(at(secs));
            evaluate(&request(&[("if-modified-since", &v)]), s)
        };
        assert_eq!(eval(100), Verdict::NotModified, "equal is not modified");
        assert_eq!(eval(200), Verdict::NotModified);
        assert_eq!(eval(50), Verdict::Full);
        let bad = request(&[("if-modified-since", "yesterday")]);
        assert_eq!(evaluate(&bad, s), Verdict::Full, "invalid date is ignored");
        let two = request(&[
            ("if-modified-since", &httpdate::fmt_http_date(at(200))),
            ("if-modified-since", &httpdate::fmt_http_date(at(200))),
        ]);
        assert_eq!(evaluate(&two, s), Verdict::Full, "a list is invalid");
        assert_eq!(evaluate(&HeaderMap::new(), s), Verdict::Full);
    }

    #[test]
    fn validators_fall_back_to_date_then_receipt() {
        let mut h = HeaderMap::new();
        let received = at(500);
        assert_eq!(Validators::of(&h, received).last_modified, Some(received));
        h.insert("date", httpdate::fmt_http_date(at(10)).parse().unwrap());
        assert_eq!(Validators::of(&h, received).last_modified, Some(at(10)));
        h.insert(
            "last-modified",
            httpdate::fmt_http_date(at(5)).parse().unwrap(),
        );
        assert_eq!(Validators::of(&h, received).last_modified, Some(at(5)));
    }
}
