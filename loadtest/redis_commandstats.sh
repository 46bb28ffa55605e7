#!/usr/bin/env bash
# What one steady checkout costs inside Redis: runs scenario (b) of loadtest/wrk/run.sh (successful
# checkouts on 10,000 SKUs, wrk 1 thread, 64 connections) against one release build with
# --redis-url, resets Redis's INFO commandstats after a 2 s warm-up, and prints per wrk request the
# commands Redis ran and the time it spent inside each (a script's own count includes the
# commands it ran, which are counted under their names too). The run's
# keys are deleted afterwards.
# Needs wrk and Redis (REDIS_URL, default redis://127.0.0.1:6379; its stats are reset).
# Usage: [REDIS_URL=...] [TURNSTILE_BIN=path] loadtest/redis_commandstats.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
duration=${1:-8s}
redis=${REDIS_URL:-redis://127.0.0.1:6379}
need wrk redis-cli python3
redis-cli -u "$redis" ping > /dev/null || { echo "Redis does not answer at $redis" >&2; exit 1; }
bin=$(turnstile_bin)
data=$(mktemp -d -p target cs-data.XXXXXX)
prefix="bench:cs:$$:$(date +%s):"
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  redis-cli -u "$redis" --scan --pattern "$prefix*" | xargs -r -n 500 redis-cli -u "$redis" del > /dev/null
  rm -rf "$data" "$data.out" "$data.log" "$data.stats"
}
trap cleanup EXIT
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" --redis-url "$redis" --redis-prefix "$prefix" > "$data.out" 2> "$data.log" &
server=$!
for _ in $(seq 1 100); do grep -q "listening on" "$data.out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$data.out")
[ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$data.log" >&2; exit 1; }
python3 loadtest/wrk/setup_products.py "http://$addr" > /dev/null
wrk -t1 -c64 -d2s -s loadtest/wrk/steady.lua "http://$addr" > /dev/null
redis-cli -u "$redis" config resetstat > /dev/null
result=$(wrk -t1 -c64 -d"$duration" -s loadtest/wrk/steady.lua "http://$addr")
redis-cli -u "$redis" info commandstats > "$data.stats"
requests=$(echo "$result" | awk '/requests in/ {print $1}')
echo "$result" | grep "Requests/sec"
awk -v n="$requests" -F'[=,:]' '
  /^cmdstat_(evalsha|get|set|del|pexpire|pttl):/ { sub("cmdstat_", "", $1); printf "%s: %.3f calls and %.2f us inside Redis per request\n", toupper($1), $3 / n, $5 / n }
' "$data.stats"
