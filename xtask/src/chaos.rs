//! `cargo xtask chaos`: the saga through crashes.
//!
//! A three-broker stack (`xtask up --brokers 3`, its own PostgreSQL and Kafka), plus
//! one extra instance of each service started by hand as `docs/operations.md`
//! describes. Customers place orders through the gateway at a steady rate, each with
//! its own `Idempotency-Key`, retrying on errors as a real client would (same key,
//! backing off). Meanwhile, one after another: a Kafka node, each service of the
//! stack, each extra instance (all `kill -9`) and PostgreSQL (an immediate shutdown).
//! The stack's supervisor restarts its own parts; the extra instances stay dead, so
//! their partitions must move to the survivors once the broker declares them dead.
//!
//! Afterwards, within a bound, the books must balance: every accepted order is final,
//! one order per key, one payment per order that agrees with it, one notification per
//! outcome and each of them sent, every balance equal to deposits minus confirmed
//! totals, and no committed offset of any group ever moved backwards (sampled
//! throughout from the group coordinator).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use rand::Rng;
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::{Value, json};

use crate::{
    postgres::psql,
    procs::{Interrupt, Supervised},
    stack::{UpProcess, sim_user},
};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The xtask binary that runs `up` (this one, or the tests' build of it); the
    /// services' binaries are taken from the same folder.
    pub xtask: PathBuf,
    /// Orders per second.
    pub rate: f64,
    /// Customers placing them (the stack's simulation customers).
    pub customers: usize,
    /// Time between one fault's recovery and the next fault.
    pub gap: Duration,
    /// How long everything may take to be final once the load stops.
    pub settle: Duration,
    /// Run the stack optimized.
    pub release: bool,
}

impl ChaosOptions {
    pub fn new(xtask: PathBuf) -> Self {
        Self {
            xtask,
            rate: 8.0,
            customers: 20,
            gap: Duration::from_secs(5),
            settle: Duration::from_secs(120),
            release: false,
        }
    }
}

/// One fault and what it cost.
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    pub fault: String,
    /// From the fault until an order accepted after it was final and its mail sent.
    pub recovery: Option<Duration>,
    /// For an extra instance: from its death until its consumer group no longer
    /// counted it (its partitions then belong to the survivors).
    pub handover: Option<Duration>,
}

/// The figures of one run.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// Orders the customers set out to place (one key each).
    pub keys: usize,
    pub accepted: usize,
    pub confirmed: usize,
    pub rejected: usize,
    /// Failed attempts the customers saw, by kind (status code or transport error).
    pub client_errors: BTreeMap<String, usize>,
    /// Keys the customers gave up on.
    pub unresolved: usize,
    pub faults: Vec<FaultOutcome>,
    /// From the end of the load until nothing was pending anywhere.
    pub drained_in: Option<Duration>,
    /// Every broken promise found by the checks.
    pub violations: Vec<String>,
}

impl ChaosReport {
    /// Whether every promise held: all recovered, all drained, nothing broken.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
            && self.drained_in.is_some()
            && self.unresolved == 0
            && self.faults.iter().all(|f| f.recovery.is_some())
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |d: Option<Duration>| {
            d.map_or("NOT WITHIN THE BOUND".to_owned(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            })
        };
        writeln!(
            f,
            "orders: {} keys, {} accepted ({} confirmed, {} rejected), {} given up",
            self.keys, self.accepted, self.confirmed, self.rejected, self.unresolved
        )?;
        let errors: usize = self.client_errors.values().sum();
        write!(f, "client-visible errors: {errors} failed attempts")?;
        if errors > 0 {
            let kinds: Vec<String> = self
                .client_errors
                .iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect();
            write!(f, " ({}), each retried with the same key", kinds.join(", "))?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "faults (recovery: until an order placed after the fault was final and its mail sent):"
        )?;
        for fault in &self.faults {
            write!(f, "  {:<44} recovery {}", fault.fault, secs(fault.recovery))?;
            if let Some(handover) = fault.handover {
                write!(
                    f,
                    ", its partitions handed on after {:.1} s",
                    handover.as_secs_f64()
                )?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "everything final, published and mailed: {} after the load stopped",
            secs(self.drained_in)
        )?;
        if self.violations.is_empty() {
            writeln!(
                f,
                "checks: every accepted order final; one order per key; one payment per order, agreeing with it; \
                 one notification per outcome, sent; every balance = deposits - confirmed totals; \
                 no committed offset moved backwards: all hold"
            )?;
        } else {
            writeln!(f, "BROKEN ({}):", self.violations.len())?;
            for v in self.violations.iter().take(30) {
                writeln!(f, "  {v}")?;
            }
        }
        Ok(())
    }
}

/// `cargo xtask chaos`: runs the scenario and prints its figures; fails when a
/// promise was broken.
pub fn chaos(options: &ChaosOptions) -> anyhow::Result<()> {
    let interrupt = Interrupt::install()?;
    let report = run(options, &interrupt)?;
    println!("{report}");
    if !report.passed() {
        bail!("the chaos scenario broke a promise (see above)");
    }
    Ok(())
}

/// What happened to one key.
#[derive(Debug, Clone)]
enum KeyOutcome {
    Accepted {
        user: String,
        key: String,
        id: String,
    },
    GaveUp {
        user: String,
        key: String,
        why: String,
    },
}

/// Shared by the load's threads.
#[derive(Debug, Default)]
struct Load {
    outcomes: Mutex<Vec<KeyOutcome>>,
    errors: Mutex<BTreeMap<String, usize>>,
}

/// Runs the scenario and returns its figures.
pub fn run(options: &ChaosOptions, interrupt: &Interrupt) -> anyhow::Result<ChaosReport> {
    if !(options.rate > 0.0 && options.rate.is_finite()) {
        bail!("--rate must be a number of orders per second above 0");
    }
    let dir = crate::target_dir().join("chaos");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bin = options
        .xtask
        .parent()
        .context("the xtask binary has no folder")?
        .to_path_buf();
    eprintln!(
        "chaos: starting a three-broker stack (log: {})",
        dir.join("stack.log").display()
    );
    let mut args = vec!["--brokers", "3"];
    if options.release {
        args.push("--release");
    }
    let up = UpProcess::start(
        &options.xtask,
        &args,
        &dir.join("stack.env"),
        &dir.join("stack.log"),
        interrupt,
    )?;
    let gateway = up.var("GATEWAY_URL")?.to_owned();
    let database = up.var("DATABASE_URL")?.to_owned();
    let brokers = up.var("KAFKA_BROKERS")?.to_owned();

    eprintln!("chaos: starting one extra instance of each service");
    let mut extras = start_extras(&up, &bin, &dir, interrupt)?;
    for (group, _) in GROUPS {
        wait_members(&brokers, group, 2, Duration::from_secs(60), interrupt)?;
    }

    eprintln!(
        "chaos: logging in and funding {} customers",
        options.customers
    );
    let agent = agent();
    let mut tokens = Vec::new();
    for i in 1..=options.customers {
        let user = sim_user(i);
        let token = crate::simulate::login(&agent, &gateway, &user)?;
        deposit(&agent, &gateway, &token, 30_000)?;
        tokens.push((user, token));
    }

    let watching = Arc::new(AtomicBool::new(true));
    let backwards = watch_offsets(&brokers, watching.clone());
    let load = Arc::new(Load::default());
    let placing = Arc::new(AtomicBool::new(true));
    let load_threads = start_load(options, &gateway, tokens, load.clone(), placing.clone());

    std::thread::sleep(options.gap);
    let mut report = ChaosReport::default();
    for fault in FAULTS {
        interrupt.check()?;
        eprintln!("chaos: {}", fault.describe());
        let before = psql(&database, "SELECT now()").unwrap_or_default();
        let started = Instant::now();
        let handover = match fault {
            Fault::KafkaNode(node) => {
                let pid = find(up.pid(), |p| {
                    p.name == "java"
                        && p.cmdline
                            .contains(&format!("node-{node}/server.properties"))
                })
                .with_context(|| format!("Kafka node {node} is not running"))?;
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                None
            }
            Fault::StackService(name) => {
                let pid = find(up.pid(), |p| p.name == short(name) && p.ppid == up.pid())
                    .with_context(|| format!("the stack's {name} is not running"))?;
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                None
            }
            Fault::Extra(name) => {
                let extra = extras
                    .iter_mut()
                    .find(|e| e.name == name)
                    .context("no such extra instance")?;
                let _ = kill(Pid::from_raw(extra.child.pid() as i32), Signal::SIGKILL);
                extra.child.stop();
                let group = GROUPS
                    .iter()
                    .find(|(g, _)| *g == name)
                    .map(|(g, _)| *g)
                    .context("no group")?;
                Some(wait_gone(&brokers, group, &extra.client_id, interrupt))
            }
            Fault::Postgres => {
                let pid = find(up.pid(), |p| p.name == "postgres" && p.ppid == up.pid())
                    .context("PostgreSQL is not running")?;
                // What `pg_ctl stop -m immediate` sends: no checkpoint, crash recovery
                // at the next start.
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
                None
            }
        };
        let recovery = wait_recovered(&database, &before, started, interrupt);
        match handover {
            Some(None) => report.violations.push(format!(
                "{}: its consumer group still counted it a minute later",
                fault.describe()
            )),
            Some(Some(took)) if took > HANDOVER_BOUND => report.violations.push(format!(
                "{}: its partitions moved only after {:.1} s (bound: the 10 s session timeout, plus {} s for the rebalance)",
                fault.describe(),
                took.as_secs_f64(),
                (HANDOVER_BOUND - Duration::from_secs(10)).as_secs()
            )),
            _ => {}
        }
        report.faults.push(FaultOutcome {
            fault: fault.describe(),
            recovery,
            handover: handover.flatten(),
        });
        std::thread::sleep(options.gap);
    }

    eprintln!("chaos: stopping the load; waiting for every key to be answered");
    placing.store(false, Ordering::SeqCst);
    for thread in load_threads {
        let _ = thread.join();
    }
    let stopped = Instant::now();
    eprintln!("chaos: waiting until everything is final, published and mailed");
    report.drained_in = loop {
        interrupt.check()?;
        if drained(&database) {
            break Some(stopped.elapsed());
        }
        if stopped.elapsed() > options.settle {
            break None;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    // A last sample after everything settled, then stop watching.
    std::thread::sleep(Duration::from_millis(500));
    watching.store(false, Ordering::SeqCst);
    let backwards = backwards.join().unwrap_or_default();

    let outcomes = load.outcomes.lock().map(|o| o.clone()).unwrap_or_default();
    report.client_errors = load.errors.lock().map(|e| e.clone()).unwrap_or_default();
    report.keys = outcomes.len();
    for outcome in &outcomes {
        match outcome {
            KeyOutcome::Accepted { .. } => report.accepted += 1,
            KeyOutcome::GaveUp { user, key, why } => {
                report.unresolved += 1;
                report
                    .violations
                    .push(format!("{user}'s key {key} was never answered: {why}"));
            }
        }
    }
    check(&database, &outcomes, &mut report)?;
    report.violations.extend(
        backwards
            .into_iter()
            .map(|b| format!("offset moved backwards: {b}")),
    );
    drop(extras);
    drop(up);
    Ok(report)
}

/// A dead member's partitions must move within the consumers' session timeout (10 s)
/// plus the time the rebalance itself takes.
const HANDOVER_BOUND: Duration = Duration::from_secs(20);

/// The consumer groups and the topic each reads.
const GROUPS: [(&str, &str); 3] = [
    ("payment-service", "order-topic"),
    ("order-service", "payment-result-topic"),
    ("notification-service", "payment-result-topic"),
];

#[derive(Debug, Clone, Copy)]
enum Fault {
    KafkaNode(u32),
    StackService(&'static str),
    Extra(&'static str),
    Postgres,
}

impl Fault {
    fn describe(&self) -> String {
        match self {
            Fault::KafkaNode(n) => format!("kill -9 Kafka node {n}"),
            Fault::StackService(name) => format!("kill -9 the stack's {name}"),
            Fault::Extra(name) => format!("kill -9 the extra {name}"),
            Fault::Postgres => "PostgreSQL immediate shutdown".to_owned(),
        }
    }
}

/// One after another, each once the saga has recovered from the one before.
const FAULTS: [Fault; 8] = [
    Fault::KafkaNode(2),
    Fault::StackService("payment-service"),
    Fault::Extra("payment-service"),
    Fault::StackService("order-service"),
    Fault::Extra("order-service"),
    Fault::StackService("notification-service"),
    Fault::Extra("notification-service"),
    Fault::Postgres,
];

/// An extra instance started by hand.
#[derive(Debug)]
struct Extra {
    name: &'static str,
    client_id: String,
    child: Supervised,
}

fn start_extras(
    up: &UpProcess,
    bin: &Path,
    dir: &Path,
    interrupt: &Interrupt,
) -> anyhow::Result<Vec<Extra>> {
    let mut extras = Vec::new();
    for (name, prefix) in [
        ("order-service", "ORDER_"),
        ("payment-service", "PAYMENT_"),
        ("notification-service", "NOTIFICATION_"),
    ] {
        let port = crate::free_port()?;
        let client_id = format!("{name}-extra");
        let log = std::fs::File::create(dir.join(format!("{name}-extra.log")))?;
        let mut command = Command::new(bin.join(name));
        for key in [
            "DATABASE_URL",
            "KAFKA_BROKERS",
            "REGISTRY_URL",
            "REGISTRY_TOKEN",
            "GATEWAY_URL",
        ] {
            command.env(key, up.var(key)?);
        }
        command
            .env(format!("{prefix}HTTP__PORT"), port.to_string())
            .env(format!("{prefix}KAFKA__CLIENT_ID"), &client_id)
            .env(
                "NOTIFICATION_MAIL__SMTP_PORT",
                up.var("STOREFRONT_SMTP_PORT")?,
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = Supervised::spawn(&format!("extra {name}"), &mut command)?;
        crate::bench::wait_http_ok(
            &format!("http://127.0.0.1:{port}/actuator/health"),
            Duration::from_secs(60),
            interrupt,
        )?;
        extras.push(Extra {
            name,
            client_id,
            child,
        });
    }
    Ok(extras)
}

/// A running process's name (`comm`), parent and command line.
#[derive(Debug)]
struct ProcessInfo {
    name: String,
    ppid: u32,
    cmdline: String,
}

fn process_info(pid: u32) -> Option<ProcessInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    let ppid = fields.get(1)?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    Some(ProcessInfo {
        name,
        ppid,
        cmdline,
    })
}

/// The first process below `root` that `matches`.
fn find(root: u32, matches: impl Fn(&ProcessInfo) -> bool) -> Option<u32> {
    crate::bench::descendants(root)
        .into_iter()
        .skip(1)
        .find(|&pid| process_info(pid).is_some_and(|p| matches(&p)))
}

/// `name` as `/proc` shows it (15 bytes at most).
fn short(name: &str) -> &str {
    &name[..name.len().min(15)]
}

fn group_client(brokers: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("broker.address.family", "v4")
        .set("enable.auto.commit", "false")
        .set("log_level", "0")
        .create()?)
}

/// The client ids of `group`'s members, as DescribeGroups answers.
fn members(client: &BaseConsumer, group: &str) -> Option<Vec<String>> {
    let list = client
        .fetch_group_list(Some(group), Duration::from_secs(5))
        .ok()?;
    let found = list.groups().iter().find(|g| g.name() == group)?;
    Some(
        found
            .members()
            .iter()
            .map(|m| m.client_id().to_owned())
            .collect(),
    )
}

fn wait_members(
    brokers: &str,
    group: &str,
    count: usize,
    within: Duration,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let client = group_client(brokers, group)?;
    let deadline = Instant::now() + within;
    loop {
        interrupt.check()?;
        let now = members(&client, group).unwrap_or_default();
        if now.len() >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("group {group} has {now:?}, not {count} members, after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long until `group` no longer lists a member with `client_id` (up to a minute).
fn wait_gone(
    brokers: &str,
    group: &str,
    client_id: &str,
    interrupt: &Interrupt,
) -> Option<Duration> {
    let client = group_client(brokers, group).ok()?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) && !interrupt.requested() {
        if members(&client, group).is_some_and(|m| !m.iter().any(|c| c == client_id)) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Samples every group's committed offsets until `watching` is cleared; returns every
/// time one moved backwards.
fn watch_offsets(brokers: &str, watching: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    let brokers = brokers.to_owned();
    std::thread::spawn(move || {
        let clients: Vec<(&str, &str, BaseConsumer)> = GROUPS
            .iter()
            .filter_map(|(group, topic)| {
                group_client(&brokers, group)
                    .ok()
                    .map(|c| (*group, *topic, c))
            })
            .collect();
        let mut highest: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut backwards = Vec::new();
        while watching.load(Ordering::SeqCst) {
            for (group, topic, client) in &clients {
                let mut list = TopicPartitionList::new();
                for p in 0..6 {
                    list.add_partition(topic, p);
                }
                // While a broker or the coordinator is down the fetch fails: skip.
                let Ok(committed) = client.committed_offsets(list, Duration::from_secs(3)) else {
                    continue;
                };
                for e in committed.elements() {
                    let Offset::Offset(offset) = e.offset() else {
                        continue;
                    };
                    let key = (format!("{group} {topic}"), e.partition());
                    let high = highest.entry(key).or_insert(offset);
                    if offset < *high {
                        backwards.push(format!(
                            "{group} on {topic}/{}: {} -> {offset}",
                            e.partition(),
                            *high
                        ));
                    }
                    *high = (*high).max(offset);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        backwards
    })
}

const CATALOGUE: [(&str, i64); 5] = [
    ("BOOK-1", 1250),
    ("MUG-1", 899),
    ("LAMP-7", 4500),
    ("PEN-3", 199),
    ("TEA-5", 650),
];

/// Orders at `options.rate` per second from random customers until `placing` is
/// cleared; each key is retried until it is answered.
fn start_load(
    options: &ChaosOptions,
    gateway: &str,
    tokens: Vec<(String, String)>,
    load: Arc<Load>,
    placing: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<(usize, Value)>();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let tokens = Arc::new(tokens);
    let mut threads = Vec::new();
    for _ in 0..24 {
        let jobs = jobs_rx.clone();
        let load = load.clone();
        let tokens = tokens.clone();
        let gateway = gateway.to_owned();
        threads.push(std::thread::spawn(move || {
            let agent = agent();
            loop {
                let job = jobs.lock().map(|rx| rx.recv());
                let Ok(Ok((customer, order))) = job else {
                    return;
                };
                let (user, token) = &tokens[customer];
                let outcome = place(&agent, &gateway, user, token, &order, &load);
                if let Ok(mut outcomes) = load.outcomes.lock() {
                    outcomes.push(outcome);
                }
            }
        }));
    }
    let rate = options.rate;
    let customers = tokens.len();
    threads.push(std::thread::spawn(move || {
        let mut rng = rand::rng();
        let start = Instant::now();
        let mut n = 0_u64;
        while placing.load(Ordering::SeqCst) {
            let due = start + Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            n += 1;
            let items: Vec<Value> = (0..rng.random_range(1..=3))
                .map(|_| {
                    let (sku, price) = CATALOGUE[rng.random_range(0..CATALOGUE.len())];
                    json!({"sku": sku, "quantity": rng.random_range(1..=2), "unitPrice": price})
                })
                .collect();
            let job = (
                rng.random_range(0..customers),
                json!({"items": items, "currency": "EUR"}),
            );
            if jobs_tx.send(job).is_err() {
                return;
            }
        }
        // Dropping the sender ends the workers once the queue is empty.
    }));
    threads
}

/// Places one order with a fresh key, retrying with the same key on every answer
/// that says "try again" (5xx, 408, 409 still processing, 429, no answer), as a real
/// client does, for up to two minutes.
fn place(
    agent: &ureq::Agent,
    gateway: &str,
    user: &str,
    token: &str,
    order: &Value,
    load: &Load,
) -> KeyOutcome {
    let key = crate::random_token(24);
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let answer = agent
            .post(&format!("{gateway}/orders"))
            .header("authorization", &format!("Bearer {token}"))
            .header("idempotency-key", &key)
            .send_json(order);
        let error = match answer {
            Ok(mut r) if matches!(r.status().as_u16(), 200 | 201) => {
                match r.body_mut().read_json::<Value>() {
                    Ok(body) if body["id"].is_string() => {
                        return KeyOutcome::Accepted {
                            user: user.to_owned(),
                            key,
                            id: body["id"].as_str().unwrap_or_default().to_owned(),
                        };
                    }
                    _ => "unreadable 201".to_owned(),
                }
            }
            Ok(r) if matches!(r.status().as_u16(), 408 | 409 | 429 | 500..=599) => {
                r.status().as_u16().to_string()
            }
            Ok(r) => {
                return KeyOutcome::GaveUp {
                    user: user.to_owned(),
                    key,
                    why: format!("POST /orders answered {}", r.status()),
                };
            }
            Err(e) => match e {
                ureq::Error::Timeout(_) => "timeout".to_owned(),
                _ => "connection".to_owned(),
            },
        };
        if let Ok(mut errors) = load.errors.lock() {
            *errors.entry(error.clone()).or_default() += 1;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return KeyOutcome::GaveUp {
                user: user.to_owned(),
                key,
                why: format!("still failing after two minutes ({error})"),
            };
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(15)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn deposit(agent: &ureq::Agent, gateway: &str, token: &str, amount: i64) -> anyhow::Result<()> {
    let key = crate::random_token(24);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = agent
            .post(&format!("{gateway}/payments/accounts/me/deposits"))
            .header("authorization", &format!("Bearer {token}"))
            .header("idempotency-key", &key)
            .send_json(json!({"amount": amount, "currency": "EUR"}))
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("a deposit was refused ({status})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (up to 90 s) until an order created after `before` (the database's clock) is
/// final and its mail sent; the time since `started`.
fn wait_recovered(
    database: &str,
    before: &str,
    started: Instant,
    interrupt: &Interrupt,
) -> Option<Duration> {
    let sql = format!(
        "SELECT count(*) FROM orders.orders o JOIN notifications.notifications n \
         ON n.order_id = o.id WHERE o.created_at > '{before}' AND o.status <> 'PENDING' \
         AND n.status = 'SENT'"
    );
    while started.elapsed() < Duration::from_secs(90) && !interrupt.requested() {
        // While PostgreSQL is down psql fails: not recovered yet.
        if psql(database, &sql).is_ok_and(|n| n.parse::<u64>().unwrap_or(0) > 0) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Nothing pending anywhere: no order waiting, no event unpublished, no mail unsent.
fn drained(database: &str) -> bool {
    psql(
        database,
        "SELECT (SELECT count(*) FROM orders.orders WHERE status = 'PENDING') \
         + (SELECT count(*) FROM orders.outbox WHERE published_at IS NULL) \
         + (SELECT count(*) FROM payments.outbox WHERE published_at IS NULL) \
         + (SELECT count(*) FROM notifications.notifications WHERE status = 'PENDING')",
    )
    .is_ok_and(|n| n == "0")
}

/// Rows of `sql`, split into columns.
fn rows(database: &str, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    Ok(psql(database, sql)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect())
}

/// The books: every promise the scenario makes, checked in the database.
fn check(database: &str, outcomes: &[KeyOutcome], report: &mut ChaosReport) -> anyhow::Result<()> {
    let v = &mut report.violations;
    // Every order, with its status and total.
    let orders: BTreeMap<String, (String, String, i64)> = rows(
        database,
        "SELECT id, user_id, status, total FROM orders.orders",
    )?
    .into_iter()
    .filter_map(|r| {
        Some((
            r[0].clone(),
            (r[1].clone(), r[2].clone(), r[3].parse().ok()?),
        ))
    })
    .collect();
    for (_, status, _) in orders.values() {
        match status.as_str() {
            "CONFIRMED" => report.confirmed += 1,
            "REJECTED" => report.rejected += 1,
            _ => {}
        }
    }

    // Every accepted order exists and is final; each key the customers used names
    // exactly the order they were given, and no order exists without a key.
    let keys: BTreeMap<(String, String), String> = rows(
        database,
        "SELECT user_id, key, coalesce(response->>'id', '') FROM orders.idempotency_keys",
    )?
    .into_iter()
    .map(|r| ((r[0].clone(), r[1].clone()), r[2].clone()))
    .collect();
    let mut given: BTreeSet<String> = BTreeSet::new();
    for outcome in outcomes {
        let KeyOutcome::Accepted { user, key, id } = outcome else {
            continue;
        };
        if !given.insert(id.clone()) {
            v.push(format!("order {id} was given for two keys"));
        }
        match orders.get(id) {
            None => v.push(format!("accepted order {id} does not exist")),
            Some((_, status, _)) if status == "PENDING" => {
                v.push(format!("accepted order {id} is still PENDING"));
            }
            Some(_) => {}
        }
        match keys.get(&(user.clone(), key.clone())) {
            Some(stored) if stored == id => {}
            other => v.push(format!(
                "{user}'s key {key} names {other:?}, the customer was given {id}"
            )),
        }
    }
    for id in orders.keys() {
        if !given.contains(id) {
            v.push(format!("order {id} exists, but no customer was given it"));
        }
    }

    // One payment per order, agreeing with it.
    let payments = rows(
        database,
        "SELECT order_id, status, amount, count(*) OVER (PARTITION BY order_id) FROM payments.payments",
    )?;
    let mut paid = BTreeSet::new();
    for p in &payments {
        let (order, status, amount, count) = (&p[0], &p[1], &p[2], &p[3]);
        if count != "1" {
            v.push(format!("order {order} has {count} payments"));
        }
        paid.insert(order.clone());
        match orders.get(order) {
            None => v.push(format!("payment for unknown order {order}")),
            Some((_, order_status, total)) => {
                let agrees = matches!(
                    (order_status.as_str(), status.as_str()),
                    ("CONFIRMED", "VALIDATED") | ("REJECTED", "DECLINED")
                );
                if !agrees {
                    v.push(format!(
                        "order {order} is {order_status}, its payment {status}"
                    ));
                }
                if amount.parse::<i64>().ok() != Some(*total) {
                    v.push(format!(
                        "order {order} totals {total}, its payment {amount}"
                    ));
                }
            }
        }
    }
    for id in orders.keys() {
        if !paid.contains(id) {
            v.push(format!("order {id} has no payment"));
        }
    }

    // One notification per outcome, matching it, and sent.
    let notes = rows(
        database,
        "SELECT order_id, kind, status, count(*) OVER (PARTITION BY order_id) \
         FROM notifications.notifications",
    )?;
    let mut noted = BTreeSet::new();
    for n in &notes {
        let (order, kind, status, count) = (&n[0], &n[1], &n[2], &n[3]);
        if count != "1" {
            v.push(format!("order {order} has {count} notifications"));
        }
        noted.insert(order.clone());
        if status != "SENT" {
            v.push(format!("the notification of order {order} is {status}"));
        }
        if let Some((_, order_status, _)) = orders.get(order) {
            let agrees = matches!(
                (order_status.as_str(), kind.as_str()),
                ("CONFIRMED", "payment-validated") | ("REJECTED", "payment-declined")
            );
            if !agrees {
                v.push(format!(
                    "order {order} is {order_status}, its notification {kind}"
                ));
            }
        }
    }
    for id in orders.keys() {
        if !noted.contains(id) {
            v.push(format!("order {id} has no notification"));
        }
    }

    // Every balance is what was deposited less what was confirmed.
    let balances = rows(
        database,
        "SELECT a.user_id, a.balance, \
           (SELECT coalesce(sum(amount), 0) FROM payments.deposits d WHERE d.user_id = a.user_id), \
           (SELECT coalesce(sum(total), 0) FROM orders.orders o \
              WHERE o.user_id = a.user_id AND o.status = 'CONFIRMED') \
         FROM payments.accounts a",
    )?;
    for b in &balances {
        let parse = |s: &String| s.parse::<i64>().unwrap_or(i64::MIN);
        let (balance, deposits, confirmed) = (parse(&b[1]), parse(&b[2]), parse(&b[3]));
        if balance != deposits - confirmed {
            v.push(format!(
                "{}: balance {balance}, but deposits {deposits} - confirmed {confirmed} = {}",
                b[0],
                deposits - confirmed
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_passes_only_when_every_promise_held() {
        let mut report = ChaosReport {
            drained_in: Some(Duration::from_secs(1)),
            faults: vec![FaultOutcome {
                fault: "x".into(),
                recovery: Some(Duration::from_secs(2)),
                handover: None,
            }],
            ..ChaosReport::default()
        };
        assert!(report.passed(), "{report}");
        report.faults[0].recovery = None;
        assert!(!report.passed());
        report.faults[0].recovery = Some(Duration::from_secs(2));
        report.violations.push("order x has 2 payments".into());
        assert!(!report.passed());
        assert!(report.to_string().contains("order x has 2 payments"));
    }

    #[test]
    fn proc_names_are_cut_at_fifteen_bytes() {
        assert_eq!(short("notification-service"), "notification-se");
        assert_eq!(short("gateway"), "gateway");
    }
}
