//! `cargo xtask <command>`: argument parsing only; the work is in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "The store's local stack and test runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start PostgreSQL, the broker, the topics and every service; Ctrl-C stops all.
    Up {
        /// Keep the database's and the broker's data under target/stack/durable.
        #[arg(long)]
        durable: bool,
        /// The gateway's port (0: any free port).
        #[arg(long, default_value_t = 8080)]
        gateway_port: u16,
        /// The registry's port (0: any free port).
        #[arg(long, default_value_t = 8761)]
        registry_port: u16,
        /// Write the env file here instead of target/stack.env (tests use this).
        #[arg(long, hide = true)]
        env_file: Option<std::path::PathBuf>,
        /// Build and run optimized binaries.
        #[arg(long)]
        release: bool,
        /// Kafka nodes: 1, or 3 for a replicated cluster (topics with replication
        /// factor 3 and min.insync.replicas=2).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
        brokers: u8,
        /// Serve the gateway, the registry, the broker (SASL_SSL with a SCRAM user)
        /// and PostgreSQL over TLS, with certificates from a throwaway CA.
        #[arg(long)]
        tls: bool,
        /// Registry peers: 1, or 3 that replicate every write to each other (up to
        /// 5); every service and the gateway is given all of them.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        registries: u8,
    },
    /// Simulated customers shopping through the gateway of a running `xtask up` stack.
    Simulate {
        /// Customers (the stack seeds sim-001 to sim-200).
        #[arg(long, default_value_t = 20)]
        users: usize,
        /// Orders to place in all.
        #[arg(long, default_value_t = 200)]
        orders: usize,
        /// Orders per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// The gateway (default: GATEWAY_URL, or target/stack.env's).
        #[arg(long)]
        gateway: Option<String>,
        /// Orders in flight at most.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// The saga through crashes: kill -9 a Kafka node, every service and extra
    /// instances, and PostgreSQL under a steady load of orders; then check the books.
    Chaos {
        /// Orders per second.
        #[arg(long, default_value_t = 8.0)]
        rate: f64,
        /// Customers placing them (1 to 200).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=200))]
        customers: u16,
        /// Seconds between one fault's recovery and the next fault.
        #[arg(long, default_value_t = 5)]
        gap: u64,
        /// Run the stack optimized.
        #[arg(long)]
        release: bool,
    },
    /// A benchmark against its reference: gateway, saga, registry or footprint.
    Bench {
        /// gateway, saga, registry or footprint
        name: String,
    },
    /// fmt, clippy, then every test against a real PostgreSQL and broker.
    Test {
        /// Passed to the test runner (cargo nextest run / cargo test).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up {
            durable,
            gateway_port,
            registry_port,
            env_file,
            release,
            brokers,
            tls,
            registries,
        } => xtask::stack::up(&xtask::stack::UpOptions {
            durable,
            gateway_port,
            registry_port,
            env_file,
            release,
            brokers: brokers.into(),
            tls,
            registries: registries.into(),
        }),
        Cmd::Test { args } => xtask::testrun::test(&args),
        Cmd::Chaos {
            rate,
            customers,
            gap,
            release,
        } => std::env::current_exe()
            .map_err(anyhow::Error::from)
            .and_then(|xtask| {
                let mut options = xtask::chaos::ChaosOptions::new(xtask);
                options.rate = rate;
                options.customers = customers.into();
                options.gap = std::time::Duration::from_secs(gap);
                options.release = release;
                xtask::chaos::chaos(&options)
            }),
        Cmd::Bench { name } => xtask::bench::run(&name),
        Cmd::Simulate {
            users,
            orders,
            rate,
            gateway,
            concurrency,
        } => xtask::simulate::simulate(&xtask::simulate::SimulateOptions {
            users,
            orders,
            rate,
            gateway,
            concurrency,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
