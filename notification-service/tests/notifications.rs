//! notification-service against the real broker, PostgreSQL and a real SMTP server
//! (aiosmtpd): one mail per outcome however often the event comes, and an SMTP outage
//! that delays mail without holding up the partition or losing a notification.

use std::{sync::Arc, time::Duration};

use notification_service::{Application, Settings, mail::MailSettings};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};
use shared::{
    auth::{ServiceAuthSettings, TokenSigner},
    config::{DatabaseSettings, HttpSettings},
    consumer::ConsumerLoopSettings,
    events::Topics,
    kafka::KafkaSettings,
    registry::RegistrySettings,
    testing::SmtpSink,
};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

fn kafka() -> KafkaSettings {
    KafkaSettings::for_brokers(
        std::env::var("KAFKA_BROKERS")
            .expect("KAFKA_BROKERS names the test broker; run the tests with `cargo xtask test`"),
    )
}

struct Harness {
    base: String,
    topic: String,
    database: String,
    key: Arc<TokenSigner>,
    client: reqwest::Client,
    _stop: DropGuard,
}

impl Harness {
    /// The service, mailing to 127.0.0.1:`smtp_port` with quick retries.
    async fn start(smtp_port: u16) -> Harness {
        Self::start_with(smtp_port, |_| {}).await
    }

    /// The same, with `mail` settings of the test's own.
    async fn start_with(smtp_port: u16, configure: impl FnOnce(&mut MailSettings)) -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let tag = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let file = kafka_setup::TopicFile::builtin()
            .expect("topics.toml")
            .tagged(&tag);
        kafka_setup::apply(&kafka(), &file, kafka_setup::Mode::Apply)
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
        let mut mail = MailSettings {
            smtp_port,
            initial_backoff_ms: 100,
            max_backoff_ms: 400,
            poll_interval_ms: 200,
            ..MailSettings::default()
        };
        mail.directory
            .insert("alice".into(), "Alice <alice@example.org>".into());
        configure(&mut mail);
        let settings = Settings {
            http: HttpSettings::local(0),
            database: DatabaseSettings {
                url: database.clone(),
                max_connections: 5,
                migrate: true,
            },
            kafka: kafka(),
            topics: topics.clone(),
            registry: RegistrySettings {
                enabled: false,
                ..RegistrySettings::default()
            },
            auth: ServiceAuthSettings {
                gateway_url: Some(shared::testing::gateway_jwks(key.clone()).await),
                ..ServiceAuthSettings::default()
            },
            consumer: ConsumerLoopSettings {
                group: format!("notification-service-{tag}"),
                ..ConsumerLoopSettings::default()
            },
            mail,
            ..Settings::default()
        };
        let app = Application::build(settings).await.expect("builds");
        let base = format!("http://{}", app.local_addr());
        let stop = CancellationToken::new();
        tokio::spawn(app.run_until_stopped(stop.clone()));
        Harness {
            base,
            topic: topics.payment_results,
            database,
            key,
            client: reqwest::Client::new(),
            _stop: stop.drop_guard(),
        }
    }

    /// Publishes `events` through one producer, all before any is awaited.
    async fn publish_all(&self, events: &[Value]) {
        let producer: FutureProducer = kafka().producer_config().create().expect("producer");
        let sends = events.iter().map(|event| {
            let key = event["orderId"].as_str().expect("orderId").to_owned();
            let payload = event.to_string();
            let producer = producer.clone();
            let topic = self.topic.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("produced");
            }
        });
        futures::future::join_all(sends).await;
    }

    async fn publish(&self, event: &Value) {
        self.publish_with(event, OwnedHeaders::new()).await;
    }

    async fn publish_with(&self, event: &Value, headers: OwnedHeaders) {
        let producer: FutureProducer = kafka().producer_config().create().expect("producer");
        producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(event["orderId"].as_str().expect("orderId"))
                    .payload(&event.to_string())
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
    }

    async fn count(&self, sql: &str) -> i64 {
        let mut db = PgConnection::connect(&self.database)
            .await
            .expect("connect");
        sqlx::query_scalar(sql)
            .fetch_one(&mut db)
            .await
            .expect("count")
    }

    async fn until(&self, sql: &str, at_least: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.count(sql).await;
            if n >= at_least {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{sql}` is {n} after 30 s, expected {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn list(&self, user: &str, roles: &[&str]) -> Value {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        self.client
            .get(format!("{}/notifications", self.base))
            .bearer_auth(self.key.sign(user, &roles).expect("sign"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json")
    }
}

fn result(user: &str, validated: bool, amount: i64) -> Value {
    let mut event = json!({
        "eventId": Uuid::new_v4(),
        "eventType": if validated { "payment-validated" } else { "payment-declined" },
        "occurredAt": "2026-11-22T10:00:00.000Z",
        "orderId": Uuid::new_v4(),
        "userId": user,
        "amount": amount,
        "currency": "EUR",
    });
    if !validated {
        event["reason"] = json!("insufficient funds: balance 100, order total 2500");
    }
    event
}

async fn wait_for_mail(sink: &SmtpSink, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let messages = sink.messages();
        if messages.len() >= n {
            return messages;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} mails arrived",
            messages.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts the relay on `port`, where it was down, and waits until the `n` queued
/// notifications are `SENT` and their mail has arrived.
async fn relay_returns(h: &Harness, port: u16, maildir: &std::path::Path, n: usize) {
    let sink = SmtpSink::start(port, maildir).await;
    h.until(
        "SELECT count(*) FROM notifications.notifications WHERE status = 'SENT'",
        n as i64,
    )
    .await;
    assert_eq!(wait_for_mail(&sink, n).await.len(), n);
}

#[tokio::test]
async fn each_outcome_is_mailed_once_however_often_it_arrives() {
    let maildir = tempfile::tempdir().expect("temp dir");
    let sink = SmtpSink::start(0, maildir.path()).await;
    let h = Harness::start(sink.port).await;

    let confirmed = result("alice", true, 2_500);
    let rejected = result("bob", false, 2_500);
    // The confirmation three times, and once more under a new eventId.
    for _ in 0..3 {
        h.publish(&confirmed).await;
    }
    let mut again = confirmed.clone();
    again["eventId"] = json!(Uuid::new_v4());
    h.publish(&again).await;
    h.publish(&rejected).await;
    h.until("SELECT count(*) FROM notifications.processed_events", 3)
        .await;
    h.until(
        "SELECT count(*) FROM notifications.notifications WHERE status = 'SENT'",
        2,
    )
    .await;
    assert_eq!(
        h.count("SELECT count(*) FROM notifications.notifications")
            .await,
        2
    );

    let mails = wait_for_mail(&sink, 2).await;
    assert_eq!(mails.len(), 2, "one mail per outcome: {mails:#?}");
    let to_alice = mails
        .iter()
        .find(|m| m.contains("alice@example.org"))
        .expect("alice's mail, at her directory address");
    assert!(to_alice.contains(&format!(
        "Order {} confirmed",
        confirmed["orderId"].as_str().unwrap()
    )));
    assert!(to_alice.contains("25.00 EUR"), "{to_alice}");
    let to_bob = mails
        .iter()
        .find(|m| m.contains("bob@storefront.local"))
        .expect("bob's mail, at the pattern's address");
    assert!(to_bob.contains("rejected"), "{to_bob}");
    assert!(to_bob.contains("insufficient funds"), "{to_bob}");

    let alice = h.list("alice", &["customer"]).await;
    let items = alice["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{alice}");
    assert_eq!(items[0]["orderId"], confirmed["orderId"]);
    assert_eq!(items[0]["channel"], "email");
    assert_eq!(items[0]["status"], "SENT");
    assert!(items[0]["subject"].as_str().unwrap().contains("confirmed"));
    assert!(items[0]["createdAt"].is_string());
    let admin = h.list("root", &["admin"]).await;
    assert_eq!(admin["items"].as_array().expect("items").len(), 2);
}

#[tokio::test]
async fn an_smtp_outage_delays_mail_but_never_the_partition() {
    let maildir = tempfile::tempdir().expect("temp dir");
    // Nothing listens on this port yet: the relay is down.
    let port = shared::testing::free_port();
    let h = Harness::start(port).await;
    let events: Vec<Value> = (0..3)
        .map(|i| result("alice", i % 2 == 0, 100 + i))
        .collect();
    for event in &events {
        h.publish(event).await;
    }
    // Every event was consumed and queued while no mail could leave.
    h.until("SELECT count(*) FROM notifications.processed_events", 3)
        .await;
    h.until(
        "SELECT count(*) FROM notifications.notifications WHERE attempts >= 1 AND last_error IS NOT NULL",
        1,
    )
    .await;
    assert_eq!(
        h.count("SELECT count(*) FROM notifications.notifications WHERE status = 'SENT'")
            .await,
        0
    );

    relay_returns(&h, port, maildir.path(), 3).await;
}

/// The mailer's lines name the request that placed the order (its `x-request-id`,
/// carried by the event), so an operator can follow a failed mail back to it, and the
/// notification keeps that id for later attempts.
#[tokio::test]
async fn a_mail_that_fails_is_logged_with_the_request_that_caused_it() {
    let captured = shared::testing::CapturedLog::default();
    // This test's runtime has one thread: the mailer's lines come here.
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish(),
    );
    // Nothing listens on this port: every attempt fails.
    let h = Harness::start(shared::testing::free_port()).await;
    let request_id = format!("req-{}", Uuid::new_v4().simple());
    h.publish_with(
        &result("alice", true, 2500),
        OwnedHeaders::new().insert(Header {
            key: shared::events::REQUEST_ID_HEADER,
            value: Some(request_id.as_str()),
        }),
    )
    .await;
    h.until(
        &format!(
            "SELECT count(*) FROM notifications.notifications \
             WHERE attempts >= 1 AND last_error IS NOT NULL AND request_id = '{request_id}'"
        ),
        1,
    )
    .await;
    let logged = shared::testing::eventually(
        Duration::from_secs(10),
        "the failed attempt is logged",
        async || {
            let text = captured.text();
            text.lines()
                .find(|l| l.contains("mail not sent"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(
        logged.contains(&request_id),
        "the line names the request: {logged}"
    );
}

#[tokio::test]
async fn listing_without_a_token_is_refused_and_bad_parameters_are_named() {
    let h = Harness::start(shared::testing::free_port()).await;
    let response = reqwest::get(format!("{}/notifications", h.base))
        .await
        .expect("get");
    assert_eq!(response.status(), 401);
    let response = h
        .client
        .get(format!("{}/notifications?limit=0&orderId=x", h.base))
        .bearer_auth(h.key.sign("alice", &["customer".to_owned()]).expect("sign"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("json");
    let fields: Vec<_> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["field"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(fields, ["orderId", "limit"]);
}

#[tokio::test]
async fn the_openapi_document_is_served_and_docs_api_holds_the_same() {
    let h = Harness::start(shared::testing::free_port()).await;
    let response = reqwest::get(format!("{}/openapi.json", h.base))
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    let served: Value = response.json().await.expect("json");
    assert!(served["paths"].get("/notifications").is_some());
    shared::openapi::check_document(
        &notification_service::openapi::document(),
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/api/notification-service.json"),
    );
}

/// What a test relay does with each message once its data has come, before it
/// answers `250`.
type OnMessage = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// An SMTP relay on a port of its own that speaks just enough of the protocol for
/// lettre: every command gets `250`, `RCPT` gets `rcpt_reply`, and each message's
/// data is answered `250` once `on_message` is done with it.
async fn scripted_relay(rcpt_reply: &'static [u8], on_message: OnMessage) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let on_message = on_message.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 test-relay ESMTP\r\n").await;
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        on_message().await;
                        b"250 accepted\r\n"
                    } else {
                        let verb = line.split_whitespace().next().unwrap_or("");
                        match verb.to_ascii_uppercase().as_str() {
                            "EHLO" | "HELO" => b"250 test-relay\r\n",
                            "RCPT" => rcpt_reply,
                            "DATA" => {
                                in_data = true;
                                b"354 go ahead\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => b"250 ok\r\n",
                        }
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// An SMTP relay that holds every message for `hold` before accepting it, and
/// remembers how many messages it held at once at most.
struct SlowRelay {
    port: u16,
    most_at_once: Arc<std::sync::atomic::AtomicUsize>,
}

impl SlowRelay {
    async fn start(hold: Duration) -> SlowRelay {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let holding = Arc::new(AtomicUsize::new(0));
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let most = most_at_once.clone();
        let port = scripted_relay(
            b"250 ok\r\n",
            Arc::new(move || {
                let (holding, most) = (holding.clone(), most.clone());
                Box::pin(async move {
                    let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(hold).await;
                    holding.fetch_sub(1, Ordering::SeqCst);
                })
            }),
        )
        .await;
        SlowRelay { port, most_at_once }
    }
}

#[tokio::test]
async fn mail_to_a_slow_relay_goes_out_several_messages_at_a_time() {
    let relay = SlowRelay::start(Duration::from_millis(300)).await;
    let h = Harness::start(relay.port).await;
    let events: Vec<Value> = (0..8)
        .map(|i| result(&format!("user-{i}"), true, 1_000))
        .collect();
    h.publish_all(&events).await;
    h.until(
        "SELECT count(*) FROM notifications.notifications WHERE status = 'SENT'",
        8,
    )
    .await;
    let most = relay.most_at_once.load(std::sync::atomic::Ordering::SeqCst);
    // One at a time, eight messages held 300 ms each would take 2.4 s; the relay saw
    // several at once instead.
    assert!(most >= 4, "at most {most} message(s) in flight at once");
}

/// A relay that is down refuses nothing: however many tries pass while it is away
/// (well past `max_attempts`), its mail stays `PENDING` and goes out when it returns.
#[tokio::test]
async fn a_relay_outage_longer_than_the_attempts_fails_no_mail() {
    let maildir = tempfile::tempdir().expect("temp dir");
    let port = shared::testing::free_port();
    let h = Harness::start_with(port, |mail| mail.max_attempts = 2).await;
    let events: Vec<Value> = (0..3).map(|i| result("alice", true, 100 + i)).collect();
    h.publish_all(&events).await;
    // Each notification tried twice as often as `max_attempts` allows refusals.
    h.until(
        "SELECT count(*) FROM notifications.notifications WHERE attempts >= 4",
        3,
    )
    .await;
    assert_eq!(
        h.count("SELECT count(*) FROM notifications.notifications WHERE status <> 'PENDING'")
            .await,
        0,
        "a relay that was never reached failed mail"
    );
    assert_eq!(
        h.count("SELECT coalesce(sum(refusals), 0)::int8 FROM notifications.notifications")
            .await,
        0
    );

    relay_returns(&h, port, maildir.path(), 3).await;
}

/// An SMTP relay that answers every recipient `451` (try again later).
async fn refusing_relay() -> u16 {
    scripted_relay(
        b"451 4.3.2 try again later\r\n",
        Arc::new(|| Box::pin(async {})),
    )
    .await
}

/// What `max_attempts` limits: a relay that keeps refusing a message for now (4xx)
/// has it `FAILED` after that many refusals.
#[tokio::test]
async fn a_message_the_relay_keeps_refusing_fails_after_max_attempts() {
    let port = refusing_relay().await;
    let h = Harness::start_with(port, |mail| mail.max_attempts = 2).await;
    h.publish(&result("alice", true, 100)).await;
    h.until(
        "SELECT count(*) FROM notifications.notifications \
         WHERE status = 'FAILED' AND refusals = 2 AND attempts = 2 AND last_error LIKE '%451%'",
        1,
    )
    .await;
}

/// An SMTP relay that accepts the first message to end at once and holds every later
/// one until `release` is notified; `held` counts the messages it holds.
struct HoldingRelay {
    port: u16,
    held: Arc<std::sync::atomic::AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

impl HoldingRelay {
    async fn start() -> HoldingRelay {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let held = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let accepted = Arc::new(AtomicUsize::new(0));
        let (holding, released) = (held.clone(), release.clone());
        let port = scripted_relay(
            b"250 ok\r\n",
            Arc::new(move || {
                let (holding, released, accepted) =
                    (holding.clone(), released.clone(), accepted.clone());
                Box::pin(async move {
                    if accepted.fetch_add(1, Ordering::SeqCst) > 0 {
                        holding.fetch_add(1, Ordering::SeqCst);
                        released.notified().await;
                    }
                })
            }),
        )
        .await;
        HoldingRelay {
            port,
            held,
            release,
        }
    }
}

/// A mail's outcome is recorded as soon as the relay has it, not when the rest of its
/// round is done: while a later message of the same round hangs at the relay, the
/// earlier one is already `SENT`, so nothing that fails later (the process killed, the
/// database gone, a transaction timed out) can send it again.
#[tokio::test]
async fn each_outcome_is_recorded_while_the_rest_of_its_round_is_in_flight() {
    let relay = HoldingRelay::start().await;
    // The test runs the mailer itself, once both notifications are queued, so both
    // are due in the same round.
    let h = Harness::start_with(relay.port, |mail| mail.enabled = false).await;
    h.publish_all(&[result("alice", true, 100), result("alice", true, 200)])
        .await;
    h.until("SELECT count(*) FROM notifications.notifications", 2)
        .await;
    let pool = shared::db::connect_lazy(
        &DatabaseSettings {
            url: h.database.clone(),
            max_connections: 2,
            migrate: false,
        },
        "notifications",
    )
    .expect("pool");
    let mailer = notification_service::mail::Mailer::new(
        pool,
        MailSettings {
            smtp_port: relay.port,
            // Both in one group, sent at once: the one the relay took is recorded
            // while the other is still in flight.
            concurrency: 2,
            ..MailSettings::default()
        },
    )
    .expect("mailer");
    let round = tokio::spawn(async move { mailer.send_due().await });
    shared::testing::eventually(
        Duration::from_secs(30),
        "the relay holds the round's second message",
        async || (relay.held.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(()),
    )
    .await;
    assert_eq!(
        h.count("SELECT count(*) FROM notifications.notifications WHERE status = 'SENT'")
            .await,
        1,
        "the first message's outcome waits for the round"
    );
    relay.release.notify_one();
    let handled = tokio::time::timeout(Duration::from_secs(30), round)
        .await
        .expect("the round ends")
        .expect("joined")
        .expect("the round");
    assert_eq!(handled, 2);
    assert_eq!(
        h.count("SELECT count(*) FROM notifications.notifications WHERE status = 'SENT'")
            .await,
        2
    );
}
