//! `cargo xtask up`: the whole local stack in the foreground.
//!
//! Order of start: PostgreSQL, Apache Kafka (one node, or three with `--brokers 3`),
//! the topics (`kafka-setup`), then the registry, the three business services and the
//! gateway. Each step waits until its part answers. A failure during start-up stops
//! everything already started, in reverse order: every process is a [`Supervised`]
//! child owned by this function, so returning by any path drops (stops) it.
//!
//! Once `ready`, the stack is supervised as a process manager would: a part that
//! dies (a crashed service, a killed Kafka node, PostgreSQL) is logged and restarted
//! on the same port and data, after a backoff that doubles while it keeps dying. The
//! stack stops on Ctrl-C, SIGTERM or SIGHUP, or when a part keeps failing to start.
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
    broker::{Broker, KafkaOptions, Storage},
    postgres::Postgres,
    procs::{Interrupt, Supervised},
    zipkin::Zipkin,
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
    /// Kafka nodes to run: 1, or 3 for a replicated cluster (topics then get
    /// replication factor 3 and `min.insync.replicas=2`).
    pub brokers: usize,
    /// Serve the gateway, the registry, the broker and PostgreSQL over TLS.
    pub tls: bool,
    /// Registry peers to run: 1, or 3 (or up to 5) that replicate to each other; every
    /// service and the gateway is given all of them.
    pub registries: usize,
}

/// The throwaway PKI of `up --tls`: one CA, a certificate per server, and the SCRAM
/// user the services authenticate to Kafka as.
#[derive(Debug)]
struct StackTls {
    /// `target/stack/tls-*`, removed when the stack stops: a new CA per start, and
    /// one per stack when several run at once.
    dir: tempfile::TempDir,
    ca: PathBuf,
    gateway: crate::tls::ServerFiles,
    registry: crate::tls::ServerFiles,
    kafka: crate::tls::ServerFiles,
    postgres: crate::tls::ServerFiles,
    scram_user: &'static str,
    scram_password: String,
}

impl StackTls {
    fn create(stack_dir: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tls-")
            .tempdir_in(stack_dir)?;
        let path = dir.path().to_path_buf();
        let authority = crate::tls::Authority::generate("storefront local stack CA")?;
        Ok(Self {
            ca: authority.write_pem(&path.join("ca.pem"))?,
            gateway: authority.issue(&path, "gateway")?,
            registry: authority.issue(&path, "registry")?,
            kafka: authority.issue(&path, "kafka")?,
            postgres: authority.issue(&path, "postgres")?,
            scram_user: "storefront",
            scram_password: crate::random_token(24),
            dir,
        })
    }

    /// A kcat configuration file (`KCAT_CONFIG`) for the SASL_SSL listener, so that
    /// `kcat -b $KAFKA_BROKERS -L` works as it is and the password stays off the
    /// command line.
    fn write_kcat_config(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("kcat.conf");
        fs::write(
            &path,
            format!(
                "security.protocol=SASL_SSL\n\
                 sasl.mechanisms=SCRAM-SHA-512\n\
                 sasl.username={}\n\
                 sasl.password={}\n\
                 ssl.ca.location={}\n",
                self.scram_user,
                self.scram_password,
                self.ca.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// `["<ca>"]`: a one-element list setting, as the config layers parse it.
    fn ca_list(&self) -> String {
        format!("[\"{}\"]", self.ca.display())
    }
}

/// The stack's CA, once `up --tls` made one: every readiness check trusts it.
static STACK_CA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// An HTTP client for the stack's own readiness checks, trusting the stack's CA when
/// it has one.
fn agent(timeout: Duration, status_as_error: bool) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(status_as_error);
    if let Some(tls) = STACK_CA.get().and_then(|ca| trusting(ca)) {
        config = config.tls_config(tls);
    }
    config.build().into()
}

/// A ureq TLS configuration trusting only the CA in `ca` (PEM); `None` when the file
/// cannot be read as one.
pub(crate) fn trusting(ca: &Path) -> Option<ureq::tls::TlsConfig> {
    let pem = fs::read(ca).ok()?;
    let certificate = ureq::tls::Certificate::from_pem(&pem).ok()?.to_owned();
    Some(
        ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[certificate]))
            .build(),
    )
}

/// A service of the stack and the environment prefix of its settings.
#[derive(Debug, Clone, Copy)]
struct Service {
    /// Its name in the printout, the logs and the supervisor.
    name: &'static str,
    env_prefix: &'static str,
    /// The binary it runs.
    program: &'static str,
}

/// The names of registry peers after the first (`registry`).
const REGISTRY_PEERS: [&str; 4] = ["registry-2", "registry-3", "registry-4", "registry-5"];

/// In start order: the registry first (everyone registers with it), the gateway last
/// (it routes to the others).
const SERVICES: [Service; 5] = [
    Service {
        name: "registry",
        env_prefix: "REGISTRY_",
        program: "registry",
    },
    Service {
        name: "order-service",
        env_prefix: "ORDER_",
        program: "order-service",
    },
    Service {
        name: "payment-service",
        env_prefix: "PAYMENT_",
        program: "payment-service",
    },
    Service {
        name: "notification-service",
        env_prefix: "NOTIFICATION_",
        program: "notification-service",
    },
    Service {
        name: "gateway",
        env_prefix: "GATEWAY_",
        program: "gateway",
    },
];

/// A `cargo xtask up` running as a child process (benchmarks, the chaos scenario and
/// the end-to-end tests drive one), stopped with SIGINT, as Ctrl-C would, on drop. It
/// is a [`Supervised`] child, so a harness that dies takes the stack with it.
#[derive(Debug)]
pub struct UpProcess {
    child: Supervised,
    env: Vec<(String, String)>,
}

impl UpProcess {
    /// Runs `xtask up` with `args` on free ports, its own PostgreSQL and Kafka, and
    /// the env file `env_file`; returns once it printed `ready`. Its standard output
    /// and error go to `log`.
    pub fn start(
        xtask: &Path,
        args: &[&str],
        env_file: &Path,
        log: &Path,
        interrupt: &Interrupt,
    ) -> anyhow::Result<Self> {
        let output = fs::File::create(log)?;
        let mut command = Command::new(xtask);
        command
            .args(["up", "--gateway-port", "0", "--registry-port", "0"])
            .args(args)
            .arg("--env-file")
            .arg(env_file)
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BROKERS")
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let child = Supervised::spawn("xtask up", &mut command)?
            // Its own orderly stop takes a while with three Kafka nodes.
            .stop_with(nix::sys::signal::Signal::SIGINT, Duration::from_secs(60));
        let mut up = Self {
            child,
            env: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            interrupt.check()?;
            if let Some(status) = up.child.exited() {
                // CI keeps only the test's output, not the log: carry its end along.
                bail!(
                    "xtask up exited ({status}) before ready; {}",
                    crate::log_tail(log, 60)
                );
            }
            let said = fs::read_to_string(log).unwrap_or_default();
            if said.lines().any(|l| l.starts_with("ready")) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "xtask up was not ready within 15 min; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        up.env = fs::read_to_string(env_file)?
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(up)
    }

    /// A variable of the stack's env file.
    pub fn var(&self, key: &str) -> anyhow::Result<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .with_context(|| format!("{key} missing from the stack's env file"))
    }

    /// The `xtask up` process.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

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
    let tls = match options.tls {
        true => {
            let tls = StackTls::create(&stack_dir)?;
            let _ = STACK_CA.set(tls.ca.clone());
            Some(tls)
        }
        false => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };

    say("building the services");
    let mut build = crate::cargo();
    build.args(["build", "--quiet", "--bins"]);
    if options.release {
        build.arg("--release");
    }
    for service in SERVICES {
        build.args(["--package", service.program]);
    }
    build.args(["--package", "kafka-setup"]);
    crate::procs::run("cargo build", &mut build, &interrupt)?;

    say(&format!(
        "starting Zipkin {} (spans from every process)",
        crate::zipkin::ZIPKIN_VERSION
    ));
    let mut zipkin = Zipkin::spawn(&logs, &interrupt)?;

    say("starting PostgreSQL");
    let postgres_dir = if options.durable {
        stack_dir.join("durable").join("postgres")
    } else {
        stack_dir.join(format!("postgres-{}", std::process::id()))
    };
    let mut postgres = Postgres::provide_with(
        &postgres_dir,
        options.durable,
        tls.as_ref().map(|t| crate::postgres::ServerTls {
            certificate: t.postgres.certificate.clone(),
            key: t.postgres.key.clone(),
        }),
        &interrupt,
    )?;
    // verify-full: the server's certificate must name the host and chain to the CA.
    let database_url = match &tls {
        // A database from outside (DATABASE_URL) is used as its URL says.
        Some(tls) if postgres.cluster().is_some() => {
            let url = postgres.url();
            let separator = if url.contains('?') { '&' } else { '?' };
            format!(
                "{url}{separator}sslmode=verify-full&sslrootcert={}",
                tls.ca.display()
            )
        }
        _ => postgres.url().to_owned(),
    };

    say(&match options.brokers {
        1 => format!("starting Apache Kafka {}", crate::broker::KAFKA_VERSION),
        n => format!(
            "starting Apache Kafka {} ({n} nodes)",
            crate::broker::KAFKA_VERSION
        ),
    });
    let storage = if options.durable {
        Storage::Durable(stack_dir.join("durable").join("kafka"))
    } else {
        Storage::Throwaway
    };
    let mut kafka_options = KafkaOptions::single(&logs)
        .with_nodes(options.brokers)
        .with_storage(storage);
    if let Some(tls) = &tls {
        kafka_options = kafka_options.with_secure_listener(&tls.kafka.key_and_certificate);
    }
    let mut broker = Broker::provide(&kafka_options, &interrupt)?;
    // Under --tls every client uses the SASL_SSL listener; the plain one stays for
    // the broker's own traffic between nodes and for the admin tool.
    let kafka_brokers = match &tls {
        Some(tls) => {
            let Some(cluster) = broker.cluster() else {
                bail!("--tls needs the stack's own Kafka: unset KAFKA_BROKERS");
            };
            cluster.add_scram_user(
                tls.scram_user,
                &tls.scram_password,
                "SCRAM-SHA-512",
                &interrupt,
            )?;
            cluster
                .secure_bootstrap()
                .context("the cluster has no SASL_SSL listener")?
        }
        None => broker.brokers().to_owned(),
    };
    // Kafka's client settings as environment variables: `prefix` is a service's
    // settings prefix (`ORDER_KAFKA__`), or "" for kafka-setup's own variables.
    let kafka_env = |service_prefix: Option<&str>| -> Vec<(String, std::ffi::OsString)> {
        let Some(tls) = &tls else {
            return Vec::new();
        };
        let name = |key: &str| match service_prefix {
            Some(prefix) => format!("{prefix}KAFKA__{}", key.replace('.', "__")),
            None => format!("KAFKA_{}", key.replace('.', "_")),
        };
        vec![
            (name("SECURITY_PROTOCOL"), "SASL_SSL".into()),
            (name("SASL.MECHANISM"), "SCRAM-SHA-512".into()),
            (name("SASL.USERNAME"), tls.scram_user.into()),
            (name("SASL.PASSWORD"), tls.scram_password.clone().into()),
            (name("SSL.CA_FILE"), tls.ca.clone().into()),
        ]
    };

    say("creating the topics");
    let bin = crate::target_dir().join(if options.release { "release" } else { "debug" });
    let mut topics = Command::new(bin.join("kafka-setup"));
    topics.env("KAFKA_BROKERS", &kafka_brokers);
    topics.envs(kafka_env(None));
    if options.brokers >= 3 {
        // What docs/kafka-configs.md recommends for production: three copies of every
        // partition, and a write acknowledged once two of them have it.
        topics.args(["--replication-factor", "3", "--min-insync-replicas", "2"]);
    }
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
    let mut smtp = SmtpSink::start(&mailbox, &logs, &interrupt)?;
    let smtp_port = smtp.port;

    say("starting Redis (Debian), where the gateway keeps its rate limits");
    let mut redis = crate::redis::Redis::start(&stack_dir.join("redis"), &interrupt)?;
    let redis_url = redis.url();

    say("waiting for Zipkin");
    zipkin.wait_ready(&interrupt)?;
    let zipkin_url = zipkin.url();

    // Every peer is given every peer's URL, itself included (it recognises itself),
    // and every client all of them: losing one costs no route.
    let registries = options.registries.clamp(1, 1 + REGISTRY_PEERS.len());
    let mut registry_ports = vec![registry_port];
    registry_ports.extend(
        crate::free_ports(registries)?
            .into_iter()
            .filter(|p| *p != registry_port)
            .take(registries - 1),
    );
    let registry_urls: Vec<String> = registry_ports
        .iter()
        .map(|port| format!("{scheme}://127.0.0.1:{port}"))
        .collect();
    let registry_url = registry_urls[0].clone();
    let all_registries = registry_urls.join(",");
    // Each part with its fixed port, or `None` for a free one picked as it starts.
    let mut services: Vec<(Service, Option<u16>)> = Vec::new();
    for service in SERVICES {
        match service.program {
            "registry" => {
                services.push((service, Some(registry_port)));
                for (name, port) in REGISTRY_PEERS.iter().zip(&registry_ports[1..]) {
                    services.push((Service { name, ..service }, Some(*port)));
                }
            }
            "gateway" => services.push((service, Some(gateway_port))),
            _ => services.push((service, None)),
        }
    }
    let gateway_config = stack_dir.join("gateway.yaml");
    write_gateway_config(&gateway_config)?;
    let gateway_url = format!("{scheme}://127.0.0.1:{gateway_port}");
    let registry_token = crate::random_token(32);
    let mut running: Vec<ServiceProcess> = Vec::new();
    for (service, port) in services {
        let port = match port {
            Some(port) => port,
            None => crate::free_port()?,
        };
        say(&format!("starting {}", service.name));
        let mut env: Vec<(String, std::ffi::OsString)> = vec![
            (
                format!("{}HTTP__PORT", service.env_prefix),
                port.to_string().into(),
            ),
            ("DATABASE_URL".into(), database_url.clone().into()),
            ("KAFKA_BROKERS".into(), kafka_brokers.clone().into()),
            ("REGISTRY_URL".into(), all_registries.clone().into()),
            // The registry holds the operator's token; every other process gets its
            // own service's credential, which writes only its own instances.
            (
                "REGISTRY_TOKEN".into(),
                if service.program == "registry" {
                    registry_token.clone().into()
                } else {
                    shared::registry::service_credential(&registry_token, service.name).into()
                },
            ),
            ("GATEWAY_URL".into(), gateway_url.clone().into()),
            ("ZIPKIN_URL".into(), zipkin_url.clone().into()),
        ];
        if service.name == "gateway" {
            env.push(("GATEWAY_CONFIG".into(), gateway_config.clone().into()));
            env.push(("GATEWAY_REDIS__URL".into(), redis_url.clone().into()));
        }
        if service.program == "registry" && registries > 1 {
            env.push(("REGISTRY_PEERS__URLS".into(), all_registries.clone().into()));
        }
        if let Some(tls) = &tls {
            let prefix = service.env_prefix;
            let served = match service.program {
                "registry" => Some(&tls.registry),
                "gateway" => Some(&tls.gateway),
                _ => None,
            };
            if let Some(files) = served {
                env.push((
                    format!("{prefix}HTTP__TLS__CERTIFICATE_FILE"),
                    files.certificate.clone().into(),
                ));
                env.push((
                    format!("{prefix}HTTP__TLS__KEY_FILE"),
                    files.key.clone().into(),
                ));
            }
            if service.program == "registry" && registries > 1 {
                env.push((format!("{prefix}PEERS__CA_FILES"), tls.ca_list().into()));
            }
            if service.program != "registry" {
                // Every other process is a client of the registry, and the services
                // fetch the gateway's key set: both over https now.
                env.push((format!("{prefix}REGISTRY__CA_FILES"), tls.ca_list().into()));
            }
            if !matches!(service.program, "registry" | "gateway") {
                env.push((
                    format!("{prefix}AUTH__EXTRA__CA_FILES"),
                    tls.ca_list().into(),
                ));
                env.extend(kafka_env(Some(prefix)));
            }
        }
        if service.name == "notification-service" {
            env.push((
                "NOTIFICATION_MAIL__SMTP_PORT".into(),
                smtp_port.to_string().into(),
            ));
        }
        let log = logs.join(format!("{}.log", service.name));
        fs::File::create(&log)?;
        let served_tls = tls.is_some() && matches!(service.program, "registry" | "gateway");
        running.push(ServiceProcess::start(
            service,
            port,
            served_tls,
            bin.join(service.program),
            env,
            log,
            &interrupt,
        )?);
    }

    say("waiting for every service to register");
    let registering: Vec<&str> = SERVICES
        .iter()
        .map(|s| s.name)
        .filter(|name| *name != "registry")
        .collect();
    // Every peer lists every service: replication works, whichever peer a service
    // registered with.
    for url in &registry_urls {
        wait_registered(url, &registering, &mut running, &interrupt)?;
    }

    say("checking that a request through the gateway reaches every service");
    wait_through_gateway(&gateway_url, &mut running, &interrupt)?;

    let env_file = options.env_file.clone().unwrap_or_else(stack_env_path);
    let mut env_text = format!(
        "# Written by `cargo xtask up` while the stack runs; removed when it stops.\n\
         export GATEWAY_URL={gateway_url}\n\
         export REGISTRY_URL={registry_url}\n\
         export REGISTRY_URLS={all_registries}\n\
         export REGISTRY_TOKEN={registry_token}\n\
         export KAFKA_BROKERS={kafka_brokers}\n\
         export DATABASE_URL={database_url}\n\
         export STOREFRONT_MAILDIR={}\n\
         export STOREFRONT_SMTP_PORT={smtp_port}\n\
         export REDIS_URL={redis_url}\n\
         export ZIPKIN_URL={zipkin_url}\n",
        mailbox.display()
    );
    if let Some(tls) = &tls {
        // curl reads CURL_CA_BUNDLE; psql reads sslrootcert from DATABASE_URL; kcat
        // and kafka-setup read the KAFKA_* variables (see the printout).
        let kcat_config = tls.write_kcat_config()?;
        env_text.push_str(&format!(
            "# --tls: the stack's throwaway CA, and the SCRAM user of the SASL_SSL listener.\n\
             export STOREFRONT_CA_FILE={ca}\n\
             export CURL_CA_BUNDLE={ca}\n\
             export KCAT_CONFIG={}\n\
             export KAFKA_SECURITY_PROTOCOL=SASL_SSL\n\
             export KAFKA_SASL_MECHANISM=SCRAM-SHA-512\n\
             export KAFKA_SASL_USERNAME={}\n\
             export KAFKA_SASL_PASSWORD={}\n\
             export KAFKA_SSL_CA_FILE={ca}\n",
            kcat_config.display(),
            tls.scram_user,
            tls.scram_password,
            ca = tls.ca.display(),
        ));
    }
    fs::write(&env_file, env_text)?;
    let _remove_env_file = RemoveOnDrop(env_file.clone());

    println!();
    for process in &running {
        println!("  {:<21} {}", process.service.name, process.url());
    }
    match &tls {
        Some(tls) => {
            println!(
                "  {:<21} {kafka_brokers} (SASL_SSL, SCRAM-SHA-512)",
                "kafka"
            );
            println!(
                "  {:<21} {} (every part above but the services speaks TLS with it; after\n\
                 {:<23}`. target/stack.env`, curl, psql \"$DATABASE_URL\" and kcat -b $KAFKA_BROKERS\n\
                 {:<23}work as they are)",
                "ca",
                tls.ca.display(),
                "",
                ""
            );
        }
        None => println!("  {:<21} {}", "kafka", broker.brokers()),
    }
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
    println!(
        "  {:<21} {redis_url} (the gateway's rate limits; redis-cli -u \"$REDIS_URL\")",
        "redis"
    );
    println!(
        "  {:<21} {zipkin_url}/zipkin/ (traces; API under {zipkin_url}/api/v2)",
        "zipkin"
    );
    println!("  {:<21} {}", "logs", logs.display());
    println!(
        "  {:<21} {} (source it from another terminal)",
        "env",
        env_file.display()
    );
    println!();
    println!("ready: a request through the gateway reached every service; Ctrl-C stops the stack");

    let outcome = supervise(
        &mut running,
        Infrastructure {
            postgres: &mut postgres,
            broker: &mut broker,
            smtp: &mut smtp,
            zipkin: &mut zipkin,
            redis: &mut redis,
        },
        &logs,
        &interrupt,
    );
    // Stop in reverse start order: the gateway first, the database last.
    while let Some(mut process) = running.pop() {
        process.child.stop();
    }
    drop(smtp);
    drop(redis);
    drop(zipkin);
    drop(broker);
    drop(postgres);
    outcome
}

/// Keeps every part of a ready stack running until an interrupt: a part that exits
/// is logged and restarted on its own port and data after a backoff. Returns an error
/// (the caller then stops everything) when a part keeps dying or failing to start.
fn supervise(
    running: &mut [ServiceProcess],
    parts: Infrastructure<'_>,
    logs: &Path,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let Infrastructure {
        postgres,
        broker,
        smtp,
        zipkin,
        redis,
    } = parts;
    let mut restarts: std::collections::BTreeMap<String, Restarts> = Default::default();
    loop {
        if interrupt.requested() {
            say("stopping");
            return Ok(());
        }
        // Notice deaths first, then restart what is due, so a part that died while
        // another was being restarted is scheduled too.
        if let Some(cluster) = postgres.cluster_mut()
            && let Some(status) = cluster.exited()
        {
            let log = cluster.root().join("postgres.log");
            restarts.entry("postgres".into()).or_default().exited(
                "PostgreSQL",
                &status.to_string(),
                &log,
            )?;
        }
        if let Some(cluster) = broker.cluster_mut() {
            while let Some((index, status)) = cluster.exited() {
                let log = cluster
                    .log(index)
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                restarts
                    .entry(format!("kafka-{index}"))
                    .or_default()
                    .exited(
                        &format!("Kafka node {}", index + 1),
                        &status.to_string(),
                        &log,
                    )?;
            }
        }
        if let Some(status) = smtp.child.take_exit() {
            restarts.entry("smtp".into()).or_default().exited(
                &part_name("smtp"),
                &status.to_string(),
                &logs.join("smtp.log"),
            )?;
        }
        if let Some(status) = zipkin.child.take_exit() {
            restarts.entry("zipkin".into()).or_default().exited(
                &part_name("zipkin"),
                &status.to_string(),
                &logs.join("zipkin.log"),
            )?;
        }
        if let Some(status) = redis.take_exit() {
            restarts.entry("redis".into()).or_default().exited(
                &part_name("redis"),
                &status.to_string(),
                redis.log(),
            )?;
        }
        for process in running.iter_mut() {
            if let Some(status) = process.child.take_exit() {
                restarts
                    .entry(process.service.name.into())
                    .or_default()
                    .exited(process.service.name, &status.to_string(), &process.log)?;
            }
        }

        let due: Vec<String> = restarts
            .iter()
            .filter(|(_, r)| r.is_due())
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let attempt = if name == "postgres" {
                match postgres.cluster_mut() {
                    Some(cluster) => cluster.restart(interrupt),
                    None => Ok(()),
                }
            } else if let Some(index) = name.strip_prefix("kafka-") {
                let index: usize = index.parse().unwrap_or_default();
                match broker.cluster_mut() {
                    Some(cluster) => cluster.restart(index, interrupt),
                    None => Ok(()),
                }
            } else if name == "smtp" {
                smtp.restart(interrupt)
            } else if name == "zipkin" {
                zipkin.restart(interrupt)
            } else if name == "redis" {
                redis.restart(interrupt)
            } else {
                match running.iter_mut().find(|p| p.service.name == name) {
                    Some(process) => process.restart(interrupt),
                    None => Ok(()),
                }
            };
            if interrupt.requested() {
                say("stopping");
                return Ok(());
            }
            let entry = restarts.entry(name.clone()).or_default();
            match attempt {
                Ok(()) => {
                    say(&format!("{} restarted", part_name(&name)));
                    entry.restarted();
                }
                Err(e) => {
                    entry.died(&part_name(&name), &format!("failed to start: {e:#}"), logs)?
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the services stand on, kept running by [`supervise`] beside them.
struct Infrastructure<'a> {
    postgres: &'a mut Postgres,
    broker: &'a mut Broker,
    smtp: &'a mut SmtpSink,
    zipkin: &'a mut Zipkin,
    redis: &'a mut crate::redis::Redis,
}

/// How the supervisor's messages name a part it keeps by `key`.
fn part_name(key: &str) -> String {
    match key {
        "postgres" => "PostgreSQL".to_owned(),
        "smtp" => "the SMTP sink".to_owned(),
        "zipkin" => "Zipkin".to_owned(),
        "redis" => "Redis".to_owned(),
        other => match other
            .strip_prefix("kafka-")
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(index) => format!("Kafka node {}", index + 1),
            None => other.to_owned(),
        },
    }
}

/// Restart bookkeeping for one part of the stack.
#[derive(Debug)]
struct Restarts {
    /// Deaths since the part last stayed up for [`STABLE`].
    streak: u32,
    /// When the part was last (re)started.
    started: Instant,
    /// When the next start is due, while the part is down.
    due: Option<Instant>,
}

/// A part that has run this long since its last start is healthy again: its next
/// death starts a new streak with the shortest backoff.
const STABLE: Duration = Duration::from_secs(60);
/// Deaths in a row (each within [`STABLE`] of its start) after which the stack gives up.
const MAX_STREAK: u32 = 5;

impl Default for Restarts {
    fn default() -> Self {
        Self {
            streak: 0,
            started: Instant::now(),
            due: None,
        }
    }
}

impl Restarts {
    /// Records a death (or a failed start) and schedules the next start: 0.5 s after
    /// the first death of a streak, doubling up to 30 s. Fails after [`MAX_STREAK`].
    fn died(&mut self, name: &str, how: &str, log: &Path) -> anyhow::Result<()> {
        if self.started.elapsed() >= STABLE {
            self.streak = 0;
        }
        self.streak += 1;
        if self.streak > MAX_STREAK {
            bail!(
                "{name} keeps failing ({} times in a row, last: {how}); {}",
                self.streak - 1,
                crate::log_tail(log, 30)
            );
        }
        let delay =
            Duration::from_millis(500 * (1 << (self.streak - 1))).min(Duration::from_secs(30));
        say(&format!(
            "{name} exited ({how}); restarting in {:.1}s (see {})",
            delay.as_secs_f64(),
            log.display()
        ));
        self.due = Some(Instant::now() + delay);
        Ok(())
    }

    /// Records that the part's process exited. While a start is already due, the exit
    /// is the failed start's own process, counted once when that start failed: not a
    /// second death, which would shorten the streak the stack allows.
    fn exited(&mut self, name: &str, how: &str, log: &Path) -> anyhow::Result<()> {
        if self.due.is_some() {
            return Ok(());
        }
        self.died(name, how, log)
    }

    fn is_due(&self) -> bool {
        self.due.is_some_and(|due| Instant::now() >= due)
    }

    fn restarted(&mut self) {
        self.due = None;
        self.started = Instant::now();
    }
}

/// One of the stack's own programs and how to start it again.
#[derive(Debug)]
struct ServiceProcess {
    service: Service,
    port: u16,
    /// Whether it serves HTTPS.
    tls: bool,
    program: PathBuf,
    env: Vec<(String, std::ffi::OsString)>,
    log: PathBuf,
    child: Supervised,
}

impl ServiceProcess {
    /// Starts the program and waits until its health endpoint answers.
    fn start(
        service: Service,
        port: u16,
        tls: bool,
        program: PathBuf,
        env: Vec<(String, std::ffi::OsString)>,
        log: PathBuf,
        interrupt: &Interrupt,
    ) -> anyhow::Result<Self> {
        let child = Self::spawn(service, &program, &env, &log)?;
        let mut process = Self {
            service,
            port,
            tls,
            program,
            env,
            log,
            child,
        };
        let url = process.url();
        wait_healthy(&mut process.child, &url, &process.log, interrupt)?;
        Ok(process)
    }

    /// Where it serves.
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn spawn(
        service: Service,
        program: &Path,
        env: &[(String, std::ffi::OsString)],
        log: &Path,
    ) -> anyhow::Result<Supervised> {
        // Appended to: a crash and the restart after it end up in one file.
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut command = Command::new(program);
        command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(Supervised::spawn(service.name, &mut command)?)
    }

    fn restart(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        self.child.stop();
        self.child = Self::spawn(self.service, &self.program, &self.env, &self.log)?;
        let url = self.url();
        wait_healthy(&mut self.child, &url, &self.log, interrupt)
    }
}

/// aiosmtpd on a port of its own, writing every mail it accepts into a Maildir.
#[derive(Debug)]
struct SmtpSink {
    port: u16,
    mailbox: PathBuf,
    log: PathBuf,
    site: PathBuf,
    child: Supervised,
}

impl SmtpSink {
    /// Starts the sink on a free port, writing into the Maildir `mailbox`.
    fn start(mailbox: &Path, logs: &Path, interrupt: &Interrupt) -> anyhow::Result<Self> {
        let site = crate::tools::aiosmtpd(interrupt)?;
        for part in ["new", "cur", "tmp"] {
            fs::create_dir_all(mailbox.join(part))?;
        }
        let log = logs.join("smtp.log");
        fs::File::create(&log)?;
        let port = crate::free_port()?;
        let child = Self::spawn(port, mailbox, &log, &site)?;
        let mut sink = Self {
            port,
            mailbox: mailbox.to_path_buf(),
            log,
            site,
            child,
        };
        sink.wait_listening(interrupt)?;
        Ok(sink)
    }

    fn spawn(port: u16, mailbox: &Path, log: &Path, site: &Path) -> anyhow::Result<Supervised> {
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
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
        Ok(Supervised::spawn("aiosmtpd", &mut command)?)
    }

    fn wait_listening(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            interrupt.check()?;
            if let Some(status) = self.child.exited() {
                bail!(
                    "aiosmtpd exited ({status}); {}",
                    crate::log_tail(&self.log, 30)
                );
            }
            if Instant::now() > deadline {
                bail!("aiosmtpd did not listen on {} within 30s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn restart(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        self.child.stop();
        self.child = Self::spawn(self.port, &self.mailbox, &self.log, &self.site)?;
        self.wait_listening(interrupt)
    }
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
         upstream:\n  # Instances run on this machine only.\n  instance_networks: [\"127.0.0.0/8\", \"::1/128\"]\n\
         # Developers and tests follow their own requests: a client's traceparent is continued.\n\
         client_traces: true\n\
         auth:\n  signing_key: \"{key}\"\n  users:\n{users}"
    );
    fs::write(path, text)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The first of `running` that exited: its name, its status and the end of its log.
fn first_exited(
    running: &mut [ServiceProcess],
) -> Option<(&'static str, std::process::ExitStatus, String)> {
    running.iter_mut().find_map(|p| {
        let status = p.child.exited()?;
        Some((p.service.name, status, crate::log_tail(&p.log, 30)))
    })
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
    base: &str,
    log: &Path,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let url = format!("{base}/actuator/health");
    let agent = agent(Duration::from_secs(2), true);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        interrupt.check()?;
        if let Some(status) = child.exited() {
            bail!(
                "{} exited ({status}) during start-up; {}",
                child.name(),
                crate::log_tail(log, 30)
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
    running: &mut [ServiceProcess],
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let agent = agent(Duration::from_secs(5), true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut index = 0_u64;
    loop {
        interrupt.check()?;
        if let Some((service, status, log)) = first_exited(running) {
            bail!("{service} exited ({status}) before registering; {log}");
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
    running: &mut [ServiceProcess],
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let agent = agent(Duration::from_secs(5), false);
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
            if let Some((service, status, log)) = first_exited(running) {
                bail!("{service} exited ({status}); {log}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_doubling_and_give_up_when_a_part_keeps_dying() {
        let mut restarts = Restarts::default();
        let log = Path::new("part.log");
        let mut delays = Vec::new();
        for _ in 0..MAX_STREAK {
            let before = Instant::now();
            restarts
                .died("part", "signal 9", log)
                .expect("still restarting");
            let due = restarts.due.expect("a restart is scheduled");
            delays.push((due - before).as_millis() / 100);
            restarts.restarted();
        }
        assert_eq!(delays, [5, 10, 20, 40, 80], "0.5 s, doubling");
        let error = restarts
            .died("part", "signal 9", log)
            .expect_err("the sixth death in a row stops the stack");
        assert!(error.to_string().contains("keeps failing"), "{error}");
    }

    #[test]
    fn a_part_that_stayed_up_starts_a_new_streak() {
        let mut restarts = Restarts::default();
        for _ in 0..MAX_STREAK {
            restarts
                .died("part", "exit 1", Path::new("x"))
                .expect("restart");
        }
        restarts.started = Instant::now() - STABLE;
        restarts
            .died("part", "exit 1", Path::new("x"))
            .expect("a new streak");
        assert_eq!(restarts.streak, 1);
    }

    #[test]
    fn a_failed_start_counts_once_though_its_process_exits_too() {
        let mut restarts = Restarts::default();
        let log = Path::new("part.log");
        restarts.exited("part", "signal 9", log).expect("restart");
        // The restart fails: its process exited before it was ready.
        restarts
            .died("part", "failed to start: exited", log)
            .expect("restart again");
        let due = restarts.due;
        // The supervisor's next pass sees that process's exit.
        restarts.exited("part", "exit 1", log).expect("restart");
        assert_eq!(restarts.streak, 2, "the failed start counted once");
        assert_eq!(restarts.due, due, "the backoff is not moved");
        restarts.restarted();
        restarts.exited("part", "signal 9", log).expect("restart");
        assert_eq!(restarts.streak, 3, "a death after a start counts again");
    }

    #[test]
    fn parts_are_named_for_people() {
        assert_eq!(part_name("kafka-2"), "Kafka node 3");
        assert_eq!(part_name("postgres"), "PostgreSQL");
        assert_eq!(part_name("order-service"), "order-service");
    }
}
