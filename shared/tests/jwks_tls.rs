//! An issuer whose JWKS is served over HTTPS, with a certificate from a CA of the
//! test's own (as an internal Keycloak's would be): its tokens are accepted once that
//! CA is configured (`auth.ca_files`), and refused, with a log line naming the
//! certificate problem, when it is not.

use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use shared::auth::{AuthError, IssuerSettings, JwtVerifier, TokenSigner, VerifierSettings};
use shared::testing::CapturedLog;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::ring::default_provider,
        pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};
use tracing_subscriber::prelude::*;

const ISSUER: &str = "https://keycloak.example.test/realms/store";

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    server_chain: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key")).expect("ca");
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().expect("server key");
    let certificate = server.signed_by(&key, &ca).expect("signed");
    Pki {
        ca_pem: ca.pem(),
        server_chain: vec![certificate.der().clone(), ca.der().clone()],
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// Serves `body` as JSON over HTTPS to every connection; returns the JWKS URL.
async fn https_jwks(pki: &Pki, body: String) -> String {
    let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "https://127.0.0.1:{}/protocol/openid-connect/certs",
        listener.local_addr().expect("addr").port()
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let body = body.clone();
            tokio::spawn(async move {
                // A client that does not trust the CA ends the handshake: nothing to serve.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

fn verifier(jwks_url: &str, ca_files: Vec<std::path::PathBuf>) -> JwtVerifier {
    JwtVerifier::new(&VerifierSettings {
        issuers: vec![IssuerSettings {
            issuer: ISSUER.into(),
            jwks_url: Some(jwks_url.into()),
            audiences: vec!["storefront".into()],
            algorithms: vec!["EdDSA".into()],
            role_map: [("user".to_owned(), "customer".to_owned())].into(),
            keep_roles: false,
        }],
        ca_files,
        ..VerifierSettings::default()
    })
    .expect("verifier")
}

#[tokio::test(flavor = "current_thread")]
async fn tokens_of_an_https_issuer_are_accepted_only_when_its_ca_is_trusted() {
    let pki = pki();
    let key = TokenSigner::from_seed_base64(
        &TokenSigner::generate_seed(),
        ISSUER,
        "storefront",
        Duration::from_secs(300),
    )
    .expect("signer");
    let url = https_jwks(&pki, key.jwks().to_string()).await;
    let token = key.sign("alice", &["user".into()]).expect("sign");

    // Without the CA: the fetch fails the handshake, the token is refused, and the
    // log line says why.
    let captured = CapturedLog::default();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(captured.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    let refused = verifier(&url, Vec::new()).verify(&token).await;
    assert!(matches!(refused, Err(AuthError::UnknownKey)), "{refused:?}");
    let logged = captured.text();
    assert!(
        logged.contains("JWKS fetch failed") && logged.contains("certificate"),
        "the log names the certificate problem:\n{logged}"
    );

    // With the CA configured: accepted.
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("internal-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).expect("write the CA");
    let claims = verifier(&url, vec![ca_file])
        .verify(&token)
        .await
        .expect("accepted once the CA is trusted");
    assert_eq!(claims.sub, "alice");
    assert!(claims.has_role("customer"));
}

#[test]
fn a_ca_file_that_cannot_be_used_stops_the_verifier_with_its_name() {
    let refused = JwtVerifier::new(&VerifierSettings {
        ca_files: vec!["/nonexistent/internal-ca.pem".into()],
        ..VerifierSettings::default()
    })
    .err()
    .unwrap_or_default();
    assert!(
        refused.contains("auth.ca_files") && refused.contains("/nonexistent/internal-ca.pem"),
        "{refused}"
    );
}
