//! The `loadgate` command line: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loadgate::app::DemoPorts;
use loadgate::config::{defaults, Config};
use loadgate::sim::{limits, Distribution, SimConfig};

/// loadgate: an adaptive load-shedding reverse proxy for Spring/Tomcat backends.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file. SIGHUP reloads the file; SIGUSR1 reopens the access
    /// log; SIGINT/SIGTERM drain and exit.
    Run {
        /// Path of the TOML config (see config/loadgate.toml for every key).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the demo: the simulated backend on 127.0.0.1:8081 (management 8082) and the
    /// proxy on 127.0.0.1:8080 (admin 9901), with the embedded config/demo.toml. Each
    /// port can be moved, e.g. when a Spring app already has 8080.
    Demo(DemoArgs),
    /// Run only the simulated Spring Boot / Tomcat backend.
    SimBackend(SimArgs),
    /// Validate a config file, print every error with its line, and exit non-zero if any.
    CheckConfig {
        /// Path of the TOML config.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The proxy's port.
    #[arg(long, env = "LOADGATE_DEMO_PORT", default_value_t = DemoPorts::default().proxy)]
    port: u16,
    /// The admin port (live view, /status, /metrics).
    #[arg(long, env = "LOADGATE_DEMO_ADMIN_PORT", default_value_t = DemoPorts::default().admin)]
    admin_port: u16,
    /// The simulated backend's port.
    #[arg(long, env = "LOADGATE_DEMO_BACKEND_PORT", default_value_t = DemoPorts::default().backend)]
    backend_port: u16,
    /// The simulated backend's management (actuator) port.
    #[arg(long, env = "LOADGATE_DEMO_MANAGEMENT_PORT", default_value_t = DemoPorts::default().management)]
    management_port: u16,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Address of the main (data) port.
    #[arg(long, default_value_t = defaults::SIM_LISTEN)]
    listen: std::net::SocketAddr,
    /// Separate management port for /actuator/* (Spring's management.server.port);
    /// without it, actuator requests need a worker like any request.
    #[arg(long)]
    management_listen: Option<std::net::SocketAddr>,
    /// Worker pool size (Tomcat maxThreads), 1 to 1000000.
    #[arg(long, default_value_t = defaults::SIM_WORKERS, value_parser = limits::parse_workers)]
    workers: usize,
    /// Service time of a work request, in milliseconds: 0 to 3600000 (one hour).
    #[arg(long, default_value_t = defaults::SIM_SERVICE_TIME_MS,
        value_parser = limits::parse_service_time_ms, allow_negative_numbers = true)]
    service_time_ms: f64,
    /// Draw service times exponentially around the mean instead of fixed.
    #[arg(long)]
    exponential: bool,
    /// Close idle keep-alive connections after this long (Tomcat keepAliveTimeout).
    #[arg(long, default_value_t = defaults::SIM_KEEP_ALIVE_TIMEOUT_MS)]
    keep_alive_timeout_ms: u64,
    /// Close a connection after this many requests (Tomcat maxKeepAliveRequests; 0 = unlimited).
    #[arg(long, default_value_t = defaults::SIM_MAX_KEEP_ALIVE_REQUESTS)]
    max_keep_alive_requests: u32,
    /// Cache-Control header on /api/ responses.
    #[arg(long)]
    cache_control: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::CheckConfig { file } => {
            return match Config::load(&file) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprint!("{errors}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Run { config: path } => match Config::load(&path) {
            Ok(config) => runtime.block_on(loadgate::app::run(config, Some(path))),
            Err(errors) => {
                eprint!("{errors}");
                return ExitCode::from(2);
            }
        },
        Command::Demo(args) => runtime.block_on(loadgate::app::demo(DemoPorts {
            proxy: args.port,
            admin: args.admin_port,
            backend: args.backend_port,
            management: args.management_port,
        })),
        Command::SimBackend(args) => {
            let config = SimConfig {
                listen: args.listen,
                management_listen: args.management_listen,
                workers: args.workers,
                service_time_ms: args.service_time_ms,
                distribution: if args.exponential {
                    Distribution::Exponential
                } else {
                    Distribution::Fixed
                },
                keep_alive_timeout_ms: args.keep_alive_timeout_ms,
                max_keep_alive_requests: args.max_keep_alive_requests,
                cache_control: args.cache_control,
                ..SimConfig::default()
            };
            runtime.block_on(loadgate::sim::run_cli(config))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim_backend(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["loadgate", "sim-backend"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
    }

    #[test]
    fn sim_backend_refuses_unusable_service_times_naming_flag_and_value() {
        for value in ["1e300", "NaN", "inf", "-inf", "-5", "3600001", "soon"] {
            let flag = format!("--service-time-ms={value}");
            let error = match sim_backend(&[&flag]) {
                Ok(_) => panic!("{flag} was accepted"),
                Err(error) => error.to_string(),
            };
            assert!(error.contains("--service-time-ms"), "{flag}: {error}");
            assert!(error.contains(&format!("'{value}'")), "{flag}: {error}");
        }
        for value in ["0", "0.5", "20", "3600000"] {
            let flag = format!("--service-time-ms={value}");
            assert!(sim_backend(&[&flag]).is_ok(), "{flag} was refused");
        }
    }

    #[test]
    fn sim_backend_refuses_a_worker_count_it_cannot_run() {
        for value in ["0", "1000001", "18446744073709551615"] {
            let flag = format!("--workers={value}");
            let error = sim_backend(&[&flag]).err().expect("refused").to_string();
            assert!(error.contains("--workers"), "{flag}: {error}");
            assert!(error.contains(&format!("'{value}'")), "{flag}: {error}");
        }
    }
}
