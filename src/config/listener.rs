//! `[[listener]]` tables: data listeners with TLS or the PROXY protocol. `[server]
//! listen` stays the short way to name plain HTTP listeners.
//!
//! Certificate files are read and checked here, at load: a missing file, a key that does
//! not match its certificate, or a certificate without a usable name is a config error
//! with its line and file, so `check-config` finds it and a reload that has one keeps the
//! running certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::defaults;
use super::section::{Errors, Section};
use super::validate::same_port;
use super::{AdminConfig, ServerConfig};

/// One data listener from a `[[listener]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from a TCP load
    /// balancer, whose source address is then the client's everywhere (X-Forwarded-For,
    /// trusted_proxies, logs). A connection without one is closed. Default false.
    pub proxy_protocol: bool,
    /// TLS termination; `None` serves plain HTTP.
    pub tls: Option<TlsConfig>,
}

/// TLS on one listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Chosen by the name the client asks for (SNI); the first one is the default, for a
    /// client that names none or a name no certificate has.
    pub certificates: Vec<Certificate>,
    /// From accept to the end of the handshake. Key `tls_handshake_timeout_ms`, default 10000.
    pub handshake_timeout: Duration,
    /// Oldest TLS version offered. Key `tls_min_version`, "1.2" (default) or "1.3".
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// A certificate chain and its key, read from PEM files.
#[derive(Clone)]
pub struct Certificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Lowercased server names it is served for: exact (`api.example.com`) or one
    /// leading wildcard label (`*.example.com`). From the `names` key, else the
    /// certificate's own DNS names.
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

impl PartialEq for Certificate {
    /// The same files with the same contents: a reload that changes neither keeps it.
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.names == other.names
            && self.key.cert == other.key.cert
    }
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Option<SocketAddr>,
    proxy_protocol: Option<bool>,
    tls_handshake_timeout_ms: Option<u64>,
    tls_min_version: Option<TlsVersion>,
    certificate: Option<Vec<RawCertificate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Option<String>,
    key: Option<String>,
    names: Option<Vec<String>>,
}

/// Builds one `[[listener]]`; relative certificate paths are taken from `base` (the
/// config file's directory).
pub(super) fn build_listener(
    s: &mut Section,
    base: &Path,
    errs: &mut Errors,
) -> Option<ListenerConfig> {
    let raw = s.deserialize::<RawListener>(errs)?;
    let s = &*s;
    let Some(address) = raw.address else {
        errs.push(
            s.line(&[]),
            s.say("address is required, e.g. address = \"0.0.0.0:8443\""),
        );
        return None;
    };
    let certificates: Vec<Certificate> = raw
        .certificate
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, raw)| load_certificate(s, i, raw, base, errs))
        .collect();
    let declared = raw.certificate.as_ref().map_or(0, Vec::len);
    let tls_keys = raw.tls_handshake_timeout_ms.is_some() || raw.tls_min_version.is_some();
    if declared == 0 && tls_keys {
        let key = if raw.tls_handshake_timeout_ms.is_some() {
            "tls_handshake_timeout_ms"
        } else {
            "tls_min_version"
        };
        errs.push(
            s.line(&[key]),
            s.say(
                "tls_* keys need at least one [[listener.certificate]]: without one this \
                 listener serves plain HTTP",
            ),
        );
    }
    let handshake_timeout = s.millis(
        errs,
        &["tls_handshake_timeout_ms"],
        raw.tls_handshake_timeout_ms,
        defaults::TLS_HANDSHAKE_TIMEOUT_MS,
    );
    let tls = (declared > 0).then(|| TlsConfig {
        certificates,
        handshake_timeout,
        min_version: raw.tls_min_version.unwrap_or(TlsVersion::Tls12),
    });
    Some(ListenerConfig {
        address,
        proxy_protocol: raw.proxy_protocol.unwrap_or(false),
        tls,
    })
}

/// Reads certificate `i` of a listener; every problem is reported at its line.
fn load_certificate(
    s: &Section,
    i: usize,
    raw: &RawCertificate,
    base: &Path,
    errs: &mut Errors,
) -> Option<Certificate> {
    let line = |key: &str| s.elem_key_line("certificate", i, key);
    let label = format!("certificate[{i}]");
    let (Some(cert), Some(key)) = (&raw.cert, &raw.key) else {
        errs.push(
            line("cert"),
            s.say(format!(
                "{label} needs both cert (the PEM chain, leaf first) and key (its PEM private key)"
            )),
        );
        return None;
    };
    let (cert_path, key_path) = (base.join(cert), base.join(key));
    let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
    {
        Ok(chain) if !chain.is_empty() => chain,
        Ok(_) => {
            errs.push(
                line("cert"),
                s.say(format!(
                    "{label}: {} holds no PEM certificate",
                    cert_path.display()
                )),
            );
            return None;
        }
        Err(error) => {
            errs.push(
                line("cert"),
                s.say(format!(
                    "{label}: cannot read {}: {}",
                    cert_path.display(),
                    pem_error(&error)
                )),
            );
            return None;
        }
    };
    let private = match PrivateKeyDer::from_pem_file(&key_path) {
        Ok(private) => private,
        Err(error) => {
            errs.push(
                line("key"),
                s.say(format!(
                    "{label}: cannot read a private key from {}: {}",
                    key_path.display(),
                    pem_error(&error)
                )),
            );
            return None;
        }
    };
    let provider = rustls::crypto::ring::default_provider();
    let certified = match CertifiedKey::from_der(chain, private, &provider) {
        Ok(certified) => certified,
        Err(error) => {
            let why = match error {
                rustls::Error::InconsistentKeys(_) => {
                    "the key does not belong to the certificate".to_string()
                }
                other => other.to_string(),
            };
            errs.push(
                line("key"),
                s.say(format!(
                    "{label}: {} with {}: {why}",
                    key_path.display(),
                    cert_path.display()
                )),
            );
            return None;
        }
    };
    let names = match &raw.names {
        Some(names) => {
            let mut checked = Vec::new();
            for (j, name) in names.iter().enumerate() {
                match server_name(name) {
                    Ok(name) => checked.push(name),
                    Err(why) => {
                        errs.push(line("names"), s.say(format!("{label}.names[{j}]: {why}")))
                    }
                }
            }
            checked
        }
        None => match certificate_names(&certified) {
            Some(names) if !names.is_empty() => names,
            _ if i == 0 => Vec::new(),
            _ => {
                errs.push(
                    line("cert"),
                    s.say(format!(
                        "{label}: {} names no DNS name; give names = [...] to say which \
                         server names it is for",
                        cert_path.display()
                    )),
                );
                return None;
            }
        },
    };
    Some(Certificate {
        cert_path,
        key_path,
        names,
        key: Arc::new(certified),
    })
}

/// A PEM error without the crate's wording for a missing file.
fn pem_error(error: &rustls_pki_types::pem::Error) -> String {
    match error {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of that kind".to_string(),
        other => format!("{other:?}"),
    }
}

/// The DNS names in the leaf certificate's subjectAltName, lowercased.
fn certificate_names(certified: &CertifiedKey) -> Option<Vec<String>> {
    let leaf = certified.end_entity_cert().ok()?;
    let parsed = webpki::EndEntityCert::try_from(leaf).ok()?;
    let names = parsed
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    Some(names)
}

/// A server name as written in `names`: a DNS name, optionally with one leading `*.`.
fn server_name(name: &str) -> Result<String, String> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let bare = lower.strip_prefix("*.").unwrap_or(&lower);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        Ok(lower)
    } else {
        Err(format!(
            "{name:?} is not a DNS name or a wildcard like \"*.example.com\""
        ))
    }
}

/// Each `[[listener]]` address must be bindable beside `[server] listen`, `[admin] listen`
/// and the other listeners.
pub(super) fn check_listener_tables(
    server: &ServerConfig,
    admin: &AdminConfig,
    sections: &[Section],
    listeners: &[Option<ListenerConfig>],
    errs: &mut Errors,
) {
    let mut seen: Vec<SocketAddr> = Vec::new();
    for (section, listener) in sections.iter().zip(listeners) {
        let Some(listener) = listener else { continue };
        let addr = listener.address;
        let clash = if let Some(other) = server.listen.iter().find(|a| same_port(a, &addr)) {
            Some(format!("[server] listen {other}"))
        } else if same_port(&admin.listen, &addr) {
            Some(format!("[admin] listen {}", admin.listen))
        } else {
            seen.iter()
                .find(|a| same_port(a, &addr))
                .map(|other| format!("another [[listener]] at {other}"))
        };
        if let Some(clash) = clash {
            errs.push(
                section.line(&["address"]),
                section.say(format!("address {addr} clashes with {clash}")),
            );
        }
        seen.push(addr);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const TAIL: &str = r#"
[[upstream]]
name = "app"
backends = ["127.0.0.1:9000"]
[[route]]
name = "all"
path_prefix = "/"
upstream = "app"
"#;

    fn errors(text: &str, base: &std::path::Path) -> Vec<(usize, String)> {
        let text = format!("{text}{TAIL}");
        match Config::parse_in(&text, "test.toml", base) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.errors.into_iter().map(|e| (e.line, e.message)).collect(),
        }
    }

    /// A self-signed certificate for `names` and its key, written to `dir`.
    fn write_pair(dir: &std::path::Path, file: &str, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }

    #[test]
    fn relative_certificate_paths_are_read_from_the_config_directory_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(
            dir.path(),
            "site",
            &["Shop.Example.test", "*.api.example.test"],
        );
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:8443\"\n[[listener.certificate]]\n\
             cert = \"site.pem\"\nkey = \"site.key\"\n{TAIL}"
        );
        let config = Config::parse_in(&text, "test.toml", dir.path()).unwrap();
        let tls = config.listeners[0].tls.as_ref().unwrap();
        assert_eq!(
            tls.certificates[0].names,
            ["shop.example.test", "*.api.example.test"],
            "the certificate's own DNS names, lowercased"
        );
        assert_eq!(tls.handshake_timeout.as_millis(), 10_000);
    }

    #[test]
    fn missing_files_mismatched_keys_and_bad_names_are_reported_at_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", &["a.test"]);
        write_pair(dir.path(), "b", &["b.test"]);
        let text = r#"[[listener]]
address = "127.0.0.1:8443"
[[listener.certificate]]
cert = "missing.pem"
key = "a.key"
[[listener.certificate]]
cert = "a.pem"
key = "b.key"
[[listener.certificate]]
cert = "b.pem"
key = "b.key"
names = ["ok.test", "bad name"]
"#;
        let errs = errors(text, dir.path());
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert_eq!(errs[0].0, 4);
        assert!(errs[0].1.contains("missing.pem"), "{}", errs[0].1);
        assert_eq!(errs[1].0, 8);
        assert!(errs[1]
            .1
            .contains("the key does not belong to the certificate"));
        assert_eq!(errs[2].0, 12);
        assert!(errs[2].1.contains("\"bad name\" is not a DNS name"));
    }

    #[test]
    fn a_listener_address_that_clashes_or_tls_keys_without_a_certificate_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"[server]
listen = ["127.0.0.1:8080"]
[[listener]]
address = "0.0.0.0:8080"
[[listener]]
address = "127.0.0.1:8443"
tls_min_version = "1.3"
"#;
        let errs = errors(text, dir.path());
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert_eq!(errs[0].0, 4);
        assert!(errs[0]
            .1
            .contains("clashes with [server] listen 127.0.0.1:8080"));
        assert_eq!(errs[1].0, 7);
        assert!(errs[1]
            .1
            .contains("need at least one [[listener.certificate]]"));
    }
}
