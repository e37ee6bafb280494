//! The orders API: create (idempotent with `Idempotency-Key`), read one, list newest
//! first with keyset pagination.
//!
//! Creating an order writes the order row and its `order-created` event into the
//! outbox in one transaction, so an accepted order is never without its event and
//! an event never announces an order that was rolled back.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRef, Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shared::{
    FieldError, Problem,
    auth::{AuthUser, JwtVerifier},
    events::{
        EVENT_TYPE_HEADER, ORDER_CREATED, OrderCreated, REQUEST_ID_HEADER, TRACEPARENT_HEADER,
    },
};
use sqlx::{PgPool, Row, postgres::PgRow};
use tracing::Instrument;
use uuid::Uuid;

use crate::validation::{CreateOrder, Item};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct Api {
    pub pool: PgPool,
    pub verifier: Arc<JwtVerifier>,
    /// Where `order-created` events go.
    pub orders_topic: String,
    /// Where the timeline asks notification-service when the mail went out.
    pub notifications: crate::timeline::Notifications,
}

impl FromRef<Api> for Arc<JwtVerifier> {
    fn from_ref(api: &Api) -> Self {
        api.verifier.clone()
    }
}

pub fn routes(api: Api) -> Router {
    Router::new()
        .route("/orders", get(list).post(create))
        .route("/orders/stats", get(stats))
        .route("/orders/{id}", get(read))
        .route("/orders/{id}/timeline", get(crate::timeline::timeline))
        .with_state(api)
}

/// The answer for an order that does not exist or is someone else's: the same, so
/// nobody learns which order ids exist.
pub(crate) fn not_yours(id: &str) -> Problem {
    Problem::not_found(format!(
        "No order {} is yours to see.",
        shared::http::echo(id)
    ))
}

/// A database failure: 503 when unreachable, else a logged 500.
pub(crate) fn internal(e: sqlx::Error) -> Problem {
    shared::db::problem("The order database", e)
}

/// An order as the contract shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub id: Uuid,
    /// The owner: the `sub` of the token that created it.
    pub user_id: String,
    /// `PENDING`, then `CONFIRMED` (payment validated) or `REJECTED`.
    #[schema(example = "PENDING")]
    pub status: String,
    pub items: Vec<Item>,
    /// Minor units.
    pub total: i64,
    pub currency: String,
    /// Why the payment was declined (`REJECTED` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejection_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A page of orders, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderPage {
    pub items: Vec<Order>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

fn order_of(row: &PgRow) -> Result<Order, sqlx::Error> {
    let created: DateTime<Utc> = row.try_get("created_at")?;
    let updated: DateTime<Utc> = row.try_get("updated_at")?;
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        status: row.try_get("status")?,
        items: serde_json::from_value(row.try_get::<Value, _>("items")?)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        total: row.try_get("total")?,
        currency: row.try_get("currency")?,
        rejection_reason: row.try_get("rejection_reason")?,
        created_at: created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        updated_at: updated.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// The order as the contract shows it, as JSON.
fn order_json(row: &PgRow) -> Result<Value, sqlx::Error> {
    serde_json::to_value(order_of(row)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

const ORDER_COLUMNS: &str =
    "id, user_id, status, items, total, currency, rejection_reason, created_at, updated_at";

fn created(order: Value) -> Response {
    let location = format!("/orders/{}", order["id"].as_str().unwrap_or_default());
    let mut response = (StatusCode::CREATED, Json(order)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// `POST /orders`.
#[utoipa::path(post, path = "/orders", tag = "orders",
    request_body = CreateOrder,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
        description = "1 to 255 visible ASCII characters; a retry with the same key gets the first answer")),
    responses(
        (status = 201, description = "Created; `Location: /orders/{id}`", body = Order),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or an Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    headers: HeaderMap,
    shared::http::Json(body): shared::http::Json<CreateOrder>,
) -> Result<Response, Problem> {
    let order = body.validate().map_err(Problem::validation)?;
    let key = shared::http::idempotency_key(&headers)?;
    let items = serde_json::to_value(&order.items).map_err(|e| Problem::internal(&e))?;
    // The fingerprint of what was asked, to tell a retry from a different request.
    let fingerprint = {
        let canonical = json!({ "items": items, "currency": order.currency }).to_string();
        hex(&Sha256::digest(canonical.as_bytes()))
    };
    // The transaction in a span of its own: the outbox row keeps its context, so
    // the event's producer span hangs under the write that made the event.
    let span = tracing::info_span!(
        "db",
        otel.name = "INSERT orders",
        otel.kind = "client",
        db.system = "postgresql",
        db.operation = "INSERT",
        peer.service = "postgresql",
    );
    place(&api, &claims, &headers, order, key, items, fingerprint)
        .instrument(span)
        .await
}

/// The order, its event and its idempotency key, in one transaction.
async fn place(
    api: &Api,
    claims: &shared::auth::Claims,
    headers: &HeaderMap,
    order: crate::validation::ValidOrder,
    key: Option<String>,
    items: Value,
    fingerprint: String,
) -> Result<Response, Problem> {
    let mut tx = api.pool.begin().await.map_err(internal)?;
    if let Some(key) = &key {
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (user_id, key, fingerprint) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&claims.sub)
        .bind(key)
        .bind(&fingerprint)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
        if claimed.rows_affected() == 0 {
            // The first request with this key committed (a concurrent one waited on
            // the unique key above): answer as it was answered.
            let row = sqlx::query(
                "SELECT fingerprint, response FROM idempotency_keys WHERE user_id = $1 AND key = $2",
            )
            .bind(&claims.sub)
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(internal)?;
            let stored: String = row.try_get("fingerprint").map_err(internal)?;
            if stored != fingerprint {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "This Idempotency-Key was already used with a different request; use a new key.",
                )
                .with_type("/problems/idempotency-key-reused"));
            }
            let response: Option<Value> = row.try_get("response").map_err(internal)?;
            return match response {
                Some(order) => Ok(created(order)),
                None => Err(Problem::conflict(
                    "A request with this Idempotency-Key is still being processed; retry shortly.",
                )),
            };
        }
    }

    let id = Uuid::now_v7();
    let event_id = Uuid::now_v7();
    let received = headers
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok());
    let traceparent = shared::telemetry::traceparent_here(received);
    let row = sqlx::query(&format!(
        "INSERT INTO orders (id, user_id, items, total, currency, trace_id, created_event_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {ORDER_COLUMNS}"
    ))
    .bind(id)
    .bind(&claims.sub)
    .bind(&items)
    .bind(order.total)
    .bind(&order.currency)
    .bind(traceparent.as_deref().and_then(shared::telemetry::trace_id))
    .bind(event_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(internal)?;
    let stored = order_json(&row).map_err(internal)?;

    let event = serde_json::to_value(OrderCreated {
        event_id,
        event_type: ORDER_CREATED.to_owned(),
        occurred_at: stored["createdAt"].as_str().unwrap_or_default().to_owned(),
        order_id: id,
        user_id: claims.sub.clone(),
        items: order.items.clone(),
        total: order.total,
        currency: order.currency.clone(),
    })
    .map_err(|e| Problem::internal(&e))?;
    let mut event_headers = json!({ EVENT_TYPE_HEADER: ORDER_CREATED });
    if let Some(trace) = &traceparent {
        event_headers[TRACEPARENT_HEADER] = json!(trace);
    }
    if let Some(id) = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(shared::telemetry::request_id)
    {
        event_headers[REQUEST_ID_HEADER] = json!(id);
    }
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, key, event_type, payload, headers) \
         VALUES ($1, $2, $3, 'order-created', $4, $5)",
    )
    .bind(event_id)
    .bind(&api.orders_topic)
    .bind(id.to_string())
    .bind(&event)
    .bind(&event_headers)
    .execute(&mut *tx)
    .await
    .map_err(internal)?;

    if let Some(key) = &key {
        sqlx::query(
            "UPDATE idempotency_keys SET status_code = 201, response = $3 WHERE user_id = $1 AND key = $2",
        )
        .bind(&claims.sub)
        .bind(key)
        .bind(&stored)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    }
    tx.commit().await.map_err(internal)?;
    metrics::counter!("orders_created_total").increment(1);
    Ok(created(stored))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET /orders/{id}`: the caller's own order, any order for an admin, else 404.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "The order id")),
    responses(
        (status = 200, body = Order),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or not the caller's", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn read(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let not_found = || not_yours(&id);
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return Err(not_found());
    };
    let row = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND ($2 OR user_id = $3)"
    ))
    .bind(uuid)
    .bind(claims.is_admin())
    .bind(&claims.sub)
    .fetch_optional(&api.pool)
    .await
    .map_err(internal)?
    .ok_or_else(not_found)?;
    Ok(Json(order_json(&row).map_err(internal)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /orders?status=&limit=&cursor=`: newest first, the caller's own (all for an
/// admin). The cursor is opaque: the position after the last order returned.
#[utoipa::path(get, path = "/orders", tag = "orders",
    params(
        ("status" = Option<String>, Query, pattern = "^(PENDING|CONFIRMED|REJECTED)$", description = "PENDING, CONFIRMED or REJECTED"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "The nextCursor of the previous page"),
    ),
    responses(
        (status = 200, body = OrderPage),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad parameter, named", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, Problem> {
    let mut errors = Vec::new();
    let status = params.status.filter(|s| !s.is_empty());
    if let Some(status) = &status
        && !["PENDING", "CONFIRMED", "REJECTED"].contains(&status.as_str())
    {
        errors.push(FieldError::new(
            "status",
            "must be PENDING, CONFIRMED or REJECTED",
        ));
    }
    let limit = shared::http::limit_param(params.limit.as_deref(), 20, 100, &mut errors);
    let cursor = match params.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(raw) => match decode_cursor(raw) {
            Some(position) => Some(position),
            None => {
                errors.push(FieldError::new(
                    "cursor",
                    "is not a cursor this API returned; start again without one",
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let owner = (!claims.is_admin()).then(|| claims.sub.clone());
    let rows = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders \
         WHERE ($1::text IS NULL OR user_id = $1) \
           AND ($2::text IS NULL OR status = $2) \
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4)) \
         ORDER BY created_at DESC, id DESC LIMIT $5"
    ))
    .bind(owner)
    .bind(status)
    .bind(cursor.map(|(at, _)| at))
    .bind(cursor.map(|(_, id)| id))
    .bind(limit + 1)
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?;
    let more = rows.len() as i64 > limit;
    let page = &rows[..rows.len().min(limit as usize)];
    let items = page
        .iter()
        .map(order_json)
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    let next = if more {
        page.last()
            .map(|row| -> Result<String, sqlx::Error> {
                Ok(encode_cursor(
                    row.try_get("created_at")?,
                    row.try_get("id")?,
                ))
            })
            .transpose()
            .map_err(internal)?
    } else {
        None
    };
    Ok(Json(json!({ "items": items, "nextCursor": next })))
}

/// `GET /orders/stats` (admins): counts by status, confirmed revenue per currency, the
/// rejection rate of settled orders, and a per-minute series for the last hour
/// (orders created, confirmed and rejected in each minute).
#[utoipa::path(get, path = "/orders/stats", tag = "orders",
    responses(
        (status = 200, body = Stats),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn stats(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
) -> Result<Json<Stats>, Problem> {
    if !claims.is_admin() {
        return Err(Problem::forbidden("Order statistics are for admins."));
    }
    let counts = StatusCounts::load(&api.pool).await.map_err(internal)?;
    let (confirmed, rejected) = (counts.confirmed, counts.rejected);
    // The sum of bigints is a numeric that may not fit a bigint (enough large orders
    // overflow it): it travels as text and is read into 128 bits.
    let revenue = sqlx::query_as::<_, (String, String)>(
        "SELECT currency, sum(total)::text FROM orders WHERE status = 'CONFIRMED' \
         GROUP BY currency ORDER BY currency",
    )
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?;
    let revenue = revenue
        .into_iter()
        .map(|(currency, amount)| {
            let amount = amount.parse::<i128>().map_err(|e| {
                internal(sqlx::Error::Decode(
                    format!("revenue {amount} of {currency}: {e}").into(),
                ))
            })?;
            Ok(Revenue { currency, amount })
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    let series = sqlx::query_as::<_, (DateTime<Utc>, i64, i64, i64)>(
        "WITH minutes AS (SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes', \
                                                 date_trunc('minute', now()), interval '1 minute') AS m) \
         SELECT m, \
           (SELECT count(*) FROM orders WHERE created_at >= m AND created_at < m + interval '1 minute'), \
           (SELECT count(*) FROM orders WHERE status = 'CONFIRMED' \
              AND updated_at >= m AND updated_at < m + interval '1 minute'), \
           (SELECT count(*) FROM orders WHERE status = 'REJECTED' \
              AND updated_at >= m AND updated_at < m + interval '1 minute') \
         FROM minutes ORDER BY m",
    )
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?;
    let settled = confirmed + rejected;
    Ok(Json(Stats {
        counts,
        confirmed_revenue: revenue,
        rejection_rate: (settled > 0).then(|| rejected as f64 / settled as f64),
        last_hour: series
            .into_iter()
            .map(|(minute, created, confirmed, rejected)| Minute {
                minute: minute.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                created,
                confirmed,
                rejected,
            })
            .collect(),
    }))
}

/// `GET /orders/stats`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub counts: StatusCounts,
    /// Per currency, minor units.
    pub confirmed_revenue: Vec<Revenue>,
    /// REJECTED / (CONFIRMED + REJECTED); null while nothing is settled.
    pub rejection_rate: Option<f64>,
    /// The last 60 minutes, oldest first.
    pub last_hour: Vec<Minute>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StatusCounts {
    #[serde(rename = "PENDING")]
    pub pending: i64,
    #[serde(rename = "CONFIRMED")]
    pub confirmed: i64,
    #[serde(rename = "REJECTED")]
    pub rejected: i64,
    pub total: i64,
}

impl StatusCounts {
    /// Orders by status, counted in the table.
    pub async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let counts = sqlx::query_as::<_, (String, i64)>(
            "SELECT status, count(*) FROM orders GROUP BY status",
        )
        .fetch_all(pool)
        .await?;
        let count = |status: &str| {
            counts
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n)
        };
        Ok(Self {
            pending: count("PENDING"),
            confirmed: count("CONFIRMED"),
            rejected: count("REJECTED"),
            total: counts.iter().map(|(_, n)| n).sum(),
        })
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Revenue {
    pub currency: String,
    /// Minor units; may exceed a 64-bit integer.
    #[schema(value_type = i64)]
    pub amount: i128,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Minute {
    /// The minute's start, RFC 3339.
    pub minute: String,
    pub created: i64,
    pub confirmed: i64,
    pub rejected: i64,
}

fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{id}", at.timestamp_micros()))
}

/// The position a cursor names, if it could have come from [`encode_cursor`]: an
/// order's creation time between 1970 and 9999 (a crafted time outside PostgreSQL's
/// range would fail the query) and its id.
fn decode_cursor(raw: &str) -> Option<(DateTime<Utc>, Uuid)> {
    const LATEST_MICROS: i64 = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z
    if raw.len() > 128 {
        return None;
    }
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw).ok()?).ok()?;
    let (micros, id) = text.split_once(':')?;
    let micros: i64 = micros.parse().ok()?;
    if !(0..=LATEST_MICROS).contains(&micros) {
        return None;
    }
    Some((
        DateTime::from_timestamp_micros(micros)?,
        Uuid::parse_str(id).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)), Some((at, id)));
        assert_eq!(decode_cursor("not-a-cursor"), None);
        // Times PostgreSQL cannot hold (chrono can) and negative ones are refused.
        for micros in [i64::MIN, -1, 253_402_300_800_000_000, i64::MAX] {
            let crafted = URL_SAFE_NO_PAD.encode(format!("{micros}:{id}"));
            assert_eq!(decode_cursor(&crafted), None, "{micros}");
        }
    }
}
