//! The worker pool: Tomcat's `maxThreads` threads with a FIFO queue in front.
//!
//! A request holds a [`Worker`] from the moment it gets one until its response
//! body has been sent (or dropped); dropping the worker frees it.

use super::stats::SimStats;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A fixed pool of workers; waiters are served first come, first served.
#[derive(Debug)]
pub(crate) struct WorkerPool {
    permits: Arc<Semaphore>,
    stats: Arc<SimStats>,
}

/// One busy worker; frees itself on drop.
#[derive(Debug)]
pub(crate) struct Worker {
    stats: Arc<SimStats>,
    _permit: OwnedSemaphorePermit,
}

impl WorkerPool {
    pub(crate) fn new(stats: Arc<SimStats>) -> WorkerPool {
        WorkerPool {
            permits: Arc::new(Semaphore::new(stats.max_workers())),
            stats,
        }
    }

    /// Waits for a free worker, counted as queued while waiting.
    pub(crate) async fn acquire(&self) -> Worker {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _queued = Queued::new(&self.stats);
                Arc::clone(&self.permits)
                    .acquire_owned()
                    .await
                    .expect("the worker semaphore is never closed")
            }
        };
        self.stats.worker_taken();
        Worker {
            stats: Arc::clone(&self.stats),
            _permit: permit,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Runs before the permit is returned, so `busy` never exceeds the pool size.
        self.stats.worker_released();
    }
}

/// Counts a request as queued for as long as it lives (also when the wait is cancelled).
struct Queued<'a>(&'a SimStats);

impl<'a> Queued<'a> {
    fn new(stats: &'a SimStats) -> Self {
        stats.enqueued();
        Queued(stats)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.dequeued();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bounds_busy_and_queues_in_order() {
        let stats = Arc::new(SimStats::new(2));
        let pool = Arc::new(WorkerPool::new(Arc::clone(&stats)));
        let a = pool.acquire().await;
        let b = pool.acquire().await;
        assert_eq!(stats.busy(), 2);

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..2 {
            let pool = Arc::clone(&pool);
            let tx = tx.clone();
            tokio::spawn(async move {
                let worker = pool.acquire().await;
                tx.send(i).unwrap();
                drop(worker);
            });
            // Let each waiter reach the queue before the next one.
            while stats.queued() != i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(stats.queued(), 2);
        drop(a);
        drop(b);
        let first = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        let second = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert_eq!((first.unwrap(), second.unwrap()), (Some(0), Some(1)));
        assert_eq!(stats.peak_busy(), 2);
        assert_eq!(stats.peak_queued(), 2);
    }

    #[tokio::test]
    async fn cancelled_wait_leaves_the_queue() {
        let stats = Arc::new(SimStats::new(1));
        let pool = WorkerPool::new(Arc::clone(&stats));
        let _held = pool.acquire().await;
        let waited = tokio::time::timeout(Duration::from_millis(10), pool.acquire()).await;
        assert!(waited.is_err());
        assert_eq!(stats.queued(), 0);
        assert_eq!(stats.busy(), 1);
    }
}
