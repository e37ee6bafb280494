//! The local stack's tracing backend: a real Zipkin server (`io.zipkin:zipkin-server`
//! from Maven Central, in-memory storage), which every process posts its spans to and
//! whose UI and `/api/v2` API show them.
//!
//! The JVM starts first and is waited for last ([`Zipkin::spawn`], then
//! [`Zipkin::wait_ready`]): its start-up of several seconds overlaps PostgreSQL's and
//! Kafka's, and it is ready before the first service sends a span.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::procs::{Interrupt, Supervised};

/// The Zipkin server release; `xtask/maven/zipkin/pom.xml` names the same.
pub const ZIPKIN_VERSION: &str = "3.5.1";

/// A Zipkin server on a port of its own.
#[derive(Debug)]
pub struct Zipkin {
    pub port: u16,
    jar: PathBuf,
    log: PathBuf,
    pub child: Supervised,
}

impl Zipkin {
    /// Resolves the server (once per tools folder) and starts it; does not wait.
    pub fn spawn(logs: &Path, interrupt: &Interrupt) -> anyhow::Result<Self> {
        let jar = jar(interrupt)?;
        let log = logs.join("zipkin.log");
        fs::File::create(&log)?;
        let port = crate::free_port()?;
        let child = Self::start(port, &jar, &log)?;
        Ok(Self {
            port,
            jar,
            log,
            child,
        })
    }

    /// The address its UI and API answer on.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(port: u16, jar: &Path, log: &Path) -> anyhow::Result<Supervised> {
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut command = Command::new(crate::broker::java_binary()?);
        command
            // A development backend: a bounded heap and a quick start matter more
            // than peak throughput. The in-memory store keeps the newest spans.
            .args(["-Xms64m", "-Xmx384m", "-XX:TieredStopAtLevel=1", "-jar"])
            .arg(jar)
            .arg(format!("--server.port={port}"))
            .arg("--server.address=127.0.0.1")
            .env("STORAGE_TYPE", "mem")
            .env("MEM_MAX_SPANS", "200000")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(Supervised::spawn("zipkin", &mut command)?)
    }

    /// Waits until `/health` answers 200, for at most two minutes.
    pub fn wait_ready(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let health = format!("{}/health", self.url());
        loop {
            interrupt.check()?;
            if agent.get(&health).call().is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.exited() {
                bail!(
                    "Zipkin exited ({status}); {}",
                    crate::log_tail(&self.log, 40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Zipkin did not answer {health} within 120s; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn restart(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        self.child.stop();
        self.child = Self::start(self.port, &self.jar, &self.log)?;
        self.wait_ready(interrupt)
    }
}

/// The server's executable jar: `ZIPKIN_JAR` when set (a machine without Maven
/// Central), else resolved from Maven Central on first use into the tools folder, so
/// later runs and clones reuse it.
pub fn jar(interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    if let Some(given) = std::env::var_os("ZIPKIN_JAR").filter(|j| !j.is_empty()) {
        let given = PathBuf::from(given);
        if !given.is_file() {
            bail!("ZIPKIN_JAR names {}, which is not a file", given.display());
        }
        return Ok(given);
    }
    let tools = crate::tools::tools_dir();
    let root = tools.join(format!("zipkin-{ZIPKIN_VERSION}"));
    let jar = root.join("zipkin-server.jar");
    crate::tools::install_once_with(
        &root,
        &jar,
        &format!(
            "resolving the Zipkin server {ZIPKIN_VERSION} (Maven Central) into {}; later runs reuse it",
            root.display()
        ),
        || {
            let partial = root.join("partial");
            let _ = fs::remove_dir_all(&partial);
            crate::tools::maven_copy_dependencies("zipkin", &partial, &[], interrupt)?;
            // Renamed at the end, so an interrupted copy never looks like a finished one.
            let copied = partial.join(format!("zipkin-server-{ZIPKIN_VERSION}-exec.jar"));
            if !copied.is_file() {
                bail!("Maven finished but {} is missing", copied.display());
            }
            fs::rename(&copied, &jar)?;
            let _ = fs::remove_dir_all(&partial);
            Ok(())
        },
    )?;
    Ok(jar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pom_resolves_the_version_xtask_names() {
        let pom = fs::read_to_string(
            crate::workspace_root()
                .join("xtask")
                .join("maven")
                .join("zipkin")
                .join("pom.xml"),
        )
        .expect("pom.xml");
        assert!(
            pom.contains(&format!(
                "<zipkin.version>{ZIPKIN_VERSION}</zipkin.version>"
            )),
            "xtask/maven/zipkin/pom.xml and ZIPKIN_VERSION disagree"
        );
    }
}
