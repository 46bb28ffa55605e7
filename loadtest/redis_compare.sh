#!/usr/bin/env bash
# What Redis costs, in one run: loadtest/wrk/run.sh (GET /healthz, (a) the sold-out flood, (b)
# successful checkouts on 10,000 SKUs, (c) on one hot SKU, (e) cart operations) against one
# release build with carts in process, then with --redis-url (carts, submission locks and answers
# in Redis: one round trip per checkout), alternating, ROUNDS times.
# Needs wrk and Redis (REDIS_URL, default redis://127.0.0.1:6379); each run's keys are deleted.
# With BASELINE_BIN=path (another build, e.g. the commit before a change), each round also runs
# that build with --redis-url, right after this one's: the change measured pair by pair.
# Usage: [REDIS_URL=...] [SCENARIOS=...] [BASELINE_BIN=...] loadtest/redis_compare.sh [DURATION] [ROUNDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
rounds=${2:-2}
connections=${3:-64}
redis=${REDIS_URL:-redis://127.0.0.1:6379}
redis-cli -u "$redis" ping > /dev/null || { echo "Redis does not answer at $redis" >&2; exit 1; }
baseline=${BASELINE_BIN:-}
[ -z "$baseline" ] || [ -x "$baseline" ] || { echo "BASELINE_BIN=$baseline is not an executable" >&2; exit 2; }
cargo build --release --quiet --bin turnstile
for round in $(seq 1 "$rounds"); do
  echo "##### round $round: carts in process"
  REDIS_URL= TURNSTILE_BIN=target/release/turnstile loadtest/wrk/run.sh "$duration" "$connections"
  echo; echo "##### round $round: --redis-url $redis"
  REDIS_URL=$redis TURNSTILE_BIN=target/release/turnstile loadtest/wrk/run.sh "$duration" "$connections"
  echo
  if [ -n "$baseline" ]; then
    echo "##### round $round: BASELINE_BIN=$baseline, --redis-url $redis"
    REDIS_URL=$redis TURNSTILE_BIN=$baseline loadtest/wrk/run.sh "$duration" "$connections"
    echo
  fi
done
