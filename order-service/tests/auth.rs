//! order-service verifies the token the gateway relays, again: called directly, it
//! refuses requests without a valid one.

use std::{sync::Arc, time::Duration};

use order_service::{Application, Settings};
use shared::{
    auth::{ServiceAuthSettings, TokenSigner},
    config::{DatabaseSettings, HttpSettings},
    registry::RegistrySettings,
};
use tokio_util::sync::CancellationToken;

fn signer() -> TokenSigner {
    TokenSigner::from_seed_base64(
        &TokenSigner::generate_seed(),
        "storefront-gateway",
        "storefront",
        Duration::from_secs(60),
    )
    .expect("seed")
}

#[tokio::test]
async fn a_direct_call_needs_a_token_the_gateway_signed() {
    let gateway_key = Arc::new(signer());
    let gateway_url = shared::testing::gateway_jwks(gateway_key.clone()).await;
    let settings = Settings {
        http: HttpSettings::local(0),
        database: DatabaseSettings {
            url: "postgres://nobody@127.0.0.1:1/none".into(),
            max_connections: 1,
            migrate: false,
        },
        registry: RegistrySettings {
            enabled: false,
            ..RegistrySettings::default()
        },
        auth: ServiceAuthSettings {
            gateway_url: Some(gateway_url),
            ..ServiceAuthSettings::default()
        },
        ..Settings::default()
    };
    let app = Application::build(settings).await.expect("builds");
    let base = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    let client = reqwest::Client::new();

    let anonymous = client
        .get(format!("{base}/orders"))
        .send()
        .await
        .expect("get");
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        anonymous.headers()["content-type"],
        "application/problem+json"
    );

    let stranger = signer().sign("mallory", &["admin".into()]).expect("sign");
    let forged = client
        .get(format!("{base}/orders"))
        .bearer_auth(stranger)
        .send()
        .await
        .expect("get");
    assert_eq!(forged.status(), 401, "a key the gateway never published");

    let token = gateway_key
        .sign("alice", &["customer".into()])
        .expect("sign");
    // A path that needs no database: an id that cannot exist.
    let accepted = client
        .get(format!("{base}/orders/not-an-order"))
        .bearer_auth(token)
        .send()
        .await
        .expect("get");
    // Past authentication, the order is simply not found.
    assert_eq!(accepted.status(), 404, "the gateway's token is accepted");

    let health = client
        .get(format!("{base}/actuator/info"))
        .send()
        .await
        .expect("info");
    assert_eq!(health.status(), 200, "the actuator stays open");
    stop.cancel();
}
