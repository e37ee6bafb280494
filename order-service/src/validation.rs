//! What makes an order request valid, field by field, so a client learns every
//! mistake at once.

use serde::Deserialize;
use shared::FieldError;

/// The body of `POST /orders`. There is no owner field: the owner is the token's `sub`,
/// and a body that names one is refused (unknown field) rather than ignored.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateOrder {
    /// 1 to 100 lines.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<ItemRequest>,
    /// An ISO 4217 code, upper case.
    #[schema(example = "EUR", pattern = "^[A-Z]{3}$")]
    pub currency: String,
}

/// One line as sent. Numbers are read wide so out-of-range values get our message.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ItemRequest {
    /// 1 to 64 letters, digits, `-` and `_`.
    #[schema(example = "BOOK-1", pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub sku: String,
    /// 1 to 1000.
    #[schema(example = 2, minimum = 1, maximum = 1000)]
    pub quantity: i64,
    /// 1 to 10^9 minor units.
    #[schema(example = 1250, minimum = 1, maximum = 1_000_000_000)]
    pub unit_price: i64,
}

/// A validated line, as stored and published.
pub use shared::events::OrderItem as Item;

/// A validated order request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidOrder {
    pub items: Vec<Item>,
    pub currency: String,
    /// Sum of quantity × unit price, in minor units.
    pub total: i64,
}

pub const MAX_ITEMS: usize = 100;
pub const MAX_QUANTITY: i64 = 1000;
pub const MAX_UNIT_PRICE: i64 = 1_000_000_000;

pub use shared::money::is_currency;

fn valid_sku(sku: &str) -> bool {
    (1..=64).contains(&sku.len())
        && sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl CreateOrder {
    /// Checks every field; all mistakes are reported together.
    pub fn validate(self) -> Result<ValidOrder, Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.items.is_empty() || self.items.len() > MAX_ITEMS {
            errors.push(FieldError::new(
                "items",
                format!("must hold 1 to {MAX_ITEMS} items"),
            ));
        }
        let mut total: Option<i64> = Some(0);
        for (i, item) in self.items.iter().enumerate() {
            if !valid_sku(&item.sku) {
                errors.push(FieldError::new(
                    format!("items[{i}].sku"),
                    "must be 1 to 64 letters, digits, '-' or '_'",
                ));
            }
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                errors.push(FieldError::new(
                    format!("items[{i}].quantity"),
                    format!("must be 1 to {MAX_QUANTITY}"),
                ));
            }
            if !(1..=MAX_UNIT_PRICE).contains(&item.unit_price) {
                errors.push(FieldError::new(
                    format!("items[{i}].unitPrice"),
                    format!("must be 1 to {MAX_UNIT_PRICE} minor units (cents)"),
                ));
            }
            total = total.and_then(|t| {
                item.quantity
                    .checked_mul(item.unit_price)
                    .and_then(|line| t.checked_add(line))
            });
        }
        if total.is_none() {
            errors.push(FieldError::new(
                "items",
                "the total overflows: split the order",
            ));
        }
        if !is_currency(&self.currency) {
            let hint = if is_currency(&self.currency.to_ascii_uppercase()) {
                format!("must be upper case: {}", self.currency.to_ascii_uppercase())
            } else {
                "must be an ISO 4217 currency code such as EUR".to_owned()
            };
            errors.push(FieldError::new("currency", hint));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ValidOrder {
            items: self
                .items
                .into_iter()
                .map(|i| Item {
                    sku: i.sku,
                    quantity: i.quantity,
                    unit_price: i.unit_price,
                })
                .collect(),
            currency: self.currency,
            total: total.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(items: Vec<(&str, i64, i64)>, currency: &str) -> CreateOrder {
        CreateOrder {
            items: items
                .into_iter()
                .map(|(sku, quantity, unit_price)| ItemRequest {
                    sku: sku.into(),
                    quantity,
                    unit_price,
                })
                .collect(),
            currency: currency.into(),
        }
    }

    fn fields(result: Result<ValidOrder, Vec<FieldError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_good_order_totals_its_lines() {
        let valid = order(vec![("BOOK-1", 2, 1250), ("pen_2", 1, 199)], "EUR")
            .validate()
            .unwrap();
        assert_eq!(valid.total, 2699);
    }

    #[test]
    fn every_rule_names_its_field() {
        assert_eq!(fields(order(vec![], "EUR").validate()), ["items"]);
        let too_many = vec![("A", 1, 1); 101];
        assert_eq!(fields(order(too_many, "EUR").validate()), ["items"]);
        let bad = order(
            vec![
                ("", 0, 0),
                ("has space", 1001, 1_000_000_001),
                (&"x".repeat(65), 1, 1),
            ],
            "EUR",
        );
        assert_eq!(
            fields(bad.validate()),
            [
                "items[0].sku",
                "items[0].quantity",
                "items[0].unitPrice",
                "items[1].sku",
                "items[1].quantity",
                "items[1].unitPrice",
                "items[2].sku"
            ]
        );
        assert_eq!(
            fields(order(vec![("A", 1, 1)], "EURO").validate()),
            ["currency"]
        );
        assert_eq!(
            fields(order(vec![("A", 1, 1)], "XAU").validate()),
            ["currency"]
        );
        let lower = order(vec![("A", 1, 1)], "eur").validate().unwrap_err();
        assert!(lower[0].message.contains("EUR"), "{lower:?}");
    }

    #[test]
    fn the_largest_legal_order_totals_exactly() {
        // 100 lines of 1000 × 10^9: 10^14 minor units, far inside i64; the checked
        // arithmetic guards against future, larger limits.
        let lines = vec![("A", MAX_QUANTITY, MAX_UNIT_PRICE); MAX_ITEMS];
        assert_eq!(
            order(lines, "EUR").validate().unwrap().total,
            100_000_000_000_000
        );
    }
}
