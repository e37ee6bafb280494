//! Servers reached over HTTPS with a certificate from a CA of the test's own (as an
//! internal Keycloak's or Zipkin's would be):
//!
//! - an issuer whose JWKS is served so: its tokens are accepted once that CA is
//!   configured (`auth.ca_files`), and refused, with a log line naming the
//!   certificate problem, when it is not;
//! - a Zipkin served so: spans reach it once that CA is configured
//!   (`tracing.ca_files`), and the export fails naming the certificate when it is not.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

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

/// What an HTTPS server of the test saw: each request's method and target.
type Seen = Arc<Mutex<Vec<String>>>;

/// Answers every request over HTTPS with `status` and `body` (JSON), after reading the
/// request whole; returns its base URL and what it saw.
async fn serve_https(pki: &Pki, status: &'static str, body: String) -> (String, Seen) {
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
    let base = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let body = body.clone();
            let record = record.clone();
            tokio::spawn(async move {
                // A client that does not trust the CA ends the handshake: nothing to serve.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while request.len() < head_end + length {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request[..head_end]);
                let target = line.split(' ').take(2).collect::<Vec<_>>().join(" ");
                record.lock().expect("seen").push(target);
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (base, seen)
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
    let (base, _) = serve_https(&pki, "200 OK", key.jwks().to_string()).await;
    let url = format!("{base}/protocol/openid-connect/certs");
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

/// Spans to a Zipkin served over HTTPS by an internal CA: refused by the handshake,
/// the error naming the certificate, until `tracing.ca_files` names that CA; then
/// posted to its `/api/v2/spans`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_zipkin_only_when_its_ca_is_trusted() {
    let pki = pki();
    let (zipkin, seen) = serve_https(&pki, "202 Accepted", String::new()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("internal-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).expect("write the CA");

    // One span through the process's span layer, then a flush: the export's result.
    let export = async |ca_files: Vec<std::path::PathBuf>| {
        let settings = shared::telemetry::TracingSettings {
            zipkin_url: Some(zipkin.clone()),
            ca_files,
            // Only the flush below exports: a scheduled export would take the span
            // first and only log its failure.
            export_interval_ms: 3_600_000,
            ..Default::default()
        };
        let (provider, layer) =
            shared::telemetry::span_layer("zipkin-tls-test", &settings).expect("span layer");
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("checkout").in_scope(|| {});
        });
        // The exporter posts with a blocking client, on a thread of its own.
        tokio::task::spawn_blocking(move || {
            let flushed = provider.force_flush();
            let _ = provider.shutdown();
            flushed
        })
        .await
        .expect("flush")
    };

    let refused = export(Vec::new()).await;
    let said = format!("{refused:?}");
    assert!(
        refused.is_err() && said.contains("certificate") && said.contains("/api/v2/spans"),
        "the export fails naming the certificate: {said}"
    );
    assert!(seen.lock().expect("seen").is_empty(), "nothing got through");

    export(vec![ca_file])
        .await
        .expect("the spans are posted once the CA is trusted");
    assert_eq!(
        *seen.lock().expect("seen"),
        ["POST /api/v2/spans"],
        "one batch, to Zipkin's API"
    );
}

#[test]
fn a_ca_file_that_cannot_be_used_stops_span_export_with_its_name() {
    let refused = shared::telemetry::span_layer::<tracing_subscriber::Registry>(
        "zipkin-tls-test",
        &shared::telemetry::TracingSettings {
            zipkin_url: Some("https://zipkin.example.test".into()),
            ca_files: vec!["/nonexistent/zipkin-ca.pem".into()],
            ..Default::default()
        },
    )
    .err()
    .unwrap_or_default();
    assert!(
        refused.contains("tracing.ca_files") && refused.contains("/nonexistent/zipkin-ca.pem"),
        "{refused}"
    );
}
