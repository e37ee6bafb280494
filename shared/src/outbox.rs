//! The transactional outbox relay: publishes the events a service wrote into its
//! `outbox` table in the same transaction as the change they announce.
//!
//! One round: lock up to `batch_size` pending rows in id order with
//! `FOR UPDATE SKIP LOCKED` (several relays never take the same row), send them all,
//! wait for every acknowledgement (`acks=all`, idempotent producer), then mark them
//! published and commit. If any send fails the transaction rolls back, the rows stay
//! pending, and the relay backs off (doubling to `max_backoff_ms`) while the broker
//! is down. A crash anywhere before the commit leaves the rows pending for the next
//! relay, so an event can be published twice but never lost; consumers are
//! idempotent on `eventId` for exactly that case.
//!
//! The relay sleeps while there is nothing to do, and wakes at once when a trigger on
//! the table sends a `NOTIFY` on its channel; a slow poll covers a missed
//! notification.

use std::time::Duration;

use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgPool, Row, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use tracing::Instrument;

use crate::{events::TRACEPARENT_HEADER, kafka::KafkaSettings};

/// The `outbox` section of a service that publishes events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    /// Run the relay in this process.
    pub enabled: bool,
    /// Rows per round.
    pub batch_size: i64,
    /// The fallback poll when no notification arrives.
    pub poll_interval_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 100,
            poll_interval_ms: 1000,
            max_backoff_ms: 5000,
        }
    }
}

/// Why a round failed; the rows it held stay pending.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(String),
}

/// Publishes one service's outbox.
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    /// The `NOTIFY` channel the outbox trigger uses.
    channel: String,
    settings: RelaySettings,
    delivery_timeout: Duration,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("channel", &self.channel)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Relay {
    pub fn new(
        pool: PgPool,
        kafka: &KafkaSettings,
        channel: &str,
        settings: RelaySettings,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        Ok(Self {
            pool,
            producer: kafka.producer_config().create()?,
            channel: channel.to_owned(),
            settings,
            delivery_timeout: Duration::from_millis(kafka.producer.delivery_timeout_ms),
        })
    }

    /// One round; returns how many events were published.
    pub async fn publish_batch(&self) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, topic, key, event_type, payload, headers FROM outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.settings.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut sends = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<i64, _>("id")?);
            let topic: String = row.try_get("topic")?;
            let key: String = row.try_get("key")?;
            let payload = row.try_get::<Value, _>("payload")?.to_string();
            let headers: Value = row.try_get("headers")?;
            let written_in = headers
                .get(TRACEPARENT_HEADER)
                .and_then(Value::as_str)
                .map(str::to_owned);
            // A producer span per event, the child of the span the event was written
            // in: the record carries this span's context, so the consumer's span
            // follows the publish, not the write.
            let span = tracing::info_span!(
                "publish",
                otel.name = %format_args!("{topic} publish"),
                otel.kind = "producer",
                otel.status_code = tracing::field::Empty,
                messaging.system = "kafka",
                messaging.destination.name = %topic,
                messaging.kafka.message.key = %key,
                trace_id = tracing::field::Empty,
                request_id = headers
                    .get(crate::events::REQUEST_ID_HEADER)
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default(),
            );
            crate::telemetry::continue_trace(&span, written_in.as_deref());
            let traceparent = crate::telemetry::traceparent_of(&span).or(written_in);
            let mut kafka_headers = OwnedHeaders::new();
            if let Some(map) = headers.as_object() {
                for (name, value) in map {
                    if let Some(value) = value.as_str()
                        && name != TRACEPARENT_HEADER
                    {
                        kafka_headers = kafka_headers.insert(Header {
                            key: name,
                            value: Some(value),
                        });
                    }
                }
            }
            if let Some(traceparent) = &traceparent {
                kafka_headers = kafka_headers.insert(Header {
                    key: TRACEPARENT_HEADER,
                    value: Some(traceparent),
                });
            }
            let producer = self.producer.clone();
            let timeout = self.delivery_timeout;
            // Sent in id order: the idempotent producer keeps that order per partition.
            sends.push(
                async move {
                    let sent = producer
                        .send(
                            FutureRecord::to(&topic)
                                .key(&key)
                                .payload(&payload)
                                .headers(kafka_headers),
                            timeout,
                        )
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| RelayError::Broker(e.to_string()));
                    if sent.is_err() {
                        tracing::Span::current().record("otel.status_code", "error");
                    }
                    sent
                }
                .instrument(span),
            );
        }
        for result in futures::future::join_all(sends).await {
            // Any failure rolls the whole batch back: those rows stay pending.
            result?;
        }
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::counter!("outbox_published_total", "channel" => self.channel.clone())
            .increment(ids.len() as u64);
        Ok(ids.len())
    }

    /// Publishes until `shutdown`, finishing the round in flight.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut listener) => match listener.listen(&self.channel).await {
                Ok(()) => Some(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for outbox rows; polling instead");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for outbox rows; polling instead");
                None
            }
        };
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let max_backoff = Duration::from_millis(self.settings.max_backoff_ms);
        let mut backoff = Duration::from_millis(100);
        // The backlog gauge is a count query: refreshed at most once a second, not
        // after every round of a busy relay.
        let mut backlog_counted: Option<std::time::Instant> = None;
        while !shutdown.is_cancelled() {
            match self.publish_batch().await {
                // A full batch: there may be more right away.
                Ok(n) if n as i64 >= self.settings.batch_size => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    if backlog_counted.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        self.record_backlog().await;
                        backlog_counted = Some(std::time::Instant::now());
                    }
                    let notified = async {
                        match listener.as_mut() {
                            Some(l) => {
                                if l.recv().await.is_err() {
                                    tokio::time::sleep(poll).await;
                                }
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(poll) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "outbox round failed; events stay pending");
                    metrics::counter!("outbox_failures_total", "channel" => self.channel.clone())
                        .increment(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }

    async fn record_backlog(&self) {
        if let Ok(pending) =
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&self.pool)
                .await
        {
            metrics::gauge!("outbox_backlog", "channel" => self.channel.clone())
                .set(pending as f64);
        }
    }
}
