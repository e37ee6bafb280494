//! Kafka client settings, typed. This module is the one place where they become
//! librdkafka's string keys, so a setting is spelled, defaulted and documented once.
//!
//! Producers are idempotent with `acks=all` by default: the outbox relays resend after
//! a failure, and idempotence keeps a resend from writing the event twice into the
//! partition. Consumers never auto-commit: a service commits an offset only after the
//! database transaction that applied the event has committed.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, ClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseProducer, Producer, ProducerContext},
};
use serde::{Deserialize, Serialize};

/// How the client talks to the brokers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }
}

/// SASL credentials. The password never appears in `Debug` output or logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaslSettings {
    /// `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`.
    pub mechanism: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for SaslSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslSettings")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// TLS towards the brokers (with `SSL` or `SASL_SSL`). Unset fields keep librdkafka's
/// defaults: the system's CA store, no client certificate, and the broker's host name
/// checked against its certificate.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SslSettings {
    /// PEM file of the CAs that signed the brokers' certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM file of this client's certificate, for brokers that require client
    /// authentication (`ssl.client.auth=required`).
    pub certificate_file: Option<PathBuf>,
    /// PEM file of that certificate's private key.
    pub key_file: Option<PathBuf>,
    /// The key file's password, when the key is encrypted. Never printed.
    pub key_password: Option<String>,
    /// Check that the broker's certificate names the host the client dialled. Turning
    /// it off accepts any certificate the CA signed, for any host.
    pub verify_hostname: bool,
}

impl Default for SslSettings {
    fn default() -> Self {
        Self {
            ca_file: None,
            certificate_file: None,
            key_file: None,
            key_password: None,
            verify_hostname: true,
        }
    }
}

impl std::fmt::Debug for SslSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SslSettings")
            .field("ca_file", &self.ca_file)
            .field("certificate_file", &self.certificate_file)
            .field("key_file", &self.key_file)
            .field(
                "key_password",
                &self.key_password.as_ref().map(|_| "<redacted>"),
            )
            .field("verify_hostname", &self.verify_hostname)
            .finish()
    }
}

/// librdkafka keys passed through as they are, after (and over) the typed settings.
/// Values of keys that hold secrets are redacted in `Debug` output.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExtraKeys(pub BTreeMap<String, String>);

impl ExtraKeys {
    fn is_secret(key: &str) -> bool {
        [
            "password",
            "passphrase",
            "secret",
            "jaas",
            ".pem",
            "token",
            "oauthbearer.config",
        ]
        .iter()
        .any(|word| key.contains(word))
    }
}

impl std::fmt::Debug for ExtraKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(key, value)| {
                let shown = if Self::is_secret(key) {
                    "<redacted>"
                } else {
                    value
                };
                (key, shown)
            }))
            .finish()
    }
}

/// Which acknowledgement a producer waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Acks {
    /// Every in-sync replica has the record: the only setting that loses nothing.
    #[default]
    All,
    Leader,
    None,
}

/// Producer tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSettings {
    pub acks: Acks,
    pub idempotence: bool,
    /// How long a batch may wait for more records: throughput against latency.
    pub linger_ms: u64,
    /// Bound on a record's time in the producer, including retries.
    pub delivery_timeout_ms: u64,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        Self {
            acks: Acks::All,
            idempotence: true,
            linger_ms: 5,
            delivery_timeout_ms: 30_000,
            compression: "lz4".into(),
        }
    }
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

/// Consumer tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerSettings {
    pub auto_offset_reset: OffsetReset,
    /// How long the group coordinator waits for a member's heartbeat before it
    /// declares the member dead and moves its partitions to the others.
    pub session_timeout_ms: u64,
    /// How often a member heartbeats. A member learns of a rebalance (another member
    /// died or joined) only at its next heartbeat, so this adds to every hand-over;
    /// a tenth of the session timeout keeps that short (Kafka asks for at most a
    /// third).
    pub heartbeat_interval_ms: u64,
    pub max_poll_interval_ms: u64,
    /// The longest the broker holds a fetch that found no data. Kafka answers a
    /// waiting fetch as soon as a record arrives (`fetch.min.bytes` = 1), so this only
    /// bounds how often an idle consumer asks again: librdkafka's default.
    pub fetch_wait_max_ms: u64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            auto_offset_reset: OffsetReset::Earliest,
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            max_poll_interval_ms: 300_000,
            fetch_wait_max_ms: 500,
        }
    }
}

/// The `kafka` section of a service's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` bootstrap list.
    pub brokers: String,
    /// Names this process in broker logs and quotas.
    pub client_id: String,
    pub security_protocol: SecurityProtocol,
    pub sasl: Option<SaslSettings>,
    pub ssl: SslSettings,
    /// Any other librdkafka key (`socket.keepalive.enable`, `client.rack`, ...): set
    /// last, so it also overrides a key the typed settings set.
    pub extra: ExtraKeys,
    /// Bound on one admin or metadata request.
    pub request_timeout_ms: u64,
    pub producer: ProducerSettings,
    pub consumer: ConsumerSettings,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            client_id: "storefront".into(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl: None,
            ssl: SslSettings::default(),
            extra: ExtraKeys::default(),
            request_timeout_ms: 10_000,
            producer: ProducerSettings::default(),
            consumer: ConsumerSettings::default(),
        }
    }
}

impl KafkaSettings {
    /// Settings for brokers at `brokers`, everything else default.
    pub fn for_brokers(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Keys every client shares: where the brokers are and how to reach them.
    pub fn common_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set("security.protocol", self.security_protocol.as_librdkafka())
            .set("socket.timeout.ms", self.request_timeout_ms.to_string())
            // Resolve `localhost` to IPv4 first: brokers here listen on 127.0.0.1.
            .set("broker.address.family", "v4");
        if let Some(sasl) = &self.sasl {
            config
                .set("sasl.mechanism", &sasl.mechanism)
                .set("sasl.username", &sasl.username)
                .set("sasl.password", &sasl.password);
        }
        if matches!(
            self.security_protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        ) {
            let ssl = &self.ssl;
            let path = |p: &PathBuf| p.to_string_lossy().into_owned();
            // Without a CA file, the system's store: librdkafka's OpenSSL is built in,
            // and left alone it would look in its own build's folder, not Debian's.
            config.set(
                "ssl.ca.location",
                ssl.ca_file
                    .as_ref()
                    .map_or_else(|| "probe".to_owned(), path),
            );
            if let Some(certificate) = &ssl.certificate_file {
                config.set("ssl.certificate.location", path(certificate));
            }
            if let Some(key) = &ssl.key_file {
                config.set("ssl.key.location", path(key));
            }
            if let Some(password) = &ssl.key_password {
                config.set("ssl.key.password", password);
            }
            config.set(
                "ssl.endpoint.identification.algorithm",
                if ssl.verify_hostname { "https" } else { "none" },
            );
        }
        config
    }

    /// Sets the `extra` keys over a finished configuration.
    fn with_extra(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.extra.0 {
            config.set(key, value);
        }
        config
    }

    /// Refuses settings this build cannot honour, naming the setting: an unknown or
    /// uncompiled compression, protocol or SASL mechanism, a TLS file that cannot be
    /// read, SASL credentials without a SASL protocol (or the reverse), an extra key
    /// librdkafka does not know. Run before any client is made, so a mistake stops
    /// the process at start-up instead of surfacing later as a delivery timeout.
    pub fn check(&self) -> Result<(), String> {
        let features = builtin_features();
        let has = |feature: &str| features.iter().any(|f| f == feature);
        let compression = self.producer.compression.as_str();
        match compression {
            "none" => {}
            "gzip" | "snappy" | "lz4" | "zstd" if has(compression) => {}
            "gzip" | "snappy" | "lz4" | "zstd" => {
                return Err(format!(
                    "kafka.producer.compression: {compression} is not compiled into this \
                     build's librdkafka (it has: {})",
                    features.join(", ")
                ));
            }
            other => {
                return Err(format!(
                    "kafka.producer.compression: `{other}` is not one of none, gzip, snappy, \
                     lz4, zstd"
                ));
            }
        }
        let secure = matches!(
            self.security_protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        );
        if secure && !has("ssl") {
            return Err(format!(
                "kafka.security_protocol: {:?} needs TLS, which this build's librdkafka \
                 lacks",
                self.security_protocol
            ));
        }
        let wants_sasl = matches!(
            self.security_protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        match (&self.sasl, wants_sasl) {
            (None, true) => {
                return Err(format!(
                    "kafka.sasl: {} needs a mechanism, a username and a password",
                    self.security_protocol.as_librdkafka().to_uppercase()
                ));
            }
            (Some(_), false) => {
                return Err(format!(
                    "kafka.sasl is set, but kafka.security_protocol is {}: use SASL_SSL \
                     (or SASL_PLAINTEXT) for the credentials to be used",
                    self.security_protocol.as_librdkafka().to_uppercase()
                ));
            }
            (Some(sasl), true) => {
                let feature = match sasl.mechanism.as_str() {
                    "PLAIN" => "sasl_plain",
                    "SCRAM-SHA-256" | "SCRAM-SHA-512" => "sasl_scram",
                    "GSSAPI" | "OAUTHBEARER" => {
                        return Err(format!(
                            "kafka.sasl.mechanism: {} is not supported by this build; use \
                             SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
                            sasl.mechanism
                        ));
                    }
                    other => {
                        return Err(format!(
                            "kafka.sasl.mechanism: `{other}` is not one of SCRAM-SHA-512, \
                             SCRAM-SHA-256, PLAIN"
                        ));
                    }
                };
                if !has(feature) {
                    return Err(format!(
                        "kafka.sasl.mechanism: {} is not compiled into this build's \
                         librdkafka (it has: {})",
                        sasl.mechanism,
                        features.join(", ")
                    ));
                }
                if sasl.username.is_empty() || sasl.password.is_empty() {
                    return Err("kafka.sasl: the username and the password must both be set".into());
                }
            }
            (None, false) => {}
        }
        if secure {
            let ssl = &self.ssl;
            for (name, file) in [
                ("kafka.ssl.ca_file", &ssl.ca_file),
                ("kafka.ssl.certificate_file", &ssl.certificate_file),
                ("kafka.ssl.key_file", &ssl.key_file),
            ] {
                if let Some(file) = file
                    && let Err(e) = std::fs::File::open(file)
                {
                    return Err(format!("{name}: {} cannot be read: {e}", file.display()));
                }
            }
            if ssl.certificate_file.is_some() != ssl.key_file.is_some() {
                return Err(
                    "kafka.ssl: a client certificate needs its key, and a key its certificate: \
                     set both certificate_file and key_file, or neither"
                        .into(),
                );
            }
        }
        // librdkafka itself checks every key and value it will be given.
        for config in [self.producer_config(), self.consumer_config("check")] {
            if let Err(e) = config.create_native_config() {
                // Named by key and reason only: the value may be a secret.
                return Err(match &e {
                    KafkaError::ClientConfig(_, description, key, value) => {
                        let description = if ExtraKeys::is_secret(key) && !value.is_empty() {
                            description.replace(value.as_str(), "<redacted>")
                        } else {
                            description.clone()
                        };
                        let setting = if self.extra.0.contains_key(key) {
                            "kafka.extra"
                        } else {
                            "kafka"
                        };
                        format!("{setting}: librdkafka refuses `{key}`: {description}")
                    }
                    other => format!("kafka: librdkafka refuses the settings: {other}"),
                });
            }
        }
        Ok(())
    }

    /// Connects to the brokers once, as the service's clients will, and waits for
    /// the cluster's metadata. Refused credentials and failed TLS handshakes are
    /// returned at once as [`ConnectError::Refused`]: retrying cannot mend them, and
    /// without this check they would only show as deliveries timing out.
    pub async fn verify_connection(&self) -> Result<(), ConnectError> {
        let settings = self.clone();
        tokio::task::spawn_blocking(move || settings.verify_connection_blocking())
            .await
            .unwrap_or_else(|e| Err(ConnectError::Unreachable(e.to_string())))
    }

    fn verify_connection_blocking(&self) -> Result<(), ConnectError> {
        let watch = ConnectionWatch::default();
        let refused = watch.refused.clone();
        let client: BaseProducer<ConnectionWatch> = self
            .with_extra(self.common_config())
            .create_with_context(watch)
            .map_err(|e| ConnectError::Refused(format!("cannot create a Kafka client: {e}")))?;
        let deadline = Instant::now() + self.request_timeout();
        loop {
            let attempt = client
                .client()
                .fetch_metadata(None, Duration::from_millis(500));
            // Serves the client's events: the error callback runs here.
            client.poll(Duration::ZERO);
            if let Some(reason) = refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(ConnectError::Refused(reason));
            }
            match attempt {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(ConnectError::Unreachable(format!(
                        "no metadata from {} within {} ms: {e}",
                        self.brokers, self.request_timeout_ms
                    )));
                }
                Err(_) => {}
            }
        }
    }

    /// A producer's configuration (with the `extra` keys).
    pub fn producer_config(&self) -> ClientConfig {
        let p = &self.producer;
        let mut config = self.common_config();
        config
            .set(
                "acks",
                match p.acks {
                    Acks::All => "all",
                    Acks::Leader => "1",
                    Acks::None => "0",
                },
            )
            .set("enable.idempotence", p.idempotence.to_string())
            .set("linger.ms", p.linger_ms.to_string())
            .set("delivery.timeout.ms", p.delivery_timeout_ms.to_string())
            .set("compression.type", &p.compression);
        self.with_extra(config)
    }

    /// A consumer's configuration for `group_id`, with automatic commits off: the
    /// caller commits after its own transaction.
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let c = &self.consumer;
        let mut config = self.common_config();
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match c.auto_offset_reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            )
            .set("session.timeout.ms", c.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", c.heartbeat_interval_ms.to_string())
            .set("max.poll.interval.ms", c.max_poll_interval_ms.to_string())
            .set("fetch.wait.max.ms", c.fetch_wait_max_ms.to_string());
        self.with_extra(config)
    }

    /// An admin client's configuration.
    pub fn admin_config(&self) -> ClientConfig {
        self.with_extra(self.common_config())
    }
}

/// Why [`KafkaSettings::verify_connection`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The brokers answered and refused: wrong credentials, an untrusted or
    /// mismatched certificate. Nothing will change by waiting.
    #[error("the Kafka brokers refused this client: {0}")]
    Refused(String),
    /// No answer in time: the brokers may be down or starting.
    #[error("the Kafka brokers did not answer: {0}")]
    Unreachable(String),
}

/// The features librdkafka was built with (`gzip`, `ssl`, `sasl_scram`, `zstd`, ...).
pub fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map(|list| list.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A client context that keeps the first error retrying cannot mend.
#[derive(Default)]
struct ConnectionWatch {
    refused: Arc<Mutex<Option<String>>>,
}

impl ClientContext for ConnectionWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        );
        if fatal {
            let mut slot = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| reason.to_owned());
        }
    }

    // librdkafka's own lines about the same failure would repeat the error above.
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _message: &str) {}
}

impl ProducerContext for ConnectionWatch {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producers_default_to_idempotent_acks_all() {
        let c = KafkaSettings::for_brokers("b:9092").producer_config();
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn consumers_never_auto_commit() {
        let c = KafkaSettings::default().consumer_config("g");
        assert_eq!(c.get("group.id"), Some("g"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
    }

    #[test]
    fn sasl_password_is_redacted_in_debug() {
        let s = SaslSettings {
            mechanism: "PLAIN".into(),
            username: "svc".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{s:?}").contains("s3cret"));
        let settings = KafkaSettings {
            sasl: Some(s),
            ..KafkaSettings::default()
        };
        assert_eq!(
            settings.common_config().get("sasl.password"),
            Some("s3cret")
        );
    }

    fn scram(mechanism: &str) -> KafkaSettings {
        KafkaSettings {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl: Some(SaslSettings {
                mechanism: mechanism.into(),
                username: "svc".into(),
                password: "s3cret".into(),
            }),
            ..KafkaSettings::default()
        }
    }

    #[test]
    fn this_build_has_tls_scram_and_zstd() {
        let features = builtin_features();
        for needed in ["ssl", "sasl_scram", "zstd", "lz4"] {
            assert!(
                features.iter().any(|f| f == needed),
                "{needed} in {features:?}"
            );
        }
        let mut settings = scram("SCRAM-SHA-512");
        settings.producer.compression = "zstd".into();
        settings
            .check()
            .expect("SASL_SSL with SCRAM and zstd is accepted");
        assert_eq!(
            settings.producer_config().get("compression.type"),
            Some("zstd")
        );
        assert_eq!(
            settings
                .common_config()
                .get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
    }

    #[test]
    fn settings_this_build_cannot_honour_are_refused_by_name() {
        let said = scram("GSSAPI").check().unwrap_err();
        assert!(said.starts_with("kafka.sasl.mechanism: GSSAPI"), "{said}");
        let said = scram("SCRAM-SHA-1").check().unwrap_err();
        assert!(said.contains("`SCRAM-SHA-1` is not one of"), "{said}");

        let mut brotli = KafkaSettings::default();
        brotli.producer.compression = "brotli".into();
        let said = brotli.check().unwrap_err();
        assert!(said.starts_with("kafka.producer.compression"), "{said}");

        let mut no_protocol = scram("SCRAM-SHA-512");
        no_protocol.security_protocol = SecurityProtocol::Plaintext;
        assert!(
            no_protocol
                .check()
                .unwrap_err()
                .starts_with("kafka.sasl is set")
        );
        let mut no_credentials = scram("SCRAM-SHA-512");
        no_credentials.sasl = None;
        assert!(
            no_credentials
                .check()
                .unwrap_err()
                .starts_with("kafka.sasl:")
        );

        let mut missing_ca = scram("SCRAM-SHA-512");
        missing_ca.ssl.ca_file = Some("/nonexistent/kafka-ca.pem".into());
        let said = missing_ca.check().unwrap_err();
        assert!(
            said.starts_with("kafka.ssl.ca_file: /nonexistent/kafka-ca.pem"),
            "{said}"
        );

        let mut unknown = KafkaSettings::default();
        unknown
            .extra
            .0
            .insert("socket.keepalive.enabel".into(), "true".into());
        let said = unknown.check().unwrap_err();
        assert!(
            said.starts_with("kafka.extra:") && said.contains("socket.keepalive.enabel"),
            "{said}"
        );
    }

    #[test]
    fn extra_keys_are_passed_through_and_secrets_stay_out_of_debug() {
        let mut settings = KafkaSettings::default();
        settings
            .extra
            .0
            .insert("socket.keepalive.enable".into(), "true".into());
        settings
            .extra
            .0
            .insert("ssl.keystore.password".into(), "hunter2".into());
        settings.ssl.key_password = Some("k3y".into());
        assert_eq!(
            settings.producer_config().get("socket.keepalive.enable"),
            Some("true")
        );
        assert_eq!(
            settings.consumer_config("g").get("socket.keepalive.enable"),
            Some("true")
        );
        let shown = format!("{settings:?}");
        assert!(shown.contains("socket.keepalive.enable"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("k3y"),
            "{shown}"
        );
    }
}
