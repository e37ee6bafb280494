//! `GET /notifications`: the caller's notifications (everyone's for an admin), newest
//! first.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRef, Query, State},
    routing::get,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::{
    Problem,
    auth::{AuthUser, JwtVerifier},
};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Api {
    pub pool: PgPool,
    pub verifier: Arc<JwtVerifier>,
}

impl FromRef<Api> for Arc<JwtVerifier> {
    fn from_ref(api: &Api) -> Self {
        api.verifier.clone()
    }
}

pub fn routes(api: Api) -> Router {
    Router::new()
        .route("/notifications", get(list))
        .with_state(api)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ListParams {
    order_id: Option<String>,
    limit: Option<String>,
}

/// One notification: one per order outcome.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub id: Uuid,
    pub order_id: Uuid,
    pub user_id: String,
    #[schema(example = "email")]
    pub channel: String,
    /// `PENDING` (not sent yet, retrying), `SENT` or `FAILED`.
    #[schema(example = "SENT")]
    pub status: String,
    pub subject: String,
    /// Delivery attempts so far.
    pub attempts: i32,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
}

/// `GET /notifications`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NotificationList {
    pub items: Vec<Notification>,
}

fn notification_json(row: &PgRow) -> Result<Notification, sqlx::Error> {
    let created: DateTime<Utc> = row.try_get("created_at")?;
    let sent: Option<DateTime<Utc>> = row.try_get("sent_at")?;
    let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    Ok(Notification {
        id: row.try_get("id")?,
        order_id: row.try_get("order_id")?,
        user_id: row.try_get("user_id")?,
        channel: row.try_get("channel")?,
        status: row.try_get("status")?,
        subject: row.try_get("subject")?,
        attempts: row.try_get("attempts")?,
        created_at: stamp(created),
        sent_at: sent.map(stamp),
    })
}

#[utoipa::path(get, path = "/notifications", tag = "notifications",
    params(
        ("orderId" = Option<uuid::Uuid>, Query, description = "Only this order's notifications"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "1 to 100, default 50"),
    ),
    responses(
        (status = 200, body = NotificationList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad parameter, named", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<NotificationList>, Problem> {
    let mut errors = Vec::new();
    let order = shared::http::uuid_param(
        params.order_id.as_deref(),
        "orderId",
        "an order id",
        &mut errors,
    );
    let limit = shared::http::limit_param(params.limit.as_deref(), 50, 100, &mut errors);
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let owner = (!claims.is_admin()).then(|| claims.sub.clone());
    let rows = sqlx::query(
        "SELECT id, order_id, user_id, channel, status, subject, attempts, created_at, sent_at \
         FROM notifications \
         WHERE ($1::text IS NULL OR user_id = $1) AND ($2::uuid IS NULL OR order_id = $2) \
         ORDER BY created_at DESC, id DESC LIMIT $3",
    )
    .bind(owner)
    .bind(order)
    .bind(limit)
    .fetch_all(&api.pool)
    .await
    .map_err(|e| shared::db::problem("The notification database", e))?;
    let items = rows
        .iter()
        .map(notification_json)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| shared::db::problem("The notification database", e))?;
    Ok(Json(NotificationList { items }))
}
