//! The long-running commands behind the CLI: `run` (proxy, plus the simulated
//! backend when the config has a `[sim]` section) and `demo` (the same with the
//! embedded demo config). Signals: SIGINT/SIGTERM drain and exit, SIGHUP reloads, SIGUSR1
//! reopens the access log file (logrotate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::listener::Proxy;
use crate::sim::SimBackend;

/// Runs until SIGINT or SIGTERM. `path` is the file SIGHUP reloads from.
pub async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    run_with(config, path, |_, _| {}).await
}

/// Runs the embedded demo and prints how to try it.
pub async fn demo(ports: DemoPorts) -> anyhow::Result<()> {
    let config = ports.config()?;
    run_with(config, None, print_demo_help).await
}

/// Where the demo listens, all on 127.0.0.1: the ports of `config/demo.toml` unless moved
/// (a Spring app of one's own is usually on 8080 already).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoPorts {
    pub proxy: u16,
    pub admin: u16,
    pub backend: u16,
    /// The simulated backend's management (actuator) port.
    pub management: u16,
}

impl Default for DemoPorts {
    /// The ports `config/demo.toml` names.
    fn default() -> Self {
        let config = Config::demo();
        let sim = config.sim.expect("the demo config has a [sim] section");
        DemoPorts {
            proxy: config.server.listen[0].port(),
            admin: config.admin.listen.port(),
            backend: sim.listen.port(),
            management: sim
                .management_listen
                .expect("the demo's backend has a management port")
                .port(),
        }
    }
}

impl DemoPorts {
    /// Each port with what it is for and the flag (and environment variable) that moves it.
    fn named(&self) -> [(u16, &'static str, &'static str); 4] {
        [
            (self.proxy, "the proxy", "--port / LOADGATE_DEMO_PORT"),
            (
                self.admin,
                "the admin port",
                "--admin-port / LOADGATE_DEMO_ADMIN_PORT",
            ),
            (
                self.backend,
                "the simulated backend",
                "--backend-port / LOADGATE_DEMO_BACKEND_PORT",
            ),
            (
                self.management,
                "the backend's management port",
                "--management-port / LOADGATE_DEMO_MANAGEMENT_PORT",
            ),
        ]
    }

    /// The demo config on these ports. Refuses two roles on one port, and a port that is
    /// busy, naming it and the flag that moves it.
    pub fn config(&self) -> anyhow::Result<Config> {
        let named = self.named();
        for (i, (port, what, flag)) in named.iter().enumerate() {
            if let Some((_, other, _)) = named[..i].iter().find(|(p, ..)| p == port) {
                anyhow::bail!(
                    "port {port} is asked for both {other} and {what}; move one ({flag})"
                );
            }
        }
        let defaults = DemoPorts::default().named();
        for ((port, what, flag), (default, ..)) in named.into_iter().zip(defaults) {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            if let Err(error) = std::net::TcpListener::bind(addr) {
                let name = flag.split(' ').next().unwrap_or(flag);
                anyhow::bail!(
                    "port {port} ({what}) is busy: {error}; pick another with {flag}, \
                     e.g. {name} 1{default}"
                );
            }
        }
        let local = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut config = Config::demo();
        config.server.listen = vec![local(self.proxy)];
        config.admin.listen = local(self.admin);
        for upstream in &mut config.upstreams {
            upstream.backends = vec![local(self.backend).to_string()];
            upstream.management_port = Some(self.management);
        }
        if let Some(sim) = &mut config.sim {
            sim.listen = local(self.backend);
            sim.management_listen = Some(local(self.management));
        }
        Ok(config)
    }
}

async fn run_with(
    config: Config,
    path: Option<PathBuf>,
    announce: impl FnOnce(&Proxy, Option<&SimBackend>),
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut user1 = signal(SignalKind::user_defined1())?;

    let sim =
        match &config.sim {
            Some(sim_config) => Some(SimBackend::start(sim_config.clone()).await.with_context(
                || format!("starting the simulated backend on {}", sim_config.listen),
            )?),
            None => None,
        };
    let proxy = Proxy::start(config).await.context("starting the proxy")?;
    announce(&proxy, sim.as_ref());

    // SIGTERM (an orchestrator) waits `shutdown_delay_ms` for traffic to move away;
    // SIGINT (someone at a terminal) stops at once.
    let delay = loop {
        tokio::select! {
            _ = interrupt.recv() => break Duration::ZERO,
            _ = terminate.recv() => break proxy.shared().generation.load().config.server.shutdown_delay,
            _ = hangup.recv() => match &path {
                // Errors are logged by reload_from_file; the running config stays.
                Some(path) => { let _ = proxy.reload_from_file(path); }
                None => tracing::warn!("SIGHUP ignored: this config was not loaded from a file"),
            },
            _ = user1.recv() => proxy.reopen_access_log(),
        }
    };
    tracing::info!("shutting down: draining in-flight requests");
    proxy.shutdown_after(delay).await;
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn print_demo_help(proxy: &Proxy, sim: Option<&SimBackend>) {
    let p = proxy.addr();
    let a = proxy.admin_addr();
    let backend = sim.map_or("(none)".to_string(), |s| format!("http://{}", s.addr()));
    println!(
        r#"
loadgate demo
  proxy    http://{p}
  live     http://{a}/   (live view: utilisation, shedding, latency; report at http://{a}/report)
  admin    http://{a}/status   http://{a}/metrics
  backend  {backend}   (simulated Spring Boot on Tomcat, 20 workers)

Routes: /api/checkout (critical)  /api/orders (normal)  /api/reports (sheddable)  /api/catalog (normal, cache on)

1. A 200 with an ETag, then the same request with If-None-Match answered 304:
   etag=$(curl -s -o /dev/null -D - http://{p}/api/catalog | tr -d '\r' | awk 'tolower($1)=="etag:"{{print $2}}'); curl -s -o /dev/null -w '%{{http_code}} ' http://{p}/api/catalog; curl -s -o /dev/null -w '%{{http_code}}\n' -H "If-None-Match: $etag" http://{p}/api/catalog

2. Load: 300 concurrent requests to the sheddable route, counted by status:
   seq 300 | xargs -P 300 -I{{}} curl -s -o /dev/null -w '%{{http_code}}\n' http://{p}/api/reports | sort | uniq -c

Ctrl-C stops both.
"#
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four ports free now (bound and released), for a demo config.
    fn free_ports() -> DemoPorts {
        let bound: Vec<_> = (0..4)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let port = |i: usize| bound[i].local_addr().unwrap().port();
        DemoPorts {
            proxy: port(0),
            admin: port(1),
            backend: port(2),
            management: port(3),
        }
    }

    #[test]
    fn moved_ports_move_every_part_of_the_demo() {
        let ports = free_ports();
        let config = ports.config().unwrap();
        assert_eq!(config.server.listen[0].port(), ports.proxy);
        assert_eq!(config.admin.listen.port(), ports.admin);
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.backends, [format!("127.0.0.1:{}", ports.backend)]);
        assert_eq!(upstream.management_port, Some(ports.management));
        let sim = config.sim.as_ref().unwrap();
        assert_eq!(sim.listen.port(), ports.backend);
        assert_eq!(sim.management_listen.unwrap().port(), ports.management);
    }

    #[test]
    fn one_port_for_two_parts_is_refused_naming_both() {
        let mut ports = free_ports();
        ports.admin = ports.proxy;
        let error = ports.config().unwrap_err().to_string();
        assert!(
            error.contains("is asked for both the proxy and the admin port")
                && error.contains("--admin-port"),
            "{error}"
        );
    }
}
