//! Unit tests of the config loader: defaults, each validation rule, and line numbers.

use super::*;

/// A valid document. Text appended to it starts at line 8, inside the `[[upstream]]` table.
const BASE: &str = r#"[[route]]
name = "all"
path_prefix = "/"
upstream = "app"
[[upstream]]
name = "app"
backends = ["127.0.0.1:8081"]
"#;

fn doc(extra: &str) -> String {
    format!("{BASE}{extra}")
}

fn parse(text: &str) -> Config {
    Config::parse(text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn errors(text: &str) -> Vec<(usize, String)> {
    match Config::parse(text, "test.toml") {
        Ok(c) => panic!("expected errors, got {c:#?}"),
        Err(e) => e.errors.into_iter().map(|e| (e.line, e.message)).collect(),
    }
}

/// Asserts exactly one error, at `line`, whose message contains `fragment`.
#[track_caller]
fn one_error(text: &str, line: usize, fragment: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].0, line, "{errs:#?}");
    assert!(
        errs[0].1.contains(fragment),
        "{:?} lacks {fragment:?}",
        errs[0].1
    );
}

#[test]
fn defaults_are_applied() {
    let c = parse(BASE);
    assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(c.server.probe_paths, vec!["/healthz".to_string()]);
    assert_eq!(c.server.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(75));
    assert_eq!(c.server.max_header_bytes, 64 * 1024);
    assert_eq!(c.server.max_body_bytes, Some(100 * 1024 * 1024));
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.server, ServerConfig::default());
    assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
    assert!(c.sim.is_none());

    let u = c.upstream("app").unwrap();
    assert_eq!(u.backends, vec!["127.0.0.1:8081".to_string()]);
    assert_eq!(u.max_workers, 200);
    assert_eq!(u.connect_timeout, Duration::from_secs(1));
    assert_eq!(u.response_header_timeout, Duration::from_secs(30));
    assert_eq!(u.idle_timeout, Duration::from_secs(4));
    assert_eq!(u.max_idle_per_backend, 256);
    let h = &u.health;
    assert!(h.enabled);
    assert_eq!(h.path, "/actuator/health");
    assert_eq!(h.interval, Duration::from_secs(2));
    assert_eq!(h.timeout, Duration::from_secs(1));
    assert_eq!((h.rise, h.fall), (2, 3));
    assert!(
        !c.server.readiness.requires("app"),
        "no upstream is required for readiness by default"
    );

    let r = &c.routes[0];
    assert_eq!(
        (r.name.as_str(), r.path_prefix.as_str(), r.upstream.as_str()),
        ("all", "/", "app")
    );
    assert_eq!(r.host, None);
    assert_eq!(r.class, RouteClass::Normal);
    assert_eq!(r.cache, CachePolicy::Off);
}

#[test]
fn every_key_is_read() {
    let c = parse(
        r#"
[server]
listen = ["0.0.0.0:80", "[::1]:80"]
probe_paths = ["/healthz", "/livez"]
drain_timeout_ms = 0
shutdown_delay_ms = 0
underscores_in_headers = true
trusted_proxies = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]
forwarded = "on"
send_timeout_ms = 7000
http2_max_concurrent_streams = 8
request_buffer_bytes = 0
body_read_timeout_ms = 9000
body_min_rate = 0
header_read_timeout_ms = 2000
idle_timeout_ms = 620000
max_header_bytes = 16384
max_body_bytes = 0
max_connections = 5
worker_threads = 3
[admin]
listen = "127.0.0.1:9000"
[[upstream]]
name = "shop_api-2"
backends = ["10.0.0.1:8080", "backend.internal:8080", "[::1]:8080"]
max_workers = 50
connect_timeout_ms = 250
response_header_timeout_ms = 5000
idle_timeout_ms = 3000
max_idle_per_backend = 0
required_for_readiness = true
health = { enabled = false, path = "/ping", interval_ms = 500, timeout_ms = 499, rise = 1, fall = 1 }
[[route]]
name = "orders"
host = "API.Example.com"
path_prefix = "/api/orders"
upstream = "shop_api-2"
class = "sheddable"
cache = "on"
[[route]]
name = "wild"
host = "*.example.com"
path_prefix = "/"
upstream = "shop_api-2"
class = "critical"
[sim]
workers = 3
"#,
    );
    assert_eq!(c.server.listen.len(), 2);
    assert_eq!(c.server.probe_paths, vec!["/healthz", "/livez"]);
    assert_eq!(c.server.drain_timeout, Duration::ZERO);
    assert_eq!(c.server.shutdown_delay, Duration::ZERO, "0 is no delay");
    assert!(c.server.underscores_in_headers);
    assert_eq!(c.server.trusted_proxies.len(), 3);
    assert!(c.server.trusted_proxies[0].contains("10.9.8.7".parse().unwrap()));
    assert_eq!(c.server.forwarded, crate::config::ForwardedHeader::On);
    assert_eq!(c.server.send_timeout, Duration::from_secs(7));
    assert_eq!(c.server.http2_max_concurrent_streams, 8);
    assert_eq!(c.server.request_buffer_bytes, 0);
    assert_eq!(c.server.upload.read_timeout, Duration::from_secs(9));
    assert_eq!(c.server.upload.min_rate, 0);
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(620));
    assert_eq!(c.server.max_header_bytes, 16384);
    assert_eq!(c.server.max_body_bytes, None, "0 is no limit");
    assert_eq!(c.server.max_connections, 5);
    assert_eq!(c.server.worker_threads, 3);
    assert_eq!(c.admin.listen.port(), 9000);
    let u = &c.upstreams[0];
    assert_eq!(u.name, "shop_api-2");
    assert_eq!(u.backends.len(), 3);
    assert_eq!(u.max_workers, 50);
    assert_eq!(u.connect_timeout, Duration::from_millis(250));
    assert_eq!(u.response_header_timeout, Duration::from_secs(5));
    assert_eq!(u.idle_timeout, Duration::from_secs(3));
    assert_eq!(u.max_idle_per_backend, 0);
    assert!(!u.health.enabled);
    assert_eq!(u.health.path, "/ping");
    assert_eq!(u.health.timeout, Duration::from_millis(499));
    assert_eq!((u.health.rise, u.health.fall), (1, 1));
    assert_eq!(c.server.readiness.required, vec!["shop_api-2"]);
    let r = &c.routes[0];
    assert_eq!(
        r.host.as_deref(),
        Some("api.example.com"),
        "hosts are lowercased"
    );
    assert_eq!(r.class, RouteClass::Sheddable);
    assert_eq!(r.cache, CachePolicy::On);
    assert_eq!(c.routes[1].class, RouteClass::Critical);
    assert_eq!(c.sim.as_ref().map(|s| s.workers), Some(3));
}

#[test]
fn inline_arrays_of_tables_are_accepted() {
    let c = parse(
        r#"
upstream = [{ name = "a", backends = ["127.0.0.1:1"] }]
route = [{ name = "r", path_prefix = "/", upstream = "a" }]
"#,
    );
    assert_eq!(c.routes[0].upstream, "a");
}

#[test]
fn the_issue_example_reports_three_errors_with_their_lines() {
    let text = r#"
[[upstream]]
name = "app"
backends = ["127.0.0.1:8081"]

[[route]]
name = "orders"
path_prefix = "/api/orders"
upstream = "app"
colour = "red"

[[route]]
name = "reports"
path_prefix = "/api/reports"
upstream = "app"
class = "batch"

[[route]]
name = "checkout"
path_prefix = "/api/checkout"
upstream = "ap"
"#;
    let errs = errors(text);
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![10, 16, 21], "{errs:#?}");
    assert!(
        errs[0].1.contains("route \"orders\": unknown key `colour`"),
        "{}",
        errs[0].1
    );
    assert!(
        errs[1]
            .1
            .contains("route \"reports\": class: unknown value `batch`"),
        "{}",
        errs[1].1
    );
    assert_eq!(
        errs[2].1,
        "route \"checkout\": upstream \"ap\" is not defined (known: app)"
    );
}

#[test]
fn errors_are_sorted_by_line() {
    let text = doc("max_workers = 0\n[server]\nbogus = 1\n[[route]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"app\"\n");
    let lines: Vec<usize> = errors(&text).iter().map(|e| e.0).collect();
    // The extra route repeats both the name and the path_prefix of the first: lines 12 and 13.
    assert_eq!(lines, vec![8, 10, 12, 13], "unsorted or wrong: {lines:?}");
}

#[test]
fn syntax_error_reports_its_line() {
    one_error(
        "[server]\nlisten = [\"127.0.0.1:8080\"\n\n[admin]\n",
        4,
        "TOML syntax error",
    );
    one_error(&doc("max_workers = = 3\n"), 8, "TOML syntax error");
    one_error(&doc("name = \"again\"\n"), 8, "TOML syntax error");
}

#[test]
fn display_names_origin_and_line() {
    let e = Config::parse(&doc("max_workers = 0\n"), "conf/x.toml").unwrap_err();
    let shown = e.to_string();
    assert!(shown.starts_with("conf/x.toml: 1 error(s)"), "{shown}");
    assert!(
        shown.contains("conf/x.toml:8: upstream \"app\": max_workers must be greater than 0"),
        "{shown}"
    );
}

#[test]
fn unknown_keys_are_errors_everywhere() {
    one_error(
        &doc("colour = 1\n"),
        8,
        "upstream \"app\": unknown key `colour`",
    );
    one_error(
        &doc("[upstream.health]\nintervall_ms = 5\n"),
        9,
        "health: unknown key `intervall_ms`",
    );
    one_error(
        &doc("health = { bogus = true }\n"),
        8,
        "health: unknown key `bogus`",
    );
    one_error(
        &doc("[server]\nlisten_on = []\n"),
        9,
        "[server]: unknown key `listen_on`",
    );
    one_error(
        &doc("[admin]\nport = 1\n"),
        9,
        "[admin]: unknown key `port`",
    );
    one_error(
        &doc("[sim]\nthreads = 1\n"),
        9,
        "[sim]: unknown key `threads`",
    );
    one_error(&doc("[cache]\nsize = 1\n"), 8, "unknown section `cache`");
}

#[test]
fn every_bad_key_of_one_section_is_reported() {
    let errs = errors(&doc(
        "max_workers = \"many\"\nidle_timeout_ms = -1\nfoo = 1\n",
    ));
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![8, 9, 10], "{errs:#?}");
}

#[test]
fn wrong_types_are_errors() {
    one_error(
        &doc("max_workers = \"200\"\n"),
        8,
        "max_workers: invalid type: string \"200\", expected u32",
    );
    one_error(
        &doc("[[upstream]]\nname = \"b\"\nbackends = \"127.0.0.1:1\"\n"),
        10,
        "backends: invalid type",
    );
    one_error(&doc("health = 5\n"), 8, "health: invalid type");
    one_error(
        &doc("[server]\ndrain_timeout_ms = 1.5\n"),
        9,
        "drain_timeout_ms: invalid type",
    );
    one_error(
        &doc("[server]\nprobe_paths = [\"/a\", 1]\n"),
        9,
        "probe_paths[1]: invalid type",
    );
}

#[test]
fn a_key_dropped_for_its_type_is_not_also_missing() {
    let text = "[[upstream]]\nname = 7\nbackends = [\"a:1\"]\n[[route]]\nname = \"r\"\npath_prefix = 3\nupstream = \"x\"\n";
    let errs = errors(text);
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![2, 6, 7], "{errs:#?}");
}

#[test]
fn bad_socket_addresses_are_errors() {
    one_error(
        &doc("[server]\nlisten = [\"127.0.0.1:8080\", \"localhost:80\"]\n"),
        9,
        "listen[1]: invalid socket address syntax",
    );
    one_error(
        &doc("[admin]\nlisten = \"9901\"\n"),
        9,
        "[admin]: listen: invalid socket address syntax",
    );
    one_error(
        &doc("[sim]\nlisten = \"x\"\n"),
        9,
        "[sim]: listen: invalid socket address",
    );
}

#[test]
fn zero_counts_and_timeouts_are_errors() {
    for key in [
        "connect_timeout_ms",
        "response_header_timeout_ms",
        "idle_timeout_ms",
    ] {
        one_error(
            &doc(&format!("{key} = 0\n")),
            8,
            &format!("{key} must be greater than 0"),
        );
    }
    one_error(
        &doc("max_workers = 0\n"),
        8,
        "max_workers must be greater than 0",
    );
    one_error(
        &doc("[upstream.health]\ninterval_ms = 0\n"),
        9,
        "health.interval_ms must be greater than 0",
    );
    one_error(
        &doc("[upstream.health]\ntimeout_ms = 0\n"),
        9,
        "health.timeout_ms must be greater than 0",
    );
    one_error(
        &doc("health.rise = 0\n"),
        8,
        "health.rise must be at least 1",
    );
    one_error(
        &doc("health.fall = 0\n"),
        8,
        "health.fall must be at least 1",
    );
    // Zero is allowed where it means "none".
    parse(&doc(
        "max_idle_per_backend = 0\n[server]\ndrain_timeout_ms = 0\n",
    ));
}

#[test]
fn health_timeout_must_be_below_interval() {
    one_error(
        &doc("[upstream.health]\ninterval_ms = 1000\ntimeout_ms = 1000\n"),
        10,
        "health.timeout_ms (1000) must be less than health.interval_ms (1000)",
    );
    one_error(
        &doc("health.interval_ms = 500\n"),
        8,
        "must be less than health.interval_ms (500)",
    );
}

#[test]
fn health_path_rules() {
    one_error(
        &doc("health.path = \"/\"\n"),
        8,
        "health.path must not be \"/\"",
    );
    one_error(
        &doc("health.path = \"actuator/health\"\n"),
        8,
        "must start with '/'",
    );
}

#[test]
fn missing_required_keys_are_reported_at_the_header() {
    let text = "[[upstream]]\nmax_workers = 5\n\n[[route]]\nclass = \"normal\"\n";
    let errs = errors(text);
    let got: Vec<(usize, bool)> = errs
        .iter()
        .map(|e| (e.0, e.1.contains("missing key")))
        .collect();
    assert_eq!(
        got,
        vec![(1, true), (1, true), (4, true), (4, true), (4, true)],
        "{errs:#?}"
    );
    assert!(
        errs[0].1.starts_with("[[upstream]] #1: missing key `name`"),
        "{}",
        errs[0].1
    );
}

#[test]
fn upstream_names_backends_and_duplicates() {
    one_error(
        &doc("[[upstream]]\nname = \"App\"\nbackends = [\"a:1\"]\n"),
        9,
        "name \"App\" must be non-empty and use only a-z",
    );
    one_error(
        &doc("[[upstream]]\nname = \"app\"\nbackends = [\"a:1\"]\n"),
        9,
        "name \"app\" is already used by the upstream at line 6",
    );
    one_error(
        &doc("[[upstream]]\nname = \"b\"\nbackends = []\n"),
        10,
        "backends is empty",
    );
    for (backend, why) in [
        ("http://a:80", "must not have a scheme"),
        ("a:80/x", "must not have a path"),
        ("a", "has no port"),
        ("::1:80", "has no port"),
        ("a:0", "is not a port number"),
        ("a:65536", "is not a port number"),
        (":80", "has no valid host"),
    ] {
        one_error(
            &doc(&format!(
                "[[upstream]]\nname = \"b\"\nbackends = [\"a:1\", \"{backend}\"]\n"
            )),
            10,
            why,
        );
    }
    one_error(
        &doc("[[upstream]]\nname = \"b\"\nbackends = [\"a:1\",\n  \"a:1\"]\n"),
        11,
        "listed twice",
    );
}

#[test]
fn route_rules() {
    let route = |body: &str| doc(&format!("[[route]]\n{body}"));
    one_error(
        &route("name = \"all\"\npath_prefix = \"/x\"\nupstream = \"app\"\n"),
        9,
        "route \"all\": name \"all\" is already used by the route at line 2",
    );
    one_error(
        &route("name = \"b\"\npath_prefix = \"x\"\nupstream = \"app\"\n"),
        10,
        "path_prefix \"x\" must start with '/'",
    );
    one_error(
        &route("name = \"b\"\npath_prefix = \"/\"\nupstream = \"app\"\n"),
        10,
        "same as route \"all\" (line 3)",
    );
    one_error(&route("name = \"b\"\nhost = \"a.example.com:8080\"\npath_prefix = \"/\"\nupstream = \"app\"\n"), 10, "must not have a port");
    one_error(
        &route("name = \"b\"\nhost = \"a..com\"\npath_prefix = \"/\"\nupstream = \"app\"\n"),
        10,
        "is not a host name",
    );
    one_error(
        &route("name = \"b\"\nhost = \"*.\"\npath_prefix = \"/\"\nupstream = \"app\"\n"),
        10,
        "is not a host name",
    );
    one_error(
        &route("name = \"b\"\npath_prefix = \"/b\"\nupstream = \"app\"\ncache = \"yes\"\n"),
        12,
        "cache: unknown value `yes`",
    );
    // The same prefix on different hosts is fine; hosts compare case-insensitively.
    parse(&route(
        "name = \"b\"\nhost = \"A.example.com\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
    ));
    one_error(
        &route("name = \"b\"\nhost = \"a.example.com\"\npath_prefix = \"/\"\nupstream = \"app\"\n[[route]]\nname = \"c\"\nhost = \"A.EXAMPLE.com\"\npath_prefix = \"/\"\nupstream = \"app\"\n"),
        16,
        "same as route \"b\"",
    );
}

#[test]
fn at_least_one_upstream_and_one_route() {
    let errs = errors("[server]\n");
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].1.contains("no [[upstream]] is defined"));
    assert!(errs[1].1.contains("no [[route]] is defined"));

    let errs = errors("[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"app\"\n");
    let got: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(got, vec![1, 4], "{errs:#?}");
    assert!(errs[1]
        .1
        .ends_with("upstream \"app\" is not defined (no [[upstream]] is defined)"));
}

#[test]
fn single_tables_where_arrays_are_expected() {
    let text = "[upstream]\nname = \"app\"\n[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"app\"\n";
    let errs = errors(text);
    assert!(
        errs.iter()
            .any(|e| e.0 == 1 && e.1.contains("write [[upstream]] (double brackets)")),
        "{errs:#?}"
    );
}

#[test]
fn listen_addresses_must_not_clash() {
    one_error(
        &doc("[server]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:9901\"]\n"),
        9,
        "listen[1] 127.0.0.1:9901 clashes with [admin] listen",
    );
    one_error(
        &doc("[server]\nlisten = [\"0.0.0.0:7000\"]\n[admin]\nlisten = \"127.0.0.1:7000\"\n"),
        9,
        "clashes with [admin] listen",
    );
    one_error(
        &doc("[admin]\nlisten = \"127.0.0.1:8080\"\n"),
        9,
        "clashes with the default [server] listen",
    );
    one_error(
        &doc("[server]\nlisten = [\"127.0.0.1:80\", \"127.0.0.1:80\"]\n"),
        9,
        "clashes with listen[0]",
    );
    one_error(&doc("[server]\nlisten = []\n"), 9, "listen is empty");
    one_error(
        &doc("[sim]\nlisten = \"127.0.0.1:9901\"\n"),
        9,
        "[sim]: listen 127.0.0.1:9901 clashes with [admin] listen",
    );
    // Port 0 (a free port each) never clashes: tests bind everything to 127.0.0.1:0.
    parse(&doc("[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[sim]\nlisten = \"127.0.0.1:0\"\n"));
}

#[test]
fn probe_paths_start_with_a_slash() {
    one_error(
        &doc("[server]\nprobe_paths = [\"/healthz\",\n  \"ready\"]\n"),
        10,
        "probe_paths[1] \"ready\" must start with '/'",
    );
}

#[test]
fn sim_section_is_checked() {
    let text = doc("[sim]\nworkers = 0\n[[sim.routes]]\npath_prefix = \"/a\"\n[[sim.routes]]\nservice_time_ms = 5\n[[sim.routes]]\npath_prefix = \"b\"\n");
    let errs = errors(&text);
    let got: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(got, vec![9, 12], "{errs:#?}");
    assert!(errs[0].1.contains("workers must be greater than 0"));
    assert!(
        errs[1].1.contains("routes[1]: missing key `path_prefix`"),
        "{}",
        errs[1].1
    );
    one_error(
        &doc("[sim]\n[[sim.routes]]\npath_prefix = \"b\"\n"),
        9,
        "routes[0].path_prefix \"b\" must start with '/'",
    );
    one_error(
        &doc("[sim]\ndistribution = \"normal\"\n"),
        9,
        "distribution: unknown value `normal`",
    );
}

#[test]
fn sim_service_times_must_fit_the_simulated_backend() {
    // What the backend accepts, config accepts: 0 up to one hour.
    let c = parse(&doc(
        "[sim]\nservice_time_ms = 3600000\n[[sim.routes]]\npath_prefix = \"/a\"\nservice_time_ms = 0\n",
    ));
    assert_eq!(c.sim.unwrap().service_time_ms, SIM_MAX_SERVICE_TIME_MS);
    for bad in ["1e300", "3600000.5", "nan", "inf", "-inf", "-1"] {
        one_error(
            &doc(&format!("[sim]\nservice_time_ms = {bad}\n")),
            9,
            "service_time_ms = ",
        );
    }
    one_error(
        &doc("[sim]\nservice_time_ms = 1e300\n"),
        9,
        "[sim]: service_time_ms = 1e300 must be a number of milliseconds from 0 to 3600000",
    );
    // A route's service time is reported at its own line, not its table's.
    let errs = errors(&doc(
        "[sim]\n[[sim.routes]]\npath_prefix = \"/a\"\nservice_time_ms = nan\n\
         [[sim.routes]]\npath_prefix = \"/b\"\nservice_time_ms = -5\n",
    ));
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![11, 14], "{errs:#?}");
    assert!(
        errs[0]
            .1
            .contains("routes[0].service_time_ms = NaN must be"),
        "{}",
        errs[0].1
    );
    assert!(
        errs[1]
            .1
            .contains("routes[1].service_time_ms = -5.0 must be"),
        "{}",
        errs[1].1
    );
}

#[test]
fn required_for_readiness_is_collected_per_upstream() {
    let c = parse(&doc(
        "required_for_readiness = false\n\
         [[upstream]]\nname = \"pay\"\nbackends = [\"127.0.0.1:8082\"]\nrequired_for_readiness = true\n\
         [[upstream]]\nname = \"reports\"\nbackends = [\"127.0.0.1:8083\"]\n",
    ));
    assert_eq!(c.server.readiness.required, vec!["pay"]);
    assert!(c.server.readiness.requires("pay"));
    assert!(!c.server.readiness.requires("app"));
    assert!(!c.server.readiness.requires("reports"));
    // Kept out of the upstream's own config, so turning it on does not rebuild the upstream.
    assert_eq!(c.upstream("app"), parse(BASE).upstream("app"));
    one_error(
        &doc("required_for_readiness = \"yes\"\n"),
        8,
        "upstream \"app\": required_for_readiness: invalid type: string \"yes\", expected a boolean",
    );
}

#[test]
fn the_demo_loads() {
    let c = Config::demo();
    assert_eq!(c.upstream("app").map(|u| u.max_workers), Some(20));
    assert!(c.sim.is_some());
}

#[test]
fn retry_table_defaults_and_overrides() {
    let u = parse(BASE).upstream("app").unwrap().clone();
    assert_eq!(u.retry, RetryConfig::default());
    assert_eq!(u.retry.connect_attempts, 3);
    assert_eq!(u.retry.backoff_base, Duration::from_millis(100));
    assert_eq!(u.retry.backoff_cap, Duration::from_secs(1));
    assert_eq!(u.retry.idempotent_methods.len(), 5);

    let c = parse(&doc(
        "[upstream.retry]\nconnect_attempts = 1\nbackoff_base_ms = 50\nbackoff_cap_ms = 400\n\
         idempotent_methods = [\"GET\", \"PROPFIND\"]\neject_after_connect_failures = 0\neject_ms = 2000\n",
    ));
    let r = &c.upstream("app").unwrap().retry;
    assert_eq!(r.connect_attempts, 1);
    assert_eq!(r.backoff_base, Duration::from_millis(50));
    assert_eq!(r.backoff_cap, Duration::from_millis(400));
    assert_eq!(
        r.idempotent_methods,
        vec![
            http::Method::GET,
            http::Method::from_bytes(b"PROPFIND").unwrap()
        ]
    );
    assert_eq!(r.eject_after_connect_failures, 0);
    assert_eq!(r.eject_duration, Duration::from_secs(2));

    // An empty list is valid: it turns off the replay of written requests.
    let c = parse(&doc("[upstream.retry]\nidempotent_methods = []\n"));
    assert!(c
        .upstream("app")
        .unwrap()
        .retry
        .idempotent_methods
        .is_empty());
}

#[test]
fn retry_table_errors() {
    one_error(
        &doc("[upstream.retry]\nconnect_attempts = 0\n"),
        9,
        "retry.connect_attempts must be at least 1",
    );
    one_error(
        &doc("[upstream.retry]\nbackoff_base_ms = 500\nbackoff_cap_ms = 100\n"),
        10,
        "must not be less than retry.backoff_base_ms (500)",
    );
    one_error(
        &doc("retry.idempotent_methods = [\"GET\", \"NOT A METHOD\"]\n"),
        8,
        "retry.idempotent_methods[1] \"NOT A METHOD\" is not an HTTP method",
    );
    one_error(
        &doc("[upstream.retry]\neject_ms = 0\n"),
        9,
        "retry.eject_ms must be greater than 0",
    );
}

#[test]
fn client_protection_keys_are_checked_with_their_lines() {
    let text = doc(
        "[server]\nheader_read_timeout_ms = 0\nidle_timeout_ms = 0\nmax_header_bytes = 4096\nmax_connections = 0\n",
    );
    let errs = errors(&text);
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![9, 10, 11, 12], "{errs:#?}");
    assert!(errs[0]
        .1
        .contains("header_read_timeout_ms must be greater than 0"));
    assert!(errs[1].1.contains("idle_timeout_ms must be greater than 0"));
    assert!(errs[2].1.contains("between 8192"), "{}", errs[2].1);
    assert!(errs[3].1.contains("max_connections must be greater than 0"));
    one_error(
        &doc("[server]\nmax_header_bytes = 1048576\n"),
        9,
        "request-smuggling check",
    );
    one_error(
        &doc("[server]\nworker_threads = 5000\n"),
        9,
        "worker_threads = 5000 is more than 1024",
    );
}

#[test]
fn cache_keys_defaults_and_overrides() {
    let r = &parse(BASE).routes[0];
    assert_eq!(r.cache_settings, CacheSettings::default());
    let s = &r.cache_settings;
    assert_eq!(s.max_bytes, 64 << 20);
    assert_eq!(s.max_object_bytes, 1 << 20);
    assert!(!s.generate_etag);
    assert_eq!(s.stale_on_shed, None);
    assert_eq!(s.stale_if_error, None);
    assert_eq!(s.stale_while_revalidate, None);
    assert!(!s.store_set_cookie);
    assert_eq!(s.coalesce_timeout, Duration::from_secs(5));

    let c = parse(&doc(
        "[[route]]\nname = \"c\"\npath_prefix = \"/c\"\nupstream = \"app\"\ncache = \"on\"\n\
         cache_max_bytes = 1000000\ncache_max_object_bytes = 2048\ncache_generate_etag = true\n\
         cache_stale_on_shed_ms = 30000\ncache_stale_if_error_ms = 300000\ncache_stale_while_revalidate_ms = 10000\n\
         cache_store_set_cookie = true\ncache_coalesce_timeout_ms = 0\n\
         cache_control_field = \"CDN-Cache-Control\"\n",
    ));
    let r = c.routes.iter().find(|r| r.name == "c").unwrap();
    assert_eq!(r.cache, CachePolicy::On);
    let s = &r.cache_settings;
    assert_eq!(s.max_bytes, 1_000_000);
    assert_eq!(s.max_object_bytes, 2048);
    assert!(s.generate_etag);
    assert_eq!(s.stale_on_shed, Some(Duration::from_secs(30)));
    assert_eq!(s.stale_if_error, Some(Duration::from_secs(300)));
    assert_eq!(s.stale_while_revalidate, Some(Duration::from_secs(10)));
    assert!(s.store_set_cookie);
    assert_eq!(s.coalesce_timeout, Duration::ZERO, "0 turns coalescing off");
    assert_eq!(
        s.targeted_field,
        Some(http::HeaderName::from_static("cdn-cache-control"))
    );

    // Left out, the object limit follows a cache smaller than its default down.
    let c = parse(&doc(
        "[[route]]\nname = \"c\"\npath_prefix = \"/c\"\nupstream = \"app\"\ncache_max_bytes = 4096\n",
    ));
    let s = &c
        .routes
        .iter()
        .find(|r| r.name == "c")
        .unwrap()
        .cache_settings;
    assert_eq!((s.max_bytes, s.max_object_bytes), (4096, 4096));
}

#[test]
fn cache_key_errors() {
    let route = |keys: &str| {
        doc(&format!(
            "[[route]]\nname = \"c\"\npath_prefix = \"/c\"\nupstream = \"app\"\ncache = \"on\"\n{keys}"
        ))
    };
    // The route's keys start at line 13.
    one_error(
        &route("cache_max_bytes = 0\n"),
        13,
        "route \"c\": cache_max_bytes must be greater than 0",
    );
    one_error(
        &route("cache_max_bytes = 1000000\ncache_max_object_bytes = 2000000\n"),
        14,
        "cache_max_object_bytes (2000000) must not exceed cache_max_bytes (1000000)",
    );
    one_error(
        &route("cache_max_bytes = 1000000000\ncache_max_object_bytes = 100000000\n"),
        14,
        "cache_max_object_bytes must be at most 67107840",
    );
    one_error(
        &route("cache_max_bytes = -1\n"),
        13,
        "cache_max_bytes: invalid value",
    );
    one_error(
        &route("cache_stale_on_shed_ms = \"1m\"\n"),
        13,
        "cache_stale_on_shed_ms: invalid type",
    );
    one_error(
        &route("cache_generate_etag = \"yes\"\n"),
        13,
        "cache_generate_etag: invalid type",
    );
    one_error(
        &route("cache_store_set_cookie = 1\n"),
        13,
        "cache_store_set_cookie: invalid type",
    );
    one_error(
        &route("cache_coalesce_timeout_ms = 1.5\n"),
        13,
        "cache_coalesce_timeout_ms: invalid type",
    );
    one_error(&route("cache_size = 1\n"), 13, "unknown key `cache_size`");
    one_error(
        &route("cache_control_field = \"CDN Cache Control\"\n"),
        13,
        "cache_control_field \"CDN Cache Control\" is not a header field name",
    );
    one_error(
        &route("cache_control_field = \"cache-control\"\n"),
        13,
        "names a field the cache already reads",
    );
    // Every error at once, each at its line.
    let errs = errors(&route(
        "cache_max_bytes = 0\ncache_generate_etag = 2\ncache_coalesce_timeout_ms = -5\n",
    ));
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![13, 14, 15], "{errs:#?}");
}

#[test]
fn a_bad_trusted_proxy_is_reported_at_its_line() {
    one_error(
        &doc("[server]\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n]\n"),
        11,
        "trusted_proxies[1]: \"10.0.0.0/33\": the prefix length must be 0 to 32",
    );
}

#[test]
fn forwarded_is_off_or_on() {
    assert_eq!(
        parse(BASE).server.forwarded,
        crate::config::ForwardedHeader::Off
    );
    one_error(
        &doc("[server]\nforwarded = \"rfc7239\"\n"),
        9,
        "expected `off` or `on`",
    );
}

/// An upstream, then one route with `route` appended to its keys (the route's keys start
/// at line 5, what is appended at line 8).
fn rewrite_doc(route: &str) -> String {
    format!(
        "[[upstream]]\nname = \"app\"\nbackends = [\"127.0.0.1:8081\"]\n[[route]]\n\
         name = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"app\"\n{route}"
    )
}

#[test]
fn rewrite_keys_are_read() {
    let c = parse(&rewrite_doc(
        r#"strip_path_prefix = true
[route.request_headers]
remove = ["X-Debug"]
set = { "X-Forwarded-Proto" = "https", "X-Env" = "prod" }
add = { "X-Tag" = ["a", "b"] }
[route.response_headers]
set = { "Access-Control-Allow-Origin" = "https://shop.example" }
remove = ["Server", "Cache-Status"]
"#,
    ));
    let r = &c.routes[0].rewrite;
    assert!(r.strip_path_prefix);
    let names = |list: &[(http::HeaderName, Vec<http::HeaderValue>)]| {
        list.iter()
            .map(|(n, v)| format!("{n}={v:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(r.request_headers.remove, vec!["x-debug"]);
    assert_eq!(
        names(&r.request_headers.set),
        vec!["x-env=[\"prod\"]", "x-forwarded-proto=[\"https\"]"]
    );
    assert_eq!(names(&r.request_headers.add), vec!["x-tag=[\"a\", \"b\"]"]);
    assert_eq!(r.response_headers.remove, vec!["server", "cache-status"]);
    assert_eq!(
        names(&r.response_headers.set),
        vec!["access-control-allow-origin=[\"https://shop.example\"]"]
    );
}

#[test]
fn rewrites_are_off_by_default() {
    let r = &parse(BASE).routes[0].rewrite;
    assert!(!r.strip_path_prefix);
    assert!(r.request_headers.is_empty() && r.response_headers.is_empty());
    assert_eq!(*r, RouteRewrite::default());
}

#[test]
fn rewrite_location_is_on_with_stripping_and_an_error_without_it() {
    let routes = parse(&doc(
        "[[route]]\nname = \"x\"\npath_prefix = \"/x\"\nupstream = \"app\"\n\
         strip_path_prefix = true\n\
         [[route]]\nname = \"y\"\npath_prefix = \"/y\"\nupstream = \"app\"\n\
         strip_path_prefix = true\nrewrite_location = false\n",
    ))
    .routes;
    let x = routes.iter().find(|r| r.name == "x").unwrap();
    let y = routes.iter().find(|r| r.name == "y").unwrap();
    assert!(x.rewrite.rewrite_location);
    assert!(!y.rewrite.rewrite_location);
    one_error(
        &doc(
            "[[route]]\nname = \"x\"\npath_prefix = \"/x\"\nupstream = \"app\"\n\
             rewrite_location = true\n",
        ),
        12,
        "rewrite_location applies to a route with strip_path_prefix = true",
    );
}

#[test]
fn stripping_needs_a_prefix_to_strip() {
    one_error(
        &doc(
            "[[route]]\nname = \"x\"\nhost = \"x.example\"\npath_prefix = \"/\"\n\
             upstream = \"app\"\nstrip_path_prefix = true\n",
        ),
        13,
        "would strip nothing",
    );
    // A route without path_prefix is reported once for it, and once for the stripping.
    let errs = errors(&doc(
        "[[route]]\nname = \"x\"\nupstream = \"app\"\nstrip_path_prefix = true\n",
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!(errs[0].0, 8);
    assert!(errs[0].1.contains("missing key `path_prefix`"), "{errs:#?}");
    assert_eq!(errs[1].0, 11);
    assert!(errs[1].1.contains("strip_path_prefix needs"), "{errs:#?}");
}

#[test]
fn header_rules_that_would_break_framing_or_routing_are_errors() {
    for (table, rule, fragment) in [
        (
            "request_headers",
            "set = { \"Host\" = \"other\" }",
            "routed on",
        ),
        (
            "request_headers",
            "remove = [\"Content-Length\"]",
            "frames the message",
        ),
        (
            "request_headers",
            "add = { \"Transfer-Encoding\" = \"chunked\" }",
            "frames",
        ),
        (
            "request_headers",
            "set = { \"Connection\" = \"close\" }",
            "one connection",
        ),
        (
            "request_headers",
            "remove = [\"Upgrade\"]",
            "one connection",
        ),
        (
            "request_headers",
            "set = { \"Expect\" = \"100-continue\" }",
            "100 Continue",
        ),
        (
            "request_headers",
            "set = { \"If-None-Match\" = \"\\\"a\\\"\" }",
            "conditional",
        ),
        (
            "response_headers",
            "set = { \"Content-Length\" = \"5\" }",
            "frames",
        ),
        ("response_headers", "remove = [\"Age\"]", "true age"),
        (
            "response_headers",
            "set = { \"Cache-Status\" = \"x\" }",
            "only be removed",
        ),
        (
            "response_headers",
            "remove = [\"keep-alive\"]",
            "one connection",
        ),
    ] {
        let text = rewrite_doc(&format!("[route.{table}]\n{rule}\n"));
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{rule}: {errs:#?}");
        assert_eq!(errs[0].0, 9, "{rule}: {errs:#?}");
        assert!(
            errs[0].1.contains("may not be changed") && errs[0].1.contains(fragment),
            "{rule}: {:?} lacks {fragment:?}",
            errs[0].1
        );
        assert!(errs[0].1.starts_with("route \"orders\": "), "{errs:#?}");
    }
}

#[test]
fn header_rule_names_and_values_are_checked_at_their_lines() {
    let errs = errors(&rewrite_doc(
        "[route.request_headers]\n\
         remove = [\n  \"X-Ok\",\n  \"Bad Name\",\n]\n\
         set = { \"X-A\" = \"line\\nbreak\" }\n\
         [route.response_headers]\n\
         add = { \"X-B\" = \" padded\" }\n\
         set = { \"X-C\" = [] }\n\
         remove = [\"x-d\", \"X-D\"]\n",
    ));
    let got: Vec<(usize, &str)> = errs.iter().map(|(l, m)| (*l, m.as_str())).collect();
    let expect = [
        (11, "\"Bad Name\" is not a header field name"),
        (13, "\"X-A\" value \"line\\nbreak\" must be printable ASCII"),
        (15, "\"X-B\" value \" padded\" has whitespace at an end"),
        (16, "\"X-C\" has no value"),
        (17, "\"X-D\" is listed twice in remove"),
    ];
    assert_eq!(got.len(), expect.len(), "{errs:#?}");
    for (line, fragment) in expect {
        assert!(
            got.iter().any(|(l, m)| *l == line && m.contains(fragment)),
            "no error at line {line} with {fragment:?}: {errs:#?}"
        );
    }
}

#[test]
fn a_header_rule_names_a_field_once() {
    one_error(
        &rewrite_doc("[route.response_headers]\nremove = [\"X-B\"]\nadd = { \"x-b\" = \"1\" }\n"),
        10,
        "\"x-b\" is also in response_headers.remove",
    );
    one_error(
        &rewrite_doc(
            "[route.request_headers]\nset = { \"X-B\" = \"1\" }\nadd = { \"X-B\" = \"2\" }\n",
        ),
        10,
        "\"X-B\" is also in request_headers.set",
    );
}

#[test]
fn header_rules_reject_unknown_keys_and_wrong_types() {
    one_error(
        &rewrite_doc("[route.request_headers]\nreplace = { \"X-A\" = \"1\" }\n"),
        9,
        "unknown key `replace`",
    );
    one_error(
        &rewrite_doc("[route.request_headers]\nset = { \"X-A\" = 1 }\n"),
        9,
        "a string or an array of strings",
    );
}

#[test]
fn websocket_keys_defaults_overrides_and_checks() {
    let c = parse(BASE);
    assert_eq!(c.server.upgrade_idle_timeout, Duration::from_secs(300));
    assert!(c.routes[0].websocket);
    let c = parse(&format!(
        "[[route]]\nname = \"ws\"\npath_prefix = \"/ws\"\nupstream = \"app\"\nwebsocket = false\n\
         {BASE}[server]\nupgrade_idle_timeout_ms = 45000\n"
    ));
    assert!(!c.routes[0].websocket);
    assert!(c.routes[1].websocket);
    assert_eq!(c.server.upgrade_idle_timeout, Duration::from_secs(45));
    one_error(
        &doc("[server]\nupgrade_idle_timeout_ms = 0\n"),
        9,
        "upgrade_idle_timeout_ms must be greater than 0",
    );
    one_error(
        &format!("{BASE}[[route]]\nname = \"ws\"\npath_prefix = \"/ws\"\nupstream = \"app\"\nwebsocket = \"yes\"\n"),
        12,
        "websocket: invalid type",
    );
}

#[test]
fn the_access_log_is_off_without_a_path() {
    assert_eq!(parse(BASE).access_log, None);
    assert_eq!(
        parse(&doc("[access_log]\nformat = \"common\"\n")).access_log,
        None
    );
}

#[test]
fn access_log_keys_are_read_with_their_defaults() {
    let c = parse(&doc(
        "[access_log]\npath = \"/var/log/loadgate/access.log\"\n",
    ));
    assert_eq!(
        c.access_log,
        Some(AccessLogConfig {
            target: AccessLogTarget::File("/var/log/loadgate/access.log".into()),
            format: AccessLogFormat::Json,
            include_query: false,
            buffer_lines: 16_384,
        })
    );
    let c = parse(&doc(
        "[access_log]\npath = \"stdout\"\nformat = \"combined\"\ninclude_query = true\nbuffer_lines = 10\n",
    ));
    assert_eq!(
        c.access_log,
        Some(AccessLogConfig {
            target: AccessLogTarget::Stdout,
            format: AccessLogFormat::Combined,
            include_query: true,
            buffer_lines: 10,
        })
    );
}

#[test]
fn access_log_errors_name_their_lines() {
    one_error(
        &doc("[access_log]\npath = \"a.log\"\nformat = \"xml\"\n"),
        10,
        "[access_log]: format: unknown value `xml`, expected one of `json`, `common`, `combined`",
    );
    one_error(
        &doc("[access_log]\npath = \"a.log\"\nbuffer_lines = 0\n"),
        10,
        "[access_log]: buffer_lines = 0 must be between 1 and 1048576",
    );
    one_error(
        &doc("[access_log]\npath = \"\"\n"),
        9,
        "[access_log]: path is empty",
    );
    one_error(
        &doc("[access_log]\npath = \"a.log\"\nquery = true\n"),
        10,
        "[access_log]: unknown key `query`",
    );
    one_error(
        &format!("access_log = \"a.log\"\n{BASE}"),
        1,
        "`access_log` must be a table: write [access_log]",
    );
}

/// A CA certificate as PEM, made for one test.
fn ca_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

fn parse_in(text: &str, base: &std::path::Path) -> Result<Config, Vec<(usize, String)>> {
    Config::parse_in(text, "test.toml", base)
        .map_err(|e| e.errors.into_iter().map(|e| (e.line, e.message)).collect())
}

#[test]
fn upstream_tls_is_off_without_its_table_and_on_with_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_pem()).unwrap();
    assert_eq!(parse(BASE).upstreams[0].tls, None);

    let text = doc("[upstream.tls]\nca_file = \"ca.pem\"\nserver_name = \"App.Internal\"\n");
    let config = parse_in(&text, dir.path()).unwrap();
    let tls = config.upstreams[0].tls.as_ref().expect("on with its table");
    let ca = tls.ca.as_ref().unwrap();
    assert_eq!(
        ca.path,
        dir.path().join("ca.pem"),
        "relative to the config file"
    );
    assert_eq!(ca.certs.len(), 1);
    assert_eq!(
        tls.server_name.as_ref().map(|n| n.to_str().into_owned()),
        Some("app.internal".to_string())
    );
    assert!(!tls.insecure_skip_verify);

    let system = parse(&doc("tls = { enabled = true }\n"));
    let tls = system.upstreams[0].tls.as_ref().unwrap();
    assert_eq!((tls.ca.as_ref(), tls.server_name.as_ref()), (None, None));

    // Off, with its keys kept for later: the CA file is not even read.
    let off = doc("[upstream.tls]\nenabled = false\nca_file = \"missing.pem\"\n");
    assert_eq!(parse_in(&off, dir.path()).unwrap().upstreams[0].tls, None);

    let insecure = parse(&doc("tls.insecure_skip_verify = true\n"));
    assert!(
        insecure.upstreams[0]
            .tls
            .as_ref()
            .unwrap()
            .insecure_skip_verify
    );
}

#[test]
fn upstream_tls_server_names_may_be_ip_addresses() {
    for name in ["10.0.0.7", "::1", "[::1]"] {
        let config = parse(&doc(&format!("tls.server_name = {name:?}\n")));
        let server_name = config.upstreams[0]
            .tls
            .as_ref()
            .unwrap()
            .server_name
            .clone();
        assert!(
            matches!(
                server_name,
                Some(rustls_pki_types::ServerName::IpAddress(_))
            ),
            "{name}: {server_name:?}"
        );
    }
    // Without server_name, each backend's host is the name: an IP backend is fine too.
    let text = BASE.replace("127.0.0.1:8081", "[::1]:8443") + "tls.enabled = true\n";
    assert!(parse(&text).upstreams[0].tls.is_some());
}

#[test]
fn upstream_tls_errors_are_reported_at_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_pem()).unwrap();
    std::fs::write(dir.path().join("empty.pem"), "no certificates here\n").unwrap();
    std::fs::write(
        dir.path().join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cases: &[(&str, usize, &str)] = &[
        (
            "[upstream.tls]\nca_file = \"missing.pem\"\n",
            9,
            "cannot read",
        ),
        (
            "[upstream.tls]\nca_file = \"empty.pem\"\n",
            9,
            "holds no PEM certificate",
        ),
        (
            "[upstream.tls]\nca_file = \"garbage.pem\"\n",
            9,
            "cannot be parsed as a CA",
        ),
        (
            "[upstream.tls]\nserver_name = \"bad name\"\n",
            9,
            "not a DNS name or an IP",
        ),
        (
            "[upstream.tls]\nserver_name = \"*.internal\"\n",
            9,
            "is a wildcard",
        ),
        (
            "[upstream.tls]\nca_file = \"ca.pem\"\ninsecure_skip_verify = true\n",
            10,
            "verifies nothing",
        ),
        (
            "[upstream.tls]\nverify = false\n",
            9,
            "unknown key `verify`",
        ),
        ("[upstream.tls]\nenabled = \"yes\"\n", 9, "invalid type"),
    ];
    for (extra, line, fragment) in cases {
        let errs = parse_in(&doc(extra), dir.path()).expect_err(extra);
        assert_eq!(errs.len(), 1, "{extra}: {errs:#?}");
        assert_eq!(errs[0].0, *line, "{extra}: {errs:#?}");
        assert!(errs[0].1.contains(fragment), "{extra}: {errs:#?}");
        assert!(errs[0].1.starts_with("upstream \"app\""), "{errs:#?}");
    }
}

#[test]
fn a_backend_host_tls_cannot_verify_needs_a_server_name() {
    let text = BASE.replace("127.0.0.1:8081", "bad..name:8443") + "tls.enabled = true\n";
    one_error(&text, 7, "set tls.server_name");
    let named = BASE.replace("127.0.0.1:8081", "bad..name:8443")
        + "tls = { server_name = \"app.internal\" }\n";
    assert!(parse(&named).upstreams[0].tls.is_some());
}

#[test]
fn an_https_actuator_needs_upstream_tls() {
    let text = doc("[upstream.actuator]\nbase_url = \"https://127.0.0.1:8082\"\n");
    one_error(&text, 9, "has no [upstream.tls]");
    let with_tls = doc(
        "[upstream.actuator]\nbase_url = \"https://127.0.0.1:8082\"\n[upstream.tls]\nenabled = true\n",
    );
    parse(&with_tls);
}

#[test]
fn a_changed_ca_file_changes_the_upstream_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, ca_pem()).unwrap();
    let text = doc("[upstream.tls]\nca_file = \"ca.pem\"\n");
    let first = parse_in(&text, dir.path()).unwrap();
    let again = parse_in(&text, dir.path()).unwrap();
    assert_eq!(
        first.upstreams[0], again.upstreams[0],
        "same file, same contents"
    );
    std::fs::write(&path, ca_pem()).unwrap();
    let changed = parse_in(&text, dir.path()).unwrap();
    assert_ne!(
        first.upstreams[0], changed.upstreams[0],
        "a reload rebuilds an upstream whose CA file changed"
    );
}
