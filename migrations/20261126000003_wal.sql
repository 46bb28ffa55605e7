-- WAL-style MySQL journal: the `journal` table is the log, and the only other rows written with a
-- record are its claims. `order_claims` holds one row per order with the UNIQUE keys the
-- duplicate-order defence needs (order id, idempotency key, payment id). The other tables become
-- projections of the log, applied behind it; `projection_cursor` is their durable cursor (the last
-- lsn and event seq they hold, moved in the same transaction as the rows it covers).

-- A record the database refused for good (or an operator skipped) keeps its lsn, so the log has
-- no gap: its row says why here, and it has no claims and no projection.
ALTER TABLE journal ADD COLUMN refused VARCHAR(1000) NULL;

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

-- A payment's state follows from its order's status and what the order still owes the gateway:
-- one row fewer per order for the applier to write. Same name and columns as the table it replaces.
DROP TABLE payments;
CREATE VIEW payments AS
SELECT payment_id,
       order_id,
       total_cents AS amount_cents,
       currency,
       CASE
           WHEN status = 'reserved' THEN 'authorizing'
           WHEN status = 'payment_pending' THEN 'pending'
           WHEN status = 'paid' AND payment_due IS NOT NULL THEN 'authorized'
           WHEN status = 'paid' THEN 'captured'
           WHEN status = 'released' AND payment_due IS NOT NULL THEN 'void_due'
           WHEN status = 'released' THEN 'voided'
           WHEN status = 'refunded' AND payment_due = 'void' THEN 'void_due'
           WHEN status = 'refunded' AND payment_due IS NOT NULL THEN 'refund_due'
           ELSE 'refunded'
       END AS state,
       updated_lsn
FROM orders
WHERE payment_id IS NOT NULL;

-- Start-up's load reads orders by an OR of status, what they owe and age, which no index serves
-- (it scans); these two only cost the applier two index writes per order row it writes.
ALTER TABLE orders DROP INDEX orders_status_deadline, DROP INDEX orders_payment_due;
