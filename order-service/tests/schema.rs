//! order-service applies its migrations at start-up, into a schema of its own.

use order_service::{Application, SCHEMA, Settings};
use shared::{
    config::{DatabaseSettings, HttpSettings},
    registry::RegistrySettings,
};
use sqlx::{Connection, PgConnection};

fn settings(url: &str) -> Settings {
    Settings {
        http: HttpSettings::local(0),
        database: DatabaseSettings {
            url: url.to_owned(),
            max_connections: 2,
            migrate: true,
        },
        registry: RegistrySettings {
            enabled: false,
            ..RegistrySettings::default()
        },
        ..Settings::default()
    }
}

#[tokio::test]
async fn start_up_migrates_into_the_services_own_schema_and_again_changes_nothing() {
    let url = shared::testing::fresh_database().await;
    Application::build(settings(&url))
        .await
        .expect("first start migrates");
    Application::build(settings(&url))
        .await
        .expect("a second start is a no-op");

    let mut db = PgConnection::connect(&url).await.expect("connect");
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    .fetch_all(&mut db)
    .await
    .expect("tables");
    let in_schema: Vec<&str> = tables
        .iter()
        .filter(|(schema, _)| schema == SCHEMA)
        .map(|(_, table)| table.as_str())
        .collect();
    for table in ["_sqlx_migrations", "idempotency_keys", "orders", "outbox"] {
        assert!(
            in_schema.contains(&table),
            "{table} missing from {SCHEMA}: {tables:?}"
        );
    }
    assert!(
        tables.iter().all(|(schema, _)| schema == SCHEMA),
        "nothing outside its schema (public stays free for others): {tables:?}"
    );
    let applied: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{SCHEMA}\"._sqlx_migrations WHERE success"
    ))
    .fetch_one(&mut db)
    .await
    .expect("migrations");
    assert_eq!(applied, order_service::MIGRATOR.iter().count() as i64);
}
