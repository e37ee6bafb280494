//! Foundations every process of the store shares, and nothing service-specific:
//! layered configuration, tracing, the problem+json error of the public contract,
//! the actuator routes, the shutdown signal, and the translation of typed Kafka
//! settings into librdkafka's string keys.

pub mod actuator;
pub mod auth;
pub mod config;
#[cfg(feature = "postgres")]
pub mod consumer;
#[cfg(feature = "postgres")]
pub mod db;
pub mod events;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod money;
pub mod networks;
pub mod openapi;
#[cfg(feature = "postgres")]
pub mod outbox;
pub mod ports;
pub mod problem;
pub mod registry;
pub mod server;
#[cfg(feature = "postgres")]
pub mod service;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod zipkin;

pub use problem::{FieldError, Problem};

/// Epoch milliseconds now: the unit of every lease, timestamp and backoff deadline
/// the processes exchange.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
