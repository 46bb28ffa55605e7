#!/usr/bin/env bash
# The two runtimes side by side at the same offered load (wrk, 1 thread, CONNECTIONS connections,
# DURATION per scenario, through loadtest/wrk/run.sh): per-core pinned (the default: one worker per
# physical core), per-core unpinned (--no-pin), per-core with one pinned worker (--workers 1: on a
# box whose other core runs the load generator) and shared (--runtime shared). ROUNDS rounds, the
# configurations in ABCD then DCBA order. Prints per scenario: req/s, p99 and the server's CPU per
# request. SCENARIOS (run.sh's) picks scenarios, e.g. SCENARIOS="healthz a" for the flash-sale
# target: the sold-out flood against the shared runtime's /healthz.
# Usage: [SCENARIOS=...] loadtest/runtime_compare.sh [DURATION] [CONNECTIONS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
connections=${2:-64}
rounds=${3:-2}
cargo build --release --quiet --bin turnstile
configs=("per-core" "per-core-unpinned" "per-core-1-worker" "shared")
run() {
  local config=$1 env=()
  case $config in
    per-core) env=(TURNSTILE_RUNTIME=per-core) ;;
    per-core-unpinned) env=(TURNSTILE_RUNTIME=per-core TURNSTILE_NO_PIN=true) ;;
    per-core-1-worker) env=(TURNSTILE_RUNTIME=per-core TURNSTILE_WORKERS=1) ;;
    shared) env=(TURNSTILE_RUNTIME=shared) ;;
  esac
  env "${env[@]}" TURNSTILE_BIN=target/release/turnstile loadtest/wrk/run.sh "$duration" "$connections" 2>&1 |
    awk -v config="$config" '
      /^== /        { scenario = $2 == "GET" ? "healthz" : $2 }
      /^ *99%/      { p99 = $2 }
      /^Requests\/sec/ { rps = $2 }
      /CPU per request/ { cpu = $0; sub(/.*request: /, "", cpu); printf "%-18s %-8s %10.0f req/s  p99 %9s  CPU per request: %s\n", config, scenario, rps, p99, cpu }'
}
echo "machine: $(nproc) cores; wrk 1 thread, $connections connections, $duration per scenario"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  order=("${configs[@]}")
  if (( round % 2 == 0 )); then order=("shared" "per-core-1-worker" "per-core-unpinned" "per-core"); fi
  for config in "${order[@]}"; do run "$config"; done
done
