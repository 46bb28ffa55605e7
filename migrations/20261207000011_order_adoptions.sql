-- Several nodes: every adoption of an order by a live node (src/cluster/adoption.rs), written in
-- the transaction that moves it (`orders.node`, the units of `stock_leases` and `inventory`).
-- A node that starts again drops from its disk's state the orders adopted away from it (its
-- journal never heard of the move); a write-behind adopter journals the orders it adopted in its
-- own log, and `journaled` says its disk holds them (0: the adopter must still write them there,
-- from MySQL's copy, before it takes them into memory).
CREATE TABLE order_adoptions (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    order_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    from_node VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    to_node VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    at_ms BIGINT NOT NULL,
    journaled BOOLEAN NOT NULL,
    KEY order_adoptions_order (order_id),
    KEY order_adoptions_from (from_node),
    KEY order_adoptions_to (to_node, journaled)
) ENGINE = InnoDB;
