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
    let options = PgConnectOptions::from_str(&settings.url)?.options([("search_path", schema)]);
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
