//! The event consumer in a consumer group that rebalances, on the real broker and the
//! real database `cargo xtask test` provides, watched through Kafka's own group APIs
//! (committed offsets as the group coordinator answers them, the group's members):
//! a member commits what it applied when its partitions are revoked, and a member that
//! stops after losing partitions never moves their committed offsets backwards.

#![cfg(feature = "postgres")]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use rdkafka::{
    Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
};
use shared::{
    consumer::{ConsumerLoopSettings, EventConsumer, Failure, Handler, Incoming},
    kafka::KafkaSettings,
    testing::eventually,
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 4;

fn settings() -> KafkaSettings {
    let brokers = std::env::var("KAFKA_BROKERS")
        .expect("KAFKA_BROKERS names the test broker; run the tests with `cargo xtask test`");
    KafkaSettings::for_brokers(brokers)
}

/// Records every event it applies; counts repeated deliveries of one event.
#[derive(Debug)]
struct Recorder;

impl Handler for Recorder {
    type Event = String;

    fn parse(&self, message: &Incoming) -> Result<String, String> {
        message
            .payload
            .as_deref()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .ok_or_else(|| "no payload".to_owned())
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &String,
        _message: &Incoming,
    ) -> Result<&'static str, Failure> {
        sqlx::query(
            "INSERT INTO applied (event_id) VALUES ($1) \
             ON CONFLICT (event_id) DO UPDATE SET deliveries = applied.deliveries + 1",
        )
        .bind(event)
        .execute(tx)
        .await?;
        Ok("applied")
    }
}

async fn database() -> PgPool {
    let url = shared::testing::fresh_database().await;
    let pool = PgPool::connect(&url).await.expect("connect");
    sqlx::raw_sql(
        "CREATE TABLE applied (event_id text PRIMARY KEY, deliveries int NOT NULL DEFAULT 1)",
    )
    .execute(&pool)
    .await
    .expect("create table");
    pool
}

async fn applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM applied")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Publishes events `from..to`, spread over every partition by key.
async fn produce(producer: &FutureProducer, topic: &str, from: usize, to: usize) {
    let sends = (from..to).map(|i| {
        let key = format!("order-{}", i % 16);
        let payload = format!("event-{i}");
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .expect("acknowledged")
        }
    });
    futures::future::join_all(sends).await;
}

/// The group as the broker describes it, and its committed offsets, read by a client
/// that never joins the group.
struct GroupView {
    client: BaseConsumer,
    group: String,
    topic: String,
}

impl GroupView {
    fn new(settings: &KafkaSettings, group: &str, topic: &str) -> Self {
        let client: BaseConsumer = settings
            .consumer_config(group)
            .create()
            .expect("a group-less client");
        Self {
            client,
            group: group.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// Committed offset per partition (absent: nothing committed yet).
    fn committed(&self) -> BTreeMap<i32, i64> {
        let mut list = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            list.add_partition(&self.topic, p);
        }
        let committed = self
            .client
            .committed_offsets(list, Duration::from_secs(10))
            .expect("the coordinator answers an offset fetch");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }

    /// The end of each partition.
    fn ends(&self) -> BTreeMap<i32, i64> {
        (0..PARTITIONS)
            .map(|p| {
                let (_, high) = self
                    .client
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, high)
            })
            .collect()
    }

    /// How many members the group has, as DescribeGroups says.
    fn members(&self) -> usize {
        let list = self
            .client
            .fetch_group_list(Some(&self.group), Duration::from_secs(10))
            .expect("the coordinator describes the group");
        list.groups()
            .iter()
            .find(|g| g.name() == self.group)
            .map(|g| g.members().len())
            .unwrap_or(0)
    }
}

/// Samples the committed offsets every few milliseconds and remembers every time one
/// moved backwards.
fn watch_for_backwards(view: Arc<GroupView>, stop: CancellationToken) -> Arc<Mutex<Vec<String>>> {
    let backwards = Arc::new(Mutex::new(Vec::new()));
    let seen = backwards.clone();
    tokio::task::spawn_blocking(move || {
        let mut highest: BTreeMap<i32, i64> = BTreeMap::new();
        while !stop.is_cancelled() {
            for (partition, offset) in view.committed() {
                let high = highest.entry(partition).or_insert(offset);
                if offset < *high {
                    seen.lock()
                        .expect("lock")
                        .push(format!("partition {partition}: {high} -> {offset}"));
                }
                *high = (*high).max(offset);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    backwards
}

fn member(
    settings: &KafkaSettings,
    group: &str,
    topic: &str,
    pool: &PgPool,
    commit_interval_ms: u64,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let loop_settings = ConsumerLoopSettings {
        group: group.to_owned(),
        commit_interval_ms,
        statistics_interval_ms: 0,
        dedup_retention_hours: 0,
        ..ConsumerLoopSettings::default()
    };
    let consumer = EventConsumer::new(
        settings,
        loop_settings,
        group,
        topic,
        pool.clone(),
        Recorder,
    )
    .expect("consumer");
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_are_committed_and_a_stopping_member_never_moves_offsets_back() {
    let settings = settings();
    let topic = format!("rebalance-{}", uuid::Uuid::new_v4());
    let group = format!("group-{}", uuid::Uuid::new_v4());
    let admin: AdminClient<DefaultClientContext> = settings.admin_config().create().expect("admin");
    for result in admin
        .create_topics(
            [&NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create")
    {
        result.expect("created");
    }
    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    let pool = database().await;
    let view = Arc::new(GroupView::new(&settings, &group, &topic));
    let stop_watching = CancellationToken::new();
    let backwards = watch_for_backwards(view.clone(), stop_watching.clone());

    // Member A never commits on its own schedule (an hour): whatever the group has
    // committed for A's partitions, A committed at a revocation or at its stop.
    produce(&producer, &topic, 0, 200).await;
    let (stop_a, task_a) = member(&settings, &group, &topic, &pool, 3_600_000);
    eventually(
        Duration::from_secs(60),
        "A applies the first 200",
        async || (applied(&pool).await == 200).then_some(()),
    )
    .await;
    assert!(
        view.committed().is_empty(),
        "A has not committed yet: {:?}",
        view.committed()
    );

    // B joins: the rebalance revokes A's partitions, and A commits what it applied
    // from them before anyone else reads them.
    let (stop_b, task_b) = member(&settings, &group, &topic, &pool, 200);
    let ends = view.ends();
    eventually(Duration::from_secs(60), "two members", async || {
        (view.members() == 2).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "every partition committed at its end after the rebalance",
        async || (view.committed() == ends).then_some(()),
    )
    .await;

    // Both members work on; B commits its partitions further.
    produce(&producer, &topic, 200, 400).await;
    eventually(
        Duration::from_secs(60),
        "the next 200 applied",
        async || (applied(&pool).await == 400).then_some(()),
    )
    .await;
    let ends = view.ends();
    let b_progress = eventually(
        Duration::from_secs(30),
        "B commits its partitions at their ends",
        async || {
            let committed = view.committed();
            let at_end: Vec<i32> = committed
                .iter()
                .filter(|(p, o)| ends.get(p) == Some(o))
                .map(|(p, _)| *p)
                .collect();
            (!at_end.is_empty()).then_some(committed)
        },
    )
    .await;

    // A stops: it commits its own partitions, and nothing of B's.
    stop_a.cancel();
    task_a.await.expect("A stops cleanly");
    let after_a = view.committed();
    for (partition, offset) in &b_progress {
        assert!(
            after_a.get(partition).is_some_and(|o| o >= offset),
            "partition {partition} was at {offset} before A stopped, {:?} after",
            after_a.get(partition)
        );
    }
    eventually(
        Duration::from_secs(60),
        "B alone in the group",
        async || (view.members() == 1).then_some(()),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "every partition committed at its end after A left",
        async || (view.committed() == ends).then_some(()),
    )
    .await;

    // B now owns everything and keeps going from where the group was.
    produce(&producer, &topic, 400, 500).await;
    let ends = view.ends();
    eventually(Duration::from_secs(60), "all 500 applied", async || {
        (applied(&pool).await == 500).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "B commits the last ones",
        async || (view.committed() == ends).then_some(()),
    )
    .await;
    stop_b.cancel();
    task_b.await.expect("B stops cleanly");
    stop_watching.cancel();
    let backwards = backwards.lock().expect("lock").clone();
    assert!(
        backwards.is_empty(),
        "committed offsets moved backwards: {backwards:?}"
    );
}
