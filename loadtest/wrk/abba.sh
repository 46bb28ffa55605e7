#!/usr/bin/env bash
# A/B of two turnstile builds on the two CPU-bound paths, with both servers up at once and wrk
# alternating between them in ABBA order, so a machine that slows down during the run (as shared
# VMs do) weighs on both alike: GET /healthz and (a) checkouts of a sold-out SKU, ROUNDS pairs each.
# Usage: loadtest/wrk/abba.sh BIN_A BIN_B [DURATION] [ROUNDS]     (needs wrk; bounded by DURATION)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { sed -n 2,6p "$0" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }
bins=("$1" "$2")
duration=${3:-8s}
rounds=${4:-4}
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
urls=()
for i in 0 1; do
  "${bins[$i]}" serve --listen 127.0.0.1:0 --data-dir "$dir/data$i" > "$dir/out$i" 2> "$dir/log$i" &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q "listening on" "$dir/out$i" && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$dir/out$i")
  [ -n "$addr" ] || { echo "${bins[$i]} did not start:" >&2; cat "$dir/log$i" >&2; exit 1; }
  urls+=("http://$addr")
  python3 loadtest/wrk/setup_products.py "http://$addr" > /dev/null
done
echo "A=${bins[0]} B=${bins[1]}; wrk 1 thread, 64 connections, $duration per run"
for scenario in healthz soldout; do
  for round in $(seq 1 "$rounds"); do
    order="0 1"; [ $((round % 2)) = 0 ] && order="1 0"
    for i in $order; do
      if [ $scenario = healthz ]; then
        rps=$(wrk -t1 -c64 -d"$duration" "${urls[$i]}/healthz" | sed -n 's/Requests\/sec: *//p')
      else
        rps=$(wrk -t1 -c64 -d"$duration" -s loadtest/wrk/one_sku.lua "${urls[$i]}" -- SOLDOUT | sed -n 's/Requests\/sec: *//p')
      fi
      echo "$scenario round $round $( [ "$i" = 0 ] && echo A || echo B ) $rps req/s"
    done
  done
done
