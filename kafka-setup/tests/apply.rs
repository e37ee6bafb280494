//! The `kafka-setup` binary against the real broker `cargo xtask test` provides. Each
//! test writes a topic file with fresh topic names, so tests never share topics.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};
use shared::kafka::KafkaSettings;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .expect("KAFKA_BROKERS names the test broker; run the tests with `cargo xtask test`")
}

fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

fn topic_file(dir: &Path, topics: &[(&str, i32, &str)]) -> PathBuf {
    let mut text = String::new();
    for (name, partitions, retention) in topics {
        text.push_str(&format!(
            "[[topic]]\nname = \"{name}\"\npartitions = {partitions}\nreplication_factor = 1\n\
             [topic.config]\n\"cleanup.policy\" = \"delete\"\n\"retention.ms\" = \"{retention}\"\n\
             \"min.insync.replicas\" = \"1\"\n\n"
        ));
    }
    let path = dir.join("topics.toml");
    std::fs::write(&path, text).expect("write topic file");
    path
}

fn kafka_setup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kafka-setup"))
        .args(args)
        .env_remove("KAFKA_BROKERS")
        .output()
        .expect("kafka-setup runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn running_twice_changes_nothing_the_second_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (unique("orders"), unique("results"));
    let file = topic_file(dir.path(), &[(&a, 3, "604800000"), (&b, 2, "86400000")]);
    let file = file.to_str().expect("utf-8 path");
    let brokers = brokers();

    let first = kafka_setup(&["--brokers", &brokers, "--file", file]);
    assert!(first.status.success(), "{}", text(&first));
    let first = text(&first);
    assert!(first.contains(&format!("created   {a}")), "{first}");
    assert!(first.contains(&format!("created   {b}")), "{first}");

    let second = kafka_setup(&["--brokers", &brokers, "--file", file]);
    assert!(second.status.success(), "{}", text(&second));
    let second = text(&second);
    assert!(second.contains(&format!("ok        {a}")), "{second}");
    assert!(second.contains(&format!("ok        {b}")), "{second}");
    assert!(
        !second.contains("created"),
        "the second run created nothing: {second}"
    );

    let check = kafka_setup(&["--brokers", &brokers, "--file", file, "--check"]);
    assert!(
        check.status.success(),
        "the applied topics pass --check: {}",
        text(&check)
    );
}

#[tokio::test]
async fn a_topic_created_with_other_settings_is_reported_as_drift() {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = unique("drifted");
    let brokers = brokers();
    // Someone created the topic by hand, with one partition and one day's retention.
    let admin: AdminClient<DefaultClientContext> = KafkaSettings::for_brokers(&brokers)
        .admin_config()
        .create()
        .expect("admin");
    let created = admin
        .create_topics(
            [&NewTopic::new(&name, 1, TopicReplication::Fixed(1))
                .set("retention.ms", "86400000")
                .set("cleanup.policy", "delete")
                .set("min.insync.replicas", "1")],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create");
    created.into_iter().for_each(|r| {
        r.expect("created");
    });

    let file = topic_file(dir.path(), &[(&name, 3, "604800000")]);
    let file = file.to_str().expect("utf-8 path");
    let check = kafka_setup(&["--brokers", &brokers, "--file", file, "--check"]);
    let said = text(&check);
    assert_eq!(
        check.status.code(),
        Some(1),
        "--check fails on drift: {said}"
    );
    assert!(said.contains(&format!("DIFFERS   {name}")), "{said}");
    assert!(said.contains("partitions: want 3, have 1"), "{said}");
    assert!(
        said.contains("retention.ms: want 604800000, have 86400000"),
        "{said}"
    );

    // Applying reports the same drift and leaves the topic as it is.
    let apply = kafka_setup(&["--brokers", &brokers, "--file", file]);
    assert_eq!(apply.status.code(), Some(1), "{}", text(&apply));
    let again = kafka_setup(&["--brokers", &brokers, "--file", file, "--check"]);
    assert!(text(&again).contains("partitions: want 3, have 1"));
}

#[test]
fn a_missing_topic_fails_check_without_being_created() {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = unique("absent");
    let file = topic_file(dir.path(), &[(&name, 1, "604800000")]);
    let file = file.to_str().expect("utf-8 path");
    let brokers = brokers();
    let check = kafka_setup(&["--brokers", &brokers, "--file", file, "--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(text(&check).contains(&format!("missing   {name}")));
    let still = kafka_setup(&["--brokers", &brokers, "--file", file, "--check"]);
    assert!(
        text(&still).contains(&format!("missing   {name}")),
        "check created nothing"
    );
}

#[test]
fn an_unreachable_broker_is_named_within_a_bounded_time() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .to_string();
    let started = Instant::now();
    let output = kafka_setup(&["--brokers", &dead, "--timeout-secs", "2"]);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let said = text(&output);
    assert!(
        said.contains(&format!("cannot reach the Kafka broker at {dead}")),
        "{said}"
    );
    // Bounded by the timeout (plus process start-up), not a hang.
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}
