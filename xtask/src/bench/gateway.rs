//! The gateway against nginx: one minimal upstream (nginx returning 200) reached
//! (a) directly, (b) through nginx as a keep-alive reverse proxy with a worker per
//! core, (c) through our gateway with JWT validation and an `lb://` route resolved
//! from the registry, and (d) the floor: a bare hyper proxy built from the gateway's
//! parts with none of its features (`gateway/examples/bare-proxy.rs`). Same wrk load,
//! same connections, runs alternating a-b-c-d three times; medians reported.
//! Target: gateway/nginx throughput >= 1.0, p99 no worse than 1.2 x nginx's.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{
    bench::{
        Report, build_release, cpu_seconds, median, memory_mib, scratch, wait_http_ok,
        with_children, wrk,
    },
    procs::{Interrupt, Supervised},
    tools::debian_tool,
};

const ROUNDS: usize = 3;
const SECONDS: u64 = 10;
const CONNECTIONS: usize = 64;

/// An nginx from a config template in `xtask/bench/`.
fn nginx(template: &str, dir: &Path, port: u16, upstream: u16) -> anyhow::Result<Supervised> {
    let nginx = debian_tool("nginx", "nginx")?;
    let text = fs::read_to_string(crate::workspace_root().join("xtask/bench").join(template))?
        .replace("{{DIR}}", &dir.display().to_string())
        .replace("{{PORT}}", &port.to_string())
        .replace("{{UPSTREAM_PORT}}", &upstream.to_string());
    let conf = dir.join(template);
    fs::write(&conf, text)?;
    let child = Supervised::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    Ok(child)
}

/// One measured run: throughput, latency, and the proxy's CPU seconds and peak RSS.
#[derive(Debug, Default, Clone)]
struct Run {
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu: f64,
    errors: f64,
}

fn measure(url: &str, token: &str, proxy: &[u32]) -> anyhow::Result<Run> {
    let before: f64 = proxy.iter().map(|p| cpu_seconds(*p)).sum();
    let result = wrk(
        &[
            "-t2".into(),
            format!("-c{CONNECTIONS}"),
            format!("-d{SECONDS}s"),
            "-s".into(),
            "gateway-load.lua".into(),
            url.to_owned(),
        ],
        &[("BENCH_TOKEN", token)],
    )?;
    let after: f64 = proxy.iter().map(|p| cpu_seconds(*p)).sum();
    Ok(Run {
        rate: result.rate(),
        p50: result.p50_ms,
        p99: result.p99_ms,
        p999: result.p999_ms,
        cpu: after - before,
        errors: result.errors,
    })
}

pub fn run(interrupt: &Interrupt) -> anyhow::Result<Report> {
    let dir = scratch("gateway")?;
    let bin = build_release(&["registry", "gateway"], &["bare-proxy"], interrupt)?;
    let upstream_port = crate::free_port()?;
    let proxy_port = crate::free_port()?;
    let registry_port = crate::free_port()?;
    let gateway_port = crate::free_port()?;
    let floor_port = crate::free_port()?;
    let _upstream = nginx("nginx-upstream.conf", &dir, upstream_port, 0)?;
    let nginx_proxy = nginx("nginx-proxy.conf", &dir, proxy_port, upstream_port)?;
    wait_http_ok(
        &format!("http://127.0.0.1:{upstream_port}/"),
        Duration::from_secs(10),
        interrupt,
    )?;
    wait_http_ok(
        &format!("http://127.0.0.1:{proxy_port}/"),
        Duration::from_secs(10),
        interrupt,
    )?;

    // The registry, the upstream registered in it, and the gateway routing to it.
    let token = crate::random_token(32);
    let registry_url = format!("http://127.0.0.1:{registry_port}");
    let _registry = Supervised::spawn(
        "registry",
        Command::new(bin.join("registry"))
            .env("REGISTRY_HTTP__PORT", registry_port.to_string())
            .env("REGISTRY_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_http_ok(
        &format!("{registry_url}/actuator/health"),
        Duration::from_secs(10),
        interrupt,
    )?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let status = agent
        .post(&format!(
            "{registry_url}/api/v1/services/bench-upstream/instances"
        ))
        .header("authorization", &format!("Bearer {token}"))
        .send_json(
            json!({"instanceId": "bench-upstream-1", "host": "127.0.0.1",
            "port": upstream_port, "leaseSeconds": 600}),
        )?
        .status();
    anyhow::ensure!(status == 201, "registering the upstream answered {status}");
    let gateway_config = dir.join("gateway.yaml");
    crate::stack::write_gateway_config(&gateway_config)?;
    let log = fs::File::create(dir.join("gateway.log"))?;
    let gateway = Supervised::spawn(
        "gateway",
        Command::new(bin.join("gateway"))
            .env("GATEWAY_CONFIG", &gateway_config)
            .env("GATEWAY_HTTP__PORT", gateway_port.to_string())
            .env(
                "GATEWAY_ROUTES_FILE",
                crate::workspace_root().join("xtask/bench/gateway-routes.yaml"),
            )
            .env("REGISTRY_URL", &registry_url)
            .env("REGISTRY_TOKEN", &token)
            // No access log, as nginx's is off.
            .env("GATEWAY_LOG__LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    let floor = Supervised::spawn(
        "bare-proxy",
        Command::new(bin.join("examples/bare-proxy"))
            .arg(floor_port.to_string())
            .arg(format!("127.0.0.1:{upstream_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_http_ok(
        &format!("http://127.0.0.1:{floor_port}/"),
        Duration::from_secs(10),
        interrupt,
    )?;
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    wait_http_ok(
        &format!("{gateway_url}/actuator/health"),
        Duration::from_secs(10),
        interrupt,
    )?;
    let login: Value = agent
        .post(&format!("{gateway_url}/auth/token"))
        .send_json(json!({"username": "sim-001", "password": crate::stack::SIM_PASSWORD}))?
        .body_mut()
        .read_json()?;
    let jwt = login["access_token"]
        .as_str()
        .context("the gateway issued no token")?
        .to_owned();
    // The route resolves once the gateway's watch has the upstream.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        interrupt.check()?;
        let status = agent
            .get(&format!("{gateway_url}/bench"))
            .header("authorization", &format!("Bearer {jwt}"))
            .call()?
            .status();
        if status == 200 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the gateway's /bench route answered {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let targets: [(&str, String, &str, Vec<u32>); 4] = [
        (
            "direct",
            format!("http://127.0.0.1:{upstream_port}"),
            "",
            vec![],
        ),
        (
            "nginx",
            format!("http://127.0.0.1:{proxy_port}"),
            "",
            with_children(nginx_proxy.pid()),
        ),
        (
            "bare hyper proxy (floor)",
            format!("http://127.0.0.1:{floor_port}"),
            "",
            vec![floor.pid()],
        ),
        ("gateway", gateway_url.clone(), &jwt, vec![gateway.pid()]),
    ];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 1..=ROUNDS {
        for (i, (name, url, token, pids)) in targets.iter().enumerate() {
            interrupt.check()?;
            eprintln!("bench: round {round}/{ROUNDS}: {name}");
            runs[i].push(measure(url, token, pids)?);
        }
    }
    let peak = |pids: &[u32]| pids.iter().map(|p| memory_mib(*p, "VmHWM")).sum::<f64>();

    let mut report = Report::new(
        "gateway vs nginx: one upstream, 64 connections",
        &[
            "path",
            "requests/s",
            "p50 (ms)",
            "p99 (ms)",
            "p99.9 (ms)",
            "proxy CPU s",
            "proxy peak RSS (MiB)",
            "errors",
        ],
    );
    let mut medians = Vec::new();
    for (i, (name, _, _, pids)) in targets.iter().enumerate() {
        let pick = |f: fn(&Run) -> f64| median(&mut runs[i].iter().map(f).collect::<Vec<_>>());
        let m = Run {
            rate: pick(|r| r.rate),
            p50: pick(|r| r.p50),
            p99: pick(|r| r.p99),
            p999: pick(|r| r.p999),
            cpu: pick(|r| r.cpu),
            errors: runs[i].iter().map(|r| r.errors).sum(),
        };
        report.row(vec![
            (*name).to_owned(),
            format!("{:.0}", m.rate),
            format!("{:.2}", m.p50),
            format!("{:.2}", m.p99),
            format!("{:.2}", m.p999),
            if pids.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", m.cpu)
            },
            if pids.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", peak(pids))
            },
            format!("{:.0}", m.errors),
        ]);
        medians.push(m);
    }
    let (nginx_m, floor_m, gateway_m) = (&medians[1], &medians[2], &medians[3]);
    let ratio = gateway_m.rate / nginx_m.rate.max(1e-9);
    let p99_ratio = gateway_m.p99 / nginx_m.p99.max(1e-9);
    report.target(
        "gateway/nginx throughput >= 1.0",
        ratio >= 1.0,
        format!("{ratio:.2}"),
    );
    report.target(
        "gateway p99 <= 1.2 x nginx's",
        p99_ratio <= 1.2,
        format!(
            "{p99_ratio:.2} x ({:.2} ms vs {:.2} ms)",
            gateway_m.p99, nginx_m.p99
        ),
    );
    report.note(format!(
        "- The floor is `gateway/examples/bare-proxy.rs`: the gateway's parts (hyper server and \
         pooled client, a single-threaded runtime and listener per core) forwarding to the \
         upstream with nothing else. Floor/nginx: {:.2}; gateway/floor: {:.2}, i.e. the \
         gateway's features (token check, route match, filters, headers, timeout, retries' \
         bookkeeping, metrics) cost {:.0}% of the floor's throughput.",
        floor_m.rate / nginx_m.rate.max(1e-9),
        gateway_m.rate / floor_m.rate.max(1e-9),
        100.0 * (1.0 - gateway_m.rate / floor_m.rate.max(1e-9)),
    ));
    report.note(format!(
        "Medians of {ROUNDS} alternating rounds of {SECONDS} s each; wrk (Debian) with 2 threads \
         and {CONNECTIONS} connections on the same 2 cores as the proxies and the upstream (nginx \
         with one worker returning 200). The gateway validates an EdDSA JWT on every request and \
         resolves `lb://bench-upstream` from the registry; nginx's config is \
         `xtask/bench/nginx-proxy.conf`. No access logs anywhere."
    ));
    Ok(report)
}
