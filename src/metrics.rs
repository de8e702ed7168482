//! Metric names, labels and descriptions, declared in one place.
//!
//! Every metric loadgate emits is named here, so the README's list, the admin
//! endpoint and the code agree. Label values come from small closed sets (route
//! class, status class, error kind, upstream name from config), never raw paths.
//!
//! # Why every label set is closed
//!
//! `route` and `upstream` take only the names written in the config (and `none` for a
//! request no route matched), never anything a client sends: a label taken from a path,
//! a host or a header would let any client mint series until the proxy and the
//! Prometheus server behind it run out of memory. Closed sets also keep the count
//! small and known: a route has one class and one upstream, so the request series are
//! (routes + 1) x 5 status classes and routes + 1 duration histograms; admission
//! decisions are routes x 8 outcomes; cache lookups routes x 6 results. Each route's
//! handles are registered when its config generation is built (`forward/routes.rs`),
//! so the hot path never looks a metric up by name. A route whose class or upstream a
//! reload changes starts new series; the old ones stay in the scrape at their last
//! value until the process restarts.
//!
//! Process metrics (`process_*`, the Prometheus client convention) are read from
//! `/proc/self` when `/metrics` is scraped: see [`process`].

pub mod process;

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by `route` and `upstream` (names from the config), `class` (the
/// route's class) and `status` (`1xx`…`5xx`). A request no route matched (a 404, a
/// probe, a malformed request) has `route`, `upstream` and `class` `none`.
pub const REQUESTS_TOTAL: &str = "loadgate_requests_total";
/// Time from receiving the request head to the end of the response body, by `route`,
/// `upstream` and `class` (`none` as for [`REQUESTS_TOTAL`]).
pub const REQUEST_DURATION_SECONDS: &str = "loadgate_request_duration_seconds";
/// Requests this proxy has in flight to an upstream, by `upstream`.
pub const UPSTREAM_INFLIGHT: &str = "loadgate_upstream_inflight";
/// Failed upstream exchanges, by `upstream` and `kind` (see [`ErrorKind`](crate::http::error::UpstreamErrorKind)).
pub const UPSTREAM_ERRORS_TOTAL: &str = "loadgate_upstream_errors_total";
/// Requests whose reused upstream connection died before any response byte, by
/// `upstream` and `outcome` (`retried` on a fresh connection, `not_retryable`: answered 502).
pub const UPSTREAM_STALE_REUSE_TOTAL: &str = "loadgate_upstream_stale_reuse_total";
/// Connect attempts after a failed one (each waits an exponential backoff), by `upstream`.
pub const UPSTREAM_CONNECT_RETRIES_TOTAL: &str = "loadgate_upstream_connect_retries_total";
/// Pooled upstream connection events, by `upstream` and `event` (`opened`, `reused`,
/// `retired_idle`, `retired_max`, `closed_by_backend`, `discarded`, `upgraded`).
pub const UPSTREAM_CONNECTIONS_TOTAL: &str = "loadgate_upstream_connections_total";
/// Backends taken out of rotation after consecutive connect failures, by `upstream` and `backend`.
pub const BACKEND_EJECTIONS_TOTAL: &str = "loadgate_backend_ejections_total";
/// 1 when a backend is in rotation, 0 when its health check fails, by `upstream` and `backend`.
pub const BACKEND_HEALTHY: &str = "loadgate_backend_healthy";
/// Probe requests answered by the proxy itself on the data port.
pub const PROBES_TOTAL: &str = "loadgate_probe_requests_total";
/// Requests refused as malformed before forwarding: by the HTTP parser (400, 431), for
/// ambiguous framing, or by the request rules (host, path, header names).
pub const BAD_REQUESTS_TOTAL: &str = "loadgate_bad_requests_total";
/// Config reloads, by `result` (`ok` / `error`).
pub const CONFIG_RELOADS_TOTAL: &str = "loadgate_config_reloads_total";
/// Client connections accepted on the data port.
pub const CONNECTIONS_TOTAL: &str = "loadgate_connections_total";
/// Client connections open on the data port.
pub const CONNECTIONS_OPEN: &str = "loadgate_connections_open";
/// Client connections open on the data port, by `worker` thread (0-based, as in the
/// thread's name `loadgate-worker-N`).
pub const WORKER_CONNECTIONS_OPEN: &str = "loadgate_worker_connections_open";
/// Client connections closed at accept because `max_connections` were already open.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "loadgate_connections_refused_total";
/// Client connections closed by a timeout, by `kind`: `header` (a request head took longer
/// than `header_read_timeout_ms`), `idle` (keep-alive idle longer than `idle_timeout_ms`)
/// or `send` (the client read nothing of a response for `send_timeout_ms`), and
/// `upgraded_idle` (an upgraded connection silent both ways for `upgrade_idle_timeout_ms`).
pub const CONNECTIONS_TIMED_OUT_TOTAL: &str = "loadgate_connections_timed_out_total";
/// TLS handshakes on data listeners, by `result`: `ok`, or why one failed: `timeout`,
/// `eof` (the client left), `not_tls`, `protocol_version`, `no_common_parameters`,
/// `alert_received`, `io_error`, `other`.
pub const TLS_HANDSHAKES_TOTAL: &str = "loadgate_tls_handshakes_total";
/// PROXY protocol headers read on listeners with `proxy_protocol = true`, by `result`:
/// `ok` (a client address), `local` (none: the balancer's own connection), or why the
/// connection was closed: `timeout`, `not_proxy_protocol`, `malformed`,
/// `unsupported_version`, `eof`, `io`.
pub const PROXY_PROTOCOL_HEADERS_TOTAL: &str = "loadgate_proxy_protocol_headers_total";
/// Upgraded (WebSocket) connections open, client and backend spliced, by `upstream`.
pub const UPGRADED_CONNECTIONS_OPEN: &str = "loadgate_upgraded_connections_open";
/// WebSocket upgrade requests, by `upstream` and `outcome`: `switched` (the backend
/// answered 101 and the connection was spliced), `declined` (it answered anything else,
/// passed on as an ordinary response), `disabled` (the route has `websocket = false`: sent
/// on without `Upgrade`), `failed` (a 101 whose socket could not be taken over: 502).
pub const UPGRADES_TOTAL: &str = "loadgate_upgrades_total";

/// Utilisation of an upstream, by `upstream` and `source`: `local` (own in-flight ÷ pool),
/// `reported` (the backends' own busy ÷ max), `in_force` ((own + external) ÷ pool).
pub const UPSTREAM_UTILISATION: &str = "loadgate_upstream_utilisation";
/// Busy workers the backends report beyond this proxy's own requests, by `upstream`.
pub const UPSTREAM_EXTERNAL_LOAD: &str = "loadgate_upstream_external_load";
/// 1 for the signal source in force for an upstream (`local`, `reported`, `adaptive`), else 0.
pub const SIGNAL_SOURCE: &str = "loadgate_upstream_signal_source";
/// The utilisation at which an upstream starts shedding a route class, by `upstream` and
/// `class`: the upstream's `[upstream.shedding]` thresholds (a route's own `threshold`
/// is not shown here). Rejections ramp up to every request at the threshold + `band`.
pub const ADMISSION_THRESHOLD: &str = "loadgate_admission_threshold";
/// 1 while a backend's last good actuator report still counts (it is younger than three
/// poll intervals), 0 before the first one and once it has gone stale:
/// the upstream then runs on the local signal alone. By `upstream` and `backend`; only
/// for upstreams whose actuator is polled.
pub const ACTUATOR_REPORT_FRESH: &str = "loadgate_actuator_report_fresh";
/// Actuator polls, by `upstream`, `backend` and `result`: `ok`, or why no report came of
/// it: `not_found`, `timeout`, `connect`, `status`, `malformed`, `invalid`.
pub const ACTUATOR_POLLS_TOTAL: &str = "loadgate_actuator_polls_total";
/// Admission decisions, by `route`, `upstream`, `class` and `outcome` (admitted, shed,
/// queued, queue_timeout, queue_full; in shadow mode would_shed, would_queue, would_reject).
pub const ADMISSION_DECISIONS_TOTAL: &str = "loadgate_admission_decisions_total";
/// Time critical requests spent in an upstream's admission queue, by `upstream` and
/// `outcome`: `admitted` (a slot freed), `queue_timeout` (no slot within the queue
/// timeout, or none expected in time: refused with 503) or `cancelled` (the client went
/// away while waiting). Every request that enters the queue is recorded once, as it
/// leaves; one refused at once because the queue held `queue_size` (`queue_full`) never
/// entered it.
pub const ADMISSION_QUEUE_WAIT_SECONDS: &str = "loadgate_admission_queue_wait_seconds";
/// Requests shed with 429.
pub const SHED_TOTAL: &str = "loadgate_shed_total";

/// Cache lookups, by `route`, `upstream` and `result` (hit, miss, stale, revalidated,
/// not_modified, uncacheable).
pub const CACHE_LOOKUPS_TOTAL: &str = "loadgate_cache_lookups_total";
/// Bytes held by a route's cache (1 KiB granularity), by `route`.
pub const CACHE_STORED_BYTES: &str = "loadgate_cache_stored_bytes";
/// Objects held by a route's cache, by `route`.
pub const CACHE_STORED_OBJECTS: &str = "loadgate_cache_stored_objects";
/// Objects evicted from a route's cache to stay within its byte bound, by `route`.
pub const CACHE_EVICTIONS_TOTAL: &str = "loadgate_cache_evictions_total";

/// Requests waiting for another request's fetch of the same key (coalesced misses), by `route`.
pub const CACHE_COALESCED_WAITING: &str = "loadgate_cache_coalesced_waiting";

/// Access log lines dropped: the buffer to the writer was full (the disk or stdout could
/// not keep up), or the write failed.
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "loadgate_access_log_dropped_total";
/// Resident memory of the process, in bytes. No labels; like every `process_*` metric,
/// read from `/proc/self` at each scrape, and absent where there is no `/proc` (not Linux).
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";
/// Virtual memory of the process, in bytes. No labels.
pub const PROCESS_VIRTUAL_MEMORY_BYTES: &str = "process_virtual_memory_bytes";
/// File descriptors the process has open (client and upstream connections, listeners,
/// files). No labels.
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
/// The most file descriptors the process may open (the soft `RLIMIT_NOFILE`). No labels.
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
/// CPU time the process has used, user and system together, in seconds. No labels.
pub const PROCESS_CPU_SECONDS_TOTAL: &str = "process_cpu_seconds_total";
/// When the process started, in seconds since the Unix epoch. No labels.
pub const PROCESS_START_TIME_SECONDS: &str = "process_start_time_seconds";
/// Threads of the process (workers, the admin runtime, blocking pools). No labels.
pub const PROCESS_THREADS: &str = "process_threads";

/// Label names.
pub const LABEL_CLASS: &str = "class";
pub const LABEL_STATUS: &str = "status";
pub const LABEL_UPSTREAM: &str = "upstream";
pub const LABEL_BACKEND: &str = "backend";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_RESULT: &str = "result";
pub const LABEL_SOURCE: &str = "source";
pub const LABEL_OUTCOME: &str = "outcome";
pub const LABEL_EVENT: &str = "event";
/// A route name from the config.
pub const LABEL_ROUTE: &str = "route";

/// Buckets for the request duration histogram, in seconds (1 ms … 30 s).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets for the admission queue wait histogram, in seconds (0.5 ms … 10 s): queue
/// timeouts run from a few ms to seconds (default 500 ms), and the buckets near the
/// timeout tell "admitted just in time" from "refused at the deadline".
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// The `1xx`…`5xx` label value of a status code.
pub fn status_class(status: http::StatusCode) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

/// The `status` label values, in the order of [`status_class_index`].
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The place of `status`'s class in [`STATUS_CLASSES`]; codes of 500 and above count as 5xx.
pub fn status_class_index(status: http::StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// The values of one metric label, as a field-less enum: a [`CounterTable`] keeps one
/// counter per value. Declare one with [`label_values!`], which keeps the index and
/// the order of [`ALL`](Label::ALL) the same by construction.
pub trait Label: Copy + std::fmt::Debug + 'static {
    /// Every value, in index order.
    const ALL: &'static [Self];
    /// The value's place in `ALL`.
    fn index(self) -> usize;
    /// The label value as Prometheus and `/status` show it.
    fn as_str(self) -> &'static str;
}

/// Declares a field-less enum whose variants are the values of a metric label:
/// `label_values! { pub enum Event { Opened => "opened", Reused => "reused" } }`.
#[macro_export]
macro_rules! label_values {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $value:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $crate::metrics::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn index(self) -> usize {
                self as usize
            }
            fn as_str(self) -> &'static str {
                match self { $($name::$variant => $value),+ }
            }
        }
    };
}
pub use label_values;

/// A Prometheus counter registered once, with a local copy of its value that
/// `/status` and tests read: one increment feeds both.
pub struct Count {
    metric: metrics::Counter,
    value: AtomicU64,
}

impl Count {
    pub fn new(metric: metrics::Counter) -> Count {
        Count {
            metric,
            value: AtomicU64::new(0),
        }
    }

    pub fn increment(&self) {
        self.metric.increment(1);
        self.value.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// One [`Count`] per value of label `L`: the counters behind one metric for one
/// owner (an upstream, a route), registered up front so the hot path never looks a
/// metric up by name.
pub struct CounterTable<L: Label> {
    counts: Box<[Count]>,
    label: PhantomData<L>,
}

impl<L: Label> std::fmt::Debug for CounterTable<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.values().map(|(l, n)| (l.as_str(), n)))
            .finish()
    }
}

impl<L: Label> CounterTable<L> {
    /// `register` gives the metric for one label value: the caller names the metric
    /// and its other labels.
    pub fn new(mut register: impl FnMut(L) -> metrics::Counter) -> CounterTable<L> {
        CounterTable {
            counts: L::ALL.iter().map(|&l| Count::new(register(l))).collect(),
            label: PhantomData,
        }
    }

    pub fn increment(&self, label: L) {
        self.counts[label.index()].increment();
    }

    pub fn get(&self, label: L) -> u64 {
        self.counts[label.index()].get()
    }

    /// Every label value with its count, in index order: the `/status` view.
    pub fn values(&self) -> impl Iterator<Item = (L, u64)> + '_ {
        L::ALL.iter().map(|&l| (l, self.get(l)))
    }

    /// The counts as a JSON object keyed by label value.
    pub fn to_json(&self) -> serde_json::Value {
        self.values()
            .map(|(l, n)| (l.as_str().to_string(), serde_json::Value::from(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// The request series of one route (or of the requests no route matched):
/// `loadgate_requests_total` by status class and `loadgate_request_duration_seconds`,
/// registered once for one `route`, `upstream` and `class`.
pub struct RequestSeries {
    answered: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

impl std::fmt::Debug for RequestSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestSeries")
    }
}

impl RequestSeries {
    /// The `none` route: a request no route matched.
    pub const NONE: &'static str = "none";

    pub fn new(route: &str, upstream: &str, class: &'static str) -> RequestSeries {
        RequestSeries {
            answered: STATUS_CLASSES.map(|status| {
                metrics::counter!(REQUESTS_TOTAL,
                    LABEL_ROUTE => route.to_string(), LABEL_UPSTREAM => upstream.to_string(),
                    LABEL_CLASS => class, LABEL_STATUS => status)
            }),
            duration: metrics::histogram!(REQUEST_DURATION_SECONDS,
                LABEL_ROUTE => route.to_string(), LABEL_UPSTREAM => upstream.to_string(),
                LABEL_CLASS => class),
        }
    }

    /// The series of requests no route matched: `route`, `upstream` and `class` `none`.
    pub fn unrouted() -> RequestSeries {
        RequestSeries::new(Self::NONE, Self::NONE, Self::NONE)
    }

    /// Records one answered request and how long it took.
    pub fn record(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        self.answered[status_class_index(status)].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// Things held at once, bounded when each is taken and mirrored in a gauge: the open
/// client connections (`max_connections`), the requests of a route waiting on another's
/// cache fill.
#[derive(Clone)]
pub struct Slots {
    held: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

/// One thing held; frees its slot (and the gauge's count) when dropped.
pub struct Slot(Slots);

impl Slots {
    pub fn new(gauge: metrics::Gauge) -> Slots {
        Slots {
            held: Arc::new(AtomicUsize::new(0)),
            gauge,
        }
    }

    /// A slot, unless `max` are held already. `max` is read at each take, so a raised
    /// limit (a reload) applies at once.
    pub fn try_take(&self, max: usize) -> Option<Slot> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < max).then_some(held + 1)
            })
            .ok()?;
        self.gauge.increment(1.0);
        Some(Slot(self.clone()))
    }

    /// How many are held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.decrement(1.0);
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
///
/// The recorder is global (the `metrics` facade has one), so several proxies in one
/// process (as in the tests) share it; their series differ by the upstream label.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION_SECONDS.to_string()),
                DURATION_BUCKETS,
            )
            .expect("bucket list is non-empty")
            .set_buckets_for_metric(
                Matcher::Full(ADMISSION_QUEUE_WAIT_SECONDS.to_string()),
                QUEUE_WAIT_BUCKETS,
            )
            .expect("bucket list is non-empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by route, upstream, route class and status class (route, \
         upstream and class none: no route matched)."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Request duration from head received to response body end, by route, upstream and \
         route class."
    );
    describe_gauge!(UPSTREAM_INFLIGHT, "Requests in flight to each upstream.");
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failed upstream exchanges, by upstream and kind."
    );
    describe_counter!(
        UPSTREAM_STALE_REUSE_TOTAL,
        "Reused upstream connections that died before a response, by outcome (retried, not_retryable)."
    );
    describe_counter!(
        UPSTREAM_CONNECT_RETRIES_TOTAL,
        "Upstream connect attempts made after a failed one."
    );
    describe_counter!(
        UPSTREAM_CONNECTIONS_TOTAL,
        "Pooled upstream connection events: opened, reused, retired_idle, retired_max, closed_by_backend, discarded, upgraded."
    );
    describe_counter!(
        BACKEND_EJECTIONS_TOTAL,
        "Backends taken out of rotation after consecutive connect failures."
    );
    describe_gauge!(
        BACKEND_HEALTHY,
        "1 when the backend passes its health check, else 0."
    );
    describe_gauge!(
        UPSTREAM_UTILISATION,
        "Utilisation of each upstream by source: local (own in-flight / pool), reported (the \
         backends' busy / max), in_force ((own + external) / pool, what admission compares)."
    );
    describe_gauge!(
        SIGNAL_SOURCE,
        "1 for the utilisation signal in force for each upstream (local, reported, adaptive), else 0."
    );
    describe_counter!(
        ADMISSION_DECISIONS_TOTAL,
        "Admission decisions by route, upstream, route class and outcome (admitted, shed, \
         queued, queue_timeout, queue_full; in shadow mode would_shed, would_queue, would_reject)."
    );
    describe_histogram!(
        ADMISSION_QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time critical requests waited in the admission queue, by upstream and outcome \
         (admitted, queue_timeout, cancelled)."
    );
    describe_counter!(SHED_TOTAL, "Requests shed with 429.");
    describe_gauge!(
        ADMISSION_THRESHOLD,
        "Utilisation at which each upstream starts shedding a route class."
    );
    describe_gauge!(
        ACTUATOR_REPORT_FRESH,
        "1 while the backend's last good actuator report still counts, else 0 (the local \
         signal alone is in force)."
    );
    describe_counter!(
        ACTUATOR_POLLS_TOTAL,
        "Actuator polls by upstream, backend and result (ok, not_found, timeout, connect, \
         status, malformed, invalid)."
    );
    describe_gauge!(
        UPSTREAM_EXTERNAL_LOAD,
        "Busy workers the backends report beyond this proxy's own requests (other proxies, \
         traffic that bypasses it), smoothed and faded by the report's age."
    );
    describe_counter!(PROBES_TOTAL, "Probe requests answered by the proxy itself.");
    describe_counter!(
        BAD_REQUESTS_TOTAL,
        "Requests refused as malformed before forwarding (400, 431, 501)."
    );
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads, by result.");
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections accepted on the data port."
    );
    describe_counter!(
        CACHE_LOOKUPS_TOTAL,
        "Cache lookups, by route, upstream and result."
    );
    // The process_* metrics are described where they are rendered (`process.rs`): they
    // are read from /proc at each scrape, not recorded.
    describe_gauge!(
        CACHE_STORED_BYTES,
        Unit::Bytes,
        "Bytes held by each route's cache."
    );
    describe_gauge!(CACHE_STORED_OBJECTS, "Objects held by each route's cache.");
    describe_counter!(
        CACHE_EVICTIONS_TOTAL,
        "Objects evicted from each route's cache to stay within its byte bound."
    );
    describe_gauge!(
        CACHE_COALESCED_WAITING,
        "Requests waiting for another request's fetch of the same key, by route."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Client connections open on the data port."
    );
    describe_gauge!(
        WORKER_CONNECTIONS_OPEN,
        "Client connections open on the data port, by worker thread."
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Client connections closed at accept because max_connections were open."
    );
    describe_counter!(
        PROXY_PROTOCOL_HEADERS_TOTAL,
        "PROXY protocol headers on proxy_protocol listeners, by result: ok, local, or why the connection was closed."
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes on data listeners, by result: ok or the reason one failed."
    );
    describe_counter!(
        ACCESS_LOG_DROPPED_TOTAL,
        "Access log lines dropped because the writer's buffer was full or a write failed."
    );
    describe_counter!(
        CONNECTIONS_TIMED_OUT_TOTAL,
        "Client connections closed by the header read (kind=header), idle (kind=idle), send (kind=send) or upgraded idle (kind=upgraded_idle) timeout."
    );
    describe_gauge!(
        UPGRADED_CONNECTIONS_OPEN,
        "Upgraded (WebSocket) connections open, by upstream."
    );
    describe_counter!(
        UPGRADES_TOTAL,
        "WebSocket upgrade requests, by upstream and outcome (switched, declined, disabled, failed)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_refuse_past_the_limit_and_free_on_drop() {
        let slots = Slots::new(metrics::Gauge::noop());
        let a = slots.try_take(2).expect("first");
        let _b = slots.try_take(2).expect("second");
        assert!(slots.try_take(2).is_none(), "third of two");
        assert_eq!(slots.held(), 2);
        drop(a);
        assert!(slots.try_take(2).is_some(), "a freed slot is taken again");
        assert!(
            slots.try_take(3).is_some(),
            "a raised limit (reload) applies at once"
        );
    }

    label_values! {
        enum Fruit { Apple => "apple", Pear => "pear", Plum => "plum" }
    }

    #[test]
    fn label_values_index_in_declaration_order() {
        for (i, fruit) in Fruit::ALL.iter().enumerate() {
            assert_eq!(fruit.index(), i);
        }
        assert_eq!(Fruit::Pear.as_str(), "pear");
    }

    #[test]
    fn one_increment_feeds_prometheus_and_the_local_copy() {
        let handle = handle();
        let table = CounterTable::new(
            |fruit: Fruit| metrics::counter!("loadgate_test_fruit_total", "fruit" => fruit.as_str()),
        );
        table.increment(Fruit::Pear);
        table.increment(Fruit::Pear);
        table.increment(Fruit::Plum);

        assert_eq!(
            table.values().collect::<Vec<_>>(),
            [(Fruit::Apple, 0), (Fruit::Pear, 2), (Fruit::Plum, 1)]
        );
        assert_eq!(
            table.to_json(),
            serde_json::json!({"apple": 0, "pear": 2, "plum": 1})
        );
        let scraped = handle.render();
        assert!(
            scraped.contains("loadgate_test_fruit_total{fruit=\"pear\"} 2"),
            "{scraped}"
        );
    }
}
