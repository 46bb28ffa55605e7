#!/usr/bin/env bash
# Soak: at least ORDERS orders (default 2,000,000) through one release server on the embedded
# journal, with short retentions so that memory must level off within the run. Prints, at the start
# (after a first probe) and at the end: the server's RSS, what memory holds (the /metrics gauges),
# the snapshot and journal sizes on disk, and the p99 of a fixed-rate open-model probe of the
# steady scenario. Not a pass/fail test; the harness still checks its invariants after every run
# (exit 1 if one is broken). Sends load only to 127.0.0.1; every run is bounded in count and time.
#
# Usage: loadtest/soak.sh [ORDERS] [PROBE_RATE]   (env RETENTION, default 10s; KEEP=1 keeps the
# data dir, the server's log and the probes' reports)
set -euo pipefail
cd "$(dirname "$0")/.."

orders=${1:-2000000}
rate=${2:-5000}
retention=${RETENTION:-10s}

echo "soak: building release binaries" >&2
cargo build --release -q -p turnstile -p loadtest
work=$(mktemp -d /tmp/turnstile-soak.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  if [ -n "${KEEP:-}" ]; then echo "soak: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

target/release/turnstile serve --listen 127.0.0.1:0 --data-dir "$work/data" \
  --order-retention "$retention" --idempotency-retention "$retention" \
  --event-retention "$retention" >"$work/out" 2>"$work/log" &
pid=$!
for _ in $(seq 1 100); do
  grep -q '^listening on ' "$work/out" 2>/dev/null && break
  sleep 0.1
done
addr=$(sed -n 's/^listening on //p' "$work/out")
[ -n "$addr" ] || { echo "soak: the server did not start (see $work/log)" >&2; exit 1; }
echo "soak: server $addr, data in $work/data, retentions $retention" >&2

gauge() { curl -s "http://$addr/metrics" | awk -v name="$1" '$1 == name { print $2 }'; }
orders_placed() {
  curl -s "http://$addr/metrics" |
    awk '/^turnstile_http_requests_total\{route="\/v1\/checkout",status="201"\}/ { n += $2 } END { print n + 0 }'
}
bytes() { cat "$@" 2>/dev/null | wc -c; }
p99() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.2f ms p99, %.0f req/s" % (r["all"]["p99_ms"], r["throughput_rps"]))' "$1"; }

probe() {
  echo "soak: probe $1 (open model, $rate req/s, 20 s) from $(date +%T)" >&2
  target/release/loadtest steady --target "$addr" --rate "$rate" --duration 20s \
    --requests $((rate * 20)) --out "$work/$1" >"$work/$1.txt"
}

measure() {
  printf '| %s | %s | %s MiB | %s | %s | %s | %s | %s KiB | %s MiB | %s |\n' "$1" "$(orders_placed)" \
    "$(($(awk '/VmRSS/ { print $2 }' "/proc/$pid/status") / 1024))" \
    "$(gauge turnstile_orders_in_memory)" "$(gauge turnstile_idempotency_keys_in_memory)" \
    "$(gauge turnstile_events_in_memory)" "$(gauge turnstile_rejections_in_memory)" \
    "$(($(bytes "$work"/data/snapshot-*) / 1024))" "$(($(bytes "$work"/data/*.wal) / 1048576))" \
    "$(p99 "$work/$1/report.json")"
}

probe start
start_row=$(measure start)
remaining=$((orders - $(orders_placed)))
echo "soak: bulk: $remaining more orders (closed model, 64 connections)" >&2
target/release/loadtest steady --target "$addr" --model closed --connections 64 \
  --requests "$remaining" --duration 900s >"$work/bulk.txt"
tail -n +1 "$work/bulk.txt" | head -3 >&2
probe end
end_row=$(measure end)
# A second probe at the end: a snapshot (it folds the segments written since the last one) may
# overlap either; the log's snapshot times say which.
probe end-again
again_row=$(measure end-again)

echo "| when | orders placed | RSS | orders in memory | keys in memory | events in memory | rejections in memory | snapshot | journal on disk | probe |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
echo "$start_row"
echo "$end_row"
echo "$again_row"
echo
echo "snapshots written (UTC):"
grep 'journal snapshot written' "$work/log" | cut -c12-19 | tr '\n' ' '
echo
