//! The payments API: the caller's account, deposits (the caller's own, or anyone's for
//! an admin), and payments by order.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRef, Path, Query, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::{
    FieldError, Problem,
    auth::{AuthUser, Claims, JwtVerifier},
    money::is_currency,
};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

/// The largest single deposit: ten billion in major units of a two-decimal currency.
pub const MAX_DEPOSIT: i64 = 1_000_000_000_000;
/// The largest balance an account may hold; keeps every sum far from i64's limit.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;

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
        .route("/payments", get(list_payments))
        .route("/payments/accounts/me", get(my_account))
        .route("/payments/accounts/me/deposits", post(deposit_mine))
        .route("/payments/accounts/{user_id}", get(account_of))
        .route("/payments/accounts/{user_id}/deposits", post(deposit_for))
        .with_state(api)
}

fn internal(e: sqlx::Error) -> Problem {
    shared::db::problem("The payment database", e)
}

/// A customer's account: one currency, set by the first deposit.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub user_id: String,
    /// Minor units.
    pub balance: i64,
    #[schema(example = "EUR")]
    pub currency: String,
}

/// A payment: one per order.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub id: Uuid,
    pub order_id: Uuid,
    pub user_id: String,
    /// Minor units.
    pub amount: i64,
    pub currency: String,
    /// `VALIDATED` or `DECLINED`.
    #[schema(example = "VALIDATED")]
    pub status: String,
    /// Why it was declined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_at: String,
}

/// `GET /payments`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PaymentList {
    pub items: Vec<Payment>,
}

fn account_json(row: &PgRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        user_id: row.try_get("user_id")?,
        balance: row.try_get("balance")?,
        currency: row.try_get("currency")?,
    })
}

async fn account(api: &Api, user: &str) -> Result<Json<Account>, Problem> {
    let row = sqlx::query("SELECT user_id, balance, currency FROM accounts WHERE user_id = $1")
        .bind(user)
        .fetch_optional(&api.pool)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            Problem::not_found(format!(
                "{user} has no account yet; the first deposit opens one."
            ))
        })?;
    Ok(Json(account_json(&row).map_err(internal)?))
}

/// `GET /payments/accounts/me`.
#[utoipa::path(get, path = "/payments/accounts/me", tag = "payments",
    responses(
        (status = 200, body = Account),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No account yet: the first deposit opens one", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn my_account(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
) -> Result<Json<Account>, Problem> {
    account(&api, &claims.sub).await
}

/// `GET /payments/accounts/{userId}`: admins only.
#[utoipa::path(get, path = "/payments/accounts/{userId}", tag = "payments",
    params(("userId" = String, Path)),
    responses(
        (status = 200, body = Account),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A userId that no account can have", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn account_of(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Path(user): Path<String>,
) -> Result<Json<Account>, Problem> {
    require_admin(&claims)?;
    shared::http::text_path_param("userId", &user, 255)?;
    account(&api, &user).await
}

fn require_admin(claims: &Claims) -> Result<(), Problem> {
    if claims.is_admin() {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "Only an admin may read or fund another user's account; use /payments/accounts/me.",
        ))
    }
}

/// The body of a deposit. Numbers are read wide so out-of-range values get our message.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    /// 1 to 10^12 minor units.
    #[schema(example = 5000, minimum = 1, maximum = 1_000_000_000_000_i64)]
    pub amount: i64,
    /// The account's currency (the first deposit sets it).
    #[schema(example = "EUR", pattern = "^[A-Z]{3}$")]
    pub currency: String,
}

impl DepositRequest {
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if !(1..=MAX_DEPOSIT).contains(&self.amount) {
            errors.push(FieldError::new(
                "amount",
                format!("must be 1 to {MAX_DEPOSIT} minor units (cents)"),
            ));
        }
        if !is_currency(&self.currency) {
            let upper = self.currency.to_ascii_uppercase();
            let message = if is_currency(&upper) {
                format!("must be upper case: {upper}")
            } else {
                "must be an ISO 4217 currency code, e.g. EUR".to_owned()
            };
            errors.push(FieldError::new("currency", message));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// `POST /payments/accounts/me/deposits`.
#[utoipa::path(post, path = "/payments/accounts/me/deposits", tag = "payments",
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "A retried deposit with the same key counts once")),
    request_body = DepositRequest,
    responses(
        (status = 200, description = "The account after the deposit", body = Account),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, another currency than the account's, the balance limit, or a reused key", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn deposit_mine(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    headers: HeaderMap,
    shared::http::Json(body): shared::http::Json<DepositRequest>,
) -> Result<Json<Account>, Problem> {
    let user = claims.sub.clone();
    deposit(&api, &claims, &user, &headers, body).await
}

/// `POST /payments/accounts/{userId}/deposits`: admins only.
#[utoipa::path(post, path = "/payments/accounts/{userId}/deposits", tag = "payments",
    params(("userId" = String, Path), ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "A retried deposit with the same key counts once")),
    request_body = DepositRequest,
    responses(
        (status = 200, description = "The account after the deposit", body = Account),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin, for another user's account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, another currency than the account's, the balance limit, or a reused key", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn deposit_for(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Path(user): Path<String>,
    headers: HeaderMap,
    shared::http::Json(body): shared::http::Json<DepositRequest>,
) -> Result<Json<Account>, Problem> {
    if user != claims.sub {
        require_admin(&claims)?;
    }
    shared::http::text_path_param("userId", &user, 255)?;
    deposit(&api, &claims, &user, &headers, body).await
}

/// Adds funds, opening the account in the deposit's currency on the first one. With an
/// `Idempotency-Key`, a retried deposit is counted once.
async fn deposit(
    api: &Api,
    caller: &Claims,
    user: &str,
    headers: &HeaderMap,
    body: DepositRequest,
) -> Result<Json<Account>, Problem> {
    body.validate().map_err(Problem::validation)?;
    let key = shared::http::idempotency_key(headers)?;
    let mut tx = api.pool.begin().await.map_err(internal)?;
    sqlx::query(
        "INSERT INTO accounts (user_id, balance, currency) VALUES ($1, 0, $2) \
         ON CONFLICT (user_id) DO NOTHING",
    )
    .bind(user)
    .bind(&body.currency)
    .execute(&mut *tx)
    .await
    .map_err(internal)?;
    let row = sqlx::query("SELECT balance, currency FROM accounts WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .fetch_one(&mut *tx)
        .await
        .map_err(internal)?;
    let balance: i64 = row.try_get("balance").map_err(internal)?;
    let currency: String = row.try_get("currency").map_err(internal)?;

    if let Some(key) = &key
        && let Some(()) = used_key(&mut tx, &caller.sub, key, user, &body).await?
    {
        // Already counted: answer with the account as it is.
        tx.commit().await.map_err(internal)?;
        return account(api, user).await;
    }

    if currency != body.currency {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "The account of {user} holds {currency}; deposit {currency}, not {}.",
                body.currency
            ),
        )
        .with_type("/problems/currency-mismatch")
        .with_errors(vec![FieldError::new(
            "currency",
            format!("must be {currency}, the account's currency"),
        )]));
    }
    if balance > MAX_BALANCE - body.amount {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("A balance may not exceed {MAX_BALANCE} minor units."),
        )
        .with_type("/problems/balance-limit"));
    }
    // A concurrent deposit with the same key (for another account: this one's is
    // locked) may have committed since the look above: the insert then waits for it
    // and does nothing, and the key's deposit answers as above.
    let inserted = sqlx::query(
        "INSERT INTO deposits (id, user_id, amount, currency, made_by, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (made_by, idempotency_key) DO NOTHING RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(user)
    .bind(body.amount)
    .bind(&body.currency)
    .bind(&caller.sub)
    .bind(&key)
    .fetch_optional(&mut *tx)
    .await
    .map_err(internal)?;
    if inserted.is_none() {
        let used = match &key {
            Some(key) => used_key(&mut tx, &caller.sub, key, user, &body).await?,
            None => None,
        };
        return match used {
            Some(()) => {
                tx.commit().await.map_err(internal)?;
                account(api, user).await
            }
            None => Err(internal(sqlx::Error::Protocol(
                "a deposit's key conflicted with no deposit".into(),
            ))),
        };
    }
    let row = sqlx::query(
        "UPDATE accounts SET balance = balance + $2, updated_at = now() WHERE user_id = $1 \
         RETURNING user_id, balance, currency",
    )
    .bind(user)
    .bind(body.amount)
    .fetch_one(&mut *tx)
    .await
    .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    metrics::counter!("deposits_total").increment(1);
    Ok(Json(account_json(&row).map_err(internal)?))
}

/// What `key` already did for `made_by`: `Some` when it made this very deposit (the
/// retry is answered with the account), a 422 when it made another, `None` when it
/// is unused.
async fn used_key(
    tx: &mut sqlx::PgConnection,
    made_by: &str,
    key: &str,
    user: &str,
    body: &DepositRequest,
) -> Result<Option<()>, Problem> {
    let previous = sqlx::query(
        "SELECT user_id, amount, currency FROM deposits WHERE made_by = $1 AND idempotency_key = $2",
    )
    .bind(made_by)
    .bind(key)
    .fetch_optional(tx)
    .await
    .map_err(internal)?;
    let Some(previous) = previous else {
        return Ok(None);
    };
    let same = previous.try_get::<String, _>("user_id").map_err(internal)? == user
        && previous.try_get::<i64, _>("amount").map_err(internal)? == body.amount
        && previous
            .try_get::<String, _>("currency")
            .map_err(internal)?
            == body.currency;
    if !same {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "This Idempotency-Key was already used with a different deposit; use a new key.",
        )
        .with_type("/problems/idempotency-key-reused"));
    }
    Ok(Some(()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ListParams {
    order_id: Option<String>,
    limit: Option<String>,
}

fn payment_json(row: &PgRow) -> Result<Payment, sqlx::Error> {
    let created: DateTime<Utc> = row.try_get("created_at")?;
    Ok(Payment {
        id: row.try_get("id")?,
        order_id: row.try_get("order_id")?,
        user_id: row.try_get("user_id")?,
        amount: row.try_get("amount")?,
        currency: row.try_get("currency")?,
        status: row.try_get("status")?,
        reason: row.try_get("reason")?,
        created_at: created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// `GET /payments?orderId=&limit=`: the caller's payments (anyone's for an admin),
/// newest first; with `orderId`, that order's payment.
#[utoipa::path(get, path = "/payments", tag = "payments",
    params(
        ("orderId" = Option<uuid::Uuid>, Query, description = "Only this order's payment"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "1 to 100, default 50"),
    ),
    responses(
        (status = 200, body = PaymentList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad parameter, named", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list_payments(
    State(api): State<Api>,
    AuthUser(claims): AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<PaymentList>, Problem> {
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
        "SELECT id, order_id, user_id, amount, currency, status, reason, created_at FROM payments \
         WHERE ($1::text IS NULL OR user_id = $1) AND ($2::uuid IS NULL OR order_id = $2) \
         ORDER BY created_at DESC, id DESC LIMIT $3",
    )
    .bind(owner)
    .bind(order)
    .bind(limit)
    .fetch_all(&api.pool)
    .await
    .map_err(internal)?;
    let items = rows
        .iter()
        .map(payment_json)
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    Ok(Json(PaymentList { items }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposits_name_every_bad_field() {
        let bad = DepositRequest {
            amount: 0,
            currency: "eur".into(),
        };
        let errors = bad.validate().unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(errors[1].message.contains("EUR"));
        let too_big = DepositRequest {
            amount: MAX_DEPOSIT + 1,
            currency: "EUR".into(),
        };
        assert_eq!(too_big.validate().unwrap_err()[0].field, "amount");
    }
}
