//! How a request is written: its framing (rule 6), its header fields and request line
//! (rules 7-9 and RFC 9112's syntax). Each case says what the right answer is and, where
//! it is not obvious, why (RFC section; what nginx does). Unless a case says otherwise the
//! client talks HTTP/1.1 to host `public.example`.

use crate::hygiene::case::{get, got_get, post, refused, served, Case, PUBLIC};
use crate::hygiene::expect::expected;
use crate::hygiene::rig::Backend::Public;

/// Rule 6: message framing. Refusals close the connection (RFC 9112 §6.3: the framing
/// of what follows cannot be trusted).
pub fn framing() -> Vec<Case> {
    let no = |name, fields: &str, body: &str, status| {
        refused(name, &post(fields, body), status).closes()
    };
    vec![
        // RFC 9112 §6.1: a transfer coding the server does not understand SHOULD get 501
        // (nginx answers 501 to any Transfer-Encoding but chunked). RFC 9112 §6.3 item 4
        // is stricter where the final coding is not chunked: the length cannot be
        // determined, and the answer MUST be 400. So `gzip, chunked` is 501 and
        // `chunked, gzip`, `identity`, `x-custom` are 400.
        no(
            "te_gzip_chunked",
            "Transfer-Encoding: gzip, chunked\r\n",
            "0\r\n\r\n",
            &[501],
        ),
        no(
            "te_chunked_gzip",
            "Transfer-Encoding: chunked, gzip\r\n",
            "0\r\n\r\n",
            &[400],
        )
        .by_parser(),
        no("te_identity", "Transfer-Encoding: identity\r\n", "", &[400]).by_parser(),
        no("te_x_custom", "Transfer-Encoding: x-custom\r\n", "", &[400]).by_parser(),
        // RFC 9112 §7: chunked MUST NOT be applied twice.
        no(
            "te_chunked_twice",
            "Transfer-Encoding: chunked, chunked\r\n",
            "0\r\n\r\n",
            &[400],
        ),
        no(
            "te_chunked_on_two_lines",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\n",
            &[400],
        ),
        // RFC 9112 §6.3 item 3 allows a server to reject TE + CL; it is the smuggling vector.
        no(
            "cl_te_smuggling",
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\nX",
            &[400],
        ),
        no(
            "te_cl_smuggling",
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            "8\r\nSMUGGLED\r\n0\r\n\r\n",
            &[400],
        ),
        // RFC 9112 §5.1: whitespace between a field name and the colon MUST get 400.
        no(
            "te_space_before_colon",
            "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
            "0\r\n\r\n",
            &[400],
        )
        .by_parser(),
        no(
            "te_xchunked",
            "Transfer-Encoding: xchunked\r\n",
            "0\r\n\r\n",
            &[400],
        )
        .by_parser(),
        no(
            "chunk_size_overflow",
            "Transfer-Encoding: chunked\r\n",
            "fffffffffffffffff1\r\nx\r\n0\r\n\r\n",
            &[400],
        ),
        no(
            "chunk_size_bare_lf",
            "Transfer-Encoding: chunked\r\n",
            "3\nabc\r\n0\r\n\r\n",
            &[400],
        ),
        // RFC 9110 §8.6: Content-Length = 1*DIGIT.
        no(
            "content_length_plus",
            "Content-Length: +3\r\n",
            "abc",
            &[400],
        )
        .by_parser(),
        no(
            "content_length_negative",
            "Content-Length: -1\r\n",
            "",
            &[400],
        )
        .by_parser(),
        no(
            "content_length_hex",
            "Content-Length: 0x3\r\n",
            "abc",
            &[400],
        )
        .by_parser(),
        // RFC 9110 §8.6 lets a recipient either reject a list of equal values or use
        // one; nginx rejects ("duplicate Content-Length"), and so must a proxy that would
        // otherwise forward the list for the backend to read its own way.
        no(
            "content_length_list_equal",
            "Content-Length: 3, 3\r\n",
            "abc",
            &[400],
        )
        .by_parser(),
        no(
            "content_length_twice_equal",
            "Content-Length: 3\r\nContent-Length: 3\r\n",
            "abc",
            &[400],
        ),
        no(
            "content_length_twice_differing",
            "Content-Length: 3\r\nContent-Length: 4\r\n",
            "abcd",
            &[400],
        )
        .by_parser(),
        served(
            "content_length_body_forwarded",
            &post("Content-Length: 3\r\n", "abc"),
            Public,
            expected(
                "POST / HTTP/1.1",
                &[("host", PUBLIC), ("content-length", "3")],
            )
            .body(b"abc"),
        ),
        // A chunked body that fits request_buffer_bytes is read ahead in full and sent on
        // with its length: the same bytes, framed the one way every backend reads.
        served(
            "chunked_body_forwarded",
            &post("Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
            Public,
            expected(
                "POST / HTTP/1.1",
                &[("host", PUBLIC), ("content-length", "3")],
            )
            .body(b"abc"),
        ),
        // RFC 9112 §7: coding names are case-insensitive; a tab is OWS. Both are chunked.
        served(
            "te_chunked_uppercase",
            &post("Transfer-Encoding: CHUNKED\r\n", "3\r\nabc\r\n0\r\n\r\n"),
            Public,
            expected(
                "POST / HTTP/1.1",
                &[("host", PUBLIC), ("content-length", "3")],
            )
            .body(b"abc"),
        ),
        served(
            "te_value_with_tab",
            &post("Transfer-Encoding:\tchunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
            Public,
            expected(
                "POST / HTTP/1.1",
                &[("host", PUBLIC), ("content-length", "3")],
            )
            .body(b"abc"),
        ),
    ]
}

/// Rules 7-9 and RFC 9112's syntax: header fields, request lines, methods.
pub fn syntax() -> Vec<Case> {
    let get_with = |fields: &str| format!("GET / HTTP/1.1\r\nHost: {PUBLIC}\r\n{fields}\r\n");
    let bad = |name, fields: &str| refused(name, &get_with(fields), &[400]);
    vec![
        // Rule 7: names with '_' are dropped (nginx: underscores_in_headers off). Behind
        // a server that maps '_' to '-' (CGI, some Spring setups) they would override
        // the real header.
        served(
            "underscore_transfer_encoding_dropped",
            &post("Content-Length: 3\r\nTransfer_Encoding: chunked\r\n", "abc"),
            Public,
            expected("POST / HTTP/1.1", &[("host", PUBLIC), ("content-length", "3")]).body(b"abc"),
        ),
        served(
            "underscore_forwarded_for_dropped",
            &get_with("X_Forwarded_For: 1.2.3.4\r\n"),
            Public,
            got_get("/", PUBLIC),
        ),
        served(
            "underscore_content_length_dropped",
            &post("Content_Length: 10\r\nContent-Length: 3\r\n", "abc"),
            Public,
            expected("POST / HTTP/1.1", &[("host", PUBLIC), ("content-length", "3")]).body(b"abc"),
        ),
        // RFC 9110 §7.6.1: hop-by-hop fields, and those Connection names, are removed.
        served(
            "hop_by_hop_removed",
            &get_with("Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\n"),
            Public,
            expected("GET / HTTP/1.1", &[("host", PUBLIC), ("x-kept", "1")]),
        ),
        // Via appends; X-Forwarded-For, -Proto, -Host and -Port from a client that is not
        // a trusted proxy are its own claims, replaced, and its Forwarded (RFC 7239) removed.
        served(
            "forwarding_headers_appended_or_replaced",
            &get_with("X-Forwarded-For: 203.0.113.9\r\nVia: 1.0 edge\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\nForwarded: for=203.0.113.9;proto=https\r\n"),
            Public,
            expected(
                "GET / HTTP/1.1",
                &[
                    ("host", PUBLIC),
                    ("x-forwarded-for", "203.0.113.9"),
                    ("via", "1.0 edge"),
                    ("x-forwarded-host", "evil.example"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-port", "443"),
                ],
            ),
        ),
        // RFC 9112 §5.1: whitespace before the colon MUST get 400.
        bad("space_before_colon", "X-Foo : bar\r\n").by_parser(),
        // RFC 9112 §5.2: obs-fold is rejected or replaced by SP; nginx rejects it.
        bad("obs_fold", "X-Foo: a\r\n b\r\n").by_parser(),
        refused(
            "obs_fold_transfer_encoding",
            &post("Transfer-Encoding: gzip\r\n chunked\r\n", "0\r\n\r\n"),
            &[400],
        ).by_parser()
        .closes(),
        // RFC 9110 §5.1: a field name is a token.
        bad("invalid_header_name_char", "X-Fo\"o: bar\r\n").by_parser(),
        bad("missing_colon", "X-Foo bar\r\n").by_parser(),
        bad("empty_header_name", ": bar\r\n").by_parser(),
        // RFC 9110 §5.5: CR, LF or NUL in a value: reject (or replace by SP; nginx rejects).
        bad("cr_in_value", "X-Foo: a\rb\r\n").by_parser(),
        bad("nul_in_value", "X-Foo: a\0b\r\n").by_parser(),
        // RFC 9112 §2.2: whitespace between the start-line and the first field MUST be
        // rejected or the line ignored; rejecting is the safe choice for a proxy.
        refused(
            "whitespace_before_first_header",
            "GET / HTTP/1.1\r\n Host: internal.example\r\nHost: public.example\r\n\r\n",
            &[400],
        ).by_parser(),
        // RFC 9112 §2.2: a server SHOULD ignore an empty line before the request line, and
        // MAY take a bare LF as a line end (nginx does both); what is forwarded is CRLF.
        served(
            "empty_line_before_request",
            &format!("\r\n{}", get("/x", PUBLIC)),
            Public,
            got_get("/x", PUBLIC),
        ),
        served(
            "bare_lf_line_ends",
            "GET /x HTTP/1.1\nHost: public.example\n\n",
            Public,
            got_get("/x", PUBLIC),
        ),
        // RFC 9112 §3: a request line with anything but single spaces is invalid (400).
        refused(
            "trailing_space_in_request_line",
            "GET / HTTP/1.1 \r\nHost: public.example\r\n\r\n",
            &[400],
        ).by_parser(),
        refused("garbage_request_line", "GARBAGE\r\n\r\n", &[400]).by_parser(),
        refused(
            "invalid_method_char",
            "GE(T / HTTP/1.1\r\nHost: public.example\r\n\r\n",
            &[400],
        ).by_parser(),
        // RFC 9110 §6.2: 505 for a major version the server does not speak; 400 is
        // what a parse error gives (the issue accepts either).
        refused(
            "http2_version_on_http1",
            "GET / HTTP/2.0\r\nHost: public.example\r\n\r\n",
            &[400, 505],
        ).by_parser(),
        // RFC 9110 §9.1: methods are case-sensitive, so `get` is an extension method a
        // proxy passes on unchanged (nginx refuses lowercase methods with 400).
        served(
            "lowercase_method_forwarded_as_is",
            "get /x HTTP/1.1\r\nHost: public.example\r\n\r\n",
            Public,
            expected("get /x HTTP/1.1", &[("host", PUBLIC)]),
        ),
        served(
            "extension_method_forwarded",
            "PURGE /x HTTP/1.1\r\nHost: public.example\r\n\r\n",
            Public,
            expected("PURGE /x HTTP/1.1", &[("host", PUBLIC)]),
        ),
        // A head over max_header_bytes (64 KiB): 431 (RFC 6585 §5).
        refused(
            "header_too_large",
            &get_with(&format!("X-Big: {}\r\n", "a".repeat(70_000))),
            &[431],
        ).by_parser(),
        // RFC 9112 §3: a target longer than the server will parse MUST get 414 (nginx: 414).
        // hyper's parser cannot tell a long target from a long head: one over the read
        // buffer (max_header_bytes) gets 431.
        refused(
            "request_target_too_long",
            &get(&format!("/{}", "a".repeat(70_000)), PUBLIC),
            &[414, 431],
        ).by_parser(),
        // Rule 8: a reverse proxy is no tunnel (RFC 9110 §9.3.6); 405 or 501, then close.
        refused(
            "connect_refused",
            "CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n",
            &[405, 501],
        )
        .closes(),
    ]
}
