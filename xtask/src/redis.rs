//! A throwaway Redis server (Debian's `redis-server`, installed with apt when missing
//! and xtask runs as root), for the gateway's shared rate limits: no persistence, on
//! a free loopback port, stopped when dropped.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::procs::{Interrupt, Supervised};

/// A running `redis-server`.
#[derive(Debug)]
pub struct Redis {
    port: u16,
    dir: PathBuf,
    /// Its log, appended to across restarts.
    log: PathBuf,
    child: Supervised,
}

impl Redis {
    /// Starts a server whose files (only its log: nothing is saved) go under `dir`,
    /// and waits until it answers `PING`.
    pub fn start(dir: &Path, interrupt: &Interrupt) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let port = crate::free_port()?;
        // A new log for a new stack; a restart appends to it.
        let log = dir.join("redis.log");
        fs::File::create(&log)?;
        let child = Self::spawn(port, dir, &log)?;
        let mut redis = Self {
            port,
            dir: dir.to_path_buf(),
            log,
            child,
        };
        redis.wait_ready(interrupt)?;
        Ok(redis)
    }

    /// The server again, on its port (the gateway keeps its address), after it died.
    /// Its buckets start full: nothing was saved.
    pub fn restart(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        self.child.stop();
        self.child = Self::spawn(self.port, &self.dir, &self.log)?;
        self.wait_ready(interrupt)
    }

    /// How it ended, once, if it has exited.
    pub fn take_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take_exit()
    }

    /// Its log, appended to across restarts.
    pub fn log(&self) -> &Path {
        &self.log
    }

    fn spawn(port: u16, dir: &Path, log: &Path) -> anyhow::Result<Supervised> {
        let server = crate::tools::debian_tool("redis-server", "redis-server")?;
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        Ok(Supervised::spawn(
            "redis-server",
            Command::new(server)
                .args(["--bind", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out),
        )?)
    }

    /// Waits until it answers `PING`, for at most 30 s.
    fn wait_ready(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            interrupt.check()?;
            if let Some(status) = self.child.exited() {
                bail!(
                    "redis-server exited ({status}); {}",
                    crate::log_tail(&self.log, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server did not answer within 30s; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn answers(&self) -> bool {
        let ping = || -> anyhow::Result<bool> {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            stream.write_all(b"PING\r\n")?;
            let mut reply = [0_u8; 7];
            stream.read_exact(&mut reply).context("reply")?;
            Ok(&reply == b"+PONG\r\n")
        };
        ping().unwrap_or(false)
    }
}
