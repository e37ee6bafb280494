//! What the processes' HTTPS clients trust: the system's root certificates, plus any
//! extra CA files a setting names (a company CA that signed an internal Keycloak, a
//! registry behind a private PKI). TLS is rustls; nothing links OpenSSL.

use std::path::PathBuf;

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
