#!/usr/bin/env bash
# The RabbitMQ relay's cost on the checkout path, in one run: the harness's flash-sale scenario
# (open model, RATE requests/s, DURATION) against one release build with the relay off, then on
# (--amqp-url, an exchange of its own per run), alternating, ROUNDS times; STOCK units of the hot
# SKU (default 20000). With the relay on it
# also samples the outbox lag (turnstile_amqp_lag_events, _seconds) every 0.5 s during the run and
# reports the largest, how long the lag took to drain after the load stopped, and the CPU the
# relay's thread and RabbitMQ (beam.smp) used meanwhile (in core-seconds, from /proc).
# Needs RabbitMQ (AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f); the run's queues are
# deleted with rabbitmqctl afterwards.
# Usage: [TURNSTILE_BIN=path] loadtest/amqp_compare.sh [DURATION] [RATE] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
rate=${2:-5000}
rounds=${3:-2}
amqp=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
bin=${TURNSTILE_BIN:-target/release/turnstile}
[ -n "${TURNSTILE_BIN:-}" ] || cargo build --release --quiet --bin turnstile
cargo build --release --quiet -p loadtest
dir=$(mktemp -d)
server=
exchanges=()
cleanup() {
  [ -z "$server" ] || { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; }
  for x in "${exchanges[@]}"; do
    for q in "$x.all" "$x.dead"; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
  done
  rm -rf "$dir"
}
trap cleanup EXIT
wait_line() { for _ in $(seq 1 100); do grep -q "listening on" "$1" && break; sleep 0.1; done; sed -n 's/^listening on //p' "$1"; }
ticks() { awk '{print $14 + $15}' "$1" 2>/dev/null || echo 0; }
beam=$(pgrep -f beam.smp | head -1 || true)
metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
run() { # name, then serve options
  local name=$1; shift
  rm -rf "$dir/data"
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$dir/data" "$@" > "$dir/out" 2> "$dir/log" &
  server=$!
  local addr; addr=$(wait_line "$dir/out")
  [ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$dir/log" >&2; exit 1; }
  echo "### $name"
  local sampler= beam0; beam0=$(ticks "/proc/$beam/stat")
  if [ "$#" -gt 0 ]; then
    ( while kill -0 "$server" 2>/dev/null; do
        echo "$(metric "$addr" turnstile_amqp_lag_events) $(metric "$addr" turnstile_amqp_lag_seconds)"
        sleep 0.5
      done ) > "$dir/lag" &
    sampler=$!
  fi
  target/release/loadtest flash-sale --model open --rate "$rate" --duration "$duration" \
    --stock "${STOCK:-20000}" --target "http://$addr" 2>&1 | grep -vE "^(checked|setting up)"
  if [ -n "$sampler" ]; then
    local t0; t0=$(date +%s.%N)
    for _ in $(seq 1 600); do [ "$(metric "$addr" turnstile_amqp_lag_events)" = "0" ] && break; sleep 0.1; done
    local t1; t1=$(date +%s.%N)
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    local relay_ticks=0 task
    for task in /proc/"$server"/task/*; do
      [ "$(cat "$task/comm" 2>/dev/null)" = "amqp-relay" ] && relay_ticks=$(ticks "$task/stat")
    done
    echo "CPU: relay thread $(echo "scale=2; $relay_ticks / 100" | bc) s, RabbitMQ $(echo "scale=2; ($(ticks "/proc/$beam/stat") - $beam0) / 100" | bc) s"
    awk -v drain="$(echo "$t1 - $t0" | bc)" '
      $1 > e { e = $1 } $2 > s { s = $2 }
      END { printf "outbox lag during the run: at most %d events, %.2f s; drained %.1f s after the load stopped\n", e, s, drain }' "$dir/lag"
  fi
  kill "$server"; wait "$server" 2>/dev/null || true; server=
}
for round in $(seq 1 "$rounds"); do
  run "round $round, relay off"
  exchange="bench.amqp_compare.$$.$round"; exchanges+=("$exchange")
  run "round $round, relay on" --amqp-url "$amqp" --amqp-exchange "$exchange"
done
