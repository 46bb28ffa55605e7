//! The bytes of a journal record: a compact binary form, written by both journals.
//!
//! A record is written once per change and read only at recovery (and by the MySQL applier), so
//! its size is what the commit path pays for: the file journal's bytes per fsync, MySQL's redo log
//! and row bytes per order. The JSON form this replaced spent about half of a typical order record
//! on field names; this form spends nothing on them.
//!
//! Format (version 1): the byte `0x01`, then the record's kind (`0` product, `1` order, `2`
//! payments, `3` adopted orders, `4` orders adopted away, `5` a product with limits: a product's
//! fields, then a flags byte saying which limits follow, `max_per_customer` as bit 0,
//! `admission_rate` as bit 1, each a varint in bit order), then its
//! fields in a fixed order. A product without limits is still written as kind `0`, byte for byte
//! as before. Integers are LEB128 varints (signed ones zigzag);
//! strings are a varint length then UTF-8 bytes; statuses are one byte each. In an order record the
//! times are stored relative to the record's `at_ms` (they are usually equal or close), and a
//! fingerprint of 32 or 64 lowercase hex digits (the xxh3-128 ones, or the SHA-256 ones of earlier
//! versions: `engine::idempotency::Fingerprint`) is packed into its 16 or 32 bytes.
//!
//! Reading also accepts the JSON form (a record starting with `{`): journals written by earlier
//! versions keep working, file segments and MySQL's `journal.record` alike. Every length is
//! checked against the bytes that remain and every value goes through the domain types' own
//! checks, so bad bytes are an error, never a panic or a huge allocation.

use super::order::{Order, OrderItem, OrderStatus, PaymentDue};
use super::records::{Product, Record, SettledPayment, StoredAnswer};
use crate::domain::{Cents, Currency, CustomerId, IdempotencyKey, OrderId, Sku, Stock};

/// The first byte of a record in the binary form (JSON starts with `{`).
const VERSION_1: u8 = 0x01;

const KIND_PRODUCT: u8 = 0;
const KIND_ORDER: u8 = 1;
const KIND_PAYMENTS: u8 = 2;
const KIND_ADOPTED: u8 = 3;
const KIND_ADOPTED_AWAY: u8 = 4;
const KIND_PRODUCT_LIMITS: u8 = 5;

// Flags of a product with limits: which limits follow.
const HAS_MAX_PER_CUSTOMER: u8 = 1;
const HAS_ADMISSION_RATE: u8 = 2;
const KNOWN_PRODUCT_FLAGS: u8 = HAS_MAX_PER_CUSTOMER | HAS_ADMISSION_RATE;

// Flags of an order record: which optional parts follow.
const HAS_PAYMENT_ID: u8 = 1;
const HAS_PAYMENT_DUE: u8 = 1 << 1;
const HAS_PREVIOUS: u8 = 1 << 2;
const HAS_ANSWER: u8 = 1 << 3;
const REPLACES_EXPIRED_KEY: u8 = 1 << 4;
const KNOWN_FLAGS: u8 = (1 << 5) - 1;

// How a fingerprint is stored.
const FINGERPRINT_TEXT: u8 = 0;
const FINGERPRINT_HEX32: u8 = 1;
const FINGERPRINT_HEX16: u8 = 2;

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

impl DecodeError {
    fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// The bytes a journal stores for `record`.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(VERSION_1);
    match record {
        Record::Product { product } => {
            let mut flags = 0;
            if product.max_per_customer.is_some() {
                flags |= HAS_MAX_PER_CUSTOMER;
            }
            if product.admission_rate.is_some() {
                flags |= HAS_ADMISSION_RATE;
            }
            let limited = flags != 0;
            out.push(if limited {
                KIND_PRODUCT_LIMITS
            } else {
                KIND_PRODUCT
            });
            put_str(&mut out, product.sku.as_str());
            put_str(&mut out, &product.name);
            put_i64(&mut out, product.price_cents.get());
            out.extend_from_slice(product.currency.as_str().as_bytes());
            put_i64(&mut out, product.stock.get());
            if limited {
                out.push(flags);
            }
            for limit in [product.max_per_customer, product.admission_rate]
                .into_iter()
                .flatten()
            {
                put_u64(&mut out, u64::from(limit));
            }
        }
        Record::Order {
            order,
            previous,
            entered,
            at_ms,
            answer,
            replaces_expired_key,
        } => {
            out.push(KIND_ORDER);
            let mut flags = order_flags(order);
            if previous.is_some() {
                flags |= HAS_PREVIOUS;
            }
            if answer.is_some() {
                flags |= HAS_ANSWER;
            }
            if *replaces_expired_key {
                flags |= REPLACES_EXPIRED_KEY;
            }
            out.push(flags);
            put_i64(&mut out, *at_ms);
            put_order(&mut out, order, *at_ms);
            if let Some(previous) = previous {
                out.push(status_byte(*previous));
            }
            put_u64(&mut out, entered.len() as u64);
            out.extend(entered.iter().map(|s| status_byte(*s)));
            if let Some((key, stored)) = answer {
                put_str(&mut out, key.as_str());
                put_fingerprint(&mut out, &stored.fingerprint);
                put_u64(&mut out, u64::from(stored.status));
                put_str(&mut out, &stored.body);
                put_i64(&mut out, stored.at_ms.wrapping_sub(*at_ms));
            }
        }
        Record::Payments { settled, at_ms } => {
            out.push(KIND_PAYMENTS);
            put_i64(&mut out, *at_ms);
            put_u64(&mut out, settled.len() as u64);
            for entry in settled {
                put_str(&mut out, entry.order_id.as_str());
                out.push(status_byte(entry.status));
                let flags = u8::from(entry.payment_id.is_some())
                    | u8::from(entry.payment_due.is_some()) << 1;
                out.push(flags);
                if let Some(payment_id) = &entry.payment_id {
                    put_str(&mut out, payment_id);
                }
                if let Some(due) = entry.payment_due {
                    out.push(due_byte(due));
                }
            }
        }
        Record::Adopted {
            from,
            orders,
            at_ms,
        } => {
            out.push(KIND_ADOPTED);
            put_i64(&mut out, *at_ms);
            put_str(&mut out, from);
            put_u64(&mut out, orders.len() as u64);
            for order in orders {
                out.push(order_flags(order));
                put_order(&mut out, order, *at_ms);
            }
        }
        Record::AdoptedAway { orders, at_ms } => {
            out.push(KIND_ADOPTED_AWAY);
            put_i64(&mut out, *at_ms);
            put_u64(&mut out, orders.len() as u64);
            for order_id in orders {
                put_str(&mut out, order_id.as_str());
            }
        }
    }
    out
}

/// The flags of an order's optional parts.
fn order_flags(order: &Order) -> u8 {
    let mut flags = 0;
    if order.payment_id.is_some() {
        flags |= HAS_PAYMENT_ID;
    }
    if order.payment_due.is_some() {
        flags |= HAS_PAYMENT_DUE;
    }
    flags
}

/// An order's fields (its optional parts as [`order_flags`] says), times relative to `at_ms`.
fn put_order(out: &mut Vec<u8>, order: &Order, at_ms: i64) {
    put_str(out, order.order_id.as_str());
    out.push(status_byte(order.status));
    put_str(out, order.customer_id.as_str());
    put_u64(out, order.items.len() as u64);
    for item in &order.items {
        put_str(out, item.sku.as_str());
        put_i64(out, item.quantity);
        put_i64(out, item.unit_price_cents.get());
    }
    put_i64(out, order.total_cents);
    out.extend_from_slice(order.currency.as_str().as_bytes());
    put_i64(out, order.created_at_ms.wrapping_sub(at_ms));
    put_i64(
        out,
        order.hold_deadline_ms.wrapping_sub(order.created_at_ms),
    );
    if let Some(payment_id) = &order.payment_id {
        put_str(out, payment_id);
    }
    if let Some(due) = order.payment_due {
        out.push(due_byte(due));
    }
}

/// The record in `bytes` (either form).
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    match bytes.first() {
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| DecodeError::new(e.to_string())),
        Some(&VERSION_1) => {
            let mut reader = Reader { rest: &bytes[1..] };
            let record = reader.record()?;
            if !reader.rest.is_empty() {
                return Err(DecodeError::new(format!(
                    "{} bytes after the record",
                    reader.rest.len()
                )));
            }
            Ok(record)
        }
        Some(other) => Err(DecodeError::new(format!(
            "unknown record format (first byte {other:#04x})"
        ))),
        None => Err(DecodeError::new("an empty record")),
    }
}

fn status_byte(status: OrderStatus) -> u8 {
    match status {
        OrderStatus::Reserved => 0,
        OrderStatus::PaymentPending => 1,
        OrderStatus::Paid => 2,
        OrderStatus::Released => 3,
        OrderStatus::Refunded => 4,
    }
}

fn due_byte(due: PaymentDue) -> u8 {
    match due {
        PaymentDue::Capture => 0,
        PaymentDue::Void => 1,
        PaymentDue::Refund => 2,
    }
}

fn put_u64(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_i64(out: &mut Vec<u8>, value: i64) {
    put_u64(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_u64(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// 32 or 64 lowercase hex digits become their 16 or 32 bytes; anything else is kept as text.
fn put_fingerprint(out: &mut Vec<u8>, fingerprint: &str) {
    let digits = fingerprint.as_bytes();
    let form = match digits.len() {
        32 => FINGERPRINT_HEX16,
        64 => FINGERPRINT_HEX32,
        _ => FINGERPRINT_TEXT,
    };
    if form != FINGERPRINT_TEXT && digits.iter().all(|&d| hex_value(d).is_some()) {
        out.push(form);
        for pair in digits.chunks_exact(2) {
            let (high, low) = (hex_value(pair[0]), hex_value(pair[1]));
            out.push(high.unwrap_or(0) << 4 | low.unwrap_or(0));
        }
    } else {
        out.push(FINGERPRINT_TEXT);
        put_str(out, fingerprint);
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, len: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError::new(format!(
                "the record ends inside its {what}"
            )));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte(what)?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::new(format!("{what}: a number out of range")))
    }

    /// A varint from 1 to `u32::MAX` (a product's limits).
    fn positive_u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let value = self.u64(what)?;
        u32::try_from(value)
            .ok()
            .filter(|value| *value > 0)
            .ok_or_else(|| DecodeError::new(format!("{what} {value}")))
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        let raw = self.u64(what)?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    /// A count of things that take at least one byte each: never more than the bytes left.
    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let count = self.u64(what)?;
        if count > self.rest.len() as u64 {
            return Err(DecodeError::new(format!(
                "{what}: {count} announced, {} bytes left",
                self.rest.len()
            )));
        }
        Ok(count as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let len = self.count(what)?;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| DecodeError::new(format!("{what}: not UTF-8")))
    }

    fn status(&mut self, what: &str) -> Result<OrderStatus, DecodeError> {
        Ok(match self.byte(what)? {
            0 => OrderStatus::Reserved,
            1 => OrderStatus::PaymentPending,
            2 => OrderStatus::Paid,
            3 => OrderStatus::Released,
            4 => OrderStatus::Refunded,
            other => return Err(DecodeError::new(format!("{what}: unknown status {other}"))),
        })
    }

    fn due(&mut self) -> Result<PaymentDue, DecodeError> {
        Ok(match self.byte("payment due")? {
            0 => PaymentDue::Capture,
            1 => PaymentDue::Void,
            2 => PaymentDue::Refund,
            other => {
                return Err(DecodeError::new(format!(
                    "payment due: unknown value {other}"
                )))
            }
        })
    }

    fn currency(&mut self) -> Result<Currency, DecodeError> {
        let bytes = self.bytes(3, "currency")?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| DecodeError::new("currency: not UTF-8"))?;
        Currency::parse(text).map_err(invalid)
    }

    fn fingerprint(&mut self) -> Result<String, DecodeError> {
        match self.byte("fingerprint")? {
            form @ (FINGERPRINT_HEX16 | FINGERPRINT_HEX32) => {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                let length = if form == FINGERPRINT_HEX16 { 16 } else { 32 };
                let bytes = self.bytes(length, "fingerprint")?;
                let mut text = String::with_capacity(2 * length);
                for byte in bytes {
                    text.push(char::from(DIGITS[usize::from(byte >> 4)]));
                    text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
                }
                Ok(text)
            }
            FINGERPRINT_TEXT => self.string("fingerprint"),
            other => Err(DecodeError::new(format!(
                "fingerprint: unknown form {other}"
            ))),
        }
    }

    fn record(&mut self) -> Result<Record, DecodeError> {
        match self.byte("kind")? {
            kind @ (KIND_PRODUCT | KIND_PRODUCT_LIMITS) => {
                let mut product = Product {
                    sku: Sku::parse(self.string("sku")?).map_err(invalid)?,
                    name: self.string("name")?,
                    price_cents: Cents::parse(self.i64("price")?).map_err(invalid)?,
                    currency: self.currency()?,
                    stock: Stock::parse(self.i64("stock")?).map_err(invalid)?,
                    max_per_customer: None,
                    admission_rate: None,
                };
                if kind == KIND_PRODUCT_LIMITS {
                    let flags = self.byte("product flags")?;
                    if flags & !KNOWN_PRODUCT_FLAGS != 0 {
                        return Err(DecodeError::new(format!(
                            "unknown product flags {flags:#04x}"
                        )));
                    }
                    if flags & HAS_MAX_PER_CUSTOMER != 0 {
                        product.max_per_customer = Some(self.positive_u32("max_per_customer")?);
                    }
                    if flags & HAS_ADMISSION_RATE != 0 {
                        product.admission_rate = Some(self.positive_u32("admission_rate")?);
                    }
                }
                Ok(Record::Product { product })
            }
            KIND_ORDER => self.order(),
            KIND_PAYMENTS => {
                let at_ms = self.i64("time")?;
                let count = self.count("settled payments")?;
                let mut settled = Vec::with_capacity(count);
                for _ in 0..count {
                    let order_id = OrderId::parse(self.string("order id")?).map_err(invalid)?;
                    let status = self.status("status")?;
                    let flags = self.byte("flags")?;
                    if flags > 3 {
                        return Err(DecodeError::new(format!("unknown flags {flags:#04x}")));
                    }
                    let payment_id = if flags & 1 != 0 {
                        Some(self.string("payment id")?)
                    } else {
                        None
                    };
                    let payment_due = if flags & 2 != 0 {
                        Some(self.due()?)
                    } else {
                        None
                    };
                    settled.push(SettledPayment {
                        order_id,
                        status,
                        payment_id,
                        payment_due,
                    });
                }
                Ok(Record::Payments { settled, at_ms })
            }
            KIND_ADOPTED => self.adopted(),
            KIND_ADOPTED_AWAY => {
                let at_ms = self.i64("time")?;
                let count = self.count("orders adopted away")?;
                let mut orders = Vec::with_capacity(count);
                for _ in 0..count {
                    orders.push(OrderId::parse(self.string("order id")?).map_err(invalid)?);
                }
                Ok(Record::AdoptedAway { orders, at_ms })
            }
            other => Err(DecodeError::new(format!("unknown record kind {other}"))),
        }
    }

    fn order(&mut self) -> Result<Record, DecodeError> {
        let flags = self.byte("flags")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::new(format!("unknown flags {flags:#04x}")));
        }
        let at_ms = self.i64("time")?;
        let order = self.order_fields(flags, at_ms)?;
        let previous = if flags & HAS_PREVIOUS != 0 {
            Some(self.status("previous status")?)
        } else {
            None
        };
        let count = self.count("statuses entered")?;
        let mut entered = Vec::with_capacity(count);
        for _ in 0..count {
            entered.push(self.status("status entered")?);
        }
        let answer = if flags & HAS_ANSWER != 0 {
            let key = IdempotencyKey::parse(self.string("idempotency key")?).map_err(invalid)?;
            let fingerprint = self.fingerprint()?;
            let status = u16::try_from(self.u64("answer status")?)
                .map_err(|_| DecodeError::new("answer status: out of range"))?;
            let body = self.string("answer body")?;
            let answered_at_ms = at_ms.wrapping_add(self.i64("answer time")?);
            Some((
                key,
                StoredAnswer {
                    fingerprint,
                    status,
                    body,
                    at_ms: answered_at_ms,
                },
            ))
        } else {
            None
        };
        Ok(Record::Order {
            order,
            previous,
            entered,
            at_ms,
            answer,
            replaces_expired_key: flags & REPLACES_EXPIRED_KEY != 0,
        })
    }

    /// An order's fields as [`put_order`] wrote them.
    fn order_fields(&mut self, flags: u8, at_ms: i64) -> Result<Order, DecodeError> {
        let order_id = OrderId::parse(self.string("order id")?).map_err(invalid)?;
        let status = self.status("status")?;
        let customer_id = CustomerId::parse(self.string("customer id")?).map_err(invalid)?;
        let count = self.count("items")?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(OrderItem {
                sku: Sku::parse(self.string("sku")?).map_err(invalid)?,
                quantity: self.i64("quantity")?,
                unit_price_cents: Cents::parse(self.i64("unit price")?).map_err(invalid)?,
            });
        }
        let total_cents = self.i64("total")?;
        let currency = self.currency()?;
        let created_at_ms = at_ms.wrapping_add(self.i64("creation time")?);
        let hold_deadline_ms = created_at_ms.wrapping_add(self.i64("hold deadline")?);
        let payment_id = if flags & HAS_PAYMENT_ID != 0 {
            Some(self.string("payment id")?)
        } else {
            None
        };
        let payment_due = if flags & HAS_PAYMENT_DUE != 0 {
            Some(self.due()?)
        } else {
            None
        };
        Ok(Order {
            order_id,
            status,
            customer_id,
            items,
            total_cents,
            currency,
            created_at_ms,
            hold_deadline_ms,
            payment_id,
            payment_due,
        })
    }

    fn adopted(&mut self) -> Result<Record, DecodeError> {
        let at_ms = self.i64("time")?;
        let from = self.string("node")?;
        let count = self.count("adopted orders")?;
        let mut orders = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = self.byte("flags")?;
            if flags & !(HAS_PAYMENT_ID | HAS_PAYMENT_DUE) != 0 {
                return Err(DecodeError::new(format!("unknown flags {flags:#04x}")));
            }
            orders.push(self.order_fields(flags, at_ms)?);
        }
        Ok(Record::Adopted {
            from,
            orders,
            at_ms,
        })
    }
}

fn invalid(error: crate::domain::InvalidValue) -> DecodeError {
    DecodeError::new(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = String> {
        "[!-.0-~]{1,40}"
    }

    fn status() -> impl Strategy<Value = OrderStatus> {
        proptest::sample::select(OrderStatus::ALL.to_vec())
    }

    fn due() -> impl Strategy<Value = PaymentDue> {
        proptest::sample::select(vec![
            PaymentDue::Capture,
            PaymentDue::Void,
            PaymentDue::Refund,
        ])
    }

    fn currency() -> impl Strategy<Value = Currency> {
        "[A-Z]{3}".prop_map(|c| Currency::parse(&c).expect("currency"))
    }

    fn item() -> impl Strategy<Value = OrderItem> {
        (id(), any::<i64>(), 0..=i64::MAX / 4).prop_map(|(sku, quantity, price)| OrderItem {
            sku: Sku::parse(sku).expect("sku"),
            quantity,
            unit_price_cents: Cents::parse(price).unwrap_or_else(|_| Cents::parse(0).expect("0")),
        })
    }

    fn order() -> impl Strategy<Value = Order> {
        (
            (
                id(),
                status(),
                id(),
                proptest::collection::vec(item(), 0..4),
            ),
            (any::<i64>(), currency(), any::<i64>(), any::<i64>()),
            (proptest::option::of(".{0,30}"), proptest::option::of(due())),
        )
            .prop_map(
                |(
                    (order_id, status, customer, items),
                    (total_cents, currency, created_at_ms, hold_deadline_ms),
                    (payment_id, payment_due),
                )| Order {
                    order_id: OrderId::parse(order_id).expect("order id"),
                    status,
                    customer_id: CustomerId::parse(customer).expect("customer"),
                    items,
                    total_cents,
                    currency,
                    created_at_ms,
                    hold_deadline_ms,
                    payment_id,
                    payment_due,
                },
            )
    }

    fn answer() -> impl Strategy<Value = (IdempotencyKey, StoredAnswer)> {
        (
            "[!-~]{1,60}",
            prop_oneof!["[0-9a-f]{64}", "[0-9a-f]{32}", ".{0,70}"],
            any::<u16>(),
            ".{0,200}",
            any::<i64>(),
        )
            .prop_map(|(key, fingerprint, status, body, at_ms)| {
                (
                    IdempotencyKey::parse(key).expect("key"),
                    StoredAnswer {
                        fingerprint,
                        status,
                        body,
                        at_ms,
                    },
                )
            })
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                id(),
                ".{0,40}",
                0..=1_000_000i64,
                currency(),
                0..=1_000_000i64,
                proptest::option::of(1..=u32::MAX),
                proptest::option::of(1..=u32::MAX),
            )
                .prop_map(|(sku, name, price, currency, stock, limit, rate)| {
                    Record::Product {
                        product: Product {
                            sku: Sku::parse(sku).expect("sku"),
                            name,
                            price_cents: Cents::parse(price)
                                .unwrap_or_else(|_| Cents::parse(0).expect("0")),
                            currency,
                            stock: Stock::parse(stock)
                                .unwrap_or_else(|_| Stock::parse(0).expect("0")),
                            max_per_customer: limit,
                            admission_rate: rate,
                        },
                    }
                }),
            (
                order(),
                proptest::option::of(status()),
                proptest::collection::vec(status(), 0..3),
                any::<i64>(),
                proptest::option::of(answer()),
                any::<bool>(),
            )
                .prop_map(
                    |(order, previous, entered, at_ms, answer, replaces_expired_key)| {
                        Record::Order {
                            order,
                            previous,
                            entered,
                            at_ms,
                            answer,
                            replaces_expired_key,
                        }
                    }
                ),
            (
                proptest::collection::vec(
                    (
                        id(),
                        status(),
                        proptest::option::of(".{0,30}"),
                        proptest::option::of(due())
                    ),
                    0..4
                ),
                any::<i64>()
            )
                .prop_map(|(entries, at_ms)| Record::Payments {
                    settled: entries
                        .into_iter()
                        .map(
                            |(order_id, status, payment_id, payment_due)| SettledPayment {
                                order_id: OrderId::parse(order_id).expect("order id"),
                                status,
                                payment_id,
                                payment_due,
                            }
                        )
                        .collect(),
                    at_ms,
                }),
            (id(), proptest::collection::vec(order(), 0..3), any::<i64>()).prop_map(
                |(from, orders, at_ms)| Record::Adopted {
                    from,
                    orders,
                    at_ms
                }
            ),
            (proptest::collection::vec(id(), 0..3), any::<i64>()).prop_map(|(ids, at_ms)| {
                Record::AdoptedAway {
                    orders: ids
                        .into_iter()
                        .map(|id| OrderId::parse(id).expect("order id"))
                        .collect(),
                    at_ms,
                }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every record reads back equal, from the binary form and from the JSON form.
        #[test]
        fn every_record_reads_back_equal_from_both_forms(record in record()) {
            let bytes = encode(&record);
            prop_assert_eq!(bytes[0], VERSION_1);
            prop_assert_eq!(&decode(&bytes).expect("binary"), &record);
            let json = serde_json::to_vec(&record).expect("json");
            prop_assert_eq!(&decode(&json).expect("json"), &record);
        }

        /// A record cut short or with a byte changed is an error or another valid record, never a
        /// panic; cut short it is always an error.
        #[test]
        fn bad_bytes_are_an_error_never_a_panic(record in record(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
            let bytes = encode(&record);
            let cut = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..cut]).is_err());
            let mut changed = bytes.clone();
            let at = flip.0.index(changed.len());
            changed[at] ^= flip.1.max(1);
            let _ = decode(&changed);
            let mut longer = bytes;
            longer.push(0);
            prop_assert!(decode(&longer).is_err());
        }

        /// Arbitrary bytes never panic the reader.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut versioned = vec![VERSION_1];
            versioned.extend_from_slice(&bytes);
            let _ = decode(&versioned);
            let _ = decode(&bytes);
        }
    }

    /// A new paid order with its answer, as the checkout journals it.
    fn typical_order() -> Record {
        let order = Order {
            order_id: OrderId::parse("ord_1764000000123").expect("id"),
            status: OrderStatus::Paid,
            customer_id: CustomerId::parse("customer-4711").expect("customer"),
            items: vec![OrderItem {
                sku: Sku::parse("sku-0042").expect("sku"),
                quantity: 1,
                unit_price_cents: Cents::parse(1_999).expect("price"),
            }],
            total_cents: 1_999,
            currency: Currency::parse("EUR").expect("currency"),
            created_at_ms: 1_764_000_000_000,
            hold_deadline_ms: 1_764_000_900_000,
            payment_id: Some("pay_3f2a9c1b7e4d5a6b8c9d0e1f".into()),
            payment_due: Some(PaymentDue::Capture),
        };
        let body = "{\"order_id\":\"ord_1764000000123\",\"status\":\"paid\",\"customer_id\":\"customer-4711\",\"items\":[{\"sku\":\"sku-0042\",\"quantity\":1,\"unit_price_cents\":1999}],\"total_cents\":1999,\"currency\":\"EUR\",\"created_at\":\"2025-11-24T16:00:00Z\"}";
        Record::Order {
            order,
            previous: None,
            entered: vec![OrderStatus::Reserved, OrderStatus::Paid],
            at_ms: 1_764_000_000_000,
            answer: Some((
                IdempotencyKey::parse("8d3c1f6e-2b4a-4c9d-9e7f-0a1b2c3d4e5f").expect("key"),
                StoredAnswer {
                    fingerprint: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                        .into(),
                    status: 201,
                    body: body.into(),
                    at_ms: 1_764_000_000_000,
                },
            )),
            replaces_expired_key: false,
        }
    }

    #[test]
    fn a_typical_order_record_takes_less_than_half_the_bytes_of_its_json() {
        let record = typical_order();
        let (binary, json) = (encode(&record), serde_json::to_vec(&record).expect("json"));
        eprintln!(
            "typical order record: {} bytes, JSON {} bytes",
            binary.len(),
            json.len()
        );
        assert!(
            binary.len() * 2 < json.len(),
            "{} vs {}",
            binary.len(),
            json.len()
        );
        assert_eq!(decode(&binary).expect("decode"), record);
    }

    #[test]
    fn a_huge_announced_length_is_refused_without_allocating_it() {
        let mut bytes = vec![VERSION_1, KIND_PAYMENTS, 0];
        put_u64(&mut bytes, u64::MAX >> 1);
        let error = decode(&bytes).expect_err("refused");
        assert!(error.to_string().contains("announced"), "{error}");
    }

    #[test]
    fn an_unknown_first_byte_is_named() {
        let error = decode(&[0x7f, 1, 2]).expect_err("refused");
        assert!(error.to_string().contains("0x7f"), "{error}");
        assert!(decode(&[]).is_err());
    }
}
