//! `cargo xtask test`: the one command CI runs.
//!
//! Formatting and lints first (cheap, and a failure there needs no database), then
//! PostgreSQL and Apache Kafka provisioned exactly as `cargo xtask up` does, then every
//! test of the workspace with `DATABASE_URL` and `KAFKA_BROKERS` pointing at them,
//! through cargo-nextest when it is installed, else `cargo test`. Everything started is
//! stopped when the tests end, fail, or the command is interrupted.

use std::{fs, process::Command};

use crate::{
    broker::{Broker, KafkaOptions},
    postgres::Postgres,
    procs::{self, Interrupt},
};

/// Runs the checks and the tests; `extra` goes to the test runner (a filter, say).
pub fn test(extra: &[String]) -> anyhow::Result<()> {
    let interrupt = Interrupt::install()?;

    step("cargo fmt --check");
    let mut fmt = crate::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    procs::run("cargo fmt --check", &mut fmt, &interrupt)?;

    step("cargo clippy --all-targets -- -D warnings");
    let mut clippy = crate::cargo();
    clippy.args([
        "clippy",
        "--quiet",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    procs::run("cargo clippy", &mut clippy, &interrupt)?;

    // Build the tests before provisioning, so a compile error costs no database.
    let nextest = has_nextest();
    step("building the tests");
    let mut build = crate::cargo();
    if nextest {
        build.args([
            "nextest",
            "list",
            "--workspace",
            "--message-format",
            "oneline",
        ]);
        build.stdout(std::process::Stdio::null());
    } else {
        build.args(["test", "--workspace", "--no-run", "--quiet"]);
    }
    procs::run("building the tests", &mut build, &interrupt)?;

    let dir = crate::target_dir().join("xtask-test");
    fs::create_dir_all(&dir)?;
    step("starting PostgreSQL");
    let pid = std::process::id();
    let postgres = Postgres::provide(&dir.join(format!("postgres-{pid}")), false, &interrupt)?;
    step(&format!(
        "starting Apache Kafka {} (one node)",
        crate::broker::KAFKA_VERSION
    ));
    // Beside the plain listener, a SASL_SSL one with a throwaway CA's certificate and
    // a SCRAM user, for the tests of production's connection settings.
    let tls = tempfile::Builder::new()
        .prefix("storefront-tls-")
        .tempdir()?;
    let authority = crate::tls::Authority::generate("storefront test CA")?;
    let ca_file = authority.write_pem(&tls.path().join("ca.pem"))?;
    let keystore = authority.issue(tls.path(), "kafka")?.key_and_certificate;
    let broker = Broker::provide(
        &KafkaOptions::single(dir.join(format!("kafka-{pid}"))).with_secure_listener(keystore),
        &interrupt,
    )?;
    let scram_password = format!("{:032x}", rand::random::<u128>());
    let data_dirs = broker
        .cluster()
        .map(|c| std::env::join_paths(c.data_dirs()));
    let secure = match broker.cluster() {
        Some(cluster) => {
            cluster.add_scram_user(
                SCRAM_TEST_USER,
                &scram_password,
                "SCRAM-SHA-512",
                &interrupt,
            )?;
            cluster.secure_bootstrap()
        }
        None => None,
    };

    step("starting Redis (Debian), which shares the gateway's rate limits between instances");
    let redis = crate::redis::Redis::start(&dir.join(format!("redis-{pid}")), &interrupt)?;

    step("installing the Python tools the tests use (a Eureka client, an SMTP sink)");
    let python_path = crate::tools::python_path(&interrupt)?;
    step("installing schemathesis, which fuzzes every OpenAPI document through the gateway");
    let schemathesis = crate::tools::schemathesis(&interrupt)?;
    step("installing newman, which runs the Postman collection in the end-to-end test");
    let newman = crate::tools::newman(&interrupt)?;
    step("installing kcat (Debian), which the broker tests use as a client of nobody's making");
    let kcat = crate::tools::debian_tool("kcat", "kcat")?;
    step("building the Spring Boot Eureka client the interop test runs (Maven)");
    let spring_client = crate::tools::spring_program("eureka-client", &interrupt)?;
    step("building Spring Cloud Gateway, which the differential test runs beside ours (Maven)");
    let spring_gateway = crate::tools::spring_program("gateway", &interrupt)?;

    step("running the tests");
    let mut tests = crate::cargo();
    if nextest {
        tests.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        tests.args(["test", "--workspace", "--no-fail-fast"]);
    }
    tests
        .args(extra)
        .env("DATABASE_URL", postgres.url())
        .env("KAFKA_BROKERS", broker.brokers())
        .env("STOREFRONT_PYTHONPATH", &python_path)
        .env("STOREFRONT_NEWMAN", &newman)
        .env("STOREFRONT_SCHEMATHESIS", &schemathesis)
        .env("STOREFRONT_KCAT", &kcat)
        .env("STOREFRONT_SPRING_EUREKA_CLIENT", &spring_client)
        .env("STOREFRONT_SPRING_GATEWAY", &spring_gateway)
        .env("STOREFRONT_REDIS_URL", redis.url());
    if let Some(Ok(dirs)) = data_dirs {
        // For tests that read what the broker stored (the codec of a record batch).
        tests.env("STOREFRONT_KAFKA_DATA_DIRS", dirs);
    }
    if let Some(secure) = secure {
        tests
            .env("STOREFRONT_KAFKA_SASL_SSL_BROKERS", secure)
            .env("STOREFRONT_KAFKA_CA_FILE", &ca_file)
            .env("STOREFRONT_KAFKA_SCRAM_USER", SCRAM_TEST_USER)
            .env("STOREFRONT_KAFKA_SCRAM_PASSWORD", &scram_password);
    }
    let result = procs::run("the tests", &mut tests, &interrupt);
    drop(redis);
    drop(broker);
    drop(postgres);
    result
}

/// The SCRAM user the tests authenticate as on the broker's SASL_SSL listener.
const SCRAM_TEST_USER: &str = "storefront-test";

fn has_nextest() -> bool {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn step(message: &str) {
    eprintln!("xtask: {message}");
}
