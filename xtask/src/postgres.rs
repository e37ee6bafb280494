//! PostgreSQL for the local stack and the tests.
//!
//! With `DATABASE_URL` set, that database is used as it is. Otherwise xtask runs a
//! cluster of its own with the Debian server binaries: `initdb` into a folder under
//! `target/`, `postgres` on a free loopback port with a random password, and the
//! folder removed afterwards (kept with `--durable`, so data survives a restart).
//! `initdb` refuses to run as root, so as root the cluster runs as the `postgres`
//! user. Missing binaries are installed with apt when xtask runs as root on Debian;
//! otherwise the error says, in one line, what to install.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::procs::{Interrupt, Supervised};

/// The database the stack's services use inside a throwaway cluster.
pub const DATABASE: &str = "storefront";

/// A database to use: either given by `DATABASE_URL` or a cluster xtask runs.
#[derive(Debug)]
pub struct Postgres {
    url: String,
    cluster: Option<Cluster>,
}

impl Postgres {
    /// Uses `DATABASE_URL` when set, else starts a cluster in `dir` (kept afterwards
    /// when `keep`).
    pub fn provide(dir: &Path, keep: bool, interrupt: &Interrupt) -> anyhow::Result<Self> {
        Self::provide_with(dir, keep, None, interrupt)
    }

    /// [`Postgres::provide`], the cluster serving TLS with `tls` when given (a
    /// `DATABASE_URL` from outside is used as it is).
    pub fn provide_with(
        dir: &Path,
        keep: bool,
        tls: Option<ServerTls>,
        interrupt: &Interrupt,
    ) -> anyhow::Result<Self> {
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.is_empty()
        {
            return Ok(Self { url, cluster: None });
        }
        let cluster = Cluster::start_with(dir, keep, tls.as_ref(), interrupt)?;
        Ok(Self {
            url: cluster.url(DATABASE),
            cluster: Some(cluster),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The cluster xtask started, if it started one.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    pub fn cluster_mut(&mut self) -> Option<&mut Cluster> {
        self.cluster.as_mut()
    }
}

/// A PostgreSQL server xtask started, stopped and (unless kept) deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    server: Supervised,
    bin: PathBuf,
    owner: ClusterOwner,
    data: PathBuf,
    root: PathBuf,
    port: u16,
    password: String,
    keep: bool,
    tls: bool,
}

/// A certificate and its key (PEM files) for a cluster to serve TLS with.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl Cluster {
    /// Initialises (unless `root` already holds a cluster) and starts a cluster whose
    /// files live in `root`, and creates the [`DATABASE`] database.
    pub fn start(root: &Path, keep: bool, interrupt: &Interrupt) -> anyhow::Result<Self> {
        Self::start_with(root, keep, None, interrupt)
    }

    /// [`Cluster::start`], serving TLS (`ssl = on`) with `tls` when given: copied into
    /// the cluster's folder, owned by the server's user, the key readable by it alone
    /// (PostgreSQL refuses a key others can read).
    pub fn start_with(
        root: &Path,
        keep: bool,
        tls: Option<&ServerTls>,
        interrupt: &Interrupt,
    ) -> anyhow::Result<Self> {
        let bin = server_bindir()?;
        let owner = ClusterOwner::current()?;
        let root = owner.usable_root(root)?;
        let data = root.join("data");
        let password_file = root.join("password");

        let password = if data.join("PG_VERSION").exists() {
            fs::read_to_string(&password_file)
                .with_context(|| format!("{} has a cluster but no password file", root.display()))?
                .trim()
                .to_owned()
        } else {
            let _ = fs::remove_dir_all(&data);
            let password = crate::random_token(24);
            fs::write(&password_file, &password)?;
            fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600))?;
            owner.chown(&root)?;
            owner.chown(&password_file)?;
            let mut initdb = owner.command(bin.join("initdb"));
            initdb
                .arg("--pgdata")
                .arg(&data)
                .args([
                    "--username=postgres",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                ])
                .args(["--locale=C", "--no-sync"])
                .arg(format!("--pwfile={}", password_file.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let output = initdb.output().context("cannot run initdb")?;
            if !output.status.success() {
                bail!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            password
        };

        if let Some(tls) = tls {
            for (from, to, mode) in [
                (&tls.certificate, "server.crt", 0o644),
                (&tls.key, "server.key", 0o600),
            ] {
                let to = root.join(to);
                fs::copy(from, &to)
                    .with_context(|| format!("cannot copy {} into the cluster", from.display()))?;
                fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
                owner.chown(&to)?;
            }
        }
        let port = crate::free_port()?;
        // A fresh log per start of the cluster; a restart after a crash appends to it.
        fs::File::create(root.join("postgres.log"))?;
        owner.chown(&root.join("postgres.log"))?;
        let server = spawn_server(&bin, &owner, &data, &root, port, keep, tls.is_some())?;
        let mut cluster = Self {
            server,
            bin,
            owner,
            data,
            root: root.clone(),
            port,
            password,
            keep,
            tls: tls.is_some(),
        };
        cluster.wait_ready(interrupt)?;
        cluster.create_database(DATABASE)?;
        Ok(cluster)
    }

    /// `Some(status)` the first time this is called after the server exited (crashed,
    /// or was killed) since it was last started. Whatever it left in its process group
    /// (backends that have not noticed yet) is killed, so a restart finds its shared
    /// memory free.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.server.take_exit()?;
        self.server.stop();
        Some(status)
    }

    /// Starts the server again on the same port and data (stopping it first if it
    /// still runs), and waits until it accepts connections. After a crash PostgreSQL
    /// replays its WAL first: committed transactions are all there.
    pub fn restart(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        self.server.stop();
        self.server = spawn_server(
            &self.bin,
            &self.owner,
            &self.data,
            &self.root,
            self.port,
            self.keep,
            self.tls,
        )?;
        self.wait_ready(interrupt)
    }

    /// Stops the server at once, as `pg_ctl stop -m immediate` does (SIGQUIT): no
    /// checkpoint, so the next start runs crash recovery.
    pub fn stop_immediately(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.server.pid() as i32),
            Signal::SIGQUIT,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.server.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server.stop();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// A URL for `database` as the `postgres` superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    fn wait_ready(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            interrupt.check()?;
            if let Some(status) = self.server.exited() {
                bail!(
                    "postgres exited ({status}) during start-up; {}",
                    crate::log_tail(&self.root.join("postgres.log"), 30)
                );
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-t",
                    "1",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections within 60s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
            ])
            .arg(format!(
                "SELECT 1 FROM pg_database WHERE datname = '{name}'"
            ))
            .env("PGPASSWORD", &self.password)
            .output()
            .context("cannot run psql")?;
        if String::from_utf8_lossy(&output.stdout).trim() == "1" {
            return Ok(());
        }
        let status = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg(name)
            .env("PGPASSWORD", &self.password)
            .status()
            .context("cannot run createdb")?;
        if !status.success() {
            bail!("createdb {name} failed");
        }
        Ok(())
    }
}

/// Starts `postgres` on `data`, logging into `root/postgres.log` (appended to, so a
/// crash and the restart after it are both in one file).
fn spawn_server(
    bin: &Path,
    owner: &ClusterOwner,
    data: &Path,
    root: &Path,
    port: u16,
    keep: bool,
    tls: bool,
) -> anyhow::Result<Supervised> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("postgres.log"))?;
    let mut postgres = owner.command(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        // No socket file: its path would be long and the cluster is TCP-only.
        .args(["-c", "unix_socket_directories="])
        .args(["-c", "max_connections=300"]);
    if tls {
        postgres
            .args(["-c", "ssl=on"])
            .arg("-c")
            .arg(format!(
                "ssl_cert_file={}",
                root.join("server.crt").display()
            ))
            .arg("-c")
            .arg(format!(
                "ssl_key_file={}",
                root.join("server.key").display()
            ));
    }
    if !keep {
        // A throwaway cluster need not survive the machine crashing, so it skips the
        // disk flushes. It must survive the server crashing, which the chaos scenario
        // does to it: commits stay synchronous, so an acknowledged transaction's WAL
        // is in the kernel's page cache before the client hears of it.
        postgres.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
    }
    postgres
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null());
    Ok(Supervised::spawn("postgres", &mut postgres)?
        // SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for clients.
        .stop_with(Signal::SIGINT, Duration::from_secs(10)))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.stop();
        if !self.keep {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Who runs the cluster: ourselves, or the `postgres` user when we are root.
#[derive(Debug)]
struct ClusterOwner {
    /// `Some((uid, gid))` of `postgres` when running as root.
    switch_to: Option<(u32, u32)>,
}

impl ClusterOwner {
    fn current() -> anyhow::Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Self { switch_to: None });
        }
        let user = nix::unistd::User::from_name("postgres")?.context(
            "running as root, and initdb refuses root, but there is no `postgres` user: \
             install Debian's postgresql package (apt-get install postgresql)",
        )?;
        Ok(Self {
            switch_to: Some((user.uid.as_raw(), user.gid.as_raw())),
        })
    }

    fn command(&self, program: PathBuf) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(program);
        if let Some((uid, gid)) = self.switch_to {
            command.uid(uid).gid(gid);
            // HOME of root is not the postgres user's to read.
            command.env_remove("HOME").current_dir("/");
        }
        command
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.switch_to {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("cannot hand {} to postgres", path.display()))?;
        }
        Ok(())
    }

    /// `preferred` when the cluster's user can reach it; as root, when an ancestor
    /// folder is closed to other users (a checkout under /root, say), a fresh folder
    /// under the system temp dir instead.
    fn usable_root(&self, preferred: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(preferred)
            .with_context(|| format!("cannot create {}", preferred.display()))?;
        let preferred = preferred.canonicalize()?;
        if self.switch_to.is_none() || others_can_traverse(&preferred) {
            return Ok(preferred);
        }
        let fallback = std::env::temp_dir().join(format!(
            "storefront-pg-{}",
            crate::random_token(8).to_lowercase()
        ));
        fs::create_dir_all(&fallback)?;
        eprintln!(
            "xtask: the postgres user cannot reach {}; the cluster lives in {} instead",
            preferred.display(),
            fallback.display()
        );
        Ok(fallback)
    }
}

fn others_can_traverse(path: &Path) -> bool {
    path.ancestors().skip(1).all(|dir| {
        fs::metadata(dir)
            .map(|m| m.mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// The folder with `initdb`, `postgres` and `pg_isready`: Debian keeps them under
/// `/usr/lib/postgresql/<major>/bin`, off the PATH; elsewhere they are on the PATH.
/// Installs Debian's `postgresql` package when they are missing and we may.
pub fn server_bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = find_bindir() {
        return Ok(dir);
    }
    let can_install = nix::unistd::geteuid().is_root() && Path::new("/usr/bin/apt-get").exists();
    if !can_install {
        bail!(
            "PostgreSQL server binaries (initdb, postgres) not found: install them \
             (Debian: sudo apt-get install postgresql) or set DATABASE_URL"
        );
    }
    eprintln!("xtask: PostgreSQL server not found; installing Debian's postgresql package");
    apt_install(&["postgresql"])?;
    find_bindir().context("installed postgresql, but initdb is still missing")
}

fn find_bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
}

/// The rows `sql` returns on the database at `url`, unaligned (`psql -Atc`): one line
/// per row, columns separated by `|`.
pub fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let psql = server_bindir()
        .map(|dir| dir.join("psql"))
        .unwrap_or_else(|_| PathBuf::from("psql"));
    let output = Command::new(psql)
        .arg(url)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql])
        .stdin(Stdio::null())
        .output()
        .context("cannot run psql")?;
    if !output.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `apt-get install` without prompts and without starting the packaged service: the
/// stack runs its own cluster, so a system one on port 5432 would only be in the way.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed_policy = !policy.exists();
    if placed_policy {
        // Exit 101 = "action forbidden": invoke-rc.d then starts no service.
        fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        fs::set_permissions(policy, fs::Permissions::from_mode(0o755))?;
    }
    let result = (|| -> anyhow::Result<()> {
        let update = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdout(Stdio::null())
            .status()?;
        if !update.success() {
            bail!("apt-get update failed");
        }
        let install = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()?;
        if !install.success() {
            bail!("apt-get install {} failed", packages.join(" "));
        }
        Ok(())
    })();
    if placed_policy {
        let _ = fs::remove_file(policy);
    }
    result
}
