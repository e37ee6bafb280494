//! `cargo xtask simulate`: customers shopping through the gateway of a running stack.
//!
//! Logs in `--users` of the stack's simulation customers, funds each with a random
//! balance, then places `--orders` orders at `--rate` per second, each with one to four
//! lines from a small catalogue, every one with an `Idempotency-Key`. Each order is
//! followed until it is final. A progress line shows how far it got; the end prints
//! confirmed and rejected counts and the latency from POST to final status.

use std::{
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rand::Rng;
use serde_json::{Value, json};

use crate::stack::{SIM_PASSWORD, SIM_USERS, sim_user};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub users: usize,
    pub orders: usize,
    /// Orders per second.
    pub rate: f64,
    /// The gateway; else `GATEWAY_URL` from `target/stack.env`.
    pub gateway: Option<String>,
    /// Requests in flight at most.
    pub concurrency: usize,
}

const CATALOGUE: [(&str, i64); 8] = [
    ("BOOK-1", 1250),
    ("BOOK-2", 2399),
    ("MUG-1", 899),
    ("LAMP-7", 4500),
    ("PEN-3", 199),
    ("BAG-2", 3999),
    ("TEA-5", 650),
    ("CARD-9", 350),
];

/// What happened to one order.
#[derive(Debug, Clone)]
enum Outcome {
    Confirmed(Duration),
    Rejected(Duration),
    Failed(String),
}

/// A client of the gateway; a stack started with `--tls` is trusted through its CA
/// (`STOREFRONT_CA_FILE`, from the environment or the stack's env file).
fn agent() -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .max_idle_connections_per_host(256);
    let ca = std::env::var("STOREFRONT_CA_FILE").ok().or_else(|| {
        std::fs::read_to_string(crate::stack::stack_env_path())
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("export STOREFRONT_CA_FILE="))
            .map(str::to_owned)
    });
    if let Some(tls) = ca.and_then(|ca| crate::stack::trusting(std::path::Path::new(&ca))) {
        config = config.tls_config(tls);
    }
    config.build().into()
}

/// The gateway URL: given, or from the running stack's env file.
fn gateway_url(given: Option<String>) -> anyhow::Result<String> {
    if let Some(url) = given {
        return Ok(url);
    }
    if let Ok(url) = std::env::var("GATEWAY_URL") {
        return Ok(url);
    }
    let path = crate::stack::stack_env_path();
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no running stack: {} is missing (start `cargo xtask up`, or pass --gateway)",
            path.display()
        )
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("export GATEWAY_URL="))
        .map(str::to_owned)
        .with_context(|| format!("{} names no GATEWAY_URL", path.display()))
}

/// Logs `user`, one of the stack's simulation customers, in; returns the bearer token.
pub(crate) fn login(agent: &ureq::Agent, gateway: &str, user: &str) -> anyhow::Result<String> {
    let mut response = agent
        .post(&format!("{gateway}/auth/token"))
        .send_json(json!({"username": user, "password": SIM_PASSWORD}))
        .context("cannot reach the gateway")?;
    if response.status() != 200 {
        bail!(
            "cannot log in as {user} ({}); is this a `cargo xtask up` stack?",
            response.status()
        );
    }
    let body: Value = response.body_mut().read_json()?;
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("no access_token in the answer")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    crate::bench::nearest_rank(sorted, p).unwrap_or_default()
}

/// Runs the simulation and prints its summary.
pub fn simulate(options: &SimulateOptions) -> anyhow::Result<()> {
    if options.users == 0 || options.users > SIM_USERS {
        bail!("--users must be 1 to {SIM_USERS} (the stack seeds that many simulation customers)");
    }
    if options.rate <= 0.0 {
        bail!("--rate must be above 0 (orders per second)");
    }
    let gateway = gateway_url(options.gateway.clone())?;
    let agent = agent();
    eprintln!(
        "simulate: logging in and funding {} customers",
        options.users
    );
    let mut rng = rand::rng();
    let mut tokens = Vec::with_capacity(options.users);
    for i in 1..=options.users {
        let user = sim_user(i);
        let token = login(&agent, &gateway, &user)?;
        // Some customers rich, some soon broke: both outcomes of the saga happen.
        let amount: i64 = rng.random_range(2_000..=60_000);
        let status = agent
            .post(&format!("{gateway}/payments/accounts/me/deposits"))
            .header("authorization", &format!("Bearer {token}"))
            .header("idempotency-key", &uuid_like())
            .send_json(json!({"amount": amount, "currency": "EUR"}))?
            .status();
        if status != 200 {
            bail!("the deposit for {user} was refused ({status})");
        }
        tokens.push(token);
    }

    let tokens = Arc::new(tokens);
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<(usize, Value)>(options.concurrency * 2);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let (done_tx, done_rx) = mpsc::channel::<Outcome>();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let jobs = jobs_rx.clone();
        let done = done_tx.clone();
        let tokens = tokens.clone();
        let gateway = gateway.clone();
        let agent = agent.clone();
        workers.push(std::thread::spawn(move || {
            loop {
                let job = jobs.lock().map(|rx| rx.recv());
                let Ok(Ok((user, order))) = job else { return };
                let outcome = place_and_follow(&agent, &gateway, &tokens[user], &order);
                if done.send(outcome).is_err() {
                    return;
                }
            }
        }));
    }
    drop(done_tx);

    eprintln!(
        "simulate: placing {} orders at {} per second",
        options.orders, options.rate
    );
    let placed = Arc::new(AtomicUsize::new(0));
    let feeder = {
        let placed = placed.clone();
        let options = options.clone();
        std::thread::spawn(move || {
            let mut rng = rand::rng();
            let start = Instant::now();
            for n in 0..options.orders {
                let due = start + Duration::from_secs_f64(n as f64 / options.rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let lines = rng.random_range(1..=4);
                let items: Vec<Value> = (0..lines)
                    .map(|_| {
                        let (sku, price) = CATALOGUE[rng.random_range(0..CATALOGUE.len())];
                        json!({"sku": sku, "quantity": rng.random_range(1..=3), "unitPrice": price})
                    })
                    .collect();
                let user = rng.random_range(0..options.users);
                if jobs_tx
                    .send((user, json!({"items": items, "currency": "EUR"})))
                    .is_err()
                {
                    return;
                }
                placed.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let started = Instant::now();
    let mut confirmed = Vec::new();
    let mut rejected = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    for outcome in done_rx.iter() {
        match outcome {
            Outcome::Confirmed(t) => confirmed.push(t),
            Outcome::Rejected(t) => rejected.push(t),
            Outcome::Failed(e) => failures.push(e),
        }
        let finished = confirmed.len() + rejected.len() + failures.len();
        if last_draw.elapsed() > Duration::from_millis(200) || finished == options.orders {
            draw(
                finished,
                options.orders,
                confirmed.len(),
                rejected.len(),
                failures.len(),
            );
            last_draw = Instant::now();
        }
        if finished == options.orders {
            break;
        }
    }
    let _ = feeder.join();
    for worker in workers {
        let _ = worker.join();
    }
    eprintln!();
    let elapsed = started.elapsed();
    let mut all: Vec<Duration> = confirmed.iter().chain(&rejected).copied().collect();
    all.sort();
    println!(
        "orders: {} placed in {:.1} s ({:.1}/s)",
        placed.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        placed.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(0.001)
    );
    println!("confirmed: {}", confirmed.len());
    println!("rejected:  {}", rejected.len());
    if !failures.is_empty() {
        println!("failed:    {} (first: {})", failures.len(), failures[0]);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "POST to final status: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&all, 50.0)),
        ms(percentile(&all, 90.0)),
        ms(percentile(&all, 99.0)),
        ms(all.last().copied().unwrap_or_default())
    );
    if !failures.is_empty() {
        bail!("{} orders failed", failures.len());
    }
    Ok(())
}

fn draw(finished: usize, total: usize, confirmed: usize, rejected: usize, failed: usize) {
    let width = 30;
    let filled = (finished * width) / total.max(1);
    eprint!(
        "\r[{}{}] {finished}/{total} confirmed {confirmed} rejected {rejected} failed {failed}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

/// POSTs `order` and polls it until it is final.
fn place_and_follow(agent: &ureq::Agent, gateway: &str, token: &str, order: &Value) -> Outcome {
    let bearer = format!("Bearer {token}");
    let start = Instant::now();
    let created = agent
        .post(&format!("{gateway}/orders"))
        .header("authorization", &bearer)
        .header("idempotency-key", &uuid_like())
        .send_json(order);
    let mut created = match created {
        Ok(r) if r.status() == 201 => r,
        Ok(r) => return Outcome::Failed(format!("POST /orders answered {}", r.status())),
        Err(e) => return Outcome::Failed(format!("POST /orders: {e}")),
    };
    let id = match created.body_mut().read_json::<Value>() {
        Ok(body) => body["id"].as_str().unwrap_or_default().to_owned(),
        Err(e) => return Outcome::Failed(format!("POST /orders body: {e}")),
    };
    let deadline = start + Duration::from_secs(60);
    loop {
        let status = agent
            .get(&format!("{gateway}/orders/{id}"))
            .header("authorization", &bearer)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
            .and_then(|o| o["status"].as_str().map(str::to_owned));
        match status.as_deref() {
            Some("CONFIRMED") => return Outcome::Confirmed(start.elapsed()),
            Some("REJECTED") => return Outcome::Rejected(start.elapsed()),
            _ if Instant::now() > deadline => {
                return Outcome::Failed(format!("order {id} not final after 60 s"));
            }
            _ => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

fn uuid_like() -> String {
    crate::random_token(24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }
}
