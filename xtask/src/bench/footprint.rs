//! Footprint: each process's time from start to ready (its health endpoint answers
//! 200) once PostgreSQL and the broker are up, and its resident memory when idle; then
//! what each open client connection adds to the gateway's.
//! Target: under 30 MB each, every one ready in under a second.

use std::{
    fs,
    io::{Read, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    bench::{Report, build_release, memory_mib, scratch, spring, wait_http_ok},
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
    let mut ours: Vec<(String, f64, f64)> = Vec::new();
    for (name, child, ready) in &running {
        let rss = idle_row(&mut report, name, child.pid(), *ready);
        worst_rss = worst_rss.max(rss);
        ours.push(((*name).to_owned(), *ready, rss));
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
    if let Some((_, gateway, _)) = running.iter().find(|(name, ..)| *name == "gateway") {
        let per_connection = memory_per_connection(gateway.pid(), gateway_port)?;
        report.note(format!(
            "- The gateway with {OPEN_CONNECTIONS} idle keep-alive connections open (each asked \
             for its health once, then left open as a client's pool leaves it): \
             {per_connection:.1} KiB of resident memory per connection."
        ));
    }
    report.note(
        "Start to ready: from spawning the release binary to its `/actuator/health` answering \
         200 (services: their database reachable; migrations applied on a fresh database). \
         The registry starts first; each service registers with it.",
    );
    drop(running);
    spring_peers(
        &dir,
        &mut report,
        &ours,
        &format!("http://127.0.0.1:{gateway_port}"),
        interrupt,
    )?;
    drop(broker);
    drop(postgres);
    Ok(report)
}

/// Client connections held open by [`memory_per_connection`].
const OPEN_CONNECTIONS: usize = 800;

/// What each open, idle client connection adds to the resident memory of the process
/// `pid` serving on `port`, in KiB: [`OPEN_CONNECTIONS`] connections each ask for its
/// health once and stay open.
fn memory_per_connection(pid: u32, port: u16) -> anyhow::Result<f64> {
    let before = memory_mib(pid, "VmRSS");
    let mut open = Vec::with_capacity(OPEN_CONNECTIONS);
    for _ in 0..OPEN_CONNECTIONS {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /actuator/health HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut answer = [0u8; 1024];
        let read = stream.read(&mut answer)?;
        anyhow::ensure!(
            answer[..read].starts_with(b"HTTP/1.1 200"),
            "the health check on an open connection answered {:?}",
            String::from_utf8_lossy(&answer[..read])
        );
        open.push(stream);
    }
    let after = memory_mib(pid, "VmRSS");
    drop(open);
    Ok((after - before).max(0.0) * 1024.0 / OPEN_CONNECTIONS as f64)
}

/// Adds `name`'s row (ready time, idle and peak RSS of `pid`); returns its idle RSS.
fn idle_row(report: &mut Report, name: &str, pid: u32, ready_ms: f64) -> f64 {
    let rss = memory_mib(pid, "VmRSS");
    let peak = memory_mib(pid, "VmHWM");
    report.row(vec![
        name.to_owned(),
        format!("{ready_ms:.0}"),
        format!("{rss:.1}"),
        format!("{peak:.1}"),
    ]);
    rss
}

/// The Spring Cloud programs that do the same jobs, as a Spring shop runs them
/// (`java -jar`, the JVM's defaults), measured the same way: Netflix's Eureka server,
/// a Spring Boot service with the Eureka client, and Spring Cloud Gateway routing to
/// it through Eureka and checking our gateway's tokens.
fn spring_peers(
    dir: &std::path::Path,
    report: &mut Report,
    ours: &[(String, f64, f64)],
    gateway_url: &str,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    eprintln!("bench: building and starting the Spring peers");
    let eureka_port = crate::free_port()?;
    let zone = format!("http://127.0.0.1:{eureka_port}/eureka/");
    let peers: [(&str, &str, u16, Vec<String>); 3] = [
        (
            "Eureka server (Spring Cloud Netflix)",
            "eureka-server",
            eureka_port,
            vec![
                "eureka.client.register-with-eureka=false".into(),
                "eureka.client.fetch-registry=false".into(),
            ],
        ),
        (
            "Spring Boot service (Eureka client)",
            "eureka-client",
            crate::free_port()?,
            vec![
                "spring.application.name=spring-demo".into(),
                format!("eureka.client.service-url.defaultZone={zone}"),
            ],
        ),
        (
            "Spring Cloud Gateway",
            "gateway",
            crate::free_port()?,
            spring::gateway_properties(
                &zone,
                "demo",
                "spring-demo",
                "/spring/**",
                &spring::TokenCheck::of_gateway(gateway_url),
            ),
        ),
    ];
    let mut running = Vec::new();
    for (label, program, port, properties) in peers {
        let process = spring::start(
            program,
            port,
            &properties,
            &dir.join(format!("spring-{program}.log")),
            interrupt,
        )?;
        let ready = process.ready_ms;
        running.push((label, process.child, ready));
    }
    std::thread::sleep(Duration::from_secs(10));
    let mut spring = Vec::new();
    for (label, child, ready) in &running {
        let rss = idle_row(report, label, child.pid(), *ready);
        spring.push((*label, *ready, rss));
    }
    for (mine, peer, what) in [
        (
            "registry",
            0,
            "the registry against Netflix's Eureka server",
        ),
        (
            "order-service",
            1,
            "order-service (database pool, Kafka consumer and producer) against a Spring Boot service that only says hello",
        ),
        ("gateway", 2, "the gateway against Spring Cloud Gateway"),
    ] {
        let (Some(ours), Some(theirs)) = (ours.iter().find(|o| o.0 == mine), spring.get(peer))
        else {
            continue;
        };
        report.note(format!(
            "- {what}: {:.1} MiB vs {:.1} MiB idle ({:.0}x less), ready in {:.0} ms vs {:.0} ms",
            ours.2,
            theirs.2,
            theirs.2 / ours.2.max(0.1),
            ours.1,
            theirs.1
        ));
    }
    report.note(
        "The Spring peers (`interop/`, Spring Boot 4.0.7, Spring Cloud 2025.1.4, OpenJDK 17) \
         run as `java -jar` with the JVM's defaults and only the properties their job needs; \
         ready is their `/actuator/health` answering 200, measured from spawning the JVM. \
         Both gateways route through their registry and check bearer tokens (Spring's as an \
         OAuth2 resource server on our gateway's JWK set).",
    );
    Ok(())
}
