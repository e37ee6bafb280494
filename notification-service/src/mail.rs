//! Mail: who gets it, what it says, and the mailer that sends queued notifications
//! over SMTP with retry and backoff.
//!
//! The mailer takes due `PENDING` rows with `FOR UPDATE SKIP LOCKED` (several
//! instances never send the same row at once), sends them `concurrency` at a time over
//! pooled connections, and records the outcome:
//! `SENT`; or another attempt later, the wait doubling from `initial_backoff_ms` to
//! `max_backoff_ms`; or `FAILED` once `max_attempts` are spent or the relay refuses
//! the message permanently (a 5xx). A crash between the relay's acceptance and the
//! status update sends that mail again: mail is at least once.

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
    /// The relay was unreachable or busy: the round stops.
    transient: bool,
}

/// What one send did.
enum Sent {
    Yes,
    /// Retry later.
    Transient(String),
    /// The relay refused for good.
    Permanent(String),
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
        match self.transport.send(message).await {
            Ok(_) => Sent::Yes,
            Err(e) if e.is_permanent() => Sent::Permanent(e.to_string()),
            Err(e) => Sent::Transient(e.to_string()),
        }
    }

    /// One round; returns how many rows it handled (a round stops after the first
    /// group of `concurrency` sends with a transient failure).
    pub async fn send_due(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, recipient, subject, body, attempts, traceparent, request_id \
             FROM notifications \
             WHERE status = 'PENDING' AND next_attempt_at <= now() \
             ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.settings.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        // Each message waits on the relay's round trips (and, over loopback, on the
        // delayed acknowledgement of its last segment), so messages go out
        // `concurrency` at a time; the outcomes are recorded in the round's transaction.
        let mut handled = 0;
        for chunk in rows.chunks(self.settings.concurrency.max(1)) {
            let mut sends = Vec::with_capacity(chunk.len());
            for row in chunk {
                let id: Uuid = row.try_get("id")?;
                let attempts: i32 = row.try_get::<i32, _>("attempts")? + 1;
                let recipient: String = row.try_get("recipient")?;
                let subject: String = row.try_get("subject")?;
                let body: String = row.try_get("body")?;
                let traceparent: Option<String> = row.try_get("traceparent")?;
                let request_id: Option<String> = row.try_get("request_id")?;
                // A client span per attempt, in the trace of the order it is about, with
                // the id of the request that placed it: its lines name both.
                let span = tracing::info_span!(
                    "mail",
                    otel.name = "smtp send",
                    otel.kind = "client",
                    otel.status_code = tracing::field::Empty,
                    notification = %id,
                    attempt = attempts,
                    trace_id = tracing::field::Empty,
                    request_id = request_id.as_deref().unwrap_or_default(),
                );
                shared::telemetry::continue_trace(&span, traceparent.as_deref());
                sends.push(
                    async move {
                        let outcome = self.send(&recipient, &subject, &body, id).await;
                        if !matches!(outcome, Sent::Yes) {
                            tracing::Span::current().record("otel.status_code", "error");
                        }
                        (id, attempts, self.settle(id, attempts, outcome))
                    }
                    .instrument(span),
                );
            }
            let outcomes = futures::future::join_all(sends).await;
            // The relay is unreachable or busy: the rest of the round would only fail
            // the same way, so it waits for the next round untouched.
            let mut relay_trouble = false;
            for (id, attempts, settled) in outcomes {
                handled += 1;
                relay_trouble |= settled.transient;
                self.record(&mut tx, id, attempts, settled).await?;
            }
            if relay_trouble {
                break;
            }
        }
        tx.commit().await?;
        Ok(handled)
    }

    /// What one send's outcome makes of its notification: `SENT`, `FAILED`, or
    /// `PENDING` again after a backoff. Called in the send's span, so the line that
    /// says a mail was not sent names its trace and request.
    fn settle(&self, id: Uuid, attempts: i32, outcome: Sent) -> Settled {
        let transient = matches!(outcome, Sent::Transient(_));
        let (status, error, retry_in) = match outcome {
            Sent::Yes => ("SENT", None, Duration::ZERO),
            Sent::Permanent(e) => ("FAILED", Some(e), Duration::ZERO),
            Sent::Transient(e) if attempts >= self.settings.max_attempts => {
                ("FAILED", Some(e), Duration::ZERO)
            }
            Sent::Transient(e) => ("PENDING", Some(e), self.settings.backoff(attempts)),
        };
        if let Some(e) = &error {
            tracing::warn!(notification = %id, attempts, status, error = %e, "mail not sent");
        }
        Settled {
            status,
            error,
            retry_in,
            transient,
        }
    }

    /// Writes one send's settled outcome.
    async fn record(
        &self,
        tx: &mut sqlx::PgConnection,
        id: Uuid,
        attempts: i32,
        settled: Settled,
    ) -> Result<(), sqlx::Error> {
        let Settled {
            status,
            error,
            retry_in,
            ..
        } = settled;
        metrics::counter!("notifications_sent_total", "status" => status).increment(1);
        sqlx::query(
            "UPDATE notifications SET status = $2, attempts = $3, last_error = $4, \
               next_attempt_at = now() + $5 * interval '1 millisecond', updated_at = now(), \
               sent_at = CASE WHEN $2 = 'SENT' THEN now() END \
             WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(attempts)
        .bind(error)
        .bind(retry_in.as_millis() as f64)
        .execute(tx)
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
