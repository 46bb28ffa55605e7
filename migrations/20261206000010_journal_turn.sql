-- The turn of its log (`journal_writer.epoch`) each run of a node registered with. A reaper
-- settling a node presumed dead fences exactly that run's turn: a run started since has taken a
-- later turn (which fenced the dead one already), and is not fenced by the reaper. NULL: the run
-- registered before this column (the reaper then moves the epoch on whatever it is).
ALTER TABLE cluster_nodes ADD COLUMN journal_turn BIGINT UNSIGNED NULL;
