-- WAL-style MySQL journal: the `journal` table is the log, and the only other rows written with a
-- record are its claims. `order_claims` holds one row per order with the UNIQUE keys the
-- duplicate-order defence needs (order id, idempotency key, payment id). The other tables become
-- projections of the log, applied behind it; `projection_cursor` is their durable cursor (the last
-- lsn and event seq they hold, moved in the same transaction as the rows it covers).

CREATE TABLE order_claims (
    order_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
    payment_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL,
    lsn BIGINT NOT NULL,
    UNIQUE KEY order_claims_idempotency_key (idempotency_key),
    UNIQUE KEY order_claims_payment_id (payment_id)
) ENGINE = InnoDB;

INSERT INTO order_claims (order_id, idempotency_key, payment_id, lsn)
    SELECT order_id, idempotency_key, payment_id, updated_lsn FROM orders;

-- The projection keeps the columns for readers; uniqueness is the claims' job.
ALTER TABLE orders DROP INDEX orders_payment_id, DROP INDEX orders_idempotency_key;

CREATE TABLE projection_cursor (
    name VARCHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    applied_lsn BIGINT NOT NULL,
    applied_seq BIGINT NOT NULL
) ENGINE = InnoDB;

INSERT INTO projection_cursor (name, applied_lsn, applied_seq)
    SELECT 'tables', COALESCE(MAX(lsn), 0), (SELECT COALESCE(MAX(seq), 0) FROM outbox) FROM journal;

-- Records an operator told the applier to skip (`turnstile mysql-apply --skip LSN`): the database
-- refused them for good; their log row stays, their projection is not written.
CREATE TABLE journal_skips (
    lsn BIGINT NOT NULL PRIMARY KEY,
    reason VARCHAR(1000) NOT NULL,
    at_ms BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
