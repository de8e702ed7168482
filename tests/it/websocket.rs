//! WebSocket through the proxy: the opening handshake forwarded with its Upgrade, the
//! backend's 101 passed back, then frames both ways until a close, an idle timeout or
//! the drain deadline. The backend is a real WebSocket server (tokio-tungstenite) on
//! 127.0.0.1; what is asserted is what the client and the backend see, and the
//! proxy's `/status` and metrics.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue};
use loadgate::config::Config;
use loadgate::listener::Proxy;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::origin::{respond, Origin};
use crate::support::*;

/// What the WebSocket backend saw of one connection.
#[derive(Debug)]
enum Seen {
    /// The handshake's headers, as the proxy sent them.
    Handshake(HeaderMap),
    /// A close frame from the client, with its code.
    Close(CloseCode),
    /// The connection ended (closed or failed).
    Ended,
}

/// A WebSocket backend: greets each connection with `welcome`, echoes every data frame,
/// answers `close-me` by closing with 1001 (Going Away), and reports what it sees.
/// It picks the first subprotocol offered. Stops when dropped.
struct WsBackend {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    server: tokio::task::JoinHandle<()>,
}

impl WsBackend {
    async fn start() -> WsBackend {
        let listener = TcpListener::bind(LOCAL0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(echo(stream, tx.clone()));
            }
        });
        WsBackend { addr, seen, server }
    }

    /// The next thing the backend saw, within 5 s.
    async fn next(&mut self) -> Seen {
        timeout(Duration::from_secs(5), self.seen.recv())
            .await
            .expect("the backend saw something within 5 s")
            .expect("the backend is running")
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn echo(stream: TcpStream, seen: mpsc::UnboundedSender<Seen>) {
    let handshake = seen.clone();
    // The callback's shape is tungstenite's: its error is a whole response.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &WsRequest, mut response: WsResponse| {
        let _ = handshake.send(Seen::Handshake(req.headers().clone()));
        let offered = req.headers().get("sec-websocket-protocol");
        if let Some(first) = offered.and_then(|v| v.to_str().ok()?.split(',').next()) {
            let chosen = HeaderValue::from_str(first.trim()).unwrap();
            response
                .headers_mut()
                .insert("sec-websocket-protocol", chosen);
        }
        Ok::<_, ErrorResponse>(response)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        let _ = seen.send(Seen::Ended);
        return;
    };
    if ws.send(Message::text("welcome")).await.is_ok() {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Text(text) if text.as_str() == "close-me" => {
                    let frame = CloseFrame {
                        code: CloseCode::Away,
                        reason: "bye".into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                }
                Message::Text(_) | Message::Binary(_) => {
                    let echoed = ws.send(message).await;
                    if echoed.is_err() {
                        break;
                    }
                }
                Message::Close(frame) => {
                    let code = frame.map_or(CloseCode::Status, |f| f.code);
                    let _ = seen.send(Seen::Close(code));
                }
                _ => {}
            }
        }
    }
    let _ = seen.send(Seen::Ended);
}

type Client = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `path` through `proxy`, offering the STOMP subprotocol; returns
/// it with the proxy's 101 response.
async fn connect(proxy: &Proxy, path: &str) -> (Client, http::Response<Option<Vec<u8>>>) {
    let url = format!("ws://{}{path}", proxy.addr());
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("v12.stomp"),
    );
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("handshake within 5 s")
    .expect("the WebSocket handshake succeeds through the proxy")
}

/// The next message the client receives, within 5 s; `None` once the stream has ended.
async fn receive(ws: &mut Client) -> Option<Message> {
    timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message or the end within 5 s")
        .and_then(Result::ok)
}

/// A proxy config for `backend`, health checks off (a WebSocket server answers none),
/// its upstream named `upstream` (metrics are process-wide).
fn ws_config(backend: SocketAddr, upstream: &str) -> Config {
    let mut config = proxy_config(backend);
    config.upstreams[0].health.enabled = false;
    name_upstream(&mut config, upstream);
    config
}

#[tokio::test]
async fn messages_flow_both_ways_and_close_handshakes_complete() {
    let mut backend = WsBackend::start().await;
    let proxy = start_proxy(ws_config(backend.addr, "ws_flow")).await;

    let (mut ws, response) = connect(&proxy, "/api/ws").await;
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "v12.stomp");
    assert_eq!(response.headers()["via"], "1.1 loadgate");
    let Seen::Handshake(sent) = backend.next().await else {
        panic!("the backend saw the handshake first");
    };
    assert_eq!(sent["upgrade"], "websocket");
    assert_eq!(sent["connection"], "upgrade");
    assert_eq!(sent["sec-websocket-protocol"], "v12.stomp");
    assert_eq!(sent["x-forwarded-for"], "127.0.0.1");

    // Pushed by the backend unasked, then echoes.
    assert_eq!(receive(&mut ws).await, Some(Message::text("welcome")));
    ws.send(Message::text("SUBSCRIBE")).await.unwrap();
    assert_eq!(receive(&mut ws).await, Some(Message::text("SUBSCRIBE")));
    let large: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    ws.send(Message::binary(large.clone())).await.unwrap();
    match receive(&mut ws).await {
        Some(Message::Binary(echoed)) => {
            assert_eq!(echoed.len(), large.len());
            assert!(echoed == large, "the 1 MiB frame came back intact");
        }
        other => panic!("expected the binary echo, got {other:?}"),
    }

    // The client closes: the backend sees its close and answers it.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    match receive(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the backend's close reply, got {other:?}"),
    }
    assert!(receive(&mut ws).await.is_none(), "the stream ends");
    assert!(matches!(
        backend.next().await,
        Seen::Close(CloseCode::Normal)
    ));
    assert!(matches!(backend.next().await, Seen::Ended));

    // The backend closes: the client sees its close frame, and the stream ends.
    let (mut ws, _) = connect(&proxy, "/api/ws").await;
    assert!(matches!(backend.next().await, Seen::Handshake(_)));
    assert_eq!(receive(&mut ws).await, Some(Message::text("welcome")));
    ws.send(Message::text("close-me")).await.unwrap();
    match receive(&mut ws).await {
        Some(Message::Close(Some(frame))) => {
            assert_eq!(frame.code, CloseCode::Away);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => panic!("expected the backend's close, got {other:?}"),
    }
    assert!(receive(&mut ws).await.is_none(), "the stream ends");
    assert!(
        matches!(backend.next().await, Seen::Close(CloseCode::Away)),
        "the client's answer to the close reached the backend"
    );
    assert!(matches!(backend.next().await, Seen::Ended));
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_open_websocket_holds_no_inflight_slot_and_is_counted_open() {
    let mut backend = WsBackend::start().await;
    let upstream = "ws_counted";
    let proxy = start_proxy(ws_config(backend.addr, upstream)).await;
    let labels = [("upstream", upstream)];
    let open = "loadgate_upgraded_connections_open";

    let (mut ws, _) = connect(&proxy, "/api/ws").await;
    // Right after the 101, with the socket open: nothing in flight.
    let status = admin::status(&proxy).await;
    assert_eq!(status["upstreams"][0]["name"], upstream);
    assert_eq!(status["upstreams"][0]["inflight"], 0, "{status:#}");
    assert_eq!(status["upstreams"][0]["backends"][0]["inflight"], 0);
    assert_eq!(receive(&mut ws).await, Some(Message::text("welcome")));
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin::metric(&proxy, open, &labels).await != Some(1.0) {
        assert!(Instant::now() < deadline, "the open gauge never reached 1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let switched = [("upstream", upstream), ("outcome", "switched")];
    assert_eq!(
        admin::counter(&proxy, "loadgate_upgrades_total", &switched).await,
        1.0
    );
    let left_pool = [("upstream", upstream), ("event", "upgraded")];
    assert_eq!(
        admin::counter(&proxy, "loadgate_upstream_connections_total", &left_pool).await,
        1.0,
        "the upgraded backend connection left the pool"
    );
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(receive(&mut ws).await, Some(Message::text("still here")));
    assert_eq!(admin::status(&proxy).await["upstreams"][0]["inflight"], 0);

    ws.close(None).await.unwrap();
    while receive(&mut ws).await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin::metric(&proxy, open, &labels).await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the open gauge never went back to 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(backend.next().await, Seen::Handshake(_)));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_silent_websocket_is_closed_at_the_idle_timeout() {
    let mut backend = WsBackend::start().await;
    let mut config = ws_config(backend.addr, "ws_idle");
    let idle = Duration::from_millis(400);
    config.server.upgrade_idle_timeout = idle;
    let proxy = start_proxy(config).await;
    let timed_out = [("kind", "upgraded_idle")];
    let before = admin::counter(&proxy, "loadgate_connections_timed_out_total", &timed_out).await;

    let (mut ws, _) = connect(&proxy, "/api/ws").await;
    assert!(matches!(backend.next().await, Seen::Handshake(_)));
    assert_eq!(receive(&mut ws).await, Some(Message::text("welcome")));
    let silent = Instant::now();
    assert!(
        receive(&mut ws).await.is_none(),
        "the proxy closed the tunnel"
    );
    assert!(
        silent.elapsed() >= idle - Duration::from_millis(50),
        "closed after {:?}, before the idle timeout",
        silent.elapsed()
    );
    assert!(
        matches!(backend.next().await, Seen::Ended),
        "the backend's side is closed too"
    );
    let after = admin::counter(&proxy, "loadgate_connections_timed_out_total", &timed_out).await;
    assert!(after > before, "counted as an upgraded idle timeout");
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_an_open_websocket_at_the_drain_deadline() {
    let mut backend = WsBackend::start().await;
    let mut config = ws_config(backend.addr, "ws_drain");
    let drain = Duration::from_millis(300);
    config.server.drain_timeout = drain;
    let proxy = start_proxy(config).await;
    let (mut ws, _) = connect(&proxy, "/api/ws").await;
    assert_eq!(receive(&mut ws).await, Some(Message::text("welcome")));

    let started = Instant::now();
    timeout(Duration::from_secs(5), proxy.shutdown())
        .await
        .expect("shutdown ends at the drain deadline despite the open WebSocket");
    assert!(
        started.elapsed() >= drain,
        "the WebSocket had until the deadline"
    );
    assert!(
        receive(&mut ws).await.is_none(),
        "the client's side is closed"
    );
    assert!(matches!(backend.next().await, Seen::Handshake(_)));
    assert!(
        matches!(backend.next().await, Seen::Ended),
        "so is the backend's"
    );
}

/// An opening handshake for `path`, as raw bytes, with `extra` header lines.
fn handshake(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_response_and_the_connection_stays_http() {
    let origin = Origin::start(Duration::ZERO, |parts, _| {
        if parts.headers.contains_key("upgrade") {
            respond(403, &[("content-type", "text/plain")], "no sockets here")
        } else {
            respond(200, &[], "plain")
        }
    })
    .await;
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, "ws_refused");
    let proxy = start_proxy(config).await;

    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(handshake("/api/ws", "").as_bytes())
        .await
        .unwrap();
    let refused = read_response(&mut stream).await;
    assert!(refused.starts_with("HTTP/1.1 403 "), "{refused}");
    assert!(refused.ends_with("no sockets here"), "{refused}");
    let sent = origin.last_headers();
    assert_eq!(sent["upgrade"], "websocket", "the handshake was offered");
    assert_eq!(sent["connection"], "upgrade");

    // The same connection carries the next request, still judged as HTTP: an
    // ambiguous one is refused before the backend sees it.
    stream
        .write_all(b"GET /api/next HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let next = read_response(&mut stream).await;
    assert!(next.starts_with("HTTP/1.1 200 "), "{next}");
    assert!(next.ends_with("plain"), "{next}");
    stream
        .write_all(
            b"POST /api/x HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let ambiguous = read_response(&mut stream).await;
    assert!(ambiguous.starts_with("HTTP/1.1 400 "), "{ambiguous}");
    assert_eq!(origin.requests(), 2);
    let declined = [("upstream", "ws_refused"), ("outcome", "declined")];
    assert_eq!(
        admin::counter(&proxy, "loadgate_upgrades_total", &declined).await,
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_route_with_websocket_off_forwards_the_handshake_as_a_plain_get() {
    let origin = Origin::start(Duration::ZERO, |parts, _| {
        if parts.headers.contains_key("upgrade") {
            respond(
                101,
                &[("upgrade", "websocket"), ("connection", "upgrade")],
                "",
            )
        } else {
            respond(400, &[], "Can \"Upgrade\" only to \"WebSocket\".")
        }
    })
    .await;
    let mut config = proxy_config(origin.addr());
    let mut off = config.routes[2].clone();
    off.name = "no-sockets".to_string();
    off.path_prefix = "/api/nows".to_string();
    off.websocket = false;
    config.routes.push(off);
    name_upstream(&mut config, "ws_off");
    let proxy = start_proxy(config).await;

    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(handshake("/api/nows/chat", "").as_bytes())
        .await
        .unwrap();
    let answered = read_response(&mut stream).await;
    assert!(answered.starts_with("HTTP/1.1 400 "), "{answered}");
    let sent = origin.last_headers();
    assert!(!sent.contains_key("upgrade"), "{sent:?}");
    assert!(!sent.contains_key("connection"), "{sent:?}");
    assert_eq!(sent["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    let disabled = [("upstream", "ws_off"), ("outcome", "disabled")];
    assert_eq!(
        admin::counter(&proxy, "loadgate_upgrades_total", &disabled).await,
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_h2c_upgrade_is_still_refused() {
    let origin = Origin::start(Duration::ZERO, |parts, _| {
        if parts.headers.contains_key("upgrade") {
            respond(101, &[("upgrade", "h2c"), ("connection", "upgrade")], "")
        } else {
            respond(200, &[], "http/1.1 it is")
        }
    })
    .await;
    let mut config = proxy_config(origin.addr());
    name_upstream(&mut config, "ws_h2c");
    let proxy = start_proxy(config).await;

    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let h2c = "GET /api/x HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade, HTTP2-Settings\r\n\
               Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    stream.write_all(h2c.as_bytes()).await.unwrap();
    let answered = read_response(&mut stream).await;
    assert!(answered.starts_with("HTTP/1.1 200 "), "{answered}");
    assert!(answered.ends_with("http/1.1 it is"), "{answered}");
    let sent = origin.last_headers();
    assert!(!sent.contains_key("upgrade"), "{sent:?}");
    assert!(!sent.contains_key("http2-settings"), "{sent:?}");
    stream
        .write_all(b"GET /api/y HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut stream)
        .await
        .starts_with("HTTP/1.1 200 "));
    assert_eq!(origin.requests(), 2);
    proxy.shutdown().await;
}
