//! Slow and hostile clients: header read and idle timeouts, 431 and 413, the connection
//! limit, and backpressure from a slow reader all the way to the backend; and a burst of
//! connections spread over the worker threads.

use std::net::SocketAddr;
use std::time::Duration;

use loadgate::config::Config;
use loadgate::listener::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::support::process::Loadgate;
use crate::support::*;

fn with_server(
    backend: SocketAddr,
    edit: impl FnOnce(&mut loadgate::config::ServerConfig),
) -> Config {
    let mut config = proxy_config(backend);
    edit(&mut config.server);
    config
}

/// `loadgate_connections_timed_out_total` for header reads.
async fn header_timeouts(proxy: &Proxy) -> f64 {
    let labels = [("kind", "header")];
    admin::counter(proxy, "loadgate_connections_timed_out_total", &labels).await
}

async fn connections_refused(proxy: &Proxy) -> f64 {
    admin::counter(proxy, "loadgate_connections_refused_total", &[]).await
}

/// Waits (at most `within`) for the peer to close; returns how long that took.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match timeout(
            within.saturating_sub(start.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n";

#[tokio::test]
async fn a_head_over_max_header_bytes_gets_431_and_one_under_it_passes() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(with_server(backend.addr(), |s| {
        s.max_header_bytes = 16 * 1024
    }))
    .await;
    let head = |filler: usize| {
        format!(
            "GET /api/orders/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "a".repeat(filler)
        )
    };
    let ok = raw_exchange(proxy.addr(), head(15 * 1024).as_bytes()).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok:.200}");
    let big = raw_exchange(proxy.addr(), head(20 * 1024).as_bytes()).await;
    assert!(big.starts_with("HTTP/1.1 431"), "{big:.200}");
    assert_eq!(backend.stats().requests("/api/orders/1"), 1);
}

#[tokio::test]
async fn a_declared_body_over_the_limit_gets_413_and_never_reaches_the_backend() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(with_server(backend.addr(), |s| {
        s.max_body_bytes = Some(1 << 20)
    }))
    .await;
    let head = format!(
        "POST /api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        (1 << 20) + 1
    );
    let response = raw_exchange(proxy.addr(), head.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{response}");
    assert!(lower.contains("application/problem+json"), "{response}");
    assert_eq!(backend.stats().requests_by_method("POST", "/api/echo"), 0);

    // At the limit exactly is fine.
    let body = vec![b'x'; 1 << 20];
    let req = http::Request::post(format!("http://{}/api/echo", proxy.addr()))
        .header("content-length", body.len())
        .body(crate::support::body(body))
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), 1 << 20);
}

#[tokio::test]
async fn a_chunked_body_passing_the_limit_gets_413() {
    // The backend answers after 300 ms, so the body passes the limit before any response.
    let backend = TestBackend::new().route("/api/slow", 300.0).start().await;
    let limit = 64 * 1024;
    let proxy = start_proxy(with_server(backend.addr(), |s| {
        s.max_body_bytes = Some(limit)
    }))
    .await;

    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"POST /api/slow HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    // 80 KiB in 16 KiB chunks, no last chunk: everything sent is read, so closing the
    // connection after the 413 cannot reset it.
    for _ in 0..5 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    let mut out = Vec::new();
    let _ = timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let response = String::from_utf8_lossy(&out);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.contains("65536-byte limit"),
        "the problem names the limit: {response}"
    );

    // Under the limit, chunked passes.
    let got = send(
        &client(),
        http::Request::post(format!("http://{}/api/slow", proxy.addr()))
            .body(body(vec![b'y'; 32 * 1024]))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn slowloris_heads_are_closed_at_the_header_timeout_while_requests_flow() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(with_server(backend.addr(), |s| {
        s.header_read_timeout = Duration::from_secs(1);
        s.idle_timeout = Duration::from_secs(30);
    }))
    .await;
    let addr = proxy.addr();
    let before = header_timeouts(&proxy).await;

    // 20 connections, each sending a head one byte every 500 ms.
    let slow: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let start = Instant::now();
                let head = b"GET /api/orders/1 HTTP/1.1\r\nHost: a\r\nX-Slow: ";
                let (mut reader, mut writer) = stream.split();
                let trickle = async {
                    for byte in head.iter().cycle() {
                        if writer.write_all(&[*byte]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    std::future::pending::<()>().await
                };
                let mut buf = [0u8; 256];
                let read = tokio::select! {
                    read = reader.read(&mut buf) => read,
                    () = trickle => unreachable!(),
                    () = tokio::time::sleep(Duration::from_secs(5)) => panic!("still open after 5 s"),
                };
                assert!(
                    matches!(read, Ok(0) | Err(_)),
                    "closed without a response: {read:?}"
                );
                start.elapsed()
            })
        })
        .collect();

    // Meanwhile a normal client keeps getting answers.
    let c = client();
    let mut served = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let got = get(&c, &format!("http://{addr}/api/orders/2")).await;
        assert_eq!(got.status, 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served >= 10, "only {served} requests in 1.5 s");

    for task in slow {
        let lived = task.await.unwrap();
        assert!(
            lived >= Duration::from_millis(900) && lived < Duration::from_millis(2500),
            "a slow head was closed after {lived:?}, the header timeout is 1 s"
        );
    }
    let after = header_timeouts(&proxy).await;
    assert!(after >= before + 20.0, "{before} → {after}");
}

#[tokio::test]
async fn keep_alive_idles_past_the_header_timeout_until_the_idle_timeout() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(with_server(backend.addr(), |s| {
        s.header_read_timeout = Duration::from_millis(500);
        s.idle_timeout = Duration::from_secs(2);
    }))
    .await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));

    // Idle for three header timeouts: still open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(HEALTHZ).await.unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));

    // Then closed at the idle timeout, counted from the last response.
    let closed = closed_within(&mut stream, Duration::from_secs(5)).await;
    let closed = closed.expect("closed within 5 s");
    assert!(
        closed >= Duration::from_millis(1800) && closed < Duration::from_millis(3500),
        "idle connection closed after {closed:?}, the idle timeout is 2 s"
    );
}

#[tokio::test]
async fn a_head_started_on_a_keep_alive_connection_is_timed_from_its_first_byte() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(with_server(backend.addr(), |s| {
        s.header_read_timeout = Duration::from_millis(500);
        s.idle_timeout = Duration::from_secs(30);
    }))
    .await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let closed = closed_within(&mut stream, Duration::from_secs(5)).await;
    let closed = closed.expect("closed within 5 s");
    assert!(
        closed >= Duration::from_millis(400) && closed < Duration::from_millis(1500),
        "partial head closed after {closed:?}, the header timeout is 500 ms"
    );

    // A connection that never sends anything gets the header timeout from accept.
    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    let closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    let closed = closed.expect("closed within 5 s");
    assert!(closed < Duration::from_millis(1500), "{closed:?}");
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_at_accept_and_counted() {
    let backend = TestBackend::new().start().await;
    let proxy = start_proxy(with_server(backend.addr(), |s| s.max_connections = 3)).await;
    let before = connections_refused(&proxy).await;

    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
        open.push(stream);
    }
    let mut fourth = TcpStream::connect(proxy.addr()).await.unwrap();
    let _ = fourth.write_all(HEALTHZ).await;
    let closed = closed_within(&mut fourth, Duration::from_secs(2)).await;
    assert!(closed.is_some(), "the fourth connection was not closed");
    assert!(connections_refused(&proxy).await > before);

    // The three still work, and closing one frees a slot.
    open[0].write_all(HEALTHZ).await.unwrap();
    assert!(read_response(&mut open[0])
        .await
        .starts_with("HTTP/1.1 200"));
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = stream.write_all(HEALTHZ).await;
        let mut buf = [0u8; 12];
        if let Ok(Ok(_)) = timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await {
            assert_eq!(&buf, b"HTTP/1.1 200");
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS line")
}

/// 200 clients read a 10 MiB response at 64 KiB/s each through a proxy running as its own
/// process. Reading all of it would take 160 s, so each client reads for 10 s (about
/// 640 KiB) and then drops the connection; the proxy's RSS is sampled every second
/// meanwhile. A proxy that buffered what its clients cannot take yet would hold most of
/// the 2 GiB in flight within the first second (the backend sends at loopback speed), so
/// a flat RSS far below that shows the backpressure reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_readers_of_large_responses_do_not_grow_proxy_memory() {
    const CLIENTS: usize = 200;
    const SIZE: usize = 10 * 1024 * 1024;
    const RATE: usize = 64 * 1024;
    const READ_FOR: Duration = Duration::from_secs(10);

    let backend = TestBackend::new().workers(CLIENTS + 16).start().await;
    let proxy = Loadgate::run(&format!(
        r#"[server]
listen = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[[upstream]]
name = "app"
backends = ["{}"]
max_workers = 1000
[upstream.health]
enabled = false
[upstream.shedding]
mode = "off"
[[route]]
name = "all"
path_prefix = "/"
upstream = "app"
"#,
        backend.addr()
    ));
    let pid = proxy.pid();
    let addr = proxy.listening_addr();

    // Warm up (first connection to the backend, the 10 MiB ETag digest), then measure idle.
    let warm = get(&client(), &format!("http://{addr}/api/big?size={SIZE}")).await;
    assert_eq!((warm.status, warm.body.len()), (200, SIZE));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid);

    let request = format!("GET /api/big?size={SIZE} HTTP/1.1\r\nHost: a\r\n\r\n");
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move {
                // A small receive buffer, so the client's kernel cannot absorb the response
                // and what the proxy cannot send has to wait in the proxy or the backend.
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_recv_buffer_size(64 * 1024).unwrap();
                let mut stream = socket.connect(addr).await.unwrap();
                stream.write_all(request.as_bytes()).await.unwrap();
                let mut buf = vec![0u8; RATE / 8];
                let mut read = 0usize;
                let mut tick = tokio::time::interval(Duration::from_millis(125));
                let end = Instant::now() + READ_FOR;
                while Instant::now() < end {
                    tick.tick().await;
                    let n = timeout(Duration::from_secs(5), stream.read(&mut buf))
                        .await
                        .expect("data within 5 s")
                        .expect("reads");
                    assert!(n > 0, "response ended early after {read} bytes");
                    read += n;
                }
                read
            })
        })
        .collect();

    let mut samples = Vec::new();
    while started.elapsed() < READ_FOR {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(rss_kib(pid).saturating_sub(idle) / 1024);
    }
    let mut total = 0;
    for task in clients {
        total += task.await.unwrap();
    }
    let peak = *samples.iter().max().unwrap();
    println!(
        "proxy RSS idle {} MiB; growth per second (MiB): {samples:?}; clients read {} MiB in all",
        idle / 1024,
        total >> 20
    );
    assert!(
        total >= CLIENTS * RATE * 5,
        "the clients were starved: {total} bytes"
    );
    assert!(
        peak < 64,
        "proxy RSS grew by {peak} MiB over idle with {CLIENTS} slow readers"
    );
    // Flat once every client is streaming: over the second half the clients take another
    // 62 MiB between them, and RSS must not follow.
    // (It may fall at the end, as the first clients finish and close.)
    let second_half = &samples[samples.len() / 2..];
    let high = *second_half.iter().max().unwrap();
    assert!(
        high <= second_half[0] + 8,
        "RSS kept growing while clients read: {samples:?}"
    );
}

/// A burst of connections opened at once is spread over the worker threads instead of
/// being taken by whichever thread woke first (a load test's 64 connections, or the few
/// an ingress keeps open, would otherwise all be served by one core); each thread's
/// count is in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_connections_is_spread_over_the_worker_threads() {
    const CONNECTIONS: usize = 24;
    let backend = TestBackend::new().start().await;
    let proxy = Loadgate::run(&default_config_text(backend.addr(), "worker_threads = 2"));
    let addr = proxy.listening_addr();
    let admin = proxy.admin_addr();

    // All connected before any sends: the whole burst waits in the listen backlog.
    let connects = (0..CONNECTIONS).map(|_| TcpStream::connect(addr));
    let mut streams: Vec<TcpStream> = futures_util::future::try_join_all(connects).await.unwrap();
    // Each is then served (so accepted by some worker) and kept open.
    for stream in &mut streams {
        stream
            .write_all(b"GET /api/a HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        timeout(Duration::from_secs(10), stream.read_exact(&mut head))
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
    }

    let text = get(&client(), &format!("http://{admin}/metrics"))
        .await
        .text();
    let open = |worker: &str| {
        admin::sample(
            &text,
            "loadgate_worker_connections_open",
            &[("worker", worker)],
        )
        .unwrap_or_else(|| panic!("no count for worker {worker} in /metrics"))
    };
    let (first, second) = (open("0"), open("1"));
    assert_eq!(
        first + second,
        CONNECTIONS as f64,
        "every open connection counted once"
    );
    assert!(
        (first - second).abs() <= 2.0,
        "the burst was not spread: worker 0 holds {first}, worker 1 holds {second}"
    );
}
