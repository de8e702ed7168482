//! The answer to a request hyper's HTTP/1 parser refuses, rewritten on its way out.
//!
//! A request hyper cannot parse (a garbage request line, an invalid header name,
//! obs-fold, `HTTP/2.0` on an HTTP/1 connection, a head over the read buffer) never
//! reaches the handler: hyper answers it itself with a bare head and closes the
//! connection:
//!
//! ```text
//! HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: …\r\n\r\n
//! ```
//!
//! Every other refusal carries an `application/problem+json` body (`http/error.rs`), so
//! the connection's writer ([`FramingIo`](super::framing::FramingIo)) swaps that exact
//! head for the same status with a problem body. No response the handler gives can be
//! mistaken for it: every one of those carries `x-request-id` and `via`.

use http::StatusCode;

/// hyper's refusal head, between the status line and the date's value.
const HEADERS: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ";
/// An IMF-fixdate (`Mon, 30 Nov 2026 08:43:36 GMT`) and the end of the head.
const DATE_AND_END: usize = 29 + 4;

/// When `bytes` is exactly hyper's refusal head, the response to send instead.
pub(crate) fn rewrite(bytes: &[u8]) -> Option<Vec<u8>> {
    let rest = bytes.strip_prefix(b"HTTP/1.1 ")?;
    let code = std::str::from_utf8(rest.get(..3)?).ok()?;
    let status = StatusCode::from_u16(code.parse().ok()?).ok()?;
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let after_line = &rest[line_end..];
    let date = after_line.strip_prefix(HEADERS)?;
    if date.len() != DATE_AND_END || !date.ends_with(b"\r\n\r\n") {
        return None;
    }
    let date = &date[..date.len() - 4];
    let title = status.canonical_reason().unwrap_or("Error");
    let detail = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            "the request head is larger than the proxy accepts"
        }
        StatusCode::URI_TOO_LONG => "the request target is longer than the proxy accepts",
        _ => "the request is not valid HTTP/1.1 and could not be parsed",
    };
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut body = serde_json::to_vec(&body).expect("a JSON value serializes");
    body.push(b'\n');
    let mut out = Vec::with_capacity(body.len() + 200);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&rest[..line_end]);
    out.extend_from_slice(b"\r\nconnection: close\r\ncontent-type: application/problem+json");
    out.extend_from_slice(b"\r\ncache-control: no-store\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 08:43:36 GMT\r\n\r\n";

    #[test]
    fn hypers_refusal_gets_a_problem_body_with_the_same_status_and_date() {
        let out = String::from_utf8(rewrite(HYPER_400).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-type: application/problem+json\r\n"));
        assert!(
            head.contains("\r\ndate: Mon, 30 Nov 2026 08:43:36 GMT"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 400);
        assert_eq!(problem["title"], "Bad Request");

        let too_large = String::from_utf8_lossy(HYPER_400)
            .replace("400 Bad Request", "431 Request Header Fields Too Large");
        let out = String::from_utf8(rewrite(too_large.as_bytes()).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(out.contains("\"status\":431"), "{out}");
    }

    #[test]
    fn anything_else_is_left_alone() {
        let with_id = String::from_utf8_lossy(HYPER_400).replace(
            "content-length: 0\r\n",
            "content-length: 0\r\nx-request-id: 1\r\n",
        );
        let not_error = String::from_utf8_lossy(HYPER_400).replace("400 Bad Request", "200 OK");
        let continued = [HYPER_400, b"x"].concat();
        for bytes in [
            with_id.as_bytes(),
            not_error.as_bytes(),
            &continued,
            &HYPER_400[..HYPER_400.len() - 1],
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"",
            b"{\"a\":1}",
        ] {
            assert_eq!(rewrite(bytes), None, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
