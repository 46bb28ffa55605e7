-- Several nodes selling one stock (`--node-id`, src/cluster/). The pool of a SKU (units leased
-- to no node) lives here, and every node sells from a lease it took from it. For every SKU, in
-- every transaction: stock_pool.pool + SUM(stock_leases.units) = products.stock.

-- Who runs. `epoch` moves on at every registration (and when a node is presumed dead), so an
-- earlier run of a node, or a paused one, finds it moved and takes nothing more. Times are the
-- database's clock (Unix ms), so the nodes' clocks never have to agree.
CREATE TABLE cluster_nodes (
    node_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    url VARCHAR(1000) CHARACTER SET ascii NOT NULL,
    epoch BIGINT UNSIGNED NOT NULL,
    -- 'live', 'left' (stopped on purpose, its unsold units given back) or 'dead' (presumed).
    state VARCHAR(16) CHARACTER SET ascii NOT NULL,
    -- 'mysql' (MySQL is its journal) or 'write-behind' (its journal is on its own disk first).
    mode VARCHAR(16) CHARACTER SET ascii NOT NULL,
    renewed_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    -- A node presumed dead whose lease was settled (its unsold units back in the pool); NULL
    -- while a reaper still has to (any live node may, the settling being idempotent).
    reaped_at_ms BIGINT NULL,
    -- The last event seq the node journaled, as it last reported: `turnstile cluster forget`
    -- compares it with the outbox MySQL holds to say what a lost disk takes with it.
    event_seq BIGINT NOT NULL DEFAULT 0
) ENGINE = InnoDB;

-- Per SKU: the units leased to no node; `recall`, units a lowered stock asks the nodes to give
-- back; `hungry_at_ms`, when a node last found its lease dry and the pool empty with buyers
-- waiting (the nodes holding unsold units then give some back).
CREATE TABLE stock_pool (
    sku VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    pool BIGINT NOT NULL,
    recall BIGINT NOT NULL DEFAULT 0,
    -- When the recall was asked (database clock): one older than a lowered stock's wait (its
    -- asker gone) no longer holds units back.
    recall_at_ms BIGINT NOT NULL DEFAULT 0,
    hungry_at_ms BIGINT NULL,
    CONSTRAINT stock_pool_never_negative CHECK (pool >= 0)
) ENGINE = InnoDB;

-- Per node and SKU: `units`, everything given to the node (sold, held and for sale together);
-- `reserved` and `sold`, the node's own counters as it last reported them (every renewal).
CREATE TABLE stock_leases (
    node_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    sku VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    units BIGINT NOT NULL,
    reserved BIGINT NOT NULL DEFAULT 0,
    sold BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, sku),
    KEY stock_leases_sku (sku),
    CONSTRAINT stock_leases_never_negative CHECK (units >= 0)
) ENGINE = InnoDB;

-- A database a single node wrote keeps its numbers: that node's held and sold units become its
-- lease (`inventory` is per node since 20261206000008), the rest of each product's stock the pool.
INSERT INTO stock_leases (node_id, sku, units, reserved, sold)
    SELECT i.node, i.sku, i.reserved + i.sold, i.reserved, i.sold
    FROM inventory i
    WHERE i.reserved + i.sold > 0;
INSERT INTO stock_pool (sku, pool)
    SELECT p.sku, p.stock - COALESCE((SELECT SUM(l.units) FROM stock_leases l WHERE l.sku = p.sku), 0)
    FROM products p;
