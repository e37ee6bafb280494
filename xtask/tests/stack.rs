//! `cargo xtask up` leaves nothing behind: after Ctrl-C, SIGTERM or a failed start, no
//! process it started is still running.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// A process as (pid, start time in clock ticks), so a reused pid is not mistaken
/// for the same process.
type ProcessId = (u32, u64);

/// A process's parent, start time, state and command name, from /proc.
#[derive(Debug, Clone)]
struct ProcessInfo {
    ppid: u32,
    start: u64,
    state: char,
    name: String,
}

fn process_table() -> BTreeMap<u32, ProcessInfo> {
    let mut table = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses; fields follow the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|(_, n)| n).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid), Some(start)) = (
            fields.first().and_then(|s| s.chars().next()),
            fields.get(1).and_then(|s| s.parse().ok()),
            fields.get(19).and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        table.insert(
            pid,
            ProcessInfo {
                ppid,
                start,
                state,
                name: name.to_owned(),
            },
        );
    }
    table
}

/// Every process below `root`, with its command name.
fn descendants(root: u32) -> BTreeMap<ProcessId, String> {
    let table = process_table();
    let mut found = BTreeMap::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (&pid, info) in &table {
            if info.ppid == parent && !found.contains_key(&(pid, info.start)) {
                found.insert((pid, info.start), info.name.clone());
                frontier.push(pid);
            }
        }
    }
    found
}

fn still_running(processes: &BTreeMap<ProcessId, String>) -> Vec<(ProcessId, String)> {
    let table = process_table();
    processes
        .iter()
        .filter(|((pid, start), _)| {
            table
                .get(pid)
                .is_some_and(|info| info.start == *start && info.state != 'Z')
        })
        .map(|(id, name)| (*id, name.clone()))
        .collect()
}

fn xtask_up(env_file: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command
        .args([
            "up",
            "--gateway-port",
            "0",
            "--registry-port",
            "0",
            "--env-file",
        ])
        .arg(env_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Lines of the child's stdout and stderr, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    rx
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!(
        "no line containing {needle:?} within {within:?}; output:\n{}",
        seen.join("\n")
    );
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "xtask did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the stack, checks it is up and reachable as `stack.env` says, sends
/// `signal`, and checks that every process it had started is gone.
fn interrupted_stack_leaves_nothing(signal: Signal, own_infrastructure: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let env_file = dir.path().join("stack.env");
    let mut command = xtask_up(&env_file);
    if own_infrastructure {
        command
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BROKERS");
    }
    let mut child = command.spawn().expect("xtask starts");
    let output = lines(&mut child);
    wait_for_line(&output, "ready", Duration::from_secs(600));

    let env = std::fs::read_to_string(&env_file).expect("stack.env written before ready");
    for key in [
        "GATEWAY_URL",
        "REGISTRY_URL",
        "REGISTRY_TOKEN",
        "KAFKA_BROKERS",
        "DATABASE_URL",
    ] {
        assert!(
            env.contains(&format!("export {key}=")),
            "{key} missing:\n{env}"
        );
    }
    let gateway = env
        .lines()
        .find_map(|l| l.strip_prefix("export GATEWAY_URL="))
        .expect("gateway url");
    let health = ureq::get(&format!("{gateway}/actuator/health"))
        .call()
        .expect("the gateway answers while the stack runs");
    assert_eq!(health.status(), 200);

    if own_infrastructure {
        parts_that_die_are_restarted(child.id(), &output, gateway);
    }

    let started = descendants(child.id());
    let mut expected = vec![
        "registry",
        "order-service",
        "payment-service",
        "notification-service",
        "gateway",
    ];
    if own_infrastructure {
        expected.extend(["postgres", "java"]);
    }
    for name in expected {
        // /proc truncates command names to 15 bytes.
        let short = &name[..name.len().min(15)];
        assert!(
            started.values().any(|n| n == short),
            "{name} is not running under xtask: {started:?}"
        );
    }

    kill(Pid::from_raw(child.id() as i32), signal).expect("signal xtask");
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert!(
        status.success(),
        "an interrupted stack exits cleanly: {status}"
    );
    let left = still_running(&started);
    assert!(left.is_empty(), "still running after {signal}: {left:?}");
    assert!(!env_file.exists(), "stack.env removed with the stack");
}

/// The stack's direct child named `name` (as /proc shows it) whose command line
/// contains `marker` (two JVMs run under the stack: Kafka and Zipkin).
fn child_named(xtask: u32, name: &str, marker: &str) -> u32 {
    let table = process_table();
    table
        .iter()
        .find(|(pid, info)| {
            info.ppid == xtask
                && info.name == name
                && info.state != 'Z'
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .map(|(pid, _)| *pid)
        .unwrap_or_else(|| panic!("no {name} ({marker}) under xtask"))
}

/// A service, the Kafka node, Zipkin, Redis and PostgreSQL are each killed; the supervisor says so,
/// restarts each, and the stack serves orders through the gateway again.
fn parts_that_die_are_restarted(xtask: u32, output: &mpsc::Receiver<String>, gateway: &str) {
    for (name, marker, signal, said) in [
        ("order-service", "", Signal::SIGKILL, "order-service"),
        ("java", "kafka.Kafka", Signal::SIGKILL, "Kafka node 1"),
        ("java", "zipkin", Signal::SIGKILL, "Zipkin"),
        ("redis-server", "", Signal::SIGKILL, "Redis"),
        // PostgreSQL's immediate shutdown.
        ("postgres", "", Signal::SIGQUIT, "PostgreSQL"),
    ] {
        let pid = child_named(xtask, name, marker);
        kill(Pid::from_raw(pid as i32), signal).expect("kill a part");
        let seen = wait_for_line(output, &format!("{said} exited"), Duration::from_secs(30));
        assert!(
            seen.last().is_some_and(|l| l.contains("restarting in")),
            "the death is logged with the backoff: {seen:?}"
        );
        wait_for_line(
            output,
            &format!("{said} restarted"),
            Duration::from_secs(180),
        );
        assert_ne!(
            child_named(xtask, name, marker),
            pid,
            "{name} runs as a new process"
        );
    }
    // Orders work again end to end through the gateway: log in, place one.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let token: serde_json::Value = agent
        .post(&format!("{gateway}/auth/token"))
        .send_json(serde_json::json!({"username": "alice", "password": "alice"}))
        .expect("login")
        .body_mut()
        .read_json()
        .expect("token");
    let bearer = format!("Bearer {}", token["access_token"].as_str().expect("token"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = agent
            .post(&format!("{gateway}/orders"))
            .header("authorization", &bearer)
            .header("idempotency-key", "after-the-restarts")
            .send_json(serde_json::json!({
                "items": [{"sku": "BOOK-1", "quantity": 1, "unitPrice": 1250}],
                "currency": "EUR"
            }))
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no order accepted after the restarts (last status {status})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ctrl_c_stops_everything_including_its_own_database_and_broker() {
    interrupted_stack_leaves_nothing(Signal::SIGINT, true);
}

#[test]
fn sigterm_stops_every_service() {
    interrupted_stack_leaves_nothing(Signal::SIGTERM, false);
}

#[test]
fn even_kill_9_of_xtask_takes_every_child_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = xtask_up(&dir.path().join("stack.env"))
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS")
        .spawn()
        .expect("xtask starts");
    let output = lines(&mut child);
    wait_for_line(&output, "ready", Duration::from_secs(600));
    let started = descendants(child.id());
    assert!(
        started.values().any(|name| name == "postgres"),
        "{started:?}"
    );

    // SIGKILL cannot be handled: only the children's parent-death signal can act.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill xtask");
    wait_exit(&mut child, Duration::from_secs(10));
    // PostgreSQL's backends notice their postmaster's death on their own; wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left = still_running(&started);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = still_running(&started);
    }
    assert!(left.is_empty(), "still running after kill -9: {left:?}");
}

#[test]
fn a_part_that_fails_to_start_stops_what_was_started() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Nothing listens on a port we just freed: the topics step cannot reach a broker.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut child = xtask_up(&dir.path().join("stack.env"))
        .env_remove("DATABASE_URL")
        .env("KAFKA_BROKERS", dead.to_string())
        .spawn()
        .expect("xtask starts");
    let xtask_pid = child.id();
    let output = lines(&mut child);
    // PostgreSQL is started before the topics are created; catch it while it runs.
    wait_for_line(&output, "creating the topics", Duration::from_secs(600));
    let started = descendants(xtask_pid);
    let status = wait_exit(&mut child, Duration::from_secs(120));
    assert!(!status.success(), "a failed start is a failure");
    let said: Vec<String> = output.try_iter().collect();
    assert!(
        said.iter().any(|l| l.contains(&dead.to_string())),
        "the error names the unreachable broker: {said:?}"
    );
    assert!(
        started.values().any(|name| name == "postgres"),
        "PostgreSQL was running when the topics step began: {started:?}"
    );
    let left = still_running(&started);
    assert!(
        left.is_empty(),
        "still running after a failed start: {left:?}"
    );
    let leftover_cluster = xtask::target_dir()
        .join("stack")
        .join(format!("postgres-{xtask_pid}"));
    assert!(
        !leftover_cluster.exists(),
        "the throwaway cluster's files were removed"
    );
}
