//! `GET /orders/{id}/timeline`: an order's way through the saga, hop by hop, for its
//! owner (or an admin), without a tracing backend.
//!
//! Each hop's time is recorded where the hop happens and read back here:
//!
//! | step | service | recorded as |
//! |---|---|---|
//! | `accepted` | order-service | the order row's `created_at` |
//! | `published` | order-service | its `order-created` outbox row's `published_at` (the broker acknowledged it) |
//! | `payment-decided` | payment-service | the payment result event's `occurredAt` |
//! | `result-published` | payment-service | the result record's Kafka timestamp |
//! | `final` | order-service | the order's `updated_at` once it left `PENDING` |
//! | `notification-sent` | notification-service | the mail's `sentAt`, asked of notification-service |
//!
//! A hop's `durationMs` is the time since the hop that caused it: `final` and
//! `notification-sent` both follow `result-published`, each consuming the result on
//! its own. Times from other services come from their clocks; a negative difference
//! (skewed clocks) is shown as 0.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, header},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::{
    Problem,
    auth::AuthUser,
    networks::{InstanceNetworks, PRIVATE_NETWORKS},
    registry::{Discovery, RegistryClient, RegistrySettings},
};
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::orders::{Api, internal, not_yours};

/// The service the mail's hop is asked of.
const NOTIFICATION_SERVICE: &str = "notification-service";

/// How long the timeline waits for notification-service before leaving its hop out.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// An order's hops.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    pub order_id: Uuid,
    /// The trace the order was placed in (32 hex digits): look it up in Zipkin.
    #[schema(example = "4bf92f3577b34da6a3ce929d0e0e4736")]
    pub trace_id: Option<String>,
    /// In saga order; each present once it has happened.
    pub hops: Vec<Hop>,
}

/// One hop of the saga.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hop {
    /// `accepted`, `published`, `payment-decided`, `result-published`, `final` or
    /// `notification-sent`.
    #[schema(example = "payment-decided")]
    pub step: String,
    /// The service that took the step.
    #[schema(example = "payment-service")]
    pub service: String,
    /// When the step happened (RFC 3339, milliseconds).
    pub at: String,
    /// Milliseconds since the step that caused this one (0 for `accepted`).
    pub duration_ms: i64,
}

/// Asks notification-service, found through the registry, when an order's mail went
/// out. Without a registry (`registry.enabled` off) the hop is left out.
#[derive(Debug, Clone)]
pub struct Notifications {
    /// Follows notification-service's instances, admitting only those inside the
    /// private networks (as the gateway does): the caller's token is sent to them.
    discovery: Option<Arc<Discovery>>,
    http: reqwest::Client,
}

impl Notifications {
    /// Follows notification-service in the registry until `stop` fires.
    pub fn new(settings: &RegistrySettings, stop: CancellationToken) -> Result<Self, String> {
        let configured = settings.enabled && settings.urls.split(',').any(|u| !u.trim().is_empty());
        let discovery = match configured {
            true => Some(Arc::new(Discovery::start_within(
                RegistryClient::new(settings)?,
                &[NOTIFICATION_SERVICE],
                stop,
                Some(Arc::new(InstanceNetworks::parse(&PRIVATE_NETWORKS)?)),
            ))),
            false => None,
        };
        Ok(Self {
            discovery,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .build()
                .unwrap_or_default(),
        })
    }

    /// When the order's mail was sent, asked with the caller's own credentials (so
    /// notification-service applies its own rule of who may see what).
    async fn sent_at(&self, order: Uuid, authorization: &HeaderValue) -> Option<DateTime<Utc>> {
        let discovery = self.discovery.as_ref()?;
        let asked = async {
            let instances = discovery.instances(NOTIFICATION_SERVICE);
            let up: Vec<_> = instances.iter().filter(|i| i.is_up()).collect();
            let instance = up
                .get(order.as_u128() as usize % up.len().max(1))
                .ok_or("no instance is up")?;
            let mut request = self
                .http
                .get(format!(
                    "http://{}/notifications?orderId={order}&limit=10",
                    instance.address
                ))
                .header(header::AUTHORIZATION, authorization);
            if let Some(traceparent) = shared::telemetry::traceparent_here(None) {
                request = request.header("traceparent", traceparent);
            }
            let response = request.send().await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("it answered {}", response.status()));
            }
            let list: NotificationList = response.json().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(
                list.items
                    .into_iter()
                    .filter(|n| n.status == "SENT")
                    .filter_map(|n| n.sent_at)
                    .min(),
            )
        };
        let answer = tokio::time::timeout(ASK_TIMEOUT, asked)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", ASK_TIMEOUT.as_millis())));
        match answer {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!(order = %order, error = %e,
                    "cannot ask notification-service; the timeline leaves the mail out");
                None
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct NotificationList {
    items: Vec<NotificationItem>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationItem {
    status: String,
    sent_at: Option<DateTime<Utc>>,
}

/// `GET /orders/{id}/timeline`.
#[utoipa::path(get, path = "/orders/{id}/timeline", tag = "orders",
    params(("id" = String, Path, description = "The order id")),
    responses(
        (status = 200, body = Timeline),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or not the caller's", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn timeline(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Timeline>, Problem> {
    let not_found = || not_yours(&id);
    let Ok(order) = Uuid::parse_str(&id) else {
        return Err(not_found());
    };
    let row = sqlx::query(
        "SELECT o.status, o.created_at, o.updated_at, o.trace_id, o.payment_decided_at, \
                o.result_published_at, e.published_at \
         FROM orders o LEFT JOIN outbox e ON e.event_id = o.created_event_id \
         WHERE o.id = $1 AND ($2 OR o.user_id = $3)",
    )
    .bind(order)
    .bind(claims.is_admin())
    .bind(&claims.sub)
    .fetch_optional(&api.pool)
    .await
    .map_err(internal)?
    .ok_or_else(not_found)?;
    let at = |column: &str| row.try_get::<Option<DateTime<Utc>>, _>(column);
    let status: String = row.try_get("status").map_err(internal)?;
    let accepted = at("created_at").map_err(internal)?;
    let published = at("published_at").map_err(internal)?;
    let decided = at("payment_decided_at").map_err(internal)?;
    let result_published = at("result_published_at").map_err(internal)?;
    let finished = if status == "PENDING" {
        None
    } else {
        at("updated_at").map_err(internal)?
    };
    // The mail follows the result; before there is one, there is nothing to ask.
    let mailed = match (
        result_published.or(decided),
        headers.get(header::AUTHORIZATION),
    ) {
        (Some(_), Some(authorization)) => api.notifications.sent_at(order, authorization).await,
        _ => None,
    };
    let hops = hops(&[
        Step::new("accepted", "order-service", accepted, None),
        Step::new("published", "order-service", published, Some("accepted")),
        Step::new(
            "payment-decided",
            "payment-service",
            decided,
            Some("published"),
        ),
        Step::new(
            "result-published",
            "payment-service",
            result_published,
            Some("payment-decided"),
        ),
        Step::new("final", "order-service", finished, Some("result-published")),
        Step::new(
            "notification-sent",
            "notification-service",
            mailed,
            Some("result-published"),
        ),
    ]);
    Ok(Json(Timeline {
        order_id: order,
        trace_id: row.try_get("trace_id").map_err(internal)?,
        hops,
    }))
}

/// A step as recorded, with the step that caused it.
struct Step {
    name: &'static str,
    service: &'static str,
    at: Option<DateTime<Utc>>,
    after: Option<&'static str>,
}

impl Step {
    fn new(
        name: &'static str,
        service: &'static str,
        at: Option<DateTime<Utc>>,
        after: Option<&'static str>,
    ) -> Self {
        Self {
            name,
            service,
            at,
            after,
        }
    }
}

/// The steps that happened, each timed from its cause (or, when the cause's time is
/// unknown, from the latest earlier step that is known).
fn hops(steps: &[Step]) -> Vec<Hop> {
    let mut hops = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let Some(at) = step.at else { continue };
        let cause = step
            .after
            .and_then(|name| steps.iter().find(|s| s.name == name))
            .and_then(|s| s.at)
            .or_else(|| steps[..index].iter().rev().find_map(|s| s.at));
        let duration_ms = step
            .after
            .and(cause)
            .map_or(0, |cause| (at - cause).num_milliseconds().max(0));
        hops.push(Hop {
            step: step.name.to_owned(),
            service: step.service.to_owned(),
            at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            duration_ms,
        });
    }
    hops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms)
    }

    #[test]
    fn hops_are_timed_from_their_cause_and_missing_ones_are_left_out() {
        let hops = hops(&[
            Step::new("accepted", "order-service", t(0), None),
            Step::new("published", "order-service", t(40), Some("accepted")),
            Step::new(
                "payment-decided",
                "payment-service",
                t(90),
                Some("published"),
            ),
            Step::new(
                "result-published",
                "payment-service",
                None,
                Some("payment-decided"),
            ),
            Step::new("final", "order-service", t(150), Some("result-published")),
            Step::new(
                "notification-sent",
                "notification-service",
                t(80),
                Some("result-published"),
            ),
        ]);
        let seen: Vec<(&str, i64)> = hops
            .iter()
            .map(|h| (h.step.as_str(), h.duration_ms))
            .collect();
        assert_eq!(
            seen,
            [
                ("accepted", 0),
                ("published", 40),
                ("payment-decided", 50),
                // Its cause's time is unknown: from the latest known step before it.
                ("final", 60),
                // Earlier than that step by a skewed clock: 0, never negative.
                ("notification-sent", 0),
            ]
        );
        assert_eq!(hops[0].at, "2023-11-14T22:13:20.000Z");
    }
}
