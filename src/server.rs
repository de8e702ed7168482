//! The proxy process: listeners, the accept loop, config reload and graceful drain.
//!
//! [`Proxy::start`] binds every listener first (so a busy port fails at once), then
//! serves HTTP/1.1 with keep-alive and HTTP/2 cleartext (prior knowledge) on each
//! data listener. [`Proxy::shutdown`] stops accepting, answers probes with 503,
//! lets in-flight requests finish up to the drain deadline, then returns.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigErrors};
use crate::metrics as m;
use crate::proxy::ConnInfo;
use crate::stack::connection_service;
use crate::state::{Runtime, Shared};

/// A running proxy: data listeners plus the admin listener.
pub struct Proxy {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    admin: JoinHandle<()>,
}

impl Proxy {
    /// Binds the configured addresses (port 0 picks a free port) and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Proxy> {
        crate::metrics::handle();
        let mut bound = Vec::new();
        for addr in &config.server.listen {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            bound.push(listener);
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

        let shared = Arc::new(Shared::new(Runtime::build(config, None)));
        let (shutdown, _) = watch::channel(false);
        let mut addrs = Vec::new();
        let mut listeners = Vec::new();
        for listener in bound {
            addrs.push(listener.local_addr()?);
            listeners.push(tokio::spawn(serve(
                listener,
                shared.clone(),
                shutdown.subscribe(),
            )));
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
            listeners,
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
        let current = self.shared.runtime.load();
        if config.server.listen != current.config.server.listen
            || config.admin.listen != current.config.admin.listen
        {
            tracing::warn!("listen addresses changed in the config; they take effect on restart");
        }
        let next = Runtime::build(config, Some(&current));
        self.shared.runtime.store(Arc::new(next));
    }

    /// Reloads the config file: a valid file takes effect, an invalid one is
    /// reported (every error, with its line) and the running config stays.
    pub fn reload_from_file(&self, path: &Path) -> Result<(), ConfigErrors> {
        match Config::load(path) {
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
        self.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        for listener in self.listeners {
            let _ = listener.await;
        }
        self.admin.abort();
        let _ = self.admin.await;
    }
}

/// Accepts connections on one listener until shutdown, then drains them.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let connections_total = metrics::counter!(m::CONNECTIONS_TOTAL);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        connections_total.increment(1);
        let _ = stream.set_nodelay(true);
        let (io, verdicts) = crate::framing::wrap(stream);
        let service = connection_service(shared.clone(), ConnInfo { peer, verdicts });
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let open = metrics::gauge!(m::CONNECTIONS_OPEN);
            open.increment(1.0);
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
            open.decrement(1.0);
        });
    }
    drop(listener);
    let deadline = shared.runtime.load().config.server.drain_timeout;
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(deadline) => {
            tracing::warn!(?deadline, "drain deadline passed, closing the remaining connections");
        }
    }
}
