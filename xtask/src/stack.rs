//! `cargo xtask up`: the whole local stack in the foreground.
//!
//! Order of start: PostgreSQL, the broker, the topics (`kafka-setup`), then the
//! registry, the three business services and the gateway. Each step waits until its
//! part answers. Any failure, Ctrl-C, SIGTERM or SIGHUP stops everything already
//! started, in reverse order: every process is a [`Supervised`] child owned by this
//! function, so returning by any path drops (stops) it.
//!
//! While the stack runs, `target/stack.env` says how to reach it; it is removed on
//! the way out so a stale file never points at a dead stack.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    broker::{Broker, Storage},
    postgres::Postgres,
    procs::{Interrupt, Supervised},
};

/// What `up` was asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Keep PostgreSQL's and the broker's data under `target/stack/durable`.
    pub durable: bool,
    /// 0 picks a free port.
    pub gateway_port: u16,
    /// 0 picks a free port.
    pub registry_port: u16,
    /// Where to write the env file; `None` is `target/stack.env`.
    pub env_file: Option<PathBuf>,
    /// Build and run optimized binaries (benchmarks).
    pub release: bool,
}

/// A service of the stack and the environment prefix of its settings.
#[derive(Debug, Clone, Copy)]
struct Service {
    name: &'static str,
    env_prefix: &'static str,
}

/// In start order: the registry first (everyone registers with it), the gateway last
/// (it routes to the others).
const SERVICES: [Service; 5] = [
    Service {
        name: "registry",
        env_prefix: "REGISTRY_",
    },
    Service {
        name: "order-service",
        env_prefix: "ORDER_",
    },
    Service {
        name: "payment-service",
        env_prefix: "PAYMENT_",
    },
    Service {
        name: "notification-service",
        env_prefix: "NOTIFICATION_",
    },
    Service {
        name: "gateway",
        env_prefix: "GATEWAY_",
    },
];

/// The file other terminals source to reach the running stack.
pub fn stack_env_path() -> PathBuf {
    crate::target_dir().join("stack.env")
}

/// Runs the stack until interrupted. Returns an error (and has stopped everything)
/// when any part fails to start or dies while running.
pub fn up(options: &UpOptions) -> anyhow::Result<()> {
    let interrupt = Interrupt::install()?;
    let stack_dir = crate::target_dir().join("stack");
    let logs = stack_dir.join("logs");
    fs::create_dir_all(&logs)?;
    remove_abandoned_clusters(&stack_dir);
    let gateway_port = pick_port(options.gateway_port, "--gateway-port")?;
    let registry_port = pick_port(options.registry_port, "--registry-port")?;

    say("building the services");
    let mut build = crate::cargo();
    build.args(["build", "--quiet", "--bins"]);
    if options.release {
        build.arg("--release");
    }
    for service in SERVICES {
        build.args(["--package", service.name]);
    }
    build.args(["--package", "kafka-setup"]);
    crate::procs::run("cargo build", &mut build, &interrupt)?;

    say("starting PostgreSQL");
    let postgres_dir = if options.durable {
        stack_dir.join("durable").join("postgres")
    } else {
        stack_dir.join(format!("postgres-{}", std::process::id()))
    };
    let postgres = Postgres::provide(&postgres_dir, options.durable, &interrupt)?;

    say("starting the broker");
    let storage = if options.durable {
        Storage::Sqlite(stack_dir.join("durable").join("tansu.db"))
    } else {
        Storage::Throwaway
    };
    let broker = Broker::provide(storage, &logs.join("tansu.log"), &interrupt)?;

    say("creating the topics");
    let bin = crate::target_dir().join(if options.release { "release" } else { "debug" });
    let mut topics = Command::new(bin.join("kafka-setup"));
    topics.env("KAFKA_BROKERS", broker.brokers());
    let mut setup = Supervised::spawn("kafka-setup", &mut topics)?;
    match setup.wait_or_interrupt(&interrupt).map(|s| s.code()) {
        Some(Some(0)) => {}
        // Existing topics differ from kafka-setup/topics.toml (listed above): the stack
        // still works, and changing a broker's live topics is its operator's decision.
        Some(Some(1)) => {
            say("warning: existing topics differ from kafka-setup/topics.toml (see above)");
        }
        Some(status) => bail!("kafka-setup failed ({status:?})"),
        None => bail!("interrupted while creating the topics"),
    }

    say("starting the SMTP sink (aiosmtpd)");
    let mailbox = stack_dir.join("mail");
    let (smtp_port, _smtp) = start_smtp_sink(&mailbox, &logs, &interrupt)?;

    let registry_url = format!("http://127.0.0.1:{registry_port}");
    let gateway_config = stack_dir.join("gateway.yaml");
    write_gateway_config(&gateway_config)?;
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    let registry_token = crate::random_token(32);
    let mut running: Vec<(Service, u16, Supervised)> = Vec::new();
    for service in SERVICES {
        let port = match service.name {
            "registry" => registry_port,
            "gateway" => gateway_port,
            _ => crate::free_port()?,
        };
        say(&format!("starting {}", service.name));
        let log_path = logs.join(format!("{}.log", service.name));
        let log = fs::File::create(&log_path)?;
        let mut command = Command::new(bin.join(service.name));
        if service.name == "gateway" {
            command.env("GATEWAY_CONFIG", &gateway_config);
        }
        if service.name == "notification-service" {
            command.env("NOTIFICATION_MAIL__SMTP_PORT", smtp_port.to_string());
        }
        command
            .env(
                format!("{}HTTP__PORT", service.env_prefix),
                port.to_string(),
            )
            .env("DATABASE_URL", postgres.url())
            .env("KAFKA_BROKERS", broker.brokers())
            .env("REGISTRY_URL", &registry_url)
            .env("REGISTRY_TOKEN", &registry_token)
            .env("GATEWAY_URL", &gateway_url)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = Supervised::spawn(service.name, &mut command)?;
        wait_healthy(&mut child, port, &log_path, &interrupt)?;
        running.push((service, port, child));
    }

    say("waiting for every service to register");
    let registering: Vec<&str> = SERVICES
        .iter()
        .map(|s| s.name)
        .filter(|name| *name != "registry")
        .collect();
    wait_registered(&registry_url, &registering, &mut running, &interrupt)?;

    say("checking that a request through the gateway reaches every service");
    wait_through_gateway(&gateway_url, &mut running, &interrupt)?;

    let env_file = options.env_file.clone().unwrap_or_else(stack_env_path);
    fs::write(
        &env_file,
        format!(
            "# Written by `cargo xtask up` while the stack runs; removed when it stops.\n\
             export GATEWAY_URL={gateway_url}\n\
             export REGISTRY_URL={registry_url}\n\
             export REGISTRY_TOKEN={registry_token}\n\
             export KAFKA_BROKERS={}\n\
             export DATABASE_URL={}\n\
             export STOREFRONT_MAILDIR={}\n",
            broker.brokers(),
            postgres.url(),
            mailbox.display()
        ),
    )?;
    let _remove_env_file = RemoveOnDrop(env_file.clone());

    println!();
    for (service, port, _) in &running {
        println!("  {:<21} http://127.0.0.1:{port}", service.name);
    }
    println!("  {:<21} {}", "kafka", broker.brokers());
    println!(
        "  {:<21} {} (POST {gateway_url}/auth/token)",
        "dev users",
        DEV_USERS
            .iter()
            .map(|(user, _)| format!("{user}/{user}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  {:<21} {} .. {} / {SIM_PASSWORD} (for `cargo xtask simulate`)",
        "simulation users",
        sim_user(1),
        sim_user(SIM_USERS)
    );
    println!(
        "  {:<21} {} (credentials in DATABASE_URL)",
        "postgres",
        postgres.url().rsplit('@').next().unwrap_or_default()
    );
    println!(
        "  {:<21} 127.0.0.1:{smtp_port}, mailbox {} (a Maildir: one file per mail in new/)",
        "smtp sink",
        mailbox.display()
    );
    println!("  {:<21} {}", "logs", logs.display());
    println!(
        "  {:<21} {} (source it from another terminal)",
        "env",
        env_file.display()
    );
    println!();
    println!("ready: a request through the gateway reached every service; Ctrl-C stops the stack");

    let outcome = loop {
        if interrupt.requested() {
            say("stopping");
            break Ok(());
        }
        if let Some((service, status)) = first_exited(&mut running) {
            break Err(anyhow::anyhow!(
                "{service} exited ({status}); see {}",
                logs.join(format!("{service}.log")).display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Stop in reverse start order: the gateway first, the database last.
    while let Some((_, _, mut child)) = running.pop() {
        child.stop();
    }
    drop(broker);
    drop(postgres);
    outcome
}

/// Starts aiosmtpd on a free port, writing every mail it accepts into the Maildir
/// `mailbox`; returns the port and the running sink.
fn start_smtp_sink(
    mailbox: &Path,
    logs: &Path,
    interrupt: &Interrupt,
) -> anyhow::Result<(u16, Supervised)> {
    let site = crate::tools::aiosmtpd(interrupt)?;
    for part in ["new", "cur", "tmp"] {
        fs::create_dir_all(mailbox.join(part))?;
    }
    let port = crate::free_port()?;
    let log = fs::File::create(logs.join("smtp.log"))?;
    let mut command = Command::new("python3");
    command
        .args(["-m", "aiosmtpd", "-n", "-l"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(mailbox)
        .env("PYTHONPATH", site)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut sink = Supervised::spawn("aiosmtpd", &mut command)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        interrupt.check()?;
        if let Some(status) = sink.exited() {
            bail!(
                "aiosmtpd exited ({status}); see {}",
                logs.join("smtp.log").display()
            );
        }
        if std::time::Instant::now() > deadline {
            bail!("aiosmtpd did not listen on {port} within 30s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((port, sink))
}

/// Removes throwaway clusters whose `up` is gone: a `kill -9`ed xtask stops its
/// children (parent-death signal) but cannot delete their files.
fn remove_abandoned_clusters(stack_dir: &Path) {
    for entry in fs::read_dir(stack_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("postgres-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The local stack's users: user name (also the password) and roles. They exist only
/// in the config written here, never in the gateway's defaults.
const DEV_USERS: [(&str, &str); 3] = [
    ("alice", "customer"),
    ("bob", "customer"),
    ("admin", "admin"),
];

/// How many simulation customers the local stack seeds (`sim-001` ...), all with the
/// password [`SIM_PASSWORD`], for `cargo xtask simulate`.
pub const SIM_USERS: usize = 200;
pub const SIM_PASSWORD: &str = "simulate";

/// The name of simulation customer `i` (from 1).
pub fn sim_user(i: usize) -> String {
    format!("sim-{i:03}")
}

/// The gateway's local-stack config: a fresh signing key and the dev users with
/// argon2 hashes, readable by this user only.
pub(crate) fn write_gateway_config(path: &Path) -> anyhow::Result<()> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use base64::Engine;
    let seed: [u8; 32] = rand::random();
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(seed);
    let mut users = String::new();
    for (name, role) in DEV_USERS {
        let salt_bytes: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let hash = argon2::Argon2::default()
            .hash_password(name.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        users.push_str(&format!(
            "    - username: {name}\n      password_hash: \"{hash}\"\n      roles: [{role}]\n"
        ));
    }
    // One hash for every simulation customer: they share a password, and hashing it
    // two hundred times would slow every start.
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hash = argon2::Argon2::default()
        .hash_password(SIM_PASSWORD.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for i in 1..=SIM_USERS {
        users.push_str(&format!(
            "    - username: {}\n      password_hash: \"{hash}\"\n      roles: [customer]\n",
            sim_user(i)
        ));
    }
    let text = format!(
        "# Written by `cargo xtask up` for the local stack only: a generated key and dev users.\n\
         auth:\n  signing_key: \"{key}\"\n  users:\n{users}"
    );
    fs::write(path, text)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The first service that has exited, with how.
fn first_exited(
    running: &mut [(Service, u16, Supervised)],
) -> Option<(&'static str, std::process::ExitStatus)> {
    running
        .iter_mut()
        .find_map(|(s, _, child)| child.exited().map(|status| (s.name, status)))
}

/// `requested`, or a free port when 0; fails early when the port is taken, naming the
/// flag that changes it.
fn pick_port(requested: u16, flag: &str) -> anyhow::Result<u16> {
    if requested == 0 {
        return Ok(crate::free_port()?);
    }
    std::net::TcpListener::bind(("127.0.0.1", requested)).with_context(|| {
        format!("port {requested} is in use: stop what holds it or pass {flag}")
    })?;
    Ok(requested)
}

/// Polls `/actuator/health` until it answers 200, the child exits, or a minute passes.
fn wait_healthy(
    child: &mut Supervised,
    port: u16,
    log: &Path,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/actuator/health");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        interrupt.check()?;
        if let Some(status) = child.exited() {
            bail!(
                "{} exited ({status}) during start-up; see {}",
                child.name(),
                log.display()
            );
        }
        if agent.get(&url).call().is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} was not healthy within 60s at {url}; see {}",
                child.name(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Follows the registry's service list (blocking queries) until every one of
/// `services` has an instance, a child exits, or a minute passes.
fn wait_registered(
    registry_url: &str,
    services: &[&str],
    running: &mut [(Service, u16, Supervised)],
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut index = 0_u64;
    loop {
        interrupt.check()?;
        if let Some((service, status)) = first_exited(running) {
            bail!("{service} exited ({status}) before registering");
        }
        let url = format!("{registry_url}/api/v1/services?index={index}&wait=1s");
        let listing: Option<serde_json::Value> = agent
            .get(&url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok());
        if let Some(listing) = listing {
            index = listing["index"].as_u64().unwrap_or(index);
            let registered: Vec<&str> = listing["services"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
                .unwrap_or_default();
            let missing: Vec<&&str> = services
                .iter()
                .filter(|s| !registered.contains(s))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not registered within 60s: {missing:?}");
            }
        } else if Instant::now() > deadline {
            bail!("the registry at {registry_url} did not answer within 60s");
        } else {
            // Not answering is immediate (connection refused): do not spin on it.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Logs in as the dev admin and calls each service's route through the gateway until
/// every one is answered by its service: 502, 503 and 504 are the gateway saying it
/// could not get there (yet); anything else came from the service.
fn wait_through_gateway(
    gateway_url: &str,
    running: &mut [(Service, u16, Supervised)],
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let deadline = Instant::now() + Duration::from_secs(60);
    let login: serde_json::Value = agent
        .post(&format!("{gateway_url}/auth/token"))
        .send_json(serde_json::json!({"username": "admin", "password": "admin"}))
        .context("cannot reach the gateway's /auth/token")?
        .body_mut()
        .read_json()
        .context("the gateway's /auth/token did not answer JSON")?;
    let token = login["access_token"]
        .as_str()
        .context("the gateway did not issue a token to the dev admin")?
        .to_owned();
    for path in ["/orders", "/payments", "/notifications"] {
        loop {
            interrupt.check()?;
            if let Some((service, status)) = first_exited(running) {
                bail!("{service} exited ({status})");
            }
            let status = agent
                .get(&format!("{gateway_url}{path}"))
                .header("authorization", &format!("Bearer {token}"))
                .call()
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            if status != 0 && !matches!(status, 502..=504) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{path} did not reach its service through the gateway within 60s (last status {status})"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn say(message: &str) {
    eprintln!("xtask: {message}");
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
