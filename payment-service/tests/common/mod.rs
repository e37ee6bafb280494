//! The saga under test: order-service and payment-service on one fresh database (each
//! in its own schema), on topics of their own on the real broker (created from
//! kafka-setup's definitions, tagged for this test), with tokens signed as the
//! gateway signs them. Instances of payment-service can be stopped, crashed and
//! started again mid-test.
#![allow(dead_code)]

pub mod proxy;

use std::{sync::Arc, time::Duration};

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use shared::{
    auth::{ServiceAuthSettings, TokenSigner},
    config::{DatabaseSettings, HttpSettings},
    consumer::ConsumerLoopSettings,
    events::Topics,
    kafka::KafkaSettings,
    outbox::RelaySettings,
    registry::RegistrySettings,
};
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn kafka() -> KafkaSettings {
    KafkaSettings::for_brokers(
        std::env::var("KAFKA_BROKERS")
            .expect("KAFKA_BROKERS names the test broker; run the tests with `cargo xtask test`"),
    )
}

/// A running service task: stopped gracefully or crashed (aborted) on demand.
pub struct Running {
    pub base: String,
    /// The database and the `application_name` its connections carry, to end them
    /// as a dying process's connections end.
    connections: Option<(String, String)>,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Graceful stop: finishes the round in flight and commits, as on SIGTERM.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("joins").expect("stopped cleanly");
        }
    }

    /// A crash: the task is dropped wherever it is; nothing is committed on the way out.
    /// An aborted task leaves its pooled connections open (a dead process would
    /// not), so they are terminated too, rolling back whatever they had in flight.
    pub async fn crash(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some((database, name)) = &self.connections {
            let mut db = PgConnection::connect(database).await.expect("connect");
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(name)
            .execute(&mut db)
            .await
            .expect("terminate the crashed instance's connections");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub struct Saga {
    /// How both services and the test reach Kafka.
    pub kafka: KafkaSettings,
    pub tag: String,
    pub topics: Topics,
    pub database: String,
    pub key: Arc<TokenSigner>,
    pub jwks: String,
    pub client: reqwest::Client,
    pub orders: Running,
    pub payments: Option<Running>,
}

impl Saga {
    /// Both services running, with their relays and consumers.
    pub async fn start() -> Saga {
        Self::start_with(kafka()).await
    }

    /// The same, reaching Kafka as `kafka` says.
    pub async fn start_with(kafka: KafkaSettings) -> Saga {
        // `RUST_LOG=info` shows the services' logs in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let file = kafka_setup::TopicFile::builtin()
            .expect("topics.toml")
            .tagged(&tag);
        kafka_setup::apply(&kafka, &file, kafka_setup::Mode::Apply)
            .await
            .expect("topics applied");
        let topics = Topics {
            orders: kafka_setup::tagged_name("order-topic", &tag),
            payment_results: kafka_setup::tagged_name("payment-result-topic", &tag),
        };
        let database = shared::testing::fresh_database().await;
        let key = Arc::new(
            TokenSigner::from_seed_base64(
                &TokenSigner::generate_seed(),
                "storefront-gateway",
                "storefront",
                Duration::from_secs(600),
            )
            .expect("key"),
        );
        let jwks = shared::testing::gateway_jwks(key.clone()).await;
        let mut saga = Saga {
            kafka,
            tag,
            topics,
            database,
            key,
            jwks,
            client: reqwest::Client::new(),
            orders: Running {
                base: String::new(),
                connections: None,
                stop: CancellationToken::new(),
                task: None,
            },
            payments: None,
        };
        saga.orders = saga.start_orders().await;
        saga.payments = Some(saga.start_payments(true).await);
        saga
    }

    fn database_settings(&self) -> DatabaseSettings {
        DatabaseSettings {
            url: self.database.clone(),
            max_connections: 8,
            migrate: true,
        }
    }

    fn auth(&self) -> ServiceAuthSettings {
        ServiceAuthSettings {
            gateway_url: Some(self.jwks.clone()),
            ..ServiceAuthSettings::default()
        }
    }

    fn consumer(&self, service: &str) -> ConsumerLoopSettings {
        ConsumerLoopSettings {
            group: format!("{service}-{}", self.tag),
            statistics_interval_ms: 500,
            max_backoff_ms: 1_000,
            ..ConsumerLoopSettings::default()
        }
    }

    fn no_registry() -> RegistrySettings {
        RegistrySettings {
            enabled: false,
            ..RegistrySettings::default()
        }
    }

    pub async fn start_orders(&self) -> Running {
        let settings = order_service::Settings {
            http: HttpSettings::local(0),
            database: self.database_settings(),
            kafka: self.kafka.clone(),
            topics: self.topics.clone(),
            registry: Self::no_registry(),
            auth: self.auth(),
            outbox: fast_relay(true),
            consumer: self.consumer("order-service"),
            ..order_service::Settings::default()
        };
        let app = order_service::Application::build(settings)
            .await
            .expect("order-service builds");
        let base = format!("http://{}", app.local_addr());
        let stop = CancellationToken::new();
        let task = Some(tokio::spawn(app.run_until_stopped(stop.clone())));
        Running {
            base,
            connections: None,
            stop,
            task,
        }
    }

    /// A payment-service instance; `relay` false leaves its results in the outbox.
    pub async fn start_payments(&self, relay: bool) -> Running {
        self.start_payments_on(&self.database, relay).await
    }

    /// A payment-service instance whose database URL is `database`.
    pub async fn start_payments_on(&self, database: &str, relay: bool) -> Running {
        self.start_payments_with(database, relay, ConsumerLoopSettings::default().max_batch)
            .await
    }

    /// A payment-service instance applying at most `max_batch` events per transaction.
    pub async fn start_payments_with(
        &self,
        database: &str,
        relay: bool,
        max_batch: usize,
    ) -> Running {
        let name = format!("payment-service-{}", uuid::Uuid::new_v4().simple());
        let separator = if database.contains('?') { '&' } else { '?' };
        let settings = payment_service::Settings {
            http: HttpSettings::local(0),
            database: DatabaseSettings {
                url: format!("{database}{separator}application_name={name}"),
                ..self.database_settings()
            },
            kafka: self.kafka.clone(),
            topics: self.topics.clone(),
            registry: Self::no_registry(),
            auth: self.auth(),
            outbox: fast_relay(relay),
            consumer: ConsumerLoopSettings {
                max_batch,
                ..self.consumer("payment-service")
            },
            ..payment_service::Settings::default()
        };
        let app = payment_service::Application::build(settings)
            .await
            .expect("payment-service builds");
        let base = format!("http://{}", app.local_addr());
        let stop = CancellationToken::new();
        let task = Some(tokio::spawn(app.run_until_stopped(stop.clone())));
        Running {
            base,
            connections: Some((self.database.clone(), name)),
            stop,
            task,
        }
    }

    pub fn payments_base(&self) -> String {
        self.payments
            .as_ref()
            .expect("payment-service running")
            .base
            .clone()
    }

    pub fn token(&self, user: &str) -> String {
        self.key.sign(user, &["customer".to_owned()]).expect("sign")
    }

    pub fn admin_token(&self) -> String {
        self.key.sign("admin", &["admin".to_owned()]).expect("sign")
    }

    /// Deposits `amount` of `currency` for `user`; returns the account.
    pub async fn deposit(&self, user: &str, amount: i64, currency: &str) -> Value {
        let response = self
            .client
            .post(format!(
                "{}/payments/accounts/me/deposits",
                self.payments_base()
            ))
            .bearer_auth(self.token(user))
            .json(&json!({"amount": amount, "currency": currency}))
            .send()
            .await
            .expect("deposit");
        assert_eq!(response.status(), 200, "deposit accepted");
        response.json().await.expect("account")
    }

    pub async fn balance(&self, user: &str) -> i64 {
        let account: Value = self
            .client
            .get(format!("{}/payments/accounts/me", self.payments_base()))
            .bearer_auth(self.token(user))
            .send()
            .await
            .expect("account")
            .json()
            .await
            .expect("json");
        account["balance"].as_i64().expect("balance")
    }

    /// Places an order of `total` minor units (one line) and returns its id.
    pub async fn order(&self, user: &str, total: i64, currency: &str) -> String {
        let response = self
            .client
            .post(format!("{}/orders", self.orders.base))
            .bearer_auth(self.token(user))
            .json(&json!({
                "items": [{"sku": "BOOK-1", "quantity": 1, "unitPrice": total}],
                "currency": currency
            }))
            .send()
            .await
            .expect("order");
        assert_eq!(response.status(), 201, "order accepted");
        let order: Value = response.json().await.expect("order");
        order["id"].as_str().expect("id").to_owned()
    }

    pub async fn get_order(&self, user: &str, id: &str) -> Value {
        self.client
            .get(format!("{}/orders/{id}", self.orders.base))
            .bearer_auth(self.token(user))
            .send()
            .await
            .expect("order")
            .json()
            .await
            .expect("json")
    }

    /// Waits until order `id` leaves PENDING, and returns it. The minute allows for a
    /// consumer group handing partitions to a new instance under load.
    pub async fn settled(&self, user: &str, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let order = self.get_order(user, id).await;
            if order["status"] != "PENDING" {
                return order;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "order {id} still PENDING after 60 s; payment-service processed {} events, \
                     recorded {} payments, has {} results unpublished; order-service applied {}",
                    self.count("SELECT count(*) FROM payments.processed_events")
                        .await,
                    self.count("SELECT count(*) FROM payments.payments").await,
                    self.count("SELECT count(*) FROM payments.outbox WHERE published_at IS NULL")
                        .await,
                    self.count("SELECT count(*) FROM orders.processed_events")
                        .await,
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `sql` (a count) reaches at least `at_least`; returns the count.
    pub async fn count_reaches(&self, sql: &str, at_least: i64) -> i64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.count(sql).await;
            if n >= at_least {
                return n;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{sql}` is {n} after 30 s, expected at least {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// payment-service's Prometheus text.
    pub async fn payment_metrics(&self) -> String {
        self.metrics(&self.payments_base()).await
    }

    pub async fn metrics(&self, base: &str) -> String {
        self.client
            .get(format!("{base}/actuator/prometheus"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text")
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

    /// Writes `payload` to `topic` with `key`, on `partition` if given.
    pub async fn produce(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        event_type: &str,
        partition: Option<i32>,
    ) {
        let producer: FutureProducer = self.kafka.producer_config().create().expect("producer");
        let mut record = FutureRecord::to(topic).key(key).payload(payload).headers(
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "event-type",
                value: Some(event_type),
            }),
        );
        if let Some(p) = partition {
            record = record.partition(p);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("produced");
    }
}

fn fast_relay(enabled: bool) -> RelaySettings {
    RelaySettings {
        enabled,
        poll_interval_ms: 200,
        max_backoff_ms: 1_000,
        ..RelaySettings::default()
    }
}
