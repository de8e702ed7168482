//! TLS termination on data listeners.

/// What the handler and the access log know about a connection's TLS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The negotiated version, as `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The server name the client asked for (SNI), lowercased; `None` when it sent none.
    pub sni: Option<String>,
}
