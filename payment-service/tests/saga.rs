//! The order/payment saga end to end over the real broker and PostgreSQL: confirmed and
//! declined orders, duplicates, crashes, restarts, concurrency and poison events.

mod common;

use std::{collections::HashSet, time::Duration};

use common::Saga;
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
};
use serde_json::{Value, json};
use sqlx::Connection;

#[tokio::test]
async fn a_funded_order_is_confirmed_and_debited() {
    let saga = Saga::start().await;
    saga.deposit("alice", 5_000, "EUR").await;
    let id = saga.order("alice", 2_500, "EUR").await;
    let order = saga.settled("alice", &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert!(order.get("rejectionReason").is_none());
    assert_eq!(saga.balance("alice").await, 2_500);

    let payments: Value = saga
        .client
        .get(format!("{}/payments?orderId={id}", saga.payments_base()))
        .bearer_auth(saga.token("alice"))
        .send()
        .await
        .expect("payments")
        .json()
        .await
        .expect("json");
    let items = payments["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{payments}");
    assert_eq!(items[0]["status"], "VALIDATED");
    assert_eq!(items[0]["amount"], 2_500);
    assert_eq!(items[0]["orderId"], id.as_str());
    // Another customer does not see it.
    let theirs: Value = saga
        .client
        .get(format!("{}/payments?orderId={id}", saga.payments_base()))
        .bearer_auth(saga.token("bob"))
        .send()
        .await
        .expect("payments")
        .json()
        .await
        .expect("json");
    assert_eq!(theirs["items"], json!([]));
}

#[tokio::test]
async fn orders_beyond_the_balance_or_in_another_currency_are_rejected_with_the_reason() {
    let saga = Saga::start().await;
    saga.deposit("alice", 1_000, "EUR").await;
    let too_much = saga.order("alice", 2_500, "EUR").await;
    let wrong_currency = saga.order("alice", 100, "USD").await;
    let no_account = saga.order("bob", 100, "EUR").await;

    let order = saga.settled("alice", &too_much).await;
    assert_eq!(order["status"], "REJECTED");
    let reason = order["rejectionReason"].as_str().expect("a reason");
    assert!(reason.starts_with("insufficient funds"), "{reason}");

    let order = saga.settled("alice", &wrong_currency).await;
    assert_eq!(order["status"], "REJECTED");
    let reason = order["rejectionReason"].as_str().expect("a reason");
    assert!(reason.starts_with("currency mismatch"), "{reason}");

    let order = saga.settled("bob", &no_account).await;
    assert_eq!(order["status"], "REJECTED");

    assert_eq!(saga.balance("alice").await, 1_000, "nothing was debited");
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.payments WHERE status = 'DECLINED' AND reason IS NOT NULL")
            .await,
        3
    );
}

#[tokio::test]
async fn the_same_event_delivered_again_debits_once() {
    let saga = Saga::start().await;
    saga.deposit("alice", 10_000, "EUR").await;
    let id = saga.order("alice", 3_000, "EUR").await;
    assert_eq!(saga.settled("alice", &id).await["status"], "CONFIRMED");

    // Redeliver the very event twice, then a second order-created for the same order
    // under a new eventId; all with the order's key, so on its partition, in order.
    let event: Value = {
        let mut db = sqlx::PgConnection::connect(&saga.database)
            .await
            .expect("connect");
        sqlx::query_scalar("SELECT payload FROM orders.outbox WHERE key = $1")
            .bind(&id)
            .fetch_one(&mut db)
            .await
            .expect("the order's event")
    };
    let bytes = event.to_string();
    for _ in 0..2 {
        saga.produce(
            &saga.topics.orders,
            &id,
            bytes.as_bytes(),
            "order-created",
            None,
        )
        .await;
    }
    let mut again = event.clone();
    let second = uuid::Uuid::new_v4();
    again["eventId"] = json!(second);
    saga.produce(
        &saga.topics.orders,
        &id,
        again.to_string().as_bytes(),
        "order-created",
        None,
    )
    .await;
    // The last of the three claimed its id: the two before it were consumed too.
    saga.count_reaches(
        &format!("SELECT count(*) FROM payments.processed_events WHERE event_id = '{second}'"),
        1,
    )
    .await;

    assert_eq!(saga.balance("alice").await, 7_000, "debited once");
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.payments").await,
        1
    );
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.outbox").await,
        1,
        "one result event"
    );
    assert_eq!(saga.get_order("alice", &id).await["status"], "CONFIRMED");
}

#[tokio::test]
async fn a_result_written_but_not_published_before_a_crash_is_published_after() {
    let mut saga = Saga::start().await;
    // This instance records payments but its relay is off: as if it crashed between
    // its commit and the publish.
    saga.payments.take().expect("running").stop().await;
    saga.payments = Some(saga.start_payments(false).await);
    saga.deposit("alice", 5_000, "EUR").await;
    let id = saga.order("alice", 1_000, "EUR").await;
    saga.count_reaches(
        "SELECT count(*) FROM payments.outbox WHERE published_at IS NULL",
        1,
    )
    .await;
    saga.payments.take().expect("running").crash().await;
    assert_eq!(saga.get_order("alice", &id).await["status"], "PENDING");

    saga.payments = Some(saga.start_payments(true).await);
    assert_eq!(saga.settled("alice", &id).await["status"], "CONFIRMED");
    assert_eq!(saga.balance("alice").await, 4_000);
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.payments").await,
        1
    );
}

#[tokio::test]
async fn a_consumer_crashed_mid_stream_neither_loses_nor_repeats_an_effect() {
    let mut saga = Saga::start().await;
    saga.deposit("alice", 1_000_000, "EUR").await;
    saga.deposit("bob", 1_000_000, "EUR").await;
    saga.payments.take().expect("running").stop().await;
    // A stream waiting on the topic: bob's orders first, then alice's.
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(("bob", saga.order("bob", 100 + i, "EUR").await));
    }
    for i in 0..30 {
        ids.push(("alice", saga.order("alice", 200 + i, "EUR").await));
    }
    saga.count_reaches(
        "SELECT count(*) FROM orders.outbox WHERE published_at IS NOT NULL",
        40,
    )
    .await;

    // Hold alice's account so the consumer stops inside a round, one event per round.
    let mut holder = sqlx::PgConnection::connect(&saga.database)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    sqlx::query("SELECT 1 FROM payments.accounts WHERE user_id = 'alice' FOR UPDATE")
        .execute(&mut holder)
        .await
        .expect("lock");
    let payments = saga.start_payments_with(&saga.database, true, 1).await;
    saga.count_reaches(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%FROM accounts%FOR UPDATE%'",
        1,
    )
    .await;
    let done_before = saga.count("SELECT count(*) FROM payments.payments").await;
    payments.crash().await;
    sqlx::query("COMMIT")
        .execute(&mut holder)
        .await
        .expect("release");

    saga.payments = Some(saga.start_payments(true).await);
    for (user, id) in &ids {
        assert_eq!(saga.settled(user, id).await["status"], "CONFIRMED");
    }
    let bob: i64 = (0..10).map(|i| 100 + i).sum();
    let alice: i64 = (0..30).map(|i| 200 + i).sum();
    assert_eq!(saga.balance("bob").await, 1_000_000 - bob);
    assert_eq!(saga.balance("alice").await, 1_000_000 - alice);
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.payments").await,
        40
    );
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.outbox").await,
        40,
        "one result per order"
    );
    assert!(
        done_before < 40,
        "the crash came mid-stream ({done_before} done)"
    );
}

#[tokio::test]
async fn fifty_concurrent_orders_validate_exactly_the_affordable_ones() {
    let saga = Saga::start().await;
    // A second instance in the same group: two consumers debit one account at once.
    let _second = saga.start_payments(true).await;
    saga.deposit("alice", 10_000, "EUR").await;
    let orders = futures::future::join_all((0..50).map(|_| saga.order("alice", 300, "EUR"))).await;
    let mut confirmed = 0;
    for id in &orders {
        let order = saga.settled("alice", id).await;
        match order["status"].as_str() {
            Some("CONFIRMED") => confirmed += 1,
            Some("REJECTED") => assert!(
                order["rejectionReason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("insufficient funds")),
                "{order}"
            ),
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(confirmed, 33, "10,000 affords exactly 33 orders of 300");
    assert_eq!(saga.balance("alice").await, 100);
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.payments WHERE status = 'VALIDATED'")
            .await,
        33
    );
}

/// Reads `topic` from the start until `n` messages arrived.
async fn read(topic: &str, n: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: StreamConsumer = common::kafka()
        .consumer_config(&format!("dlt-reader-{}", uuid::Uuid::new_v4()))
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while found.len() < n {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages on {topic}", found.len()))
            .expect("message");
        found.push(message.detach());
    }
    found
}

fn header(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    raw_header(message, name).map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn raw_header(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<Vec<u8>> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value.map(<[u8]>::to_vec))
}

/// A header as Spring Kafka's `ByteBuffer.wrap(value).getInt()` reads it.
fn int_header(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<i32> {
    let bytes: [u8; 4] = raw_header(message, name)?.try_into().ok()?;
    Some(i32::from_be_bytes(bytes))
}

/// A header as Spring Kafka's `ByteBuffer.wrap(value).getLong()` reads it.
fn long_header(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<i64> {
    let bytes: [u8; 8] = raw_header(message, name)?.try_into().ok()?;
    Some(i64::from_be_bytes(bytes))
}

#[tokio::test]
async fn poison_events_go_to_the_dead_letter_topic_and_later_events_proceed() {
    let saga = Saga::start().await;
    saga.deposit("alice", 5_000, "EUR").await;
    // A poison on every partition, ahead of the order placed next, wherever it lands:
    // three not JSON at all, three well-formed but with a total no one can pay.
    for partition in 0..6 {
        let payload = if partition < 3 {
            b"{not json".to_vec()
        } else {
            json!({
                "eventId": uuid::Uuid::new_v4(), "eventType": "order-created",
                "occurredAt": "2026-01-01T00:00:00Z", "orderId": uuid::Uuid::new_v4(),
                "userId": "alice", "items": [], "total": -5, "currency": "EUR"
            })
            .to_string()
            .into_bytes()
        };
        saga.produce(
            &saga.topics.orders,
            &format!("poison-{partition}"),
            &payload,
            "order-created",
            Some(partition),
        )
        .await;
    }
    let id = saga.order("alice", 1_000, "EUR").await;
    assert_eq!(saga.settled("alice", &id).await["status"], "CONFIRMED");

    let dead = read(&format!("{}.DLT", saga.topics.orders), 6).await;
    let keys: HashSet<_> = dead
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(keys.len(), 6, "each poison once: {keys:?}");
    for message in &dead {
        let error = header(message, "kafka_dlt-exception-message").expect("the error");
        assert!(
            error.contains("not a valid event") || error.contains("total must be positive"),
            "{error}"
        );
        assert_eq!(
            header(message, "kafka_dlt-original-topic").as_deref(),
            Some(saga.topics.orders.as_str())
        );
        // Spring Kafka's binary encodings: the original partition a 4-byte int, the
        // offset and timestamp 8-byte longs, all big-endian.
        let partition = int_header(message, "kafka_dlt-original-partition")
            .expect("the original partition as a 4-byte int");
        assert!((0..6).contains(&partition), "partition {partition}");
        let offset = long_header(message, "kafka_dlt-original-offset")
            .expect("the original offset as an 8-byte long");
        assert!(offset >= 0, "offset {offset}");
        let timestamp = long_header(message, "kafka_dlt-original-timestamp")
            .expect("the original timestamp as an 8-byte long");
        assert!(timestamp > 1_700_000_000_000, "timestamp {timestamp}");
        assert_eq!(
            header(message, "kafka_dlt-original-timestamp-type").as_deref(),
            Some("CreateTime")
        );
        let class = header(message, "kafka_dlt-exception-fqcn").expect("the class");
        let stack = header(message, "kafka_dlt-exception-stacktrace").expect("the trace");
        assert!(stack.starts_with(&class), "{stack}");
        if error.contains("not a valid event") {
            assert_eq!(class, "shared.consumer.UnreadableEvent");
        }
        assert_eq!(
            header(message, "event-type").as_deref(),
            Some("order-created")
        );
    }
    assert_eq!(saga.balance("alice").await, 4_000);
}

#[tokio::test]
async fn a_result_for_an_unknown_order_is_dead_lettered_by_order_service() {
    let saga = Saga::start().await;
    let stranger = uuid::Uuid::new_v4();
    let result = json!({
        "eventId": uuid::Uuid::new_v4(), "eventType": "payment-validated",
        "occurredAt": "2026-01-01T00:00:00Z", "orderId": stranger,
        "userId": "alice", "amount": 100, "currency": "EUR"
    });
    saga.produce(
        &saga.topics.payment_results,
        &stranger.to_string(),
        result.to_string().as_bytes(),
        "payment-validated",
        None,
    )
    .await;
    let dead = read(&format!("{}.DLT", saga.topics.payment_results), 1).await;
    let error = header(&dead[0], "kafka_dlt-exception-message").expect("the error");
    assert!(error.contains("no order"), "{error}");
    assert!(
        header(&dead[0], "kafka_dlt-original-consumer-group")
            .is_some_and(|g| g.starts_with("order-service"))
    );
}

#[tokio::test]
async fn a_result_for_another_amount_than_the_order_is_dead_lettered_and_changes_nothing() {
    let mut saga = Saga::start().await;
    // Without payment-service the order stays PENDING for the crafted result.
    if let Some(payments) = saga.payments.take() {
        payments.stop().await;
    }
    let order = saga.order("alice", 1_000, "EUR").await;
    for (amount, currency) in [(1, "EUR"), (1_000, "USD")] {
        let result = json!({
            "eventId": uuid::Uuid::new_v4(), "eventType": "payment-validated",
            "occurredAt": "2026-01-01T00:00:00Z", "orderId": order,
            "userId": "alice", "amount": amount, "currency": currency
        });
        saga.produce(
            &saga.topics.payment_results,
            &order,
            result.to_string().as_bytes(),
            "payment-validated",
            None,
        )
        .await;
    }
    let dead = read(&format!("{}.DLT", saga.topics.payment_results), 2).await;
    for message in &dead {
        let error = header(message, "kafka_dlt-exception-message").expect("the error");
        assert!(error.contains("differs from order"), "{error}");
    }
    assert_eq!(saga.get_order("alice", &order).await["status"], "PENDING");
}

/// The value of the first sample of `name` whose labels contain `labels`.
fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && l.contains(labels)
        })
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[tokio::test]
async fn events_wait_out_a_database_outage_and_none_is_skipped() {
    let mut saga = Saga::start().await;
    let proxy = common::proxy::Proxy::start(common::proxy::upstream_of(&saga.database)).await;
    saga.payments.take().expect("running").stop().await;
    saga.payments = Some(
        saga.start_payments_on(&proxy.url_for(&saga.database), true)
            .await,
    );
    saga.deposit("alice", 10_000, "EUR").await;

    proxy.cut();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(saga.order("alice", 1_000, "EUR").await);
    }
    // payment-service is retrying those events against a database it cannot reach.
    let group = format!("group=\"payment-service-{}\"", saga.tag);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sample(
        &saga.payment_metrics().await,
        "consumer_retries_total",
        &group,
    )
    .unwrap_or(0.0)
        < 2.0
    {
        assert!(tokio::time::Instant::now() < deadline, "no retries seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &ids {
        assert_eq!(saga.get_order("alice", id).await["status"], "PENDING");
    }

    proxy.restore();
    for id in &ids {
        assert_eq!(saga.settled("alice", id).await["status"], "CONFIRMED");
    }
    assert_eq!(saga.balance("alice").await, 5_000);
    assert_eq!(
        saga.count("SELECT count(*) FROM payments.payments").await,
        5
    );
}

#[tokio::test]
async fn a_graceful_stop_commits_the_offsets_of_everything_applied() {
    let mut saga = Saga::start().await;
    saga.deposit("alice", 10_000, "EUR").await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(saga.order("alice", 100, "EUR").await);
    }
    for id in &ids {
        assert_eq!(saga.settled("alice", id).await["status"], "CONFIRMED");
    }
    saga.payments.take().expect("running").stop().await;

    // The group's committed positions add up to every event on the topic.
    let consumer: rdkafka::consumer::BaseConsumer = common::kafka()
        .consumer_config(&format!("payment-service-{}", saga.tag))
        .create()
        .expect("consumer");
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..6 {
        partitions.add_partition(&saga.topics.orders, p);
    }
    let committed = consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .expect("committed offsets");
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(n) => n,
            _ => 0,
        })
        .sum();
    assert_eq!(total, 6, "{committed:?}");
}

#[tokio::test]
async fn the_services_export_saga_metrics() {
    let saga = Saga::start().await;
    saga.deposit("alice", 1_000, "EUR").await;
    let ok = saga.order("alice", 600, "EUR").await;
    let too_much = saga.order("alice", 600, "EUR").await;
    saga.settled("alice", &ok).await;
    saga.settled("alice", &too_much).await;
    saga.produce(
        &saga.topics.orders,
        "poison",
        b"nope",
        "order-created",
        None,
    )
    .await;
    let group = format!("group=\"payment-service-{}\"", saga.tag);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = saga.payment_metrics().await;
        if sample(&metrics, "consumer_dead_lettered_total", &group).is_some()
            && sample(&metrics, "kafka_consumer_lag", &group).is_some()
        {
            break metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics incomplete:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        sample(
            &metrics,
            "consumer_events_total",
            &format!("{group},outcome=\"validated\"")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "consumer_events_total",
            &format!("{group},outcome=\"declined\"")
        ),
        Some(1.0)
    );
    assert!(metrics.contains("outbox_published_total"), "{metrics}");

    let orders = saga.metrics(&saga.orders.base).await;
    assert!(orders.contains("orders_created_total"), "{orders}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let orders = saga.metrics(&saga.orders.base).await;
        if sample(&orders, "orders", "status=\"CONFIRMED\"") == Some(1.0)
            && sample(&orders, "orders", "status=\"REJECTED\"") == Some(1.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no orders-by-status gauge:\n{orders}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn applied_event_ids_are_forgotten_after_the_retention() {
    let saga = Saga::start().await;
    let mut db = sqlx::PgConnection::connect(&saga.database)
        .await
        .expect("connect");
    let (old, recent) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    sqlx::query(
        "INSERT INTO payments.processed_events (event_id, processed_at) \
         VALUES ($1, now() - interval '8 days'), ($2, now() - interval '6 days')",
    )
    .bind(old)
    .bind(recent)
    .execute(&mut db)
    .await
    .expect("insert");
    let pool = shared::db::connect_lazy(
        &shared::config::DatabaseSettings {
            url: saga.database.clone(),
            max_connections: 1,
            migrate: false,
        },
        payment_service::SCHEMA,
    )
    .expect("pool");
    // (The running service may forget it first: it also does this at start-up.)
    shared::consumer::forget_processed(&pool, Duration::from_secs(7 * 24 * 3600))
        .await
        .expect("delete");
    let left: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM payments.processed_events")
            .fetch_all(&mut db)
            .await
            .expect("select");
    assert!(left.contains(&recent) && !left.contains(&old), "{left:?}");
}

/// Two deposits with one `Idempotency-Key` for different accounts, at the same time:
/// the second waits for the first and is told the key is taken (422), never a 500.
/// The first is played by a transaction of the test's own, holding its deposit
/// uncommitted while the second arrives, so the race is the same on every run.
#[tokio::test]
async fn a_key_used_by_a_concurrent_deposit_elsewhere_is_refused_not_failed() {
    let saga = Saga::start().await;
    saga.deposit("bob", 100, "EUR").await;
    let mut first = sqlx::PgConnection::connect(&saga.database)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut first)
        .await
        .expect("begin");
    sqlx::query(
        "INSERT INTO payments.deposits (id, user_id, amount, currency, made_by, idempotency_key) \
         VALUES (gen_random_uuid(), 'bob', 500, 'EUR', 'admin', 'key-1')",
    )
    .execute(&mut first)
    .await
    .expect("the first deposit, uncommitted");

    let second = {
        let (client, url, token) = (
            saga.client.clone(),
            format!("{}/payments/accounts/alice/deposits", saga.payments_base()),
            saga.admin_token(),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", "key-1")
                .json(&json!({"amount": 700, "currency": "EUR"}))
                .send()
                .await
                .expect("an answer")
        })
    };
    // The second deposit is inside its transaction, waiting on the first's key.
    shared::testing::eventually(
        Duration::from_secs(30),
        "the second deposit waits on the first's key",
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO deposits%'",
            )
            .fetch_one(&mut sqlx::PgConnection::connect(&saga.database).await.ok()?)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        },
    )
    .await;
    sqlx::query("COMMIT")
        .execute(&mut first)
        .await
        .expect("commit");

    let answer = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("answered")
        .expect("joined");
    assert_eq!(answer.status(), 422);
    let problem: Value = answer.json().await.expect("problem");
    assert_eq!(
        problem["type"], "/problems/idempotency-key-reused",
        "{problem}"
    );
    let alices: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments.deposits WHERE user_id = 'alice'")
            .fetch_one(&mut first)
            .await
            .expect("count");
    assert_eq!(alices, 0, "nothing deposited for alice");
}
