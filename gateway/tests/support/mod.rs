//! What the gateway's test files share: the real registry in-process, and the
//! gateway's settings for a routes file with two users.

#![allow(dead_code)]

use std::{net::SocketAddr, path::Path};

use gateway::{
    Settings,
    auth::{GatewayAuthSettings, UserSettings, hash_password},
};
use shared::{auth::TokenSigner, config::HttpSettings, registry::RegistrySettings};
use tokio_util::sync::CancellationToken;

/// The registry's write credential in these tests.
pub const REGISTRY_TOKEN: &str = "gateway-test-registry-token";

/// The real registry on a free port, protected by [`REGISTRY_TOKEN`]; stopped when
/// the token is cancelled.
pub async fn registry() -> (SocketAddr, CancellationToken) {
    let settings = registry::Settings {
        http: HttpSettings::local(0),
        auth: registry::auth::AuthSettings {
            token: Some(REGISTRY_TOKEN.into()),
            protect_reads: false,
            ..Default::default()
        },
        ..registry::Settings::default()
    };
    let app = registry::Application::build(settings)
        .await
        .expect("registry");
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    (addr, stop)
}

/// A registry client's settings for the registry at `registry`.
pub fn registry_settings(registry: SocketAddr) -> RegistrySettings {
    RegistrySettings {
        urls: format!("http://{registry}"),
        token: Some(REGISTRY_TOKEN.into()),
        ..RegistrySettings::default()
    }
}

/// A gateway on a free port that follows the registry at `registry` and routes as
/// `routes_file` says, with users `alice` (customer, password `alice-pw`) and `admin`
/// (admin, `admin-pw`), and three workers whatever the machine's cores, so every test
/// crosses listeners, pools and shared route state the way production does.
pub fn gateway_settings(registry: SocketAddr, routes_file: &Path) -> Settings {
    Settings {
        http: HttpSettings::local(0),
        registry: RegistrySettings {
            enabled: true,
            ..registry_settings(registry)
        },
        routes_file: Some(routes_file.to_path_buf()),
        auth: GatewayAuthSettings {
            signing_key: Some(TokenSigner::generate_seed()),
            users: vec![
                UserSettings {
                    username: "alice".into(),
                    password_hash: hash_password("alice-pw").expect("hash"),
                    roles: vec!["customer".into()],
                    id: Some("user-alice".into()),
                },
                UserSettings {
                    username: "admin".into(),
                    password_hash: hash_password("admin-pw").expect("hash"),
                    roles: vec!["admin".into()],
                    id: None,
                },
            ],
            ..GatewayAuthSettings::default()
        },
        workers: 3,
        ..Settings::default()
    }
}

/// A gateway running in-process, stopped (with its registry) when dropped.
pub struct RunningGateway {
    pub base: String,
    pub client: reqwest::Client,
    _stop: Vec<tokio_util::sync::DropGuard>,
    _dir: tempfile::TempDir,
}

/// A registry and a gateway on it with no routes, its settings edited by `edit`
/// after [`gateway_settings`].
pub async fn spawn_gateway(edit: impl FnOnce(&mut Settings)) -> RunningGateway {
    let (registry, stop_registry) = registry().await;
    let dir = tempfile::tempdir().expect("dir");
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, "routes: []\n").expect("routes");
    let mut settings = gateway_settings(registry, &routes);
    edit(&mut settings);
    let (base, stop) = start_gateway(settings).await;
    RunningGateway {
        base,
        client: reqwest::Client::new(),
        _stop: vec![stop, stop_registry.drop_guard()],
        _dir: dir,
    }
}

/// A gateway on `settings`, running in-process until the guard is dropped; its base
/// URL.
pub async fn start_gateway(settings: Settings) -> (String, tokio_util::sync::DropGuard) {
    let app = gateway::Application::build(settings)
        .await
        .expect("gateway");
    let base = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    (base, stop.drop_guard())
}

/// `alice`'s `Authorization` header at the gateway `base` (see [`gateway_settings`]).
pub async fn alice_bearer(base: &str) -> String {
    let token: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/auth/token"))
        .json(&serde_json::json!({"username": "alice", "password": "alice-pw"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("token");
    format!("Bearer {}", token["access_token"].as_str().expect("token"))
}
