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
# With TLS=1, the server serves HTTPS (--tls-cert/--tls-key) with a self-signed certificate for
# 127.0.0.1 made by openssl in a temporary directory, and wrk drives the same scenarios over
# https:// (keep-alive connections: one handshake per connection), plus
#   (d) new TLS handshakes per second: GET /healthz with `Connection: close`.
# Usage: [MYSQL_URL=...] [TURNSTILE_BIN=...] [TLS=1] loadtest/wrk/run.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-10s}
connections=${2:-64}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }
bin=${TURNSTILE_BIN:-target/release/turnstile}
[ -n "${TURNSTILE_BIN:-}" ] || cargo build --release --quiet
data=$(mktemp -d -p target wrk-data.XXXXXX)
out=$(mktemp)
server=
trap 'if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi; rm -rf "$data" "$data.log" "$data.tls" "$out"' EXIT
scheme=http
tls=()
if [ "${TLS:-0}" = 1 ]; then
  command -v openssl >/dev/null || { echo "openssl is missing (TLS=1 makes its certificate with it)" >&2; exit 2; }
  mkdir "$data.tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -keyout "$data.tls/key.pem" -out "$data.tls/cert.pem" -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 2>/dev/null
  tls=(--tls-cert "$data.tls/cert.pem" --tls-key "$data.tls/key.pem")
  scheme=https
fi
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
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" "${journal[@]}" "${tls[@]}" > "$out" 2> "$data.log" &
server=$!
for _ in $(seq 1 100); do grep -q "listening on" "$out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$out")
[ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$data.log" >&2; exit 1; }
url="$scheme://$addr"
echo "server at $url (${journal[*]:-embedded journal in $data}${tls:+, self-signed certificate}); $(nproc) cores; wrk 1 thread, $connections connections, $duration"
python3 loadtest/wrk/setup_products.py "$url"
echo; echo "== GET /healthz (the HTTP ceiling)"
wrk -t1 -c"$connections" -d"$duration" --latency "$url/healthz" | grep -E "Requests/sec|50%|90%|99%|Non-2xx"
echo; echo "== (a) checkouts of a sold-out SKU"
wrk -t1 -c"$connections" -d"$duration" --latency -s loadtest/wrk/one_sku.lua "$url" -- SOLDOUT | grep -E "Requests/sec|50%|90%|99%|Non-2xx"
echo; echo "== (b) successful checkouts, 10,000 SKUs, tok_ok"
wrk -t1 -c"$connections" -d"$duration" --latency -s loadtest/wrk/steady.lua "$url" | grep -E "Requests/sec|50%|90%|99%|Non-2xx"

echo; echo "== (c) successful checkouts, one hot SKU, tok_ok"
wrk -t1 -c"$connections" -d"$duration" --latency -s loadtest/wrk/one_sku.lua "$url" -- HOT | grep -E "Requests/sec|50%|90%|99%|Non-2xx"

if [ "$scheme" = https ]; then
  echo; echo "== (d) new TLS handshakes: GET /healthz with Connection: close (Requests/sec = handshakes/s)"
  wrk -t1 -c"$connections" -d"$duration" --latency -H "Connection: close" "$url/healthz" | grep -E "Requests/sec|50%|90%|99%|Non-2xx|errors"
fi
