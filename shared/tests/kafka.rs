//! Against the real broker `cargo xtask test` provides: a consumer group resumes
//! exactly where its last commit left it, with the client settings every service uses.

use std::time::Duration;

use rdkafka::{
    Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{CommitMode, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use shared::kafka::KafkaSettings;

fn settings() -> KafkaSettings {
    let brokers = std::env::var("KAFKA_BROKERS")
        .expect("KAFKA_BROKERS names the test broker; run the tests with `cargo xtask test`");
    KafkaSettings::for_brokers(brokers)
}

async fn create_topic(settings: &KafkaSettings, partitions: i32) -> String {
    let topic = format!("test-{}", uuid::Uuid::new_v4());
    let admin: AdminClient<DefaultClientContext> =
        settings.admin_config().create().expect("admin client");
    let results = admin
        .create_topics(
            [&NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic");
    for result in results {
        result.expect("topic created");
    }
    topic
}

async fn next_value(consumer: &StreamConsumer) -> String {
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30s")
        .expect("no consumer error");
    String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned()
}

#[tokio::test]
async fn a_restarted_consumer_resumes_from_its_committed_offset() {
    let settings = settings();
    let topic = create_topic(&settings, 1).await;
    let group = format!("group-{}", uuid::Uuid::new_v4());

    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    for i in 0..10 {
        let value = format!("event-{i}");
        producer
            .send(
                FutureRecord::to(&topic).key("order-1").payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("broker acknowledged");
    }

    // First consumer: handle four events, committing each one after "handling" it.
    {
        let consumer: StreamConsumer = settings.consumer_config(&group).create().expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        for i in 0..4 {
            let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .expect("a message within 30s")
                .expect("no consumer error");
            assert_eq!(message.payload(), Some(format!("event-{i}").as_bytes()));
            consumer
                .commit_message(&message, CommitMode::Sync)
                .expect("commit");
        }
        // Read a fifth without committing it: it must be delivered again.
        assert_eq!(next_value(&consumer).await, "event-4");
        consumer.unsubscribe();
    }

    // Second consumer, same group: starts at the first uncommitted event.
    let consumer: StreamConsumer = settings.consumer_config(&group).create().expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut seen = Vec::new();
    for _ in 4..10 {
        seen.push(next_value(&consumer).await);
    }
    let expected: Vec<String> = (4..10).map(|i| format!("event-{i}")).collect();
    assert_eq!(seen, expected, "nothing re-read, nothing skipped");
}
