//! Footprint: each process's time from start to ready (its health endpoint answers
//! 200) once PostgreSQL and the broker are up, and its resident memory when idle.
//! Target: under 30 MB each, every one ready in under a second.

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    bench::{Report, build_release, memory_mib, scratch, wait_http_ok},
    broker::{Broker, KafkaOptions},
    postgres::Postgres,
    procs::{Interrupt, Supervised},
};

const PROCESSES: [(&str, &str); 5] = [
    ("registry", "REGISTRY_"),
    ("order-service", "ORDER_"),
    ("payment-service", "PAYMENT_"),
    ("notification-service", "NOTIFICATION_"),
    ("gateway", "GATEWAY_"),
];

pub fn run(interrupt: &Interrupt) -> anyhow::Result<Report> {
    let dir = scratch("footprint")?;
    let mut packages: Vec<&str> = PROCESSES.iter().map(|(n, _)| *n).collect();
    packages.push("kafka-setup");
    let bin = build_release(&packages, &[], interrupt)?;
    eprintln!("bench: starting PostgreSQL and the broker");
    let postgres = Postgres::provide(&dir.join("postgres"), false, interrupt)?;
    let broker = Broker::provide(&KafkaOptions::single(&dir), interrupt)?;
    crate::procs::run(
        "kafka-setup",
        Command::new(bin.join("kafka-setup")).env("KAFKA_BROKERS", broker.brokers()),
        interrupt,
    )?;
    let gateway_config = dir.join("gateway.yaml");
    crate::stack::write_gateway_config(&gateway_config)?;
    let registry_port = crate::free_port()?;
    let registry_url = format!("http://127.0.0.1:{registry_port}");
    let gateway_port = crate::free_port()?;
    let token = crate::random_token(32);

    let mut report = Report::new(
        "footprint: start to ready, idle memory",
        &[
            "process",
            "start to ready (ms)",
            "idle RSS (MiB)",
            "peak RSS (MiB)",
        ],
    );
    let mut running = Vec::new();
    let mut worst_ready: f64 = 0.0;
    let mut worst_rss: f64 = 0.0;
    for (name, prefix) in PROCESSES {
        let port = match name {
            "registry" => registry_port,
            "gateway" => gateway_port,
            _ => crate::free_port()?,
        };
        let log = fs::File::create(dir.join(format!("{name}.log")))?;
        let mut command = Command::new(bin.join(name));
        command
            .env(format!("{prefix}HTTP__PORT"), port.to_string())
            .env("DATABASE_URL", postgres.url())
            .env("KAFKA_BROKERS", broker.brokers())
            .env("REGISTRY_URL", &registry_url)
            .env("REGISTRY_TOKEN", &token)
            .env("GATEWAY_URL", format!("http://127.0.0.1:{gateway_port}"))
            .env("GATEWAY_CONFIG", &gateway_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let started = Instant::now();
        let child = Supervised::spawn(name, &mut command)?;
        wait_http_ok(
            &format!("http://127.0.0.1:{port}/actuator/health"),
            Duration::from_secs(30),
            interrupt,
        )?;
        let ready = started.elapsed().as_secs_f64() * 1000.0;
        worst_ready = worst_ready.max(ready);
        running.push((name, child, ready));
    }
    // Idle: registered, heartbeating, consumers polling, nothing to do.
    std::thread::sleep(Duration::from_secs(10));
    for (name, child, ready) in &running {
        let rss = memory_mib(child.pid(), "VmRSS");
        let peak = memory_mib(child.pid(), "VmHWM");
        worst_rss = worst_rss.max(rss);
        report.row(vec![
            (*name).to_owned(),
            format!("{ready:.0}"),
            format!("{rss:.1}"),
            format!("{peak:.1}"),
        ]);
    }
    report.target(
        "every process under 30 MB idle",
        worst_rss < 30.0,
        format!("the largest is {worst_rss:.1} MiB"),
    );
    report.target(
        "every process ready in under a second",
        worst_ready < 1000.0,
        format!("the slowest took {worst_ready:.0} ms"),
    );
    report.note(
        "Start to ready: from spawning the release binary to its `/actuator/health` answering \
         200 (services: their database reachable; migrations applied on a fresh database). \
         The registry starts first; each service registers with it.",
    );
    drop(running);
    drop(broker);
    drop(postgres);
    Ok(report)
}
