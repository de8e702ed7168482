//! The shipped Grafana dashboard (`deploy/grafana/loadgate.json`) and Prometheus rules
//! (`deploy/prometheus/*.yml`) against what loadgate exports: a proxy with two
//! upstreams, a route of each class, a cached route, a TLS listener and an access log
//! serves a little traffic (a shed, a cache hit), and every metric and label the
//! dashboard's and the rules' PromQL names must be in its `/metrics` scrape.
//!
//! The PromQL is read minimally: metric names are identifiers that are neither
//! functions nor keywords; label names come from `{}` matchers and from
//! `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` lists. Series are matched
//! by their rendered names, so a histogram is referenced as `<name>_bucket`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use loadgate::config::Config;
use loadgate::listener::Proxy;
use serde_json::Value;

use crate::support::admin::{self, metric};
use crate::support::tls::TestCa;
use crate::support::*;

/// Labels Prometheus adds to every series when it scrapes a target.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Metrics that appear only after an event this test does not cause, with why: keep tiny.
const EVENT_ONLY: &[(&str, &str)] = &[];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/loadgate.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Every rule file in `deploy/prometheus/`, by name.
fn rule_files() -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(repo_file("deploy/prometheus"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yml"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(
        files.iter().any(|(name, _)| name == "alerts.yml"),
        "{files:?}"
    );
    files
}

// --- PromQL, read minimally ---------------------------------------------------------

/// What one PromQL expression names.
#[derive(Debug, Default)]
struct Refs {
    metrics: BTreeSet<String>,
    /// `(metric, label)` from the metric's `{}` matchers.
    matchers: BTreeSet<(String, String)>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left`, `group_right` lists.
    grouping: BTreeSet<String>,
}

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    // The metric a following `{` belongs to, and the grouping keyword a following `(` does.
    let mut last_metric: Option<String> = None;
    let mut grouping_next = false;
    let ident_at = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && is_ident(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    let skip_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        assert!(*i < chars.len(), "unterminated string in {expr}");
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            skip_string(&mut i);
            last_metric = None;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            let metric = last_metric
                .take()
                .unwrap_or_else(|| panic!("a selector without a metric name in {expr}"));
            i += 1;
            loop {
                while chars[i].is_whitespace() || chars[i] == ',' {
                    i += 1;
                }
                if chars[i] == '}' {
                    i += 1;
                    break;
                }
                let label = ident_at(&mut i);
                assert!(!label.is_empty(), "a matcher without a label in {expr}");
                refs.matchers.insert((metric.clone(), label));
                while matches!(chars[i], '=' | '!' | '~') || chars[i].is_whitespace() {
                    i += 1;
                }
                skip_string(&mut i);
            }
        } else if c == '(' && grouping_next {
            grouping_next = false;
            i += 1;
            loop {
                while chars[i].is_whitespace() || chars[i] == ',' {
                    i += 1;
                }
                if chars[i] == ')' {
                    i += 1;
                    break;
                }
                let label = ident_at(&mut i);
                assert!(
                    !label.is_empty(),
                    "a grouping list that is not labels in {expr}"
                );
                refs.grouping.insert(label);
            }
        } else if c.is_ascii_digit() || (c == '.' && i + 1 < chars.len()) {
            // A number or a duration: 0.99, 1e3, 5m.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            last_metric = None;
        } else if is_ident_start(c) {
            let word = ident_at(&mut i);
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            last_metric = None;
            let rest: String = chars[next..].iter().collect();
            let grouped = ["by", "without"].iter().any(|k| {
                rest.strip_prefix(k)
                    .is_some_and(|after| after.starts_with(|c: char| c.is_whitespace() || c == '('))
            });
            if GROUPING.contains(&word.as_str()) {
                grouping_next = true;
            } else if KEYWORDS.contains(&word.as_str()) || chars.get(next) == Some(&'(') || grouped
            {
                // A binary operator keyword, or a function or aggregation (`sum by (..)`).
            } else {
                refs.metrics.insert(word.clone());
                last_metric = Some(word);
            }
        } else {
            last_metric = None;
            i += 1;
        }
    }
    refs
}

#[test]
fn promql_reader_finds_metrics_matchers_and_grouping_labels() {
    let refs = promql_refs(
        r#"histogram_quantile(0.99, sum by (le, class) (rate(a_bucket{x=~"$x", y!="a\"}"}[$__rate_interval])))
           / on (instance) group_left (z) b_total > 0.5 and c unless time() - d{w="1"} offset 5m"#,
    );
    assert_eq!(
        refs.metrics.iter().map(String::as_str).collect::<Vec<_>>(),
        ["a_bucket", "b_total", "c", "d"]
    );
    let matchers: Vec<_> = refs
        .matchers
        .iter()
        .map(|(m, l)| format!("{m}:{l}"))
        .collect();
    assert_eq!(matchers, ["a_bucket:x", "a_bucket:y", "d:w"]);
    assert_eq!(
        refs.grouping.iter().map(String::as_str).collect::<Vec<_>>(),
        ["class", "instance", "le", "z"]
    );
}

// --- the files themselves ------------------------------------------------------------

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Every PromQL expression of the dashboard: each target's `expr`, and the selector and
/// label of each `label_values(selector, label)` variable query, with where it is.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default().to_string();
            out.push((format!("panel {:?}", panel["title"]), expr, None));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"].as_str().expect("a query variable's query");
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: not label_values(..): {query}", var["name"]));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        out.push((
            format!("variable {}", var["name"]),
            selector.trim().to_string(),
            Some(label.trim().to_string()),
        ));
    }
    out
}

#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dashboard["uid"], "loadgate");
    assert!(
        dashboard["id"].is_null(),
        "an exported id collides on import"
    );

    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["upstream", "route"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        let query = v["query"].as_str().unwrap();
        assert!(
            query.starts_with("label_values(") && query.ends_with(&format!(", {name})")),
            "{name}: {query}"
        );
    }

    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let mut queried = 0;
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let grid = &panel["gridPos"];
        for key in ["h", "w", "x", "y"] {
            assert!(grid[key].is_u64(), "{title}: gridPos.{key}");
        }
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title), "duplicate title {title}");
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            assert!(target["refId"].is_string(), "{title}");
            queried += 1;
        }
    }
    assert!(queried >= 20, "{queried} queries");
    // The panels the dashboard exists for.
    for wanted in [
        "Utilisation vs class thresholds: $upstream",
        "Rejections by class",
        "Shed ratio by route",
        "Critical queue",
        "Latency p50 / p99 by class",
        "Latency p50 / p99 by route",
        "Cache hit ratio by route",
        "Upstream errors by kind",
        "Stale keep-alive reuse",
        "Config reloads",
        "Client connections",
        "Connections timed out",
        "TLS handshakes by result",
        "Resident memory",
        "CPU",
        "File descriptors",
    ] {
        assert!(titles.contains(wanted), "no panel {wanted:?}: {titles:?}");
    }
}

/// One alerting or recording rule as written in a rule file.
#[derive(Debug)]
struct Rule {
    name: String,
    expr: String,
    text: String,
}

/// The rules of a Prometheus rule file: each `- alert:` or `- record:` item, its
/// `expr` (inline or a block scalar) and its whole text.
fn rules(file: &str) -> Vec<Rule> {
    let lines: Vec<&str> = file.lines().collect();
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .map(|(i, _)| i)
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(lines.len());
            let item = &lines[start..end];
            let name = item[0].split_once(':').unwrap().1.trim().to_string();
            let at = item
                .iter()
                .position(|l| l.trim_start().starts_with("expr:"))
                .unwrap_or_else(|| panic!("{name}: no expr"));
            let indent = item[at].len() - item[at].trim_start().len();
            let inline = item[at].trim_start()["expr:".len()..].trim();
            let expr = if inline.starts_with('|') || inline.starts_with('>') {
                item[at + 1..]
                    .iter()
                    .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                    .map(|l| l.trim())
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                inline.to_string()
            };
            Rule {
                name,
                expr,
                text: item.join("\n"),
            }
        })
        .collect()
}

/// The `$labels.<name>` an annotation template reads.
fn template_labels(text: &str) -> BTreeSet<String> {
    text.match_indices("$labels.")
        .map(|(at, m)| {
            text[at + m.len()..]
                .chars()
                .take_while(|&c| is_ident(c))
                .collect()
        })
        .collect()
}

#[test]
fn alert_rules_have_a_duration_a_severity_and_say_what_fired() {
    let mut alerts = BTreeSet::new();
    for (file, text) in rule_files() {
        for rule in rules(&text) {
            assert!(!rule.expr.trim().is_empty(), "{file} {}", rule.name);
            if !rule.text.trim_start().starts_with("- alert:") {
                continue;
            }
            for key in ["for:", "severity:", "summary:", "description:"] {
                assert!(rule.text.contains(key), "{file} {}: no {key}", rule.name);
            }
            let severity = rule
                .text
                .lines()
                .find_map(|l| l.trim().strip_prefix("severity:"))
                .unwrap()
                .trim();
            assert!(
                ["warning", "critical"].contains(&severity),
                "{}: {severity}",
                rule.name
            );
            // A label the summary names must survive the expression's aggregation.
            let refs = promql_refs(&rule.expr);
            for label in template_labels(&rule.text) {
                if !refs.grouping.is_empty() {
                    assert!(
                        refs.grouping.contains(&label),
                        "{}: $labels.{label} is aggregated away by {:?}",
                        rule.name,
                        refs.grouping
                    );
                }
            }
            assert!(alerts.insert(rule.name.clone()), "duplicate {}", rule.name);
        }
    }
    for wanted in [
        "LoadgateSheddingSustained",
        "LoadgateCriticalQueueTimeouts",
        "LoadgateBackendUnhealthy",
        "LoadgateNoHealthyBackend",
        "LoadgateActuatorSignalLost",
        "LoadgateConfigReloadFailed",
        "LoadgateTLSHandshakeFailures",
        "LoadgateAccessLogDropping",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}: {alerts:?}");
    }
}

// --- against a running proxy ---------------------------------------------------------

/// The series names of a Prometheus text scrape, each with every label name it carries.
fn scraped_labels(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let entry = out.entry(name.to_string()).or_default();
        // Label values are quoted; the names are what precedes each `="`.
        let mut rest = labels;
        while let Some((key, after)) = rest.split_once("=\"") {
            entry.insert(key.trim_start_matches(',').to_string());
            let mut escaped = false;
            let end = after
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map(|(i, _)| i)
                .unwrap();
            rest = &after[end + 1..];
        }
    }
    out
}

fn config_text(a: &str, b: &str, dir: &Path, cert: &Path, key: &Path) -> String {
    format!(
        r#"
[server]
listen = ["{LOCAL0}"]
[admin]
listen = "{LOCAL0}"
[access_log]
path = "{log}"
[[listener]]
address = "{LOCAL0}"
[[listener.certificate]]
cert = "{cert}"
key = "{key}"

# One worker, so one slow request fills it and the next sheddable one is shed. Its
# actuator answers 404 (the sim serves it on a management port loadgate is not told of).
[[upstream]]
name = "dash-a"
backends = ["{a}"]
max_workers = 1
[upstream.health]
enabled = false
[upstream.actuator]
interval_ms = 100
timeout_ms = 80

[[upstream]]
name = "dash-b"
backends = ["{b}"]
[upstream.health]
interval_ms = 100
timeout_ms = 80
[upstream.shedding]
sheddable = 0.6
[upstream.actuator]
interval_ms = 100
timeout_ms = 80

[[route]]
name = "dash-slow"
path_prefix = "/api/slow"
upstream = "dash-a"
class = "normal"
[[route]]
name = "dash-batch"
path_prefix = "/api/batch"
upstream = "dash-a"
class = "sheddable"
[[route]]
name = "dash-checkout"
path_prefix = "/api/checkout"
upstream = "dash-b"
class = "critical"
[[route]]
name = "dash-catalog"
path_prefix = "/api/catalog"
upstream = "dash-b"
class = "normal"
cache = "on"
"#,
        log = dir.join("access.log").display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// The proxy of [`config_text`] and its two backends, kept running while it is held.
struct Exercised {
    proxy: Proxy,
    /// The backend addresses of `dash-a` and `dash-b`.
    a: String,
    b: String,
    _backends: [loadgate::sim::SimBackend; 2],
}

/// Starts the proxy of [`config_text`] and drives a shed, a cache hit, a critical
/// request and a TLS handshake through it.
async fn exercised_proxy(dir: &Path) -> Exercised {
    let a = TestBackend::new()
        .route("/api/slow", 1_500.0)
        .route("/api/batch", 1.0)
        .management_port()
        .start()
        .await;
    let b = TestBackend::new()
        .cache_control("public, max-age=60")
        .start()
        .await;
    let ca = TestCa::new();
    let leaf = ca.leaf(dir, "dash", &["dash.example.test"]);
    let text = config_text(
        &a.addr().to_string(),
        &b.addr().to_string(),
        dir,
        &leaf.cert_path,
        &leaf.key_path,
    );
    let config = Config::parse_in(&text, "dashboards test", dir).unwrap_or_else(|e| panic!("{e}"));
    let proxy = start_proxy(config).await;
    let base = format!("http://{}", proxy.addrs()[0]);
    let client = client();

    // A shed: while a slow request holds dash-a's one worker, a sheddable one gets 429.
    let slow = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/api/slow/report");
        async move { get(&client, &url).await.status }
    });
    let reached = eventually(Duration::from_secs(5), || {
        a.stats().requests("/api/slow/report") >= 1
    })
    .await;
    assert!(reached, "the slow request reaches the backend");
    let shed = get(&client, &format!("{base}/api/batch/export")).await;
    assert_eq!(shed.status, 429, "{}", shed.text());
    assert!(shed.header("retry-after").is_some());
    assert_eq!(slow.await.unwrap(), 200);

    // A cache hit.
    let url = format!("{base}/api/catalog/1");
    assert_eq!(get(&client, &url).await.status, 200);
    let hit = get(&client, &url).await;
    assert_eq!(hit.status, 200);
    let cache_status = hit.header("cache-status").unwrap_or_default();
    assert!(cache_status.contains("hit"), "{cache_status}");

    // A critical request, and a TLS handshake.
    assert_eq!(
        get(&client, &format!("{base}/api/checkout/pay"))
            .await
            .status,
        200
    );
    ca.connect(proxy.addrs()[1], "dash.example.test", &[])
        .await
        .expect("TLS handshake");
    Exercised {
        proxy,
        a: a.addr().to_string(),
        b: b.addr().to_string(),
        _backends: [a, b],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_dashboard_and_rules_query_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let exercised = exercised_proxy(dir.path()).await;
    let scrape = admin::metrics(&exercised.proxy).await;
    let scraped = scraped_labels(&scrape);

    let mut queries = dashboard_queries(&dashboard());
    for (file, text) in rule_files() {
        for rule in rules(&text) {
            queries.push((format!("{file} {}", rule.name), rule.expr, None));
        }
    }

    let event_only = |metric: &str| EVENT_ONLY.iter().any(|(m, _)| *m == metric);
    let has_label = |metric: &str, label: &str| {
        TARGET_LABELS.contains(&label)
            || scraped
                .get(metric)
                .is_some_and(|labels| labels.contains(label))
            || event_only(metric)
    };
    let mut missing = Vec::new();
    for (place, expr, variable_label) in &queries {
        let refs = promql_refs(expr);
        assert!(!refs.metrics.is_empty(), "{place}: no metric in {expr}");
        for metric in &refs.metrics {
            if scraped.contains_key(metric) || event_only(metric) {
                continue;
            }
            missing.push(format!("{place}: metric {metric} is not exported"));
        }
        let mut labelled = refs.matchers.clone();
        if let Some(label) = variable_label {
            let metric = refs.metrics.iter().next().unwrap();
            labelled.insert((metric.clone(), label.clone()));
        }
        for (metric, label) in &labelled {
            if !has_label(metric, label) {
                missing.push(format!("{place}: {metric} has no label {label}"));
            }
        }
        for label in &refs.grouping {
            if !refs.metrics.iter().any(|m| has_label(m, label)) {
                missing.push(format!(
                    "{place}: no metric of {:?} has the label {label} it groups by",
                    refs.metrics
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the scrape:\n{}\n\nscrape:\n{scrape}",
        missing.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_actuator_freshness_and_error_series_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let exercised = exercised_proxy(dir.path()).await;
    let proxy = &exercised.proxy;

    // The class thresholds each upstream sheds at: dash-b's sheddable one from its config.
    for (upstream, class, want) in [
        ("dash-b", "sheddable", 0.6),
        ("dash-b", "normal", 0.85),
        ("dash-b", "critical", 1.0),
        ("dash-a", "sheddable", 0.7),
    ] {
        let labels = [("upstream", upstream), ("class", class)];
        assert_eq!(
            metric(proxy, "loadgate_admission_threshold", &labels).await,
            Some(want),
            "{upstream} {class}"
        );
    }

    // dash-b's actuator answers: its report is fresh. dash-a's answers 404: no report.
    let (a, b) = (exercised.a.clone(), exercised.b.clone());
    let fresh = |name: &'static str, backend: String| async move {
        let labels = [("upstream", name), ("backend", backend.as_str())];
        metric(proxy, "loadgate_actuator_report_fresh", &labels).await
    };
    let polls = |name: &'static str, backend: String, result: &'static str| async move {
        let labels = [
            ("upstream", name),
            ("backend", backend.as_str()),
            ("result", result),
        ];
        metric(proxy, "loadgate_actuator_polls_total", &labels).await
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while fresh("dash-b", b.clone()).await != Some(1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dash-b's report never fresh"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(polls("dash-b", b.clone(), "ok").await.unwrap() >= 1.0);
    assert_eq!(polls("dash-b", b.clone(), "not_found").await, Some(0.0));

    assert!(polls("dash-a", a.clone(), "not_found").await.unwrap() >= 1.0);
    assert_eq!(polls("dash-a", a.clone(), "ok").await, Some(0.0));
    assert_eq!(fresh("dash-a", a.clone()).await, Some(0.0));

    // Counters of events that have not happened are scraped at zero.
    let zero = [
        (
            "loadgate_upstream_errors_total",
            vec![("upstream", "dash-b"), ("kind", "header_timeout")],
        ),
        (
            "loadgate_upstream_errors_total",
            vec![("upstream", "dash-b"), ("kind", "no_healthy_backend")],
        ),
        ("loadgate_config_reloads_total", vec![("result", "error")]),
        (
            "loadgate_connections_timed_out_total",
            vec![("kind", "header")],
        ),
    ];
    let scrape = admin::metrics(proxy).await;
    for (name, labels) in zero {
        assert!(
            scrape.lines().any(|l| {
                l.starts_with(&format!("{name}{{"))
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            }),
            "{name} {labels:?} not scraped"
        );
    }
    assert_eq!(
        metric(
            proxy,
            "loadgate_upstream_errors_total",
            &[("upstream", "dash-b"), ("kind", "header_timeout")]
        )
        .await,
        Some(0.0)
    );
}
