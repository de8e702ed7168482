//! TLS termination on data listeners (rustls with its `ring` provider).
//!
//! A TLS listener's certificates come from its `[[listener]]` table
//! ([`crate::config::TlsConfig`]); the rustls config built from them lives in the
//! config generation, so a reload with new certificate files serves them on new
//! connections while open ones keep the session they have. The handshake runs in the
//! connection's own task under `tls_handshake_timeout_ms`, before the HTTP connection
//! and its timeouts begin; ALPN offers `h2` and `http/1.1`.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::{TlsConfig, TlsVersion};
use crate::metrics as m;

/// What the handler and the access log know about a connection's TLS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The negotiated version, as `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The server name the client asked for (SNI), lowercased; `None` when it sent none.
    pub sni: Option<String>,
}

/// The rustls server config of one TLS listener.
pub fn server_config(tls: &TlsConfig) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver::new(tls)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Picks a listener's certificate by the client's server name: an exact name first,
/// then a wildcard for the name's parent (`*.example.com` covers `api.example.com`, not
/// `example.com` nor `a.b.example.com`), else the listener's first certificate.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn new(tls: &TlsConfig) -> SniResolver {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for certificate in &tls.certificates {
            for name in &certificate.names {
                // The first certificate to claim a name keeps it, as in the file's order.
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent.to_string()),
                    None => (&mut exact, name.clone()),
                };
                map.entry(key).or_insert_with(|| certificate.key.clone());
            }
        }
        SniResolver {
            exact,
            wildcard,
            default: tls.certificates[0].key.clone(),
        }
    }

    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        // rustls hands over the name lowercased, without a trailing dot.
        if let Some(key) = self.exact.get(name) {
            return key.clone();
        }
        let parent = name.split_once('.').map(|(_, parent)| parent);
        parent
            .and_then(|parent| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// A client connection's byte stream: plain TCP, or TLS over it.
pub type ClientStream = crate::http::stream::MaybeTls<TlsStream<TcpStream>>;

impl ClientStream {
    /// Runs the TLS handshake on `tcp` within `tls_handshake_timeout_ms`, counting
    /// its outcome in `loadgate_tls_handshakes_total`.
    pub async fn accept_tls(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
        timeout: std::time::Duration,
    ) -> Result<(ClientStream, TlsInfo), HandshakeError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let outcome = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
        let result = match outcome {
            Err(_) => Err(HandshakeError::Timeout),
            Ok(Err(error)) => Err(HandshakeError::Failed(error)),
            Ok(Ok(stream)) => {
                let (_, session) = stream.get_ref();
                let version = match session.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                    _ => "TLSv1.3",
                };
                let sni = session.server_name().map(str::to_string);
                Ok((
                    ClientStream::Tls(Box::new(stream)),
                    TlsInfo { version, sni },
                ))
            }
        };
        let reason = match &result {
            Ok(_) => "ok",
            Err(error) => error.reason(),
        };
        metrics::counter!(m::TLS_HANDSHAKES_TOTAL, m::LABEL_RESULT => reason).increment(1);
        result
    }
}

/// A TLS handshake that did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    Timeout,
    Failed(io::Error),
}

impl HandshakeError {
    /// The `result` label of `loadgate_tls_handshakes_total`: a small closed set.
    pub fn reason(&self) -> &'static str {
        let HandshakeError::Failed(error) = self else {
            return "timeout";
        };
        let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return match error.kind() {
                io::ErrorKind::UnexpectedEof => "eof",
                _ => "io_error",
            };
        };
        match tls {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateHandshakeMessage { .. }
            | rustls::Error::InappropriateMessage { .. } => "not_tls",
            rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::SupportedVersionsExtensionRequired,
            ) => "protocol_version",
            rustls::Error::PeerIncompatible(_) => "no_common_parameters",
            rustls::Error::AlertReceived(_) => "alert_received",
            _ => "other",
        }
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Timeout => f.write_str("TLS handshake timed out"),
            HandshakeError::Failed(error) => write!(f, "TLS handshake failed: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Certificate;

    fn certificate(names: &[&str]) -> Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["unused.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(vec![cert.der().clone()], der, &provider).unwrap();
        Certificate {
            cert_path: "cert.pem".into(),
            key_path: "key.pem".into(),
            names: names.iter().map(|n| n.to_string()).collect(),
            key: Arc::new(certified),
        }
    }

    #[test]
    fn a_certificate_is_picked_by_exact_name_then_wildcard_then_default() {
        let tls = TlsConfig {
            certificates: vec![
                certificate(&["default.test"]),
                certificate(&["*.example.test"]),
                certificate(&["api.example.test"]),
            ],
            handshake_timeout: std::time::Duration::from_secs(1),
            min_version: TlsVersion::Tls12,
        };
        let resolver = SniResolver::new(&tls);
        let picked = |name| resolver.pick(name).cert.clone();
        let key = |i: usize| tls.certificates[i].key.cert.clone();
        assert_eq!(
            picked(Some("api.example.test")),
            key(2),
            "exact beats wildcard"
        );
        assert_eq!(
            picked(Some("www.example.test")),
            key(1),
            "one label under the wildcard"
        );
        assert_eq!(
            picked(Some("a.www.example.test")),
            key(0),
            "a wildcard covers one label"
        );
        assert_eq!(
            picked(Some("example.test")),
            key(0),
            "nor the parent itself"
        );
        assert_eq!(picked(Some("default.test")), key(0));
        assert_eq!(
            picked(Some("unknown.test")),
            key(0),
            "unknown names get the default"
        );
        assert_eq!(picked(None), key(0), "so does a client that sends no SNI");
    }
}
