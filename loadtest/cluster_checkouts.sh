#!/usr/bin/env bash
# Successful checkouts through 1, 2 and 3 nodes (`--node-id`, one stock leased from MySQL) against
# one node without `--node-id`, with MySQL as the journal and with --mysql-write-behind, in one
# run: every node (and the baseline) uses the same MariaDB and Redis. On one machine the nodes
# share its cores, so this measures what several nodes cost, not how they scale.
# For each configuration: a fresh database `turnstile_nodes_wrk` (migrated), release-build nodes on
# 127.0.0.1, the wrk products (HOT and S0..S9999, stock 10,000,000 each) PUT through the first
# node, then (c) successful checkouts on the one hot SKU and (b) over the 10,000 SKUs, each for
# DURATION after WARMUP (default 10s, not measured: a SKU's first sale on a node waits for its
# first lease, 20,000 of them for (b) on 2 nodes), one wrk per node with CONNECTIONS/N
# connections, a new Idempotency-Key per request.
# Prints req/s in all, the worst node's p99, and the lease grants the nodes took
# (turnstile_cluster_lease_grants_total) per second.
# Needs wrk, mysql, redis-cli, python3; MariaDB at 127.0.0.1:3306 (root), Redis at 127.0.0.1:6379.
# With TURNSTILE_BIN=path, that binary runs (no build). With MODES="journal" (or "write-behind")
# only that journal is measured; NODES="1 3" picks the node counts; SCENARIOS="c" runs the hot
# SKU alone (and PUTs only it: the 10,000 PUTs through MySQL take a while).
# Usage: [TURNSTILE_BIN=...] [MODES=...] [NODES=...] loadtest/cluster_checkouts.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
connections=${2:-60}
warmup=${WARMUP:-10s}
modes=${MODES:-journal write-behind}
counts=${NODES:-1 2 3}
scenarios=${SCENARIOS:-c b}
. loadtest/common.sh
need wrk mysql redis-cli python3 curl
bin=$(turnstile_bin)
db=turnstile_nodes_wrk
url="mysql://root@127.0.0.1:3306/$db"
data=$(mktemp -d -p target nodes-wrk.XXXXXX)
pids=()
prefix=
stop_nodes() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
  if [ -n "$prefix" ]; then
    redis-cli --scan --pattern "$prefix*" | xargs -r -n 500 redis-cli del > /dev/null
  fi
}
cleanup() {
  stop_nodes
  mysql -uroot -e "DROP DATABASE IF EXISTS $db"
  rm -rf "$data"
}
trap cleanup EXIT

grants() { # addresses: the lease grants of every node, summed
  local sum=0 n
  for addr in "$@"; do
    n=$(curl -sf "http://$addr/metrics" | awk '/^turnstile_cluster_lease_grants_total /{print $2}')
    sum=$((sum + ${n:-0}))
  done
  echo "$sum"
}

# run MODE NODES (NODES=0: one node without --node-id)
run() {
  local mode=$1 nodes=$2 label addrs=() i
  mysql -uroot -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
  "$bin" migrate --mysql-url "$url" > /dev/null
  prefix="bench:nodes:$$:$mode:$nodes:"
  local journal=(--mysql-url "$url")
  [ "$mode" = write-behind ] && journal+=(--mysql-write-behind)
  local count=$nodes
  [ "$nodes" = 0 ] && count=1
  for i in $(seq 1 "$count"); do
    local cluster=()
    [ "$nodes" = 0 ] || cluster=(--node-id "node-$i" --cluster-secret bench)
    rm -rf "$data/n$i"
    "$bin" serve --listen 127.0.0.1:0 --data-dir "$data/n$i" "${journal[@]}" \
      --redis-url redis://127.0.0.1:6379 --redis-prefix "$prefix" "${cluster[@]}" \
      > "$data/n$i.out" 2> "$data/n$i.log" &
    pids+=($!)
    for _ in $(seq 1 100); do grep -q "listening on" "$data/n$i.out" && break; sleep 0.1; done
    local addr
    addr=$(sed -n 's/^listening on //p' "$data/n$i.out")
    [ -n "$addr" ] || { echo "node $i did not start:" >&2; cat "$data/n$i.log" >&2; exit 1; }
    addrs+=("$addr")
  done
  if [[ " $scenarios " == *" b "* ]]; then
    python3 loadtest/wrk/setup_products.py "http://${addrs[0]}" > /dev/null
  else
    curl -sf -X PUT "http://${addrs[0]}/v1/products/HOT" \
      -d '{"name":"HOT","price_cents":1999,"currency":"EUR","stock":10000000}' > /dev/null
    curl -sf -X PUT "http://${addrs[0]}/v1/products/S9999" \
      -d '{"name":"S9999","price_cents":1999,"currency":"EUR","stock":10000000}' > /dev/null
  fi
  # Every node knows the catalogue (it reads MySQL every 200 ms).
  for addr in "${addrs[@]}"; do
    for _ in $(seq 1 100); do curl -sf "http://$addr/v1/products/S9999" > /dev/null && break; sleep 0.1; done
  done
  label="one node, no --node-id"
  [ "$nodes" = 0 ] || label="$nodes node(s), --node-id"
  local per=$((connections / count)) scenario
  # (c) first: (b)'s 10,000 SKUs keep the nodes taking first leases for a while after it.
  for scenario in $scenarios; do
    local script=(-s loadtest/wrk/steady.lua) args=() g0 g1 outs=()
    [ "$scenario" = c ] && script=(-s loadtest/wrk/one_sku.lua)
    # Warm-up, not measured: the first sale of a SKU on a node waits for its first lease.
    for i in "${!addrs[@]}"; do
      args=("w$i")
      [ "$scenario" = c ] && args=(HOT "w$i")
      wrk -t1 -c"$per" -d"$warmup" "${script[@]}" "http://${addrs[$i]}" -- "${args[@]}" > /dev/null &
      outs+=($!)
    done
    for pid in "${outs[@]}"; do wait "$pid"; done
    outs=()
    g0=$(grants "${addrs[@]}")
    for i in "${!addrs[@]}"; do
      args=("n$i")
      [ "$scenario" = c ] && args=(HOT "n$i")
      wrk -t1 -c"$per" -d"$duration" --latency "${script[@]}" "http://${addrs[$i]}" -- "${args[@]}" > "$data/wrk$i" &
      outs+=($!)
    done
    for pid in "${outs[@]}"; do wait "$pid"; done
    g1=$(grants "${addrs[@]}")
    local total=0 p99=0 errors=0 secs=${duration%s}
    for i in "${!addrs[@]}"; do
      total=$(awk -v t="$total" '/^Requests\/sec/{printf "%.0f", t + $2}' "$data/wrk$i")
      p99=$(awk -v p="$p99" '$1 == "99%" {v = $2; if (v ~ /us$/) v = v / 1000; else if (v ~ /ms$/) v = v + 0; else if (v ~ /s$/) v = v * 1000; if (v > p) p = v} END {print p + 0}' "$data/wrk$i")
      errors=$((errors + $(awk '/Non-2xx/{print $5}' "$data/wrk$i" | tr -d '\n' || true) + 0))
    done
    printf "%-13s %-24s (%s) %8s req/s  p99 %6.1f ms  non-2xx %-7s lease grants %s/s\n" \
      "$mode" "$label" "$scenario" "$total" "$p99" "$errors" "$(( (g1 - g0) / secs ))"
  done
  stop_nodes
}

echo "$(nproc) cores; $duration per scenario after a $warmup warm-up; $connections connections in all; (b) 10,000 SKUs, (c) one hot SKU"
for mode in $modes; do
  run "$mode" 0
  for n in $counts; do run "$mode" "$n"; done
done
