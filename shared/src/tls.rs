//! TLS with rustls, both ways.
//!
//! - **Clients** trust the system's root certificates, plus any extra CA files a
//!   setting names (a company CA that signed an internal Keycloak, a registry behind a
//!   private PKI).
//! - **Servers** (`http.tls`) serve a certificate chain and key from PEM files, offer
//!   HTTP/2 and HTTP/1.1 by ALPN, and pick up renewed files without a restart: a
//!   handshake at least a second after the last look checks the files' modification
//!   times, and loads them again when they changed. A renewal that cannot be loaded
//!   (half written, a key that does not parse) is logged and the previous pair stays
//!   in use, so a botched renewal never takes the listener down.
//!
//! Only Kafka's client (librdkafka) uses OpenSSL, built into it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
pub use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// `http.tls`: serve HTTPS with this certificate and key instead of plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSettings {
    /// PEM: the server's certificate first, then any intermediates.
    pub certificate_file: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// What an HTTPS listener hands each new connection to.
#[derive(Clone)]
pub struct TlsAcceptor(tokio_rustls::TlsAcceptor);

impl TlsAcceptor {
    /// The server side of a handshake on `stream`.
    pub fn accept<IO>(&self, stream: IO) -> tokio_rustls::Accept<IO>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.0.accept(stream)
    }
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsAcceptor")
    }
}

/// How often a handshake may look at the files for a renewal.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// A TLS acceptor for `settings`, offering `h2` and `http/1.1`. Files that cannot be
/// read or do not hold a matching pair are an error naming the file.
pub fn server_acceptor(settings: &ServerTlsSettings) -> Result<TlsAcceptor, String> {
    let resolver = ReloadingCertificate::load(settings.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("http.tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor(tokio_rustls::TlsAcceptor::from(Arc::new(
        config,
    ))))
}

/// The certificate in use, and what the files looked like when it was loaded.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Stamp, Stamp),
    checked: Instant,
}

#[derive(Debug)]
struct ReloadingCertificate {
    files: ServerTlsSettings,
    loaded: Mutex<Loaded>,
}

impl ReloadingCertificate {
    fn load(files: ServerTlsSettings) -> Result<Self, String> {
        let stamps = stamps(&files);
        let key = certified_key(&files)?;
        Ok(Self {
            files,
            loaded: Mutex::new(Loaded {
                key,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The current pair, reloaded first if the files changed since the last look.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.checked.elapsed() >= RELOAD_CHECK {
            loaded.checked = Instant::now();
            let now = stamps(&self.files);
            if now != loaded.stamps {
                match certified_key(&self.files) {
                    // Recorded only once loaded: a pair caught half-written is tried
                    // again at the next look, even if nothing changes after it.
                    Ok(key) => {
                        loaded.key = key;
                        loaded.stamps = now;
                        tracing::info!(
                            certificate = %self.files.certificate_file.display(),
                            "TLS certificate reloaded"
                        );
                    }
                    Err(e) => tracing::warn!(
                        "TLS certificate not reloaded (tried again each second), the previous one stays in use: {e}"
                    ),
                }
            }
        }
        loaded.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What a file looked like: its modification time, length and inode (a renewal by
/// rename changes the inode even within one tick of the clock).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamps(files: &ServerTlsSettings) -> (Stamp, Stamp) {
    use std::os::unix::fs::MetadataExt;
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| Ok((m.modified()?, m.len(), m.ino())))
            .ok()
    };
    (stamp(&files.certificate_file), stamp(&files.key_file))
}

/// The chain and key from the files, checked to belong together.
fn certified_key(files: &ServerTlsSettings) -> Result<Arc<CertifiedKey>, String> {
    let certificate = &files.certificate_file;
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("http.tls.certificate_file {}: {e}", certificate.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "http.tls.certificate_file {} holds no PEM certificate",
            certificate.display()
        ));
    }
    let key_file = &files.key_file;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("http.tls.key_file {}: {e}", key_file.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("http.tls.key_file {}: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "http.tls: the key in {} does not belong to the certificate in {}: {e}",
            key_file.display(),
            certificate.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// A client builder that trusts the system roots and every certificate in
/// `ca_files` (PEM, one or more per file). A file that cannot be read, or holds no
/// certificate, is an error naming it: a CA silently left out would only show later,
/// as a handshake failure far from its cause.
pub fn client_builder(ca_files: &[PathBuf]) -> Result<reqwest::ClientBuilder, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_native_certs(true);
    for file in ca_files {
        let pem = std::fs::read(file)
            .map_err(|e| format!("the CA file {} cannot be read: {e}", file.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("the CA file {} is not PEM: {e}", file.display()))?;
        if certificates.is_empty() {
            return Err(format!(
                "the CA file {} holds no PEM certificate",
                file.display()
            ));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    Ok(builder)
}

/// A rustls client configuration trusting the system roots and every certificate in
/// `ca_files`, for clients that are not reqwest (the gateway's upstream pool). The
/// same errors as [`client_builder`], naming the file.
pub fn client_config(ca_files: &[PathBuf]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(native_roots());
    // Each already checked, so none is skipped.
    roots.add_parsable_certificates(configured_cas(ca_files)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The roots a client trusts: the system's and every certificate in `ca_files`, for
/// clients that take a list (the Zipkin exporter's). The same errors as
/// [`client_builder`], naming the file.
pub fn trusted_roots(ca_files: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut roots = native_roots();
    roots.extend(configured_cas(ca_files)?);
    Ok(roots)
}

/// The system's roots. A missing or unreadable store gives none, leaving only the
/// configured CAs, as it does for reqwest: a client then reaches what those CAs signed.
fn native_roots() -> Vec<CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}

/// Every certificate in `ca_files`, each checked as a root: a file that cannot be
/// read, is not PEM, holds no certificate or a bad one is an error naming it. (A
/// client that takes a list may skip a bad certificate without a word.)
fn configured_cas(ca_files: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut all = Vec::new();
    for file in ca_files {
        let certificates = CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("the CA file {} cannot be used: {e}", file.display()))?;
        if certificates.is_empty() {
            return Err(format!(
                "the CA file {} holds no PEM certificate",
                file.display()
            ));
        }
        for certificate in certificates {
            rustls::RootCertStore::empty()
                .add(certificate.clone())
                .map_err(|e| {
                    format!(
                        "the CA file {} holds a bad certificate: {e}",
                        file.display()
                    )
                })?;
            all.push(certificate);
        }
    }
    Ok(all)
}

/// An error with every cause under it, for a log line that says what really went
/// wrong: reqwest's own message is only "error sending request for url (...)", and
/// the cause that matters ("invalid peer certificate: UnknownIssuer") is a source.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_named() {
        let missing = client_builder(&[PathBuf::from("/nonexistent/ca.pem")]).unwrap_err();
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let said = client_builder(&[empty]).unwrap_err();
        assert!(said.contains("holds no PEM certificate"), "{said}");
        assert!(client_builder(&[]).is_ok());
    }

    #[test]
    fn an_error_chain_names_every_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = Outer(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        ));
        assert_eq!(
            error_chain(&error),
            "error sending request: invalid peer certificate: UnknownIssuer"
        );
    }
}
