//! ETags as Spring's `ShallowEtagHeaderFilter` makes them, and `If-None-Match` matching.
//!
//! Pure functions, no I/O: the handler decides when to call them.

use md5::{Digest, Md5};

/// The ETag header value Spring's `ShallowEtagHeaderFilter` sends for `body`:
/// `"0` + md5 hex of the body + `"`.
pub fn shallow_etag(body: &[u8]) -> String {
    etag_from_digest(&Md5::digest(body).into())
}

/// The ETag header value for an already computed md5 digest.
pub fn etag_from_digest(digest: &[u8; 16]) -> String {
    let mut out = String::with_capacity(35);
    out.push_str("\"0");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out.push('"');
    out
}

/// Whether Spring would add an ETag to a response with this `Cache-Control`:
/// `ShallowEtagHeaderFilter` skips responses marked `no-store`.
pub fn etag_allowed(cache_control: Option<&str>) -> bool {
    !cache_control.is_some_and(|cc| {
        cc.split(',')
            .any(|directive| directive.trim().eq_ignore_ascii_case("no-store"))
    })
}

/// RFC 9110 §13.1.2: does any of the `If-None-Match` header values match `etag`?
///
/// Uses the weak comparison (a `W/` prefix on either side is ignored), accepts
/// comma-separated lists spread over several header lines, and `*`, which
/// matches any existing representation.
pub fn if_none_match_matches<'a>(values: impl IntoIterator<Item = &'a str>, etag: &str) -> bool {
    let ours = opaque_tag(etag);
    values
        .into_iter()
        .flat_map(split_entity_tags)
        .any(|tag| tag == "*" || opaque_tag(tag) == ours)
}

/// Strips the weakness indicator, keeping the quoted opaque tag.
fn opaque_tag(tag: &str) -> &str {
    let tag = tag.trim();
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// Splits a list of entity tags on commas outside quotes (an opaque tag may contain a comma).
fn split_entity_tags(value: &str) -> impl Iterator<Item = &str> {
    let mut tags = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    for (i, c) in value.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                tags.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    tags.push(&value[start..]);
    tags.into_iter().map(str::trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_quoted_zero_plus_md5_hex() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(shallow_etag(b""), "\"0d41d8cd98f00b204e9800998ecf8427e\"");
        // md5("hello") = 5d41402abc4b2a76b9719d911017c592
        assert_eq!(
            shallow_etag(b"hello"),
            "\"05d41402abc4b2a76b9719d911017c592\""
        );
        assert_eq!(shallow_etag(b"x").len(), 35);
    }

    #[test]
    fn digest_and_body_forms_agree() {
        let digest: [u8; 16] = Md5::digest(b"some body").into();
        assert_eq!(etag_from_digest(&digest), shallow_etag(b"some body"));
    }

    #[test]
    fn no_store_suppresses_the_etag() {
        assert!(etag_allowed(None));
        assert!(etag_allowed(Some("max-age=60, public")));
        assert!(!etag_allowed(Some("no-store")));
        assert!(!etag_allowed(Some("private, No-Store")));
        assert!(etag_allowed(Some("no-cache")));
    }

    #[test]
    fn exact_match() {
        let etag = "\"0abc\"";
        assert!(if_none_match_matches(["\"0abc\""], etag));
        assert!(!if_none_match_matches(["\"0abd\""], etag));
        assert!(!if_none_match_matches(["0abc"], etag));
    }

    #[test]
    fn weak_comparison_ignores_w_prefix() {
        let etag = "\"0abc\"";
        assert!(if_none_match_matches(["W/\"0abc\""], etag));
        assert!(if_none_match_matches(["\"0abc\""], "W/\"0abc\""));
    }

    #[test]
    fn lists_and_several_lines() {
        let etag = "\"0abc\"";
        assert!(if_none_match_matches(["\"x\", \"0abc\""], etag));
        assert!(if_none_match_matches(["\"x\",W/\"0abc\" ,\"y\""], etag));
        assert!(if_none_match_matches(["\"x\"", "\"0abc\""], etag));
        assert!(!if_none_match_matches(["\"x\", \"y\"", "\"z\""], etag));
        assert!(!if_none_match_matches([""], etag));
        assert!(!if_none_match_matches(Vec::<&str>::new(), etag));
    }

    #[test]
    fn comma_inside_a_tag_is_not_a_separator() {
        assert!(if_none_match_matches(["\"a,b\""], "\"a,b\""));
        assert!(!if_none_match_matches(["\"a,b\""], "\"a\""));
    }

    #[test]
    fn star_matches_anything() {
        assert!(if_none_match_matches(["*"], "\"0abc\""));
        assert!(if_none_match_matches(["\"x\", *"], "\"0abc\""));
    }
}
