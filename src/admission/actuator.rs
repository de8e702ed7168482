//! Parsing what Spring Boot Actuator reports about the backend's worker pool:
//! the `/actuator/metrics/{name}` JSON and the `/actuator/prometheus` text.
//!
//! Pure functions, no I/O: the poller fetches, this module reads. Range checks
//! (`max > 0`, `busy <= max`) are not here but in `signal::validate`.

use serde::Deserialize;

/// Which actuator endpoint the poller reads: a config setting, declared in `config/`.
pub use crate::config::ActuatorFormat;

/// The names of the busy and max metrics, as the chosen format spells them
/// (`tomcat.threads.busy` in JSON is `tomcat_threads_busy_threads` in Prometheus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricNames {
    pub busy: String,
    pub max: String,
}

impl MetricNames {
    /// Tomcat's thread metrics (Micrometer `TomcatMetrics`; need `server.tomcat.mbeanregistry.enabled=true`).
    pub fn tomcat(format: ActuatorFormat) -> MetricNames {
        match format {
            ActuatorFormat::Json => {
                MetricNames::new("tomcat.threads.busy", "tomcat.threads.config.max")
            }
            ActuatorFormat::Prometheus => MetricNames::new(
                "tomcat_threads_busy_threads",
                "tomcat_threads_config_max_threads",
            ),
        }
    }

    /// Jetty's thread metrics (Micrometer `JettyServerThreadPoolMetrics`).
    pub fn jetty(format: ActuatorFormat) -> MetricNames {
        match format {
            ActuatorFormat::Json => {
                MetricNames::new("jetty.threads.busy", "jetty.threads.config.max")
            }
            ActuatorFormat::Prometheus => MetricNames::new(
                "jetty_threads_busy_threads",
                "jetty_threads_config_max_threads",
            ),
        }
    }

    pub fn new(busy: impl Into<String>, max: impl Into<String>) -> MetricNames {
        MetricNames {
            busy: busy.into(),
            max: max.into(),
        }
    }
}

/// Why an actuator body could not be read as busy/max figures.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("no measurement with statistic VALUE in the metric's \"measurements\"")]
    NoValue,
    #[error("the VALUE measurement is {0}, not a finite number")]
    NotANumber(String),
    #[error("neither {busy} nor {max} is in the Prometheus text")]
    MissingMetrics { busy: String, max: String },
    #[error("line {line}: {why}")]
    Syntax { line: usize, why: String },
    #[error("{which} metric {metric}{connector} is {value}, not a finite number")]
    NotFinite {
        which: &'static str,
        metric: String,
        connector: String,
        value: f64,
    },
    #[error("connector {connector} has {present} but no {missing}")]
    Incomplete {
        connector: String,
        present: String,
        missing: String,
    },
    #[error("no connector with name=\"{wanted}\"; found: {found}")]
    NoSuchConnector { wanted: String, found: String },
}

/// The `VALUE` measurement of an `/actuator/metrics/{name}` body (Spring Boot 2 and 3 shape).
pub fn parse_json_value(body: &[u8]) -> Result<f64, ParseError> {
    #[derive(Deserialize)]
    struct Metric {
        measurements: Vec<Measurement>,
    }
    #[derive(Deserialize)]
    struct Measurement {
        statistic: String,
        value: serde_json::Value,
    }
    let metric: Metric =
        serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    let value = metric
        .measurements
        .into_iter()
        .find(|m| m.statistic == "VALUE")
        .ok_or(ParseError::NoValue)?
        .value;
    // Jackson writes NaN and infinities as strings ("NaN"); JSON numbers are always finite.
    match value.as_f64() {
        Some(v) if v.is_finite() => Ok(v),
        _ => Err(ParseError::NotANumber(value.to_string())),
    }
}

/// One connector's figures as found in the text; `key` is its `name` label, if any.
#[derive(Debug, Default)]
struct Series {
    key: Option<String>,
    busy: Option<f64>,
    max: Option<f64>,
}

/// Reads `(busy, max)` from Prometheus text exposition (`/actuator/prometheus`).
///
/// Series are grouped by their `name` label (the connector, e.g. `http-nio-8080`);
/// other labels (`application`, ...) are ignored. With `connector`, that connector is
/// read; without, the connector with the highest busy/max ratio wins (the conservative
/// choice). A connector with only one of the two metrics is an error only when no
/// complete pair exists. A non-finite value (`NaN`, `+Inf`) of a connector that is
/// considered is an error.
pub fn parse_prometheus(
    text: &str,
    names: &MetricNames,
    connector: Option<&str>,
) -> Result<(f64, f64), ParseError> {
    let mut series: Vec<Series> = Vec::new();
    // Every connector seen, for the error when the wanted one is not there.
    let mut seen: Vec<Option<String>> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        let metric = &line[..name_end];
        let is_busy = metric == names.busy;
        if !is_busy && metric != names.max {
            continue;
        }
        let sample = parse_sample(&line[name_end..]).map_err(|why| ParseError::Syntax {
            line: index + 1,
            why,
        })?;
        if !seen.contains(&sample.connector) {
            seen.push(sample.connector.clone());
        }
        if connector.is_some() && sample.connector.as_deref() != connector {
            continue;
        }
        if !sample.value.is_finite() {
            return Err(ParseError::NotFinite {
                which: if is_busy { "busy" } else { "max" },
                metric: metric.to_string(),
                connector: sample
                    .connector
                    .as_deref()
                    .map(|c| format!("{{name=\"{c}\"}}"))
                    .unwrap_or_default(),
                value: sample.value,
            });
        }
        let slot = match series.iter_mut().position(|s| s.key == sample.connector) {
            Some(i) => &mut series[i],
            None => {
                series.push(Series {
                    key: sample.connector,
                    ..Series::default()
                });
                series.last_mut().expect("just pushed")
            }
        };
        if is_busy {
            slot.busy = Some(sample.value);
        } else {
            slot.max = Some(sample.value);
        }
    }

    if let Some(wanted) = connector {
        let found = series.iter().find(|s| s.key.as_deref() == Some(wanted));
        let Some(found) = found else {
            return Err(ParseError::NoSuchConnector {
                wanted: wanted.to_string(),
                found: connector_list(&seen),
            });
        };
        return complete(found, names);
    }

    let pairs: Vec<(f64, f64)> = series
        .iter()
        .filter_map(|s| Some((s.busy?, s.max?)))
        .collect();
    // Prefer pairs that make sense (max > 0), then the busiest; otherwise return a
    // nonsensical pair as is, so that validation can say what is wrong with it.
    let best = pairs
        .iter()
        .filter(|(_, max)| *max > 0.0)
        .max_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)))
        .or(pairs.first());
    match best {
        Some(pair) => Ok(*pair),
        None => match series.first() {
            Some(incomplete) => complete(incomplete, names),
            None => Err(ParseError::MissingMetrics {
                busy: names.busy.clone(),
                max: names.max.clone(),
            }),
        },
    }
}

fn complete(series: &Series, names: &MetricNames) -> Result<(f64, f64), ParseError> {
    match (series.busy, series.max) {
        (Some(busy), Some(max)) => Ok((busy, max)),
        (busy, _) => {
            let (present, missing) = if busy.is_some() {
                (&names.busy, &names.max)
            } else {
                (&names.max, &names.busy)
            };
            Err(ParseError::Incomplete {
                connector: series
                    .key
                    .clone()
                    .unwrap_or_else(|| "(no name label)".into()),
                present: present.clone(),
                missing: missing.clone(),
            })
        }
    }
}

fn connector_list(seen: &[Option<String>]) -> String {
    if seen.is_empty() {
        return "none".to_string();
    }
    seen.iter()
        .map(|key| match key {
            Some(k) => format!("{k:?}"),
            None => "(no name label)".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One sample line after the metric name: its `name` label and its value.
struct Sample {
    connector: Option<String>,
    value: f64,
}

/// Parses `{labels} value [timestamp]` (labels optional, trailing comma allowed).
fn parse_sample(rest: &str) -> Result<Sample, String> {
    let mut connector = None;
    let mut rest = rest.trim_start();
    if let Some(labels) = rest.strip_prefix('{') {
        let (name, after) = parse_labels(labels)?;
        connector = name;
        rest = after;
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields.next().ok_or("no value after the metric name")?;
    let value = parse_float(value).ok_or_else(|| format!("value {value:?} is not a number"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("timestamp {timestamp:?} is not an integer"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!(
            "unexpected {extra:?} after the value and timestamp"
        ));
    }
    Ok(Sample { connector, value })
}

/// Parses the inside of `{...}`; returns the `name` label and the text after the `}`.
fn parse_labels(mut s: &str) -> Result<(Option<String>, &str), String> {
    let mut name = None;
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok((name, after));
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        s = s[eq + 1..].trim_start();
        s = s.strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".to_string()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".to_string()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if key == "name" {
            name = Some(value);
        }
        s = s[end + 1..].trim_start();
        // Spring Boot 2 (simpleclient) writes a comma after the last label too.
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label".to_string());
        }
    }
}

/// A Prometheus float: Go syntax plus `NaN`, `+Inf`, `-Inf`.
fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ if s
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && !matches!(b, b'e' | b'E')) =>
        {
            None
        }
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT3_BUSY: &str = r#"{"name":"tomcat.threads.busy","baseUnit":"threads","measurements":[{"statistic":"VALUE","value":3.0}],"availableTags":[{"tag":"name","values":["http-nio-8080"]}]}"#;

    fn prom(text: &str) -> Result<(f64, f64), ParseError> {
        parse_prometheus(text, &MetricNames::tomcat(ActuatorFormat::Prometheus), None)
    }

    fn prom_for(text: &str, connector: &str) -> Result<(f64, f64), ParseError> {
        parse_prometheus(
            text,
            &MetricNames::tomcat(ActuatorFormat::Prometheus),
            Some(connector),
        )
    }

    #[test]
    fn json_boot3_sample() {
        assert_eq!(parse_json_value(BOOT3_BUSY.as_bytes()), Ok(3.0));
        let integer = r#"{"name":"x","measurements":[{"statistic":"VALUE","value":200}]}"#;
        assert_eq!(parse_json_value(integer.as_bytes()), Ok(200.0));
    }

    #[test]
    fn json_picks_the_value_statistic() {
        let body = r#"{"measurements":[{"statistic":"COUNT","value":9},{"statistic":"VALUE","value":4.0}]}"#;
        assert_eq!(parse_json_value(body.as_bytes()), Ok(4.0));
    }

    #[test]
    fn json_without_value_measurement() {
        for body in [
            r#"{"name":"tomcat.threads.busy","measurements":[]}"#,
            r#"{"name":"x","measurements":[{"statistic":"COUNT","value":1.0}]}"#,
        ] {
            assert_eq!(
                parse_json_value(body.as_bytes()),
                Err(ParseError::NoValue),
                "{body}"
            );
        }
    }

    #[test]
    fn json_value_not_a_number() {
        for (body, shown) in [
            (
                r#"{"measurements":[{"statistic":"VALUE","value":"NaN"}]}"#,
                "\"NaN\"",
            ),
            (
                r#"{"measurements":[{"statistic":"VALUE","value":null}]}"#,
                "null",
            ),
            (
                r#"{"measurements":[{"statistic":"VALUE","value":"3"}]}"#,
                "\"3\"",
            ),
        ] {
            assert_eq!(
                parse_json_value(body.as_bytes()),
                Err(ParseError::NotANumber(shown.to_string())),
                "{body}"
            );
        }
    }

    #[test]
    fn json_garbage() {
        for body in [
            &b"<html>Whitelabel Error Page</html>"[..],
            b"",
            b"{\"measurements\":",
            b"[1,2]",
            b"{\"name\":\"no measurements\"}",
            b"\xff\xfe",
        ] {
            let err = parse_json_value(body).unwrap_err();
            assert!(matches!(err, ParseError::Json(_)), "{body:?}: {err}");
        }
    }

    #[test]
    fn prometheus_boot3_with_help_and_type() {
        let text = "# HELP tomcat_threads_busy_threads  \n\
                    # TYPE tomcat_threads_busy_threads gauge\n\
                    tomcat_threads_busy_threads{name=\"http-nio-8080\"} 3.0\n\
                    # HELP tomcat_threads_config_max_threads  \n\
                    # TYPE tomcat_threads_config_max_threads gauge\n\
                    tomcat_threads_config_max_threads{name=\"http-nio-8080\"} 200.0\n\
                    # HELP tomcat_threads_current_threads  \n\
                    # TYPE tomcat_threads_current_threads gauge\n\
                    tomcat_threads_current_threads{name=\"http-nio-8080\"} 10.0\n";
        assert_eq!(prom(text), Ok((3.0, 200.0)));
    }

    #[test]
    fn prometheus_boot2_trailing_comma_and_extra_labels() {
        let text = "tomcat_threads_busy_threads{application=\"shop\",name=\"http-nio-8080\",} 7.0\n\
                    tomcat_threads_config_max_threads{application=\"shop\",name=\"http-nio-8080\",} 200.0\n";
        assert_eq!(prom(text), Ok((7.0, 200.0)));
        let spaced = "tomcat_threads_busy_threads{ name = \"c\" , } 1\n\
                      tomcat_threads_config_max_threads{name=\"c\"} 2\n";
        assert_eq!(prom(spaced), Ok((1.0, 2.0)));
    }

    #[test]
    fn prometheus_without_labels() {
        let text = "tomcat_threads_busy_threads 5\ntomcat_threads_config_max_threads 50\n";
        assert_eq!(prom(text), Ok((5.0, 50.0)));
    }

    #[test]
    fn prometheus_exponent_notation_and_timestamps() {
        let text = "tomcat_threads_busy_threads{name=\"a\"} 1.5E1 1712345678901\n\
                    tomcat_threads_config_max_threads{name=\"a\"} 1.0E2 1712345678901\n";
        assert_eq!(prom(text), Ok((15.0, 100.0)));
    }

    #[test]
    fn prometheus_several_connectors() {
        let text = "tomcat_threads_busy_threads{application=\"shop\",name=\"http-nio-8080\",} 20.0\n\
                    tomcat_threads_busy_threads{application=\"shop\",name=\"http-nio-8443\",} 9.0\n\
                    tomcat_threads_config_max_threads{application=\"shop\",name=\"http-nio-8080\",} 200.0\n\
                    tomcat_threads_config_max_threads{application=\"shop\",name=\"http-nio-8443\",} 10.0\n";
        // Without a connector: the one with the highest ratio (9/10 beats 20/200).
        assert_eq!(prom(text), Ok((9.0, 10.0)));
        assert_eq!(prom_for(text, "http-nio-8080"), Ok((20.0, 200.0)));
        assert_eq!(prom_for(text, "http-nio-8443"), Ok((9.0, 10.0)));
        let err = prom_for(text, "http-nio-9999").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no connector with name=\"http-nio-9999\"; found: \"http-nio-8080\", \"http-nio-8443\""
        );
    }

    #[test]
    fn prometheus_incomplete_connector_is_an_error_only_without_a_pair() {
        let text = "tomcat_threads_busy_threads{name=\"a\"} 1\n\
                    tomcat_threads_config_max_threads{name=\"a\"} 10\n\
                    tomcat_threads_config_max_threads{name=\"b\"} 10\n";
        assert_eq!(prom(text), Ok((1.0, 10.0)));
        let err = prom_for(text, "b").unwrap_err();
        assert!(matches!(err, ParseError::Incomplete { .. }), "{err}");
        let only_half = "tomcat_threads_config_max_threads{name=\"b\"} 10\n";
        assert_eq!(
            prom(only_half).unwrap_err().to_string(),
            "connector b has tomcat_threads_config_max_threads but no tomcat_threads_busy_threads"
        );
    }

    #[test]
    fn prometheus_prefers_a_sensible_pair_but_reports_a_nonsensical_one() {
        let text = "tomcat_threads_busy_threads{name=\"a\"} 1\n\
                    tomcat_threads_config_max_threads{name=\"a\"} -1\n\
                    tomcat_threads_busy_threads{name=\"b\"} 1\n\
                    tomcat_threads_config_max_threads{name=\"b\"} 10\n";
        assert_eq!(prom(text), Ok((1.0, 10.0)));
        let minus_one = "tomcat_threads_busy_threads{name=\"a\"} 0\n\
                         tomcat_threads_config_max_threads{name=\"a\"} -1\n";
        assert_eq!(prom(minus_one), Ok((0.0, -1.0)));
    }

    #[test]
    fn prometheus_nan_and_inf_are_errors() {
        for value in ["NaN", "+Inf", "-Inf"] {
            let text = format!(
                "tomcat_threads_busy_threads{{name=\"a\"}} {value}\n\
                 tomcat_threads_config_max_threads{{name=\"a\"}} 10\n"
            );
            let err = prom(&text).unwrap_err();
            assert!(
                matches!(err, ParseError::NotFinite { which: "busy", .. }),
                "{err}"
            );
        }
        let text = "tomcat_threads_busy_threads 1\ntomcat_threads_config_max_threads NaN\n";
        assert_eq!(
            prom(text).unwrap_err().to_string(),
            "max metric tomcat_threads_config_max_threads is NaN, not a finite number"
        );
    }

    #[test]
    fn prometheus_missing_metric() {
        let err = prom("# no metrics here\njvm_threads_live_threads 30\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "neither tomcat_threads_busy_threads nor tomcat_threads_config_max_threads \
             is in the Prometheus text"
        );
        assert!(matches!(prom(""), Err(ParseError::MissingMetrics { .. })));
        // A longer name sharing the prefix is a different metric.
        let text = "tomcat_threads_busy_threads_total 3\ntomcat_threads_config_max_threads 10\n";
        assert!(matches!(prom(text), Err(ParseError::Incomplete { .. })));
    }

    #[test]
    fn prometheus_malformed_lines() {
        for (line, why) in [
            (
                "tomcat_threads_busy_threads{name=\"a\" 3",
                "expected ',' or '}' after a label",
            ),
            (
                "tomcat_threads_busy_threads{name=a} 3",
                "label value not quoted",
            ),
            (
                "tomcat_threads_busy_threads{name=\"a} 3",
                "unterminated label value",
            ),
            (
                "tomcat_threads_busy_threads{name=\"a\"}",
                "no value after the metric name",
            ),
            (
                "tomcat_threads_busy_threads three",
                "value \"three\" is not a number",
            ),
            (
                "tomcat_threads_busy_threads 3 later",
                "timestamp \"later\" is not an integer",
            ),
        ] {
            let text = format!("# HELP x\n{line}\ntomcat_threads_config_max_threads 10\n");
            assert_eq!(
                prom(&text),
                Err(ParseError::Syntax {
                    line: 2,
                    why: why.to_string()
                }),
                "{line}"
            );
        }
    }

    #[test]
    fn prometheus_escaped_label_values() {
        let text = "tomcat_threads_busy_threads{name=\"a\\\"b\\\\c\"} 2\n\
                    tomcat_threads_config_max_threads{name=\"a\\\"b\\\\c\"} 4\n";
        assert_eq!(prom_for(text, "a\"b\\c"), Ok((2.0, 4.0)));
    }

    #[test]
    fn prometheus_custom_names_for_jetty() {
        let names = MetricNames::jetty(ActuatorFormat::Prometheus);
        let text = "jetty_threads_busy_threads 4\njetty_threads_config_max_threads 8\n\
                    tomcat_threads_busy_threads 100\n";
        assert_eq!(parse_prometheus(text, &names, None), Ok((4.0, 8.0)));
    }

    #[test]
    fn format_deserializes_lowercase() {
        #[derive(Deserialize)]
        struct Wrapper {
            format: ActuatorFormat,
        }
        let w: Wrapper = serde_json::from_str(r#"{"format":"prometheus"}"#).unwrap();
        assert_eq!(w.format, ActuatorFormat::Prometheus);
        assert!(serde_json::from_str::<Wrapper>(r#"{"format":"Prometheus"}"#).is_err());
    }
}
