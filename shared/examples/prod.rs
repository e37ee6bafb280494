#![allow(clippy::unwrap_used)]
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};
#[tokio::main]
async fn main() {
    let k = shared::kafka::KafkaSettings::for_brokers(std::env::var("KAFKA_BROKERS").unwrap());
    let p: FutureProducer = k.producer_config().create().unwrap();
    for batch in [100usize, 1000, 5000] {
        let t = Instant::now();
        let futs: Vec<_> = (0..batch)
            .map(|i| {
                let p = p.clone();
                async move {
                    p.send(
                        FutureRecord::to("order-topic.DLT")
                            .key(&format!("k{i}"))
                            .payload("x".repeat(300).as_str()),
                        Duration::from_secs(30),
                    )
                    .await
                    .is_ok()
                }
            })
            .collect();
        let ok = futures::future::join_all(futs)
            .await
            .iter()
            .filter(|b| **b)
            .count();
        println!(
            "{batch}: {ok} ok in {:?} => {:.0}/s",
            t.elapsed(),
            batch as f64 / t.elapsed().as_secs_f64()
        );
    }
    // sequential rounds of 20, like a relay under light load
    let t = Instant::now();
    for _ in 0..20 {
        let futs: Vec<_> = (0..20)
            .map(|i| {
                let p = p.clone();
                async move {
                    p.send(
                        FutureRecord::to("order-topic")
                            .key(&format!("k{i}"))
                            .payload("x"),
                        Duration::from_secs(30),
                    )
                    .await
                    .is_ok()
                }
            })
            .collect();
        futures::future::join_all(futs).await;
    }
    println!(
        "20 rounds of 20 to 6 partitions: {:?} per round",
        t.elapsed() / 20
    );
}
