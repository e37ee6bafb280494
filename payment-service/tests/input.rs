//! Crafted user ids in paths get a 422 problem naming `userId`, never a 500:
//! PostgreSQL refuses a NUL byte in text with an error, and absurd lengths must not
//! reach the database at all.

mod common;

use serde_json::{Value, json};

#[tokio::test]
async fn crafted_user_ids_are_a_422_naming_user_id() {
    let saga = common::Saga::start().await;
    let base = saga.payments_base();
    let client = reqwest::Client::new();
    let long = "u".repeat(10_000);
    for user in ["%00", "a%00b", "tab%09", long.as_str()] {
        let read = client
            .get(format!("{base}/payments/accounts/{user}"))
            .bearer_auth(saga.admin_token())
            .send()
            .await
            .expect("an answer");
        let deposit = client
            .post(format!("{base}/payments/accounts/{user}/deposits"))
            .bearer_auth(saga.admin_token())
            .json(&json!({"amount": 100, "currency": "EUR"}))
            .send()
            .await
            .expect("an answer");
        for response in [read, deposit] {
            assert_eq!(response.status(), 422, "{}", &user[..user.len().min(20)]);
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let problem: Value = response.json().await.expect("problem");
            assert_eq!(problem["errors"][0]["field"], "userId", "{problem}");
        }
    }
}
