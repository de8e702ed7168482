//! The simulated backend's listeners and its handle: start, addresses, stats, shutdown.

use super::conn;
use super::handler::{App, Port};
use super::stats::SimStats;
use super::SimConfig;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// How long shutdown lets in-flight requests finish before cutting their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running simulated backend. Dropping it without [`SimBackend::shutdown`] aborts it at once.
#[derive(Debug)]
pub struct SimBackend {
    addr: SocketAddr,
    management_addr: Option<SocketAddr>,
    stats: Arc<SimStats>,
    stop: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
}

impl SimBackend {
    /// Binds `cfg.listen` (port 0 allowed) and `cfg.management_listen`, and
    /// serves them on the current tokio runtime. A number out of its range (see
    /// [`limits`](super::limits)) is an `InvalidInput` error naming every one.
    pub async fn start(cfg: SimConfig) -> io::Result<SimBackend> {
        let problems = super::limits::check(&cfg);
        if !problems.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sim: {}", problems.join("; ")),
            ));
        }
        let main = bind(cfg.listen, cfg.accept_count)?;
        let management = match cfg.management_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let addr = main.local_addr()?;
        let management_addr = management.as_ref().map(|l| l.local_addr()).transpose()?;

        let connections = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
        let app = Arc::new(App::new(cfg));
        let stats = Arc::clone(&app.stats);
        let (stop, stopped) = watch::channel(false);
        let mut listeners = vec![tokio::spawn(accept_loop(
            main,
            Arc::clone(&app),
            Port::Main,
            Some(connections),
            stopped.clone(),
        ))];
        if let Some(listener) = management {
            listeners.push(tokio::spawn(accept_loop(
                listener,
                app,
                Port::Management,
                None,
                stopped,
            )));
        }
        tracing::info!(%addr, ?management_addr, "sim backend listening");
        Ok(SimBackend {
            addr,
            management_addr,
            stats,
            stop,
            listeners,
        })
    }

    /// The bound main (application) address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound management address, when actuator runs on its own port.
    pub fn management_addr(&self) -> Option<SocketAddr> {
        self.management_addr
    }

    /// The backend's live counters.
    pub fn stats(&self) -> Arc<SimStats> {
        Arc::clone(&self.stats)
    }

    /// Stops accepting, closes idle connections, lets in-flight requests finish
    /// for up to 5 s, then cuts whatever is left.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for mut listener in std::mem::take(&mut self.listeners) {
            if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), &mut listener)
                .await
                .is_err()
            {
                listener.abort();
            }
        }
        tracing::info!(addr = %self.addr, "sim backend stopped");
    }
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for listener in &self.listeners {
            listener.abort();
        }
    }
}

/// Binds `addr` with a listen backlog of `backlog` connections (Tomcat's `acceptCount`).
fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.max(1))
}

/// Accepts connections until told to stop, then drains them (bounded). With `limit`,
/// at most that many connections are open at once: the next one is accepted only when
/// one closes, and waits in the listen backlog meanwhile (Tomcat's `maxConnections`).
async fn accept_loop(
    listener: TcpListener,
    app: Arc<App>,
    port: Port,
    limit: Option<Arc<Semaphore>>,
    stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut stopped = stop.clone();
    loop {
        let permit = match &limit {
            Some(limit) => tokio::select! {
                permit = Arc::clone(limit).acquire_owned() => {
                    Some(permit.expect("the connection semaphore is never closed"))
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                () = conn::stop_requested(&mut stopped) => break,
            },
            None => None,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let serve = conn::serve(stream, Arc::clone(&app), port, stop.clone());
                    connections.spawn(async move {
                        serve.await;
                        drop(permit);
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "sim accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = conn::stop_requested(&mut stopped) => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "sim connections still busy after the grace period; closing them"
        );
        connections.abort_all();
    }
}

/// `loadgate sim-backend`: runs the simulated backend until Ctrl-C or SIGTERM.
pub async fn run_cli(cfg: SimConfig) -> anyhow::Result<()> {
    let workers = cfg.workers;
    let backend = SimBackend::start(cfg).await?;
    let base = format!("http://{}", backend.addr());
    let actuator = match backend.management_addr() {
        Some(addr) => format!("http://{addr}/actuator"),
        None => format!("{base}/actuator"),
    };
    println!("loadgate simulated backend ({workers} workers)");
    println!("  work:       {base}/api/...   (?delay_ms=N, ?size=N; /api/headers echoes headers)");
    println!("  health:     {actuator}/health");
    println!("  metrics:    {actuator}/metrics/tomcat.threads.busy");
    println!("  prometheus: {actuator}/prometheus");
    wait_for_stop_signal().await?;
    println!("stopping...");
    backend.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_stop_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn wait_for_stop_signal() -> io::Result<()> {
    tokio::signal::ctrl_c().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimRoute;

    fn loopback() -> SimConfig {
        SimConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..SimConfig::default()
        }
    }

    fn route(service_time_ms: f64) -> SimRoute {
        SimRoute {
            path_prefix: "/api/slow".into(),
            service_time_ms: Some(service_time_ms),
            distribution: None,
            cache_control: None,
            body_bytes: None,
        }
    }

    #[tokio::test]
    async fn start_refuses_service_times_a_request_cannot_take() {
        let cases = [
            (
                SimConfig {
                    service_time_ms: 1e300,
                    ..loopback()
                },
                "service_time_ms 1e300",
            ),
            (
                SimConfig {
                    service_time_ms: f64::NAN,
                    ..loopback()
                },
                "service_time_ms NaN",
            ),
            (
                SimConfig {
                    routes: vec![route(-5.0)],
                    ..loopback()
                },
                "routes[0].service_time_ms -5",
            ),
            (
                SimConfig {
                    routes: vec![route(f64::INFINITY)],
                    ..loopback()
                },
                "routes[0].service_time_ms inf",
            ),
        ];
        for (cfg, named) in cases {
            let error = SimBackend::start(cfg)
                .await
                .expect_err(&format!("started with {named}"));
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
            assert!(error.to_string().contains(named), "{named}: {error}");
        }
    }
}
