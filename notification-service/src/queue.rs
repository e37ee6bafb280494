//! Queuing notifications: each payment result becomes one `PENDING` notification,
//! claimed by its `eventId` and unique per order and outcome, in the consumer's
//! transaction. Sending is the mailer's job, so the partition never waits for SMTP.

use shared::{
    consumer::{Failure, Handler, Incoming},
    events::PaymentResult,
};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::mail::{MailSettings, compose};

#[derive(Debug, Clone)]
pub struct Queuer {
    pub mail: MailSettings,
}

impl Handler for Queuer {
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
        let (subject, body) = compose(event);
        let row = sqlx::query(
            "WITH claimed AS (INSERT INTO processed_events (event_id) VALUES ($1) \
                              ON CONFLICT DO NOTHING RETURNING 1), \
                  queued AS (INSERT INTO notifications \
                               (id, order_id, user_id, kind, recipient, subject, body, event_id, traceparent, \
                                request_id) \
                             SELECT $2, $3, $4, $5, $6, $7, $8, $1, $9, $10 WHERE EXISTS (SELECT 1 FROM claimed) \
                             ON CONFLICT (order_id, kind) DO NOTHING RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM claimed) AS fresh, EXISTS (SELECT 1 FROM queued) AS queued",
        )
        .bind(event.event_id)
        .bind(Uuid::now_v7())
        .bind(event.order_id)
        .bind(&event.user_id)
        .bind(&event.event_type)
        .bind(self.mail.address_of(&event.user_id))
        .bind(subject)
        .bind(body)
        .bind(shared::telemetry::traceparent_here(
            message.header(shared::events::TRACEPARENT_HEADER),
        ))
        .bind(
            message
                .header(shared::events::REQUEST_ID_HEADER)
                .and_then(shared::telemetry::request_id),
        )
        .fetch_one(&mut *tx)
        .await?;
        Ok(
            if row.try_get::<bool, _>("fresh")? && row.try_get::<bool, _>("queued")? {
                "queued"
            } else {
                "duplicate"
            },
        )
    }
}
