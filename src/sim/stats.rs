//! Counters of the simulated backend, shared with tests so they can assert what reached it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// What the simulated backend has seen, on both its ports.
///
/// Worker figures (`busy`, `queued`, peaks) describe the main port's pool;
/// request and connection counts include the management port.
#[derive(Debug)]
pub struct SimStats {
    max_workers: usize,
    pub(crate) busy: AtomicUsize,
    peak_busy: AtomicUsize,
    pub(crate) queued: AtomicUsize,
    peak_queued: AtomicUsize,
    total: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
    by_method_path: Mutex<HashMap<(String, String), u64>>,
    connections_opened: AtomicU64,
    connections_closed_idle: AtomicU64,
    connections_closed_max_requests: AtomicU64,
}

impl SimStats {
    pub(crate) fn new(max_workers: usize) -> SimStats {
        SimStats {
            max_workers,
            busy: AtomicUsize::new(0),
            peak_busy: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            peak_queued: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            by_path: Mutex::new(HashMap::new()),
            by_method_path: Mutex::new(HashMap::new()),
            connections_opened: AtomicU64::new(0),
            connections_closed_idle: AtomicU64::new(0),
            connections_closed_max_requests: AtomicU64::new(0),
        }
    }

    /// Workers currently busy (Tomcat's `tomcat.threads.busy`).
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Size of the worker pool (Tomcat's `maxThreads`).
    pub fn max_workers(&self) -> usize {
        self.max_workers
    }

    /// The highest number of busy workers seen since start.
    pub fn peak_busy(&self) -> usize {
        self.peak_busy.load(Ordering::SeqCst)
    }

    /// Requests waiting for a worker right now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// The longest the wait queue has been since start.
    pub fn peak_queued(&self) -> usize {
        self.peak_queued.load(Ordering::SeqCst)
    }

    /// Requests received for exactly this path (without query), counted on arrival.
    pub fn requests(&self, path: &str) -> u64 {
        let by_path = self.by_path.lock().unwrap_or_else(|e| e.into_inner());
        by_path.get(path).copied().unwrap_or(0)
    }

    /// Requests received for this method (e.g. `POST`) and exact path.
    pub fn requests_by_method(&self, method: &str, path: &str) -> u64 {
        let map = self
            .by_method_path
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(&(method.to_ascii_uppercase(), path.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// All requests received, on any path.
    pub fn total_requests(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::SeqCst)
    }

    /// Connections closed by the keep-alive timeout.
    pub fn connections_closed_idle(&self) -> u64 {
        self.connections_closed_idle.load(Ordering::SeqCst)
    }

    /// Responses that closed their connection because it reached `max_keep_alive_requests`.
    pub fn connections_closed_max_requests(&self) -> u64 {
        self.connections_closed_max_requests.load(Ordering::SeqCst)
    }

    pub(crate) fn record_request(&self, method: &str, path: &str) {
        self.total.fetch_add(1, Ordering::SeqCst);
        *self
            .by_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.to_string())
            .or_insert(0) += 1;
        *self
            .by_method_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method.to_string(), path.to_string()))
            .or_insert(0) += 1;
    }

    pub(crate) fn worker_taken(&self) {
        let now = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_busy.fetch_max(now, Ordering::SeqCst);
    }

    pub(crate) fn worker_released(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn enqueued(&self) {
        let now = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_queued.fetch_max(now, Ordering::SeqCst);
    }

    pub(crate) fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn connection_closed_idle(&self) {
        self.connections_closed_idle.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn connection_closed_max_requests(&self) {
        self.connections_closed_max_requests
            .fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_path_and_method() {
        let stats = SimStats::new(4);
        stats.record_request("GET", "/api/a");
        stats.record_request("POST", "/api/a");
        stats.record_request("GET", "/api/b");
        assert_eq!(stats.requests("/api/a"), 2);
        assert_eq!(stats.requests("/api/b"), 1);
        assert_eq!(stats.requests("/api/c"), 0);
        assert_eq!(stats.requests_by_method("POST", "/api/a"), 1);
        assert_eq!(stats.requests_by_method("post", "/api/a"), 1);
        assert_eq!(stats.total_requests(), 3);
    }

    #[test]
    fn peaks_remember_the_highest_value() {
        let stats = SimStats::new(4);
        stats.worker_taken();
        stats.worker_taken();
        stats.worker_released();
        assert_eq!((stats.busy(), stats.peak_busy()), (1, 2));
        stats.enqueued();
        stats.dequeued();
        assert_eq!((stats.queued(), stats.peak_queued()), (0, 1));
    }
}
