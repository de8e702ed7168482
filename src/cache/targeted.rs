//! Targeted cache control (RFC 9213): a response field such as `CDN-Cache-Control`
//! that speaks to one class of cache. A route that names one
//! (`cache_control_field`) reads a response's storing and freshness rules from it
//! instead of from `Cache-Control` and `Expires`, so a backend can give this cache a
//! longer (or shorter) life than the browsers behind it get.
//!
//! The field is a Structured Field Dictionary (RFC 8941 §3.2). A value that does not
//! parse, or an empty one, is ignored and `Cache-Control` applies as usual (RFC 9213
//! §2.1). The field itself is forwarded and stored untouched, for caches further on.
//!
//! Not here: what the directives mean (`policy.rs` reads them as it reads
//! `Cache-Control`).

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The response's fields as this cache reads them: when `field` is set and the
/// response carries a valid, non-empty value of it, `Cache-Control` holds its
/// directives and `Expires` is gone; otherwise the fields as they came.
pub fn view<'a>(headers: &'a HeaderMap, field: Option<&HeaderName>) -> Cow<'a, HeaderMap> {
    let Some(field) = field else {
        return Cow::Borrowed(headers);
    };
    let Some(directives) = directives(headers, field) else {
        return Cow::Borrowed(headers);
    };
    let Ok(value) = HeaderValue::from_str(&directives) else {
        return Cow::Borrowed(headers);
    };
    let mut view = headers.clone();
    view.remove(header::EXPIRES);
    view.insert(header::CACHE_CONTROL, value);
    Cow::Owned(view)
}

/// The targeted field's dictionary written as `Cache-Control` directives; `None` when
/// the field is absent, empty or not a valid dictionary.
fn directives(headers: &HeaderMap, field: &HeaderName) -> Option<String> {
    let mut lines = Vec::new();
    for value in headers.get_all(field) {
        lines.push(value.to_str().ok()?);
    }
    // Field lines combine into one value, as for any list (RFC 8941 §4.2).
    let members = dictionary(&lines.join(","))?;
    if members.is_empty() {
        return None;
    }
    let written: Vec<String> = members
        .into_iter()
        .filter_map(|(key, value)| match value {
            // A lifetime given as anything but an Integer is ignored, not read as a
            // number (`max-age="10000"` is a String).
            _ if SECONDS.contains(&key.as_str()) && !matches!(value, Item::Integer(_)) => None,
            Item::True => Some(key),
            Item::False => None,
            Item::Integer(n) => Some(format!("{key}={n}")),
            Item::Text(text) => Some(format!("{key}=\"{text}\"")),
            Item::Other(raw) => Some(format!("{key}={raw}")),
        })
        .collect();
    Some(written.join(", "))
}

/// The directives whose value is a number of seconds: an Integer, or ignored.
const SECONDS: &[&str] = &[
    "max-age",
    "s-maxage",
    "stale-if-error",
    "stale-while-revalidate",
];

/// A dictionary member's value, as far as cache directives care.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    True,
    False,
    Integer(i64),
    /// A string's content, its escapes kept as written.
    Text(String),
    /// A token, decimal, byte sequence or inner list, written back as it came.
    Other(String),
}

/// Parses a Structured Field Dictionary (RFC 8941 §4.2.2): members in order, a key
/// given twice keeping its last value. Parameters are checked and dropped.
fn dictionary(input: &str) -> Option<Vec<(String, Item)>> {
    let mut p = Parser {
        s: input.as_bytes(),
        at: 0,
    };
    let mut members: Vec<(String, Item)> = Vec::new();
    p.skip_ows();
    while !p.done() {
        let key = p.key()?;
        let value = if p.eat(b'=') {
            p.member_value()?
        } else {
            Item::True
        };
        p.parameters()?;
        members.retain(|(k, _)| *k != key);
        members.push((key, value));
        p.skip_ows();
        if p.done() {
            break;
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip_ows();
        if p.done() {
            // A trailing comma.
            return None;
        }
    }
    Some(members)
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.at >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn skip(&mut self, b: u8) {
        while self.eat(b) {}
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn taken(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.s[from..self.at]).into_owned()
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Option<String> {
        let from = self.at;
        if !matches!(self.peek()?, b'a'..=b'z' | b'*') {
            return None;
        }
        self.at += 1;
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')
        ) {
            self.at += 1;
        }
        Some(self.taken(from))
    }

    fn member_value(&mut self) -> Option<Item> {
        if self.peek()? == b'(' {
            let from = self.at;
            self.inner_list()?;
            return Some(Item::Other(self.taken(from)));
        }
        self.bare_item()
    }

    fn inner_list(&mut self) -> Option<()> {
        self.at += 1;
        loop {
            self.skip(b' ');
            if self.eat(b')') {
                return Some(());
            }
            self.bare_item()?;
            self.parameters()?;
            if !matches!(self.peek()?, b' ' | b')') {
                return None;
            }
        }
    }

    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip(b' ');
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    fn bare_item(&mut self) -> Option<Item> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string().map(Item::Text),
            b'?' => {
                self.at += 1;
                match self.peek()? {
                    b'1' => {
                        self.at += 1;
                        Some(Item::True)
                    }
                    b'0' => {
                        self.at += 1;
                        Some(Item::False)
                    }
                    _ => None,
                }
            }
            b':' => {
                let from = self.at;
                self.at += 1;
                while matches!(self.peek()?, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' | b'=')
                {
                    self.at += 1;
                }
                if !self.eat(b':') {
                    return None;
                }
                Some(Item::Other(self.taken(from)))
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'*' => {
                let from = self.at;
                self.at += 1;
                while self
                    .peek()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b))
                {
                    self.at += 1;
                }
                Some(Item::Other(self.taken(from)))
            }
            _ => None,
        }
    }

    /// An integer (at most 15 digits) or a decimal (at most 12 + 3 digits).
    fn number(&mut self) -> Option<Item> {
        let from = self.at;
        let negative = self.eat(b'-');
        let digits_from = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let whole = self.at - digits_from;
        if whole == 0 {
            return None;
        }
        if !self.eat(b'.') {
            if whole > 15 {
                return None;
            }
            let n: i64 = std::str::from_utf8(&self.s[digits_from..self.at])
                .ok()?
                .parse()
                .ok()?;
            return Some(Item::Integer(if negative { -n } else { n }));
        }
        let fraction_from = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let fraction = self.at - fraction_from;
        if whole > 12 || fraction == 0 || fraction > 3 {
            return None;
        }
        Some(Item::Other(self.taken(from)))
    }

    /// A string's content; escapes (`\"`, `\\`) are kept as written, so the content
    /// can be written back between quotes.
    fn string(&mut self) -> Option<String> {
        self.at += 1;
        let from = self.at;
        loop {
            match self.peek()? {
                b'"' => {
                    let content = self.taken(from);
                    self.at += 1;
                    return Some(content);
                }
                b'\\' => {
                    self.at += 1;
                    if !matches!(self.peek()?, b'"' | b'\\') {
                        return None;
                    }
                    self.at += 1;
                }
                0x20..=0x7e => self.at += 1,
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELD: HeaderName = HeaderName::from_static("cdn-cache-control");

    fn fields(lines: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn read(lines: &[(&'static str, &str)]) -> HeaderMap {
        view(&fields(lines), Some(&FIELD)).into_owned()
    }

    #[test]
    fn a_valid_targeted_field_replaces_cache_control_and_expires() {
        let seen = read(&[
            ("cache-control", "max-age=10"),
            ("expires", "Thu, 01 Jan 2037 00:00:00 GMT"),
            ("cdn-cache-control", "max-age=600, stale-if-error=60"),
        ]);
        assert_eq!(
            seen[header::CACHE_CONTROL],
            "max-age=600, stale-if-error=60"
        );
        assert!(seen.get(header::EXPIRES).is_none());
        // Forwarded and stored as it came.
        assert_eq!(seen["cdn-cache-control"], "max-age=600, stale-if-error=60");
    }

    #[test]
    fn booleans_strings_and_tokens_become_directives() {
        let seen = read(&[(
            "cdn-cache-control",
            "no-cache=\"set-cookie\", private=?0, must-revalidate=?1, no-store;x=1, a=tok",
        )]);
        assert_eq!(
            seen[header::CACHE_CONTROL],
            "no-cache=\"set-cookie\", must-revalidate, no-store, a=tok"
        );
    }

    #[test]
    fn a_lifetime_of_the_wrong_type_is_ignored() {
        let seen = read(&[(
            "cdn-cache-control",
            "max-age=\"10000\", s-maxage=1.5, stale-if-error=tok, public",
        )]);
        assert_eq!(seen[header::CACHE_CONTROL], "public");
        let headers = fields(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=\"10000\""),
        ]);
        let seen = view(&headers, Some(&FIELD));
        assert_eq!(
            seen[header::CACHE_CONTROL],
            "",
            "valid and non-empty, so Cache-Control is replaced, with nothing usable"
        );
    }

    #[test]
    fn lines_combine_and_a_repeated_key_keeps_its_last_value() {
        let seen = read(&[
            ("cdn-cache-control", "max-age=5"),
            ("cdn-cache-control", "public, max-age=300"),
        ]);
        assert_eq!(seen[header::CACHE_CONTROL], "public, max-age=300");
    }

    #[test]
    fn an_invalid_or_empty_field_leaves_cache_control_in_charge() {
        for bad in [
            "max-age=60,",
            "Max-Age=60",
            "max-age=60 public",
            "max-age=\"60",
            "max-age=1234567890123456",
            "",
            "  ",
            "max-age=6.0000",
        ] {
            let headers = fields(&[("cache-control", "max-age=10"), ("cdn-cache-control", bad)]);
            assert!(
                matches!(view(&headers, Some(&FIELD)), Cow::Borrowed(_)),
                "{bad:?} was read"
            );
        }
    }

    #[test]
    fn without_a_configured_field_or_without_the_field_nothing_changes() {
        let headers = fields(&[("cdn-cache-control", "max-age=600")]);
        assert!(matches!(view(&headers, None), Cow::Borrowed(_)));
        let other = HeaderName::from_static("loadgate-cache-control");
        assert!(matches!(view(&headers, Some(&other)), Cow::Borrowed(_)));
    }

    #[test]
    fn inner_lists_decimals_and_byte_sequences_parse() {
        let seen = read(&[(
            "cdn-cache-control",
            "a=(1 2 \"x\");p, b=1.5, c=:aGk=:, max-age=3",
        )]);
        assert_eq!(
            seen[header::CACHE_CONTROL],
            "a=(1 2 \"x\"), b=1.5, c=:aGk=:, max-age=3"
        );
    }
}
