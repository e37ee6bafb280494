//! Apache Kafka for the local stack and the tests.
//!
//! With `KAFKA_BROKERS` set, those brokers are used as they are. Otherwise xtask runs
//! Apache Kafka [`KAFKA_VERSION`] in KRaft mode (no ZooKeeper), from the jars that
//! Maven resolves once into the tools folder (`xtask/maven/kafka/pom.xml`), or from
//! the unpacked distribution that `KAFKA_HOME` points at.
//!
//! Topologies:
//! - one node: broker and controller in one process, replication factor 1;
//! - three nodes: three such processes on loopback forming one controller quorum,
//!   with the replication defaults production uses (factor 3, `min.insync.replicas`
//!   2), so one node can die without losing a write or stopping the cluster.
//!
//! Storage is throwaway (a scratch folder on `/dev/shm`, deleted with the cluster) or
//! durable (a folder that outlives it; the cluster id is kept beside the data, so a
//! restarted cluster opens the same logs). Each node is a [`Supervised`] child; a node
//! can be killed and restarted on its own ports and data, which is what the chaos
//! scenario and the stack's supervisor do.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

use crate::procs::{Interrupt, Supervised};

/// The pinned Apache Kafka release (`org.apache.kafka:kafka_2.13`). The Maven project
/// in `xtask/maven/kafka/` names the same version.
pub const KAFKA_VERSION: &str = "4.4.0";

/// How long a node may take from its start until the cluster lists it.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the cluster keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// A scratch folder removed when the cluster stops.
    Throwaway,
    /// A folder that outlives the cluster: a later cluster of the same size with the
    /// same folder has the same topics, messages and committed offsets.
    Durable(PathBuf),
}

/// What to start.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// Nodes, each a broker and a controller: 1, or 3 for replication.
    pub nodes: usize,
    pub storage: Storage,
    /// The folder for the nodes' logs (`kafka-<node id>.log`).
    pub logs: PathBuf,
    /// A `SASL_SSL` listener on every node besides the plain one, serving this PEM
    /// file (private key, then certificate) and accepting SCRAM-SHA-256 and
    /// SCRAM-SHA-512 users made with [`Cluster::add_scram_user`].
    pub secure: Option<PathBuf>,
}

impl KafkaOptions {
    /// One throwaway node logging into `logs`.
    pub fn single(logs: impl Into<PathBuf>) -> Self {
        Self {
            nodes: 1,
            storage: Storage::Throwaway,
            logs: logs.into(),
            secure: None,
        }
    }

    /// The same with a `SASL_SSL` listener serving `key_and_certificate`.
    pub fn with_secure_listener(mut self, key_and_certificate: impl Into<PathBuf>) -> Self {
        self.secure = Some(key_and_certificate.into());
        self
    }

    /// The same with `nodes` nodes.
    pub fn with_nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// The same with `storage`.
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }
}

/// Brokers to use: either given by `KAFKA_BROKERS` or a cluster xtask runs.
#[derive(Debug)]
pub struct Broker {
    brokers: String,
    cluster: Option<Cluster>,
}

impl Broker {
    /// Uses `KAFKA_BROKERS` when set, else starts a cluster as `options` say.
    pub fn provide(options: &KafkaOptions, interrupt: &Interrupt) -> anyhow::Result<Self> {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS")
            && !brokers.is_empty()
        {
            return Ok(Self {
                brokers,
                cluster: None,
            });
        }
        Self::start(options, interrupt)
    }

    /// Starts a cluster of xtask's own, whatever `KAFKA_BROKERS` says.
    pub fn start(options: &KafkaOptions, interrupt: &Interrupt) -> anyhow::Result<Self> {
        let cluster = Cluster::start(options, interrupt)?;
        Ok(Self {
            brokers: cluster.bootstrap(),
            cluster: Some(cluster),
        })
    }

    /// The bootstrap list, `host:port[,...]`.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The cluster xtask started, if it started one.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    pub fn cluster_mut(&mut self) -> Option<&mut Cluster> {
        self.cluster.as_mut()
    }

    /// The first node's process, if xtask started the cluster.
    pub fn pid(&self) -> Option<u32> {
        self.cluster
            .as_ref()
            .and_then(|c| c.pids().first().copied())
    }
}

/// One node: its fixed ports, its files, and its process while it runs.
#[derive(Debug)]
struct Node {
    id: u32,
    port: u16,
    secure_port: Option<u16>,
    config: PathBuf,
    log: PathBuf,
    server: Option<Supervised>,
}

/// A Kafka cluster xtask runs: every node stopped on drop, its scratch folder (if
/// throwaway) removed after them.
#[derive(Debug)]
pub struct Cluster {
    java: PathBuf,
    classpath: OsString,
    log4j: PathBuf,
    // Dropped in this order: the nodes stop before their scratch folder goes.
    nodes: Vec<Node>,
    _scratch: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Formats (unless the storage already holds this cluster) and starts every node,
    /// and returns once the cluster lists all of them as brokers.
    pub fn start(options: &KafkaOptions, interrupt: &Interrupt) -> anyhow::Result<Self> {
        if !matches!(options.nodes, 1..=9) {
            bail!(
                "a local Kafka cluster has 1 to 9 nodes, not {}",
                options.nodes
            );
        }
        let installation = Installation::find(interrupt)?;
        let mut scratch = None;
        let base = match &options.storage {
            Storage::Throwaway => {
                let mut builder = tempfile::Builder::new();
                builder.prefix("storefront-kafka-");
                let dir = builder
                    .tempdir_in("/dev/shm")
                    .or_else(|_| builder.tempdir())?;
                let base = dir.path().to_path_buf();
                scratch = Some(dir);
                base
            }
            Storage::Durable(dir) => dir.join(match options.nodes {
                1 => "1-node".to_owned(),
                n => format!("{n}-nodes"),
            }),
        };
        fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
        fs::create_dir_all(&options.logs)
            .with_context(|| format!("cannot create {}", options.logs.display()))?;
        let cluster_id = cluster_id(&base)?;
        let log4j = base.join("log4j2.xml");
        fs::write(&log4j, LOG4J2_CONFIG)?;

        let ids: Vec<u32> = (1..=options.nodes as u32).collect();
        let mut free = crate::free_ports(ids.len() * 3)?.into_iter();
        let mut next = || {
            free.next()
                .ok_or_else(|| std::io::Error::other("no free port"))
        };
        let ports = ids
            .iter()
            .map(|_| Ok((next()?, next()?)))
            .collect::<std::io::Result<Vec<(u16, u16)>>>()?;
        let secure_ports = ids
            .iter()
            .map(|_| options.secure.as_ref().map(|_| next()).transpose())
            .collect::<std::io::Result<Vec<Option<u16>>>>()?;
        let voters = ids
            .iter()
            .zip(&ports)
            .map(|(id, (_, controller))| format!("{id}@127.0.0.1:{controller}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for ((&id, &(port, controller_port)), &secure_port) in
            ids.iter().zip(&ports).zip(&secure_ports)
        {
            let dir = base.join(format!("node-{id}"));
            let data = dir.join("data");
            fs::create_dir_all(&data)?;
            let config = dir.join("server.properties");
            let mut properties =
                server_properties(id, port, controller_port, &voters, &data, options.nodes);
            if let (Some(keystore), Some(secure_port)) = (&options.secure, secure_port) {
                properties.push_str(&secure_listener(
                    port,
                    controller_port,
                    secure_port,
                    keystore,
                ));
            }
            fs::write(&config, properties)?;
            if !data.join("meta.properties").exists() {
                installation.format(&config, &cluster_id, &log4j, interrupt)?;
            }
            nodes.push(Node {
                id,
                port,
                secure_port,
                config,
                log: options.logs.join(format!("kafka-{id}.log")),
                server: None,
            });
        }
        let mut cluster = Self {
            java: installation.java,
            classpath: installation.classpath,
            log4j,
            nodes,
            _scratch: scratch,
        };
        for index in 0..cluster.nodes.len() {
            // A fresh log per start of the cluster; a restarted node appends to it.
            fs::File::create(&cluster.nodes[index].log)?;
            cluster.spawn(index)?;
        }
        cluster.wait_listed(interrupt)?;
        Ok(cluster)
    }

    /// `127.0.0.1:<port>` of every node, comma-separated.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `127.0.0.1:<port>` of every node's `SASL_SSL` listener, when it has one.
    pub fn secure_bootstrap(&self) -> Option<String> {
        let ports: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.secure_port)
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        (!ports.is_empty()).then(|| ports.join(","))
    }

    /// Creates (or resets the password of) a SCRAM user for `mechanism`
    /// (`SCRAM-SHA-512` or `SCRAM-SHA-256`) with Kafka's own admin tool
    /// (`kafka-configs.sh`) over the plain listener. The password goes to the tool in
    /// a file, never on its command line.
    pub fn add_scram_user(
        &self,
        user: &str,
        password: &str,
        mechanism: &str,
        interrupt: &Interrupt,
    ) -> anyhow::Result<()> {
        if user.is_empty()
            || !user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!("a SCRAM user name here is letters, digits, '-', '_' and '.', not {user:?}");
        }
        if password.contains([',', ']', '\n']) {
            bail!("a SCRAM password here cannot hold ',', ']' or a line break");
        }
        if !matches!(mechanism, "SCRAM-SHA-512" | "SCRAM-SHA-256") {
            bail!("{mechanism} is not SCRAM-SHA-512 or SCRAM-SHA-256");
        }
        // A properties file: unlike `--add-config`, its values keep no brackets.
        let mut file = tempfile::NamedTempFile::new()?;
        std::io::Write::write_all(
            &mut file,
            format!("{mechanism}=iterations=8192,password={password}\n").as_bytes(),
        )?;
        // The tool's complaints can quote the value: kept aside, and shown redacted.
        let errors = tempfile::NamedTempFile::new()?;
        let mut command = Command::new(&self.java);
        command
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log4j.display()
            ))
            .arg("-cp")
            .arg(&self.classpath)
            .arg(CONFIG_COMMAND)
            .args(["--bootstrap-server", &self.bootstrap()])
            .args(["--alter", "--entity-type", "users", "--entity-name", user])
            .arg("--add-config-file")
            .arg(file.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors.reopen()?);
        crate::procs::run("kafka-configs (SCRAM user)", &mut command, interrupt).map_err(|e| {
            let said = fs::read_to_string(errors.path())
                .unwrap_or_default()
                .replace(password, "<redacted>");
            anyhow::anyhow!("cannot create the SCRAM user {user}: {e}\n{}", said.trim())
        })?;
        self.wait_authenticates(user, password, mechanism, interrupt)
    }

    /// Waits until the SASL_SSL listener accepts `user`: a new credential reaches the
    /// brokers through the cluster's metadata, a moment after the tool returns. (The
    /// check trusts any certificate: it is xtask's own broker, whose certificate the
    /// caller made.)
    fn wait_authenticates(
        &self,
        user: &str,
        password: &str,
        mechanism: &str,
        interrupt: &Interrupt,
    ) -> anyhow::Result<()> {
        let bootstrap = self
            .secure_bootstrap()
            .context("the cluster has no SASL_SSL listener")?;
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanism", mechanism)
            .set("sasl.username", user)
            .set("sasl.password", password)
            .set("enable.ssl.certificate.verification", "false")
            .set("reconnect.backoff.max.ms", "500")
            .set("log_level", "0")
            .create()
            .context("cannot create a Kafka client to check the SCRAM user")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            interrupt.check()?;
            if client.fetch_metadata(None, Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the SASL_SSL listener at {bootstrap} did not accept {user} within 60 s");
            }
        }
    }

    /// Every node's data folder (`log.dirs`): one folder per partition, holding its
    /// log segments.
    pub fn data_dirs(&self) -> Vec<PathBuf> {
        self.nodes
            .iter()
            .filter_map(|n| n.config.parent().map(|dir| dir.join("data")))
            .collect()
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The running nodes' processes, in node order.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.server.as_ref().map(Supervised::pid))
            .collect()
    }

    /// Node `index`'s process, if it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.nodes
            .get(index)
            .and_then(|n| n.server.as_ref().map(Supervised::pid))
    }

    /// Node `index`'s log file.
    pub fn log(&self, index: usize) -> Option<&Path> {
        self.nodes.get(index).map(|n| n.log.as_path())
    }

    /// The first node that has exited since it was last started, with how; the node
    /// is then marked as stopped.
    pub fn exited(&mut self) -> Option<(usize, ExitStatus)> {
        self.nodes.iter_mut().enumerate().find_map(|(index, node)| {
            let status = node.server.as_mut()?.exited()?;
            node.server = None;
            Some((index, status))
        })
    }

    /// Kills node `index` with SIGKILL, as a crash would.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut server) = self.nodes.get_mut(index).and_then(|n| n.server.take()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(server.pid() as i32),
                Signal::SIGKILL,
            );
            server.stop();
        }
    }

    /// Starts node `index` again on its own ports and data (stopping it first if it
    /// still runs) and waits until the cluster lists it.
    pub fn restart(&mut self, index: usize, interrupt: &Interrupt) -> anyhow::Result<()> {
        if index >= self.nodes.len() {
            bail!("the cluster has no node {index}");
        }
        if let Some(mut server) = self.nodes[index].server.take() {
            server.stop();
        }
        self.spawn(index)?;
        self.wait_listed(interrupt)
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut command = Command::new(&self.java);
        command
            .args(heap_options())
            .args(JVM_OPTIONS)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log4j.display()
            ))
            .arg("-cp")
            .arg(&self.classpath)
            .arg("kafka.Kafka")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let server = Supervised::spawn(&format!("kafka node {}", node.id), &mut command)?
            // Kafka's controlled shutdown hands leadership over first; give it time.
            .stop_with(Signal::SIGTERM, Duration::from_secs(20));
        node.server = Some(server);
        Ok(())
    }

    /// Waits until the cluster's metadata lists every running node as a broker.
    fn wait_listed(&mut self, interrupt: &Interrupt) -> anyhow::Result<()> {
        let expected: Vec<i32> = self
            .nodes
            .iter()
            .filter(|n| n.server.is_some())
            .map(|n| n.id as i32)
            .collect();
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("broker.address.family", "v4")
            .set("log_level", "0")
            .create()
            .context("cannot create a Kafka client to watch the cluster start")?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            interrupt.check()?;
            for node in &mut self.nodes {
                if let Some(status) = node.server.as_mut().and_then(Supervised::exited) {
                    bail!(
                        "Kafka node {} exited ({status}) during start-up; {}",
                        node.id,
                        crate::log_tail(&node.log, 40)
                    );
                }
            }
            if let Ok(metadata) = client.fetch_metadata(None, Duration::from_secs(1)) {
                let listed: Vec<i32> = metadata.brokers().iter().map(|b| b.id()).collect();
                if expected.iter().all(|id| listed.contains(id)) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "Kafka did not list nodes {expected:?} within {}s; see {}",
                    START_TIMEOUT.as_secs(),
                    self.nodes
                        .first()
                        .map(|n| n.log.display().to_string())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops every node: all are signalled at once (a node waiting for a quorum that
    /// its peers already left would otherwise hold the shutdown), then each is waited
    /// for.
    pub fn stop(&mut self) {
        for server in self.nodes.iter().filter_map(|n| n.server.as_ref()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(server.pid() as i32),
                Signal::SIGTERM,
            );
        }
        for node in &mut self.nodes {
            if let Some(mut server) = node.server.take() {
                server.stop();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `KAFKA_HEAP_OPTS` as Kafka's own start script honours it, else a bounded heap.
fn heap_options() -> Vec<String> {
    match std::env::var("KAFKA_HEAP_OPTS") {
        Ok(opts) if !opts.trim().is_empty() => opts.split_whitespace().map(str::to_owned).collect(),
        _ => vec!["-Xms512m".into(), "-Xmx512m".into()],
    }
}

/// The JVM settings of Kafka's `kafka-run-class.sh` for a broker.
const JVM_OPTIONS: [&str; 7] = [
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
];

/// Kafka's own messages at INFO, the chattiest loggers at WARN; everything goes to
/// standard output, which xtask writes into the node's log file.
const LOG4J2_CONFIG: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by xtask for its local Kafka nodes. -->
<Configuration status="warn">
  <Appenders>
    <Console name="stdout" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="info"><AppenderRef ref="stdout"/></Root>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="warn"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="warn"/>
    <Logger name="state.change.logger" level="warn"/>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="kafka.log.LogCleaner" level="warn"/>
    <Logger name="org.apache.kafka.storage.internals.log" level="warn"/>
  </Loggers>
</Configuration>
"#;

/// One node's `server.properties`.
fn server_properties(
    id: u32,
    port: u16,
    controller_port: u16,
    voters: &str,
    data: &Path,
    nodes: usize,
) -> String {
    // With three nodes, production's durability: every write on two replicas before it
    // is acknowledged, so one node can die without losing it or stopping writes.
    let (replication, min_isr) = if nodes >= 3 { (3, 2) } else { (nodes, 1) };
    let mut text = String::new();
    let _ = write!(
        text,
        "# Written by xtask for node {id} of the local Kafka cluster; rewritten at every start.\n\
         process.roles=broker,controller\n\
         node.id={id}\n\
         controller.quorum.voters={voters}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
         log.dirs={data}\n\
         # Topics come from kafka-setup/topics.toml or a test's own admin request: a\n\
         # mistyped topic name must fail, not quietly become a new topic.\n\
         auto.create.topics.enable=false\n\
         num.partitions=1\n\
         default.replication.factor={replication}\n\
         min.insync.replicas={min_isr}\n\
         offsets.topic.replication.factor={replication}\n\
         transaction.state.log.replication.factor={replication}\n\
         transaction.state.log.min.isr={min_isr}\n\
         share.coordinator.state.topic.replication.factor={replication}\n\
         share.coordinator.state.topic.min.isr={min_isr}\n\
         # Fewer offsets partitions than production's 50: the first consumer group of a\n\
         # fresh local cluster then waits for 10 partition leaders, not 50.\n\
         offsets.topic.num.partitions=10\n\
         # A new group's first member gets its partitions at once instead of after 3 s.\n\
         group.initial.rebalance.delay.ms=0\n",
        data = data.display(),
    );
    text
}

/// Kafka's `kafka-configs.sh` tool.
const CONFIG_COMMAND: &str = "org.apache.kafka.tools.ConfigCommand";

/// The lines that add a `SASL_SSL` listener named SECURE to a node's properties
/// (later keys override the plain listener's lines above them).
fn secure_listener(port: u16, controller_port: u16, secure_port: u16, keystore: &Path) -> String {
    let scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;";
    format!(
        "# A SASL_SSL listener for clients that authenticate (SCRAM) over TLS.\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port},SECURE://127.0.0.1:{secure_port}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port},SECURE://127.0.0.1:{secure_port}\n\
         listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SECURE:SASL_SSL\n\
         listener.name.secure.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512\n\
         listener.name.secure.scram-sha-256.sasl.jaas.config={scram}\n\
         listener.name.secure.scram-sha-512.sasl.jaas.config={scram}\n\
         listener.name.secure.ssl.keystore.type=PEM\n\
         listener.name.secure.ssl.keystore.location={}\n",
        keystore.display()
    )
}

/// The cluster id stored in `base`, or a new one (Kafka's format: 16 random bytes in
/// URL-safe base64 without padding) stored there for the next start.
fn cluster_id(base: &Path) -> anyhow::Result<String> {
    use base64::Engine;
    let file = base.join("cluster.id");
    if let Ok(id) = fs::read_to_string(&file)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_owned());
    }
    let id = loop {
        let bytes: [u8; 16] = rand::random();
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        // Kafka's own generator avoids ids that start with '-' (they read as options).
        if !id.starts_with('-') {
            break id;
        }
    };
    fs::write(&file, &id)?;
    Ok(id)
}

/// A Java runtime and Kafka's jars.
#[derive(Debug)]
struct Installation {
    java: PathBuf,
    /// `<libs>/*`, which the JVM expands to every jar in the folder.
    classpath: OsString,
}

impl Installation {
    /// `KAFKA_HOME`'s jars when it is set, else the ones Maven resolved into the tools
    /// folder (resolving them first if needed).
    fn find(interrupt: &Interrupt) -> anyhow::Result<Self> {
        let libs = match std::env::var_os("KAFKA_HOME").filter(|h| !h.is_empty()) {
            Some(home) => {
                let libs = PathBuf::from(home).join("libs");
                let has_kafka = fs::read_dir(&libs)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("kafka_2."));
                if !has_kafka {
                    bail!(
                        "KAFKA_HOME is set, but {} holds no kafka_2.*.jar: point it at an \
                         unpacked Apache Kafka distribution, or unset it",
                        libs.display()
                    );
                }
                libs
            }
            None => maven_kafka(interrupt)?,
        };
        let mut classpath = libs.into_os_string();
        classpath.push("/*");
        Ok(Self {
            java: java_binary()?,
            classpath,
        })
    }

    /// Formats a node's storage for `cluster_id` (Kafka's `kafka-storage.sh format`).
    fn format(
        &self,
        config: &Path,
        cluster_id: &str,
        log4j: &Path,
        interrupt: &Interrupt,
    ) -> anyhow::Result<()> {
        let mut format = Command::new(&self.java);
        format
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(&self.classpath)
            .args(["kafka.tools.StorageTool", "format", "--ignore-formatted"])
            .args(["--cluster-id", cluster_id])
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        crate::procs::run("kafka-storage format", &mut format, interrupt)
            .with_context(|| format!("cannot format the storage of {}", config.display()))
    }
}

/// `$JAVA_HOME/bin/java`, else `java` on the PATH (as root on Debian, installed with
/// apt when missing).
pub(crate) fn java_binary() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("JAVA_HOME").filter(|h| !h.is_empty()) {
        let java = PathBuf::from(home).join("bin").join("java");
        if java.is_file() {
            return Ok(java);
        }
    }
    crate::tools::debian_tool("java", "default-jre-headless")
}

/// The folder of Kafka's jars, resolved from Maven Central on first use into the tools
/// folder (Maven's own repository there too), so later runs and clones reuse them.
fn maven_kafka(interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    let tools = crate::tools::tools_dir();
    // "-2": the jars since the admin tools (kafka-tools) joined the broker's.
    let root = tools.join(format!("kafka-{KAFKA_VERSION}-2"));
    let libs = root.join("libs");
    crate::tools::install_once_with(
        &root,
        &libs,
        &format!(
            "resolving Apache Kafka {KAFKA_VERSION} (Maven Central) into {}; later runs reuse it",
            root.display()
        ),
        || {
            // Copied aside first and renamed at the end, so an interrupted copy never
            // looks like a finished one.
            let partial = root.join("libs.partial");
            let _ = fs::remove_dir_all(&partial);
            crate::tools::maven_copy_dependencies(
                "kafka",
                &partial,
                &["-DincludeScope=runtime"],
                interrupt,
            )?;
            fs::rename(&partial, &libs)?;
            Ok(())
        },
    )?;
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_nodes_get_production_replication_and_one_node_gets_none() {
        let three = server_properties(2, 9092, 9093, "1@a,2@b,3@c", Path::new("/d"), 3);
        for line in [
            "node.id=2",
            "controller.quorum.voters=1@a,2@b,3@c",
            "default.replication.factor=3",
            "min.insync.replicas=2",
            "offsets.topic.replication.factor=3",
            "transaction.state.log.min.isr=2",
            "auto.create.topics.enable=false",
        ] {
            assert!(three.lines().any(|l| l == line), "{line} missing:\n{three}");
        }
        let one = server_properties(1, 9092, 9093, "1@a", Path::new("/d"), 1);
        assert!(
            one.lines()
                .any(|l| l == "offsets.topic.replication.factor=1")
        );
        assert!(one.lines().any(|l| l == "min.insync.replicas=1"));
    }

    #[test]
    fn a_cluster_id_is_kept_for_the_next_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = cluster_id(dir.path()).expect("new id");
        assert_eq!(first.len(), 22, "16 bytes in unpadded base64: {first}");
        assert_eq!(cluster_id(dir.path()).expect("kept id"), first);
    }

    #[test]
    fn the_maven_project_names_the_pinned_version() {
        let pom = fs::read_to_string(
            crate::workspace_root()
                .join("xtask")
                .join("maven")
                .join("kafka")
                .join("pom.xml"),
        )
        .expect("pom.xml");
        assert!(
            pom.contains(&format!("<kafka.version>{KAFKA_VERSION}</kafka.version>")),
            "xtask/maven/kafka/pom.xml and KAFKA_VERSION disagree"
        );
    }
}
