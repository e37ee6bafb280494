//! The outbox relay against the real broker: nothing committed is lost, a new event
//! leaves at once, and relays side by side publish each event once.

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use common::spawn;
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
};
use serde_json::{Value, json};
use shared::{
    config::DatabaseSettings,
    kafka::KafkaSettings,
    outbox::{Relay, RelaySettings},
};
use tokio_util::sync::CancellationToken;

fn kafka() -> KafkaSettings {
    KafkaSettings::for_brokers(
        std::env::var("KAFKA_BROKERS")
            .expect("KAFKA_BROKERS names the test broker; run the tests with `cargo xtask test`"),
    )
}

/// The store's topics, created from kafka-setup's own definitions (never ad hoc, or
/// other tests on this broker would find order-topic configured differently).
async fn ensure_order_topic() {
    let topics = kafka_setup::TopicFile::builtin().expect("topics.toml");
    kafka_setup::apply(&kafka(), &topics, kafka_setup::Mode::Apply)
        .await
        .expect("topics applied");
}

fn relay(database: &str, settings: RelaySettings) -> Relay {
    let pool = shared::db::connect_lazy(
        &DatabaseSettings {
            url: database.to_owned(),
            max_connections: 4,
            migrate: false,
        },
        order_service::SCHEMA,
    )
    .expect("pool");
    Relay::new(pool, &kafka(), order_service::OUTBOX_CHANNEL, settings).expect("relay")
}

/// The messages for `orders` (by key), read from the start of order-topic until each
/// key was seen; with `to_the_end`, then on to the end every partition has at that
/// moment, so a duplicate would show too. (The watermarks are taken only once every
/// key arrived: the broker's high watermark can trail writes it already acknowledged.)
async fn published(
    orders: &HashSet<String>,
    within: Duration,
    to_the_end: bool,
) -> Vec<(String, Value, HashMap<String, String>)> {
    let consumer: StreamConsumer = kafka()
        .consumer_config(&format!("outbox-test-{}", uuid::Uuid::new_v4()))
        .create()
        .expect("consumer");
    consumer.subscribe(&["order-topic"]).expect("subscribe");
    let deadline = tokio::time::Instant::now() + within;
    let mut found = Vec::new();
    let mut keys = HashSet::new();
    let mut seen_up_to: HashMap<i32, i64> = HashMap::new();
    let mut ends: Option<HashMap<i32, i64>> = None;
    loop {
        if keys.len() >= orders.len() {
            if !to_the_end {
                break;
            }
            let ends = ends.get_or_insert_with(|| {
                (0..6)
                    .filter_map(|partition| {
                        let (low, high) = consumer
                            .fetch_watermarks("order-topic", partition, Duration::from_secs(10))
                            .expect("watermarks");
                        (high > low).then_some((partition, high))
                    })
                    .collect()
            });
            let read_all = ends
                .iter()
                .all(|(p, high)| seen_up_to.get(p).is_some_and(|seen| seen + 1 >= *high));
            if read_all {
                break;
            }
        }
        let Ok(message) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
            break;
        };
        let message = message.expect("no consumer error");
        let position = seen_up_to.entry(message.partition()).or_insert(-1);
        *position = (*position).max(message.offset());
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        if !orders.contains(&key) {
            continue;
        }
        let payload: Value =
            serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON");
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        keys.insert(key.clone());
        found.push((key, payload, headers));
    }
    found
}

fn book() -> Value {
    json!({"items": [{"sku": "BOOK-1", "quantity": 1, "unitPrice": 999}], "currency": "EUR"})
}

#[tokio::test]
async fn an_event_committed_while_no_relay_ran_is_published_when_one_starts() {
    ensure_order_topic().await;
    let s = spawn().await;
    // The service committed the order and its event; then "crashed" before publishing.
    let order: Value = s
        .post("alice", &book(), None)
        .await
        .json()
        .await
        .expect("json");
    let id = order["id"].as_str().expect("id").to_owned();
    assert_eq!(
        s.count("SELECT count(*) FROM orders.outbox WHERE published_at IS NULL")
            .await,
        1
    );

    let published_now = relay(&s.database, RelaySettings::default())
        .publish_batch()
        .await
        .expect("round");
    assert_eq!(published_now, 1);
    assert_eq!(
        s.count("SELECT count(*) FROM orders.outbox WHERE published_at IS NULL")
            .await,
        0
    );

    let found = published(&HashSet::from([id.clone()]), Duration::from_secs(20), true).await;
    assert_eq!(found.len(), 1, "the event reached order-topic, once");
    let (key, payload, headers) = &found[0];
    assert_eq!(key, &id, "keyed by order id");
    assert_eq!(payload["eventType"], "order-created");
    assert_eq!(payload["orderId"], order["id"]);
    assert_eq!(payload["total"], 999);
    assert_eq!(
        headers.get("event-type").map(String::as_str),
        Some("order-created")
    );
}

#[tokio::test]
async fn a_running_relay_wakes_on_commit_not_on_its_poll() {
    ensure_order_topic().await;
    let s = spawn().await;
    let stop = CancellationToken::new();
    // A minute between polls: only the NOTIFY can make this fast.
    let running = relay(
        &s.database,
        RelaySettings {
            poll_interval_ms: 60_000,
            ..RelaySettings::default()
        },
    );
    // Order A is waiting when the relay starts: its first round publishes it. Once A is
    // marked published that round is over and the relay waits on its 60 s poll.
    s.post("alice", &book(), None).await;
    let task = tokio::spawn(running.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while s
        .count("SELECT count(*) FROM orders.outbox WHERE published_at IS NULL")
        .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first round publishes A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Order B: only the NOTIFY its commit sends can get it out before the poll.
    let started = Instant::now();
    let order: Value = s
        .post("alice", &book(), None)
        .await
        .json()
        .await
        .expect("json");
    let id = order["id"].as_str().expect("id").to_owned();
    let found = published(&HashSet::from([id]), Duration::from_secs(20), false).await;
    assert_eq!(found.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "published on NOTIFY, long before the 60 s poll: {:?}",
        started.elapsed()
    );
    stop.cancel();
    task.await.expect("relay stops");
}

#[tokio::test]
async fn relays_side_by_side_publish_every_event_once() {
    ensure_order_topic().await;
    let s = spawn().await;
    let mut ids = HashSet::new();
    for _ in 0..30 {
        let order: Value = s
            .post("alice", &book(), None)
            .await
            .json()
            .await
            .expect("json");
        ids.insert(order["id"].as_str().expect("id").to_owned());
    }
    let small = RelaySettings {
        batch_size: 4,
        ..RelaySettings::default()
    };
    let (a, b) = (relay(&s.database, small.clone()), relay(&s.database, small));
    let drain = |r: Relay| async move {
        let mut total = 0;
        loop {
            match r.publish_batch().await.expect("round") {
                0 => return total,
                n => total += n,
            }
        }
    };
    let (from_a, from_b) = tokio::join!(drain(a), drain(b));
    assert_eq!(from_a + from_b, 30, "between them, every row once");
    assert_eq!(
        s.count("SELECT count(*) FROM orders.outbox WHERE published_at IS NULL")
            .await,
        0
    );

    let found = published(&ids, Duration::from_secs(30), true).await;
    let mut per_event: HashMap<String, usize> = HashMap::new();
    for (_, payload, _) in &found {
        *per_event
            .entry(payload["eventId"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_event.len(), 30, "every order's event arrived");
    assert!(
        per_event.values().all(|n| *n == 1),
        "none twice: {per_event:?}"
    );
}
