//! The actuator poller against real sockets: the simulated backend in both formats,
//! a 404 actuator, a stalled one, a saturated pool, and figures that must be refused.
//!
//! Real clock (the poller does real I/O, which a paused clock would time out at once);
//! every wait is bounded by a deadline, no test sleeps for a fixed time and hopes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use loadgate::admission::actuator::ActuatorFormat;
use loadgate::admission::poller::{spawn_poller, ActuatorSettings};
use loadgate::admission::signal::ReportedSignal;
use loadgate::sim::SimBackend;
use tokio::task::JoinHandle;

use crate::support::origin::{Origin, Stalled};
use crate::support::{client, closed_port, eventually, get, TestBackend};

const DEADLINE: Duration = Duration::from_secs(5);

/// Fast polls with a generous timeout, so a loaded test machine cannot fail a good poll.
fn settings(format: ActuatorFormat, base_url: Option<String>) -> ActuatorSettings {
    ActuatorSettings {
        format,
        base_url,
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
        ..ActuatorSettings::default()
    }
}

/// A short timeout, for the tests where polls are meant to time out.
fn impatient(format: ActuatorFormat) -> ActuatorSettings {
    ActuatorSettings {
        timeout: Duration::from_millis(40),
        ..settings(format, None)
    }
}

/// Starts a poller for `backend` and returns the signal it writes.
fn poll(backend: SocketAddr, settings: ActuatorSettings) -> (Arc<ReportedSignal>, JoinHandle<()>) {
    let signal = Arc::new(ReportedSignal::new(settings.interval));
    let task = spawn_poller(
        "app".into(),
        backend.to_string(),
        settings,
        Arc::clone(&signal),
        || 0,
        || false,
        None,
    );
    (signal, task)
}

/// Sends `n` requests that each hold a worker for 8 s, and waits until they do.
async fn hold_workers(backend: &SimBackend, n: usize) {
    let stats = backend.stats();
    let before = stats.busy();
    for _ in 0..n {
        let url = format!("http://{}/api/hold?delay_ms=8000", backend.addr());
        tokio::spawn(async move { get(&client(), &url).await });
    }
    assert!(
        eventually(DEADLINE, || stats.busy() == before + n).await,
        "{n} workers busy, saw {}",
        stats.busy()
    );
}

async fn reported_busy(signal: &ReportedSignal, busy: f64) -> bool {
    eventually(DEADLINE, || signal.latest().is_some_and(|r| r.busy == busy)).await
}

#[tokio::test]
async fn json_poll_on_the_management_port_matches_the_backend() {
    let backend = TestBackend::new()
        .workers(8)
        .management_port()
        .start()
        .await;
    let mgmt = format!("http://{}", backend.management_addr().unwrap());
    hold_workers(&backend, 3).await;
    let (signal, task) = poll(backend.addr(), settings(ActuatorFormat::Json, Some(mgmt)));

    assert!(
        reported_busy(&signal, 3.0).await,
        "last error: {:?}",
        signal.last_error()
    );
    let report = signal.latest().unwrap();
    let stats = backend.stats();
    assert_eq!(
        (report.busy, report.max),
        (stats.busy() as f64, stats.max_workers() as f64)
    );
    assert_eq!(signal.last_error(), None);
    // Nothing of it is this proxy's, and the poll took no worker (management port):
    // all three busy workers are external load.
    assert_eq!(report.own, 0.0);
    assert_eq!(report.poll_workers, 0.0);
    assert_eq!(signal.external_now(tokio::time::Instant::now()), 3.0);

    // Busy follows the backend up.
    hold_workers(&backend, 2).await;
    assert!(
        reported_busy(&signal, 5.0).await,
        "last error: {:?}",
        signal.last_error()
    );
    task.abort();
}

#[tokio::test]
async fn prometheus_poll_matches_the_backend() {
    let backend = TestBackend::new()
        .workers(6)
        .management_port()
        .start()
        .await;
    let mgmt = format!("http://{}", backend.management_addr().unwrap());
    hold_workers(&backend, 4).await;
    let (signal, task) = poll(
        backend.addr(),
        settings(ActuatorFormat::Prometheus, Some(mgmt)),
    );

    assert!(
        reported_busy(&signal, 4.0).await,
        "last error: {:?}",
        signal.last_error()
    );
    assert_eq!(signal.latest().unwrap().max, 6.0);
    assert!(backend.stats().requests("/actuator/prometheus") >= 1);
    assert_eq!(
        backend
            .stats()
            .requests("/actuator/metrics/tomcat.threads.busy"),
        0
    );
    task.abort();
}

#[tokio::test]
async fn without_base_url_the_backend_address_is_polled() {
    // No management port: the actuator answers on the main port, sharing the workers.
    let backend = TestBackend::new().workers(4).start().await;
    let (signal, task) = poll(backend.addr(), settings(ActuatorFormat::Json, None));
    assert!(
        eventually(DEADLINE, || signal.good_polls() >= 2).await,
        "last error: {:?}",
        signal.last_error()
    );
    let report = signal.latest().unwrap();
    assert_eq!(report.max, 4.0);
    // The busy figure is fetched alone, so it counts exactly the poll's own worker,
    // which is not external load.
    assert_eq!(report.busy, 1.0);
    assert_eq!(report.poll_workers, 1.0);
    assert_eq!(signal.external_now(tokio::time::Instant::now()), 0.0);
    task.abort();
}

#[tokio::test]
async fn a_404_actuator_gives_no_report_and_says_how_to_fix_it() {
    // With a management port, the main port answers 404 for /actuator/*.
    let backend = TestBackend::new().management_port().start().await;
    let main = format!("http://{}", backend.addr());
    let (signal, task) = poll(backend.addr(), settings(ActuatorFormat::Json, Some(main)));

    assert!(eventually(DEADLINE, || signal.failed_polls() >= 3).await);
    assert!(signal.latest().is_none());
    assert_eq!(signal.good_polls(), 0);
    let error = signal.last_error().unwrap();
    assert!(error.contains("404"), "{error}");
    assert!(
        error.contains("server.tomcat.mbeanregistry.enabled=true"),
        "{error}"
    );
    // No report: no external load, idle stays idle.
    assert_eq!(signal.external_now(tokio::time::Instant::now()), 0.0);
    task.abort();
}

#[tokio::test]
async fn a_stalled_actuator_times_out_every_poll() {
    // Accepts connections and never answers.
    let stalled = Stalled::start().await;
    let (signal, task) = poll(stalled.addr(), impatient(ActuatorFormat::Prometheus));

    // Each poll ends at its timeout, so failures keep coming.
    assert!(eventually(DEADLINE, || signal.failed_polls() >= 4).await);
    assert!(signal.latest().is_none());
    assert_eq!(
        signal.last_error().unwrap(),
        "the actuator did not answer within 40ms"
    );
    task.abort();
}

#[tokio::test]
async fn a_saturated_pool_starves_an_actuator_on_the_main_port() {
    // Without management.server.port the actuator needs a worker too.
    let backend = TestBackend::new().workers(2).start().await;
    hold_workers(&backend, 2).await;
    let (signal, task) = poll(backend.addr(), impatient(ActuatorFormat::Json));

    assert!(eventually(DEADLINE, || signal.failed_polls() >= 3).await);
    assert!(signal.latest().is_none());
    assert!(signal
        .last_error()
        .unwrap()
        .contains("did not answer within"));
    task.abort();
}

#[tokio::test]
async fn an_unreachable_actuator_is_a_connect_error() {
    let dead = closed_port().await;
    let (signal, task) = poll(dead.addr(), settings(ActuatorFormat::Json, None));
    assert!(eventually(DEADLINE, || signal.failed_polls() >= 2).await);
    let error = signal.last_error().unwrap();
    assert!(error.starts_with("cannot reach the actuator"), "{error}");
    task.abort();
}

#[tokio::test]
async fn minus_one_max_is_refused_with_its_cause() {
    let text = "# HELP tomcat_threads_config_max_threads  \n\
                # TYPE tomcat_threads_config_max_threads gauge\n\
                tomcat_threads_config_max_threads{application=\"shop\",name=\"http-nio-8080\",} -1.0\n\
                tomcat_threads_busy_threads{application=\"shop\",name=\"http-nio-8080\",} 0.0\n";
    let origin = Origin::canned(200, text).await;
    let (signal, task) = poll(origin.addr(), settings(ActuatorFormat::Prometheus, None));

    assert!(eventually(DEADLINE, || signal.failed_polls() >= 2).await);
    assert!(signal.latest().is_none());
    let error = signal.last_error().unwrap();
    assert!(error.contains("max is -1: Spring Boot 3.3"), "{error}");
    task.abort();
}

#[tokio::test]
async fn malformed_json_and_other_statuses_are_errors() {
    let origin = Origin::canned(200, "<html>Whitelabel Error Page</html>").await;
    let (signal, task) = poll(origin.addr(), settings(ActuatorFormat::Json, None));
    assert!(eventually(DEADLINE, || signal.failed_polls() >= 2).await);
    let error = signal.last_error().unwrap();
    assert!(
        error.starts_with("the actuator's answer cannot be read: tomcat.threads.busy"),
        "{error}"
    );
    task.abort();
    drop(origin);

    let origin = Origin::canned(401, "").await;
    let (signal, task) = poll(origin.addr(), settings(ActuatorFormat::Json, None));
    assert!(eventually(DEADLINE, || signal.failed_polls() >= 2).await);
    let error = signal.last_error().unwrap();
    assert!(
        error.starts_with("the actuator answered 401 Unauthorized"),
        "{error}"
    );
    task.abort();
}

#[tokio::test]
async fn the_poller_stops_when_the_signal_is_dropped_or_disabled() {
    let backend = TestBackend::new().management_port().start().await;
    let mgmt = format!("http://{}", backend.management_addr().unwrap());
    let (signal, task) = poll(backend.addr(), settings(ActuatorFormat::Json, Some(mgmt)));
    assert!(eventually(DEADLINE, || signal.good_polls() >= 1).await);
    drop(signal);
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("poller ends once nobody reads its signal")
        .unwrap();

    let disabled = ActuatorSettings {
        enabled: false,
        ..ActuatorSettings::default()
    };
    let (signal, task) = poll(backend.addr(), disabled);
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    assert_eq!(signal.good_polls() + signal.failed_polls(), 0);
}
