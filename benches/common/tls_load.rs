//! The load generator of `benches/tls.rs`: closed-loop HTTPS clients (tokio-rustls and
//! hyper's client connections) in three shapes, a full handshake per request, HTTP/1.1
//! keep-alive, and HTTP/2 streams, plus the bench's own certificate and client config.
//!
//! Not here: which proxies are compared or how (the bench decides that).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::common::{cpu_time, load_runtime, LoadResult};

/// The name the certificate is made for and the clients ask for (SNI).
pub const SERVER_NAME: &str = "localhost";

/// The bench's certificate: ECDSA P-256, self-signed for [`SERVER_NAME`], written as PEM
/// files that both proxies serve.
pub struct BenchCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub der: CertificateDer<'static>,
}

impl BenchCert {
    /// Makes a new key pair and certificate and writes them into `dir`.
    pub fn generate(dir: &Path) -> std::io::Result<BenchCert> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(std::io::Error::other)?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(std::io::Error::other)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "loadgate TLS bench");
        let cert = params.self_signed(&key).map_err(std::io::Error::other)?;
        let cert_path = dir.join("bench.pem");
        let key_path = dir.join("bench.key");
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(BenchCert {
            cert_path,
            key_path,
            der: cert.der().clone(),
        })
    }
}

/// A client as a browser makes a new connection, with what the bench pins down: TLS 1.3
/// only, X25519 only (the key exchange every modern client tries first), no session
/// resumption (every connection is a full handshake), ALPN `alpn`.
///
/// It trusts exactly the bench certificate: the chain check is a comparison with it (a
/// self-signed certificate has no chain to walk), while the handshake signature is
/// verified as any client does, so a server cannot skip its half of the handshake.
pub fn client_config(cert: &CertificateDer<'static>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::X25519];
    let verifier = Arc::new(PinnedCert {
        cert: cert.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// Accepts exactly one certificate, and checks handshake signatures made with it.
#[derive(Debug)]
struct PinnedCert {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What one connection to a target negotiated, and the status of one GET over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: String,
    pub cipher_suite: String,
    pub key_exchange: String,
    pub alpn: String,
    pub status: u16,
}

impl std::fmt::Display for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} ALPN {} -> {}",
            self.version, self.cipher_suite, self.key_exchange, self.alpn, self.status
        )
    }
}

/// The load shape of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Each request on a new connection: connect, full handshake, one GET with
    /// `Connection: close`, the response read to its end, close.
    Handshake,
    /// Keep-alive HTTP/1.1 over TLS: one request at a time per connection.
    Http1,
    /// HTTP/2 over TLS: `streams` requests in flight per connection, each stream
    /// sending its next request when its response has ended.
    Http2 { streams: usize },
}

impl Shape {
    /// The ALPN protocol the client offers.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Shape::Http2 { .. } => b"h2",
            Shape::Handshake | Shape::Http1 => b"http/1.1",
        }
    }

    /// The row's name in `LOADGATE_BENCH_TLS_ROWS`.
    pub fn key(self) -> &'static str {
        match self {
            Shape::Handshake => "handshakes",
            Shape::Http1 => "http1",
            Shape::Http2 { .. } => "http2",
        }
    }
}

/// One closed-loop run over TLS against `addr`.
#[derive(Clone)]
pub struct TlsLoad {
    pub addr: SocketAddr,
    pub path: String,
    pub shape: Shape,
    pub client: Arc<rustls::ClientConfig>,
    /// Concurrent connections (for [`Shape::Handshake`]: connections being made at once).
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub request_timeout: Duration,
}

/// A run's result and the CPU time the load generator (this process) used in its
/// measured window.
pub struct Measured {
    pub result: LoadResult,
    pub client_cpu: Option<Duration>,
}

impl TlsLoad {
    /// Runs the load on a runtime of its own with `threads` workers, and measures the
    /// CPU time of `pids` (the target) and of this process over the measured window.
    pub fn run_watching_cpu(&self, threads: usize, pids: Vec<u32>) -> Measured {
        let (warmup, duration) = (self.warmup, self.duration);
        let me = std::process::id();
        let sampler = std::thread::spawn(move || {
            std::thread::sleep(warmup);
            let before = (cpu_time(&pids), cpu_time(&[me]));
            std::thread::sleep(duration);
            let after = (cpu_time(&pids), cpu_time(&[me]));
            let spent = |a: Option<Duration>, b: Option<Duration>| {
                a.zip(b).map(|(a, b)| a.saturating_sub(b))
            };
            (spent(after.0, before.0), spent(after.1, before.1))
        });
        let runtime = load_runtime(threads);
        let mut result = runtime.block_on(self.run());
        runtime.shutdown_timeout(Duration::from_secs(1));
        let (target, client) = sampler.join().unwrap_or((None, None));
        result.cpu = target;
        Measured {
            result,
            client_cpu: client,
        }
    }

    /// Runs the load on the current runtime.
    pub async fn run(&self) -> LoadResult {
        let start = Instant::now();
        let measure_from = start + self.warmup;
        let end = measure_from + self.duration;
        let tasks: Vec<_> = (0..self.connections)
            .map(|_| {
                let load = self.clone();
                tokio::spawn(async move {
                    match load.shape {
                        Shape::Handshake => load.handshakes(measure_from, end).await,
                        Shape::Http1 => load.http1(measure_from, end).await,
                        Shape::Http2 { streams } => load.http2(streams, measure_from, end).await,
                    }
                })
            })
            .collect();
        // Each task stops by itself at `end`; the bound is only a safety net.
        let bound = end + self.request_timeout + Duration::from_secs(1);
        LoadResult::gather(tasks, self.duration, bound).await
    }

    async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(SERVER_NAME).expect("a valid server name");
        TlsConnector::from(self.client.clone())
            .connect(name, tcp)
            .await
    }

    fn request(&self, close: bool) -> Request<Empty<Bytes>> {
        let mut request = if matches!(self.shape, Shape::Http2 { .. }) {
            // HTTP/2 carries the authority in the request's URI (`:authority`).
            Request::get(format!("https://{SERVER_NAME}{}", self.path))
        } else {
            Request::get(self.path.as_str()).header(header::HOST, SERVER_NAME)
        };
        if close {
            request = request.header(header::CONNECTION, "close");
        }
        request.body(Empty::new()).expect("valid request")
    }

    /// [`Shape::Handshake`]: a new connection for every request, until `end`.
    async fn handshakes(&self, measure_from: Instant, end: Instant) -> LoadResult {
        let mut out = LoadResult::default();
        loop {
            let sent = Instant::now();
            if sent >= end {
                return out;
            }
            let exchange = async {
                let stream = self.connect().await?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(std::io::Error::other)?;
                let response = async {
                    let response = sender.send_request(self.request(true)).await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    Ok::<StatusCode, hyper::Error>(status)
                };
                // The connection ends after the response: the server closes it, as the
                // request asked.
                let (status, closed) = tokio::join!(response, conn);
                closed.map_err(std::io::Error::other)?;
                status.map_err(std::io::Error::other)
            };
            let deadline = (sent + self.request_timeout).min(end);
            let outcome = tokio::time::timeout_at(deadline, exchange).await;
            if outcome.is_err() && deadline >= end {
                return out; // the run is over; the connection in progress is not measured
            }
            record(&mut out, outcome.ok(), sent, measure_from, end);
        }
    }

    /// [`Shape::Http1`]: one keep-alive connection; a new one after an error.
    async fn http1(&self, measure_from: Instant, end: Instant) -> LoadResult {
        let mut out = LoadResult::default();
        while Instant::now() < end {
            let Some((mut sender, conn)) = self
                .with_deadline(end, async {
                    let stream = self.connect().await?;
                    hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                        .await
                        .map_err(std::io::Error::other)
                })
                .await
            else {
                count_error(&mut out, measure_from);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            // Driven in this task (no spawn), as the plain-HTTP generator does.
            let mut conn = std::pin::pin!(conn);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    return out;
                }
                let exchange = async {
                    let response = sender.send_request(self.request(false)).await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    Ok::<StatusCode, hyper::Error>(status)
                };
                let deadline = (sent + self.request_timeout).min(end);
                let outcome = tokio::select! {
                    biased;
                    outcome = exchange => outcome.map_err(std::io::Error::other),
                    _ = conn.as_mut() => Err(std::io::Error::other("connection closed")),
                    () = tokio::time::sleep_until(deadline) => {
                        if deadline >= end {
                            return out;
                        }
                        Err(std::io::ErrorKind::TimedOut.into())
                    }
                };
                let failed = outcome.is_err();
                record(&mut out, Some(outcome), sent, measure_from, end);
                if failed {
                    break;
                }
            }
        }
        out
    }

    /// [`Shape::Http2`]: one connection with `streams` closed-loop streams; a new
    /// connection once every stream has stopped on an error.
    async fn http2(&self, streams: usize, measure_from: Instant, end: Instant) -> LoadResult {
        let mut out = LoadResult::default();
        while Instant::now() < end {
            let Some((sender, conn)) = self
                .with_deadline(end, async {
                    let stream = self.connect().await?;
                    hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
                        TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await
                    .map_err(std::io::Error::other)
                })
                .await
            else {
                count_error(&mut out, measure_from);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let driver = tokio::spawn(conn);
            let stream_loops = (0..streams).map(|_| {
                let mut sender = sender.clone();
                async move {
                    let mut out = LoadResult::default();
                    loop {
                        let sent = Instant::now();
                        if sent >= end {
                            return out;
                        }
                        let exchange = async {
                            sender.ready().await?;
                            let response = sender.send_request(self.request(false)).await?;
                            let status = response.status();
                            response.into_body().collect().await?;
                            Ok::<StatusCode, hyper::Error>(status)
                        };
                        let deadline = (sent + self.request_timeout).min(end);
                        let outcome = tokio::time::timeout_at(deadline, exchange).await;
                        let outcome = match outcome {
                            Err(_) if deadline >= end => return out,
                            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                            Ok(outcome) => outcome.map_err(std::io::Error::other),
                        };
                        let failed = outcome.is_err();
                        record(&mut out, Some(outcome), sent, measure_from, end);
                        if failed {
                            return out;
                        }
                    }
                }
            });
            for one in futures_util::future::join_all(stream_loops).await {
                out.absorb(one);
            }
            drop(sender);
            driver.abort();
        }
        out
    }

    /// `connecting` within the request timeout (and before `end`); `None` on error.
    async fn with_deadline<T>(
        &self,
        end: Instant,
        connecting: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Option<T> {
        let deadline = (Instant::now() + self.request_timeout).min(end);
        tokio::time::timeout_at(deadline, connecting)
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// One new connection to `addr` with `client`'s settings, one GET of `path` over it,
/// and what the connection negotiated.
pub async fn probe(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    path: &str,
    shape: Shape,
) -> std::io::Result<Negotiated> {
    let load = TlsLoad {
        addr,
        path: path.to_string(),
        shape,
        client,
        connections: 1,
        warmup: Duration::ZERO,
        duration: Duration::ZERO,
        request_timeout: Duration::from_secs(2),
    };
    let exchange = async {
        let stream = load.connect().await?;
        let (_, session) = stream.get_ref();
        let mut negotiated = Negotiated {
            version: format!(
                "{:?}",
                session.protocol_version().expect("after a handshake")
            ),
            cipher_suite: format!(
                "{:?}",
                session
                    .negotiated_cipher_suite()
                    .expect("after a handshake")
                    .suite()
            ),
            key_exchange: session
                .negotiated_key_exchange_group()
                .map_or("-".to_string(), |group| format!("{:?}", group.name())),
            alpn: session
                .alpn_protocol()
                .map_or("-".to_string(), |p| String::from_utf8_lossy(p).into_owned()),
            status: 0,
        };
        let request = load.request(shape == Shape::Handshake);
        let io = TokioIo::new(stream);
        let response = if let Shape::Http2 { .. } = shape {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            sender.send_request(request).await
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            sender.send_request(request).await
        }
        .map_err(std::io::Error::other)?;
        negotiated.status = response.status().as_u16();
        response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?;
        Ok(negotiated)
    };
    tokio::time::timeout(load.request_timeout, exchange)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

fn count_error(out: &mut LoadResult, measure_from: Instant) {
    if Instant::now() >= measure_from {
        out.errors += 1;
    }
}

/// Counts one exchange that began at `sent`: its latency when it was a 2xx sent after
/// the warm-up and done before `end`, an error otherwise (`None`: it timed out).
fn record(
    out: &mut LoadResult,
    outcome: Option<std::io::Result<StatusCode>>,
    sent: Instant,
    measure_from: Instant,
    end: Instant,
) {
    let done = Instant::now();
    match outcome {
        Some(Ok(status)) if status.is_success() => {
            if sent >= measure_from && done <= end {
                let us = done.duration_since(sent).as_micros();
                out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
        }
        _ => count_error(out, measure_from),
    }
}
