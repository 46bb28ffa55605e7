-- Several nodes' journals in one database. Every table of a log gets the node whose log a row
-- belongs to (`node`, the name the node runs under): the log (`journal`), its events (`outbox`),
-- the projections' cursor, the relay's cursor, the operator's skips and the fence
-- (`journal_writer`), so that each node keeps its own lsns and event seqs (each from 1, without a
-- gap) and its own writer's turn. The projections stay shared, with the node that owns each
-- order (`orders.node`) and each node's own units held, sold and leased (`inventory`, by node and
-- SKU). The claims on `journal` (order id, idempotency key, payment id) stay UNIQUE across every
-- node: one idempotency key, one order, whichever node places it.
--
-- The rows a single-node database holds become one node's log: the node named in `node_name`
-- (MySQL as the journal keeps its name there). A database whose `node_name` is empty was written
-- by write-behind, whose node's name is in its data dir, out of this migration's reach: its rows
-- get the node '' (the unnamed log), which the first node that opens the database with no log of
-- its own adopts (in write-behind, only if its data dir holds the unnamed log's last record). No
-- node runs under ''; a fresh database keeps no row of it.
--
-- The big tables get `node` with the name as the column's DEFAULT in the same ALTER that changes
-- their primary key: one rebuild, instead of a rebuild and then an UPDATE that moves every row to
-- its new key. The DEFAULT goes afterwards (metadata only), so that no statement can write a row
-- without saying whose it is.
SET @node = COALESCE((SELECT name FROM node_name WHERE id = 1), '');
SET @node_column = CONCAT(
    'ADD COLUMN node VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT ',
    QUOTE(@node), ' FIRST');

SET @alter = CONCAT('ALTER TABLE journal ', @node_column,
    ', DROP PRIMARY KEY, ADD PRIMARY KEY (node, lsn)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

SET @alter = CONCAT('ALTER TABLE outbox ', @node_column,
    ', DROP PRIMARY KEY, ADD PRIMARY KEY (node, seq)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

SET @alter = CONCAT('ALTER TABLE journal_skips ', @node_column,
    ', DROP PRIMARY KEY, ADD PRIMARY KEY (node, lsn)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

SET @alter = CONCAT('ALTER TABLE inventory ', @node_column,
    ', DROP PRIMARY KEY, ADD PRIMARY KEY (node, sku)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

-- The node that owns the order; start-up loads a node's own orders by it.
SET @alter = CONCAT('ALTER TABLE orders ', @node_column, ', ADD KEY orders_node (node)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

-- One row per node: its writer's epoch; its projections' cursor (the one projection there is,
-- so the row's old name, 'tables', goes); its relay's position.
SET @alter = CONCAT('ALTER TABLE journal_writer ', @node_column,
    ', DROP PRIMARY KEY, DROP COLUMN id, ADD PRIMARY KEY (node)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

SET @alter = CONCAT('ALTER TABLE projection_cursor ', @node_column,
    ', DROP PRIMARY KEY, DROP COLUMN name, ADD PRIMARY KEY (node)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

SET @alter = CONCAT('ALTER TABLE outbox_cursor ', @node_column,
    ', DROP PRIMARY KEY, ADD PRIMARY KEY (node, relay)');
PREPARE alter_table FROM @alter;
EXECUTE alter_table;

DEALLOCATE PREPARE alter_table;

ALTER TABLE journal ALTER COLUMN node DROP DEFAULT;
ALTER TABLE outbox ALTER COLUMN node DROP DEFAULT;
ALTER TABLE journal_skips ALTER COLUMN node DROP DEFAULT;
ALTER TABLE inventory ALTER COLUMN node DROP DEFAULT;
ALTER TABLE orders ALTER COLUMN node DROP DEFAULT;
ALTER TABLE journal_writer ALTER COLUMN node DROP DEFAULT;
ALTER TABLE projection_cursor ALTER COLUMN node DROP DEFAULT;
ALTER TABLE outbox_cursor ALTER COLUMN node DROP DEFAULT;

-- An unnamed log with no record is no log: a fresh database keeps no row of the node ''.
DELETE FROM journal_writer WHERE node = '' AND NOT EXISTS (SELECT 1 FROM journal WHERE node = '');
DELETE FROM projection_cursor WHERE node = '' AND NOT EXISTS (SELECT 1 FROM journal WHERE node = '');
