-- Turnstile's MySQL/MariaDB journal. The `journal` table is the append-only log (one row per
-- record, in commit order); the other tables are materialised from it in the same transaction, so
-- they always agree with it. UNIQUE constraints make the database itself refuse a second order for
-- one idempotency key or one gateway payment, whatever the application does.

CREATE TABLE journal (
    lsn BIGINT NOT NULL PRIMARY KEY,
    first_event_seq BIGINT NOT NULL,
    record LONGTEXT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE products (
    sku VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    name VARCHAR(500) NOT NULL,
    price_cents BIGINT NOT NULL,
    currency CHAR(3) CHARACTER SET ascii NOT NULL,
    stock BIGINT NOT NULL,
    updated_lsn BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Units held and sold per SKU (available = products.stock - reserved - sold). `leased` is for the
-- scale-out's stock leases.
CREATE TABLE inventory (
    sku VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    reserved BIGINT NOT NULL DEFAULT 0,
    sold BIGINT NOT NULL DEFAULT 0,
    leased BIGINT NOT NULL DEFAULT 0
) ENGINE = InnoDB;

CREATE TABLE orders (
    order_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    status VARCHAR(16) CHARACTER SET ascii NOT NULL,
    customer_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    total_cents BIGINT NOT NULL,
    currency CHAR(3) CHARACTER SET ascii NOT NULL,
    created_at_ms BIGINT NOT NULL,
    hold_deadline_ms BIGINT NOT NULL,
    payment_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL,
    idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
    updated_lsn BIGINT NOT NULL,
    UNIQUE KEY orders_payment_id (payment_id),
    UNIQUE KEY orders_idempotency_key (idempotency_key),
    -- The sweeper's and the reconciler's query: holds by deadline.
    KEY orders_status_deadline (status, hold_deadline_ms)
) ENGINE = InnoDB;

CREATE TABLE order_items (
    order_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    line SMALLINT NOT NULL,
    sku VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    quantity BIGINT NOT NULL,
    unit_price_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, line)
) ENGINE = InnoDB;

-- Answers that placed an order, replayed for a retried key (kept at least 24 h).
CREATE TABLE idempotency_keys (
    idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    order_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    fingerprint CHAR(64) CHARACTER SET ascii NOT NULL,
    status SMALLINT NOT NULL,
    body MEDIUMTEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    -- The retention purge's query.
    KEY idempotency_keys_at (at_ms)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE payments (
    payment_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    order_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    amount_cents BIGINT NOT NULL,
    currency CHAR(3) CHARACTER SET ascii NOT NULL,
    state VARCHAR(16) CHARACTER SET ascii NOT NULL,
    updated_lsn BIGINT NOT NULL
) ENGINE = InnoDB;

-- The transactional outbox: one row per order event, seq in commit order. The relay to RabbitMQ
-- keeps its position (the last seq the broker confirmed) in `outbox_cursor`, so the outbox needs
-- no index but its primary key, and stays cheap to write.
CREATE TABLE outbox (
    seq BIGINT NOT NULL PRIMARY KEY,
    type VARCHAR(32) CHARACTER SET ascii NOT NULL,
    order_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    at_ms BIGINT NOT NULL,
    total_cents BIGINT NOT NULL,
    currency CHAR(3) CHARACTER SET ascii NOT NULL
) ENGINE = InnoDB;

CREATE TABLE outbox_cursor (
    relay VARCHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    published_seq BIGINT NOT NULL
) ENGINE = InnoDB;
