//! Cache keys: the primary key (authority + path + query; GET and HEAD share it)
//! and the secondary key of a variant, built from the request headers a stored
//! response's `Vary` names (RFC 9111 §4.1). Pure functions.

use http::header::{HeaderMap, HeaderName, ACCEPT_LANGUAGE, VARY};

/// The primary key of a request target. HEAD is answered from a stored GET, so the
/// method is not part of it: only GET responses are stored.
pub fn primary(authority: &str, path_and_query: &str) -> String {
    // Lowercasing leaves the port's digits alone, so the suffix can go first.
    let authority = authority.strip_suffix(":80").unwrap_or(authority);
    let mut key = String::with_capacity(authority.len() + path_and_query.len());
    key.push_str(authority);
    key.make_ascii_lowercase();
    key.push_str(path_and_query);
    key
}

/// What a response's `Vary` says about which requests it may answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// No `Vary`: any request for the target.
    None,
    /// `Vary: *`: never matches a later request.
    Any,
    /// These request headers must match.
    Names(Vec<HeaderName>),
}

/// Reads the `Vary` field lines of a response.
pub fn vary(response: &HeaderMap) -> Vary {
    let mut names = Vec::new();
    for line in response.get_all(VARY).iter() {
        let Ok(line) = line.to_str() else {
            return Vary::Any;
        };
        for name in line.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Vary::Any;
            }
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) if !names.contains(&name) => names.push(name),
                Ok(_) => {}
                Err(_) => return Vary::Any,
            }
        }
    }
    if names.is_empty() {
        Vary::None
    } else {
        Vary::Names(names)
    }
}

/// The normalised value of one request header for Vary matching: all field lines
/// joined with `, `, whitespace around list commas removed; `None` when absent.
/// Fields whose whole value is case-insensitive (language tags, RFC 5646 §2.1.1)
/// are lower-cased too, so `en-US` and `en-us` select the same variant.
pub fn normalized(request: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out = joined(request, name)?;
    if *name == ACCEPT_LANGUAGE {
        out.make_ascii_lowercase();
    }
    Some(out)
}

fn joined(request: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for line in request.get_all(name).iter() {
        let line = String::from_utf8_lossy(line.as_bytes());
        let joined = line.split(',').map(str::trim).collect::<Vec<_>>().join(",");
        match &mut out {
            None => out = Some(joined),
            Some(out) => {
                out.push(',');
                out.push_str(&joined);
            }
        }
    }
    out
}

/// The values a request presents for `names`.
pub fn values(request: &HeaderMap, names: &[HeaderName]) -> Vec<Option<String>> {
    names.iter().map(|n| normalized(request, n)).collect()
}

/// The key a variant is stored under.
pub fn secondary(primary: &str, names: &[HeaderName], values: &[Option<String>]) -> String {
    let mut key = String::from(primary);
    for (name, value) in names.iter().zip(values) {
        key.push('\n');
        key.push_str(name.as_str());
        match value {
            Some(v) => {
                key.push('=');
                key.push_str(v);
            }
            None => key.push('!'),
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn primary_key_ignores_host_case_and_default_port() {
        assert_eq!(primary("Example.COM:80", "/a?b=1"), "example.com/a?b=1");
        assert_eq!(primary("example.com:8080", "/a"), "example.com:8080/a");
        assert_ne!(primary("a", "/x?1"), primary("a", "/x?2"));
    }

    #[test]
    fn reads_vary() {
        assert_eq!(vary(&headers(&[])), Vary::None);
        assert_eq!(vary(&headers(&[("vary", "")])), Vary::None);
        assert_eq!(vary(&headers(&[("vary", "Accept, *")])), Vary::Any);
        assert_eq!(
            vary(&headers(&[
                ("vary", "Accept-Encoding, accept"),
                ("vary", "X-A")
            ])),
            Vary::Names(vec![
                HeaderName::from_static("accept-encoding"),
                HeaderName::from_static("accept"),
                HeaderName::from_static("x-a"),
            ])
        );
    }

    #[test]
    fn normalises_values_for_matching() {
        let name = HeaderName::from_static("accept");
        let a = headers(&[("accept", "text/html ,  application/json")]);
        let b = headers(&[("accept", "text/html"), ("accept", "application/json")]);
        assert_eq!(normalized(&a, &name), normalized(&b, &name));
        assert_eq!(normalized(&headers(&[]), &name), None);
        assert_eq!(
            normalized(&headers(&[("accept", "")]), &name),
            Some(String::new())
        );
    }

    #[test]
    fn language_tags_match_whatever_their_case() {
        let name = HeaderName::from_static("accept-language");
        let a = headers(&[("accept-language", "en-US, De;q=0.5")]);
        let b = headers(&[("accept-language", "en-us,de;q=0.5")]);
        assert_eq!(normalized(&a, &name), normalized(&b, &name));
        let other = HeaderName::from_static("x-token");
        let c = headers(&[("x-token", "AbC")]);
        assert_eq!(normalized(&c, &other).as_deref(), Some("AbC"));
    }

    #[test]
    fn secondary_key_distinguishes_absent_from_empty() {
        let names = [HeaderName::from_static("x-a")];
        let absent = secondary("k", &names, &[None]);
        let empty = secondary("k", &names, &[Some(String::new())]);
        let one = secondary("k", &names, &[Some("1".into())]);
        assert_ne!(absent, empty);
        assert_ne!(empty, one);
    }
}
