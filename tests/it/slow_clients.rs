//! The acceptance test of "slow clients must not make loadgate shed everyone else":
//! hundreds of clients uploading or reading a few bytes a second, or one HTTP/2
//! connection with 199 slow streams, beside a client sending ordinary GETs that must
//! all be served. Asserted from outside: the statuses every client saw, what reached
//! the simulated backend's workers, and the proxy's `/status`.
//!
//! Not here: each protection alone (timeouts, 413, backpressure on large responses),
//! which `clients.rs` and the unit tests cover.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use loadgate::config::Config;
use loadgate::listener::Proxy;
use loadgate::sim::SimBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::support::*;

/// The backend's pool, Tomcat's default `maxThreads`, and the proxy's `max_workers`.
const WORKERS: usize = 200;

/// How long the slow clients of the first test keep at it.
const SLOW_FOR: Duration = Duration::from_secs(20);
const UPLOADERS: usize = 200;
const READERS: usize = 200;
/// The declared length of each slow upload, far below `request_buffer_bytes`.
const UPLOAD_LEN: usize = 1000;
/// An uploader sends one body byte this often: 4 B/s, under `body_min_rate` (240 B/s).
const UPLOAD_BYTE_EVERY: Duration = Duration::from_millis(250);
/// A slow reader's response: within the 64 KiB the proxy takes from the backend at once.
const RESPONSE_LEN: usize = 32 * 1024;
/// A slow reader that reads at all takes this many bytes every `READ_EVERY`: 64 B/s.
const READ_CHUNK: usize = 16;
const READ_EVERY: Duration = Duration::from_millis(250);
/// The ordinary client's pace: 4 GETs a second.
const GET_EVERY: Duration = Duration::from_millis(250);

/// The default `body_min_rate` grace: no upload is refused for pace before it.
const UPLOAD_GRACE: Duration = Duration::from_secs(5);

/// Streams on the one HTTP/2 connection of the second test, and the limit it must meet.
const H2_STREAMS: usize = 199;
const H2_MAX_STREAMS: usize = 32;
/// How long each of those streams holds a backend worker.
const SLOW_SERVICE_MS: f64 = 1000.0;

/// A backend of `WORKERS` workers answering at once, except `/api/slow`.
async fn backend() -> SimBackend {
    TestBackend::new()
        .workers(WORKERS)
        .route("/api/slow", SLOW_SERVICE_MS)
        .start()
        .await
}

/// The support config as it is (server limits at their defaults: `request_buffer_bytes`,
/// `body_read_timeout_ms`, `body_min_rate`, `send_timeout_ms`,
/// `http2_max_concurrent_streams`; local signal only, as in `shedding.rs`, since the
/// shedding measured before the fix was the proxy's own in-flight count; health checks
/// on), except `max_workers`, which must match the backend's pool for utilisation to mean
/// what it says.
fn config_for(backend: &SimBackend) -> Config {
    let mut config = proxy_config(backend.addr());
    config.upstreams[0].max_workers = WORKERS as u32;
    config
}

/// Aborts the tasks it holds when dropped, so a failed assertion leaves no client running.
#[derive(Default)]
struct Tasks(Vec<AbortHandle>);

impl Tasks {
    fn spawn<T: Send + 'static>(
        &mut self,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        let handle = tokio::spawn(task);
        self.0.push(handle.abort_handle());
        handle
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Waits for a task that should end by `by`.
async fn join<T>(task: JoinHandle<T>, by: Instant, what: &str) -> T {
    tokio::time::timeout_at(by, task)
        .await
        .unwrap_or_else(|_| panic!("{what} still running at its deadline"))
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// The status code of a response that starts with `bytes` (`HTTP/1.1 408 ...`).
fn status_of(bytes: &[u8]) -> Option<u16> {
    std::str::from_utf8(bytes.get(9..12)?).ok()?.parse().ok()
}

/// How one slow upload ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum UploadEnd {
    /// Answered with this status, this long after its head was sent.
    Answered(u16, Duration),
    /// Closed (or reset) without a response, this long after its head.
    Closed(Duration),
    /// The connection could not be made.
    NotConnected,
    /// Still going when the run ended.
    Unfinished,
}

/// One upload of `UPLOAD_LEN` declared bytes, one byte every `UPLOAD_BYTE_EVERY`,
/// until the proxy answers or closes, or `until`.
async fn slow_upload(addr: SocketAddr, until: Instant) -> UploadEnd {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return UploadEnd::NotConnected;
    };
    let head =
        format!("POST /api/uploads HTTP/1.1\r\nHost: a\r\nContent-Length: {UPLOAD_LEN}\r\n\r\n");
    let started = Instant::now();
    let (mut reader, mut writer) = stream.split();
    let trickle = async {
        if writer.write_all(head.as_bytes()).await.is_ok() {
            for _ in 0..UPLOAD_LEN {
                if writer.write_all(b"x").await.is_err() {
                    break;
                }
                sleep(UPLOAD_BYTE_EVERY).await;
            }
        }
        // The body is sent (or the proxy stopped taking it): wait for the answer.
        std::future::pending::<()>().await
    };
    let answer = async {
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    return match status_of(&head) {
                        Some(status) => UploadEnd::Answered(status, started.elapsed()),
                        None => UploadEnd::Closed(started.elapsed()),
                    }
                }
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if let Some(status) = status_of(&head) {
                return UploadEnd::Answered(status, started.elapsed());
            }
        }
    };
    tokio::select! {
        end = answer => end,
        () = trickle => unreachable!("the trickle never ends"),
        () = sleep_until(until) => UploadEnd::Unfinished,
    }
}

/// One slow uploader: uploads again each time the last one ends, until `until`.
async fn slow_uploader(addr: SocketAddr, until: Instant) -> Vec<UploadEnd> {
    let mut ends = Vec::new();
    while Instant::now() < until {
        let end = slow_upload(addr, until).await;
        if end == UploadEnd::NotConnected {
            sleep(Duration::from_millis(100)).await;
        }
        ends.push(end);
    }
    ends
}

/// What a slow reader saw by the end of the run.
#[derive(Debug)]
struct ReaderEnd {
    status: Option<u16>,
    /// Bytes of the response read, head included.
    read: usize,
    /// The proxy closed the connection before the run ended.
    closed: bool,
}

/// GETs a `RESPONSE_LEN` body through a 4 KiB receive buffer, reads its status line,
/// then reads `READ_CHUNK` bytes every `READ_EVERY` (or, with `reads` false, nothing)
/// until `until`. Returns the connection too, so it stays open while the test looks.
async fn slow_reader(addr: SocketAddr, reads: bool, until: Instant) -> (ReaderEnd, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.expect("the proxy accepts");
    let request = format!("GET /api/downloads?size={RESPONSE_LEN} HTTP/1.1\r\nHost: a\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut end = ReaderEnd {
        status: None,
        read: 0,
        closed: false,
    };
    let mut head = [0u8; 12];
    match timeout(Duration::from_secs(10), stream.read_exact(&mut head)).await {
        Ok(Ok(_)) => {
            end.status = status_of(&head);
            end.read = head.len();
        }
        _ => {
            end.closed = true;
            return (end, stream);
        }
    }
    if !reads {
        sleep_until(until).await;
        return (end, stream);
    }
    let mut buf = [0u8; READ_CHUNK];
    let mut tick = tokio::time::interval(READ_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = sleep_until(until) => return (end, stream),
        }
        // The proxy holds the response for this client: a byte is always there.
        match timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => end.read += n,
            _ => {
                end.closed = true;
                return (end, stream);
            }
        }
    }
}

/// The ordinary client: a GET every `GET_EVERY` until `until`, alternating a normal and
/// a sheddable route; each answer's status (0: no response within 10 s) and time.
async fn ordinary_client(addr: SocketAddr, until: Instant) -> Vec<(Duration, String, u16)> {
    let c = client();
    let started = Instant::now();
    let mut tick = tokio::time::interval(GET_EVERY);
    let mut answers = Vec::new();
    let mut i = 0;
    while Instant::now() < until {
        tick.tick().await;
        let path = if i % 2 == 0 {
            format!("/api/orders/{i}")
        } else {
            format!("/api/reports/{i}")
        };
        i += 1;
        let at = started.elapsed();
        let req = Request::get(format!("http://{addr}{path}"))
            .body(loadgate::http::body::empty())
            .unwrap();
        let status = match timeout(Duration::from_secs(10), c.request(req)).await {
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                let _ = timeout(Duration::from_secs(10), response.into_body().collect()).await;
                status
            }
            _ => 0,
        };
        answers.push((at, path, status));
    }
    answers
}

/// What `/status` said at its busiest during a run.
#[derive(Debug, Default, Clone, Copy)]
struct StatusPeak {
    samples: usize,
    inflight: u64,
    utilisation: f64,
    shedding_seen: bool,
}

/// Reads the proxy's `/status` every 250 ms until `until`; the highest figures.
async fn watch_status(proxy_admin: SocketAddr, until: Instant) -> StatusPeak {
    let c = client();
    let url = format!("http://{proxy_admin}/status");
    let mut peak = StatusPeak::default();
    while Instant::now() < until {
        let status = get(&c, &url).await.json();
        let upstream = &status["upstreams"][0];
        peak.samples += 1;
        peak.inflight = peak.inflight.max(upstream["inflight"].as_u64().unwrap());
        let utilisation = upstream["shedding"]["utilisation"].as_f64().unwrap();
        peak.utilisation = peak.utilisation.max(utilisation);
        peak.shedding_seen |= upstream["shedding"]["active"] == true;
        sleep(Duration::from_millis(250)).await;
    }
    peak
}

/// Waits (at most 3 s) for `/readyz` to say 200: the backend's first health check passed.
async fn wait_ready(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while admin::readyz(proxy).await.status != 200 {
        assert!(Instant::now() < deadline, "not ready within 3 s");
        sleep(Duration::from_millis(20)).await;
    }
}

/// The `/status` fields a failure message needs: the upstream and the routes' counts.
async fn status_summary(proxy: &Proxy) -> String {
    let status = admin::status(proxy).await;
    let routes: Vec<String> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}: admitted {} shed {}",
                r["name"], r["admitted"], r["shed"]
            )
        })
        .collect();
    format!(
        "upstream {}; routes {routes:?}",
        status["upstreams"][0]["shedding"]
    )
}

/// The `shed` count of route `name` in `/status`.
fn shed_of(status: &serde_json::Value, name: &str) -> u64 {
    status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["shed"].as_u64())
        .unwrap_or_else(|| panic!("route {name} in /status"))
}

/// Before the fix, ~190 slow uploads held backend workers and pushed utilisation to
/// 0.87, and 29 of 30 ordinary GETs got 429; slow readers did the same. Now a small body
/// is read in full before admission (and a slow one refused with 408 after the grace),
/// and a small response is taken from the backend at once, so neither holds a worker
/// or a place in the shedding count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_and_slow_readers_do_not_shed_other_clients() {
    let backend = backend().await;
    let proxy = start_proxy(config_for(&backend)).await;
    let addr = proxy.addr();
    wait_ready(&proxy).await;

    let mut tasks = Tasks::default();
    let started = Instant::now();
    let until = started + SLOW_FOR;
    // The slow clients start over the first 2 s: 400 connections at one instant would be
    // a burst, not slow clients.
    let stagger = |i: usize| Duration::from_millis(i as u64 * 2000 / UPLOADERS as u64);
    let uploaders: Vec<_> = (0..UPLOADERS)
        .map(|i| {
            tasks.spawn(async move {
                sleep(stagger(i)).await;
                slow_uploader(addr, until).await
            })
        })
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            tasks.spawn(async move {
                sleep(stagger(i)).await;
                slow_reader(addr, i % 2 == 0, until).await
            })
        })
        .collect();
    let ordinary = tasks.spawn(ordinary_client(addr, until));
    let watcher = tasks.spawn(watch_status(proxy.admin_addr(), until));

    // Every client stops at `until`; one request or read in progress may take a little
    // longer (each is bounded by 10 s).
    let by = until + Duration::from_secs(12);
    let answers = join(ordinary, by, "the ordinary client").await;
    let peak = join(watcher, by, "the /status watcher").await;
    let mut uploads = Vec::new();
    for task in uploaders {
        uploads.extend(join(task, by, "an uploader").await);
    }
    // The readers' connections stay open, each with most of its response unread.
    let mut reader_ends = Vec::new();
    let mut reader_streams = Vec::new();
    for task in readers {
        let (end, stream) = join(task, by, "a reader").await;
        reader_ends.push(end);
        reader_streams.push(stream);
    }
    let stats = backend.stats();

    // With every slow reader still connected and its response unread, nothing is in
    // flight to the backend and no worker is busy.
    let shared = proxy.shared().clone();
    let settled = eventually(Duration::from_secs(3), || {
        shared.generation.load().upstreams["app"].inflight() == 0 && stats.busy() == 0
    })
    .await;
    let status = admin::status(&proxy).await;
    let summary = status_summary(&proxy).await;

    let answered = |code| {
        uploads
            .iter()
            .filter(|e| matches!(e, UploadEnd::Answered(s, _) if *s == code))
            .count()
    };
    let timed_out = answered(408);
    let closed = uploads
        .iter()
        .filter(|e| matches!(e, UploadEnd::Closed(_)))
        .count();
    let upload_times: Vec<Duration> = uploads
        .iter()
        .filter_map(|e| match e {
            UploadEnd::Answered(408, at) => Some(*at),
            _ => None,
        })
        .collect();
    let reader_200 = reader_ends.iter().filter(|e| e.status == Some(200)).count();
    let readers_closed = reader_ends.iter().filter(|e| e.closed).count();
    let read_bytes: usize = reader_ends.iter().map(|e| e.read).sum();
    let failed: Vec<_> = answers.iter().filter(|(_, _, s)| *s != 200).collect();
    println!(
        "ordinary GETs {} ({} not 200); uploads {} (408: {timed_out}, closed unanswered: \
         {closed}, 408 after {:?}..{:?}); readers 200: {reader_200}, closed: {readers_closed}, \
         read {read_bytes} B; /status peak {peak:?}; backend peak busy {}, POSTs {}, \
         downloads {}; {summary}",
        answers.len(),
        failed.len(),
        uploads.len(),
        upload_times.iter().min(),
        upload_times.iter().max(),
        stats.peak_busy(),
        stats.requests_by_method("POST", "/api/uploads"),
        stats.requests("/api/downloads"),
    );

    // What the user sees: every ordinary GET served, at the pace it was sent.
    assert!(
        failed.is_empty(),
        "{} of {} ordinary GETs were not 200 (at, path, status): {failed:?}; \
         /status peak {peak:?}; backend peak busy {}; {summary}",
        failed.len(),
        answers.len(),
        stats.peak_busy()
    );
    assert!(
        answers.len() >= 60,
        "only {} ordinary GETs in {SLOW_FOR:?}",
        answers.len()
    );
    assert_eq!(shed_of(&status, "api"), 0, "{summary}");
    assert_eq!(shed_of(&status, "reports"), 0, "{summary}");
    assert!(!peak.shedding_seen, "a shedding episode: {peak:?}");

    // The uploads: each refused 408 once past the grace, none ever reached the backend.
    assert!(
        uploads
            .iter()
            .all(|e| matches!(e, UploadEnd::Answered(408, _) | UploadEnd::Unfinished)),
        "uploads ended otherwise than 408: {:?}",
        uploads
            .iter()
            .filter(|e| !matches!(e, UploadEnd::Answered(408, _) | UploadEnd::Unfinished))
            .collect::<Vec<_>>()
    );
    assert!(
        timed_out >= 2 * UPLOADERS,
        "only {timed_out} uploads answered 408 in {SLOW_FOR:?} by {UPLOADERS} uploaders"
    );
    for at in &upload_times {
        assert!(
            *at >= UPLOAD_GRACE - Duration::from_millis(100) && *at < Duration::from_secs(8),
            "an upload got 408 after {at:?}; the pace is held from 5 s"
        );
    }
    assert_eq!(stats.requests_by_method("POST", "/api/uploads"), 0);

    // The readers: all answered 200 by the backend, and none holds a worker or a slot.
    assert_eq!(reader_200, READERS, "{reader_ends:?}");
    assert_eq!(readers_closed, 0, "{reader_ends:?}");
    assert_eq!(stats.requests("/api/downloads"), READERS as u64);
    assert!(
        settled,
        "with the slow readers connected, in flight {} and backend busy {}",
        shared.generation.load().upstreams["app"].inflight(),
        stats.busy()
    );
    // Only the ordinary GETs, the readers' requests until their response is read ahead
    // and the health checks ever took workers: a fifth of the pool at most, far from the
    // sheddable threshold (0.70).
    assert!(peak.samples >= 40, "{peak:?}");
    assert!(
        peak.inflight <= 40,
        "own in-flight reached {}",
        peak.inflight
    );
    assert!(
        peak.utilisation <= 0.2,
        "utilisation reached {}",
        peak.utilisation
    );
    assert!(
        stats.peak_busy() <= 40,
        "the backend had {} workers busy",
        stats.peak_busy()
    );
    drop(reader_streams);
}

/// Before the fix, one HTTP/2 connection with 199 slow streams made loadgate shed 3 of 5
/// ordinary GETs. Now the proxy advertises `http2_max_concurrent_streams` (32), so the
/// connection's other streams wait at the client and it never holds more than 32 workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_cannot_take_the_pool() {
    let backend = backend().await;
    let proxy = start_proxy(config_for(&backend)).await;
    let addr = proxy.addr();
    let stats = backend.stats();
    let mut tasks = Tasks::default();
    wait_ready(&proxy).await;

    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tasks.spawn(connection);
    let h2_get = |path: &str| {
        Request::get(format!("http://{addr}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    // One exchange first, so the client has the proxy's SETTINGS before it opens more.
    let mut first = sender.clone();
    let warm = timeout(
        Duration::from_secs(5),
        first.send_request(h2_get("/api/orders/warm")),
    )
    .await
    .expect("an HTTP/2 answer within 5 s")
    .expect("the HTTP/2 request succeeds");
    assert_eq!(warm.status(), 200);

    let streams: Vec<_> = (0..H2_STREAMS)
        .map(|_| {
            let mut sender = sender.clone();
            let req = h2_get("/api/slow");
            tasks.spawn(async move {
                let exchange = async {
                    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = response.status().as_u16();
                    response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(status)
                };
                match timeout(Duration::from_secs(30), exchange).await {
                    Ok(answer) => answer,
                    Err(_) => Err("no answer within 30 s".to_string()),
                }
            })
        })
        .collect();

    // The connection gets its 32 workers ...
    let busy = || stats.busy();
    assert!(
        eventually(Duration::from_secs(5), || busy() >= H2_MAX_STREAMS).await,
        "the HTTP/2 connection never had {H2_MAX_STREAMS} requests at the backend: busy {}",
        busy()
    );
    // ... and another client is served meanwhile, on a normal and a sheddable route.
    let c = client();
    let mut others = Vec::new();
    for i in 0..5 {
        let path = if i % 2 == 0 {
            format!("/api/orders/{i}")
        } else {
            format!("/api/reports/{i}")
        };
        let got = get(&c, &format!("http://{addr}{path}")).await;
        others.push((path, got.status, stats.busy()));
        sleep(Duration::from_millis(300)).await;
    }
    let summary = status_summary(&proxy).await;
    assert!(
        others.iter().all(|(_, status, _)| *status == 200),
        "(path, status, backend busy): {others:?}; {summary}"
    );

    // Every stream is served, 32 at a time.
    // Each stream gives up after 30 s of its own.
    let by = Instant::now() + Duration::from_secs(35);
    let mut statuses = Vec::new();
    for task in streams {
        statuses.push(join(task, by, "an HTTP/2 stream").await);
    }
    let not_ok: Vec<_> = statuses.iter().filter(|s| **s != Ok(200)).collect();
    assert!(
        not_ok.is_empty(),
        "{} of {H2_STREAMS} streams: {not_ok:?}",
        not_ok.len()
    );
    assert_eq!(stats.requests("/api/slow"), H2_STREAMS as u64);
    // At most 32 of the connection's requests at the backend at once; the one ordinary
    // GET and the one health check that can overlap them are the rest.
    println!(
        "backend peak busy {} (pool {WORKERS}); others {others:?}; {summary}",
        stats.peak_busy()
    );
    assert!(
        stats.peak_busy() <= H2_MAX_STREAMS + 2,
        "the backend had {} workers busy at once",
        stats.peak_busy()
    );

    // The backend was never taken out of rotation, and nothing was shed.
    let status = admin::status(&proxy).await;
    assert_eq!(status["upstreams"][0]["backends"][0]["healthy"], true);
    assert_eq!(admin::readyz(&proxy).await.status, 200);
    let ejections = admin::counter(
        &proxy,
        "loadgate_backend_ejections_total",
        &[
            ("upstream", "app"),
            ("backend", &backend.addr().to_string()),
        ],
    )
    .await;
    assert_eq!(ejections, 0.0);
    assert_eq!(shed_of(&status, "api"), 0, "{summary}");
    assert_eq!(shed_of(&status, "reports"), 0, "{summary}");
}
