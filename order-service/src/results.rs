//! Closing the saga: each payment result moves its order from `PENDING` to
//! `CONFIRMED` or `REJECTED` (with the reason), exactly once.
//!
//! One statement per event claims the `eventId` and updates the order only if it is
//! still `PENDING`: a redelivered result finds its id claimed, and a stale one (the
//! order is already final) changes nothing. A result for an order this service never
//! had cannot be fixed by a retry, so it is dead-lettered.

use shared::{
    consumer::{Failure, Handler, Incoming},
    events::PaymentResult,
};
use sqlx::{PgConnection, Row};

/// The order-service side of the saga.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResultApplier;

impl Handler for ResultApplier {
    type Event = PaymentResult;

    fn parse(&self, message: &Incoming) -> Result<PaymentResult, String> {
        PaymentResult::parse(message.payload.as_deref().unwrap_or_default())
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &PaymentResult,
        message: &Incoming,
    ) -> Result<&'static str, Failure> {
        let (status, reason) = if event.validated() {
            ("CONFIRMED", None)
        } else {
            (
                "REJECTED",
                Some(event.reason.as_deref().unwrap_or("payment declined")),
            )
        };
        // The main query sees the orders table as it was before the UPDATE: `prior`
        // is the status the event found. One lookup of the order gives its status,
        // owner, total and currency (all NULL when there is no such order).
        let row = sqlx::query(
            "WITH claimed AS (INSERT INTO processed_events (event_id) VALUES ($1) \
                              ON CONFLICT DO NOTHING RETURNING 1), \
                  moved AS (UPDATE orders SET status = $3, rejection_reason = $4, updated_at = now(), \
                                   payment_decided_at = $8, result_published_at = $9 \
                            WHERE id = $2 AND status = 'PENDING' AND user_id = $5 \
                              AND total = $6 AND currency = $7 \
                              AND EXISTS (SELECT 1 FROM claimed) RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM claimed) AS fresh, \
                    o.status AS prior, o.user_id AS owner, o.total, o.currency, \
                    EXISTS (SELECT 1 FROM moved) AS moved \
             FROM (SELECT 1) AS one LEFT JOIN orders o ON o.id = $2",
        )
        .bind(event.event_id)
        .bind(event.order_id)
        .bind(status)
        .bind(reason)
        .bind(&event.user_id)
        .bind(event.amount)
        .bind(&event.currency)
        // For the order's timeline: when payment-service decided (the event says),
        // and when the decision reached Kafka (the record's timestamp).
        .bind(
            chrono::DateTime::parse_from_rfc3339(&event.occurred_at)
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc)),
        )
        .bind(
            message
                .timestamp_ms
                .and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis),
        )
        .fetch_one(&mut *tx)
        .await?;
        if !row.try_get::<bool, _>("fresh")? {
            return Ok("duplicate");
        }
        if row.try_get::<bool, _>("moved")? {
            return Ok(if event.validated() {
                "confirmed"
            } else {
                "rejected"
            });
        }
        let Some(prior) = row.try_get::<Option<String>, _>("prior")? else {
            return Err(Failure::Permanent(format!(
                "no order {} exists; the result cannot be applied",
                event.order_id
            )));
        };
        let owner: String = row.try_get("owner")?;
        if owner != event.user_id {
            return Err(Failure::Permanent(format!(
                "order {} belongs to another user than the result's userId `{}`",
                event.order_id, event.user_id
            )));
        }
        // A result for another amount or currency than the order's was not decided on
        // this order: applying it could confirm an order that was never paid in full.
        let (total, currency): (i64, String) = (row.try_get("total")?, row.try_get("currency")?);
        if total != event.amount || currency != event.currency {
            return Err(Failure::Permanent(format!(
                "the result's amount {} {} differs from order {}'s total {total} {currency}",
                event.amount, event.currency, event.order_id
            )));
        }
        tracing::info!(order = %event.order_id, status = %prior, event = %event.event_id,
            "a result for an order already final changes nothing");
        Ok("stale")
    }
}
