//! `kafka-setup`: applies the topic definitions to a cluster.
//!
//! Exit status: 0 when the cluster matches (after creating what was missing), 1 when
//! an existing topic differs or, with `--check`, anything is missing, 2 on any error
//! (unreachable broker, bad definitions).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use kafka_setup::{Mode, TopicFile};
use shared::kafka::{KafkaSettings, SaslSettings, SecurityProtocol};

#[derive(Debug, Parser)]
#[command(about = "Create the store's Kafka topics, or check them with --check")]
struct Args {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// A topic file instead of the built-in topics.toml.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Only compare; create nothing; exit 1 on any difference or missing topic.
    #[arg(long)]
    check: bool,
    /// Replication factor for every topic (production: 3).
    #[arg(long)]
    replication_factor: Option<i32>,
    /// `min.insync.replicas` for every topic (production: 2).
    #[arg(long)]
    min_insync_replicas: Option<i32>,
    /// Bound on each broker request, in seconds.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", default_value = "PLAINTEXT")]
    security_protocol: String,
    /// PEM file of the CAs that signed the brokers' certificates.
    #[arg(long, env = "KAFKA_SSL_CA_FILE")]
    ssl_ca_file: Option<PathBuf>,
    /// `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`; the password is read from
    /// `KAFKA_SASL_PASSWORD` only, so that it never shows in a process list.
    #[arg(long, env = "KAFKA_SASL_MECHANISM")]
    sasl_mechanism: Option<String>,
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    sasl_username: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kafka-setup: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let file = match &args.file {
        Some(path) => TopicFile::load(path)?,
        None => TopicFile::builtin()?,
    }
    .with_replication(args.replication_factor, args.min_insync_replicas);
    let mut settings = KafkaSettings::for_brokers(&args.brokers);
    settings.client_id = "kafka-setup".into();
    settings.request_timeout_ms = args.timeout_secs.saturating_mul(1000);
    settings.security_protocol = match args.security_protocol.to_uppercase().as_str() {
        "PLAINTEXT" => SecurityProtocol::Plaintext,
        "SSL" => SecurityProtocol::Ssl,
        "SASL_PLAINTEXT" => SecurityProtocol::SaslPlaintext,
        "SASL_SSL" => SecurityProtocol::SaslSsl,
        other => anyhow::bail!(
            "--security-protocol: `{other}` is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
        ),
    };
    settings.ssl.ca_file = args.ssl_ca_file;
    if let Some(mechanism) = args.sasl_mechanism {
        settings.sasl = Some(SaslSettings {
            mechanism,
            username: args.sasl_username.unwrap_or_default(),
            password: std::env::var("KAFKA_SASL_PASSWORD").unwrap_or_default(),
        });
    }
    settings.check().map_err(anyhow::Error::msg)?;
    // Refused credentials or certificates end the run at once, with the broker's
    // reason, instead of after every admin request has timed out.
    if let Err(refused @ shared::kafka::ConnectError::Refused(_)) =
        settings.verify_connection().await
    {
        return Err(refused.into());
    }
    let mode = if args.check { Mode::Check } else { Mode::Apply };
    let report = kafka_setup::apply(&settings, &file, mode).await?;
    print!("{report}");
    Ok(report.matches())
}
