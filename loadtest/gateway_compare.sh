#!/usr/bin/env bash
# Durable checkouts (the harness's steady scenario, closed model, 64 connections, DURATION each)
# against one release build with three payment gateways, in one run: the in-process simulator,
# `turnstile gateway-sim` on localhost with no added latency, and the same with 20 ms mean latency
# per call. Each checkout authorises (one gateway call on its path) and, after its commit, captures
# (one more call, off its path).
# Usage: [TURNSTILE_BIN=path] loadtest/gateway_compare.sh [DURATION] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
rounds=${2:-1}
bin=${TURNSTILE_BIN:-target/release/turnstile}
[ -n "${TURNSTILE_BIN:-}" ] || cargo build --release --quiet --bin turnstile
cargo build --release --quiet -p loadtest
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
wait_line() { for _ in $(seq 1 100); do grep -q "listening on" "$1" && break; sleep 0.1; done; sed -n 's/^listening on //p' "$1"; }
run() { # name, then serve options
  local name=$1; shift
  rm -rf "$dir/data"
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$dir/data" "$@" > "$dir/out" 2> "$dir/log" &
  local server=$!
  local addr; addr=$(wait_line "$dir/out")
  [ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$dir/log" >&2; exit 1; }
  echo "### $name"
  target/release/loadtest steady --model closed --connections 64 --duration "$duration" \
    --requests 2000000 --target "http://$addr" 2>&1 | grep -vE "^(checked|setting up)"
  kill "$server"; wait "$server" 2>/dev/null || true
}
for round in $(seq 1 "$rounds"); do
  run "round $round, in-process simulator"
  for latency in 0s 20ms; do
    "$bin" gateway-sim --listen 127.0.0.1:0 --latency "$latency" > "$dir/sim.out" 2> "$dir/sim.log" &
    sim=$!; pids+=("$sim")
    sim_addr=$(wait_line "$dir/sim.out")
    run "round $round, gateway-sim over HTTP, latency $latency" --gateway-url "http://$sim_addr"
    kill "$sim"; wait "$sim" 2>/dev/null || true
  done
done
