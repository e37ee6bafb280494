//! `GET /orders/stats`: what admins see about the store's orders.

mod common;

use common::spawn;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

fn order(total: i64, currency: &str) -> Value {
    json!({"items": [{"sku": "A", "quantity": 1, "unitPrice": total}], "currency": currency})
}

#[tokio::test]
async fn admins_see_counts_revenue_rejection_rate_and_the_last_hour() {
    let s = spawn().await;
    let mut ids = Vec::new();
    for (total, currency) in [
        (1_000, "EUR"),
        (2_000, "EUR"),
        (500, "USD"),
        (700, "EUR"),
        (9, "EUR"),
    ] {
        let created: Value = s
            .post("alice", &order(total, currency), None)
            .await
            .json()
            .await
            .expect("json");
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    // Settle four of them as the payment results would.
    let mut db = PgConnection::connect(&s.database).await.expect("connect");
    for (id, status) in ids
        .iter()
        .zip(["CONFIRMED", "CONFIRMED", "CONFIRMED", "REJECTED"])
    {
        sqlx::query("UPDATE orders.orders SET status = $2, updated_at = now() WHERE id = $1::uuid")
            .bind(id)
            .bind(status)
            .execute(&mut db)
            .await
            .expect("settle");
    }

    let response = s.get("/orders/stats", &s.token("root", &["admin"])).await;
    assert_eq!(response.status(), 200);
    let stats: Value = response.json().await.expect("json");
    assert_eq!(
        stats["counts"],
        json!({"PENDING": 1, "CONFIRMED": 3, "REJECTED": 1, "total": 5})
    );
    assert_eq!(
        stats["confirmedRevenue"],
        json!([{"currency": "EUR", "amount": 3_000}, {"currency": "USD", "amount": 500}])
    );
    assert_eq!(stats["rejectionRate"], json!(0.25));
    let minutes = stats["lastHour"].as_array().expect("series");
    assert_eq!(minutes.len(), 60);
    let sum = |field: &str| {
        minutes
            .iter()
            .map(|m| m[field].as_i64().unwrap_or(0))
            .sum::<i64>()
    };
    assert_eq!(sum("created"), 5);
    assert_eq!(sum("confirmed"), 3);
    assert_eq!(sum("rejected"), 1);
}

#[tokio::test]
async fn customers_may_not_read_the_stats() {
    let s = spawn().await;
    let response = s
        .get("/orders/stats", &s.token("alice", &["customer"]))
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}
