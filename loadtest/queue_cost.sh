#!/usr/bin/env bash
# What a waiting room's refusals cost (issue 29: "a queued SKU's checkout without a valid ticket
# costs no more than a sold-out refusal"). One release server; a flood of checkouts (wrk, 1
# thread, 64 connections, loadtest/wrk/one_sku.lua, a new Idempotency-Key each) runs alternately
# against the sold-out SKU (A: 409 out_of_stock) and against a SKU with units and an
# admission_rate, without a ticket (B: 429 queue_required), in ABBA order, ROUNDS pairs. Prints
# each run's req/s, p99 and the server's CPU per request, then the medians and each pair's B/A.
# Bounded: every run lasts DURATION.
# Usage: loadtest/queue_cost.sh [DURATION] [ROUNDS]     (needs wrk and python3)
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
duration=${1:-8s}
rounds=${2:-3}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }
cargo build --release --quiet --bin turnstile
dir=$(mktemp -d)
server=
cleanup() {
  [ -z "$server" ] || kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
serve_release "$dir"
python3 - "$addr" <<'PY'
import http.client, json, sys
host, port = sys.argv[1].rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port))
body = json.dumps({"name": "QUEUED", "price_cents": 1999, "currency": "EUR", "stock": 1000000,
                   "admission_rate": 100})
conn.request("PUT", "/v1/products/QUEUED", body, {"Content-Type": "application/json"})
response = conn.getresponse()
response.read()
assert response.status == 200, response.status
PY
ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }
run() { # A or B
  local label=$1 sku t0 result requests rps p99 statuses
  sku=SOLDOUT; [ "$label" = B ] && sku=QUEUED
  t0=$(ticks)
  result=$(wrk -t1 -c64 -d"$duration" --latency -s loadtest/wrk/one_sku.lua "$url" -- "$sku")
  requests=$(echo "$result" | awk '/requests in/ {print $1}')
  rps=$(echo "$result" | sed -n 's/Requests\/sec: *//p')
  p99=$(echo "$result" | awk '$1 == "99%" {print $2}')
  awk -v l="$label" -v r="$rps" -v p="$p99" -v s="$(( $(ticks) - t0 ))" -v n="$requests" \
    -v hz="$(getconf CLK_TCK)" 'BEGIN {
      printf "%s %s %.0f req/s  p99 %s  server CPU %.2f us/request\n", l, (l == "B" ? "429-queue" : "409-sold-out"), r, p, s / hz * 1e6 / n }'
}
echo "machine: $(nproc) cores; server $url (release build); wrk 1 thread, 64 connections, $duration per run; A: checkouts of the sold-out SKU, B: of a queued SKU without a ticket"
out="$dir/runs"
abba_rounds "$rounds" "$out"
# One check of what B was answered.
python3 - "$addr" <<'PY'
import http.client, json, sys
host, port = sys.argv[1].rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port))
body = json.dumps({"items": [{"sku": "QUEUED", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"})
conn.request("POST", "/v1/checkout", body, {"Content-Type": "application/json", "Idempotency-Key": "queue-cost-check"})
response = conn.getresponse()
print("B's answer:", response.status, json.loads(response.read())["error"])
PY
abba_summary "$out" 5
