//! The events of the public contract, as they travel on Kafka: JSON in UTF-8, key =
//! the order id, headers `event-type` and (when known) `traceparent` and
//! `x-request-id`.
//!
//! Parsing checks more than the shape: an event whose values no consumer could act on
//! (a non-positive amount, an unknown currency, the wrong `eventType` for its topic)
//! is refused with a message that says why, and the consumer dead-letters it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::is_currency;

/// The header naming an event's type.
pub const EVENT_TYPE_HEADER: &str = "event-type";
/// The W3C trace context header, carried from the request that caused the event.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The id of the request that caused the event (its `X-Request-Id`), carried on so
/// every log line of the saga names it.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub const ORDER_CREATED: &str = "order-created";
pub const PAYMENT_VALIDATED: &str = "payment-validated";
pub const PAYMENT_DECLINED: &str = "payment-declined";

/// The topics the store's events travel on; configurable so a second stack (or a test)
/// can share a broker. Dead letters go to `<topic>.DLT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    pub orders: String,
    pub payment_results: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            orders: "order-topic".into(),
            payment_results: "payment-result-topic".into(),
        }
    }
}

/// The dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.DLT")
}

/// One order line; `unitPrice` in minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    pub sku: String,
    pub quantity: i64,
    pub unit_price: i64,
}

/// `order-created` on the orders topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    pub event_id: Uuid,
    pub event_type: String,
    pub occurred_at: String,
    pub order_id: Uuid,
    pub user_id: String,
    pub items: Vec<OrderItem>,
    pub total: i64,
    pub currency: String,
}

impl OrderCreated {
    /// Parses and checks an event from the orders topic.
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let event: Self = parse_json(payload)?;
        if event.event_type != ORDER_CREATED {
            return Err(format!(
                "eventType is `{}`, expected `{ORDER_CREATED}`",
                event.event_type
            ));
        }
        check_common(&event.user_id, event.total, &event.currency, "total")?;
        // The total must be what the items add up to: a payment is taken for the total,
        // so an event whose total disagrees with its lines is refused, not charged.
        let sum = event.items.iter().try_fold(0i64, |sum, item| {
            item.quantity
                .checked_mul(item.unit_price)
                .and_then(|line| sum.checked_add(line))
        });
        if sum != Some(event.total) {
            return Err(match sum {
                Some(sum) => format!(
                    "total {} is not the sum of the items' quantity x unitPrice ({sum})",
                    event.total
                ),
                None => "the items' quantity x unitPrice overflows".into(),
            });
        }
        Ok(event)
    }
}

/// `payment-validated` or `payment-declined` on the payment results topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentResult {
    pub event_id: Uuid,
    pub event_type: String,
    pub occurred_at: String,
    pub order_id: Uuid,
    pub user_id: String,
    pub amount: i64,
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl PaymentResult {
    /// Parses and checks an event from the payment results topic.
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let event: Self = parse_json(payload)?;
        if event.event_type != PAYMENT_VALIDATED && event.event_type != PAYMENT_DECLINED {
            return Err(format!(
                "eventType is `{}`, expected `{PAYMENT_VALIDATED}` or `{PAYMENT_DECLINED}`",
                event.event_type
            ));
        }
        check_common(&event.user_id, event.amount, &event.currency, "amount")?;
        Ok(event)
    }

    pub fn validated(&self) -> bool {
        self.event_type == PAYMENT_VALIDATED
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(payload);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("not a valid event: {}", e.inner())
        } else {
            format!("not a valid event: {path}: {}", e.inner())
        }
    })
}

fn check_common(user: &str, amount: i64, currency: &str, amount_field: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("userId is empty".into());
    }
    // A token's subject: what the services store it in (an indexed text column)
    // takes no more, and a NUL not at all.
    if !crate::auth::valid_subject(user) {
        return Err("userId must be at most 255 characters, without control characters".into());
    }
    if amount <= 0 {
        return Err(format!("{amount_field} must be positive, is {amount}"));
    }
    if !is_currency(currency) {
        return Err(format!("currency `{currency}` is not an ISO 4217 code"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order() -> serde_json::Value {
        json!({
            "eventId": Uuid::nil(), "eventType": "order-created",
            "occurredAt": "2026-01-01T00:00:00.000Z", "orderId": Uuid::nil(),
            "userId": "alice", "items": [{"sku": "A", "quantity": 1, "unitPrice": 5}],
            "total": 5, "currency": "EUR"
        })
    }

    #[test]
    fn a_user_id_no_token_could_carry_is_refused() {
        for user in ["a".repeat(256), "al\u{0}ice".to_owned()] {
            let mut event = order();
            event["userId"] = json!(user);
            let error = OrderCreated::parse(event.to_string().as_bytes()).expect_err("refused");
            assert!(error.contains("userId"), "{error}");
        }
    }

    #[test]
    fn a_contract_order_event_parses() {
        let event = OrderCreated::parse(order().to_string().as_bytes()).expect("parses");
        assert_eq!(event.total, 5);
        assert_eq!(event.items[0].unit_price, 5);
    }

    #[test]
    fn unusable_events_are_refused_with_the_reason() {
        let mut bad = order();
        bad["total"] = json!(0);
        let e = OrderCreated::parse(bad.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("total"), "{e}");
        let e = OrderCreated::parse(b"{not json").unwrap_err();
        assert!(e.contains("not a valid event"), "{e}");
        let mut bad = order();
        bad.as_object_mut().unwrap().remove("orderId");
        let e = OrderCreated::parse(bad.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("orderId"), "{e}");
        let mut bad = order();
        bad["eventType"] = json!("payment-validated");
        assert!(OrderCreated::parse(bad.to_string().as_bytes()).is_err());
    }

    #[test]
    fn an_order_whose_total_is_not_its_items_sum_is_refused() {
        let mut bad = order();
        bad["total"] = json!(4);
        let e = OrderCreated::parse(bad.to_string().as_bytes()).unwrap_err();
        assert!(
            e.contains("total 4 is not the sum") && e.contains("(5)"),
            "{e}"
        );
        let mut bad = order();
        bad["items"] = json!([{"sku": "A", "quantity": i64::MAX, "unitPrice": 2}]);
        let e = OrderCreated::parse(bad.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        let mut two = order();
        two["items"] = json!([
            {"sku": "A", "quantity": 2, "unitPrice": 150},
            {"sku": "B", "quantity": 1, "unitPrice": 45}
        ]);
        two["total"] = json!(345);
        assert!(OrderCreated::parse(two.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn results_serialize_without_an_absent_reason() {
        let result = PaymentResult {
            event_id: Uuid::nil(),
            event_type: PAYMENT_VALIDATED.into(),
            occurred_at: "t".into(),
            order_id: Uuid::nil(),
            user_id: "u".into(),
            amount: 1,
            currency: "EUR".into(),
            reason: None,
        };
        let text = serde_json::to_string(&result).unwrap();
        assert!(!text.contains("reason"));
        assert!(PaymentResult::parse(text.as_bytes()).unwrap().validated());
    }

    #[test]
    fn dead_letters_go_to_the_dlt_suffix() {
        assert_eq!(dead_letter_topic("order-topic"), "order-topic.DLT");
    }
}
