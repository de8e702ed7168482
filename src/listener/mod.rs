//! The proxy process: listeners, the accept loop, config reload and graceful drain.
//!
//! [`Proxy::start`] binds every listener first (so a busy port fails at once), then
//! serves HTTP/1.1 with keep-alive and HTTP/2 cleartext (prior knowledge) on each
//! data listener; a `[[listener]]` may first read a PROXY protocol header
//! (`proxy_protocol.rs`) and terminate TLS (`tls.rs`, ALPN h2 and http/1.1), both in
//! the connection's own task. [`Proxy::shutdown`] stops accepting, answers probes with 503,
//! lets in-flight requests finish up to the drain deadline, then returns.
//!
//! # Worker threads
//! Client connections are served by `worker_threads` threads, each running its own
//! single-threaded tokio runtime (its own event loop and timers) and accepting from
//! every data listener. A connection stays on the thread that accepted it, and so do
//! its requests and the upstream connections they open (the pool keeps one idle stack
//! per worker). Nothing on the request path waits for another thread: no work
//! stealing, no wake-up sent across cores. A thread takes a new connection only while
//! it holds at most one more than the least loaded thread (`workers::Balance`), so a
//! burst of connections, or the few long-lived ones a load balancer keeps, is spread
//! over the threads instead of landing on whichever event loop woke first.
//! The admin listener, health checks, actuator polls and reloads stay on the runtime
//! that called [`Proxy::start`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::pin::{pin, Pin};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub mod activity;
pub mod framing;
pub mod interim;
pub mod proxy_protocol;
mod refusal;
pub mod tls;
pub mod tunnel;
pub mod workers;

use crate::access_log::Record;
use crate::config::{Config, ConfigErrors, ServerConfig, MIN_HEADER_BYTES};
use crate::forward::handler::ConnInfo;
use crate::forward::stack::connection_service;
use crate::forward::state::{Generation, Shared};
use crate::metrics as m;
use activity::{Activity, ActivityIo, ClientTimeouts, Expiry};
use tls::ClientStream;

/// How long shutdown waits for the access log's last lines to be written.
const ACCESS_LOG_CLOSE: Duration = Duration::from_secs(5);

/// A running proxy: data listeners plus the admin listener.
pub struct Proxy {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    workers: Vec<Worker>,
    admin: JoinHandle<()>,
}

/// One worker thread, seen from the proxy.
struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// Resolves when the worker's connections have all ended and its runtime is gone.
    stopped: oneshot::Receiver<()>,
}

impl Proxy {
    /// Binds the configured addresses (port 0 picks a free port) and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Proxy> {
        crate::metrics::handle();
        register_series();
        // `server.listen` (plain HTTP) first, then each `[[listener]]` in order.
        let mut bound = Vec::new();
        let roles = config.server.listen.iter().map(|addr| (*addr, Role::PLAIN));
        let tables = config.listeners.iter().enumerate().map(|(index, l)| {
            let role = Role {
                table: Some(index),
                proxy_protocol: l.proxy_protocol,
            };
            (l.address, role)
        });
        for (addr, role) in roles.chain(tables) {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            bound.push((listener, role));
        }
        let admin_listener = TcpListener::bind(config.admin.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on admin address {}: {e}",
                    config.admin.listen
                ),
            )
        })?;
        let admin_addr = admin_listener.local_addr()?;

        let mut addrs = Vec::new();
        let mut std_listeners = Vec::new();
        for (listener, role) in bound {
            addrs.push(listener.local_addr()?);
            std_listeners.push((listener.into_std()?, role));
        }
        let threads = workers::worker_count(config.server.worker_threads);
        let shared = Arc::new(Shared::new(Generation::build(config, None)));
        let access_log = shared.generation.load().config.access_log.clone();
        shared.access_log.configure(access_log.as_ref())?;
        let (shutdown, _) = watch::channel(false);
        // Client connections open on all data listeners, counted against `max_connections`.
        let slots = m::Slots::new(metrics::gauge!(m::CONNECTIONS_OPEN));
        let balance = workers::Balance::new(
            (0..threads)
                .map(|index| metrics::gauge!(m::WORKER_CONNECTIONS_OPEN, "worker" => index.to_string()))
                .collect(),
        );
        let mut workers = Vec::new();
        for index in 0..threads {
            let listeners = std_listeners
                .iter()
                .map(|(listener, role)| Ok((listener.try_clone()?, *role)))
                .collect::<std::io::Result<Vec<_>>>()?;
            let worker = Worker::start(
                index,
                listeners,
                shared.clone(),
                Accepting {
                    slots: slots.clone(),
                    balance: balance.clone(),
                    worker: index,
                },
                shutdown.subscribe(),
            )
            .await;
            match worker {
                Ok(worker) => workers.push(worker),
                Err(error) => {
                    // The workers started so far stop when `shutdown` is dropped.
                    return Err(std::io::Error::new(
                        error.kind(),
                        format!("cannot start worker thread {index}: {error}"),
                    ));
                }
            }
        }
        let admin = tokio::spawn(crate::admin::serve(
            admin_listener,
            shared.clone(),
            shutdown.subscribe(),
        ));
        for addr in &addrs {
            tracing::info!(%addr, "proxy listening");
        }
        tracing::info!(addr = %admin_addr, "admin listening");
        Ok(Proxy {
            shared,
            addrs,
            admin_addr,
            shutdown,
            workers,
            admin,
        })
    }

    /// The first data-plane address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Puts `config` in force for new requests. Requests in flight finish on the
    /// generation they started with; connections stay open. Listener addresses
    /// are fixed for the life of the process.
    pub fn apply(&self, config: Config) {
        let current = self.shared.generation.load();
        let shape = |c: &Config| -> Vec<(SocketAddr, bool, bool)> {
            let tables = c.listeners.iter();
            tables
                .map(|l| (l.address, l.proxy_protocol, l.tls.is_some()))
                .collect()
        };
        if config.server.listen != current.config.server.listen
            || config.admin.listen != current.config.admin.listen
            || shape(&config) != shape(&current.config)
        {
            tracing::warn!(
                "listeners changed in the config (addresses, TLS on or off, proxy_protocol); \
                 that takes effect on restart, while new certificates for a listener at the \
                 same address take effect now"
            );
        }
        if config.server.worker_threads != current.config.server.worker_threads {
            tracing::warn!("worker_threads changed in the config; it takes effect on restart");
        }
        if let Err(error) = self.shared.access_log.configure(config.access_log.as_ref()) {
            tracing::error!(%error, "the access log stays as it was");
        }
        let next = Generation::build(config, Some(&current));
        self.shared.generation.store(Arc::new(next));
    }

    /// Opens the access log file again at its path (SIGUSR1, after logrotate moved it).
    pub fn reopen_access_log(&self) {
        self.shared.access_log.reopen();
    }

    /// Reloads the config file: a valid file takes effect, an invalid one is
    /// reported (every error, with its line) and the running config stays. So does a
    /// config whose access log cannot be opened.
    pub fn reload_from_file(&self, path: &Path) -> Result<(), ConfigErrors> {
        let loaded = Config::load(path).and_then(|config| {
            let access_log = self.shared.access_log.configure(config.access_log.as_ref());
            match access_log {
                Ok(()) => Ok(config),
                Err(error) => Err(ConfigErrors {
                    origin: path.display().to_string(),
                    errors: vec![crate::config::ConfigError {
                        line: 0,
                        message: format!("[access_log]: {error}"),
                    }],
                }),
            }
        });
        match loaded {
            Ok(config) => {
                self.apply(config);
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, m::LABEL_RESULT => "ok").increment(1);
                tracing::info!(path = %path.display(), "config reloaded");
                Ok(())
            }
            Err(errors) => {
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, m::LABEL_RESULT => "error").increment(1);
                tracing::error!("config reload rejected, the running config stays:\n{errors}");
                Err(errors)
            }
        }
    }

    /// Stops accepting, drains in-flight requests up to the configured deadline.
    pub async fn shutdown(self) {
        self.shutdown_after(Duration::ZERO).await;
    }

    /// Turns readiness (and the data port's probes) to 503 at once, keeps accepting
    /// and serving for `delay` (so load balancers and Kubernetes endpoints stop sending
    /// first), then stops accepting and drains in-flight requests up to the configured
    /// deadline.
    pub async fn shutdown_after(self, delay: Duration) {
        self.shared.draining.store(true, Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "readiness is 503; still accepting until the delay ends"
            );
            tokio::time::sleep(delay).await;
        }
        let _ = self.shutdown.send(true);
        for worker in self.workers {
            // An error means the thread ended without saying so: it panicked.
            let _ = worker.stopped.await;
            if worker.thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
        self.admin.abort();
        let _ = self.admin.await;
        // The lines of the last requests are written before the process ends.
        self.shared.access_log.close(ACCESS_LOG_CLOSE).await;
    }
}

impl Worker {
    /// Starts worker thread `index` serving `listeners`, and returns once it accepts.
    async fn start(
        index: usize,
        listeners: Vec<(std::net::TcpListener, Role)>,
        shared: Arc<Shared>,
        accepting: Accepting,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (ready_tx, ready) = oneshot::channel::<std::io::Result<()>>();
        let (stopped_tx, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("loadgate-worker-{index}"))
            .spawn(move || {
                workers::enter(index);
                runtime.block_on(async move {
                    let registered: std::io::Result<Vec<(TcpListener, Role)>> = listeners
                        .into_iter()
                        .map(|(listener, role)| Ok((TcpListener::from_std(listener)?, role)))
                        .collect();
                    let listeners = match registered {
                        Ok(listeners) => {
                            let _ = ready_tx.send(Ok(()));
                            listeners
                        }
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                            return;
                        }
                    };
                    let serving: Vec<_> = listeners
                        .into_iter()
                        .map(|(listener, role)| {
                            tokio::spawn(serve(
                                listener,
                                role,
                                shared.clone(),
                                accepting.clone(),
                                shutdown.clone(),
                            ))
                        })
                        .collect();
                    for listener in serving {
                        let _ = listener.await;
                    }
                });
                // Connections the drain deadline cut off end with the runtime.
                drop(runtime);
                let _ = stopped_tx.send(());
            })?;
        match ready.await {
            Ok(Ok(())) => Ok(Worker { thread, stopped }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(std::io::Error::other("the worker thread ended at start")),
        }
    }
}

/// The per-connection protocol settings, from the config in force at accept.
fn connection_builder(server: &ServerConfig, tls: bool) -> auto::Builder<TokioExecutor> {
    let head_bytes = server.max_header_bytes.max(MIN_HEADER_BYTES);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // A client that shuts down its sending side after a request still gets its
        // response (RFC 9112 §9.6 lets a client half-close).
        .half_close(true)
        // hyper's own header timer also runs while a keep-alive connection waits for its
        // next request, so it would cut idle connections at the header timeout; both
        // timeouts are the connection watchdog's instead (`activity.rs`).
        .header_read_timeout(None)
        // The read buffer is where a head accumulates: a head still incomplete when it is
        // full gets 431. It is also the most request body read ahead of the backend.
        .max_buf_size(head_bytes)
        // Over TLS, a response's head and body go out as one buffer: rustls copies what it
        // is given into its records either way, and one slice spares it gathering several.
        .writev(!tls);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX));
    builder
}

/// What a data listener does with a connection before HTTP: read a PROXY protocol
/// header when its `[[listener]]` says so, then TLS when it has certificates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    /// Index of its `[[listener]]` table; `None` for a `server.listen` address.
    table: Option<usize>,
    proxy_protocol: bool,
}

impl Role {
    const PLAIN: Role = Role {
        table: None,
        proxy_protocol: false,
    };
}

/// What a worker's accept loops share: the open connections counted against
/// `max_connections`, and each worker's count, for taking turns.
#[derive(Clone)]
struct Accepting {
    slots: m::Slots,
    balance: Arc<workers::Balance>,
    /// This worker's index (0-based).
    worker: usize,
}

/// Accepts connections on one listener until shutdown, then drains them.
async fn serve(
    listener: TcpListener,
    role: Role,
    shared: Arc<Shared>,
    accepting: Accepting,
    shutdown: watch::Receiver<bool>,
) {
    let Accepting {
        slots,
        balance,
        worker,
    } = accepting;
    let (abort, _) = watch::channel(false);
    // Each connection task holds a sender; `recv` returns `None` once all have ended.
    let (open_tx, mut all_closed) = mpsc::channel::<()>(1);
    let connections_total = metrics::counter!(m::CONNECTIONS_TOTAL);
    let refused_total = metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL);
    let mut stop = shutdown.clone();
    let local_port = listener.local_addr().map_or(0, |addr| addr.port());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = balance.accept(&listener, worker) => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = raised(&mut stop) => break,
        };
        let max_connections = shared.generation.load().config.server.max_connections;
        // Over the limit, the connection is accepted and closed at once rather than left in
        // the kernel's backlog: the client learns now instead of after a SYN timeout, and
        // the refusal is counted.
        let Some(slot) = slots.try_take(max_connections) else {
            refused_total.increment(1);
            tracing::debug!(%peer, max = max_connections, "connection refused: at max_connections");
            drop(stream);
            continue;
        };
        connections_total.increment(1);
        let held = balance.hold(worker);
        let _ = stream.set_nodelay(true);
        let stop = Stop {
            shutdown: shutdown.clone(),
            abort: abort.subscribe(),
        };
        let open = open_tx.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, local_port, role, shared, stop).await;
            drop((open, slot, held));
        });
    }
    drop(listener);
    drop(open_tx);
    let deadline = shared.generation.load().config.server.drain_timeout;
    tokio::select! {
        _ = all_closed.recv() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(deadline) => {
            tracing::warn!(?deadline, "drain deadline passed, closing the remaining connections");
            let _ = abort.send(true);
        }
    }
}

/// Serves one accepted connection: its PROXY protocol header and TLS handshake when the
/// listener has them, then HTTP until the connection ends, a timeout closes it, or the
/// drain ends it.
async fn serve_connection(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    mut local_port: u16,
    role: Role,
    shared: Arc<Shared>,
    mut stop: Stop,
) {
    if role.proxy_protocol {
        // The balancer sends its header at once: it gets as long as a request head.
        let within = shared.generation.load().config.server.header_read_timeout;
        let header = tokio::time::timeout(within, proxy_protocol::read_header(&mut stream));
        let header = tokio::select! {
            header = header => header,
            () = raised(&mut stop.abort) => return,
        };
        let result = match header {
            Err(_) => Err("timeout"),
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "closing client connection");
                Err(error.as_str())
            }
            Ok(Ok(header)) => Ok(header.addresses),
        };
        let label = match &result {
            Ok(Some(_)) => "ok",
            // A balancer's own connection (a health check), or a family without
            // addresses: the connection's own endpoints stay.
            Ok(None) => "local",
            Err(reason) => reason,
        };
        metrics::counter!(m::PROXY_PROTOCOL_HEADERS_TOTAL, m::LABEL_RESULT => label).increment(1);
        match result {
            Ok(Some(proxied)) => {
                peer = proxied.source;
                local_port = proxied.destination.port();
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
    let tls = role.table.and_then(|index| {
        let generation = shared.generation.load();
        let listener = &generation.listeners[index];
        let timeout = listener.settings.as_ref()?.handshake_timeout;
        Some((listener.server.clone()?, timeout))
    });
    let (stream, tls) = match tls {
        None => (ClientStream::Plain(stream), None),
        Some((config, timeout)) => {
            let handshake = ClientStream::accept_tls(stream, config, timeout);
            let outcome = tokio::select! {
                outcome = handshake => outcome,
                () = raised(&mut stop.abort) => return,
            };
            match outcome {
                Ok((stream, info)) => (stream, Some(Arc::new(info))),
                Err(error) => {
                    tracing::debug!(%peer, %error, "closing client connection");
                    return;
                }
            }
        }
    };
    // Loaded after the handshake: a reload during it applies to this connection.
    let generation = shared.generation.load();
    let server = &generation.config.server;
    let activity = Activity::new();
    let interim = crate::listener::interim::Interim::default();
    let tunnel = tunnel::TunnelSlot::default();
    let (io, verdicts) =
        crate::listener::framing::wrap(ActivityIo::new(stream, activity.clone()), interim.clone());
    let info = Arc::new(ConnInfo {
        peer,
        client_address: crate::http::headers::client_address(peer.ip()),
        verdicts,
        interim: crate::upstream::OnInformational(Arc::new(move |status, headers| {
            interim.send(status, headers)
        })),
        max_body_bytes: server.max_body_bytes,
        request_buffer_bytes: server.request_buffer_bytes,
        upload: server.upload,
        trusted: server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(peer.ip())),
        tls,
        local_port,
        forwarded: server.forwarded,
        tunnel: tunnel.clone(),
    });
    let service = connection_service(shared.clone(), info.clone(), activity.clone());
    // With upgrades: a 101 the handler answers hands the socket over (`tunnel.rs`).
    let connection = connection_builder(server, info.tls.is_some())
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    let timeouts = ClientTimeouts {
        header_read: server.header_read_timeout,
        idle: server.idle_timeout,
        send: server.send_timeout,
    };
    let upgrade_idle = server.upgrade_idle_timeout;
    drop(generation);
    let mut tunnel_abort = stop.abort.clone();
    let graceful = auto::UpgradeableConnection::graceful_shutdown;
    let refused = watch_connection(connection, graceful, &activity, timeouts, stop, peer).await;
    // hyper answered a request the handler never saw: the access log still gets its line.
    let logging = shared.access_log.include_query().is_some();
    if let Some(status) = refused.filter(|_| logging) {
        let mut record = Record::refused(SystemTime::now(), peer, status);
        if let Some(tls) = &info.tls {
            record.tls_version = Some(tls.version);
            record.sni = tls.sni.clone();
        }
        shared.access_log.log(record);
    }
    // A connection upgraded by its last response lives on as a tunnel, still holding its
    // slot and its place in the drain (closed at the drain deadline).
    if let Some(tunnel) = tunnel.take() {
        let ended = tunnel.run(upgrade_idle, &mut tunnel_abort).await;
        if ended == tunnel::Ended::Idle {
            metrics::counter!(m::CONNECTIONS_TIMED_OUT_TOTAL, m::LABEL_KIND => "upgraded_idle")
                .increment(1);
        }
        tracing::debug!(%peer, ?ended, "upgraded connection closed");
    }
}

/// The status hyper answered with when a connection ended because its client sent a
/// request hyper could not read: 400 for a head it could not parse, 431 for one larger
/// than its buffer, 414 for a target too long (hyper's `Server::on_error`). `None` for
/// any other end, and for the parse errors hyper answers nothing to (an HTTP/2 preface
/// sent as HTTP/1).
fn refused_by_parser(error: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<u16> {
    let error = error.downcast_ref::<hyper::Error>()?;
    if !error.is_parse() || error.is_parse_version_h2() {
        return None;
    }
    if !error.is_parse_too_large() {
        return Some(400);
    }
    // hyper tells its two "too large" kinds apart only in its message.
    Some(if error.to_string().starts_with("URI too long") {
        414
    } else {
        431
    })
}

/// The two signals a connection task obeys: finish gracefully, and stop now.
struct Stop {
    shutdown: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
}

/// Serves one client connection until it ends, closing it when a timeout of `timeouts`
/// passes (see [`Activity::client_expiry`]), gracefully on shutdown, at once on abort.
/// Returns the status hyper refused a request with on its own, when that ended it.
async fn watch_connection<C, E>(
    connection: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    activity: &Activity,
    timeouts: ClientTimeouts,
    mut stop: Stop,
    peer: SocketAddr,
) -> Option<u16>
where
    C: Future<Output = Result<(), E>>,
    E: AsRef<dyn std::error::Error + Send + Sync + 'static> + std::fmt::Display,
{
    let mut connection = pin!(connection);
    // Set once the connection has been asked to close: by then it has this long to finish.
    let mut closing_by: Option<Instant> = None;
    let grace = timeouts.header_read;
    loop {
        // The task wakes several times per request for the connection's sockets; the
        // timers and signals are polled only when one of them woke it.
        let event = WhenWoken::new(next_event(activity, timeouts, &mut stop, closing_by));
        let mut event = pin!(event);
        let event = tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    let refused = refused_by_parser(error.as_ref());
                    if refused.is_some() {
                        // A request hyper could not read: it answered 400/414/431 itself.
                        metrics::counter!(m::BAD_REQUESTS_TOTAL).increment(1);
                        tracing::debug!(%peer, %error, "refused a malformed request");
                    } else {
                        tracing::debug!(%peer, %error, "client connection ended with an error");
                    }
                    return refused;
                }
                return None;
            }
            event = event.as_mut() => event,
        };
        match event {
            ConnectionEvent::Expired(expired) => {
                metrics::counter!(m::CONNECTIONS_TIMED_OUT_TOTAL, m::LABEL_KIND => expired.as_str())
                    .increment(1);
                tracing::debug!(%peer, timeout = expired.as_str(), "closing client connection");
                match expired {
                    // Nothing was asked of us that could be answered, or the client
                    // reads nothing of what we answer: drop the socket.
                    Expiry::Header | Expiry::Send => return None,
                    // Graceful, so an HTTP/2 client gets a GOAWAY rather than a reset.
                    Expiry::Idle => {
                        graceful_shutdown(connection.as_mut());
                        closing_by = Some(Instant::now() + grace);
                    }
                }
            }
            ConnectionEvent::Shutdown => {
                graceful_shutdown(connection.as_mut());
                // Draining is bounded by the drain deadline (abort), not by the grace period.
                closing_by = Some(Instant::now() + Duration::from_secs(86_400 * 365));
            }
            ConnectionEvent::GraceOver | ConnectionEvent::Abort => return None,
        }
    }
}

/// What a client connection's task reacts to besides its own traffic.
enum ConnectionEvent {
    /// A client timeout passed.
    Expired(Expiry),
    /// The proxy is shutting down: finish gracefully.
    Shutdown,
    /// A connection asked to close did not within its time.
    GraceOver,
    /// The drain deadline passed: close now.
    Abort,
}

/// The next [`ConnectionEvent`]; timeouts and shutdown only count until the connection
/// has been asked to close (`closing_by` is set).
async fn next_event(
    activity: &Activity,
    timeouts: ClientTimeouts,
    stop: &mut Stop,
    closing_by: Option<Instant>,
) -> ConnectionEvent {
    tokio::select! {
        expired = activity.client_expiry(timeouts), if closing_by.is_none() => ConnectionEvent::Expired(expired),
        () = raised(&mut stop.shutdown), if closing_by.is_none() => ConnectionEvent::Shutdown,
        () = tokio::time::sleep_until(closing_by.unwrap_or_else(Instant::now)), if closing_by.is_some() => ConnectionEvent::GraceOver,
        () = raised(&mut stop.abort) => ConnectionEvent::Abort,
    }
}

pin_project_lite::pin_project! {
    /// Polls `inner` only on the first poll and after `inner`'s own waker fired. In a
    /// task that mostly wakes for something else, a rarely ready future (a timer, a
    /// shutdown signal) then costs one atomic swap per wake-up instead of a poll.
    struct WhenWoken<F> {
        #[pin]
        inner: F,
        flag: Arc<WakeFlag>,
        waker: std::task::Waker,
    }
}

/// Set by `inner`'s waker; wakes the task that polls the [`WhenWoken`].
struct WakeFlag {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(flag.clone());
        WhenWoken { inner, flag, waker }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read, so a wake in between is not lost.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        this.inner
            .poll(&mut std::task::Context::from_waker(this.waker))
    }
}

/// Resolves once `flag` is true (or its sender is gone).
async fn raised(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|raised| *raised).await;
}

/// Registers at zero the process-wide counters of events a healthy proxy may never see
/// (a failed reload, a timed-out connection, a malformed request), so they are in the
/// first scrape and an alert's `increase()` counts the first event.
fn register_series() {
    for result in ["ok", "error"] {
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, m::LABEL_RESULT => result).absolute(0);
    }
    metrics::counter!(m::BAD_REQUESTS_TOTAL).absolute(0);
    metrics::counter!(m::PROBES_TOTAL).absolute(0);
    let kinds = [Expiry::Header, Expiry::Idle, Expiry::Send].map(Expiry::as_str);
    for kind in kinds.into_iter().chain(["upgraded_idle"]) {
        metrics::counter!(m::CONNECTIONS_TIMED_OUT_TOTAL, m::LABEL_KIND => kind).absolute(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn when_woken_polls_its_future_only_after_its_own_wake_up() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = oneshot::channel::<()>();
        let inner = {
            let polls = polls.clone();
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                Pin::new(&mut rx).poll(cx).map(|_| ())
            })
        };
        let mut gated = pin!(WhenWoken::new(inner));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "polled once, then only when woken"
        );
        tx.send(()).unwrap();
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
