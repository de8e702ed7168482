//! Slow and hostile clients: header read and idle timeouts, 431 and 413, the connection
//! limit, and backpressure from a slow reader all the way to the backend.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use loadgate::config::Config;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

fn with_server(
    backend: SocketAddr,
    edit: impl FnOnce(&mut loadgate::config::ServerConfig),
) -> Config {
    let mut config = proxy_config(backend);
    edit(&mut config.server);
    config
}

/// The value of a counter series in the Prometheus rendering, 0 when absent.
fn counter(series: &str) -> u64 {
    let text = loadgate::metrics::handle().render();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Reads one response with a `Content-Length` body from a keep-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        let n = timeout(deadline - Instant::now(), stream.read(&mut buf))
            .await
            .expect("response within 5 s")
            .expect("reads");
        assert!(n > 0, "connection closed mid-response: {text}");
        out.extend_from_slice(&buf[..n]);
    }
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
        .body(support::body(body))
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
            .body(support::body(vec![b'y'; 32 * 1024]))
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
    let before = counter("loadgate_connections_timed_out_total{kind=\"header\"}");

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
    let after = counter("loadgate_connections_timed_out_total{kind=\"header\"}");
    assert!(after >= before + 20, "{before} → {after}");
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
    let before = counter("loadgate_connections_refused_total");

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
    assert!(counter("loadgate_connections_refused_total") > before);

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
