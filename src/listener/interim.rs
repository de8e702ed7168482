//! Interim (1xx) responses on an HTTP/1.1 client connection: a backend's `103 Early
//! Hints` or `102 Processing`, passed on to the client ahead of the final response.
//!
//! hyper's server has no way to send an interim response, so the connection's IO
//! writes it ([`FramingIo`](super::framing::FramingIo) calls `Interim::poll_write_to`)
//! between hyper's own writes. The one rule that keeps the byte stream a valid HTTP/1.1
//! exchange: interim bytes go out only while hyper has nothing of its own half-written,
//! that is, after hyper's last write was flushed. An interim response that arrives
//! while hyper still has bytes to write (the previous response's tail, on a client that
//! reads slowly) is dropped: interim responses are advisory, and a lost one costs only
//! the hint.
//!
//! Not here: which requests may get one (HTTP/1.1 only, never HTTP/1.0 or HTTP/2;
//! `forward/handler.rs` decides) or reading them from the backend (hyper's client
//! calls back with each).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use http::{HeaderMap, StatusCode};
use tokio::io::AsyncWrite;

/// The interim responses waiting to be written on one client connection.
#[derive(Clone, Default)]
pub struct Interim(Arc<Shared>);

impl std::fmt::Debug for Interim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interim")
            .field("queued", &self.0.queued.load(Ordering::Relaxed))
            .finish()
    }
}

#[derive(Default)]
struct Shared {
    /// Set while `queue` holds bytes: the IO's fast path checks only this.
    queued: AtomicBool,
    /// hyper wrote and has not flushed since: its buffer may hold part of a message.
    hyper_unflushed: AtomicBool,
    queue: Mutex<Queue>,
    /// The connection task, as of hyper's last flush: woken to write what was queued
    /// while hyper waits for the service.
    connection: AtomicWaker,
}

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    written: usize,
}

/// The most interim bytes queued at once; more are dropped.
const MAX_QUEUED: usize = 16 * 1024;

impl Interim {
    /// Queues a 1xx response (not `100 Continue` or `101`, which are the proxy's own
    /// business) for the request in flight. Hop-by-hop fields are left out.
    pub fn send(&self, status: StatusCode, headers: &HeaderMap) {
        if !status.is_informational() || matches!(status.as_u16(), 100 | 101) {
            return;
        }
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .into_bytes();
        let mut headers = headers.clone();
        crate::http::headers::strip_hop_by_hop(&mut headers);
        for (name, value) in &headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let shared = &self.0;
        let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.bytes.len() + head.len() > MAX_QUEUED {
            return;
        }
        queue.bytes.extend_from_slice(&head);
        shared.queued.store(true, Ordering::Release);
        drop(queue);
        shared.connection.wake();
    }

    /// Called by the IO at each of hyper's flushes: remembers the connection task, so a
    /// queued response can wake it to be written while hyper waits for the backend.
    pub(super) fn register_connection(&self, cx: &Context<'_>) {
        self.0.connection.register(cx.waker());
    }

    /// hyper is about to write: what is queued goes first if hyper had flushed, and is
    /// dropped if it had not (see the module docs).
    pub(super) fn before_hyper_writes<IO: AsyncWrite>(
        &self,
        io: Pin<&mut IO>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_write(io, cx, Unflushed::Drop))?;
        self.0.hyper_unflushed.store(true, Ordering::Release);
        Poll::Ready(Ok(()))
    }

    /// hyper's flush went through: its buffer is empty.
    pub(super) fn hyper_flushed(&self) {
        self.0.hyper_unflushed.store(false, Ordering::Release);
    }

    /// Writes what is queued when hyper has nothing half-written; `Ready` once the queue
    /// is empty, or when it must wait for hyper's flush.
    pub(super) fn poll_write_to<IO: AsyncWrite>(
        &self,
        io: Pin<&mut IO>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_write(io, cx, Unflushed::Wait)
    }

    fn poll_write<IO: AsyncWrite>(
        &self,
        io: Pin<&mut IO>,
        cx: &mut Context<'_>,
        unflushed: Unflushed,
    ) -> Poll<io::Result<()>> {
        let shared = &self.0;
        if !shared.queued.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        // A response already begun is always finished; one not begun waits for hyper's
        // flush, or is dropped when hyper writes first.
        if queue.written == 0 && shared.hyper_unflushed.load(Ordering::Acquire) {
            if unflushed == Unflushed::Drop {
                self.emptied(&mut queue);
            }
            return Poll::Ready(Ok(()));
        }
        let Queue { bytes, written } = &mut *queue;
        std::task::ready!(super::framing::poll_write_all(io, cx, bytes, written))?;
        self.emptied(&mut queue);
        Poll::Ready(Ok(()))
    }

    fn emptied(&self, queue: &mut Queue) {
        queue.bytes.clear();
        queue.written = 0;
        self.0.queued.store(false, Ordering::Release);
    }
}

/// What a queued response not yet begun does while hyper has bytes unflushed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unflushed {
    /// Waits for hyper's flush.
    Wait,
    /// Is dropped: hyper is writing now, and its bytes must come first.
    Drop,
}
