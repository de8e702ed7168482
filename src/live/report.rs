//! `/report`: one self-contained HTML file of the last N minutes, to keep after a load
//! test or an incident, or to compare thresholds in a shadow-mode trial: the config in
//! force (listeners, upstreams, routes), then per upstream its utilisation against its
//! thresholds and what admission did, drawn as inline SVG here (no script, nothing
//! fetched), and per route its totals, shed ratio and latency.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::latency::Spread;
use super::sample::{Counts, Sample};
use crate::civil::Civil;
use crate::config::{CachePolicy, RouteClass};
use crate::forward::state::Generation;

/// Colours shared with the live page: one per series, readable on white.
const IN_FORCE: &str = "#1f5fbf";
const LOCAL: &str = "#6b8fd6";
const REPORTED: &str = "#8a4fbf";
const ADMITTED: &str = "#2e8b57";
const SHED: &str = "#d1342f";
const QUEUED: &str = "#e08a00";
const CACHE: &str = "#7a7a7a";
const WOULD_SHED: &str = "#b5179e";
const CLASS_COLOURS: [&str; 3] = ["#1b7f3b", "#c77800", "#b02a2a"];

/// `20261130T121547Z`: the report's time in its file name.
pub fn stamp(at: SystemTime) -> String {
    let t = Civil::of(at);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// `2026-11-30 12:15:47 UTC`.
fn readable(at: SystemTime) -> String {
    let t = Civil::of(at);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

fn readable_ms(ms: u64) -> String {
    readable(UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Text made safe inside HTML elements and quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.1} ms"))
}

/// The report for `samples` (the last `minutes`, oldest first), generated at `now`.
pub fn render(
    generation: &Generation,
    samples: &[Arc<Sample>],
    minutes: u64,
    now: SystemTime,
) -> String {
    let mut html = String::with_capacity(64 * 1024);
    let title = format!("loadgate report {}", readable(now));
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let span = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) => format!(
            "{} samples, one a second, from {} to {}",
            samples.len(),
            readable_ms(first.at_ms.saturating_sub(first.span_ms)),
            readable_ms(last.at_ms)
        ),
        _ => "no samples yet: the proxy started less than two seconds ago".to_string(),
    };
    let _ = writeln!(
        html,
        "<p>The last {minutes} minute{}: {span}.</p>",
        if minutes == 1 { "" } else { "s" }
    );
    config_section(&mut html, generation);
    html.push_str("<h2>Upstreams</h2>\n");
    for upstream in generation.upstreams.keys() {
        upstream_section(&mut html, upstream, samples);
    }
    routes_section(&mut html, generation, samples);
    html.push_str("</body></html>\n");
    html
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1rem auto;max-width:60rem;\
padding:0 .8rem;color:#222}table{border-collapse:collapse;margin:.5rem 0 1rem;display:block;\
overflow-x:auto}th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;\
white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums}\
svg{width:100%;height:auto;border:1px solid #ddd;background:#fff}h2{margin-top:2rem}\
.key span{margin-right:1rem;white-space:nowrap}.key i{display:inline-block;width:1.2em;\
height:.25em;vertical-align:middle;margin-right:.3em}";

fn config_section(html: &mut String, generation: &Generation) {
    let config = &generation.config;
    html.push_str("<h2>Configuration</h2>\n<h3>Listeners</h3>\n<table><tr><th>address</th><th>serves</th></tr>\n");
    for address in &config.server.listen {
        let _ = writeln!(html, "<tr><td>{address}</td><td>HTTP/1.1, h2c</td></tr>");
    }
    for listener in &config.listeners {
        let serves = if listener.tls.is_some() {
            "TLS (HTTP/1.1, h2)"
        } else {
            "HTTP/1.1, h2c"
        };
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{serves}</td></tr>",
            listener.address
        );
    }
    let _ = writeln!(
        html,
        "<tr><td>{}</td><td>admin</td></tr></table>",
        config.admin.listen
    );
    html.push_str(
        "<h3>Upstreams</h3>\n<table><tr><th>name</th><th>backends</th><th>max_workers</th>\
         <th>mode</th><th>critical</th><th>normal</th><th>sheddable</th><th>band</th>\
         <th>signal</th></tr>\n",
    );
    for u in &config.upstreams {
        let t = &u.shedding.thresholds;
        let signal = match (&u.adaptive, u.actuator.enabled) {
            (Some(_), _) => "adaptive limit",
            (None, true) => "own in-flight + actuator reports",
            (None, false) => "own in-flight",
        };
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td class=n>{}</td><td>{}</td><td class=n>{}</td>\
             <td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td>{signal}</td></tr>",
            esc(&u.name),
            esc(&u.backends.join(", ")),
            u.max_workers,
            u.shedding.mode.as_str(),
            pct(t.critical),
            pct(t.normal),
            pct(t.sheddable),
            pct(u.shedding.band),
        );
    }
    html.push_str(
        "</table>\n<h3>Routes</h3>\n<table><tr><th>name</th><th>host</th><th>path prefix</th>\
         <th>upstream</th><th>class</th><th>threshold</th><th>cache</th></tr>\n",
    );
    for r in &config.routes {
        let upstream = config.upstreams.iter().find(|u| u.name == r.upstream);
        let threshold = r
            .threshold
            .or(upstream.map(|u| u.shedding.thresholds.for_class(r.class)));
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{}{}</td><td>{}</td></tr>",
            esc(&r.name),
            esc(r.host.as_deref().unwrap_or("any")),
            esc(&r.path_prefix),
            esc(&r.upstream),
            r.class.as_str(),
            threshold.map_or_else(|| "–".to_string(), pct),
            if r.threshold.is_some() { " (route)" } else { "" },
            if r.cache == CachePolicy::On { "on" } else { "off" },
        );
    }
    html.push_str("</table>\n");
}

/// Peak and mean of the values present.
fn peak_mean(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut peak, mut sum, mut n) = (f64::MIN, 0.0, 0usize);
    for v in values {
        peak = peak.max(v);
        sum += v;
        n += 1;
    }
    (n > 0).then(|| (peak, sum / n as f64))
}

fn upstream_section(html: &mut String, name: &str, samples: &[Arc<Sample>]) {
    let readings: Vec<_> = samples
        .iter()
        .map(|s| s.upstreams.iter().find(|u| &*u.name == name))
        .collect();
    let _ = writeln!(html, "<h3>{}</h3>", esc(name));
    let Some(latest) = readings.iter().rev().flatten().next() else {
        html.push_str("<p>No samples of this upstream in the window.</p>\n");
        return;
    };
    let mut totals = Counts::default();
    let mut latency = [Spread::default(), Spread::default(), Spread::default()];
    for sample in samples {
        totals.add(sample.upstream_counts(name));
        for class in RouteClass::ALL {
            latency[class.index()].add(&sample.upstream_latency(name, class));
        }
    }
    let in_force = peak_mean(readings.iter().flatten().map(|u| u.utilisation));
    let local = peak_mean(readings.iter().flatten().map(|u| u.local));
    let reported = peak_mean(readings.iter().flatten().filter_map(|u| u.reported));
    let fmt = |pm: Option<(f64, f64)>| {
        pm.map_or_else(
            || ("no signal".to_string(), "no signal".to_string()),
            |(p, m)| (pct(p), pct(m)),
        )
    };
    let (ip, im) = fmt(in_force);
    let (lp, lm) = fmt(local);
    let (rp, rm) = fmt(reported);
    let _ = writeln!(
        html,
        "<table><tr><th></th><th>peak</th><th>mean</th></tr>\
         <tr><td>utilisation in force</td><td class=n>{ip}</td><td class=n>{im}</td></tr>\
         <tr><td>own in-flight ÷ pool</td><td class=n>{lp}</td><td class=n>{lm}</td></tr>\
         <tr><td>reported by the backends</td><td class=n>{rp}</td><td class=n>{rm}</td></tr></table>"
    );
    let _ = writeln!(
        html,
        "<table><tr><th>admitted</th><th>shed</th><th>queued</th><th>refused by the queue</th>\
         <th>from cache</th><th>would shed (shadow)</th><th>would queue (shadow)</th><th>shed ratio</th></tr>\
         <tr><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td>\
         <td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr></table>",
        totals.admitted,
        totals.shed,
        totals.queued,
        totals.rejected,
        totals.cache,
        totals.would_shed,
        totals.would_queue,
        pct(totals.shed_ratio()),
    );
    html.push_str("<table><tr><th>class</th><th>requests</th><th>p50</th><th>p99</th></tr>\n");
    for class in RouteClass::ALL {
        let spread = &latency[class.index()];
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>",
            class.as_str(),
            spread.count(),
            ms(spread.quantile_ms(0.5)),
            ms(spread.quantile_ms(0.99)),
        );
    }
    html.push_str("</table>\n");

    // Utilisation against the thresholds.
    let series = |f: fn(&super::sample::UpstreamReading) -> Option<f64>| -> Vec<Option<f64>> {
        readings.iter().map(|r| r.and_then(f)).collect()
    };
    let lines = [
        Line::new("in force", IN_FORCE, series(|u| Some(u.utilisation))),
        Line::new("own ÷ pool", LOCAL, series(|u| Some(u.local))).dashed(),
        Line::new("reported", REPORTED, series(|u| u.reported)).dashed(),
    ];
    let thresholds: Vec<(String, &str, f64)> = RouteClass::ALL
        .iter()
        .map(|&c| {
            let t = latest.thresholds[c.index()];
            (
                format!("{} {}", c.as_str(), pct(t)),
                CLASS_COLOURS[c.index()],
                t,
            )
        })
        .collect();
    let top = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten())
        .chain(thresholds.iter().map(|t| &t.2))
        .fold(1.0f64, |a, &b| a.max(b));
    html.push_str("<p>Utilisation (the thresholds as thin lines):</p>\n");
    chart(html, &lines, &thresholds, top * 1.05, pct);

    // Decisions per second.
    let rate = |f: fn(&Counts) -> u64| -> Vec<Option<f64>> {
        samples
            .iter()
            .map(|s| Some(f(&s.upstream_counts(name)) as f64 * 1000.0 / s.span_ms as f64))
            .collect()
    };
    let lines = [
        Line::new("admitted", ADMITTED, rate(|c| c.admitted)),
        Line::new("shed", SHED, rate(|c| c.shed + c.rejected)),
        Line::new("queued", QUEUED, rate(|c| c.queued)),
        Line::new("from cache", CACHE, rate(|c| c.cache)),
        Line::new("would shed", WOULD_SHED, rate(|c| c.would_shed)).dashed(),
    ];
    let top = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten())
        .fold(1.0f64, |a, &b| a.max(b));
    html.push_str("<p>Requests per second:</p>\n");
    chart(html, &lines, &[], top * 1.1, |v| format!("{v:.0}/s"));

    // p99 by class.
    let lines: Vec<Line> = RouteClass::ALL
        .iter()
        .map(|&c| {
            let values = samples
                .iter()
                .map(|s| s.upstream_latency(name, c).quantile_ms(0.99))
                .collect();
            Line::new(c.as_str(), CLASS_COLOURS[c.index()], values)
        })
        .collect();
    let top = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten())
        .fold(1.0f64, |a, &b| a.max(b));
    html.push_str("<p>p99 latency by class, each second:</p>\n");
    chart(html, &lines, &[], top * 1.1, |v| format!("{v:.0} ms"));
}

fn routes_section(html: &mut String, generation: &Generation, samples: &[Arc<Sample>]) {
    html.push_str(
        "<h2>Routes</h2>\n<table><tr><th>route</th><th>upstream</th><th>class</th>\
         <th>admitted</th><th>shed</th><th>queued</th><th>refused by the queue</th><th>from cache</th>\
         <th>would shed</th><th>shed ratio</th><th>p50</th><th>p99</th></tr>\n",
    );
    for route in generation.routes.iter() {
        let mut counts = Counts::default();
        let mut latency = Spread::default();
        for second in samples.iter().flat_map(|s| s.routes.iter()) {
            if *second.name == *route.name {
                counts.add(second.counts);
                latency.add(&second.latency);
            }
        }
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td>\
             <td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td>\
             <td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>",
            esc(&route.name),
            esc(&route.upstream.name),
            route.class.as_str(),
            counts.admitted,
            counts.shed,
            counts.queued,
            counts.rejected,
            counts.cache,
            counts.would_shed,
            pct(counts.shed_ratio()),
            ms(latency.quantile_ms(0.5)),
            ms(latency.quantile_ms(0.99)),
        );
    }
    html.push_str(
        "</table>\n<p>Shed ratio: shed and refused ÷ (admitted + shed + refused). Latency: \
        from request head to the end of the response, every answer of the route (cache hits and \
        429s included), read from buckets 19% wide.</p>\n",
    );
}

/// One series of a chart; `None` leaves a gap.
struct Line {
    label: String,
    colour: &'static str,
    values: Vec<Option<f64>>,
    dashed: bool,
}

impl Line {
    fn new(label: &str, colour: &'static str, values: Vec<Option<f64>>) -> Line {
        Line {
            label: label.to_string(),
            colour,
            values,
            dashed: false,
        }
    }

    fn dashed(mut self) -> Line {
        self.dashed = true;
        self
    }
}

const W: f64 = 720.0;
const H: f64 = 180.0;
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 18.0;

/// An SVG line chart from 0 to `top`, one point a sample, with horizontal `rules`.
fn chart(
    html: &mut String,
    lines: &[Line],
    rules: &[(String, &str, f64)],
    top: f64,
    label: impl Fn(f64) -> String,
) {
    let points = lines.iter().map(|l| l.values.len()).max().unwrap_or(0);
    let x = |i: usize| LEFT + (W - LEFT - 4.0) * i as f64 / (points.max(2) - 1) as f64;
    let y = |v: f64| 4.0 + (H - BOTTOM - 4.0) * (1.0 - (v / top).clamp(0.0, 1.0));
    let _ = write!(html, "<svg viewBox=\"0 0 {W} {H}\" role=\"img\">");
    for v in [0.0, top / 2.0, top] {
        let _ = write!(
            html,
            "<line x1=\"{LEFT}\" x2=\"{W}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            LEFT - 4.0,
            y(v) + 4.0,
            esc(&label(v)),
            y = y(v),
        );
    }
    for (_, colour, v) in rules {
        let _ = write!(
            html,
            "<line x1=\"{LEFT}\" x2=\"{W}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{colour}\" stroke-width=\"1\" stroke-dasharray=\"2 3\"/>",
            y = y(*v)
        );
    }
    let _ = write!(
        html,
        "<text x=\"{LEFT}\" y=\"{H}\" font-size=\"11\" fill=\"#555\">{} s ago</text>\
         <text x=\"{W}\" y=\"{H}\" font-size=\"11\" text-anchor=\"end\" fill=\"#555\">now</text>",
        points
    );
    for line in lines {
        let mut path = String::new();
        let mut pen_down = false;
        for (i, v) in line.values.iter().enumerate() {
            match v {
                Some(v) => {
                    let _ = write!(
                        path,
                        "{}{:.1} {:.1}",
                        if pen_down { " L" } else { " M" },
                        x(i),
                        y(*v)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if path.is_empty() {
            continue;
        }
        let _ = write!(
            html,
            "<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{}/>",
            path.trim_start(),
            line.colour,
            if line.dashed {
                " stroke-dasharray=\"5 3\""
            } else {
                ""
            }
        );
    }
    html.push_str("</svg>\n<div class=\"key\">");
    for line in lines {
        let _ = write!(
            html,
            "<span><i style=\"background:{}\"></i>{}</span>",
            line.colour,
            esc(&line.label)
        );
    }
    for (text, colour, _) in rules {
        let _ = write!(
            html,
            "<span><i style=\"background:{colour}\"></i>{}</span>",
            esc(text)
        );
    }
    html.push_str("</div>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_times() {
        let at = UNIX_EPOCH + Duration::from_secs(1_796_300_147);
        assert_eq!(stamp(at), "20261203T121547Z");
        assert_eq!(readable(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        // A leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(stamp(leap), "20000229T000000Z");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
