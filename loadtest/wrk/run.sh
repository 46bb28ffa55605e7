#!/usr/bin/env bash
# Measures the HTTP server with wrk on 127.0.0.1 (install: apt-get install wrk):
#   (a) the flash-sale flood: checkouts of a sold-out SKU, a new Idempotency-Key each;
#   (b) successful single-item checkouts on 10,000 SKUs with tok_ok;
# plus GET /healthz, the HTTP ceiling of the machine. Bounded: each run lasts DURATION.
#   (c) successful checkouts all on one hot SKU.
# With MYSQL_URL=mysql://root@127.0.0.1:3306 set, the server runs with --mysql-url on a database
# `turnstile_wrk` created afresh (and migrated); otherwise on the embedded journal.
# With TURNSTILE_BIN=path, that binary is measured instead of this tree's release build (to compare
# two versions side by side).
# Usage: [MYSQL_URL=...] [TURNSTILE_BIN=...] loadtest/wrk/run.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-10s}
connections=${2:-64}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }
bin=${TURNSTILE_BIN:-target/release/turnstile}
[ -n "${TURNSTILE_BIN:-}" ] || cargo build --release --quiet
data=$(mktemp -d -p target wrk-data.XXXXXX)
out=$(mktemp)
journal=()
if [ -n "${MYSQL_URL:-}" ]; then
  mariadb_url="${MYSQL_URL%/}/turnstile_wrk"
  python3 - "$MYSQL_URL" <<'PY'
import subprocess, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
args = ["mariadb", "-h", u.hostname or "127.0.0.1", "-P", str(u.port or 3306), "-u", u.username or "root"]
if u.password:
    args.append("-p" + u.password)
subprocess.run(args + ["-e", "DROP DATABASE IF EXISTS turnstile_wrk; CREATE DATABASE turnstile_wrk"], check=True)
PY
  "$bin" migrate --mysql-url "$mariadb_url"
  journal=(--mysql-url "$mariadb_url")
fi
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" "${journal[@]}" > "$out" 2> "$data.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data" "$data.log" "$out"' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$out")
echo "server at $addr (${journal[*]:-embedded journal in $data}); $(nproc) cores; wrk 1 thread, $connections connections, $duration"
python3 loadtest/wrk/setup_products.py "$addr"
echo; echo "== GET /healthz (the HTTP ceiling)"
wrk -t1 -c"$connections" -d"$duration" --latency "http://$addr/healthz" | grep -E "Requests/sec|50%|90%|99%|Non-2xx"
echo; echo "== (a) checkouts of a sold-out SKU"
wrk -t1 -c"$connections" -d"$duration" --latency -s loadtest/wrk/one_sku.lua "http://$addr" -- SOLDOUT | grep -E "Requests/sec|50%|90%|99%|Non-2xx"
echo; echo "== (b) successful checkouts, 10,000 SKUs, tok_ok"
wrk -t1 -c"$connections" -d"$duration" --latency -s loadtest/wrk/steady.lua "http://$addr" | grep -E "Requests/sec|50%|90%|99%|Non-2xx"

echo; echo "== (c) successful checkouts, one hot SKU, tok_ok"
wrk -t1 -c"$connections" -d"$duration" --latency -s loadtest/wrk/one_sku.lua "http://$addr" -- HOT | grep -E "Requests/sec|50%|90%|99%|Non-2xx"
