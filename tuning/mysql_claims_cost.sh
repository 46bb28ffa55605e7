#!/usr/bin/env bash
# What the claims and the record's size cost MariaDB, with the `mariadb` client alone (no
# Turnstile): 200 transactions of 500 records each, one `journal`-like row per record (a LONGBLOB,
# as the log keeps it). Variants:
#   log_only / log_only_400_bytes: the log alone, ~900-byte records (the JSON form of a typical
#     order) and ~400-byte ones (its binary form, `src/engine/codec.rs`);
#   claims_*: as the commit path wrote until migration 20261127000005, a row per record in an
#     `order_claims`-like table with 1 to 3 random UNIQUE keys (order id, idempotency key, payment
#     id), 900-byte records (and all three with 400-byte records);
#   inline_claims_400_bytes: as it writes now, the three UNIQUE claims as columns of the log row,
#     400-byte records;
#   the ceiling: tiny_rows (two BIGINTs a row, no record, no claims: the "150-230k rows/s" figure
#     of a bare row), inline_claims_16_bytes (the three random claims with an almost empty record)
#     and inline_claims_400_bytes_sequential (the claims as keys that only grow, as order ids do).
# Prints records/s per variant, ROUNDS times in turn.
# Works in a scratch database `turnstile_claims_cost` (dropped at the end).
# Usage: tuning/mysql_claims_cost.sh [ROUNDS]   (MYSQL: the client command, default mariadb -uroot -h127.0.0.1)
set -euo pipefail
rounds=${1:-2}
mysql_cmd=${MYSQL:-mariadb -uroot -h127.0.0.1}
work=$(mktemp -d)
trap 'rm -rf "$work"; $mysql_cmd -e "DROP DATABASE IF EXISTS turnstile_claims_cost" || true' EXIT
$mysql_cmd -e "DROP DATABASE IF EXISTS turnstile_claims_cost; CREATE DATABASE turnstile_claims_cost"
python3 - "$work" <<'PY'
import random, sys
out = sys.argv[1]
def rid(n=24): return ''.join(random.choice('0123456789abcdef') for _ in range(n))
ascii_id = "VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin"
variants = {
    "log_only": (900, []),
    "log_only_400_bytes": (400, []),
    "claims_order_id": (900, ["order_id"]),
    "claims_order_id_key": (900, ["order_id", "k"]),
    "claims_all_three": (900, ["order_id", "k", "p"]),
    "claims_all_three_400_bytes": (400, ["order_id", "k", "p"]),
    "inline_claims_400_bytes": (400, "inline"),
    "tiny_rows": (0, []),
    "inline_claims_16_bytes": (16, "inline"),
    "inline_claims_400_bytes_sequential": (400, "inline_seq"),
}
for name, (size, keys) in variants.items():
    payload = 'x' * size
    with open(f"{out}/{name}.sql", "w") as f:
        f.write("DROP TABLE IF EXISTS j, c;\n")
        sequential = keys == "inline_seq"
        inline = keys in ("inline", "inline_seq")
        claim_cols = "".join(f", {k} {ascii_id} NULL, UNIQUE KEY({k})" for k in ("o", "k", "p")) if inline else ""
        record_col = ", record LONGBLOB NOT NULL" if size else ""
        f.write(f"CREATE TABLE j (lsn BIGINT PRIMARY KEY, s BIGINT NOT NULL{record_col}{claim_cols});\n")
        if keys and not inline:
            cols = ", ".join(f"{k} {ascii_id} {'NOT NULL PRIMARY KEY' if k == 'order_id' else 'NULL'}" for k in keys)
            uniques = "".join(f", UNIQUE KEY({k})" for k in keys if k != "order_id")
            f.write(f"CREATE TABLE c ({cols}, lsn BIGINT NOT NULL{uniques});\n")
        ids = lambda: [f"'ord_{rid()}'", f"'key-{rid(16)}'", f"'pay_{rid()}'"]
        lsn = 0
        for t in range(200):
            f.write("BEGIN;\n")
            rows = []
            for _ in range(500):
                lsn += 1
                if sequential:
                    claims = f",'ord_{lsn:012}','key-{lsn:012}','pay_{lsn:012}'"
                else:
                    claims = "," + ",".join(ids()) if inline else ""
                record = f",'{payload}'" if size else ""
                rows.append(f"({lsn},{lsn}{record}{claims})")
            f.write("INSERT INTO j VALUES " + ",".join(rows) + ";\n")
            if keys and not inline:
                vals = lambda: ",".join(ids()[: len(keys)])
                f.write("INSERT INTO c VALUES " + ",".join(f"({vals()},{t})" for _ in range(500)) + ";\n")
            f.write("COMMIT;\n")
PY
echo "MariaDB $($mysql_cmd -N -e 'SELECT VERSION()'); $(nproc) cores; 100,000 records per run"
for round in $(seq 1 "$rounds"); do
  for name in log_only log_only_400_bytes claims_order_id claims_order_id_key claims_all_three claims_all_three_400_bytes inline_claims_400_bytes \
      tiny_rows inline_claims_16_bytes inline_claims_400_bytes_sequential; do
    start=$(date +%s.%N)
    $mysql_cmd turnstile_claims_cost < "$work/$name.sql"
    end=$(date +%s.%N)
    printf "round %s  %-36s %8.0f records/s\n" "$round" "$name" "$(echo "100000 / ($end - $start)" | bc -l)"
  done
done
