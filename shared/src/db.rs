//! PostgreSQL helpers for the services that own tables.
//!
//! Every service owns one PostgreSQL schema (`orders`, `payments`, `notifications`):
//! its connections use it as their `search_path`, its migrations create their tables
//! there and keep their own `_sqlx_migrations` history there, so services sharing one
//! database never see, or collide with, each other's tables or migration versions.
//!
//! The pool connects lazily, so a service starts (and reports DOWN) while the database
//! is unreachable.

use std::str::FromStr;

use sqlx::{
    PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{actuator::CheckResult, config::DatabaseSettings};

/// A pool for `settings` whose connections work in `schema`; nothing is opened until
/// first use.
pub fn connect_lazy(settings: &DatabaseSettings, schema: &str) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(&settings.url)?.options([
        ("search_path", schema),
        // A transaction whose client went quiet (a hung or half-dead process) gives
        // its locks back after a minute instead of stalling every consumer behind it.
        ("idle_in_transaction_session_timeout", "60000"),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        // A request waits at most this long for a connection, then gets a 503.
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// Creates `schema` if needed and applies `migrator` inside it.
pub async fn migrate(pool: &PgPool, schema: &str, migrator: &Migrator) -> Result<(), sqlx::Error> {
    // The schema name is a constant of the calling service, never user input.
    sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(pool)
        .await?;
    migrator.run(pool).await?;
    Ok(())
}

/// `SELECT 1` on the pool, with a reason that carries no address or credentials.
pub async fn check(pool: PgPool) -> CheckResult {
    sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .map(|_| ())
        .map_err(|e| {
            let reason = match e {
                sqlx::Error::PoolTimedOut => "no connection available in time",
                sqlx::Error::Io(_) | sqlx::Error::Tls(_) => "cannot connect",
                sqlx::Error::Database(_) => "query failed",
                _ => "unavailable",
            };
            format!("PostgreSQL: {reason}")
        })
}

/// The answer to a failed query: 503 when the database cannot be reached (the client
/// may retry; logged as a warning), else a 500 that is logged and answered without
/// details. `what` names the database in the answer, e.g. "The order database".
/// Sets the pool gauges under HikariCP's names (as Spring Boot exposes its pools), with
/// `pool` as the label: `hikaricp_connections` (open), `_active` (in use), `_idle`,
/// `_max` and `_min`. For [`crate::actuator::Actuator::on_scrape`].
pub fn record_pool(pool: &PgPool, name: &str) {
    let open = pool.size();
    let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
    let options = pool.options();
    let label = name.to_owned();
    metrics::gauge!("hikaricp_connections", "pool" => label.clone()).set(f64::from(open));
    metrics::gauge!("hikaricp_connections_active", "pool" => label.clone())
        .set(f64::from(open.saturating_sub(idle)));
    metrics::gauge!("hikaricp_connections_idle", "pool" => label.clone()).set(f64::from(idle));
    metrics::gauge!("hikaricp_connections_max", "pool" => label.clone())
        .set(f64::from(options.get_max_connections()));
    metrics::gauge!("hikaricp_connections_min", "pool" => label)
        .set(f64::from(options.get_min_connections()));
}

pub fn problem(what: &str, e: sqlx::Error) -> crate::Problem {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            tracing::warn!(error = %e, "{what} is unreachable");
            crate::Problem::unavailable(what)
        }
        other => crate::Problem::internal(&other),
    }
}
