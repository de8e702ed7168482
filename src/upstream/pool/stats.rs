//! The pool's counters: what it has done (connections opened, reused, retired,
//! stale reuses, connect retries), each a metric with a local copy that
//! [`Pool::stats`] reads for tests and `/status`.
//!
//! Not here: deciding when any of it happens (`mod.rs`, `conn.rs`, `idle.rs`); the
//! metric names themselves (`crate::metrics`).

use super::Pool;
use crate::metrics::{self as m, Count, CounterTable, Label as _};

/// What the pool has done since it started; the same figures as its metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub opened: u64,
    pub reused: u64,
    pub retired_idle: u64,
    pub retired_max: u64,
    pub closed_by_backend: u64,
    pub discarded: u64,
    pub upgraded: u64,
    pub stale_retried: u64,
    pub stale_not_retryable: u64,
    pub connect_retries: u64,
}

crate::metrics::label_values! {
    /// A connection event, the `event` label of the connections metric.
    pub(super) enum Event {
        /// A new TCP connection was opened.
        Opened => "opened",
        /// An idle connection was taken for a request.
        Reused => "reused",
        /// Idle longer than the idle limit: closed by us before the backend does.
        RetiredIdle => "retired_idle",
        /// Reached the backend's request limit (`Keep-Alive: max`, or a learned one).
        RetiredMax => "retired_max",
        /// The backend closed it, or said it would (`Connection: close`).
        ClosedByBackend => "closed_by_backend",
        /// Not reusable: the idle stack was full, the response body was not read to its
        /// end, or the response came before the request body had been sent in full.
        Discarded => "discarded",
        /// Answered `101 Switching Protocols`: it left the pool to carry the upgraded
        /// protocol (a WebSocket) until either side closes.
        Upgraded => "upgraded",
    }
}

crate::metrics::label_values! {
    /// What became of a request whose reused connection died before any response
    /// byte, the `outcome` label of the stale-reuse metric.
    pub(super) enum Stale {
        /// Sent again on a fresh connection.
        Retried => "retried",
        /// Could not be sent again (its body was already streaming): answered 502.
        NotRetryable => "not_retryable",
    }
}

pub(super) struct Counters {
    pub(super) events: CounterTable<Event>,
    pub(super) stale: CounterTable<Stale>,
    pub(super) connect_retries: Count,
}

impl Counters {
    pub(super) fn new(upstream: &str) -> Counters {
        Counters {
            events: CounterTable::new(|event: Event| {
                metrics::counter!(m::UPSTREAM_CONNECTIONS_TOTAL,
                    m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_EVENT => event.as_str())
            }),
            stale: CounterTable::new(|outcome: Stale| {
                metrics::counter!(m::UPSTREAM_STALE_REUSE_TOTAL,
                    m::LABEL_UPSTREAM => upstream.to_string(), m::LABEL_OUTCOME => outcome.as_str())
            }),
            connect_retries: Count::new(metrics::counter!(m::UPSTREAM_CONNECT_RETRIES_TOTAL,
                m::LABEL_UPSTREAM => upstream.to_string())),
        }
    }

    pub(super) fn event(&self, event: Event) {
        self.events.increment(event);
    }
}

impl Pool {
    pub(crate) fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        let e = |event: Event| c.events.get(event);
        PoolStats {
            opened: e(Event::Opened),
            reused: e(Event::Reused),
            retired_idle: e(Event::RetiredIdle),
            retired_max: e(Event::RetiredMax),
            closed_by_backend: e(Event::ClosedByBackend),
            discarded: e(Event::Discarded),
            upgraded: e(Event::Upgraded),
            stale_retried: c.stale.get(Stale::Retried),
            stale_not_retryable: c.stale.get(Stale::NotRetryable),
            connect_retries: c.connect_retries.get(),
        }
    }
}
