//! An HTTP/2 client with prior knowledge (h2c), from hyper's own connection API: it
//! sends `:authority`, `:path` and any `host` header exactly as the request holds them.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const WITHIN: Duration = Duration::from_secs(3);

/// What came back: a response, or the stream (or connection) error that replaced it.
#[derive(Debug)]
pub enum Answer {
    Response {
        status: u16,
        content_type: Option<String>,
        body: Vec<u8>,
    },
    /// RST_STREAM, GOAWAY or a closed connection: the request was treated as malformed
    /// (RFC 9113 §8.1.1).
    Reset(String),
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Response {
                status,
                content_type,
                body,
            } => write!(
                f,
                "{status} (content-type {content_type:?}) {}",
                body.escape_ascii()
            ),
            Answer::Reset(why) => write!(f, "reset: {why}"),
        }
    }
}

/// Sends `req` on a new h2c connection to `addr`, bounded by a few seconds.
pub async fn send(addr: SocketAddr, req: Request<Empty<Bytes>>) -> Answer {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connects to the proxy");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        Ok::<_, String>(Answer::Response {
            status,
            content_type,
            body,
        })
    };
    match tokio::time::timeout(WITHIN, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => Answer::Reset(error),
        Err(_) => panic!("no HTTP/2 answer within {WITHIN:?}"),
    }
}

/// A GET for `uri` (its authority becomes `:authority`) with extra `headers`.
pub fn get(uri: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut builder = Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Empty::new()).expect("a valid request")
}
