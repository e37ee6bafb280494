//! The Apache Kafka clusters xtask runs: a durable one keeps topics, messages and
//! committed offsets across a restart; three nodes replicate as production does and
//! keep taking `acks=all` writes with one node dead; a node comes back on its own
//! ports and data; and Debian's kcat, a client nobody here wrote, lists and reads it.

use std::time::Duration;

use kafka_setup::{Mode, TopicFile};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use shared::kafka::KafkaSettings;
use xtask::{
    broker::{Broker, KafkaOptions, Storage},
    procs::Interrupt,
};

/// Starts a cluster from the test's own thread: a child's parent-death signal fires
/// when the *thread* that spawned it ends, so a node started from a pool thread
/// would be killed when that thread idles out.
fn start(options: KafkaOptions) -> Broker {
    let interrupt = Interrupt::install().expect("signal handlers");
    Broker::start(&options, &interrupt).expect("the cluster starts")
}

async fn create_topic(settings: &KafkaSettings, topic: &str, partitions: i32, replicas: i32) {
    let admin: AdminClient<DefaultClientContext> = settings.admin_config().create().expect("admin");
    for result in admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(replicas),
            )],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create")
    {
        result.expect("created");
    }
}

async fn send(producer: &FutureProducer, topic: &str, payload: &str) {
    producer
        .send(
            FutureRecord::to(topic).key("k").payload(payload),
            Duration::from_secs(30),
        )
        .await
        .expect("acknowledged by every in-sync replica");
}

async fn next_payload(consumer: &StreamConsumer) -> String {
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a message within 60s")
        .expect("no consumer error");
    String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned()
}

fn topic_name(prefix: &str) -> String {
    format!("{prefix}-{}", xtask::random_token(12).to_lowercase())
}

#[tokio::test]
async fn a_durable_cluster_keeps_topics_messages_and_offsets_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = KafkaOptions::single(dir.path().join("logs"))
        .with_storage(Storage::Durable(dir.path().join("kafka")));
    let topic = topic_name("durable");

    let first = start(options.clone());
    let settings = KafkaSettings::for_brokers(first.brokers());
    create_topic(&settings, &topic, 1, 1).await;
    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    for payload in ["read-before", "kept"] {
        send(&producer, &topic, payload).await;
    }
    let consumer: StreamConsumer = settings
        .consumer_config("durable-check")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    assert_eq!(next_payload(&consumer).await, "read-before");
    let mut done = TopicPartitionList::new();
    done.add_partition_offset(&topic, 0, Offset::Offset(1))
        .expect("offset");
    consumer
        .commit(&done, CommitMode::Sync)
        .expect("offset committed");
    drop(consumer);
    drop(producer);
    drop(first);

    // A new cluster on the same folder, on other ports: the group resumes after its
    // committed offset, so it reads only the second message.
    let second = start(options);
    let consumer: StreamConsumer = KafkaSettings::for_brokers(second.brokers())
        .consumer_config("durable-check")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    assert_eq!(next_payload(&consumer).await, "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_every_topic_and_survive_losing_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = start(KafkaOptions::single(dir.path()).with_nodes(3));
    assert_eq!(broker.brokers().split(',').count(), 3);
    let settings = KafkaSettings::for_brokers(broker.brokers());

    // kafka-setup with production's settings, then its check, on the real configs.
    let tag = xtask::random_token(8).to_lowercase();
    let topics = TopicFile::builtin()
        .expect("topics.toml")
        .tagged(&tag)
        .with_replication(Some(3), Some(2));
    let created = kafka_setup::apply(&settings, &topics, Mode::Apply)
        .await
        .expect("kafka-setup applies");
    assert!(created.matches(), "{created}");
    let checked = kafka_setup::apply(&settings, &topics, Mode::Check)
        .await
        .expect("kafka-setup checks");
    assert!(
        checked.matches(),
        "--check passes on a fresh cluster:\n{checked}"
    );

    let order_topic = kafka_setup::tagged_name("order-topic", &tag);
    let admin: AdminClient<DefaultClientContext> = settings.admin_config().create().expect("admin");
    let configs = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(&order_topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("describe");
    let config = configs
        .into_iter()
        .next()
        .expect("one resource")
        .expect("described");
    assert_eq!(
        config
            .get("min.insync.replicas")
            .and_then(|e| e.value.as_deref()),
        Some("2")
    );
    let metadata = admin
        .inner()
        .fetch_metadata(Some(&order_topic), Duration::from_secs(30))
        .expect("metadata");
    for partition in metadata.topics()[0].partitions() {
        assert_eq!(
            partition.replicas().len(),
            3,
            "three copies of every partition"
        );
    }

    // One node dies: with two replicas left in sync, acks=all writes still succeed.
    let topic = topic_name("replicated");
    create_topic(&settings, &topic, 1, 3).await;
    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    send(&producer, &topic, "before").await;
    let cluster = broker.cluster_mut().expect("xtask's own cluster");
    cluster.kill(0);
    send(&producer, &topic, "while-one-is-down").await;

    // It comes back on its own ports and data and rejoins the cluster (restarted from
    // the test's thread, which outlives it).
    let interrupt = Interrupt::install().expect("signal handlers");
    tokio::task::block_in_place(|| {
        broker
            .cluster_mut()
            .expect("cluster")
            .restart(0, &interrupt)
    })
    .expect("the node restarts");
    send(&producer, &topic, "after").await;
    let consumer: StreamConsumer = settings
        .consumer_config(&topic_name("reader"))
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    for expected in ["before", "while-one-is-down", "after"] {
        assert_eq!(next_payload(&consumer).await, expected);
    }
}

/// What a restarted consumer needs: an offset committed in the middle of a batch the
/// producer sent must fetch the rest of that batch, and the high watermark must count
/// records.
#[tokio::test]
async fn a_consumer_can_resume_in_the_middle_of_a_batch() {
    let settings = KafkaSettings::for_brokers(suite_brokers());
    let topic = topic_name("batch");
    create_topic(&settings, &topic, 1, 1).await;
    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    // Sent together, so the producer packs them into one batch.
    let sends = (0..5).map(|i| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move { send(&producer, &topic, &format!("m{i}")).await }
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

/// Debian's kcat, a librdkafka client nobody here configured, lists the broker's
/// topics and reads a message back (the README tells users to do exactly this).
#[tokio::test]
async fn debian_kcat_lists_and_reads_the_topics() {
    let brokers = suite_brokers();
    let kcat = std::env::var("STOREFRONT_KCAT")
        .expect("STOREFRONT_KCAT names Debian's kcat; run the tests with `cargo xtask test`");
    let settings = KafkaSettings::for_brokers(&brokers);
    let topic = topic_name("kcat");
    create_topic(&settings, &topic, 1, 1).await;
    let producer: FutureProducer = settings.producer_config().create().expect("producer");
    send(&producer, &topic, "{\"hello\":\"kcat\"}").await;

    let listing = std::process::Command::new(&kcat)
        .args(["-b", &brokers, "-L", "-m", "30"])
        .output()
        .expect("run kcat -L");
    let listed = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.status.success(),
        "kcat -L failed: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    assert!(
        listed.contains(&format!("topic \"{topic}\"")),
        "kcat lists the topic:\n{listed}"
    );

    let read = std::process::Command::new(&kcat)
        .args([
            "-b",
            &brokers,
            "-C",
            "-t",
            &topic,
            "-o",
            "beginning",
            "-c",
            "1",
        ])
        .args(["-m", "30", "-e"])
        .output()
        .expect("run kcat -C");
    assert!(
        read.status.success(),
        "kcat -C failed: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&read.stdout).trim(),
        "{\"hello\":\"kcat\"}"
    );
}

fn suite_brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .expect("KAFKA_BROKERS names the test broker; run the tests with `cargo xtask test`")
}
