//! `[upstream.tls]`: TLS from the proxy to an upstream's backends (the pool's
//! connections, health checks, actuator polls).
//!
//! The CA file is read and checked here, at load: a file that cannot be read, holds no
//! PEM certificate or no certificate usable as a trust anchor is a config error with its
//! line, so `check-config` finds it and a reload that has one keeps the running
//! upstream. The client config itself (roots, verifier, ALPN) is built from this by the
//! upstream layer (`http/tls_client.rs`).

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;

use super::defaults;
use super::section::{Errors, Section};

/// TLS to the backends of one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// The CA certificates a backend's certificate must chain to. Key `ca_file`;
    /// `None`: the system's trust store.
    pub ca: Option<CaBundle>,
    /// The name sent as SNI and verified in each backend's certificate, for every
    /// backend of the upstream. Key `server_name`; `None`: each backend's own host.
    pub server_name: Option<ServerName<'static>>,
    /// No certificate verification at all (self-signed test backends). Key
    /// `insecure_skip_verify`, default false; logged as a warning when the upstream starts.
    pub insecure_skip_verify: bool,
}

/// A PEM bundle of CA certificates. Two bundles are equal when they come from the same
/// file with the same contents, so a reload rebuilds an upstream whose CA file changed.
#[derive(Debug, Clone, PartialEq)]
pub struct CaBundle {
    pub path: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    enabled: Option<bool>,
    ca_file: Option<String>,
    server_name: Option<String>,
    insecure_skip_verify: Option<bool>,
}

/// Builds `[upstream.tls]`; `None` when the table is absent or `enabled = false`.
/// `backends` are the upstream's, checked for a host TLS can verify when no
/// `server_name` is given. A relative `ca_file` is taken from `base`.
pub(super) fn build_upstream_tls(
    s: &Section,
    raw: Option<RawUpstreamTls>,
    backends: &[String],
    base: &Path,
    errs: &mut Errors,
) -> Option<UpstreamTls> {
    let raw = raw?;
    if !raw.enabled.unwrap_or(defaults::UPSTREAM_TLS_ENABLED) {
        return None;
    }
    let insecure_skip_verify = raw
        .insecure_skip_verify
        .unwrap_or(defaults::UPSTREAM_TLS_INSECURE_SKIP_VERIFY);
    if insecure_skip_verify && raw.ca_file.is_some() {
        errs.push(
            s.line(&["tls", "insecure_skip_verify"]),
            s.say(
                "tls.insecure_skip_verify = true verifies nothing, so tls.ca_file would be \
                 ignored; keep one of them",
            ),
        );
    }
    let ca = raw
        .ca_file
        .as_deref()
        .and_then(|file| read_ca_file(s, &base.join(file), errs));
    let server_name = match raw.server_name.as_deref() {
        Some(name) => match server_name(name) {
            Ok(name) => Some(name),
            Err(why) => {
                errs.push(
                    s.line(&["tls", "server_name"]),
                    s.say(format!("tls.server_name {why}")),
                );
                None
            }
        },
        None => {
            for (i, backend) in backends.iter().enumerate() {
                let host = backend_host(backend);
                if server_name(host).is_err() {
                    errs.push(
                        s.elem_line("backends", i),
                        s.say(format!(
                            "backends[{i}] host {host:?} is not a DNS name or IP address a TLS \
                             certificate can be verified for; set tls.server_name to the name \
                             in the backend's certificate"
                        )),
                    );
                }
            }
            None
        }
    };
    Some(UpstreamTls {
        ca,
        server_name,
        insecure_skip_verify,
    })
}

fn read_ca_file(s: &Section, path: &Path, errs: &mut Errors) -> Option<CaBundle> {
    let line = s.line(&["tls", "ca_file"]);
    let certs = match CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
    {
        Ok(certs) => certs,
        Err(error) => {
            let why = match error {
                rustls_pki_types::pem::Error::Io(io) => io.to_string(),
                other => format!("{other:?}"),
            };
            errs.push(
                line,
                s.say(format!(
                    "tls.ca_file: cannot read {}: {why}",
                    path.display()
                )),
            );
            return None;
        }
    };
    if certs.is_empty() {
        errs.push(
            line,
            s.say(format!(
                "tls.ca_file: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            )),
        );
        return None;
    }
    let unusable: Vec<usize> = certs
        .iter()
        .enumerate()
        .filter(|(_, der)| webpki::anchor_from_trusted_cert(der).is_err())
        .map(|(i, _)| i + 1)
        .collect();
    if !unusable.is_empty() {
        errs.push(
            line,
            s.say(format!(
                "tls.ca_file: {}: certificate {} of {} cannot be parsed as a CA certificate",
                path.display(),
                unusable
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                certs.len()
            )),
        );
        return None;
    }
    Some(CaBundle {
        path: path.to_path_buf(),
        certs,
    })
}

/// A name a certificate can be verified for: a DNS name (no wildcard) or an IP address
/// (an IPv6 one with or without brackets).
pub(super) fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if bare.contains('*') {
        return Err(format!(
            "{name:?} is a wildcard; name the one host the backend is reached as"
        ));
    }
    ServerName::try_from(bare.to_ascii_lowercase())
        .map_err(|_| format!("{name:?} is not a DNS name or an IP address"))
}

/// The host of a `host:port` backend (`[v6]:port` gives the address without brackets).
pub fn backend_host(backend: &str) -> &str {
    let host = backend.rsplit_once(':').map_or(backend, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}
