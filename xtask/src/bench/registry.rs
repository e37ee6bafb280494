//! Registry at scale: 10,000 instances (100 services x 100) registered and
//! heartbeating. Reports heartbeats per second at saturation (wrk, 64 connections),
//! their p99 latency, the p99 time for a change to reach 100 watchers, and memory.
//! Targets: at least 30,000 heartbeats per second, watch p99 under 50 ms, RSS under
//! 64 MB.

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::json;

use crate::{
    bench::{Report, build_release, memory_mib, nearest_rank, scratch, wait_http_ok, wrk},
    procs::{Interrupt, Supervised},
};

const SERVICES: usize = 100;
const PER_SERVICE: usize = 100;
const WATCHERS: usize = 100;
const CHANGES: usize = 30;

pub fn run(interrupt: &Interrupt) -> anyhow::Result<Report> {
    let dir = scratch("registry")?;
    let bin = build_release(&["registry"], &[], interrupt)?;
    let port = crate::free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let token = crate::random_token(32);
    let log = fs::File::create(dir.join("registry.log"))?;
    let registry = Supervised::spawn(
        "registry",
        Command::new(bin.join("registry"))
            .env("REGISTRY_HTTP__PORT", port.to_string())
            .env("REGISTRY_TOKEN", &token)
            .env("REGISTRY_LOG__LEVEL", "warn")
            // The watchers stand for that many clients, but all come from this one.
            .env(
                "REGISTRY_LEASES__MAX_WATCHERS_PER_CLIENT",
                (WATCHERS + 1).to_string(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    wait_http_ok(
        &format!("{base}/actuator/health"),
        Duration::from_secs(30),
        interrupt,
    )?;

    eprintln!("bench: registering {} instances", SERVICES * PER_SERVICE);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    register_all(&agent, std::slice::from_ref(&base), &token)?;
    interrupt.check()?;

    eprintln!("bench: heartbeats at saturation (wrk, 2 threads, 64 connections, 15 s)");
    let beats = wrk(
        &[
            "-t2".into(),
            "-c64".into(),
            "-d15s".into(),
            "-s".into(),
            "registry-heartbeat.lua".into(),
            base.clone(),
        ],
        &[("REGISTRY_TOKEN", &token)],
    )?;

    eprintln!("bench: {CHANGES} changes seen by {WATCHERS} watchers");
    let latencies: Vec<f64> = deliveries(
        &vec![base.clone(); WATCHERS],
        "watched",
        CHANGES,
        |_| base.clone(),
        Duration::from_millis(50),
        &token,
        &agent,
    )?
    .into_iter()
    .map(|(_, _, ms)| ms)
    .collect();
    let rss = memory_mib(registry.pid(), "VmRSS");
    let peak = memory_mib(registry.pid(), "VmHWM");
    drop(registry);

    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| nearest_rank(&sorted, p).unwrap_or(f64::NAN);
    let mut report = Report::new(
        "registry: 10,000 instances heartbeating, 100 watchers",
        &[
            "heartbeats/s",
            "heartbeat p50 (ms)",
            "heartbeat p99 (ms)",
            "errors",
            "watch p50 (ms)",
            "watch p99 (ms)",
            "RSS (MiB)",
            "peak RSS (MiB)",
        ],
    );
    report.row(vec![
        format!("{:.0}", beats.rate()),
        format!("{:.2}", beats.p50_ms),
        format!("{:.2}", beats.p99_ms),
        format!("{:.0}", beats.errors),
        format!("{:.2}", pct(50.0)),
        format!("{:.2}", pct(99.0)),
        format!("{rss:.1}"),
        format!("{peak:.1}"),
    ]);
    report.target(
        "at least 30,000 heartbeats per second",
        beats.rate() >= 30_000.0 && beats.errors == 0.0,
        format!("{:.0}/s, {} errors", beats.rate(), beats.errors),
    );
    report.target(
        "watch p99 under 50 ms",
        pct(99.0) < 50.0,
        format!("{:.2} ms over {} deliveries", pct(99.0), latencies.len()),
    );
    report.target(
        "RSS under 64 MB",
        peak < 64.0,
        format!("{rss:.1} MiB now, {peak:.1} MiB at peak"),
    );
    report.note(format!(
        "wrk (Debian) with `xtask/bench/registry-heartbeat.lua` on the same 2 cores as the \
         registry. Watch: {WATCHERS} SSE streams on `/api/v1/watch?service=watched`; each of \
         {CHANGES} registrations is timed from just before its POST to its arrival at each watcher."
    ));
    Ok(report)
}

/// Registers the 10,000 instances (`svc-NN` / `svc-NN-MM`) from four threads, each
/// service at the next of `bases` in turn.
fn register_all(agent: &ureq::Agent, bases: &[String], token: &str) -> anyhow::Result<()> {
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let agent = agent.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    for s in (w..SERVICES).step_by(4) {
                        let base = &bases[s % bases.len()];
                        for i in 0..PER_SERVICE {
                            let status = agent
                                .post(&format!("{base}/api/v1/services/svc-{s:02}/instances"))
                                .header("authorization", &format!("Bearer {token}"))
                                .send_json(json!({
                                    "instanceId": format!("svc-{s:02}-{i:02}"),
                                    "host": format!("10.0.{s}.{i}"),
                                    "port": 8080,
                                    "leaseSeconds": 120,
                                }))?
                                .status();
                            if status != 201 {
                                bail!("registering svc-{s:02}-{i:02} answered {status}");
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a register thread panicked"))??;
        }
        Ok(())
    })
}

/// Registry peers in the three-peer run.
const PEERS: usize = 3;
/// Changes timed from a write at one peer to a watcher at each peer.
const PEER_CHANGES: usize = 200;

/// Three peers that replicate to each other, the same 10,000 instances registered
/// across them. Reports heartbeats per second across the group (one wrk per peer at
/// once, every heartbeat replicated to the two other peers) and, under that load, how
/// long a write at one peer takes to reach a watcher at another, next to a watcher at
/// the peer written to.
pub fn run_peers(interrupt: &Interrupt) -> anyhow::Result<Report> {
    let dir = scratch("registry-peers")?;
    let bin = build_release(&["registry"], &[], interrupt)?;
    let token = crate::random_token(32);
    let ports = crate::free_ports(PEERS)?;
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let all = bases.join(",");
    let mut peers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let log = fs::File::create(dir.join(format!("registry-{i}.log")))?;
        peers.push(Supervised::spawn(
            "registry",
            Command::new(bin.join("registry"))
                .env("REGISTRY_HTTP__PORT", port.to_string())
                .env("REGISTRY_TOKEN", &token)
                .env("REGISTRY_PEERS__URLS", &all)
                .env("REGISTRY_LOG__LEVEL", "warn")
                .env(
                    "REGISTRY_LEASES__MAX_WATCHERS_PER_CLIENT",
                    (WATCHERS + 1).to_string(),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    for base in &bases {
        wait_http_ok(
            &format!("{base}/api/v1/state"),
            Duration::from_secs(30),
            interrupt,
        )?;
    }

    eprintln!(
        "bench: registering {} instances across {PEERS} peers",
        SERVICES * PER_SERVICE
    );
    register_all(&agent, &bases, &token)?;
    // Every peer lists all of them before the load starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    for base in &bases {
        loop {
            interrupt.check()?;
            let count = agent
                .get(&format!("{base}/api/v1/state"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
                .and_then(|s| s["instances"].as_u64())
                .unwrap_or(0);
            if count as usize >= SERVICES * PER_SERVICE {
                break;
            }
            if Instant::now() > deadline {
                bail!("{base} lists {count} instances, not all, after 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    eprintln!(
        "bench: heartbeats at all {PEERS} peers at once (wrk per peer, 1 thread, 22 connections, 15 s), with {PEER_CHANGES} timed writes"
    );
    let (beats, latencies) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let loads: Vec<_> = bases
            .iter()
            .map(|base| {
                let token = token.clone();
                scope.spawn(move || {
                    wrk(
                        &[
                            "-t1".into(),
                            "-c22".into(),
                            "-d15s".into(),
                            "-s".into(),
                            "registry-heartbeat.lua".into(),
                            base.clone(),
                        ],
                        &[("REGISTRY_TOKEN", &token)],
                    )
                })
            })
            .collect();
        // Let the load settle before timing writes under it.
        std::thread::sleep(Duration::from_secs(2));
        let latencies = deliveries(
            &bases,
            "replicated",
            PEER_CHANGES,
            |k| bases[k % bases.len()].clone(),
            Duration::from_millis(40),
            &token,
            &agent,
        );
        let mut beats = Vec::new();
        for load in loads {
            beats.push(
                load.join()
                    .map_err(|_| anyhow::anyhow!("a wrk thread panicked"))??,
            );
        }
        Ok((beats, latencies?))
    })?;
    let rss: Vec<f64> = peers.iter().map(|p| memory_mib(p.pid(), "VmHWM")).collect();
    drop(peers);

    let rate: f64 = beats.iter().map(|b| b.rate()).sum();
    let errors: f64 = beats.iter().map(|b| b.errors).sum();
    let p99_beat = beats.iter().map(|b| b.p99_ms).fold(0.0, f64::max);
    let pct = |values: &[f64], p: f64| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        nearest_rank(&sorted, p).unwrap_or(f64::NAN)
    };
    let written = |k: usize, peer: usize| k % PEERS == peer;
    let remote: Vec<f64> = latencies
        .iter()
        .filter(|(k, peer, _)| !written(*k, *peer))
        .map(|(_, _, ms)| *ms)
        .collect();
    let local: Vec<f64> = latencies
        .iter()
        .filter(|(k, peer, _)| written(*k, *peer))
        .map(|(_, _, ms)| *ms)
        .collect();
    // Per write: its arrival at each other peer's watcher less its arrival at the
    // written peer's own watcher.
    let at_origin: std::collections::HashMap<usize, f64> = latencies
        .iter()
        .filter(|(k, peer, _)| written(*k, *peer))
        .map(|(k, _, ms)| (*k, *ms))
        .collect();
    let delays: Vec<f64> = latencies
        .iter()
        .filter(|(k, peer, _)| !written(*k, *peer))
        .filter_map(|(k, _, ms)| at_origin.get(k).map(|o| (ms - o).max(0.0)))
        .collect();
    let mut report = Report::new(
        "registry: three peers, 10,000 instances heartbeating at all three",
        &[
            "heartbeats/s (group)",
            "heartbeat p99 (ms, worst peer)",
            "errors",
            "write to watcher, same peer p50 / p99 (ms)",
            "write to watcher, other peer p50 / p99 (ms)",
            "replication delay p99 (ms)",
            "peak RSS per peer (MiB)",
        ],
    );
    let replication_p99 = pct(&delays, 99.0);
    report.row(vec![
        format!("{rate:.0}"),
        format!("{p99_beat:.2}"),
        format!("{errors:.0}"),
        format!("{:.2} / {:.2}", pct(&local, 50.0), pct(&local, 99.0)),
        format!("{:.2} / {:.2}", pct(&remote, 50.0), pct(&remote, 99.0)),
        format!("{replication_p99:.2}"),
        rss.iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>()
            .join(" / "),
    ]);
    report.target(
        "a write reaches watchers at the other peers within 100 ms (p99) under full heartbeat load",
        pct(&remote, 99.0) < 100.0 && remote.len() == PEER_CHANGES * (PEERS - 1),
        format!(
            "{:.2} ms over {} deliveries (of {})",
            pct(&remote, 99.0),
            remote.len(),
            PEER_CHANGES * (PEERS - 1)
        ),
    );
    report.note(format!(
        "Three `registry` processes with the same `peers.urls`, on the same 2 cores as the \
         three wrk processes (one per peer, `xtask/bench/registry-heartbeat.lua`). Every \
         heartbeat is replicated to the two other peers, so the group does three times the \
         work of one node per heartbeat. Under that load, {PEER_CHANGES} registrations, each \
         at the next peer in turn, are timed from just before the POST to their arrival at an \
         SSE watcher on every peer; \"replication delay\" is, per write and other peer, its \
         arrival there less its arrival at the written peer's watcher."
    ));
    Ok(report)
}

/// Opens an SSE watcher of `service` at each of `watchers` (base URLs), then makes
/// `changes` registrations `pause` apart, the `k`th at `origin(k)`; returns `(k,
/// watcher, ms from just before its POST)` for every delivery.
fn deliveries(
    watchers: &[String],
    service: &str,
    changes: usize,
    origin: impl Fn(usize) -> String,
    pause: Duration,
    token: &str,
    agent: &ureq::Agent,
) -> anyhow::Result<Vec<(usize, usize, f64)>> {
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; changes]));
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (lat_tx, lat_rx) = mpsc::channel::<(usize, usize, f64)>();
    let stream_agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let marker = format!("\"{service}-");
    for (watcher, base) in watchers.iter().enumerate() {
        let url = format!("{base}/api/v1/watch?service={service}");
        let (ready_tx, lat_tx, sent) = (ready_tx.clone(), lat_tx.clone(), sent.clone());
        let (agent, marker) = (stream_agent.clone(), marker.clone());
        std::thread::spawn(move || {
            let Ok(response) = agent.get(&url).call() else {
                return;
            };
            let mut lines = BufReader::new(response.into_body().into_reader()).lines();
            let mut seen = 0;
            let mut announced = false;
            while let Some(Ok(line)) = lines.next() {
                if !announced && line.starts_with("data:") {
                    // The snapshot: this watcher is in place.
                    announced = true;
                    let _ = ready_tx.send(());
                    continue;
                }
                let Some(k) = line
                    .split(marker.as_str())
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .and_then(|k| k.parse::<usize>().ok())
                else {
                    continue;
                };
                let at = Instant::now();
                if let Some(Some(t0)) = sent.lock().ok().and_then(|s| s.get(k).copied()) {
                    let _ = lat_tx.send((k, watcher, at.duration_since(t0).as_secs_f64() * 1000.0));
                }
                seen += 1;
                if seen == changes {
                    return;
                }
            }
        });
    }
    drop(lat_tx);
    for _ in watchers {
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("a watcher did not get its snapshot")?;
    }
    for k in 0..changes {
        let base = origin(k);
        if let Ok(mut s) = sent.lock() {
            s[k] = Some(Instant::now());
        }
        agent
            .post(&format!("{base}/api/v1/services/{service}/instances"))
            .header("authorization", &format!("Bearer {token}"))
            .send_json(json!({
                "instanceId": format!("{service}-{k}"),
                "host": "10.9.9.9",
                "port": 9000 + k,
                "leaseSeconds": 120,
            }))?;
        std::thread::sleep(pause);
    }
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.len() < changes * watchers.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match lat_rx.recv_timeout(left) {
            Ok(delivery) => latencies.push(delivery),
            Err(_) => break,
        }
    }
    Ok(latencies)
}
