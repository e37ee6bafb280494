//! The saga end to end: the whole stack (`xtask up --release`, its own PostgreSQL and
//! broker); `hey` places orders through the gateway at increasing rates; confirmations
//! are counted in the orders table, and the latency from the order's insert to its
//! CONFIRMED update is read from the same rows (no polling skews it). Alongside, on
//! the same PostgreSQL, pgbench's simple-update TPS as the ceiling.
//! Target: at least 1,000 confirmed orders per second, p99 under 250 ms at half that.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{
    bench::{Report, scratch},
    procs::Interrupt,
    tools::debian_tool,
};

const STEP_SECONDS: u64 = 10;
const RATES: [f64; 5] = [250.0, 500.0, 1000.0, 1500.0, 2000.0];
/// A step is sustained when its orders are all final this long after it ends.
const DRAIN: Duration = Duration::from_secs(3);

/// `xtask up --release` on free ports with its own database and broker; stopped with
/// SIGINT when dropped.
struct Stack {
    up: crate::stack::UpProcess,
    gateway: String,
    database: String,
}

fn start_stack(
    dir: &std::path::Path,
    brokers: usize,
    interrupt: &Interrupt,
) -> anyhow::Result<Stack> {
    let brokers = brokers.to_string();
    let up = crate::stack::UpProcess::start(
        &std::env::current_exe()?,
        &["--release", "--brokers", &brokers],
        &dir.join("stack.env"),
        &dir.join("stack.log"),
        interrupt,
    )?;
    Ok(Stack {
        gateway: up.var("GATEWAY_URL")?.to_owned(),
        database: up.var("DATABASE_URL")?.to_owned(),
        up,
    })
}

fn psql(database: &str, sql: &str) -> anyhow::Result<String> {
    crate::postgres::psql(database, sql)
}

fn number(database: &str, sql: &str) -> anyhow::Result<f64> {
    let text = psql(database, sql)?;
    Ok(text.parse().unwrap_or(0.0))
}

/// What one step of load did.
#[derive(Debug, Clone, Default)]
struct Step {
    offered: f64,
    posted: f64,
    confirmed: f64,
    confirmed_per_s: f64,
    pending_after: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Cores each part used on average, from the step's start until its orders were
    /// final (or the drain time ran out), the busiest first.
    cores: Vec<(String, f64)>,
}

/// Whether everything placed so far has gone all the way through: no order waiting
/// for its payment, no outbox row unpublished, no mail unsent.
fn drained(database: &str) -> anyhow::Result<bool> {
    let left = number(
        database,
        "SELECT (SELECT count(*) FROM orders.orders WHERE status = 'PENDING') \
         + (SELECT count(*) FROM orders.outbox WHERE published_at IS NULL) \
         + (SELECT count(*) FROM payments.outbox WHERE published_at IS NULL) \
         + (SELECT count(*) FROM notifications.notifications WHERE status = 'PENDING')",
    )?;
    Ok(left == 0.0)
}

/// Waits (up to five minutes) until the pipeline is [`drained`], so a step's figures
/// are not those of the previous step's backlog.
fn wait_drained(stack: &Stack, interrupt: &Interrupt) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !drained(&stack.database)? {
        interrupt.check()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline did not drain within 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// The names `cpu_by_name` finds, as the report calls them.
fn part(name: &str) -> &str {
    match name {
        "java" => "broker (Apache Kafka)",
        "postgres" => "PostgreSQL",
        "python3" | "python" => "mail sink (aiosmtpd)",
        "notification-se" => "notification-service",
        other => other,
    }
}

/// Places orders at `rate` per second for `seconds` with hey; reads the outcome.
fn step(stack: &Stack, token: &str, rate: f64, seconds: u64) -> anyhow::Result<Step> {
    let hey = debian_tool("hey", "hey")?;
    let workers = 100.0_f64.min(rate).max(1.0);
    let mark = psql(&stack.database, "SELECT now()")?;
    let cpu_before = crate::bench::cpu_by_name(stack.up.pid());
    let hey_before = crate::bench::children_cpu_seconds();
    let idle_before = crate::bench::machine_idle_seconds();
    let started = Instant::now();
    let output = Command::new(hey)
        .args(["-z", &format!("{seconds}s")])
        .args(["-c", &format!("{workers}")])
        .args(["-q", &format!("{:.3}", rate / workers)])
        .args(["-m", "POST", "-T", "application/json"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "-d",
            r#"{"items":[{"sku":"BOOK-1","quantity":2,"unitPrice":1250}],"currency":"EUR"}"#,
        ])
        .arg(format!("{}/orders", stack.gateway))
        .output()
        .context("cannot run hey")?;
    let hey_cpu = crate::bench::children_cpu_seconds() - hey_before;
    let report = String::from_utf8_lossy(&output.stdout);
    let posted: f64 = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("[201]"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    // Let the saga finish what was placed.
    let window = format!("created_at >= '{mark}'");
    let deadline = Instant::now() + DRAIN;
    while Instant::now() < deadline {
        let pending = number(
            &stack.database,
            &format!("SELECT count(*) FROM orders.orders WHERE {window} AND status = 'PENDING'"),
        )?;
        if pending == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu_after = crate::bench::cpu_by_name(stack.up.pid());
    let mut cores: Vec<(String, f64)> = cpu_after
        .iter()
        .map(|(name, after)| {
            let before = cpu_before.get(name).copied().unwrap_or(0.0);
            (part(name).to_owned(), (after - before) / wall)
        })
        .filter(|(_, cores)| *cores >= 0.005)
        .collect();
    cores.push(("load (hey)".into(), hey_cpu / wall));
    cores.push((
        "idle".into(),
        (crate::bench::machine_idle_seconds() - idle_before) / wall,
    ));
    cores.sort_by(|a, b| b.1.total_cmp(&a.1));
    let confirmed = number(
        &stack.database,
        &format!("SELECT count(*) FROM orders.orders WHERE {window} AND status = 'CONFIRMED'"),
    )?;
    let span = number(
        &stack.database,
        &format!(
            "SELECT COALESCE(EXTRACT(EPOCH FROM max(updated_at) - min(created_at)), 0) \
             FROM orders.orders WHERE {window} AND status = 'CONFIRMED'"
        ),
    )?;
    let pending_after = number(
        &stack.database,
        &format!("SELECT count(*) FROM orders.orders WHERE {window} AND status = 'PENDING'"),
    )?;
    let latency = |p: f64| {
        number(
            &stack.database,
            &format!(
                "SELECT COALESCE(1000 * percentile_cont({p}) WITHIN GROUP \
                 (ORDER BY EXTRACT(EPOCH FROM updated_at - created_at)), 0) \
                 FROM orders.orders WHERE {window} AND status = 'CONFIRMED'"
            ),
        )
    };
    Ok(Step {
        offered: rate,
        posted: posted / seconds as f64,
        confirmed,
        confirmed_per_s: confirmed / span.max(seconds as f64),
        pending_after,
        p50_ms: latency(0.5)?,
        p99_ms: latency(0.99)?,
        cores,
    })
}

/// pgbench's built-in simple-update, 8 clients, on the stack's PostgreSQL.
fn pgbench(stack: &Stack) -> anyhow::Result<f64> {
    let pgbench = ["/usr/bin/pgbench"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .chain(
            crate::postgres::server_bindir()
                .ok()
                .map(|d| d.join("pgbench")),
        )
        .find(|p| p.exists())
        .context("pgbench not found (it comes with PostgreSQL)")?;
    let _ = psql(&stack.database, "DROP DATABASE IF EXISTS pgbench");
    psql(&stack.database, "CREATE DATABASE pgbench")?;
    let (base, _) = stack.database.rsplit_once('/').context("a database URL")?;
    let url = format!("{base}/pgbench");
    let init = Command::new(&pgbench)
        .args(["-i", "-s", "10", "-q"])
        .arg(&url)
        .output()?;
    if !init.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    }
    let run = Command::new(&pgbench)
        .args([
            "-b",
            "simple-update",
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            &STEP_SECONDS.to_string(),
        ])
        .arg(&url)
        .output()?;
    let text = String::from_utf8_lossy(&run.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no tps in pgbench's output:\n{text}"))
}

/// The saga on a stack with `brokers` Kafka nodes.
pub fn run(interrupt: &Interrupt, brokers: usize) -> anyhow::Result<Report> {
    let dir = scratch("saga")?;
    debian_tool("hey", "hey")?;
    eprintln!("bench: starting the stack (release build, {brokers} Kafka node(s))");
    let stack = start_stack(&dir, brokers, interrupt)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let login: Value = agent
        .post(&format!("{}/auth/token", stack.gateway))
        .send_json(json!({"username": "sim-001", "password": crate::stack::SIM_PASSWORD}))?
        .body_mut()
        .read_json()?;
    let token = login["access_token"]
        .as_str()
        .context("no token")?
        .to_owned();
    let funded = agent
        .post(&format!("{}/payments/accounts/me/deposits", stack.gateway))
        .header("authorization", &format!("Bearer {token}"))
        .send_json(json!({"amount": 1_000_000_000_000_i64, "currency": "EUR"}))?
        .status();
    anyhow::ensure!(funded == 200, "the deposit answered {funded}");

    // Warm-up: connections, caches, the JIT-free but cold paths.
    step(&stack, &token, 100.0, 3)?;
    let mut steps = Vec::new();
    for rate in RATES {
        interrupt.check()?;
        wait_drained(&stack, interrupt)?;
        eprintln!("bench: {rate} orders/s for {STEP_SECONDS} s");
        let s = step(&stack, &token, rate, STEP_SECONDS)?;
        let kept_up = s.pending_after == 0.0 && s.confirmed_per_s >= 0.95 * rate;
        steps.push(s);
        if !kept_up {
            break;
        }
    }
    let sustained = steps
        .iter()
        .filter(|s| s.pending_after == 0.0 && s.confirmed_per_s >= 0.95 * s.offered)
        .map(|s| s.confirmed_per_s)
        .fold(0.0, f64::max);
    let half = (sustained / 2.0).max(50.0);
    // The latency step starts on an empty pipeline: whatever a step that did not keep
    // up left behind (orders, outbox rows, mail) is finished first.
    wait_drained(&stack, interrupt)?;
    eprintln!("bench: latency at {half:.0} orders/s");
    let at_half = step(&stack, &token, half, STEP_SECONDS)?;
    eprintln!("bench: pgbench simple-update on the same PostgreSQL");
    let tps = pgbench(&stack)?;
    drop(stack);

    let title = match brokers {
        1 => "saga: confirmed orders per second through the gateway, one Kafka node".to_owned(),
        n => format!(
            "saga: confirmed orders per second through the gateway, {n} Kafka nodes \
             (replication factor {n}, min.insync.replicas 2)"
        ),
    };
    let mut report = Report::new(
        &title,
        &[
            "offered orders/s",
            "accepted (201)/s",
            "confirmed",
            "confirmed/s",
            "still PENDING 3 s after",
            "p50 insert→CONFIRMED (ms)",
            "p99 (ms)",
        ],
    );
    for s in steps.iter().chain(std::iter::once(&at_half)) {
        report.row(vec![
            format!("{:.0}", s.offered),
            format!("{:.0}", s.posted),
            format!("{:.0}", s.confirmed),
            format!("{:.0}", s.confirmed_per_s),
            format!("{:.0}", s.pending_after),
            format!("{:.1}", s.p50_ms),
            format!("{:.1}", s.p99_ms),
        ]);
    }
    for s in steps.iter().chain(std::iter::once(&at_half)) {
        let parts: Vec<String> = s
            .cores
            .iter()
            .map(|(name, cores)| format!("{name} {cores:.2}"))
            .collect();
        report.note(format!(
            "- cores used at {:.0} orders/s: {}",
            s.offered,
            parts.join(", ")
        ));
    }
    report.note(format!(
        "- pgbench simple-update on the same PostgreSQL (8 clients, {STEP_SECONDS} s): **{tps:.0} TPS**; \
         sustained confirmed orders/s is {:.0}% of it.",
        100.0 * sustained / tps.max(1.0)
    ));
    report.target(
        "at least 1,000 confirmed orders per second",
        sustained >= 1000.0,
        format!("{sustained:.0}/s sustained"),
    );
    report.target(
        "p99 under 250 ms at half the sustained rate",
        at_half.p99_ms < 250.0,
        format!(
            "{:.1} ms at {half:.0}/s (p50 {:.1} ms)",
            at_half.p99_ms, at_half.p50_ms
        ),
    );
    report.note(format!(
        "Load: hey (Debian), 100 workers, one customer's token, POST /orders through the gateway \
         for {STEP_SECONDS} s per step; a step is sustained when its orders are all final 3 s after \
         it ends and confirmations kept 95% of the offered rate. Latency is `updated_at - \
         created_at` of each CONFIRMED order, both set by PostgreSQL. Every step starts once the \
         previous one's orders, outbox rows and mail are all through. Cores used: CPU seconds \
         per process (from `/proc`) over the step and its drain, divided by that time. \
         Everything on the same 2 cores."
    ));
    Ok(report)
}
