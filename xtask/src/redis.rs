//! A throwaway Redis server (Debian's `redis-server`, installed with apt when missing
//! and xtask runs as root), for the gateway's shared rate limits: no persistence, on
//! a free loopback port, stopped when dropped.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::procs::{Interrupt, Supervised};

/// A running `redis-server`.
#[derive(Debug)]
pub struct Redis {
    port: u16,
    child: Supervised,
}

impl Redis {
    /// Starts a server whose files (only its log: nothing is saved) go under `dir`,
    /// and waits until it answers `PING`.
    pub fn start(dir: &Path, interrupt: &Interrupt) -> anyhow::Result<Self> {
        let server = crate::tools::debian_tool("redis-server", "redis-server")?;
        fs::create_dir_all(dir)?;
        let log = dir.join("redis.log");
        let out = fs::File::create(&log)?;
        let port = crate::free_port()?;
        let child = Supervised::spawn(
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
        )?;
        let mut redis = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !redis.answers() {
            interrupt.check()?;
            if let Some(status) = redis.child.exited() {
                bail!(
                    "redis-server exited ({status}); {}",
                    crate::log_tail(&log, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server did not answer within 30s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(redis)
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
