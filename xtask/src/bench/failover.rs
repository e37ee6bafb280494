//! Failover: how long a dead instance keeps costing its callers. Two instances of a
//! Spring Boot service (`interop/eureka-client`) behind
//! (a) our registry and gateway, the instances registering through its Eureka API, and
//! (b) Netflix's Eureka server and Spring Cloud Gateway with an `lb://` route through
//!     Spring Cloud LoadBalancer,
//! each run twice: at Spring's defaults, and tuned as a Spring team that wants fast
//! failover tunes (the same short leases on both sides; on (b) also the server's
//! eviction, caches and self-preservation, the client's fetch interval, the balancer's
//! cache and a Retry filter). Both gateways check the same bearer token.
//!
//! Under a steady load through the gateway, one instance is killed with SIGKILL (no
//! deregistration) and the run reports: the errors clients saw, how long requests kept
//! being sent to the dead instance, and when the registry stopped listing it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::Value;

use crate::{
    bench::{
        Report, build_release,
        ours::{Platform, agent},
        scratch,
        spring::{self, SpringProcess, TokenCheck},
    },
    procs::Interrupt,
};

/// Requests per second through the gateway, spread over [`WORKERS`] clients.
const RATE: u32 = 100;
const WORKERS: u32 = 4;
/// Load before the kill, so both instances are known to serve.
const BEFORE_KILL: Duration = Duration::from_secs(10);
/// The run ends this long after the last sign of the dead instance (an error, a
/// refused connection, its registry listing).
const QUIET: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Ours,
    Spring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tuning {
    Defaults,
    Tuned,
}

impl Tuning {
    /// How long to watch after the kill at most.
    fn cap(self) -> Duration {
        match self {
            Tuning::Defaults => Duration::from_secs(300),
            Tuning::Tuned => Duration::from_secs(60),
        }
    }

    /// The instances' Eureka client settings beyond name, address and registry.
    fn instance_properties(self) -> Vec<String> {
        match self {
            Tuning::Defaults => vec![],
            Tuning::Tuned => vec![
                "eureka.instance.lease-renewal-interval-in-seconds=1".into(),
                "eureka.instance.lease-expiration-duration-in-seconds=2".into(),
            ],
        }
    }
}

/// What one run saw after the kill, in seconds from the kill.
#[derive(Debug, Default)]
struct Outcome {
    requests: usize,
    errors: usize,
    last_error: Option<f64>,
    refused: u64,
    last_refused: Option<f64>,
    delisted: Option<f64>,
    watched: f64,
    /// The statuses of errors before the kill (expected none; 0: no answer).
    errors_before: Vec<u16>,
}

pub fn run(interrupt: &Interrupt) -> anyhow::Result<Report> {
    let dir = scratch("failover")?;
    let bin = build_release(&["registry", "gateway"], &[], interrupt)?;
    for program in ["eureka-server", "eureka-client", "gateway"] {
        crate::tools::spring_program(program, interrupt)?;
    }
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        "routes:\n  - id: demo\n    uri: lb://spring-demo\n    predicates:\n      - Path=/hello\n",
    )?;
    let platform = Platform::start(&bin, &dir, &routes, interrupt)?;

    let mut report = Report::new(
        "failover: one of two Spring Boot instances killed under load",
        &[
            "registry and gateway",
            "settings",
            "client errors",
            "errors until (s)",
            "refused connections",
            "dead instance tried until (s)",
            "registry listed it until (s)",
        ],
    );
    let mut outcomes = Vec::new();
    for (side, tuning) in [
        (Side::Ours, Tuning::Defaults),
        (Side::Spring, Tuning::Defaults),
        (Side::Ours, Tuning::Tuned),
        (Side::Spring, Tuning::Tuned),
    ] {
        interrupt.check()?;
        eprintln!("bench: failover, {side:?} at {tuning:?}");
        let outcome = scenario(side, tuning, &platform, &dir, interrupt)?;
        // A time within a second of a run that ended at its cap was still going on.
        let secs = |v: Option<f64>| match v {
            None => "-".to_owned(),
            Some(s) if outcome.delisted.is_none() && s > outcome.watched - 1.0 => {
                format!("> {:.0} (still at the end)", outcome.watched)
            }
            Some(s) => format!("{s:.2}"),
        };
        report.row(vec![
            match side {
                Side::Ours => "ours".into(),
                Side::Spring => "Eureka server + Spring Cloud Gateway".into(),
            },
            match tuning {
                Tuning::Defaults => "Spring's defaults".into(),
                Tuning::Tuned => "tuned for failover".into(),
            },
            format!("{} of {}", outcome.errors, outcome.requests),
            secs(outcome.last_error),
            outcome.refused.to_string(),
            secs(outcome.last_refused),
            outcome.delisted.map_or_else(
                || format!("> {:.0} (still listed)", outcome.watched),
                |s| format!("{s:.2}"),
            ),
        ]);
        outcomes.push((side, tuning, outcome));
    }
    for (side, tuning, outcome) in &outcomes {
        if !outcome.errors_before.is_empty() {
            report.note(format!(
                "- {side:?} at {tuning:?}: {} errors before the kill (statuses {:?}; 0 is \
                 no answer within 5 s).",
                outcome.errors_before.len(),
                outcome.errors_before
            ));
        }
    }
    let find = |s: Side, t: Tuning| {
        outcomes
            .iter()
            .find(|(side, tuning, _)| *side == s && *tuning == t)
            .map(|(_, _, o)| o)
    };
    if let (Some(ours), Some(theirs)) = (
        find(Side::Ours, Tuning::Tuned),
        find(Side::Spring, Tuning::Tuned),
    ) {
        let ours_gone = ours.delisted.unwrap_or(ours.watched);
        let theirs_gone = theirs.delisted.unwrap_or(theirs.watched);
        report.target(
            "tuned: the registry drops the dead instance within 2 s of its 2 s lease, before Eureka does",
            ours_gone <= 2.5 && ours_gone < theirs_gone,
            format!("{ours_gone:.2} s vs {theirs_gone:.2} s"),
        );
        report.target(
            "tuned: no client errors through our gateway",
            ours.errors == 0,
            format!(
                "{} vs {} through Spring Cloud Gateway",
                ours.errors, theirs.errors
            ),
        );
    }
    report.note(format!(
        "{RATE} GET requests/s from {WORKERS} keep-alive clients through each gateway, the \
         same bearer token on both; one instance killed with SIGKILL {} s into the load. \
         Times are seconds after the kill. Errors: any answer but 200, or no answer within \
         5 s. Refused connections are the kernel's count of failed TCP connection attempts \
         (`AttemptFails` in `/proc/net/snmp`, sampled every 10 ms): nothing else on the \
         machine connects to a closed port during a run, so each one is a request (or a \
         retry) sent to the dead instance. Listed: the registry's Eureka API \
         (`GET /eureka/apps/SPRING-DEMO`, what every client reads), polled every 100 ms. A run \
         ends {} s after the last of these, or after {} s ({} s tuned).",
        BEFORE_KILL.as_secs(),
        QUIET.as_secs(),
        Tuning::Defaults.cap().as_secs(),
        Tuning::Tuned.cap().as_secs(),
    ));
    report.note(
        "Spring's defaults: the instances renew every 30 s on a 90 s lease; the Eureka \
         server (`interop/eureka-server`, set up as Spring Cloud's guide says: it neither \
         registers nor fetches) keeps self-preservation on, evicts every 60 s and serves \
         reads from a 30 s cache; Spring Cloud Gateway fetches the registry every 30 s, \
         caches instances in its balancer for 35 s and does not retry. Tuned, on both sides: \
         renewals every 1 s on a 2 s lease; on the Spring side also \
         `eureka.server.enable-self-preservation=false`, \
         `eureka.server.eviction-interval-timer-in-ms=1000`, \
         `eureka.server.use-read-only-response-cache=false`, \
         `eureka.client.registry-fetch-interval-seconds=1`, \
         `spring.cloud.loadbalancer.cache.ttl=1s` and a `Retry=3` filter on the route (GET, \
         connection errors and 502). Our registry and gateway run with their defaults in \
         both runs. Spring Boot 4.0.7, Spring Cloud 2025.1.4, OpenJDK 17, `java -jar`.",
    );
    drop(platform);
    Ok(report)
}

/// One run: the registry and gateway of `side`, two instances at `tuning`, load, a
/// kill, and what followed.
fn scenario(
    side: Side,
    tuning: Tuning,
    platform: &Platform,
    dir: &std::path::Path,
    interrupt: &Interrupt,
) -> anyhow::Result<Outcome> {
    let tag = format!("{side:?}-{tuning:?}").to_lowercase();
    let log = |name: &str| dir.join(format!("{tag}-{name}.log"));
    // The Spring side's registry and gateway; ours run throughout.
    let mut spring_side: Vec<SpringProcess> = Vec::new();
    let (zone, registry_url, gateway_url) = match side {
        Side::Ours => (
            platform.eureka_zone(),
            platform.registry_url(),
            platform.gateway_url.clone(),
        ),
        Side::Spring => {
            // Standalone, as Spring Cloud's guide sets it up: it neither registers nor
            // fetches, and its own address is its zone, so it has no peer to replicate
            // to (otherwise it would keep trying localhost:8761).
            let port = crate::free_port()?;
            let mut properties = vec![
                "eureka.client.register-with-eureka=false".to_owned(),
                "eureka.client.fetch-registry=false".to_owned(),
                format!("eureka.client.service-url.defaultZone=http://127.0.0.1:{port}/eureka/"),
            ];
            if tuning == Tuning::Tuned {
                properties.extend([
                    "eureka.server.enable-self-preservation=false".to_owned(),
                    "eureka.server.eviction-interval-timer-in-ms=1000".to_owned(),
                    "eureka.server.use-read-only-response-cache=false".to_owned(),
                ]);
            }
            let eureka = spring::start(
                "eureka-server",
                port,
                &properties,
                &log("eureka-server"),
                interrupt,
            )?;
            let url = eureka.url();
            spring_side.push(eureka);
            (format!("{url}/eureka/"), url, String::new())
        }
    };
    let mut instances = Vec::new();
    for n in 1..=2 {
        let mut properties = vec![
            "spring.application.name=spring-demo".to_owned(),
            "eureka.instance.hostname=127.0.0.1".to_owned(),
            format!("eureka.client.service-url.defaultZone={zone}"),
        ];
        properties.extend(tuning.instance_properties());
        instances.push(spring::start(
            "eureka-client",
            crate::free_port()?,
            &properties,
            &log(&format!("instance-{n}")),
            interrupt,
        )?);
    }
    let gateway_url = if side == Side::Spring {
        let mut properties = spring::gateway_properties(
            &zone,
            "demo",
            "spring-demo",
            "/hello",
            &TokenCheck::of_gateway(&platform.gateway_url),
        );
        if tuning == Tuning::Tuned {
            properties.extend([
                "eureka.client.registry-fetch-interval-seconds=1".to_owned(),
                "spring.cloud.loadbalancer.cache.ttl=1s".to_owned(),
                "spring.cloud.gateway.server.webflux.routes[0].filters[0]=Retry=3".to_owned(),
            ]);
        }
        let gateway = spring::start(
            "gateway",
            crate::free_port()?,
            &properties,
            &log("gateway"),
            interrupt,
        )?;
        let url = gateway.url();
        spring_side.push(gateway);
        url
    } else {
        gateway_url
    };
    let hello = format!("{gateway_url}/hello");
    let ports: Vec<u16> = instances.iter().map(|i| i.port).collect();
    wait_both_served(&hello, &platform.jwt, &ports, interrupt)?;

    // Load, then the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (stop, samples, hello, jwt) = (
                stop.clone(),
                samples.clone(),
                hello.clone(),
                platform.jwt.clone(),
            );
            std::thread::spawn(move || load(w, &hello, &jwt, start, &stop, &samples))
        })
        .collect();
    let refusals = RefusalWatch::start(stop.clone());
    let until = Instant::now() + BEFORE_KILL;
    while Instant::now() < until {
        interrupt.check()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let victim = instances.remove(0);
    let victim_port = victim.port;
    let refused_before = refusals.count();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.child.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .context("cannot kill the instance")?;
    let killed = Instant::now();
    let since = |t: Instant| t.saturating_duration_since(killed).as_secs_f64();

    let apps = format!("{registry_url}/eureka/apps/SPRING-DEMO");
    let poller = agent();
    let mut delisted: Option<Instant> = None;
    loop {
        interrupt.check()?;
        if delisted.is_none() && !listed(&poller, &apps, victim_port) {
            delisted = Some(Instant::now());
        }
        let last_error = samples
            .lock()
            .expect("samples")
            .iter()
            .rev()
            .find(|(_, status)| *status != 200)
            .map(|(t, _)| *t);
        let last_sign = [Some(killed), delisted, last_error, refusals.last()]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(killed);
        if (delisted.is_some() && last_sign.elapsed() >= QUIET) || killed.elapsed() >= tuning.cap()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let watched = killed.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = worker.join();
    }
    let samples = samples.lock().expect("samples");
    let after: Vec<_> = samples.iter().filter(|(t, _)| *t >= killed).collect();
    let failed = |sample: &&&(Instant, u16)| sample.1 != 200;
    let last_refused = refusals.last().filter(|t| *t >= killed);
    let outcome = Outcome {
        requests: after.len(),
        errors: after.iter().filter(failed).count(),
        last_error: after
            .iter()
            .filter(failed)
            .map(|(t, _)| since(*t))
            .reduce(f64::max),
        refused: refusals.count().saturating_sub(refused_before),
        last_refused: last_refused.map(since),
        delisted: delisted.map(since),
        watched,
        errors_before: samples
            .iter()
            .filter(|(t, status)| *t < killed && *status != 200)
            .map(|(_, status)| *status)
            .collect(),
    };
    drop(victim);
    drop(instances);
    drop(spring_side);
    Ok(outcome)
}

/// Waits until requests through `hello` have been answered by every one of `ports`.
fn wait_both_served(
    hello: &str,
    jwt: &str,
    ports: &[u16],
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let client = agent();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    while seen.len() < ports.len() {
        interrupt.check()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{hello} reached only {seen:?} of the instances on {ports:?}"
        );
        if let Ok(mut response) = client
            .get(hello)
            .header("authorization", &format!("Bearer {jwt}"))
            .call()
            && response.status() == 200
            && let Ok(body) = response.body_mut().read_json::<Value>()
            && let Some(port) = body["port"].as_u64()
        {
            seen.insert(port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One load client: `RATE / WORKERS` requests a second on a fixed schedule (a late
/// request is sent at once, never skipped), each recorded as (sent at, status), the
/// status 0 when no answer came within 5 s.
fn load(
    worker: u32,
    hello: &str,
    jwt: &str,
    start: Instant,
    stop: &AtomicBool,
    samples: &Mutex<Vec<(Instant, u16)>>,
) {
    let client: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let interval = Duration::from_secs(1) * WORKERS / RATE;
    let mut next = start + interval * worker / WORKERS;
    let bearer = format!("Bearer {jwt}");
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += interval;
        let sent = Instant::now();
        let status = client
            .get(hello)
            .header("authorization", &bearer)
            .call()
            .ok()
            .and_then(|mut r| {
                let status = r.status().as_u16();
                r.body_mut().read_to_vec().ok().map(|_| status)
            })
            .unwrap_or(0);
        samples.lock().expect("samples").push((sent, status));
    }
}

/// Whether the registry's Eureka API lists an instance on `port` at `apps`.
fn listed(client: &ureq::Agent, apps: &str, port: u16) -> bool {
    let Ok(mut response) = client.get(apps).header("accept", "application/json").call() else {
        return true;
    };
    if response.status() == 404 {
        return false;
    }
    let Ok(body) = response.body_mut().read_json::<Value>() else {
        return true;
    };
    let instances = &body["application"]["instance"];
    let all: Vec<&Value> = match instances {
        Value::Array(list) => list.iter().collect(),
        Value::Null => vec![],
        one => vec![one],
    };
    all.iter()
        .any(|i| i["port"]["$"].as_u64() == Some(u64::from(port)))
}

/// The kernel's count of failed TCP connection attempts, sampled every 10 ms: its
/// total and when it last grew.
struct RefusalWatch {
    state: Arc<Mutex<(u64, Option<Instant>)>>,
}

impl RefusalWatch {
    fn start(stop: Arc<AtomicBool>) -> Self {
        let state: Arc<Mutex<(u64, Option<Instant>)>> =
            Arc::new(Mutex::new((attempt_fails(), None)));
        let shared = state.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let now = attempt_fails();
                let mut state = shared.lock().expect("refusals");
                if now > state.0 {
                    *state = (now, Some(Instant::now()));
                }
                drop(state);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { state }
    }

    fn count(&self) -> u64 {
        self.state.lock().expect("refusals").0
    }

    fn last(&self) -> Option<Instant> {
        self.state.lock().expect("refusals").1
    }
}

/// `Tcp: AttemptFails` from `/proc/net/snmp`.
fn attempt_fails() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "AttemptFails")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}
