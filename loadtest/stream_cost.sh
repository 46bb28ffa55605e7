#!/usr/bin/env bash
# What open live stock streams cost the sold-out flood (API.md "Live stock": a stream costs the
# checkout path nothing it would not pay without streams). One release server; the flood (wrk, 1
# thread, 64 connections, checkouts of the sold-out SKU, loadtest/wrk/one_sku.lua) runs alternately
# without streams (A) and with STREAMS streams of that SKU held open by
# loadtest/wrk/hold_streams.py (B), in ABBA order, ROUNDS pairs. Prints each run's req/s, p99 and
# the server's CPU per request, then the medians and the B/A ratio of each pair.
# Bounded: every run lasts DURATION; the holder stops itself after DURATION + 120 s.
# Usage: loadtest/stream_cost.sh [STREAMS] [DURATION] [ROUNDS]     (needs wrk and python3)
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
streams=${1:-10000}
duration=${2:-8s}
rounds=${3:-3}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }
# The server and the holder each need a descriptor per stream (each its own process and limit).
want=$((streams + 4096))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && (( hard < want )); then
  echo "the file limit's hard bound ($hard) is below $want: lower STREAMS or raise it" >&2
  exit 2
fi
ulimit -n "$want"
cargo build --release --quiet --bin turnstile
dir=$(mktemp -d)
server=
holder=
cleanup() {
  [ -z "$holder" ] || kill "$holder" 2>/dev/null || true
  [ -z "$server" ] || kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
serve_release "$dir"
ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }
seconds=${duration%s}
run() { # A or B
  local label=$1 t0 result requests rps p99
  if [ "$label" = B ]; then
    python3 loadtest/wrk/hold_streams.py "$url" SOLDOUT "$streams" $((seconds + 120)) > "$dir/holder" &
    holder=$!
    for _ in $(seq 1 600); do grep -q "holding" "$dir/holder" && break; sleep 0.2; done
    grep -q "holding" "$dir/holder" || { echo "the streams did not open" >&2; exit 1; }
  fi
  t0=$(ticks)
  result=$(wrk -t1 -c64 -d"$duration" --latency -s loadtest/wrk/one_sku.lua "$url" -- SOLDOUT)
  requests=$(echo "$result" | awk '/requests in/ {print $1}')
  rps=$(echo "$result" | sed -n 's/Requests\/sec: *//p')
  p99=$(echo "$result" | awk '$1 == "99%" {print $2}')
  awk -v l="$label" -v r="$rps" -v p="$p99" -v s="$(( $(ticks) - t0 ))" -v n="$requests" \
    -v hz="$(getconf CLK_TCK)" -v k="$streams" 'BEGIN {
      printf "%s %s %.0f req/s  p99 %s  server CPU %.2f us/request\n", l, (l == "B" ? k " streams" : "no streams"), r, p, s / hz * 1e6 / n }'
  if [ "$label" = B ]; then
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    holder=
  fi
}
echo "machine: $(nproc) cores; server $url (release build); wrk 1 thread, 64 connections, $duration per run; B holds $streams streams on the sold-out SKU"
out="$dir/runs"
abba_rounds "$rounds" "$out"
abba_summary "$out" 6
