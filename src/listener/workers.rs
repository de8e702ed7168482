//! Worker identity: which of the proxy's worker threads the caller runs on, and how
//! many there are; and how many client connections each holds ([`Balance`]). A leaf:
//! it depends on nothing in the crate, so the upstream pool can key its per-worker idle
//! stacks by it without reaching up into the listener.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

/// The client connections each worker thread holds, so that new connections are spread
/// over the workers. Every worker accepts from every listener, and without this the one
/// whose event loop wakes first takes a whole burst: 64 connections opened at once, or
/// the few long-lived ones an ingress or a load balancer keeps, all land on one thread
/// while the others idle. A worker takes the next connection only while it holds at most
/// one more than the least loaded worker; otherwise it waits until a count changes.
pub(crate) struct Balance {
    open: Box<[Count]>,
    changed: tokio::sync::Notify,
}

/// One worker's count, on a cache line of its own: each worker writes only its own.
#[repr(align(64))]
struct Count {
    open: AtomicUsize,
    gauge: metrics::Gauge,
}

impl Balance {
    /// A balance over as many workers as `gauges`, each gauge mirroring one worker's count.
    pub(crate) fn new(gauges: Vec<metrics::Gauge>) -> Arc<Balance> {
        let open = gauges
            .into_iter()
            .map(|gauge| Count {
                open: AtomicUsize::new(0),
                gauge,
            })
            .collect();
        Arc::new(Balance {
            open,
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Whether `worker` (0-based) may take the next connection: it holds at most one more
    /// than the least loaded worker.
    pub(crate) fn may_accept(&self, worker: usize) -> bool {
        let count = |c: &Count| c.open.load(Ordering::Relaxed);
        let least = self.open.iter().map(count).min().unwrap_or(0);
        self.open
            .get(worker)
            .is_none_or(|mine| count(mine) <= least + 1)
    }

    /// Counts a connection `worker` took until the returned guard is dropped.
    pub(crate) fn hold(self: &Arc<Self>, worker: usize) -> Held {
        if let Some(count) = self.open.get(worker) {
            count.open.fetch_add(1, Ordering::Relaxed);
            count.gauge.increment(1.0);
            self.changed.notify_waiters();
        }
        Held {
            balance: self.clone(),
            worker,
        }
    }

    /// The next connection on `listener`, taken when it is `worker`'s turn
    /// ([`Balance::may_accept`]). Cancel-safe, as `TcpListener::accept` is.
    ///
    /// A worker whose turn it is waits in `accept` alone: woken by every count that
    /// changes, it would cost a wake-up across threads per connection opened or closed.
    /// So it may take one connection after others' closes made it two above the least,
    /// and waits its turn after that one.
    pub(crate) async fn accept(
        &self,
        listener: &tokio::net::TcpListener,
        worker: usize,
    ) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
        loop {
            // Registered before the counts are read, so no change between the two is missed.
            let mut changed = std::pin::pin!(self.changed.notified());
            changed.as_mut().enable();
            if self.may_accept(worker) {
                return listener.accept().await;
            }
            changed.await;
        }
    }
}

/// A connection counted by [`Balance::hold`].
pub(crate) struct Held {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(count) = self.balance.open.get(self.worker) {
            count.open.fetch_sub(1, Ordering::Relaxed);
            count.gauge.decrement(1.0);
            self.balance.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balance(workers: usize) -> Arc<Balance> {
        Balance::new(vec![metrics::Gauge::noop(); workers])
    }

    #[test]
    fn a_worker_takes_connections_while_within_one_of_the_least_loaded() {
        let balance = balance(2);
        assert!(balance.may_accept(0) && balance.may_accept(1));
        let a1 = balance.hold(0);
        assert!(
            balance.may_accept(0),
            "one above the least is still its turn"
        );
        let a2 = balance.hold(0);
        assert!(!balance.may_accept(0), "two above the least waits");
        assert!(balance.may_accept(1));
        let b1 = balance.hold(1);
        assert!(balance.may_accept(0));
        drop((a1, a2));
        assert!(balance.may_accept(0) && balance.may_accept(1));
        drop(b1);
        assert_eq!(
            balance
                .open
                .iter()
                .map(|c| c.open.load(Ordering::Relaxed))
                .sum::<usize>(),
            0
        );
    }

    #[test]
    fn one_worker_always_takes_the_connection() {
        let balance = balance(1);
        let held: Vec<_> = (0..5).map(|_| balance.hold(0)).collect();
        assert!(balance.may_accept(0));
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_out_of_turn_accepts_once_another_takes_one() {
        let balance = balance(2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Connected: the kernel holds it in the backlog until one accepts it.
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _a = (balance.hold(0), balance.hold(0));
        let waiting = balance.accept(&listener, 0);
        let mut waiting = std::pin::pin!(waiting);
        let second = std::time::Duration::from_secs(1);
        assert!(
            tokio::time::timeout(second, &mut waiting).await.is_err(),
            "worker 0, two above worker 1, accepted out of turn"
        );
        let _b = balance.hold(1);
        let (_, peer) = tokio::time::timeout(second, waiting)
            .await
            .expect("its turn came once worker 1 took one")
            .unwrap();
        assert_eq!(peer.ip(), addr.ip());
    }
}
