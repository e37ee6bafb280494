//! What the order-service tests share: the service on a fresh database, with tokens
//! signed as the gateway signs them.
#![allow(dead_code)]

use std::{sync::Arc, time::Duration};

use order_service::{Application, Settings};
use serde_json::Value;
use shared::{
    auth::{ServiceAuthSettings, TokenSigner},
    config::{DatabaseSettings, HttpSettings},
    consumer::ConsumerLoopSettings,
    outbox::RelaySettings,
    registry::RegistrySettings,
};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::{CancellationToken, DropGuard};

pub struct Service {
    pub base: String,
    pub database: String,
    pub key: Arc<TokenSigner>,
    pub client: reqwest::Client,
    _stop: DropGuard,
}

/// order-service on a fresh database, without its relay (tests drive relays).
pub async fn spawn() -> Service {
    let database = shared::testing::fresh_database().await;
    let key = Arc::new(
        TokenSigner::from_seed_base64(
            &TokenSigner::generate_seed(),
            "storefront-gateway",
            "storefront",
            Duration::from_secs(300),
        )
        .expect("key"),
    );
    let settings = Settings {
        http: HttpSettings::local(0),
        database: DatabaseSettings {
            url: database.clone(),
            max_connections: 5,
            migrate: true,
        },
        registry: RegistrySettings {
            enabled: false,
            ..RegistrySettings::default()
        },
        auth: ServiceAuthSettings {
            gateway_url: Some(shared::testing::gateway_jwks(key.clone()).await),
            ..ServiceAuthSettings::default()
        },
        outbox: RelaySettings {
            enabled: false,
            ..RelaySettings::default()
        },
        consumer: ConsumerLoopSettings {
            enabled: false,
            ..ConsumerLoopSettings::default()
        },
        ..Settings::default()
    };
    let app = Application::build(settings).await.expect("builds");
    let base = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    Service {
        base,
        database,
        key,
        client: reqwest::Client::new(),
        _stop: stop.drop_guard(),
    }
}

impl Service {
    pub fn token(&self, user: &str, roles: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        self.key.sign(user, &roles).expect("sign")
    }

    pub async fn post(&self, user: &str, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/orders", self.base))
            .bearer_auth(self.token(user, &["customer"]))
            .json(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.expect("post")
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("get")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let mut db = PgConnection::connect(&self.database)
            .await
            .expect("connect");
        sqlx::query_scalar(sql)
            .fetch_one(&mut db)
            .await
            .expect("count")
    }
}
