//! The store's Kafka topics and the idempotent tool that applies them.
//!
//! `topics.toml` beside this crate's manifest is the one definition of every topic:
//! partitions, replication factor and topic configs. [`apply`] compares it with what
//! the cluster has, creates what is missing, and reports every difference in existing
//! topics; it never alters or deletes an existing topic, because shrinking partitions
//! or changing retention on a live topic is an operator's decision, not a deploy step.

use std::{collections::BTreeMap, fmt, path::Path, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    client::DefaultClientContext,
    error::KafkaError,
};
use serde::Deserialize;
use shared::kafka::KafkaSettings;

/// The built-in topic file, compiled in so the binary needs nothing beside it.
pub const BUILTIN_TOPICS: &str = include_str!("../topics.toml");

/// `name` tagged as [`TopicFile::tagged`] does it.
pub fn tagged_name(name: &str, tag: &str) -> String {
    match name.strip_suffix(".DLT") {
        Some(base) => format!("{base}-{tag}.DLT"),
        None => format!("{name}-{tag}"),
    }
}

/// One topic as it should be.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// A whole topic file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicFile {
    #[serde(rename = "topic")]
    pub topics: Vec<TopicSpec>,
}

impl TopicFile {
    /// Parses and validates a topic file's text.
    pub fn parse(text: &str) -> Result<Self, SetupError> {
        let file: TopicFile =
            toml::from_str(text).map_err(|e| SetupError::Definition(e.to_string()))?;
        for t in &file.topics {
            if t.name.is_empty() || t.partitions < 1 || t.replication_factor < 1 {
                return Err(SetupError::Definition(format!(
                    "topic `{}`: name must be set and partitions and replication_factor at least 1",
                    t.name
                )));
            }
        }
        Ok(file)
    }

    /// The compiled-in `topics.toml`.
    pub fn builtin() -> Result<Self, SetupError> {
        Self::parse(BUILTIN_TOPICS)
    }

    pub fn load(path: &Path) -> Result<Self, SetupError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SetupError::Definition(format!("{}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// The same topics under names tagged with `tag` (`order-topic` becomes
    /// `order-topic-<tag>`, its dead letters `order-topic-<tag>.DLT`), configured
    /// exactly alike. Tests use it to get topics of their own on a shared broker.
    pub fn tagged(mut self, tag: &str) -> Self {
        for t in &mut self.topics {
            t.name = tagged_name(&t.name, tag);
        }
        self
    }

    /// Production overrides: a replication factor and `min.insync.replicas` for every topic.
    pub fn with_replication(
        mut self,
        replication_factor: Option<i32>,
        min_isr: Option<i32>,
    ) -> Self {
        for t in &mut self.topics {
            if let Some(rf) = replication_factor {
                t.replication_factor = rf;
            }
            if let Some(isr) = min_isr {
                t.config
                    .insert("min.insync.replicas".into(), isr.to_string());
            }
        }
        self
    }
}

/// How an existing topic differs from its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    Partitions {
        want: i32,
        have: i32,
    },
    ReplicationFactor {
        want: i32,
        have: i32,
    },
    Config {
        key: String,
        want: String,
        have: Option<String>,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Partitions { want, have } => write!(f, "partitions: want {want}, have {have}"),
            Drift::ReplicationFactor { want, have } => {
                write!(f, "replication factor: want {want}, have {have}")
            }
            Drift::Config { key, want, have } => match have {
                Some(have) => write!(f, "{key}: want {want}, have {have}"),
                None => write!(f, "{key}: want {want}, not set"),
            },
        }
    }
}

/// What one topic looked like, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// Missing, and left missing because this was a check.
    Missing,
    Unchanged,
    Drifted(Vec<Drift>),
}

/// The result of a run, one line per topic in definition order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub topics: Vec<(String, Outcome)>,
}

impl Report {
    /// True when the cluster now matches the definitions exactly.
    pub fn matches(&self) -> bool {
        self.topics
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Created | Outcome::Unchanged))
    }

    pub fn outcome(&self, topic: &str) -> Option<&Outcome> {
        self.topics.iter().find(|(n, _)| n == topic).map(|(_, o)| o)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, outcome) in &self.topics {
            match outcome {
                Outcome::Created => writeln!(f, "created   {name}")?,
                Outcome::Missing => writeln!(f, "missing   {name}")?,
                Outcome::Unchanged => writeln!(f, "ok        {name}")?,
                Outcome::Drifted(drifts) => {
                    writeln!(f, "DIFFERS   {name}")?;
                    for d in drifts {
                        writeln!(f, "          {d}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("invalid topic definitions: {0}")]
    Definition(String),
    #[error("cannot reach the Kafka broker at {brokers} within {}s: {cause}", .timeout.as_secs())]
    Unreachable {
        brokers: String,
        timeout: Duration,
        cause: String,
    },
    #[error("Kafka admin request failed: {0}")]
    Admin(String),
}

/// Whether to create missing topics or only look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    Check,
}

/// Compares `file` with the cluster at `settings.brokers`; in [`Mode::Apply`] creates
/// what is missing. Every broker request is bounded by `settings.request_timeout()`.
pub async fn apply(
    settings: &KafkaSettings,
    file: &TopicFile,
    mode: Mode,
) -> Result<Report, SetupError> {
    let timeout = settings.request_timeout();
    let admin: AdminClient<DefaultClientContext> = settings
        .admin_config()
        .create()
        .map_err(|e| SetupError::Admin(e.to_string()))?;
    let admin = std::sync::Arc::new(admin);

    let existing = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(
            move || -> Result<BTreeMap<String, (i32, i32)>, KafkaError> {
                let metadata = admin.inner().fetch_metadata(None, timeout)?;
                Ok(metadata
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none())
                    .map(|t| {
                        let partitions = t.partitions().len() as i32;
                        let replicas = t
                            .partitions()
                            .first()
                            .map(|p| p.replicas().len() as i32)
                            .unwrap_or(0);
                        (t.name().to_owned(), (partitions, replicas))
                    })
                    .collect())
            },
        )
        .await
        .map_err(|e| SetupError::Admin(e.to_string()))?
        .map_err(|e| SetupError::Unreachable {
            brokers: settings.brokers.clone(),
            timeout,
            cause: e.to_string(),
        })?
    };

    let options = AdminOptions::new().request_timeout(Some(timeout));
    let mut report = Report::default();
    let mut to_create = Vec::new();
    for spec in &file.topics {
        let Some(&(partitions, replicas)) = existing.get(&spec.name) else {
            to_create.push(spec);
            continue;
        };
        let mut drifts = Vec::new();
        if partitions != spec.partitions {
            drifts.push(Drift::Partitions {
                want: spec.partitions,
                have: partitions,
            });
        }
        if replicas != spec.replication_factor {
            drifts.push(Drift::ReplicationFactor {
                want: spec.replication_factor,
                have: replicas,
            });
        }
        let actual = describe(&admin, &spec.name, &options).await?;
        for (key, want) in &spec.config {
            let have = actual.get(key).cloned();
            if have.as_deref() != Some(want.as_str()) {
                drifts.push(Drift::Config {
                    key: key.clone(),
                    want: want.clone(),
                    have,
                });
            }
        }
        let outcome = if drifts.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Drifted(drifts)
        };
        report.topics.push((spec.name.clone(), outcome));
    }

    if mode == Mode::Check {
        report
            .topics
            .extend(to_create.iter().map(|s| (s.name.clone(), Outcome::Missing)));
    } else if !to_create.is_empty() {
        let new_topics: Vec<NewTopic<'_>> = to_create
            .iter()
            .map(|spec| {
                spec.config.iter().fold(
                    NewTopic::new(
                        &spec.name,
                        spec.partitions,
                        TopicReplication::Fixed(spec.replication_factor),
                    ),
                    |topic, (k, v)| topic.set(k, v),
                )
            })
            .collect();
        let results = admin
            .create_topics(new_topics.iter(), &options)
            .await
            .map_err(|e| SetupError::Admin(e.to_string()))?;
        for result in results {
            match result {
                Ok(name) => report.topics.push((name, Outcome::Created)),
                // Another run created it between our look and our create: not a failure.
                Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                    report.topics.push((name, Outcome::Unchanged));
                }
                Err((name, code)) => {
                    return Err(SetupError::Admin(format!("creating {name}: {code}")));
                }
            }
        }
    }

    // Report in the order of the definitions, whatever order the broker answered in.
    let order: Vec<&str> = file.topics.iter().map(|t| t.name.as_str()).collect();
    report
        .topics
        .sort_by_key(|(name, _)| order.iter().position(|n| n == name).unwrap_or(usize::MAX));
    Ok(report)
}

async fn describe(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    options: &AdminOptions,
) -> Result<BTreeMap<String, String>, SetupError> {
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], options)
        .await
        .map_err(|e| SetupError::Admin(format!("describing {topic}: {e}")))?;
    let mut configs = BTreeMap::new();
    for result in results {
        let resource =
            result.map_err(|code| SetupError::Admin(format!("describing {topic}: {code}")))?;
        for entry in resource.entries {
            if let Some(value) = entry.value {
                configs.insert(entry.name, value);
            }
        }
    }
    Ok(configs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_file_defines_the_contract_topics() {
        let file = TopicFile::parse(BUILTIN_TOPICS).expect("topics.toml parses");
        let names: Vec<_> = file.topics.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"order-topic"));
        assert!(names.contains(&"payment-result-topic"));
        for t in &file.topics {
            for key in ["cleanup.policy", "retention.ms", "min.insync.replicas"] {
                assert!(t.config.contains_key(key), "{} lacks {key}", t.name);
            }
        }
    }

    #[test]
    fn tagged_topics_keep_their_dead_letter_suffix_and_config() {
        let plain = TopicFile::builtin().expect("parses");
        let tagged = plain.clone().tagged("t1");
        let names: Vec<_> = tagged.topics.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"order-topic-t1"));
        assert!(names.contains(&"order-topic-t1.DLT"));
        for (a, b) in plain.topics.iter().zip(&tagged.topics) {
            assert_eq!(a.config, b.config);
            assert_eq!(a.partitions, b.partitions);
        }
    }

    #[test]
    fn production_overrides_apply_to_every_topic() {
        let file = TopicFile::builtin()
            .expect("parses")
            .with_replication(Some(3), Some(2));
        for t in &file.topics {
            assert_eq!(t.replication_factor, 3);
            assert_eq!(t.config["min.insync.replicas"], "2");
        }
    }

    #[test]
    fn nonsense_definitions_are_refused() {
        let err =
            TopicFile::parse("[[topic]]\nname = \"x\"\npartitions = 0\nreplication_factor = 1\n")
                .unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
    }
}
