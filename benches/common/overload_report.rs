//! The overload bench's measurements and tables: what one run of a scenario against
//! a target recorded, cut into its phases (goodput, critical success and p99, sheddable
//! success, premature sheds, how long shedding lasts), one markdown table per
//! scenario, and the summary against the targets.
//!
//! Only `benches/overload.rs` includes this file (by path); it is not a shared helper.

use std::collections::HashMap;
use std::time::Duration;

use super::common;
use super::common::openloop::Outcome;
use super::scenarios::{P99Base, Recovery, Role, Scenario};
use super::{
    micros, Target, CRITICAL, SHEDDABLE, SHED_LINE, SLOW_MS, UTIL_WINDOW, WORKERS, WORK_MS,
};

/// Everything one run of a scenario against a target recorded.
pub struct Recorded {
    pub outcomes: Vec<Outcome>,
    /// Work asked of each request, in plan order (as `outcomes`).
    pub work_ms: Vec<u64>,
    /// Busy / pool, as `(offset, utilisation)`.
    pub samples: Vec<(Duration, f64)>,
    /// 2xx answers the bypassing clients got in their phase.
    pub bypass_ok: usize,
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// "How long until shedding stopped" for one run.
#[derive(Debug, Clone, Copy)]
enum Settled {
    NotMeasured,
    /// The target never rejected anything.
    NeverShed,
    After(Duration),
    /// Still shedding at the end of the measured span of this length.
    NotWithin(Duration),
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Work served in the main phase / (workers x its length); `None` for the burst.
    goodput: Option<f64>,
    critical_sent: usize,
    critical_ok: usize,
    critical_p99_ms: Option<f64>,
    sheddable_sent: usize,
    sheddable_ok: usize,
    /// Sheddable attempts outside the warm-up, and those rejected while the backend
    /// was under [`SHED_LINE`].
    sheddable_attempts: usize,
    wrong_sheds: usize,
    /// 429/503 answers of any class outside the warm-up.
    rejections: usize,
    /// Critical or sheddable requests with no answer, or an answer other than 2xx/429/503.
    errors: usize,
    settled: Settled,
    /// Mean of the backend's busy / pool sampled during the main phase.
    busy_mean: Option<f64>,
}

impl Measured {
    pub fn from(scenario: &Scenario, recorded: &Recorded) -> Measured {
        let spans = spans(scenario);
        let span_of = |role: Role| {
            let mut matching = spans.iter().filter(|(r, _, _)| *r == role);
            let first = matching.next()?;
            let last = matching.next_back().unwrap_or(first);
            Some((first.1, last.2))
        };
        let within = |t: Duration, span: Option<(Duration, Duration)>| {
            span.is_some_and(|(from, to)| t >= from && t < to)
        };
        let main = span_of(Role::Main);
        let after = span_of(Role::After);
        let warm_end = span_of(Role::Warmup).map_or(Duration::ZERO, |(_, to)| to);
        let windows = utilisation_windows(&recorded.samples);
        let low_util = |t: Duration| {
            let i = (t.as_millis() / UTIL_WINDOW.as_millis()) as usize;
            windows
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|u| u < SHED_LINE)
        };

        let mut m = Measured {
            goodput: None,
            critical_sent: 0,
            critical_ok: 0,
            critical_p99_ms: None,
            sheddable_sent: 0,
            sheddable_ok: 0,
            sheddable_attempts: 0,
            wrong_sheds: 0,
            rejections: 0,
            errors: 0,
            settled: Settled::NotMeasured,
            busy_mean: None,
        };
        let busy: Vec<f64> = recorded
            .samples
            .iter()
            .filter(|(at, _)| within(*at, main))
            .map(|&(_, u)| u)
            .collect();
        if !busy.is_empty() {
            m.busy_mean = Some(busy.iter().sum::<f64>() / busy.len() as f64);
        }
        let mut critical_latencies = Vec::new();
        let mut work_served_ms = 0u64;
        for (outcome, &work) in recorded.outcomes.iter().zip(&recorded.work_ms) {
            let incident = within(outcome.scheduled, main) || within(outcome.scheduled, after);
            for attempt in &outcome.attempts {
                if attempt.ok() && within(attempt.ended, main) {
                    work_served_ms += work;
                }
                if attempt.sent >= warm_end {
                    m.rejections += usize::from(attempt.rejected());
                    if outcome.kind == SHEDDABLE {
                        m.sheddable_attempts += 1;
                        m.wrong_sheds += usize::from(attempt.rejected() && low_util(attempt.sent));
                    }
                }
            }
            let last = outcome.last();
            if incident && !last.ok() && !last.rejected() {
                m.errors += 1;
            }
            match outcome.kind {
                CRITICAL if incident => {
                    m.critical_sent += 1;
                    if outcome.ok() {
                        m.critical_ok += 1;
                        critical_latencies.push(micros(outcome.latency()));
                    }
                }
                SHEDDABLE if within(outcome.scheduled, main) => {
                    m.sheddable_sent += 1;
                    m.sheddable_ok += usize::from(outcome.ok());
                }
                _ => {}
            }
        }
        critical_latencies.sort_unstable();
        m.critical_p99_ms =
            common::quantile_us(&critical_latencies, 0.99).map(|us| f64::from(us) / 1000.0);
        let has_burst = scenario.phases.iter().any(|p| p.burst > 0);
        if let (Some((from, to)), false) = (main, has_burst) {
            let bypass_ms = recorded.bypass_ok as u64 * WORK_MS;
            let pool_ms = WORKERS as f64 * (to - from).as_secs_f64() * 1000.0;
            m.goodput = Some((work_served_ms + bypass_ms) as f64 / pool_ms);
        }
        m.settled = match (scenario.recovery, after) {
            (Recovery::LastRejection, Some(after)) => {
                last_rejection(&recorded.outcomes, after, m.rejections)
            }
            (Recovery::ServedAgain, Some(after)) => {
                served_again(&recorded.outcomes, span_of(Role::Before), after)
            }
            _ => Settled::NotMeasured,
        };
        m
    }

    fn critical_success(&self) -> f64 {
        100.0 * self.critical_ok as f64 / self.critical_sent.max(1) as f64
    }

    /// The critical p99 over its reference, when the scenario has one.
    fn p99_ratio(&self, scenario: &Scenario, unloaded_ms: f64) -> Option<f64> {
        let p99 = self.critical_p99_ms?;
        match scenario.p99_base {
            P99Base::Unloaded => Some(p99 / unloaded_ms),
            P99Base::Service(ms) => Some(p99 / ms as f64),
            P99Base::None => None,
        }
    }

    pub fn row(&self, target: String, scenario: &Scenario, unloaded_ms: f64) -> Vec<String> {
        let pct = |part: usize, whole: usize| {
            if whole == 0 {
                "-".to_string()
            } else {
                format!("{:.1}%", 100.0 * part as f64 / whole as f64)
            }
        };
        let p99 = match (self.critical_p99_ms, self.p99_ratio(scenario, unloaded_ms)) {
            (Some(ms), Some(ratio)) => format!("{ms:.1} ms ({ratio:.2}x)"),
            (Some(ms), None) => format!("{ms:.1} ms"),
            (None, _) => "-".to_string(),
        };
        let settled = match self.settled {
            Settled::NotMeasured => "n/a".to_string(),
            Settled::NeverShed => "-".to_string(),
            Settled::After(d) => format!("{:.2} s", d.as_secs_f64()),
            Settled::NotWithin(d) => format!(">{:.1} s", d.as_secs_f64()),
        };
        vec![
            target,
            scenario.label.clone(),
            self.goodput
                .map_or("-".to_string(), |g| format!("{:.1}%", 100.0 * g)),
            self.busy_mean
                .map_or("-".to_string(), |b| format!("{:.0}%", 100.0 * b)),
            format!(
                "{:.2}% ({}/{})",
                self.critical_success(),
                self.critical_ok,
                self.critical_sent
            ),
            p99,
            pct(self.sheddable_ok, self.sheddable_sent),
            format!(
                "{} ({})",
                self.wrong_sheds,
                pct(self.wrong_sheds, self.sheddable_attempts)
            ),
            self.rejections.to_string(),
            self.errors.to_string(),
            settled,
        ]
    }
}

/// What the columns mean; a table's note says what differs for its scenario.
pub const LEGEND: &str = "Columns. The incident is the overload phase. goodput: work \
served (2xx answers, each weighted by its work time) during the incident over the pool's \
capacity for that time. busy: mean busy/max of the backend's pool during the incident, \
sampled every 50 ms (Tomcat: its actuator, less the probe's own thread, and a full \
pool while a probe waited for a thread; simulated: its counter). critical ok and p99: critical requests scheduled in the incident and the 2 s \
at 0.5x after it; p99 of the 2xx ones, from their scheduled send time, and against the \
unloaded p99. sheddable ok: sheddable requests of the incident answered 2xx. shed at \
<70% util: sheddable requests answered 429/503 in a 100 ms window in which every sampled \
busy/max was under 70% (share of all sheddable requests after the warm-up; a window with \
no sample counts as busy). 429/503: rejections after the warm-up. errors: no answer \
within 2 s, or another status. shedding stops: from the end of the overload to the last \
429/503 seen (`-`: the target never rejected; `>2.0 s`: still rejecting at the end).";

pub const COLUMNS: [&str; 11] = [
    "target",
    "load",
    "goodput",
    "busy",
    "critical ok",
    "critical p99 (x ref)",
    "sheddable ok",
    "shed at <70% util",
    "429/503",
    "errors",
    "shedding stops",
];

/// `(role, from, to)` of every phase, as offsets from the start.
fn spans(scenario: &Scenario) -> Vec<(Role, Duration, Duration)> {
    let mut from = Duration::ZERO;
    scenario
        .phases
        .iter()
        .map(|phase| {
            let span = (phase.role, from, from + phase.length);
            from += phase.length;
            span
        })
        .collect()
}

/// The highest utilisation sampled in each 100 ms window; `None` for a window with
/// no sample (for Tomcat: the probe waited in its queue, so the pool was full).
fn utilisation_windows(samples: &[(Duration, f64)]) -> Vec<Option<f64>> {
    let mut windows: Vec<Option<f64>> = Vec::new();
    for &(at, utilisation) in samples {
        let i = (at.as_millis() / UTIL_WINDOW.as_millis()) as usize;
        if windows.len() <= i {
            windows.resize(i + 1, None);
        }
        windows[i] = Some(windows[i].map_or(utilisation, |u: f64| u.max(utilisation)));
    }
    windows
}

/// From the start of `after` to the end of the last 429/503 answered in it.
fn last_rejection(outcomes: &[Outcome], after: (Duration, Duration), rejections: usize) -> Settled {
    let (from, to) = after;
    let last = outcomes
        .iter()
        .flat_map(|o| &o.attempts)
        .filter(|a| a.rejected() && a.ended >= from)
        .map(|a| a.ended)
        .max();
    match last {
        None if rejections == 0 => Settled::NeverShed,
        None => Settled::After(Duration::ZERO),
        // Still rejecting at the end of the tail: it did not stop within it.
        Some(at) if at + Duration::from_millis(200) >= to => Settled::NotWithin(to - from),
        Some(at) => Settled::After(at - from),
    }
}

/// From the start of `after` to the first 250 ms window (in 50 ms steps, by scheduled
/// time) in which sheddable requests are served at 90% of the share served in `before`.
fn served_again(
    outcomes: &[Outcome],
    before: Option<(Duration, Duration)>,
    after: (Duration, Duration),
) -> Settled {
    let share = |from: Duration, to: Duration| {
        let (mut sent, mut ok) = (0usize, 0usize);
        for o in outcomes
            .iter()
            .filter(|o| o.kind == SHEDDABLE && o.scheduled >= from && o.scheduled < to)
        {
            sent += 1;
            ok += usize::from(o.ok());
        }
        (sent, ok)
    };
    let reference = before.map_or(1.0, |(from, to)| {
        let (sent, ok) = share(from, to);
        ok as f64 / sent.max(1) as f64
    });
    let window = Duration::from_millis(250);
    let step = Duration::from_millis(50);
    let (from, to) = after;
    let mut at = from;
    while at + window <= to {
        let (sent, ok) = share(at, at + window);
        if ok > 0 && ok as f64 >= 0.9 * reference * sent as f64 {
            return Settled::After(at - from);
        }
        at += step;
    }
    Settled::NotWithin(to - from)
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

/// A markdown table with its columns padded, readable as text too.
pub fn print_markdown(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|&w| "-".repeat(w)).collect());
    for row in rows {
        line(row.clone());
    }
}

/// The targets, each met or not by loadgate in this run.
pub fn summary(results: &HashMap<(String, Target), Measured>, unloaded: f64) {
    let get = |key: &str, target: Target| results.get(&(key.to_string(), target));
    let mut rows = Vec::new();
    let mut check = |what: String, value: String, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        rows.push(vec![what, value, verdict.to_string()]);
    };
    let p99_limit = 1.5 * unloaded;
    let critical_checks =
        |check: &mut dyn FnMut(String, String, Option<bool>), key: &str, label: &str| {
            let m = get(key, Target::Loadgate);
            check(
                format!("{label}: critical success >= 99.9%"),
                m.map_or("-".into(), |m| format!("{:.2}%", m.critical_success())),
                m.map(|m| m.critical_success() >= 99.9),
            );
            let p99 = m.and_then(|m| m.critical_p99_ms);
            check(
                format!("{label}: critical p99 <= 1.5x unloaded ({p99_limit:.1} ms)"),
                p99.map_or("-".into(), |p| format!("{p:.1} ms")),
                p99.map(|p| p <= p99_limit),
            );
        };

    let steady = get("steady", Target::Loadgate);
    check(
        "0.5x: zero sheds".to_string(),
        steady.map_or("-".into(), |m| format!("{} rejected", m.rejections)),
        steady.map(|m| m.rejections == 0),
    );
    for load in ["2x", "4x", "10x"] {
        let key = format!("step-{load}");
        critical_checks(&mut check, &key, load);
        let m = get(&key, Target::Loadgate);
        let goodput = m.and_then(|m| m.goodput);
        check(
            format!("{load}: goodput >= 85%"),
            goodput.map_or("-".into(), |g| format!("{:.1}%", 100.0 * g)),
            goodput.map(|g| g >= 0.85),
        );
        let ours = m.and_then(|m| m.critical_p99_ms);
        let theirs = get(&key, Target::HaProxy).and_then(|m| m.critical_p99_ms);
        check(
            format!("{load}: critical p99 below HAProxy's"),
            match (ours, theirs) {
                (Some(a), Some(b)) => format!("{a:.1} ms vs {b:.1} ms"),
                _ => "-".into(),
            },
            ours.zip(theirs).map(|(a, b)| a < b),
        );
    }
    let slow = get("slowdown", Target::Loadgate);
    check(
        "slowdown: critical success >= 99.9%".to_string(),
        slow.map_or("-".into(), |m| format!("{:.2}%", m.critical_success())),
        slow.map(|m| m.critical_success() >= 99.9),
    );
    let slow_p99 = slow.and_then(|m| m.critical_p99_ms);
    check(
        format!(
            "slowdown: critical p99 <= 2x slowed service time ({} ms)",
            2 * SLOW_MS
        ),
        slow_p99.map_or("-".into(), |p| format!("{p:.1} ms")),
        slow_p99.map(|p| p <= 2.0 * SLOW_MS as f64),
    );
    let again = slow.map(|m| m.settled);
    check(
        "slowdown: sheddable served again within 1 s of recovery".to_string(),
        match again {
            Some(Settled::After(d)) => format!("{:.2} s", d.as_secs_f64()),
            Some(Settled::NotWithin(d)) => format!("not within {:.1} s", d.as_secs_f64()),
            _ => "-".into(),
        },
        again.map(|s| matches!(s, Settled::After(d) if d <= Duration::from_secs(1))),
    );
    let burst = get("burst", Target::Loadgate);
    check(
        "burst: zero critical rejected".to_string(),
        burst.map_or("-".into(), |m| {
            format!(
                "{} of {} not served",
                m.critical_sent - m.critical_ok,
                m.critical_sent
            )
        }),
        burst.map(|m| m.critical_ok == m.critical_sent),
    );
    critical_checks(&mut check, "two", "two instances at 4x");
    critical_checks(&mut check, "retry", "retry storm at 4x");
    critical_checks(&mut check, "bypass", "bypass");

    println!("### summary: loadgate (defaults) against the targets\n");
    let met = rows.iter().filter(|r| r[2] == "met").count();
    print_markdown(&["target", "loadgate", "verdict"], &rows);
    println!("\n{met} of {} targets met.", rows.len());
}
