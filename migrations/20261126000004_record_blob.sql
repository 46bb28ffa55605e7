-- A journal record is its JSON bytes, kept as bytes: a LONGBLOB spares MariaDB the character set
-- checks of a LONGTEXT on every insert (10-20% more records/s on the commit path, measured with
-- tuning/mysql_claims_cost.sh). Readers decode the bytes as JSON, as before.
ALTER TABLE journal MODIFY record LONGBLOB NOT NULL;
