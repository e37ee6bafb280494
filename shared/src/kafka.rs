//! Kafka client settings, typed. This module is the one place where they become
//! librdkafka's string keys, so a setting is spelled, defaulted and documented once.
//!
//! Producers are idempotent with `acks=all` by default: the outbox relays resend after
//! a failure, and idempotence keeps a resend from writing the event twice into the
//! partition. Consumers never auto-commit: a service commits an offset only after the
//! database transaction that applied the event has committed.

use std::time::Duration;

use rdkafka::ClientConfig;
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
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
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
        config
    }

    /// A producer's configuration.
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
        config
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
        config
    }

    /// An admin client's configuration.
    pub fn admin_config(&self) -> ClientConfig {
        self.common_config()
    }
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
}
