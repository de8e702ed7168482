//! The pool's counters: what it has done (connections opened, reused, retired,
//! stale reuses, connect retries), each a metric with a local copy that
//! [`Pool::stats`] reads for tests and `/status`.
//!
//! Not here: deciding when any of it happens (`mod.rs`, `conn.rs`, `idle.rs`); the
//! metric names themselves (`crate::metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Pool;
use crate::metrics as m;

/// What the pool has done since it started; the same figures as its metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub opened: u64,
    pub reused: u64,
    pub retired_idle: u64,
    pub retired_max: u64,
    pub closed_by_backend: u64,
    pub discarded: u64,
    pub stale_retried: u64,
    pub stale_not_retryable: u64,
    pub connect_retries: u64,
}

/// A connection event, the `event` label of the connections metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// A new TCP connection was opened.
    Opened,
    /// An idle connection was taken for a request.
    Reused,
    /// Idle longer than the idle limit: closed by us before the backend does.
    RetiredIdle,
    /// Reached the backend's request limit (`Keep-Alive: max`, or a learned one).
    RetiredMax,
    /// The backend closed it, or said it would (`Connection: close`).
    ClosedByBackend,
    /// Not reusable: the idle stack was full, or the response body was not read to its end.
    Discarded,
}

const EVENTS: [Event; 6] = [
    Event::Opened,
    Event::Reused,
    Event::RetiredIdle,
    Event::RetiredMax,
    Event::ClosedByBackend,
    Event::Discarded,
];

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Opened => "opened",
            Event::Reused => "reused",
            Event::RetiredIdle => "retired_idle",
            Event::RetiredMax => "retired_max",
            Event::ClosedByBackend => "closed_by_backend",
            Event::Discarded => "discarded",
        }
    }
}

/// A metric counter with a local copy, so tests and `/status` can read it directly.
pub(super) struct Count {
    metric: metrics::Counter,
    value: AtomicU64,
}

impl Count {
    fn new(metric: metrics::Counter) -> Count {
        Count {
            metric,
            value: AtomicU64::new(0),
        }
    }

    pub(super) fn inc(&self) {
        self.metric.increment(1);
        self.value.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

pub(super) struct Counters {
    events: [Count; EVENTS.len()],
    pub(super) stale_retried: Count,
    pub(super) stale_not_retryable: Count,
    pub(super) connect_retries: Count,
}

impl Counters {
    pub(super) fn new(upstream: &str) -> Counters {
        let stale = |outcome: &'static str| {
            Count::new(metrics::counter!(m::UPSTREAM_STALE_REUSE_TOTAL,
                m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_OUTCOME => outcome))
        };
        Counters {
            events: EVENTS.map(|event| {
                Count::new(metrics::counter!(m::UPSTREAM_CONNECTIONS_TOTAL,
                    m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_EVENT => event.as_str()))
            }),
            stale_retried: stale("retried"),
            stale_not_retryable: stale("not_retryable"),
            connect_retries: Count::new(metrics::counter!(m::UPSTREAM_CONNECT_RETRIES_TOTAL,
                m::LABEL_UPSTREAM => upstream.to_string())),
        }
    }

    pub(super) fn event(&self, event: Event) {
        self.events[event as usize].inc();
    }
}

impl Pool {
    pub(crate) fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        let e = |event: Event| c.events[event as usize].get();
        PoolStats {
            opened: e(Event::Opened),
            reused: e(Event::Reused),
            retired_idle: e(Event::RetiredIdle),
            retired_max: e(Event::RetiredMax),
            closed_by_backend: e(Event::ClosedByBackend),
            discarded: e(Event::Discarded),
            stale_retried: c.stale_retried.get(),
            stale_not_retryable: c.stale_not_retryable.get(),
            connect_retries: c.connect_retries.get(),
        }
    }
}
