//! Idle connections: one backend's per-worker LIFO stacks ([`IdleStacks`]) and the
//! sweep that drops entries past their idle limit or closed by the backend.
//!
//! Not here: why the stacks are LIFO and per worker (the pool's module docs, `mod.rs`);
//! taking a connection for a request (`Inner::checkout`, `mod.rs`); deciding whether a
//! connection goes back at all (`conn.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::Context;
use std::time::Duration;

use tokio::time::Instant;

use super::conn::Conn;
use super::stats::Event;
use super::Pool;

pub(super) struct Idle {
    pub(super) conn: Conn,
    pub(super) since: Instant,
}

/// One backend's idle connections: a stack per worker thread, each pushed and popped
/// at the end (LIFO; see the pool's module docs, `mod.rs`, for both choices).
pub(super) struct IdleStacks {
    /// Indexed by [`crate::listener::workers::worker_index`] modulo the length; slot 0 serves
    /// threads that are not workers (tests, the admin runtime).
    stacks: Box<[Mutex<Vec<Idle>>]>,
    /// Connections on all stacks together.
    count: AtomicUsize,
}

impl IdleStacks {
    /// One stack per worker thread plus the non-worker slot.
    pub(super) fn new(workers: usize) -> IdleStacks {
        IdleStacks {
            stacks: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
            count: AtomicUsize::new(0),
        }
    }

    /// The calling thread's stack.
    fn mine(&self) -> &Mutex<Vec<Idle>> {
        &self.stacks[crate::listener::workers::worker_index() % self.stacks.len()]
    }

    /// The connection the calling thread returned last.
    pub(super) fn pop(&self) -> Option<Idle> {
        let popped = lock(self.mine()).pop();
        if popped.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        popped
    }

    /// Keeps `conn` on the calling thread's stack, unless `max` are kept already (then
    /// `conn` is dropped, which closes it); whether it was kept.
    pub(super) fn push(&self, conn: Conn, max: usize) -> bool {
        if self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return false;
        }
        lock(self.mine()).push(Idle {
            conn,
            since: Instant::now(),
        });
        true
    }

    pub(super) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Keeps, on every stack, the entries for which `keep` returns true.
    fn retain(&self, mut keep: impl FnMut(&mut Idle) -> bool) {
        for stack in self.stacks.iter() {
            let mut stack = lock(stack);
            let before = stack.len();
            stack.retain_mut(&mut keep);
            self.count
                .fetch_sub(before - stack.len(), Ordering::Relaxed);
        }
    }
}

impl Pool {
    /// Drops idle connections past their idle limit or closed by the backend.
    pub(crate) fn sweep(&self) {
        let inner = &self.inner;
        let now = Instant::now();
        for host in &inner.hosts {
            let limit = host.idle_limit(inner.settings.idle_timeout);
            let mut dropped = Vec::new();
            // Idle connections are not polled by anyone; one poll here reads a close
            // from the backend. The waker is a no-op: whoever reuses the connection
            // polls it again with its own.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            host.idle.retain(|entry| {
                let event = if now.duration_since(entry.since) >= limit {
                    Some(Event::RetiredIdle)
                } else if entry.conn.poll_io(&mut cx).is_ready() || entry.conn.is_closed() {
                    Some(Event::ClosedByBackend)
                } else {
                    None
                };
                dropped.extend(event);
                event.is_none()
            });
            for event in dropped {
                inner.counters.event(event);
            }
        }
    }

    /// Spawns the background sweep, every half idle timeout (at least every 50 ms).
    pub(crate) fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let pool = Pool {
            inner: self.inner.clone(),
        };
        let every = (self.inner.settings.idle_timeout / 2).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                pool.sweep();
            }
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
