//! `GET /notifications`: the caller's notifications (everyone's for an admin), newest
//! first.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRef, Query, State},
    routing::get,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::{
    FieldError, Problem,
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
struct ListParams {
    order_id: Option<String>,
    limit: Option<String>,
}

fn notification_json(row: &PgRow) -> Result<Value, sqlx::Error> {
    let created: DateTime<Utc> = row.try_get("created_at")?;
    let sent: Option<DateTime<Utc>> = row.try_get("sent_at")?;
    let mut item = json!({
        "id": row.try_get::<Uuid, _>("id")?,
        "orderId": row.try_get::<Uuid, _>("order_id")?,
        "userId": row.try_get::<String, _>("user_id")?,
        "channel": row.try_get::<String, _>("channel")?,
        "status": row.try_get::<String, _>("status")?,
        "subject": row.try_get::<String, _>("subject")?,
        "attempts": row.try_get::<i32, _>("attempts")?,
        "createdAt": created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    if let Some(sent) = sent {
        item["sentAt"] = json!(sent.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    Ok(item)
}

async fn list(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, Problem> {
    let mut errors = Vec::new();
    let order = match params.order_id.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => match Uuid::parse_str(raw) {
            Ok(id) => Some(id),
            Err(_) => {
                errors.push(FieldError::new("orderId", "must be an order id (a UUID)"));
                None
            }
        },
    };
    let limit = match params.limit.as_deref() {
        None | Some("") => 50,
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                errors.push(FieldError::new("limit", "must be 1 to 100"));
                50
            }
        },
    };
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
    Ok(Json(json!({ "items": items })))
}
