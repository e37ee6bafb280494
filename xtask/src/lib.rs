//! The project's own tooling: `cargo xtask up` (the local stack), `cargo xtask test`
//! (the test runner CI calls), `cargo xtask chaos` (the saga through crashes) and the
//! benchmarks. Also a library, so tests reuse the same PostgreSQL and
//! broker provisioning the commands use.

pub mod bench;
pub mod broker;
pub mod chaos;
pub mod postgres;
pub mod procs;
pub mod redis;
pub mod simulate;
pub mod stack;
pub mod testrun;
pub mod tls;
pub mod tools;
pub mod zipkin;

use std::path::{Path, PathBuf};

use rand::{Rng, distr::Alphanumeric};

/// The workspace root (the folder holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target folder: `CARGO_TARGET_DIR` when set, else `target/` at the root.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// "the end of <path>:" and the last `count` lines of the log at `path`, for errors
/// that quote it: a CI run keeps only what the tests print, not the logs they name.
pub fn log_tail(path: &std::path::Path, count: usize) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "the end of {}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(count)..].join("\n")
    )
}

/// A loopback port that was free a moment ago, below the range outgoing connections
/// take theirs from, and not handed out before in this process (see `shared::ports`).
/// Another process could still take it before we bind, which is why every caller
/// fails with a clear message when binding fails.
pub fn free_port() -> std::io::Result<u16> {
    shared::ports::unused_loopback_port()
}

/// `count` distinct free ports.
pub fn free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    (0..count).map(|_| free_port()).collect()
}

/// `len` random letters and digits, for passwords and tokens.
pub fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// The `cargo` that runs us, so nested builds use the same toolchain.
pub fn cargo() -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.current_dir(workspace_root());
    command
}
