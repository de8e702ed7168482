//! The overload bench's scenarios: what load each one sends when, as phases of
//! constant arrival (critical and sheddable rates, work per request, retries,
//! bypassing clients, a burst), and which figures its table reports.
//!
//! Only `benches/overload.rs` includes this file (by path); it is not a shared helper.

use std::time::Duration;

use super::{
    BASE_LOAD, BURST, BURST_MS, BYPASS_CLIENTS, CAPACITY, CRITICAL_RATE, RETRIES,
    SLOW_CRITICAL_RATE, SLOW_MS, TAIL, WARMUP, WORK_MS,
};

/// What a phase is for in the measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not measured.
    Warmup,
    /// Normal service before an incident: the reference for "served again".
    Before,
    /// The incident: goodput, critical and sheddable figures.
    Main,
    /// After the incident: critical figures, and how long the effects last.
    After,
}

/// A stretch of constant load.
#[derive(Debug, Clone)]
pub struct Phase {
    pub role: Role,
    pub length: Duration,
    pub critical_rate: f64,
    pub sheddable_rate: f64,
    pub critical_ms: u64,
    pub sheddable_ms: u64,
    /// Re-sends of a rejected sheddable request.
    pub retries: u32,
    /// Closed-loop clients straight at the backend during the phase.
    pub bypass: usize,
    /// Critical requests all sent at the start of the phase.
    pub burst: usize,
}

impl Phase {
    /// `load` times capacity, a quarter of capacity of it critical, 50 ms work.
    fn at(role: Role, length: Duration, load: f64) -> Phase {
        Phase {
            role,
            length,
            critical_rate: CRITICAL_RATE,
            sheddable_rate: (load * CAPACITY - CRITICAL_RATE).max(0.0),
            critical_ms: WORK_MS,
            sheddable_ms: WORK_MS,
            retries: 0,
            bypass: 0,
            burst: 0,
        }
    }

    /// No load at all.
    fn idle(role: Role, length: Duration) -> Phase {
        let mut phase = Phase::at(role, length, 0.0);
        phase.critical_rate = 0.0;
        phase.sheddable_rate = 0.0;
        phase
    }

    /// `rate` of the same total load critical, the rest sheddable.
    fn critical_rate(mut self, rate: f64) -> Phase {
        let total = self.critical_rate + self.sheddable_rate;
        self.critical_rate = rate;
        self.sheddable_rate = (total - rate).max(0.0);
        self
    }

    fn work_ms(mut self, critical: u64, sheddable: u64) -> Phase {
        self.critical_ms = critical;
        self.sheddable_ms = sheddable;
        self
    }
}

/// How a scenario's "shedding stops" column is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    None,
    /// Time from the end of the overload to the last 429/503 answered.
    LastRejection,
    /// Time from the end of the slowdown to the first 250 ms in which sheddable
    /// requests are served at 90% of the share served before it.
    ServedAgain,
}

/// What the critical p99 is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum P99Base {
    Unloaded,
    /// A multiple of this service time (the slowed dependency).
    Service(u64),
    None,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    /// Key in the results, e.g. `step-4x`.
    pub key: String,
    /// The row's load column.
    pub label: String,
    pub phases: Vec<Phase>,
    /// loadgate instances sharing the load (baselines run only with 1).
    pub instances: usize,
    pub recovery: Recovery,
    pub p99_base: P99Base,
}

/// Scenarios printed as one table.
pub struct Group {
    pub key: &'static str,
    pub title: String,
    /// What differs from the legend for this table; may be empty.
    pub note: &'static str,
    pub scenarios: Vec<Scenario>,
}

/// Warm-up, `main` at `load`, then the 0.5x tail; `tweak` adjusts the main phase.
fn overload(
    key: &str,
    label: &str,
    secs: Duration,
    load: f64,
    tweak: impl Fn(&mut Phase),
) -> Scenario {
    let mut main = Phase::at(Role::Main, secs, load);
    tweak(&mut main);
    let mut tail = Phase::at(Role::After, TAIL, BASE_LOAD);
    tail.retries = main.retries;
    Scenario {
        key: key.to_string(),
        label: label.to_string(),
        phases: vec![Phase::at(Role::Warmup, WARMUP, BASE_LOAD), main, tail],
        instances: 1,
        recovery: Recovery::LastRejection,
        p99_base: P99Base::Unloaded,
    }
}

pub fn scenarios(secs: Duration) -> Vec<Group> {
    let single = |s: Scenario| vec![s];
    let steady = Scenario {
        key: "steady".to_string(),
        label: "0.5x".to_string(),
        phases: vec![
            Phase::at(Role::Warmup, WARMUP, BASE_LOAD),
            Phase::at(Role::Main, secs, BASE_LOAD),
        ],
        instances: 1,
        recovery: Recovery::None,
        p99_base: P99Base::Unloaded,
    };
    let at_1x = |role, length| Phase::at(role, length, 1.0).critical_rate(SLOW_CRITICAL_RATE);
    let slowdown = Scenario {
        key: "slowdown".to_string(),
        label: format!("1x, {WORK_MS}->{SLOW_MS} ms"),
        phases: vec![
            at_1x(Role::Warmup, WARMUP),
            at_1x(Role::Before, Duration::from_secs(2)),
            at_1x(Role::Main, secs * 2).work_ms(SLOW_MS, SLOW_MS),
            at_1x(Role::After, Duration::from_secs(3)),
        ],
        instances: 1,
        recovery: Recovery::ServedAgain,
        p99_base: P99Base::Service(SLOW_MS),
    };
    let mut burst_phase = Phase::idle(Role::Main, Duration::from_secs(1));
    burst_phase.burst = BURST;
    let burst = Scenario {
        key: "burst".to_string(),
        label: format!("{BURST} at once"),
        phases: vec![
            Phase::at(Role::Warmup, WARMUP, BASE_LOAD),
            // A quiet moment, so the burst meets an idle pool.
            Phase::idle(Role::Warmup, Duration::from_millis(500)),
            burst_phase,
        ],
        instances: 1,
        recovery: Recovery::None,
        p99_base: P99Base::None,
    };
    let mut two = overload("two", "4x", secs, 4.0, |_| {});
    two.instances = 2;
    vec![
        Group {
            key: "steady",
            title: "1. steady load at 0.5x".to_string(),
            note: "",
            scenarios: single(steady),
        },
        Group {
            key: "step",
            title: "2. step overload (then 2 s at 0.5x)".to_string(),
            note: "",
            scenarios: [2.0, 4.0, 10.0]
                .into_iter()
                .map(|load| overload(&format!("step-{load}x"), &format!("{load}x"), secs, load, |_| {}))
                .collect(),
        },
        Group {
            key: "slowdown",
            title: format!(
                "3. dependency slowdown: {WORK_MS} -> {SLOW_MS} ms for {:?}, at 1x \
                 (critical {SLOW_CRITICAL_RATE:.0} req/s: a quarter of the slowed capacity)",
                secs * 2
            ),
            note: "Here the incident is the slowdown: goodput is relative to the slowed \
                   capacity (16 req/s); critical figures cover the slowdown and the 3 s \
                   after it, p99 against the slowed service time (500 ms); the last column \
                   is \"sheddable served again\": from the end of the slowdown to the \
                   first 250 ms (by scheduled time) in which sheddable requests are served \
                   at 90% of the share served in the 2 s before it (`>3.0 s`: not within \
                   the 3 s measured).",
            scenarios: single(slowdown),
        },
        Group {
            key: "burst",
            title: format!("4. burst: {BURST} critical requests at once, {BURST_MS} ms work each"),
            note: "critical ok: burst requests answered 2xx; their p99 is absolute (no \
                   unloaded reference for 1 ms of work).",
            scenarios: single(burst),
        },
        Group {
            key: "retry",
            title: format!("5. retry storm at 4x: sheddable clients re-send every 429/503 up to {RETRIES} times"),
            note: "sheddable ok: requests served, retries included; 429/503 and shed at \
                   <70% util count every rejected attempt.",
            scenarios: single(overload("retry", "4x", secs, 4.0, |p| p.retries = RETRIES)),
        },
        Group {
            key: "two",
            title: "6. two loadgate instances in front of one backend, half of 4x each".to_string(),
            note: "baselines skipped: a single nginx or HAProxy at 4x is in table 2.",
            scenarios: single(two),
        },
        Group {
            key: "bypass",
            title: format!(
                "7. bypass: {BYPASS_CLIENTS} closed-loop clients straight at the backend, \
                 critical plus 2x sheddable through the proxy"
            ),
            note: "goodput counts the bypassing clients' work too (they hold about 75% of \
                   the pool).",
            scenarios: single(overload("bypass", "crit + 2x shed", secs, 0.0, |p| {
                p.sheddable_rate = 2.0 * CAPACITY;
                p.bypass = BYPASS_CLIENTS;
            })),
        },
        Group {
            key: "expensive",
            title: format!("8. 4x with sheddable work at {SLOW_MS} ms (critical {WORK_MS} ms)"),
            note: "",
            scenarios: single(overload("expensive", "4x", secs, 4.0, |p| {
                p.sheddable_ms = SLOW_MS;
            })),
        },
    ]
}
