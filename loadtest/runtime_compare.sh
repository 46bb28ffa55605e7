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
results=$(mktemp)
trap 'rm -f "$results"' EXIT
echo "machine: $(nproc) cores; wrk 1 thread, $connections connections, $duration per scenario"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  order=("${configs[@]}")
  if (( round % 2 == 0 )); then order=("shared" "per-core-1-worker" "per-core-unpinned" "per-core"); fi
  for config in "${order[@]}"; do run "$config" | sed "s/^/$round /" | tee -a "$results" | cut -d' ' -f2-; done
done
# The issue's performance aims, per round: the sold-out flood against the shared runtime's
# /healthz of the same round (>= 100%, p99 <= 2 ms, <= 8 us of server CPU per rejection), and
# successful checkouts (>= 50,000/s, p99 <= 5 ms).
echo "== against the aims (per round)"
awk '
  function ms(t) { return t ~ /us$/ ? t / 1000 : t ~ /ms$/ ? t + 0 : t * 1000 }
  { round = $1; config = $2; scenario = $3; rps = $4; p99 = $7; cpu = $12 + 0
    if (config == "shared" && scenario == "healthz") healthz[round] = rps
    line[++n] = round SUBSEP config SUBSEP scenario SUBSEP rps SUBSEP p99 SUBSEP cpu }
  END {
    for (i = 1; i <= n; i++) {
      split(line[i], f, SUBSEP)
      verdict = ""
      if (f[3] == "(a)" && healthz[f[1]] > 0) {
        ratio = 100 * f[4] / healthz[f[1]]
        verdict = sprintf("flood %.0f%% of shared /healthz (aim >= 100%%), p99 %s (aim <= 2 ms), %.1f us per rejection (aim <= 8)", ratio, f[5], f[6])
        verdict = verdict ((ratio >= 100 && ms(f[5]) <= 2 && f[6] <= 8) ? ": met" : ": not met")
      }
      if (f[3] == "(b)" || f[3] == "(c)") {
        verdict = sprintf("%s successful checkouts/s (aim >= 50,000), p99 %s (aim <= 5 ms)", f[4], f[5])
        verdict = verdict ((f[4] >= 50000 && ms(f[5]) <= 5) ? ": met" : ": not met")
      }
      if (verdict != "") printf "round %s %-18s %-4s %s\n", f[1], f[2], f[3], verdict
    }
  }' "$results"
