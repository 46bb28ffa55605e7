//! Validated newtypes. A value of one of these types exists only if it passed its `parse`, so the
//! engine and the handlers never check it again (API.md gives the rules).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a raw value was refused. The message is shown to API users, so it names the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidValue {
    /// The field whose value was refused (`sku`, `quantity`, ...).
    pub field: &'static str,
    /// What rule the value broke, in words a user can act on.
    pub reason: String,
}

impl InvalidValue {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks the id rule shared by SKUs, cart ids, customer ids and order ids: 1–128 visible ASCII
/// characters without `/` (so every id can stand in a URL path segment).
fn check_id(field: &'static str, raw: &str) -> Result<(), InvalidValue> {
    if raw.is_empty() {
        return Err(InvalidValue::new(field, "must not be empty"));
    }
    if raw.len() > 128 {
        return Err(InvalidValue::new(field, "must be at most 128 characters"));
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(InvalidValue::new(
            field,
            "must be visible ASCII characters without '/'",
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Accepts 1–128 visible ASCII characters without `/`.
            pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidValue> {
                let raw = raw.into();
                check_id($field, &raw)?;
                Ok(Self(raw))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(raw: String) -> Result<Self, InvalidValue> {
                Self::parse(raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A stock-keeping unit: the id of a product.
    Sku,
    "sku"
);
id_type!(
    /// The buyer an order belongs to.
    CustomerId,
    "customer_id"
);
id_type!(
    /// The id of an order, chosen by the server.
    OrderId,
    "order_id"
);
id_type!(
    /// The id of a cart (a session), chosen by the server.
    CartId,
    "cart_id"
);

/// The most units one checkout line may ask for (API.md).
pub const QUANTITY_MAX: i64 = 1_000_000;

/// The most units the shop may own of one SKU. Bounded so that no sum of stock counters can overflow
/// an `i64`, whatever the number of shards or of orders.
pub const STOCK_MAX: i64 = 1 << 40;

/// The largest unit price accepted: with 100 lines × 1,000,000 units the total stays below 2^63,
/// and JSON clients that read numbers as doubles see exact values.
pub const PRICE_CENTS_MAX: i64 = 1 << 36;

macro_rules! bounded_int {
    ($(#[$doc:meta])* $name:ident, $field:literal, $min:expr, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "i64", into = "i64")]
        pub struct $name(i64);

        impl $name {
            /// Accepts values from the minimum to the maximum, both included.
            pub fn parse(raw: i64) -> Result<Self, InvalidValue> {
                if ($min..=$max).contains(&raw) {
                    Ok(Self(raw))
                } else {
                    Err(InvalidValue::new(
                        $field,
                        format!("must be between {} and {}", $min, $max),
                    ))
                }
            }

            /// The value.
            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl TryFrom<i64> for $name {
            type Error = InvalidValue;
            fn try_from(raw: i64) -> Result<Self, InvalidValue> {
                Self::parse(raw)
            }
        }

        impl From<$name> for i64 {
            fn from(value: $name) -> i64 {
                value.0
            }
        }
    };
}

bounded_int!(
    /// Units of one SKU in one checkout line: 1..=1,000,000.
    Quantity,
    "quantity",
    1,
    QUANTITY_MAX
);
bounded_int!(
    /// Units the shop owns of one SKU (available, held and sold together): 0..=2^40.
    Stock,
    "stock",
    0,
    STOCK_MAX
);
bounded_int!(
    /// A unit price in minor units (cents): 0..=2^36. Totals are computed, not parsed.
    Cents,
    "price_cents",
    0,
    PRICE_CENTS_MAX
);

/// An ISO-4217-style currency code: three upper-case ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Accepts exactly three upper-case ASCII letters.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let bytes = raw.as_bytes();
        if bytes.len() == 3 && bytes.iter().all(u8::is_ascii_uppercase) {
            Ok(Self([bytes[0], bytes[1], bytes[2]]))
        } else {
            Err(InvalidValue::new(
                "currency",
                "must be three upper-case letters",
            ))
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // The constructor admits only ASCII upper-case letters, which are valid UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl TryFrom<String> for Currency {
    type Error = InvalidValue;
    fn try_from(raw: String) -> Result<Self, InvalidValue> {
        Self::parse(&raw)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client's `Idempotency-Key`: 1–255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Accepts 1–255 visible ASCII characters.
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidValue> {
        let raw = raw.into();
        if raw.is_empty() || raw.len() > 255 {
            return Err(InvalidValue::new(
                "Idempotency-Key",
                "must be 1 to 255 characters",
            ));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidValue::new(
                "Idempotency-Key",
                "must be visible ASCII characters",
            ));
        }
        Ok(Self(raw))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = InvalidValue;
    fn try_from(raw: String) -> Result<Self, InvalidValue> {
        Self::parse(raw)
    }
}

impl From<IdempotencyKey> for String {
    fn from(k: IdempotencyKey) -> String {
        k.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_api_rule() {
        assert!(Sku::parse("A-1").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("a/b").is_err());
        assert!(Sku::parse("a b").is_err());
        assert!(Sku::parse("x".repeat(128)).is_ok());
        assert!(Sku::parse("x".repeat(129)).is_err());
        assert!(Sku::parse("é").is_err());
    }

    #[test]
    fn numbers_are_bounded() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(1).is_ok());
        assert!(Quantity::parse(1_000_000).is_ok());
        assert!(Quantity::parse(1_000_001).is_err());
        assert!(Stock::parse(-1).is_err());
        assert!(Stock::parse(0).is_ok());
        assert!(Cents::parse(-1).is_err());
        assert!(Currency::parse("EUR").is_ok());
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("EURO").is_err());
        assert!(IdempotencyKey::parse("k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse("k".repeat(256)).is_err());
    }

    #[test]
    fn serde_refuses_invalid_values() {
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert!(serde_json::from_str::<Sku>("\"a/b\"").is_err());
        let sku: Sku = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(serde_json::to_string(&sku).unwrap(), "\"abc\"");
    }
}
