//! Worker identity: which of the proxy's worker threads the caller runs on, and how
//! many there are. A leaf: it depends on nothing in the crate, so the upstream pool
//! can key its per-worker idle stacks by it without reaching up into the listener.

use std::cell::Cell;

thread_local! {
    /// 1 + the index of the worker thread running here; 0 on any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Which worker thread the caller runs on: 1 ..= `worker_threads`, or 0 when it is
/// not one (the runtime that started the proxy, a test's runtime).
pub(crate) fn worker_index() -> usize {
    WORKER.with(Cell::get)
}

/// Marks the calling thread as worker `index` (0-based), for [`worker_index`].
pub(crate) fn enter(index: usize) {
    WORKER.with(|worker| worker.set(index + 1));
}

/// The worker threads to start for `configured` (0: one per core).
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
