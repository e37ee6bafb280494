//! `cargo xtask bench <name>`: each claim of the project as a figure measured side by
//! side with its reference on this machine. Every benchmark builds what it measures
//! in release mode, installs and configures its reference programs (their configs
//! live in `xtask/bench/`), drives load from a separate load-tool process, ends by
//! itself, cleans up, prints a table and appends it to `docs/benchmarks.md` with the
//! machine and the exact command.

pub mod failover;
pub mod footprint;
pub mod gateway;
pub mod ours;
pub mod registry;
pub mod saga;
pub mod spring;

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::procs::Interrupt;

/// Runs benchmark `name`.
pub fn run(name: &str) -> anyhow::Result<()> {
    let interrupt = Interrupt::install()?;
    let reports = match name {
        "gateway" => vec![gateway::run(&interrupt)?],
        // On one Kafka node and on a replicated cluster of three.
        "saga" => vec![saga::run(&interrupt, 1)?, saga::run(&interrupt, 3)?],
        // One node, then three peers that replicate to each other.
        "registry" => vec![registry::run(&interrupt)?, registry::run_peers(&interrupt)?],
        "footprint" => vec![footprint::run(&interrupt)?],
        "failover" => vec![failover::run(&interrupt)?],
        other => bail!("no benchmark `{other}`: gateway, saga, registry, footprint or failover"),
    };
    for report in &reports {
        println!("\n{}", report.markdown());
        report.append(&format!("cargo xtask bench {name}"))?;
    }
    println!(
        "appended to {}",
        crate::workspace_root().join("docs/benchmarks.md").display()
    );
    Ok(())
}

/// What a benchmark found: a table, the targets and how they came out.
#[derive(Debug, Default)]
pub struct Report {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Lines under the table: targets met or missed, and by how much.
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            ..Self::default()
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// A target: `met` or missed, with the figures.
    pub fn target(&mut self, what: &str, met: bool, detail: String) {
        self.note(format!(
            "- {} {what}: {detail}",
            if met { "**met**" } else { "**missed**" }
        ));
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", self.headers.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.headers.iter().map(|_| "---|").collect::<String>()
        );
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "{note}");
            }
        }
        out
    }

    /// Appends this run to `docs/benchmarks.md`.
    fn append(&self, command: &str) -> anyhow::Result<()> {
        let path = crate::workspace_root().join("docs/benchmarks.md");
        let mut text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            "# Benchmarks\n\nEach section is one run of `cargo xtask bench <name>`, appended by \
             the command itself: the machine, the exact command, the table and the targets.\n"
                .to_owned()
        });
        let _ = write!(
            text,
            "\n## {} — {}\n\nCommand: `{command}`\n\nMachine: {}\n\n{}",
            self.title,
            today(),
            machine(),
            self.markdown()
        );
        std::fs::write(&path, text)?;
        Ok(())
    }
}

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// CPU model, cores, memory, kernel and compiler, in one line.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let output = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{model}, {cores} cores, {} GiB RAM, Linux {}, {}",
        mem_kib / 1024 / 1024,
        output("uname", &["-r"]),
        output("rustc", &["--version"])
    )
}

/// Builds the release binaries of `packages`, and the named `examples` of those
/// packages (under `examples/`), in one cargo run; returns `target/release`.
pub fn build_release(
    packages: &[&str],
    examples: &[&str],
    interrupt: &Interrupt,
) -> anyhow::Result<PathBuf> {
    let mut build = crate::cargo();
    build.args(["build", "--quiet", "--release", "--bins"]);
    for p in packages {
        build.args(["--package", p]);
    }
    for example in examples {
        build.args(["--example", example]);
    }
    crate::procs::run("cargo build --release", &mut build, interrupt)?;
    Ok(crate::target_dir().join("release"))
}

/// A process's CPU time so far (user + system), from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// One thread's CPU time so far (user + system), from /proc.
pub fn cpu_seconds_of_task(pid: u32, tid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// user + system time from a `/proc` `stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command name: utime is the 12th, stime the 13th (0-based 11, 12).
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// `VmRSS` or `VmHWM` (peak) of a process, in MiB.
pub fn memory_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A process and its children (nginx's workers), by pid.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    all.extend(
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok()),
    );
    all
}

/// A process and every process below it, by pid.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while let Some(&current) = all.get(next) {
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{current}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    all
}

/// CPU seconds used so far by every process under `root`, summed by process name
/// (`comm`, as `ps` shows it: PostgreSQL's backends all count as `postgres`).
pub fn cpu_by_name(root: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    for pid in descendants(root) {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let name = name.trim();
        if !name.is_empty() {
            *by_name.entry(name.to_owned()).or_insert(0.0) += cpu_seconds(pid);
        }
    }
    by_name
}

/// CPU seconds used by this process's finished children so far (load tools it ran).
pub fn children_cpu_seconds() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).map_or(
        0.0,
        |usage| {
            let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            seconds(usage.user_time()) + seconds(usage.system_time())
        },
    )
}

/// Idle CPU seconds of the whole machine so far (all cores), from `/proc/stat`.
pub fn machine_idle_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // idle + iowait
    (fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0)) / hz
}

/// Waits until `url` answers 200.
pub fn wait_http_ok(url: &str, within: Duration, interrupt: &Interrupt) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .http_status_as_error(false)
        .build()
        .into();
    let deadline = Instant::now() + within;
    loop {
        interrupt.check()?;
        if agent
            .get(url)
            .call()
            .is_ok_and(|r| r.status().as_u16() == 200)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The bench folder for scratch files of one run, emptied first.
pub fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = crate::target_dir().join("bench").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Median of `values` (0 when empty).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The parsed `RESULT` line of `xtask/bench/report.lua`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WrkResult {
    pub requests: f64,
    pub seconds: f64,
    pub errors: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl WrkResult {
    pub fn rate(&self) -> f64 {
        self.requests / self.seconds.max(1e-9)
    }
}

/// Runs wrk with `args` (its Lua scripts from `xtask/bench/`) and reads its result.
pub fn wrk(args: &[String], env: &[(&str, &str)]) -> anyhow::Result<WrkResult> {
    let wrk = crate::tools::debian_tool("wrk", "wrk")?;
    let lua_dir = crate::workspace_root().join("xtask").join("bench");
    let output = Command::new(wrk)
        .args(args)
        .env("BENCH_LUA_DIR", &lua_dir)
        .envs(env.iter().copied())
        .current_dir(&lua_dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| {
            format!(
                "wrk printed no result:\n{text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    Ok(WrkResult {
        requests: field("requests"),
        seconds: field("duration_us") / 1e6,
        errors: field("errors"),
        p50_ms: field("p50_us") / 1000.0,
        p99_ms: field("p99_us") / 1000.0,
        p999_ms: field("p999_us") / 1000.0,
    })
}

/// The nearest-rank `p`th percentile of `sorted` (ascending); `None` when empty.
pub fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}
