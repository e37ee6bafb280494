//! The saga over production's Kafka connection: TLS with the broker's certificate
//! checked against a CA, SCRAM-SHA-512 credentials, zstd compression. The broker is the
//! test broker's `SASL_SSL` listener, whose user `cargo xtask test` creates with
//! Kafka's own admin tool; a wrong password stops a service at start with the broker's
//! reason.

mod common;

use std::time::Duration;

use common::Saga;
use shared::{
    auth::ServiceAuthSettings,
    config::{DatabaseSettings, HttpSettings},
    kafka::{KafkaSettings, ProducerSettings, SaslSettings, SecurityProtocol, SslSettings},
    registry::RegistrySettings,
};
use tokio_util::sync::CancellationToken;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} names the test broker's SASL_SSL listener; run the tests with `cargo xtask test`")
    })
}

/// Settings as an operator writes them for a SASL_SSL cluster.
fn secure(password: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: env("STOREFRONT_KAFKA_SASL_SSL_BROKERS"),
        security_protocol: SecurityProtocol::SaslSsl,
        sasl: Some(SaslSettings {
            mechanism: "SCRAM-SHA-512".into(),
            username: env("STOREFRONT_KAFKA_SCRAM_USER"),
            password: password.to_owned(),
        }),
        ssl: SslSettings {
            ca_file: Some(env("STOREFRONT_KAFKA_CA_FILE").into()),
            ..SslSettings::default()
        },
        producer: ProducerSettings {
            compression: "zstd".into(),
            ..ProducerSettings::default()
        },
        ..KafkaSettings::default()
    }
}

#[tokio::test]
async fn the_saga_runs_over_sasl_ssl_with_scram_and_zstd() {
    let kafka = secure(&env("STOREFRONT_KAFKA_SCRAM_PASSWORD"));
    kafka
        .check()
        .expect("the settings are usable in this build");
    assert!(
        kafka.brokers != env_or_empty("KAFKA_BROKERS"),
        "the secure listener is not the plain one"
    );
    // Topics created over SASL_SSL; both relays publish with zstd, both consumers
    // read, all through the secure listener only.
    let saga = Saga::start_with(kafka).await;
    saga.deposit("alice", 5_000, "EUR").await;
    let id = saga.order("alice", 2_000, "EUR").await;
    let order = saga.settled("alice", &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(saga.balance("alice").await, 3_000);
    saga.count_reaches(
        "SELECT count(*) FROM payments.outbox WHERE published_at IS NOT NULL",
        1,
    )
    .await;

    // What the broker stored for the order's event: zstd record batches (the broker
    // keeps the producer's codec), read from its log segments.
    let codecs = stored_codecs(&saga.topics.orders);
    assert!(
        !codecs.is_empty(),
        "the order's event is in the broker's log"
    );
    assert!(
        codecs.iter().all(|codec| *codec == ZSTD),
        "every batch is zstd-compressed: {codecs:?}"
    );
}

/// The codec number of zstd in a record batch's attributes.
const ZSTD: u16 = 4;

/// The compression codec of every record batch of `topic` in the test broker's log
/// segments (record batch format v2: the attributes are bytes 21-22 of a batch, the
/// codec their lowest three bits).
fn stored_codecs(topic: &str) -> Vec<u16> {
    let dirs = std::env::var_os("STOREFRONT_KAFKA_DATA_DIRS").expect(
        "STOREFRONT_KAFKA_DATA_DIRS names the test broker's data; run the tests with `cargo xtask test`",
    );
    let mut codecs = Vec::new();
    for dir in std::env::split_paths(&dirs) {
        for partition in std::fs::read_dir(&dir)
            .expect("the broker's data folder")
            .flatten()
        {
            let name = partition.file_name().to_string_lossy().into_owned();
            let is_topic = name
                .strip_prefix(topic)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if !is_topic {
                continue;
            }
            for segment in std::fs::read_dir(partition.path())
                .expect("partition")
                .flatten()
            {
                if segment.path().extension().is_none_or(|e| e != "log") {
                    continue;
                }
                let bytes = std::fs::read(segment.path()).expect("segment");
                let mut at = 0;
                while at + 23 <= bytes.len() {
                    let length =
                        i32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
                    let attributes =
                        u16::from_be_bytes(bytes[at + 21..at + 23].try_into().expect("2 bytes"));
                    codecs.push(attributes & 0x7);
                    at += 12 + usize::try_from(length).expect("a batch length");
                }
            }
        }
    }
    codecs
}

fn env_or_empty(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

#[tokio::test]
async fn a_wrong_password_stops_the_service_at_start_with_the_brokers_reason() {
    let database = shared::testing::fresh_database().await;
    let settings = payment_service::Settings {
        http: HttpSettings::local(0),
        database: DatabaseSettings {
            url: database,
            max_connections: 2,
            migrate: true,
        },
        kafka: KafkaSettings {
            // Long enough that waiting it out would fail the deadline below.
            request_timeout_ms: 120_000,
            ..secure("not-the-password")
        },
        registry: RegistrySettings {
            enabled: false,
            ..RegistrySettings::default()
        },
        auth: ServiceAuthSettings {
            gateway_url: Some("http://127.0.0.1:9/unused".into()),
            ..ServiceAuthSettings::default()
        },
        ..payment_service::Settings::default()
    };
    let app = payment_service::Application::build(settings)
        .await
        .expect("builds: nothing has connected yet");
    // Refused credentials do not wait for the request timeout.
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        app.run_until_stopped(CancellationToken::new()),
    )
    .await
    .expect("stops before the request timeout")
    .expect_err("refused credentials stop the service");
    let said = format!("{stopped:#}");
    assert!(said.contains("payment-service cannot use Kafka"), "{said}");
    assert!(
        said.contains("refused") && said.to_lowercase().contains("authentication"),
        "the broker's reason is given: {said}"
    );
    assert!(
        !said.contains("not-the-password"),
        "no password in the error: {said}"
    );
}
