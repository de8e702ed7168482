//! The Spring Boot 3 Actuator endpoints the simulated backend serves:
//! health, the Tomcat thread metrics as JSON, and the Prometheus scrape.
//!
//! Only the endpoints loadgate reads are here; this is not a general actuator.

use super::body::SimBody;
use super::stats::SimStats;
use http::{header, Response, StatusCode};
use serde::Serialize;

/// Spring Boot 3's actuator media type.
pub const ACTUATOR_JSON: &str = "application/vnd.spring-boot.actuator.v3+json";
/// The Prometheus text exposition format Spring Boot serves by default.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Tomcat's `minSpareThreads`: threads it keeps even when idle.
const MIN_SPARE_THREADS: usize = 10;

/// The thread figures the actuator reports, read once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadFigures {
    pub busy: usize,
    pub max: usize,
    pub current: usize,
}

impl ThreadFigures {
    pub fn from_stats(stats: &SimStats) -> ThreadFigures {
        let max = stats.max_workers();
        ThreadFigures {
            busy: stats.busy(),
            max,
            current: stats.peak_busy().max(MIN_SPARE_THREADS.min(max)),
        }
    }
}

/// The body of `/actuator/metrics/{name}`, fields in Spring's order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MetricResponse<'a> {
    name: &'a str,
    base_unit: &'a str,
    measurements: [Measurement; 1],
    available_tags: [AvailableTag<'a>; 1],
}

#[derive(Debug, Serialize)]
struct Measurement {
    statistic: &'static str,
    value: f64,
}

#[derive(Debug, Serialize)]
struct AvailableTag<'a> {
    tag: &'static str,
    values: [&'a str; 1],
}

/// The response for an `/actuator/...` path, or `None` when there is no such endpoint.
pub(crate) fn respond(path: &str, stats: &SimStats, connector: &str) -> Option<Response<SimBody>> {
    let figures = ThreadFigures::from_stats(stats);
    let (content_type, body) = match path {
        "/actuator" | "/actuator/" => (ACTUATOR_JSON, links_json()),
        "/actuator/health" => (ACTUATOR_JSON, r#"{"status":"UP"}"#.to_string()),
        "/actuator/metrics" => (ACTUATOR_JSON, metric_names_json()),
        "/actuator/prometheus" => (PROMETHEUS_TEXT, prometheus_text(figures, connector)),
        _ => {
            let name = path.strip_prefix("/actuator/metrics/")?;
            (ACTUATOR_JSON, metric_json(name, figures, connector)?)
        }
    };
    Some(
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .body(SimBody::full(body))
            .expect("static response parts are valid"),
    )
}

const METRIC_NAMES: [&str; 3] = [
    "tomcat.threads.busy",
    "tomcat.threads.config.max",
    "tomcat.threads.current",
];

/// `/actuator/metrics/{name}` in Spring Boot 3's shape, for the Tomcat thread metrics.
pub fn metric_json(name: &str, figures: ThreadFigures, connector: &str) -> Option<String> {
    let value = match name {
        "tomcat.threads.busy" => figures.busy,
        "tomcat.threads.config.max" => figures.max,
        "tomcat.threads.current" => figures.current,
        _ => return None,
    };
    let metric = MetricResponse {
        name,
        base_unit: "threads",
        measurements: [Measurement {
            statistic: "VALUE",
            value: value as f64,
        }],
        available_tags: [AvailableTag {
            tag: "name",
            values: [connector],
        }],
    };
    Some(serde_json::to_string(&metric).expect("metric serializes"))
}

fn metric_names_json() -> String {
    serde_json::json!({ "names": METRIC_NAMES }).to_string()
}

fn links_json() -> String {
    let mut links = serde_json::Map::new();
    for name in ["self", "health", "metrics", "prometheus"] {
        let href = if name == "self" {
            "/actuator".to_string()
        } else {
            format!("/actuator/{name}")
        };
        links.insert(
            name.to_string(),
            serde_json::json!({ "href": href, "templated": false }),
        );
    }
    serde_json::json!({ "_links": links }).to_string()
}

/// `/actuator/prometheus` as Spring Boot 3 writes it (gauges, no trailing comma in labels).
pub fn prometheus_text(figures: ThreadFigures, connector: &str) -> String {
    let label = escape_label(connector);
    let mut out = String::new();
    for (name, value) in [
        ("tomcat_threads_busy_threads", figures.busy),
        ("tomcat_threads_config_max_threads", figures.max),
        ("tomcat_threads_current_threads", figures.current),
    ] {
        out.push_str(&format!(
            "# HELP {name}  \n# TYPE {name} gauge\n{name}{{name=\"{label}\"}} {:.1}\n",
            value as f64
        ));
    }
    out
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIGURES: ThreadFigures = ThreadFigures {
        busy: 3,
        max: 200,
        current: 10,
    };

    #[test]
    fn metric_json_has_spring_boot_3_shape() {
        assert_eq!(
            metric_json("tomcat.threads.busy", FIGURES, "http-nio-8080").unwrap(),
            r#"{"name":"tomcat.threads.busy","baseUnit":"threads","measurements":[{"statistic":"VALUE","value":3.0}],"availableTags":[{"tag":"name","values":["http-nio-8080"]}]}"#
        );
        let max = metric_json("tomcat.threads.config.max", FIGURES, "c").unwrap();
        assert!(max.contains(r#""value":200.0"#), "{max}");
        assert!(metric_json("jvm.memory.used", FIGURES, "c").is_none());
    }

    #[test]
    fn prometheus_text_has_help_type_and_values() {
        let text = prometheus_text(FIGURES, "http-nio-8080");
        assert!(text.starts_with(
            "# HELP tomcat_threads_busy_threads  \n\
             # TYPE tomcat_threads_busy_threads gauge\n\
             tomcat_threads_busy_threads{name=\"http-nio-8080\"} 3.0\n"
        ));
        assert!(text.contains("tomcat_threads_config_max_threads{name=\"http-nio-8080\"} 200.0\n"));
        assert!(text.contains("# TYPE tomcat_threads_config_max_threads gauge\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = prometheus_text(FIGURES, "a\"b\\c");
        assert!(text.contains(r#"{name="a\"b\\c"}"#), "{text}");
    }

    #[test]
    fn current_threads_never_below_min_spare() {
        let stats = SimStats::new(200);
        assert_eq!(ThreadFigures::from_stats(&stats).current, 10);
        let small = SimStats::new(4);
        assert_eq!(ThreadFigures::from_stats(&small).current, 4);
    }
}
