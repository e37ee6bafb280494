//! Paying for orders: each `order-created` event, in the consumer's transaction,
//! becomes at most one payment, at most one debit, and one result event in the
//! outbox.
//!
//! Per event: claim its `eventId` (a redelivery finds it claimed and stops); stop if
//! the order already has a payment (a second event for one order); lock the account
//! row (`FOR UPDATE`, so concurrent consumers debit one account one at a time); decide;
//! debit when validated; record the payment; write the result to the outbox. The
//! balance can never go below zero: the decision is made under the row lock, and a
//! CHECK constraint backs it up.

use chrono::Utc;
use serde_json::json;
use shared::{
    consumer::{Failure, Handler, Incoming},
    events::{
        EVENT_TYPE_HEADER, OrderCreated, PAYMENT_DECLINED, PAYMENT_VALIDATED, PaymentResult,
        REQUEST_ID_HEADER, TRACEPARENT_HEADER,
    },
};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// The payment-service side of the saga.
#[derive(Debug, Clone)]
pub struct PaymentProcessor {
    /// Where results go (`payment-result-topic` unless configured otherwise).
    pub results_topic: String,
}

/// What the account allows.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Validated,
    Declined(String),
}

/// The decision for `amount` in `currency` against an account (balance, currency).
pub fn decide(account: Option<(i64, &str)>, amount: i64, currency: &str) -> Decision {
    match account {
        None => Decision::Declined("no account: the customer has never deposited funds".into()),
        Some((_, held)) if held != currency => Decision::Declined(format!(
            "currency mismatch: the account holds {held}, the order is in {currency}"
        )),
        Some((balance, _)) if balance < amount => Decision::Declined(format!(
            "insufficient funds: balance {balance}, order total {amount} (minor units of {currency})"
        )),
        Some(_) => Decision::Validated,
    }
}

impl Handler for PaymentProcessor {
    type Event = OrderCreated;

    fn parse(&self, message: &Incoming) -> Result<OrderCreated, String> {
        OrderCreated::parse(message.payload.as_deref().unwrap_or_default())
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &OrderCreated,
        message: &Incoming,
    ) -> Result<&'static str, Failure> {
        let row = sqlx::query(
            "WITH claimed AS (INSERT INTO processed_events (event_id) VALUES ($1) \
                              ON CONFLICT DO NOTHING RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM claimed) AS fresh, \
                    EXISTS (SELECT 1 FROM payments WHERE order_id = $2) AS paid",
        )
        .bind(event.event_id)
        .bind(event.order_id)
        .fetch_one(&mut *tx)
        .await?;
        if !row.try_get::<bool, _>("fresh")? {
            return Ok("duplicate");
        }
        if row.try_get::<bool, _>("paid")? {
            tracing::info!(order = %event.order_id, event = %event.event_id,
                "a second order-created for an order already paid changes nothing");
            return Ok("duplicate");
        }
        let account =
            sqlx::query("SELECT balance, currency FROM accounts WHERE user_id = $1 FOR UPDATE")
                .bind(&event.user_id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| -> Result<(i64, String), sqlx::Error> {
                    Ok((row.try_get("balance")?, row.try_get("currency")?))
                })
                .transpose()?;
        let decision = decide(
            account.as_ref().map(|(b, c)| (*b, c.as_str())),
            event.total,
            &event.currency,
        );
        let (status, event_type, reason, debit) = match decision {
            Decision::Validated => ("VALIDATED", PAYMENT_VALIDATED, None, event.total),
            Decision::Declined(reason) => ("DECLINED", PAYMENT_DECLINED, Some(reason), 0),
        };
        let result = PaymentResult {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_owned(),
            occurred_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            order_id: event.order_id,
            user_id: event.user_id.clone(),
            amount: event.total,
            currency: event.currency.clone(),
            reason: reason.clone(),
        };
        let payload = serde_json::to_value(&result)
            .map_err(|e| Failure::Permanent(format!("cannot encode the result: {e}")))?;
        let mut headers = json!({ EVENT_TYPE_HEADER: event_type });
        if let Some(trace) = shared::telemetry::traceparent_here(message.header(TRACEPARENT_HEADER))
        {
            headers[TRACEPARENT_HEADER] = json!(trace);
        }
        if let Some(id) = message
            .header(REQUEST_ID_HEADER)
            .and_then(shared::telemetry::request_id)
        {
            headers[REQUEST_ID_HEADER] = json!(id);
        }
        // The debit, the payment and its result event: one statement, one round trip.
        sqlx::query(
            "WITH debit AS (UPDATE accounts SET balance = balance - $5, updated_at = now() \
                            WHERE user_id = $3 AND $5 > 0), \
                  payment AS (INSERT INTO payments \
                                (id, order_id, user_id, amount, currency, status, reason, event_id) \
                              VALUES ($1, $2, $3, $4, $6, $7, $8, $9)) \
             INSERT INTO outbox (event_id, topic, key, event_type, payload, headers) \
             VALUES ($10, $11, $12, $13, $14, $15)",
        )
        .bind(Uuid::now_v7())
        .bind(event.order_id)
        .bind(&event.user_id)
        .bind(event.total)
        .bind(debit)
        .bind(&event.currency)
        .bind(status)
        .bind(&reason)
        .bind(event.event_id)
        .bind(result.event_id)
        .bind(&self.results_topic)
        .bind(event.order_id.to_string())
        .bind(event_type)
        .bind(&payload)
        .bind(&headers)
        .execute(&mut *tx)
        .await?;
        Ok(if debit > 0 { "validated" } else { "declined" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_name_their_reason() {
        assert_eq!(decide(Some((100, "EUR")), 100, "EUR"), Decision::Validated);
        let Decision::Declined(r) = decide(Some((99, "EUR")), 100, "EUR") else {
            panic!("validated an overdraft")
        };
        assert!(r.starts_with("insufficient funds"), "{r}");
        let Decision::Declined(r) = decide(Some((1000, "USD")), 100, "EUR") else {
            panic!("validated across currencies")
        };
        assert!(r.starts_with("currency mismatch"), "{r}");
        assert!(matches!(decide(None, 1, "EUR"), Decision::Declined(_)));
    }
}
