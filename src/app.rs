//! The long-running commands behind the CLI: `run` (proxy, plus the simulated
//! backend when the config has a `[sim]` section) and `demo` (the same with the
//! embedded demo config). Signals: SIGINT/SIGTERM drain and exit, SIGHUP reloads.

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
pub async fn demo() -> anyhow::Result<()> {
    run_with(Config::demo(), None, print_demo_help).await
}

async fn run_with(
    config: Config,
    path: Option<PathBuf>,
    announce: impl FnOnce(&Proxy, Option<&SimBackend>),
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;

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
