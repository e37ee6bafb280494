//! The Kafka-compatible broker for the local stack and the tests.
//!
//! With `KAFKA_BROKERS` set, those brokers are used as they are. Otherwise xtask runs
//! `tansu`, a pinned version installed with `cargo install --locked` on first use into
//! a tools folder outside the checkout, so every later clone on the machine reuses it.
//! Storage is tansu's SQLite engine (`libsql`): a throwaway database file in a
//! scratch folder (on `/dev/shm` where there is one) deleted when the broker stops,
//! or with `--durable` a file under `target/` that survives restarts.
//!
//! Why not `memory://`: in tansu 0.6.0 that engine reports a partition's high
//! watermark as its number of record batches, and a fetch from an offset inside a
//! batch returns nothing. A consumer that committed an offset in the middle of a
//! producer's batch (an ordinary event) would never receive the rest of the partition
//! after a restart. The SQLite engine gets both right; `xtask`'s broker tests check it.
//!
//! Why not tansu's PostgreSQL engine for `--durable`: the crate does not ship the
//! schema that engine needs (it lives only in tansu's source repository), and the
//! machines here cannot fetch it at run time. SQLite is built into tansu and needs no
//! schema, so a durable stack depends on nothing outside the crate.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::procs::{Interrupt, Supervised};

/// The pinned tansu release.
pub const TANSU_VERSION: &str = "0.6.0";
/// `sqlite://` needs `libsql`; `dynostore` (for `memory://`) stays so an installed
/// binary keeps matching this list.
pub const TANSU_FEATURES: &str = "dynostore,libsql";

/// Where the broker keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// A SQLite file in a scratch folder removed when the broker stops.
    Throwaway,
    /// A SQLite database file that outlives the broker.
    Sqlite(PathBuf),
}

/// Brokers to use: either given by `KAFKA_BROKERS` or a tansu xtask runs.
#[derive(Debug)]
pub struct Broker {
    brokers: String,
    // Dropped in this order: the server stops before its scratch folder goes.
    server: Option<Supervised>,
    _scratch: Option<tempfile::TempDir>,
}

impl Broker {
    /// Uses `KAFKA_BROKERS` when set, else starts tansu with `storage`, logging to
    /// `log`.
    pub fn provide(storage: Storage, log: &Path, interrupt: &Interrupt) -> anyhow::Result<Self> {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS")
            && !brokers.is_empty()
        {
            return Ok(Self {
                brokers,
                server: None,
                _scratch: None,
            });
        }
        Self::start(storage, log, interrupt)
    }

    /// Starts a tansu broker on a free loopback port.
    pub fn start(storage: Storage, log: &Path, interrupt: &Interrupt) -> anyhow::Result<Self> {
        let tansu = tansu_binary(interrupt)?;
        let port = crate::free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        // tansu resolves a sqlite:// URL against its working directory, so it runs in
        // the database's folder and is given the file name alone.
        let mut scratch = None;
        let (workdir, storage_url) = match &storage {
            Storage::Throwaway => {
                let shm = Path::new("/dev/shm");
                let mut builder = tempfile::Builder::new();
                builder.prefix("storefront-tansu-");
                let dir = builder.tempdir_in(shm).or_else(|_| builder.tempdir())?;
                let workdir = dir.path().to_path_buf();
                scratch = Some(dir);
                (workdir, "sqlite://tansu.db".to_owned())
            }
            Storage::Sqlite(path) => {
                let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
                    bail!("{} is not a file path", path.display());
                };
                fs::create_dir_all(dir)?;
                (
                    dir.to_path_buf(),
                    format!("sqlite://{}", file.to_string_lossy()),
                )
            }
        };
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir)?;
        }
        let log_file = fs::File::create(log)?;
        let mut command = Command::new(&tansu);
        command
            .current_dir(&workdir)
            .arg("broker")
            .args(["--cluster-id", "storefront"])
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", &storage_url])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let mut server = Supervised::spawn("tansu", &mut command)?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            interrupt.check()?;
            if let Some(status) = server.exited() {
                bail!(
                    "tansu exited ({status}) during start-up; see {}",
                    log.display()
                );
            }
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "tansu did not listen on {addr} within 30s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            brokers: addr,
            server: Some(server),
            _scratch: scratch,
        })
    }

    /// The bootstrap list, `host:port[,...]`.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The broker process xtask started, if it started one.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Supervised::pid)
    }
}

/// The tansu binary, installed first if missing. Concurrent callers (parallel tests,
/// two terminals) wait on a lock file instead of installing twice.
pub fn tansu_binary(interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    let root = crate::tools::tools_dir().join(format!("tansu-{TANSU_VERSION}"));
    let binary = root.join("bin").join("tansu");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut install = Command::new(cargo);
    install
        .args(["install", "--locked", "--quiet", "--no-default-features"])
        .args(["--features", TANSU_FEATURES])
        .arg(format!("tansu@{TANSU_VERSION}"))
        .arg("--root")
        .arg(&root)
        // A stack started from inside a cargo build must not inherit its target dir.
        .env_remove("CARGO_TARGET_DIR");
    crate::tools::install_once(
        &root,
        &binary,
        &format!(
            "installing tansu {TANSU_VERSION} (the Kafka-compatible broker) into {}; this \
             first install takes about ten minutes, later runs reuse it",
            root.display()
        ),
        &mut install,
        interrupt,
    )?;
    Ok(binary)
}
