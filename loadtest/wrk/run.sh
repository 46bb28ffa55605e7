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
#   (e) cart operations on 1,000 carts: line sets and reads in turn, one create in ten
#       (cart_ops.lua); over plain HTTP only.
# With REDIS_URL=redis://127.0.0.1:6379 set, the server keeps carts, submission locks and answers in
# Redis (--redis-url) under a key prefix of this run's own, deleted afterwards.
# With SCENARIOS="healthz a" (any of healthz a b c d e), only those run.
# Usage: [MYSQL_URL=...] [REDIS_URL=...] [TURNSTILE_BIN=...] [TLS=1] [SCENARIOS=...] loadtest/wrk/run.sh [DURATION] [CONNECTIONS]
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
redis=()
if [ -n "${REDIS_URL:-}" ]; then
  command -v redis-cli >/dev/null || { echo "redis-cli is missing (REDIS_URL: the run's keys are deleted with it)" >&2; exit 2; }
  redis_prefix="bench:wrk:$$:$(date +%s):"
  redis=(--redis-url "$REDIS_URL" --redis-prefix "$redis_prefix")
fi
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  if [ -n "${redis_prefix:-}" ]; then
    redis-cli -u "$REDIS_URL" --scan --pattern "$redis_prefix*" | xargs -r -n 500 redis-cli -u "$REDIS_URL" del > /dev/null
  fi
  rm -rf "$data" "$data.log" "$data.tls" "$data.carts" "$out"
}
trap cleanup EXIT
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
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" "${journal[@]}" "${redis[@]}" "${tls[@]}" > "$out" 2> "$data.log" &
server=$!
for _ in $(seq 1 100); do grep -q "listening on" "$out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$out")
[ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$data.log" >&2; exit 1; }
url="$scheme://$addr"
echo "server at $url (${journal[*]:-embedded journal in $data}${redis:+, carts and keys in Redis under $redis_prefix}${tls:+, self-signed certificate}); $(nproc) cores; wrk 1 thread, $connections connections, $duration"
python3 loadtest/wrk/setup_products.py "$url"
# CPU (user + system, from /proc/<pid>/stat) the server, and a local redis-server when REDIS_URL is
# set, spent per request over each wrk run.
redis_pid=
[ -z "${REDIS_URL:-}" ] || redis_pid=$(pgrep -x redis-server | head -1 || true)
ticks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
user_ticks() { [ -n "$1" ] && awk '{print $14}' "/proc/$1/stat" 2>/dev/null || echo 0; }
measure() { # wrk arguments
  local s0 u0 r0 result requests
  s0=$(ticks "$server"); u0=$(user_ticks "$server"); r0=$(ticks "$redis_pid")
  result=$(wrk -t1 -c"$connections" -d"$duration" --latency "$@")
  echo "$result" | grep -E "Requests/sec|50%|90%|99%|Non-2xx|errors"
  requests=$(echo "$result" | awk '/requests in/ {print $1}')
  awk -v s="$(( $(ticks "$server") - s0 ))" -v u="$(( $(user_ticks "$server") - u0 ))" \
    -v r="$(( $(ticks "$redis_pid") - r0 ))" -v n="$requests" \
    -v hz="$(getconf CLK_TCK)" -v redis="$redis_pid" 'BEGIN {
      if (n > 0) {
        printf "  CPU per request: server %.1f us (user %.1f, kernel %.1f)", s / hz * 1e6 / n,
          u / hz * 1e6 / n, (s - u) / hz * 1e6 / n
        if (redis != "") printf ", redis-server %.1f us", r / hz * 1e6 / n
        printf "\n"
      }
    }'
}
scenarios=" ${SCENARIOS:-healthz a b c d e} "
wanted() { [[ "$scenarios" == *" $1 "* ]]; }
if wanted healthz; then
  echo; echo "== GET /healthz (the HTTP ceiling)"
  measure "$url/healthz"
fi
if wanted a; then
  echo; echo "== (a) checkouts of a sold-out SKU"
  measure -s loadtest/wrk/one_sku.lua "$url" -- SOLDOUT
fi
if wanted b; then
  echo; echo "== (b) successful checkouts, 10,000 SKUs, tok_ok"
  measure -s loadtest/wrk/steady.lua "$url"
fi
if wanted c; then
  echo; echo "== (c) successful checkouts, one hot SKU, tok_ok"
  measure -s loadtest/wrk/one_sku.lua "$url" -- HOT
fi

if [ "$scheme" = http ] && wanted e; then
  echo; echo "== (e) cart operations: line sets and reads in turn, 1 create in 10, 1,000 carts"
  python3 loadtest/wrk/setup_carts.py "$url" "$data.carts" 1000 > /dev/null
  measure -s loadtest/wrk/cart_ops.lua "$url" -- "$data.carts"
fi

if [ "$scheme" = https ] && wanted d; then
  echo; echo "== (d) new TLS handshakes: GET /healthz with Connection: close (Requests/sec = handshakes/s)"
  measure -H "Connection: close" "$url/healthz"
fi
