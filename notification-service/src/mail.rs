//! Mail: who gets it, what it says, and the mailer that sends queued notifications
//! over SMTP with retry and backoff.
//!
//! The mailer claims due `PENDING` rows `concurrency` at a time: one short statement
//! (`FOR UPDATE SKIP LOCKED`, so several instances never take the same row) moves
//! each claimed row's due time a lease ahead, and commits. It then sends them over
//! pooled connections, holding no transaction, and records each outcome on its own as
//! soon as it is known:
//! `SENT`; or another attempt later, the wait doubling from `initial_backoff_ms` to
//! `max_backoff_ms`; or `FAILED` once the relay has refused the message `max_attempts`
//! times for now (4xx) or once for good (5xx). A relay that cannot be reached (refused
//! connection, no answer in time) refuses nothing: its mail stays `PENDING`, tried
//! again with the same backoff, until it returns. A crash between the relay's
//! acceptance and the outcome's record sends that one mail again, once its lease has
//! passed: mail is at least once, and a failure never resends mail whose outcome was
//! already recorded.

use std::{collections::BTreeMap, time::Duration};

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, header::ContentType},
    transport::smtp::authentication::Credentials,
};
use serde::{Deserialize, Serialize};
use shared::events::PaymentResult;
use sqlx::{PgPool, Row, postgres::PgListener};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain SMTP: only for a relay on the same host (the local stack's sink).
    #[default]
    None,
    /// STARTTLS on the submission port (587).
    Starttls,
    /// Implicit TLS (465).
    Tls,
}

/// The `mail` section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailSettings {
    /// Run the mailer in this process.
    pub enabled: bool,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout_ms: u64,
    pub from: String,
    /// A user's address when the directory has none: `{user}` is replaced by the id.
    pub address_pattern: String,
    /// User id → address.
    pub directory: BTreeMap<String, String>,
    /// Temporary refusals (4xx) by the relay after which a message is `FAILED`. Tries
    /// that never reached the relay do not count.
    pub max_attempts: i32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Rows per round.
    pub batch_size: i64,
    /// Messages sent at once, each over its own pooled SMTP connection.
    pub concurrency: usize,
    /// The fallback poll when no notification arrives.
    pub poll_interval_ms: u64,
}

impl std::fmt::Debug for MailSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailSettings")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Default for MailSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            smtp_host: "127.0.0.1".into(),
            smtp_port: 25,
            security: SmtpSecurity::None,
            username: None,
            password: None,
            timeout_ms: 10_000,
            from: "Storefront <orders@storefront.local>".into(),
            address_pattern: "{user}@storefront.local".into(),
            directory: BTreeMap::new(),
            max_attempts: 10,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            batch_size: 50,
            concurrency: 8,
            poll_interval_ms: 5_000,
        }
    }
}

impl MailSettings {
    /// The address mail for `user` goes to.
    pub fn address_of(&self, user: &str) -> String {
        self.directory
            .get(user)
            .cloned()
            .unwrap_or_else(|| self.address_pattern.replace("{user}", user))
    }

    /// Checks what start-up can check: the sender and the pattern are addresses.
    pub fn validate(&self) -> Result<(), String> {
        self.from
            .parse::<Mailbox>()
            .map_err(|e| format!("mail.from `{}`: {e}", self.from))?;
        self.address_of("user")
            .parse::<Mailbox>()
            .map_err(|e| format!("mail.address_pattern `{}`: {e}", self.address_pattern))?;
        for (user, address) in &self.directory {
            address
                .parse::<Mailbox>()
                .map_err(|e| format!("mail.directory.{user} `{address}`: {e}"))?;
        }
        if self.max_attempts < 1 {
            return Err("mail.max_attempts must be at least 1".into());
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err("mail.concurrency must be between 1 and 64".into());
        }
        Ok(())
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let mut builder = match self.security {
            SmtpSecurity::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.smtp_host)
            }
            SmtpSecurity::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&self.smtp_host)
                    .map_err(|e| e.to_string())?
            }
            SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&self.smtp_host)
                .map_err(|e| e.to_string())?,
        }
        .port(self.smtp_port)
        .timeout(Some(Duration::from_millis(self.timeout_ms)))
        // One connection per message in flight.
        .pool_config(
            lettre::transport::smtp::PoolConfig::new()
                .max_size(u32::try_from(self.concurrency).unwrap_or(u32::MAX)),
        );
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(builder.build())
    }

    /// The wait before attempt `attempts + 1`.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let doubling = 2u64.saturating_pow(attempts.saturating_sub(1).max(0) as u32);
        Duration::from_millis(
            self.initial_backoff_ms
                .saturating_mul(doubling)
                .min(self.max_backoff_ms),
        )
    }
}

/// Minor units as a decimal amount, by the currency's exponent (ISO 4217).
pub fn format_amount(minor: i64, currency: &str) -> String {
    let exponent = match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    };
    if exponent == 0 {
        return format!("{minor} {currency}");
    }
    let unit = 10i64.pow(exponent);
    let sign = if minor < 0 { "-" } else { "" };
    let minor = minor.unsigned_abs();
    let unit = unit as u64;
    format!(
        "{sign}{}.{:0width$} {currency}",
        minor / unit,
        minor % unit,
        width = exponent as usize
    )
}

/// The subject and body of the mail announcing `result`.
pub fn compose(result: &PaymentResult) -> (String, String) {
    let amount = format_amount(result.amount, &result.currency);
    if result.validated() {
        (
            format!("Order {} confirmed", result.order_id),
            format!(
                "Your order {} is confirmed.\n\nWe received your payment of {amount}.\n\nThank you for shopping with us.\n",
                result.order_id
            ),
        )
    } else {
        let reason = result
            .reason
            .as_deref()
            .unwrap_or("the payment was declined");
        (
            format!("Order {} rejected", result.order_id),
            format!(
                "Your order {} of {amount} was rejected.\n\nWhy: {reason}.\n\nNothing was charged.\n",
                result.order_id
            ),
        )
    }
}

/// Sends what the notifications table holds.
pub struct Mailer {
    pool: PgPool,
    settings: MailSettings,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The `NOTIFY` channel of new notifications (see the migrations).
pub const CHANNEL: &str = "notifications_pending";

/// A send's outcome as the notification's row records it.
struct Settled {
    status: &'static str,
    error: Option<String>,
    retry_in: Duration,
    /// Tries so far, and how many of them the relay refused for now.
    attempts: i32,
    refusals: i32,
    /// The relay was unreachable or busy: the round stops.
    transient: bool,
}

/// What one send did.
enum Sent {
    Yes,
    /// The relay refused for now (4xx): retry later, counted against `max_attempts`.
    Refused(String),
    /// The relay could not be reached or did not answer in time: retry later,
    /// uncounted.
    Unreachable(String),
    /// The relay refused for good.
    Permanent(String),
}

/// A claimed notification, as the send needs it.
struct Claimed {
    id: Uuid,
    recipient: String,
    subject: String,
    body: String,
    /// Tries before this one.
    attempts: i32,
    refusals: i32,
    traceparent: Option<String>,
    request_id: Option<String>,
    /// The lease this claim set: the outcome is written only while it is still this
    /// one's (another instance may have taken the row after it passed).
    claimed_until: chrono::DateTime<chrono::Utc>,
}

impl Mailer {
    pub fn new(pool: PgPool, settings: MailSettings) -> Result<Self, String> {
        settings.validate()?;
        let from = settings
            .from
            .parse::<Mailbox>()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            transport: settings.transport()?,
            pool,
            settings,
            from,
        })
    }

    async fn send(&self, recipient: &str, subject: &str, body: &str, id: Uuid) -> Sent {
        let to = match recipient.parse::<Mailbox>() {
            Ok(to) => to,
            Err(e) => return Sent::Permanent(format!("recipient `{recipient}`: {e}")),
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{id}@storefront>")))
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_owned());
        let message = match message {
            Ok(m) => m,
            Err(e) => return Sent::Permanent(format!("cannot build the message: {e}")),
        };
        match tokio::time::timeout(self.send_limit(), self.transport.send(message)).await {
            Ok(Ok(_)) => Sent::Yes,
            Ok(Err(e)) if e.is_permanent() => Sent::Permanent(e.to_string()),
            // 421: the relay is closing the channel (too many connections, shutting
            // down): its state, not this message's.
            Ok(Err(e)) if e.status().is_some_and(|c| u16::from(c) == 421) => {
                Sent::Unreachable(e.to_string())
            }
            // The relay answered 4xx, or the client itself refused the message.
            Ok(Err(e)) if e.status().is_some() || e.is_client() => Sent::Refused(e.to_string()),
            Ok(Err(e)) => Sent::Unreachable(e.to_string()),
            Err(_) => Sent::Unreachable(format!(
                "the relay took longer than {:?} over the message",
                self.send_limit()
            )),
        }
    }

    /// The longest one message may take, every SMTP command of it included (`timeout_ms`
    /// bounds each command alone).
    fn send_limit(&self) -> Duration {
        Duration::from_millis(self.settings.timeout_ms.saturating_mul(6))
    }

    /// How long a claimed row is not taken again: past any send's limit, so no other
    /// instance sends a message still in flight; a crashed instance's rows are taken
    /// again after it.
    fn lease(&self) -> Duration {
        self.send_limit() * 2
    }

    /// Claims up to `n` due rows: their due time moves a lease ahead, committed at once.
    async fn claim(&self, n: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        let rows = sqlx::query(
            "UPDATE notifications SET next_attempt_at = now() + $2 * interval '1 millisecond' \
             WHERE id IN (SELECT id FROM notifications \
                 WHERE status = 'PENDING' AND next_attempt_at <= now() \
                 ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, recipient, subject, body, attempts, refusals, traceparent, \
                 request_id, next_attempt_at",
        )
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .bind(self.lease().as_millis() as f64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Claimed {
                    id: row.try_get("id")?,
                    recipient: row.try_get("recipient")?,
                    subject: row.try_get("subject")?,
                    body: row.try_get("body")?,
                    attempts: row.try_get("attempts")?,
                    refusals: row.try_get("refusals")?,
                    traceparent: row.try_get("traceparent")?,
                    request_id: row.try_get("request_id")?,
                    claimed_until: row.try_get("next_attempt_at")?,
                })
            })
            .collect()
    }

    /// One round, up to `batch_size` rows; returns how many it handled. Rows are
    /// claimed and sent `concurrency` at a time (each message waits on the relay's
    /// round trips, and over loopback on the delayed acknowledgement of its last
    /// segment); the round stops after a group with a transient failure.
    pub async fn send_due(&self) -> Result<usize, sqlx::Error> {
        let batch = usize::try_from(self.settings.batch_size.max(1)).unwrap_or(usize::MAX);
        let group = self.settings.concurrency.max(1);
        let mut handled = 0;
        while handled < batch {
            let claimed = self.claim(group.min(batch - handled)).await?;
            if claimed.is_empty() {
                break;
            }
            let n = claimed.len();
            let sends = claimed.into_iter().map(|row| {
                let attempts = row.attempts + 1;
                // A client span per attempt, in the trace of the order it is about,
                // with the id of the request that placed it: its lines name both.
                let span = tracing::info_span!(
                    "mail",
                    otel.name = "smtp send",
                    otel.kind = "client",
                    otel.status_code = tracing::field::Empty,
                    notification = %row.id,
                    attempt = attempts,
                    trace_id = tracing::field::Empty,
                    request_id = row.request_id.as_deref().unwrap_or_default(),
                );
                shared::telemetry::continue_trace(&span, row.traceparent.as_deref());
                async move {
                    let outcome = self
                        .send(&row.recipient, &row.subject, &row.body, row.id)
                        .await;
                    if !matches!(outcome, Sent::Yes) {
                        tracing::Span::current().record("otel.status_code", "error");
                    }
                    let settled = self.settle(row.id, attempts, row.refusals, outcome);
                    let transient = settled.transient;
                    // Written the moment the relay answered, whatever the rest of
                    // the group is doing: one that cannot be written leaves only its
                    // own mail to be sent again.
                    (
                        transient,
                        self.record(row.id, row.claimed_until, settled).await,
                    )
                }
                .instrument(span)
            });
            let outcomes = futures::future::join_all(sends).await;
            let mut relay_trouble = false;
            let mut unrecorded = None;
            for (transient, recorded) in outcomes {
                relay_trouble |= transient;
                if let Err(e) = recorded {
                    unrecorded.get_or_insert(e);
                }
            }
            if let Some(e) = unrecorded {
                return Err(e);
            }
            handled += n;
            // The relay is unreachable or busy: the rest of the round would only fail
            // the same way, so it waits for the next round untouched.
            if relay_trouble || n < group {
                break;
            }
        }
        Ok(handled)
    }

    /// What one send's outcome makes of its notification: `SENT`, `FAILED`, or
    /// `PENDING` again after a backoff. Called in the send's span, so the line that
    /// says a mail was not sent names its trace and request.
    fn settle(&self, id: Uuid, attempts: i32, refusals: i32, outcome: Sent) -> Settled {
        let transient = matches!(outcome, Sent::Refused(_) | Sent::Unreachable(_));
        let retry = self.settings.backoff(attempts);
        let (status, error, retry_in, refusals) = match outcome {
            Sent::Yes => ("SENT", None, Duration::ZERO, refusals),
            Sent::Permanent(e) => ("FAILED", Some(e), Duration::ZERO, refusals),
            Sent::Refused(e) if refusals + 1 >= self.settings.max_attempts => {
                ("FAILED", Some(e), Duration::ZERO, refusals + 1)
            }
            Sent::Refused(e) => ("PENDING", Some(e), retry, refusals + 1),
            Sent::Unreachable(e) => ("PENDING", Some(e), retry, refusals),
        };
        if let Some(e) = &error {
            tracing::warn!(notification = %id, attempts, status, error = %e, "mail not sent");
        }
        Settled {
            status,
            error,
            retry_in,
            attempts,
            refusals,
            transient,
        }
    }

    /// Writes one send's settled outcome, unless the row is no longer this claim's:
    /// another instance took it after the lease passed (its own outcome, or lease,
    /// stands).
    async fn record(
        &self,
        id: Uuid,
        claimed_until: chrono::DateTime<chrono::Utc>,
        settled: Settled,
    ) -> Result<(), sqlx::Error> {
        let Settled {
            status,
            error,
            retry_in,
            attempts,
            refusals,
            ..
        } = settled;
        metrics::counter!("notifications_sent_total", "status" => status).increment(1);
        sqlx::query(
            "UPDATE notifications SET status = $2, attempts = $3, refusals = $4, \
               last_error = $5, next_attempt_at = now() + $6 * interval '1 millisecond', \
               updated_at = now(), sent_at = CASE WHEN $2 = 'SENT' THEN now() END \
             WHERE id = $1 AND status = 'PENDING' AND next_attempt_at = $7",
        )
        .bind(id)
        .bind(status)
        .bind(attempts)
        .bind(refusals)
        .bind(error)
        .bind(retry_in.as_millis() as f64)
        .bind(claimed_until)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How long until the next pending notification is due (capped by the poll).
    async fn next_due(&self) -> Duration {
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let due: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM (min(next_attempt_at) - now()))::float8 \
             FROM notifications WHERE status = 'PENDING'",
        )
        .fetch_one(&self.pool)
        .await
        .ok()
        .flatten();
        match due {
            Some(secs) if secs <= 0.0 => Duration::ZERO,
            Some(secs) => Duration::from_secs_f64(secs).min(poll),
            None => poll,
        }
    }

    /// Sends until `shutdown`, finishing the round in flight.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => l.listen(CHANNEL).await.ok().map(|()| l),
            Err(_) => None,
        };
        if listener.is_none() {
            tracing::warn!("cannot LISTEN for new notifications; polling instead");
        }
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.send_due().await {
                Ok(n) if n as i64 >= self.settings.batch_size => continue,
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    let wait = self.next_due().await;
                    if wait.is_zero() {
                        continue;
                    }
                    let notified = async {
                        match listener.as_mut() {
                            Some(l) => {
                                if l.recv().await.is_err() {
                                    std::future::pending::<()>().await;
                                }
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "mailer round failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_follow_the_currency_exponent() {
        assert_eq!(format_amount(2500, "EUR"), "25.00 EUR");
        assert_eq!(format_amount(5, "EUR"), "0.05 EUR");
        assert_eq!(format_amount(2500, "JPY"), "2500 JPY");
        assert_eq!(format_amount(1234, "KWD"), "1.234 KWD");
    }

    #[test]
    fn the_directory_wins_over_the_pattern() {
        let mut settings = MailSettings::default();
        settings
            .directory
            .insert("alice".into(), "alice@example.org".into());
        assert_eq!(settings.address_of("alice"), "alice@example.org");
        assert_eq!(settings.address_of("bob"), "bob@storefront.local");
        assert!(settings.validate().is_ok());
        settings.address_pattern = "not an address".into();
        assert!(settings.validate().is_err());
    }

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let settings = MailSettings {
            initial_backoff_ms: 100,
            max_backoff_ms: 350,
            ..MailSettings::default()
        };
        assert_eq!(settings.backoff(1), Duration::from_millis(100));
        assert_eq!(settings.backoff(2), Duration::from_millis(200));
        assert_eq!(settings.backoff(3), Duration::from_millis(350));
        assert_eq!(settings.backoff(40), Duration::from_millis(350));
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let settings = MailSettings {
            password: Some("s3cret".into()),
            ..MailSettings::default()
        };
        assert!(!format!("{settings:?}").contains("s3cret"));
    }
}
