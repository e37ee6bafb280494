//! The gateway against nginx and Spring Cloud Gateway: one minimal upstream (nginx
//! returning 200) reached (a) directly, (b) through nginx as a keep-alive reverse
//! proxy with a worker per core, (c) through the floor, a bare hyper proxy built from
//! the gateway's parts with none of its features (`gateway/examples/bare-proxy.rs`),
//! (d) through our gateway with JWT validation and an `lb://` route resolved from the
//! registry, and (e) through Spring Cloud Gateway doing the same job: the same token
//! checked as a Spring Security OAuth2 resource server against our gateway's JWK set,
//! the same `lb://` route resolved from the same registry through its Eureka API and
//! Spring Cloud LoadBalancer. The JVM is warmed up under the same load first. The
//! floor runs a second time adding the gateway's headers (c'), to tell the cost of those
//! bytes from the gateway's own work. Same wrk load, same connections, runs
//! alternating a-b-c-c'-d-e three times; medians reported.
//! Target: gateway/nginx throughput >= 1.0, p99 no worse than 1.2 x nginx's.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::json;

use crate::{
    bench::{
        Report, build_release, cpu_seconds, median, memory_mib,
        ours::{Platform, agent},
        scratch, spring, wait_http_ok, with_children, wrk,
    },
    procs::{Interrupt, Supervised},
    tools::debian_tool,
};

const ROUNDS: usize = 3;
const SECONDS: u64 = 10;
const CONNECTIONS: usize = 64;
/// The JVM runs under the benchmark's load in windows of this many seconds until its
/// JIT compilers are done: two windows in a row in which they used under
/// [`JIT_QUIET_SECONDS`] of CPU. On two cores C2 alone needs minutes of load to
/// compile Spring Cloud Gateway's hot paths, and competes with it for the cores.
const WARMUP_WINDOW_SECONDS: u64 = 10;
const JIT_QUIET_SECONDS: f64 = 0.25;
/// At most this many windows.
const WARMUP_WINDOWS: usize = 40;

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

/// The floor (`gateway/examples/bare-proxy.rs`) on `port`, ready, in front of the
/// upstream; with `headers`, adding the gateway's.
fn bare_proxy(
    bin: &Path,
    port: u16,
    upstream_port: u16,
    headers: bool,
    interrupt: &Interrupt,
) -> anyhow::Result<Supervised> {
    let mut command = Command::new(bin.join("examples/bare-proxy"));
    command
        .arg(port.to_string())
        .arg(format!("127.0.0.1:{upstream_port}"));
    if headers {
        command.arg("--gateway-headers");
    }
    let proxy = Supervised::spawn(
        "bare-proxy",
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_http_ok(
        &format!("http://127.0.0.1:{port}/"),
        Duration::from_secs(10),
        interrupt,
    )?;
    Ok(proxy)
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

    // The registry, the gateway routing through it, and the upstream registered in it.
    let platform = Platform::start(
        &bin,
        &dir,
        &crate::workspace_root().join("xtask/bench/gateway-routes.yaml"),
        interrupt,
    )?;
    let agent = agent();
    let status = agent
        .post(&format!(
            "{}/api/v1/services/bench-upstream/instances",
            platform.registry_url()
        ))
        .header("authorization", &format!("Bearer {}", platform.token))
        .send_json(
            json!({"instanceId": "bench-upstream-1", "host": "127.0.0.1",
            "port": upstream_port, "leaseSeconds": 600}),
        )?
        .status();
    anyhow::ensure!(status == 201, "registering the upstream answered {status}");
    let floor = bare_proxy(&bin, floor_port, upstream_port, false, interrupt)?;
    // The floor again, putting the gateway's headers on the wire (and sent its token):
    // how much of the features' cost those bytes are.
    let floor_headers_port = crate::free_port()?;
    let floor_headers = bare_proxy(&bin, floor_headers_port, upstream_port, true, interrupt)?;
    let (gateway_url, jwt) = (platform.gateway_url.clone(), platform.jwt.clone());
    wait_route(&agent, &gateway_url, &jwt, interrupt)?;

    // Spring Cloud Gateway reads the same registry through its Eureka API, with the
    // registry's token in the service URL as Spring's Eureka client sends it.
    eprintln!("bench: building and starting Spring Cloud Gateway");
    let spring_gateway = spring::start(
        "gateway",
        crate::free_port()?,
        &spring::gateway_properties(
            &platform.eureka_zone(),
            "bench",
            "bench-upstream",
            "/bench,/bench/**",
            &spring::TokenCheck::of_gateway(&gateway_url),
        ),
        &dir.join("spring-gateway.log"),
        interrupt,
    )?;
    let spring_url = spring_gateway.url();
    wait_route(&agent, &spring_url, &jwt, interrupt)?;
    let warmup = warm_up(&spring_url, &jwt, spring_gateway.child.pid(), interrupt)?;

    let targets: [(&str, String, &str, Vec<u32>); 6] = [
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
        (
            "floor with the gateway's headers",
            format!("http://127.0.0.1:{floor_headers_port}"),
            &jwt,
            vec![floor_headers.pid()],
        ),
        (
            "gateway",
            gateway_url.clone(),
            &jwt,
            vec![platform.gateway.pid()],
        ),
        (
            "Spring Cloud Gateway",
            spring_url.clone(),
            &jwt,
            vec![spring_gateway.child.pid()],
        ),
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
        "gateway vs nginx and Spring Cloud Gateway: one upstream, 64 connections",
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
    let (nginx_m, floor_m, headers_m, gateway_m, spring_m) = (
        &medians[1],
        &medians[2],
        &medians[3],
        &medians[4],
        &medians[5],
    );
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
        "- How much of that is bytes on the wire: sent the gateway's token, and adding the \
         headers the gateway adds (`X-Forwarded-*`, `X-Request-Id`, `traceparent` upstream; \
         `SecureHeaders` and `X-Request-Id` back; fixed values of the same length), the floor \
         reached {:.2} of its bare throughput, with {:.1} µs of CPU per request against \
         {:.1} µs. The gateway reached {:.2} of that: its own work beyond those bytes cost \
         {:.0}%.",
        headers_m.rate / floor_m.rate.max(1e-9),
        cpu_per_request(headers_m),
        cpu_per_request(floor_m),
        gateway_m.rate / headers_m.rate.max(1e-9),
        100.0 * (1.0 - gateway_m.rate / headers_m.rate.max(1e-9)),
    ));
    let (ours_peak, spring_peak) = (peak(&targets[4].3), peak(&targets[5].3));
    report.note(format!(
        "- Ours/Spring Cloud Gateway: throughput {:.1}x, p99 {:.2}x ({:.2} ms vs {:.2} ms), \
         CPU per request {:.2}x, peak RSS {:.2}x ({:.1} MiB vs {:.1} MiB).",
        gateway_m.rate / spring_m.rate.max(1e-9),
        gateway_m.p99 / spring_m.p99.max(1e-9),
        gateway_m.p99,
        spring_m.p99,
        cpu_per_request(gateway_m) / cpu_per_request(spring_m).max(1e-12),
        ours_peak / spring_peak.max(1e-9),
        ours_peak,
        spring_peak,
    ));
    report.note(format!(
        "Medians of {ROUNDS} alternating rounds of {SECONDS} s each; wrk (Debian) with 2 threads \
         and {CONNECTIONS} connections on the same 2 cores as the proxies and the upstream (nginx \
         with one worker returning 200). Both gateways check the EdDSA bearer token on every \
         request (issuer, audience, expiry; ours verifies a token's signature once and keeps \
         the result until the token expires, Spring verifies it every time) and resolve \
         `lb://bench-upstream` from the same registry; nginx's config is \
         `xtask/bench/nginx-proxy.conf`. Spring Cloud Gateway (`interop/gateway`, Spring \
         Boot 4.0.7, Spring Cloud 2025.1.4, OpenJDK 17, `java -jar` with the JVM's defaults) \
         ran under this load until its JIT compilers were done before the first round ({:.0} s; \
         they used {:.1} s of CPU meanwhile, {:.1} s more during the rounds). No access logs \
         anywhere.",
        warmup.seconds,
        warmup.jit_seconds,
        jit_cpu_seconds(spring_gateway.child.pid()) - warmup.jit_seconds_at_end,
    ));
    Ok(report)
}

/// The proxy's CPU time per request served, in µs.
fn cpu_per_request(run: &Run) -> f64 {
    run.cpu / (run.rate * SECONDS as f64).max(1e-9) * 1e6
}

/// Waits until `base/bench` answers 200 with `jwt`: the proxy has found the upstream
/// in the registry.
fn wait_route(
    agent: &ureq::Agent,
    base: &str,
    jwt: &str,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        interrupt.check()?;
        let status = agent
            .get(&format!("{base}/bench"))
            .header("authorization", &format!("Bearer {jwt}"))
            .call()
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 200 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{base}/bench answered {status} for a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a JVM's warm-up went.
struct Warmup {
    seconds: f64,
    /// CPU its JIT compilers used during the warm-up, and their total at its end.
    jit_seconds: f64,
    jit_seconds_at_end: f64,
}

/// Runs the benchmark's load against the JVM at `url` (process `pid`) until its JIT
/// compilers have been quiet for two windows in a row.
fn warm_up(url: &str, jwt: &str, pid: u32, interrupt: &Interrupt) -> anyhow::Result<Warmup> {
    let started = std::time::Instant::now();
    let at_start = jit_cpu_seconds(pid);
    let mut quiet = 0;
    for window in 1..=WARMUP_WINDOWS {
        interrupt.check()?;
        let before = jit_cpu_seconds(pid);
        let result = wrk(
            &[
                "-t2".into(),
                format!("-c{CONNECTIONS}"),
                format!("-d{WARMUP_WINDOW_SECONDS}s"),
                "-s".into(),
                "gateway-load.lua".into(),
                url.to_owned(),
            ],
            &[("BENCH_TOKEN", jwt)],
        )?;
        let jit = jit_cpu_seconds(pid) - before;
        eprintln!(
            "bench: warm-up window {window}: {:.0} requests/s, JIT {jit:.1} s of CPU",
            result.rate()
        );
        quiet = if jit < JIT_QUIET_SECONDS {
            quiet + 1
        } else {
            0
        };
        if quiet == 2 {
            break;
        }
    }
    let at_end = jit_cpu_seconds(pid);
    Ok(Warmup {
        seconds: started.elapsed().as_secs_f64(),
        jit_seconds: at_end - at_start,
        jit_seconds_at_end: at_end,
    })
}

/// CPU seconds used so far by a JVM's JIT compiler threads (`C1 CompilerThre`,
/// `C2 CompilerThre`).
fn jit_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|task| {
            fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.contains("Compiler"))
        })
        .filter_map(|task| task.file_name().to_str()?.parse::<u32>().ok())
        .map(|tid| crate::bench::cpu_seconds_of_task(pid, tid))
        .sum()
}
