//! The broker xtask starts: with `--durable`'s SQLite storage, topics and messages
//! survive a restart of the broker.

use std::time::Duration;

use rdkafka::{
    Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
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

fn uuid_like() -> String {
    xtask::random_token(12).to_lowercase()
}
