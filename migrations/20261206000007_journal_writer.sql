-- The fence of the node whose journal this database is. A node that takes the database's journal
-- lock (GET_LOCK) adds one to `epoch` before it reads anything, and every transaction that writes
-- log rows first reads `epoch` (a shared lock) and writes nothing unless it is still the one its
-- node set. So a node that lost the lock (its session ended while its network was cut) can never
-- write again once another node took over: the new node's increment waits for the old node's open
-- transactions to end, and the old node's later ones find another epoch. One row.
CREATE TABLE journal_writer (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    epoch BIGINT UNSIGNED NOT NULL
);
INSERT INTO journal_writer (id, epoch) VALUES (1, 0);
