//! The gateway over TLS: an HTTPS listener that negotiates HTTP/2 by ALPN and picks up
//! a renewed certificate without a restart; `https://` upstreams, fixed or registered
//! with a secure port, verified against the configured CAs and refused otherwise.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::HeaderMap, routing::any};
use gateway::{Application, Settings, proxy::UpstreamSettings};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::{
    config::HttpSettings,
    registry::{InstanceRegistration, RegistryClient},
    tls::ServerTlsSettings,
};
use tokio_util::sync::CancellationToken;

mod support;

/// A CA of the test's own.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    file: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let file = dir.join(format!("{name}.pem"));
        std::fs::write(&file, issuer.pem()).expect("write CA");
        Ca { issuer, file }
    }

    /// A certificate for localhost and 127.0.0.1, written to `files` (replacing what
    /// is there: a renewal).
    fn issue(&self, files: &ServerTlsSettings) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let key = KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &self.issuer).expect("signed");
        // Key first, then the certificate, each replaced whole (write then rename), as
        // certificate tools renew them.
        for (path, text) in [
            (&files.key_file, key.serialize_pem()),
            (&files.certificate_file, certificate.pem()),
        ] {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, text).expect("write");
            std::fs::rename(&partial, path).expect("rename");
        }
    }

    fn certificate(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.issuer.pem().as_bytes()).expect("CA certificate")
    }
}

fn files(dir: &Path, name: &str) -> ServerTlsSettings {
    ServerTlsSettings {
        certificate_file: dir.join(format!("{name}.crt")),
        key_file: dir.join(format!("{name}.key")),
    }
}

/// An upstream that answers with the headers it received; over TLS when `tls`.
#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    headers: Arc<Mutex<Value>>,
}

async fn upstream(tls: Option<&ServerTlsSettings>) -> (Upstream, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up = Upstream {
        addr: listener.local_addr().expect("addr"),
        hits: Arc::new(AtomicUsize::new(0)),
        headers: Arc::new(Mutex::new(Value::Null)),
    };
    async fn echo(State(up): State<Upstream>, headers: HeaderMap) -> Json<Value> {
        up.hits.fetch_add(1, Ordering::SeqCst);
        let seen: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
            .collect();
        *up.headers.lock().expect("lock") = Value::Object(seen);
        Json(json!({"upstream": "yes"}))
    }
    let app = Router::new().fallback(any(echo)).with_state(up.clone());
    let stop = CancellationToken::new();
    let acceptor = tls.map(|t| shared::tls::server_acceptor(t).expect("upstream TLS"));
    let serving = stop.clone();
    tokio::spawn(async move {
        shared::server::serve(listener, app, serving, &Default::default(), acceptor).await
    });
    (up, stop)
}

struct Gateway {
    base: String,
    _stop: Vec<CancellationToken>,
    _dir: tempfile::TempDir,
}

/// A gateway routing `/up/**` to `uri`, following the registry at `registry`, with
/// `edit` applied to its settings.
async fn gateway(registry: SocketAddr, uri: &str, edit: impl FnOnce(&mut Settings)) -> Gateway {
    let dir = tempfile::tempdir().expect("dir");
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!("routes:\n  - id: up\n    uri: {uri}\n    predicates: [\"Path=/up/**\"]\n"),
    )
    .expect("routes");
    let mut settings = Settings {
        upstream: UpstreamSettings {
            response_timeout_ms: 5_000,
            ..UpstreamSettings::default()
        },
        ..support::gateway_settings(registry, &routes)
    };
    edit(&mut settings);
    let scheme = if settings.http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let app = Application::build(settings).await.expect("gateway");
    let base = format!("{scheme}://127.0.0.1:{}", app.port());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    Gateway {
        base,
        _stop: vec![stop],
        _dir: dir,
    }
}

async fn token(client: &reqwest::Client, base: &str) -> String {
    let response = client
        .post(format!("{base}/auth/token"))
        .json(&json!({"username": "alice", "password": "alice-pw"}))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// A client trusting only `ca` (no system roots), on HTTP/1.1 only when `http1`.
fn client_trusting(ca: &Ca, http1: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.certificate())
        // Every request opens a connection: the renewal check needs new handshakes.
        .pool_max_idle_per_host(0);
    let builder = if http1 { builder.http1_only() } else { builder };
    builder.build().expect("client")
}

#[tokio::test]
async fn the_https_listener_speaks_h2_by_alpn_and_serves_a_renewed_certificate_without_restart() {
    let (registry, _stop_registry) = support::registry().await;
    let dir = tempfile::tempdir().expect("dir");
    let first = Ca::new(dir.path(), "first-ca");
    let tls = files(dir.path(), "gateway");
    first.issue(&tls);
    let (up, _stop_up) = upstream(None).await;
    let gateway = gateway(registry, &format!("http://{}", up.addr), |s| {
        s.http = HttpSettings {
            tls: Some(tls.clone()),
            ..HttpSettings::local(0)
        };
    })
    .await;

    let h2 = client_trusting(&first, false);
    let bearer = token(&h2, &gateway.base).await;
    let response = h2
        .get(format!("{}/up/thing", gateway.base))
        .bearer_auth(&bearer)
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "h2 by ALPN");
    let seen = up.headers.lock().expect("lock").clone();
    assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
    assert!(
        seen["x-forwarded-host"]
            .as_str()
            .is_some_and(|h| h.starts_with("127.0.0.1:")),
        "an HTTP/2 client's :authority is the forwarded host: {seen}"
    );

    let h1 = client_trusting(&first, true);
    let response = h1
        .get(format!("{}/up/thing", gateway.base))
        .bearer_auth(&bearer)
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);

    // Plain HTTP to the TLS port gets no answer a client could take for one.
    let plain = reqwest::Client::new()
        .get(gateway.base.replace("https://", "http://") + "/actuator/health")
        .send()
        .await;
    assert!(plain.is_err() || !plain.expect("sent").status().is_success());

    // A renewal by another CA: new handshakes present it, with no restart.
    let second = Ca::new(dir.path(), "second-ca");
    second.issue(&tls);
    let renewed = client_trusting(&second, false);
    let started = std::time::Instant::now();
    loop {
        match renewed
            .get(format!("{}/actuator/health", gateway.base))
            .send()
            .await
        {
            Ok(response) => {
                assert_eq!(response.status(), StatusCode::OK);
                break;
            }
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(15),
                "the renewed certificate was not served within 15 s: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (A fresh client: one that talked to the gateway before may resume its TLS
    // session, which carries no certificate, as sessions do across renewals.)
    assert!(
        client_trusting(&first, true)
            .get(format!("{}/actuator/health", gateway.base))
            .send()
            .await
            .is_err(),
        "the old certificate is no longer served"
    );

    // A renewal that cannot be loaded keeps the last good pair in use: every
    // handshake across more than one renewal check still succeeds.
    std::fs::write(&tls.key_file, "not a key").expect("write");
    for _ in 0..15 {
        let response = renewed
            .get(format!("{}/actuator/health", gateway.base))
            .send()
            .await
            .expect("still served with the last good certificate");
        assert_eq!(response.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_cas_and_refused_otherwise() {
    let (registry, _stop_registry) = support::registry().await;
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new(dir.path(), "upstream-ca");
    let tls = files(dir.path(), "upstream");
    ca.issue(&tls);
    let (up, _stop_up) = upstream(Some(&tls)).await;
    let client = reqwest::Client::new();

    let trusting = gateway(registry, &format!("https://{}", up.addr), |s| {
        s.upstream.ca_files = vec![ca.file.clone()];
    })
    .await;
    let bearer = token(&client, &trusting.base).await;
    let response = client
        .get(format!("{}/up/fixed", trusting.base))
        .bearer_auth(&bearer)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);

    // Without the CA, the upstream's certificate is not trusted: nothing reaches it.
    let default = gateway(registry, &format!("https://{}", up.addr), |_| {}).await;
    let bearer = token(&client, &default.base).await;
    let response = client
        .get(format!("{}/up/fixed", default.base))
        .bearer_auth(&bearer)
        .send()
        .await
        .expect("request");
    assert!(
        response.status().is_server_error(),
        "an unverified upstream is an error: {}",
        response.status()
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 1, "nothing sent to it");

    // An instance that registers a secure port is reached over https there.
    let settings = support::registry_settings(registry);
    let registration =
        InstanceRegistration::for_bound("secure-service", up.addr, &settings).secure();
    RegistryClient::new(&settings)
        .expect("registry client")
        .register(&registration, 60)
        .await
        .expect("register");
    let balanced = gateway(registry, "lb://secure-service", |s| {
        s.upstream.ca_files = vec![ca.file.clone()];
    })
    .await;
    let bearer = token(&client, &balanced.base).await;
    shared::testing::eventually(
        Duration::from_secs(10),
        "the instance with a secure port is routed to over https",
        async || {
            let response = client
                .get(format!("{}/up/balanced", balanced.base))
                .bearer_auth(&bearer)
                .send()
                .await
                .ok()?;
            (response.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
}
