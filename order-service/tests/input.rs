//! Crafted input gets a 4xx problem that says what to fix, never a 500: cursors
//! holding times PostgreSQL cannot store, absurd path parameters, overflowing limits,
//! and revenue sums past 64 bits.

mod common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::spawn;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    response.json().await.expect("problem")
}

#[tokio::test]
async fn crafted_cursors_and_limits_are_a_422_naming_the_parameter() {
    let s = spawn().await;
    let token = s.token("alice", &["customer"]);
    let id = uuid::Uuid::new_v4();
    // Before the fix, a time chrono accepts but PostgreSQL does not (about 93,000 BC)
    // reached the query and came back as a 500.
    for micros in [
        i64::MIN,
        -3_000_000_000_000_000_000,
        253_402_300_800_000_000,
    ] {
        let cursor = URL_SAFE_NO_PAD.encode(format!("{micros}:{id}"));
        let body = problem(
            s.get(&format!("/orders?cursor={cursor}"), &token).await,
            422,
        )
        .await;
        assert_eq!(body["errors"][0]["field"], "cursor", "{body}");
    }
    for limit in ["99999999999999999999999", "-1", "0", "1e3"] {
        let body = problem(s.get(&format!("/orders?limit={limit}"), &token).await, 422).await;
        assert_eq!(body["errors"][0]["field"], "limit", "{body}");
    }
}

#[tokio::test]
async fn absurd_order_ids_are_a_short_404() {
    let s = spawn().await;
    let token = s.token("alice", &["customer"]);
    let long = "x".repeat(20_000);
    for id in ["%00", "a%00b", long.as_str()] {
        let body = problem(s.get(&format!("/orders/{id}"), &token).await, 404).await;
        let detail = body["detail"].as_str().expect("detail");
        assert!(
            detail.len() < 200,
            "the detail echoes the id whole: {detail}"
        );
        assert!(!detail.contains('\0'), "{detail:?}");
    }
}

#[tokio::test]
async fn revenue_past_64_bits_is_reported_not_a_500() {
    let s = spawn().await;
    let order =
        json!({"items": [{"sku": "A", "quantity": 1, "unitPrice": 100}], "currency": "EUR"});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let created: Value = s
            .post("alice", &order, None)
            .await
            .json()
            .await
            .expect("json");
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    // Two confirmed orders near the largest bigint: their sum does not fit one.
    let mut db = PgConnection::connect(&s.database).await.expect("connect");
    for id in &ids {
        sqlx::query(
            "UPDATE orders.orders SET status = 'CONFIRMED', total = $2, updated_at = now() \
             WHERE id = $1::uuid",
        )
        .bind(id)
        .bind(i64::MAX - 1)
        .execute(&mut db)
        .await
        .expect("settle");
    }
    let response = s.get("/orders/stats", &s.token("root", &["admin"])).await;
    assert_eq!(response.status(), 200);
    let stats: Value = response.json().await.expect("json");
    let expected = 2 * (i64::MAX as u64 - 1);
    assert_eq!(
        stats["confirmedRevenue"],
        json!([{"currency": "EUR", "amount": expected}])
    );
}
