-- The name of the node whose journal this database is (`--mysql-url`, MySQL as the journal): the
-- node's name is in the idempotency keys of the authorisations it asks the payment gateway for,
-- and its reconciler voids only those it made. Kept with the journal it belongs to, so a node
-- started again on a new data dir (a container without a volume) is still the node that made
-- them, and voids what its earlier run left. One row.
CREATE TABLE node_name (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL
);
