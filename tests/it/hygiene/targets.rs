//! Where a request goes: the host it is for (rules 1-3), its normalised path (rule 4)
//! and the targets refused outright (rule 5). Each case says what the right answer is
//! and, where it is not obvious, why (RFC section; what nginx does). Unless a case says
//! otherwise the client talks HTTP/1.1 to host `public.example`.

use crate::hygiene::case::{get, got_get, refused, served, Case, PUBLIC};
use crate::hygiene::expect::expected;
use crate::hygiene::rig::Backend::{Batch, Internal, Public};

/// Rules 1-3: which host a request is for, and the Host the backend sees.
pub fn host() -> Vec<Case> {
    vec![
        served(
            "clean_get_public",
            &get("/", PUBLIC),
            Public,
            got_get("/", PUBLIC),
        ),
        served(
            "clean_get_internal",
            &get("/x", "internal.example"),
            Internal,
            got_get("/x", "internal.example"),
        ),
        // RFC 9112 §3.2.2: with an absolute-form target the server MUST ignore Host and
        // use the target's authority; origin-form is what an origin server expects.
        served(
            "absolute_form_authority_replaces_host",
            "GET http://public.example/x HTTP/1.1\r\nHost: internal.example\r\n\r\n",
            Public,
            got_get("/x", PUBLIC),
        ),
        served(
            "absolute_form_reaches_internal_despite_public_host",
            "GET http://internal.example/x?q=1 HTTP/1.1\r\nHost: public.example\r\n\r\n",
            Internal,
            got_get("/x?q=1", "internal.example"),
        ),
        // The empty Host is ignored like any other (§3.2.2); the path routes to batch.
        served(
            "absolute_form_with_empty_host",
            "GET http://public.example/reports/x HTTP/1.1\r\nHost: \r\n\r\n",
            Batch,
            got_get("/reports/x", PUBLIC),
        ),
        served(
            "absolute_form_keeps_port_in_host",
            "GET http://public.example:8080/x HTTP/1.1\r\nHost: public.example:8080\r\n\r\n",
            Public,
            got_get("/x", "public.example:8080"),
        ),
        // HTTP/1.0 needs no Host; the target's authority becomes the forwarded Host.
        served(
            "absolute_form_http10_without_host",
            "GET http://internal.example/x HTTP/1.0\r\n\r\n",
            Internal,
            expected("GET /x HTTP/1.1", &[])
                .host_added("internal.example")
                .received("1.0"),
        ),
        // RFC 9112 §3.2: an HTTP/1.1 request without Host MUST get 400, whatever its
        // target (nginx takes the host from an absolute-form target and serves it).
        refused(
            "absolute_form_http11_without_host",
            "GET http://public.example/x HTTP/1.1\r\n\r\n",
            &[400],
        ),
        // RFC 9110 §4.2.4: userinfo in an http URI is an error for the recipient.
        refused(
            "absolute_form_with_userinfo",
            "GET http://user@public.example/x HTTP/1.1\r\nHost: public.example\r\n\r\n",
            &[400],
        ),
        // RFC 9112 §3.2: more than one Host line MUST get 400, even with equal values.
        refused(
            "two_host_lines",
            "GET / HTTP/1.1\r\nHost: public.example\r\nHost: internal.example\r\n\r\n",
            &[400],
        ),
        refused(
            "two_identical_host_lines",
            "GET / HTTP/1.1\r\nHost: public.example\r\nHost: public.example\r\n\r\n",
            &[400],
        ),
        refused(
            "host_list_value",
            &get("/", "public.example, internal.example"),
            &[400],
        ),
        refused("http11_without_host", "GET / HTTP/1.1\r\n\r\n", &[400]),
        // An empty Host is allowed only when the target has no authority; for an
        // origin server behind a router, take it as missing.
        refused(
            "http11_empty_host",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            &[400],
        ),
        // RFC 9112 §3.2: a Host that is not a valid authority (RFC 3986 §3.2) MUST get 400.
        refused("host_with_path", &get("/", "good.example/evil?x"), &[400]),
        refused("host_with_space", &get("/", "a b"), &[400]),
        refused(
            "host_with_userinfo",
            &get("/", "user@internal.example"),
            &[400],
        ),
        refused(
            "host_with_bad_port",
            &get("/", "public.example:80x"),
            &[400],
        ),
        // HTTP/1.0 clients need not send Host: served on the default route, with the
        // backend's address as the Host (what loadgate sends today; nginx's default
        // `proxy_set_header Host $proxy_host` does the same).
        served(
            "http10_without_host",
            "GET /x HTTP/1.0\r\n\r\n",
            Public,
            expected("GET /x HTTP/1.1", &[])
                .received("1.0")
                .backend_host(),
        ),
        // Rule 3: host names compare case-insensitively and one trailing dot is the same
        // name (RFC 3986 §6.2.2.1, DNS root); the backend gets the canonical form.
        served(
            "host_case_and_trailing_dot",
            &get("/x", "Internal.Example."),
            Internal,
            got_get("/x", "internal.example"),
        ),
        served(
            "host_port_kept_not_routed",
            &get("/x", "internal.example:8080"),
            Internal,
            got_get("/x", "internal.example:8080"),
        ),
        served(
            "host_uppercase_dot_and_port",
            &get("/x", "INTERNAL.EXAMPLE.:8443"),
            Internal,
            got_get("/x", "internal.example:8443"),
        ),
        served(
            "host_uppercase_public",
            &get("/x", "Public.Example"),
            Public,
            got_get("/x", PUBLIC),
        ),
        served(
            "host_ipv6_literal",
            &get("/x", "[::1]:8080"),
            Public,
            got_get("/x", "[::1]:8080"),
        ),
        // RFC 9112 §5: OWS around a field value is not part of it.
        served(
            "host_surrounding_whitespace",
            "GET /x HTTP/1.1\r\nHost: \t public.example \t\r\n\r\n",
            Public,
            got_get("/x", PUBLIC),
        ),
    ]
}

/// Rule 4: paths are normalised before routing, and the normalised path is forwarded.
pub fn path() -> Vec<Case> {
    let to = |name, target: &str, backend, forwarded: &str| {
        served(
            name,
            &get(target, PUBLIC),
            backend,
            got_get(forwarded, PUBLIC),
        )
    };
    vec![
        // RFC 3986 §5.2.4 remove_dot_segments: a critical prefix must not carry a
        // request into the sheddable route (or past an ACL on a prefix).
        to(
            "dotdot_from_critical_into_sheddable",
            "/checkout/../reports/export",
            Batch,
            "/reports/export",
        ),
        // Tomcat drops path parameters before resolving dot segments: `..;` is `..` there.
        to(
            "dotdot_semicolon_tomcat_style",
            "/checkout/..;/reports/export",
            Batch,
            "/reports/export",
        ),
        to(
            "dotdot_with_parameter",
            "/checkout/..;jsessionid=1/reports/export",
            Batch,
            "/reports/export",
        ),
        // RFC 3986 §6.2.2.2: percent-encoded unreserved characters are decoded.
        to(
            "encoded_unreserved_decoded",
            "/api/%72eports/x",
            Batch,
            "/api/reports/x",
        ),
        to(
            "encoded_tilde_lowercase_hex",
            "/%7euser/x",
            Public,
            "/~user/x",
        ),
        // Decoding comes before dot-segment removal (RFC 3986 §6.2.2): `%2e%2E` is `..`.
        to(
            "encoded_dot_segment",
            "/checkout/%2e%2E/reports/x",
            Batch,
            "/reports/x",
        ),
        // RFC 3986 §6.2.2.1: other escapes stay, with uppercase hex.
        to(
            "other_escapes_uppercased",
            "/a/%c3%a9/b",
            Public,
            "/a/%C3%A9/b",
        ),
        to(
            "double_slash_merged",
            "/api//reports/x",
            Batch,
            "/api/reports/x",
        ),
        to(
            "leading_double_slash_merged",
            "//reports/x",
            Batch,
            "/reports/x",
        ),
        to("single_dot_removed", "/a/./b", Public, "/a/b"),
        to("trailing_dotdot", "/reports/x/..", Batch, "/reports/"),
        to(
            "dot_then_dotdot",
            "/checkout/./../reports",
            Batch,
            "/reports",
        ),
        // Parameters on ordinary segments are the backend's business (jsessionid): kept
        // in the forwarded path, ignored for routing.
        to(
            "parameter_on_segment_kept",
            "/cart;jsessionid=1/items",
            Batch,
            "/cart;jsessionid=1/items",
        ),
        to(
            "parameter_on_last_segment",
            "/reports;v=1",
            Batch,
            "/reports;v=1",
        ),
        // An encoded `;` is data, not a parameter: `/reports%3Bv=1` is not under /reports.
        to(
            "encoded_semicolon_is_not_a_parameter",
            "/reports%3bv=1",
            Public,
            "/reports%3Bv=1",
        ),
        // The query is not part of the path (RFC 3986 §3.4): forwarded byte for byte.
        to(
            "query_untouched",
            "/reports/x?a=../b&c=%2f&d=%7e",
            Batch,
            "/reports/x?a=../b&c=%2f&d=%7e",
        ),
        to(
            "prefix_boundary_respected",
            "/reportsx",
            Public,
            "/reportsx",
        ),
    ]
}

/// Rule 5: targets refused with 400, never forwarded.
pub fn refused_targets() -> Vec<Case> {
    let bad = |name, target: &str| refused(name, &get(target, PUBLIC), &[400]);
    vec![
        // Above the root: nginx answers 400 too.
        bad("dotdot_above_root", "/../../etc/passwd"),
        bad("encoded_dotdot_above_root", "/%2e%2e/"),
        bad("dotdot_past_root_midway", "/a/../../b"),
        bad("dotdot_semicolon_above_root", "/..;/checkout"),
        // An encoded slash or backslash is a separator to some backends (Tomcat with
        // ALLOW_ENCODED_SLASH, IIS) and data to others: never let the two disagree.
        bad("encoded_slash_lower", "/reports%2fx"),
        bad("encoded_slash_upper", "/checkout%2F..%2Freports"),
        bad("encoded_backslash_upper", "/checkout%5C..%5Creports"),
        bad("encoded_backslash_lower", "/a%5cb"),
        // A raw backslash is not allowed in a URI (RFC 3986 §2); Windows servers treat it as '/'.
        bad("raw_backslash", "/checkout\\..\\reports"),
        bad("encoded_nul", "/a%00b"),
        // RFC 9112 §3.2: asterisk-form is for OPTIONS, authority-form for CONNECT.
        bad("asterisk_form_for_get", "*"),
        bad("authority_form_for_get", "public.example:80"),
        // An absolute-form target with another scheme (nginx: 400).
        bad("absolute_form_unknown_scheme", "ttp://internal.example/x"),
        bad("relative_target", "reports/x").by_parser(),
        // RFC 9112 §3.2: a request-target has no fragment; '#' makes the line invalid.
        bad("fragment_in_target", "/reports#x"),
        bad(
            "dotdot_in_absolute_form_above_root",
            "http://public.example/../x",
        ),
        bad(
            "encoded_slash_in_absolute_form",
            "http://internal.example/a%2Fb",
        ),
    ]
}
