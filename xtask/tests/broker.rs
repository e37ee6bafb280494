//! The broker xtask starts: with `--durable`'s SQLite storage, topics and messages
//! survive a restart of the broker; and the default storage serves a consumer that
//! resumes in the middle of a producer's batch.

use std::time::Duration;

use rdkafka::{
    Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use shared::kafka::KafkaSettings;
use xtask::{
    broker::{Broker, Storage},
    procs::Interrupt,
};

async fn start(storage: Storage, log: std::path::PathBuf) -> Broker {
    tokio::task::spawn_blocking(move || {
        let interrupt = Interrupt::install().expect("signal handlers");
        Broker::start(storage, &log, &interrupt)
    })
    .await
    .expect("join")
    .expect("broker starts")
}

#[tokio::test]
async fn a_durable_broker_keeps_topics_and_messages_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Storage::Sqlite(dir.path().join("tansu.db"));
    let topic = format!("durable-{}", uuid_like());

    let first = start(storage.clone(), dir.path().join("first.log")).await;
    let settings = KafkaSettings::for_brokers(first.brokers());
    let admin: AdminClient<DefaultClientContext> = settings.admin_config().create().expect("admin");
    for result in admin
        .create_topics(
            [&NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create")
    {
        result.expect("created");
    }
    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("kept"),
            Duration::from_secs(10),
        )
        .await
        .expect("acknowledged");
    drop(producer);
    drop(admin);
    drop(first);

    // A new broker process on the same file, on another port.
    let second = start(storage, dir.path().join("second.log")).await;
    let consumer: StreamConsumer = KafkaSettings::for_brokers(second.brokers())
        .consumer_config("durable-check")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("the message is still there")
        .expect("no consumer error");
    assert_eq!(message.payload(), Some(&b"kept"[..]));
}

/// What a restarted consumer needs: an offset committed in the middle of a batch the
/// producer sent must fetch the rest of that batch, and the high watermark must count
/// records. (tansu's `memory://` engine fails both; see `xtask::broker`.)
#[tokio::test]
async fn a_consumer_can_resume_in_the_middle_of_a_batch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(Storage::Throwaway, dir.path().join("tansu.log")).await;
    let settings = KafkaSettings::for_brokers(broker.brokers());
    let topic = format!("batch-{}", uuid_like());
    let admin: AdminClient<DefaultClientContext> = settings.admin_config().create().expect("admin");
    for result in admin
        .create_topics(
            [&NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create")
    {
        result.expect("created");
    }
    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    // Sent together, so the producer packs them into one batch.
    let sends = (0..5).map(|i| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key("k").payload(&format!("m{i}")),
                    Duration::from_secs(10),
                )
                .await
                .expect("acknowledged")
        }
    });
    futures::future::join_all(sends).await;

    let consumer: BaseConsumer = settings
        .consumer_config("mid-batch")
        .create()
        .expect("consumer");
    let (_, high) = consumer
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    assert_eq!(high, 5, "the high watermark counts records");
    let mut from = TopicPartitionList::new();
    from.add_partition_offset(&topic, 0, Offset::Offset(3))
        .expect("offset");
    consumer.assign(&from).expect("assign");
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "fetching from offset 3 returned only {got:?}"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("no consumer error");
            got.push((message.offset(), message.payload().map(<[u8]>::to_vec)));
        }
    }
    assert_eq!(got, [(3, Some(b"m3".to_vec())), (4, Some(b"m4".to_vec()))]);
}

fn uuid_like() -> String {
    xtask::random_token(12).to_lowercase()
}
