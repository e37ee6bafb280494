//! `kafka-setup`: applies the topic definitions to a cluster.
//!
//! Exit status: 0 when the cluster matches (after creating what was missing), 1 when
//! an existing topic differs or, with `--check`, anything is missing, 2 on any error
//! (unreachable broker, bad definitions).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use kafka_setup::{Mode, TopicFile};
use shared::kafka::KafkaSettings;

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
    let mode = if args.check { Mode::Check } else { Mode::Apply };
    let report = kafka_setup::apply(&settings, &file, mode).await?;
    print!("{report}");
    Ok(report.matches())
}
