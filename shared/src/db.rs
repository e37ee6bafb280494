//! PostgreSQL helpers for the services that own tables: a pool that connects lazily (a
//! service starts, and reports DOWN, while the database is unreachable) and the
//! health check the actuator runs against it.

use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::{actuator::CheckResult, config::DatabaseSettings};

/// A pool for `settings`; no connection is opened until first use.
pub fn connect_lazy(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .connect_lazy(&settings.url)
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
