//! TLS from the proxy to backends: one rustls client config per upstream (its trust
//! anchors, ALPN http/1.1, and its session cache, so reconnects to a backend resume
//! instead of doing a full handshake), the handshake, the stream an upstream
//! connection runs over, and a connector for hyper-util's client (health checks and
//! actuator polls), shared by the upstream and admission layers.
//!
//! Not here: the `[upstream.tls]` settings and their checks (`config/upstream_tls.rs`);
//! connect timeouts, retries and error kinds of the pool (`upstream/pool/conn.rs`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Scheme;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::{backend_host, UpstreamTls};
use crate::http::body::BoxError;

/// The TLS client of one upstream: built once per upstream (at start, and on a reload
/// that changes the upstream), shared by its pool, health checks and actuator polls.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    /// `tls.server_name`; `None`: each backend's own host.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A failed TLS handshake.
#[derive(Debug)]
pub struct HandshakeError {
    pub detail: String,
    /// The peers disagreed (certificate not trusted, wrong name, no common protocol):
    /// trying the same backend again at once gets the same answer. False for a
    /// connection that broke during the handshake.
    pub refused: bool,
}

impl TlsClient {
    /// Builds the client config of `upstream`. Without a `ca_file` the system's trust
    /// store is read (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured); what it lacks is
    /// logged. `insecure_skip_verify` is logged as a warning.
    pub fn new(upstream: &str, settings: &UpstreamTls) -> TlsClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions");
        let mut config = if settings.insecure_skip_verify {
            tracing::warn!(
                upstream,
                "tls.insecure_skip_verify = true: the backends' certificates are not verified, \
                 so anyone on the network path can pose as a backend; use it for test \
                 backends only"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth()
        } else {
            builder
                .with_root_certificates(trust_anchors(upstream, settings))
                .with_no_client_auth()
        };
        // The pool speaks HTTP/1.1 only; a backend that also offers h2 must not pick it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsClient {
            config: Arc::new(config),
            server_name: settings.server_name.clone(),
        }
    }

    /// The name sent as SNI to `backend` (`host:port`) and verified in its certificate.
    fn name_for(&self, backend_host: &str) -> Result<ServerName<'static>, HandshakeError> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        ServerName::try_from(backend_host.to_string()).map_err(|_| HandshakeError {
            detail: format!("{backend_host:?} is not a name a certificate can be verified for"),
            refused: true,
        })
    }

    /// The TLS handshake over `tcp`, a connection to `backend` (`host:port`). Not bounded
    /// in time: the caller bounds it.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        backend: &str,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        self.handshake_with_host(tcp, backend_host(backend)).await
    }

    async fn handshake_with_host(
        &self,
        tcp: TcpStream,
        host: &str,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let name = self.name_for(host)?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        connector.connect(name.clone(), tcp).await.map_err(|error| {
            let tls = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>());
            let name = name.to_str();
            match tls {
                Some(tls) => HandshakeError {
                    detail: format!("TLS handshake for {name:?} failed: {tls}"),
                    refused: true,
                },
                None => HandshakeError {
                    detail: format!("TLS handshake for {name:?} broke off: {error}"),
                    refused: false,
                },
            }
        })
    }
}

/// The CA file's certificates, or the system's trust store.
fn trust_anchors(upstream: &str, settings: &UpstreamTls) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &settings.ca {
        // Each was checked to parse as a trust anchor when the config was loaded.
        roots.add_parsable_certificates(ca.certs.iter().cloned());
        return roots;
    }
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(upstream, %error, "reading the system's CA certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::error!(
            upstream,
            ignored,
            "no CA certificate found in the system's trust store, so no backend certificate \
             can be verified; install the system CA bundle (ca-certificates), set SSL_CERT_FILE, \
             or give tls.ca_file"
        );
    } else {
        tracing::debug!(
            upstream,
            added,
            ignored,
            "backend certificates verified against the system's trust store"
        );
    }
    roots
}

/// `insecure_skip_verify`: any certificate for any name is accepted. The handshake
/// signatures are still checked, so the session is at least with the holder of the key
/// of the certificate it presented.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An upstream connection: plain TCP, or TLS over it.
pub type UpstreamStream = crate::http::stream::MaybeTls<TlsStream<TcpStream>>;

/// A connector for hyper-util's client: `http://` URLs over plain TCP, `https://` ones
/// over TLS with the upstream's [`TlsClient`]. An `https://` URL without one fails.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<TlsClient>,
}

impl Connector {
    pub fn new(connect_timeout: Duration, tls: Option<TlsClient>) -> Connector {
        let mut http = HttpConnector::new();
        // The scheme says whether to speak TLS; HttpConnector would refuse https://.
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        Connector { http, tls }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = ClientIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ClientIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let connecting = self.http.call(uri.clone());
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            if !https {
                return Ok(ClientIo(TokioIo::new(UpstreamStream::Plain(tcp))));
            }
            let Some(tls) = tls else {
                return Err("an https:// URL, but the upstream has no [upstream.tls]".into());
            };
            let host = uri.host().unwrap_or_default();
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let stream = tls
                .handshake_with_host(tcp, host)
                .await
                .map_err(|e| BoxError::from(e.detail))?;
            Ok(ClientIo(TokioIo::new(UpstreamStream::Tls(Box::new(
                stream,
            )))))
        })
    }
}

/// A connection made by [`Connector`], as hyper-util's client drives it.
pub struct ClientIo(TokioIo<UpstreamStream>);

impl Connection for ClientIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
