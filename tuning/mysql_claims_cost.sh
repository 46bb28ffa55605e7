#!/usr/bin/env bash
# What the claims cost MariaDB, with the `mariadb` client alone (no Turnstile): 200 transactions of
# 500 records each, a ~900-byte record per row in a `journal`-like table (a LONGBLOB, as the log
# keeps it), and with it a claims row per record carrying 0 to 3 random UNIQUE keys (order id,
# idempotency key, payment id), as the MySQL journal's commit path writes; and the log alone with
# 300-byte records (what the record's size costs). Prints records/s per variant, ROUNDS times in
# turn.
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
    "log_only": [],
    "log_only_300_bytes": [],
    "claims_order_id": ["order_id"],
    "claims_order_id_key": ["order_id", "k"],
    "claims_all_three": ["order_id", "k", "p"],
}
for name, keys in variants.items():
    payload = 'x' * (300 if name.endswith("300_bytes") else 900)
    with open(f"{out}/{name}.sql", "w") as f:
        f.write("DROP TABLE IF EXISTS j, c;\n")
        f.write("CREATE TABLE j (lsn BIGINT PRIMARY KEY, s BIGINT NOT NULL, record LONGBLOB NOT NULL);\n")
        if keys:
            cols = ", ".join(f"{k} {ascii_id} {'NOT NULL PRIMARY KEY' if k == 'order_id' else 'NULL'}" for k in keys)
            uniques = "".join(f", UNIQUE KEY({k})" for k in keys if k != "order_id")
            f.write(f"CREATE TABLE c ({cols}, lsn BIGINT NOT NULL{uniques});\n")
        lsn = 0
        for t in range(200):
            f.write("BEGIN;\n")
            rows = []
            for _ in range(500):
                lsn += 1
                rows.append(f"({lsn},{lsn},'{payload}')")
            f.write("INSERT INTO j VALUES " + ",".join(rows) + ";\n")
            if keys:
                vals = lambda: ",".join([f"'ord_{rid()}'", f"'key-{rid(16)}'", f"'pay_{rid()}'"][: len(keys)])
                f.write("INSERT INTO c VALUES " + ",".join(f"({vals()},{t})" for _ in range(500)) + ";\n")
            f.write("COMMIT;\n")
PY
echo "MariaDB $($mysql_cmd -N -e 'SELECT VERSION()'); $(nproc) cores; 100,000 records per run"
for round in $(seq 1 "$rounds"); do
  for name in log_only log_only_300_bytes claims_order_id claims_order_id_key claims_all_three; do
    start=$(date +%s.%N)
    $mysql_cmd turnstile_claims_cost < "$work/$name.sql"
    end=$(date +%s.%N)
    printf "round %s  %-22s %8.0f records/s\n" "$round" "$name" "$(echo "100000 / ($end - $start)" | bc -l)"
  done
done
