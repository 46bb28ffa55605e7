#!/usr/bin/env bash
# The sold-out flood through 3 nodes (`--node-id`, MySQL as the journal, one Redis): what a refused
# request costs MySQL and Redis. Starts 3 release-build nodes on 127.0.0.1 on a fresh database
# `turnstile_cluster_wrk` (migrated), a product with stock 0 (sold out), then counts MySQL's
# statements (SHOW GLOBAL STATUS: Com_select, Com_insert, Com_update, Com_commit) and Redis's
# commands (INFO commandstats) over DURATION idle (the nodes' own renewals, catalogue reads and
# lease looks) and over DURATION of wrk's flood (one wrk per node, CONNECTIONS/3 connections each,
# a new Idempotency-Key per request): the difference is what the refusals cost.
# Needs wrk, mysql, redis-cli; MariaDB at 127.0.0.1:3306 (root), Redis at 127.0.0.1:6379.
# With TURNSTILE_BIN=path, that binary runs (no build).
# Usage: [TURNSTILE_BIN=...] loadtest/cluster_soldout.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
connections=${2:-60}
per_node=$((connections / 3))
. loadtest/common.sh
need wrk mysql redis-cli
bin=$(turnstile_bin)
db=turnstile_cluster_wrk
url="mysql://root@127.0.0.1:3306/$db"
prefix="bench:cluster:$$:"
data=$(mktemp -d -p target cluster-wrk.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  redis-cli --scan --pattern "$prefix*" | xargs -r -n 500 redis-cli del > /dev/null
  mysql -uroot -e "DROP DATABASE IF EXISTS $db"
  rm -rf "$data"
}
trap cleanup EXIT
mysql -uroot -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
"$bin" migrate --mysql-url "$url" > /dev/null
addrs=()
for n in a b c; do
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$data/$n" --mysql-url "$url" \
    --redis-url redis://127.0.0.1:6379 --redis-prefix "$prefix" --node-id "node-$n" \
    --cluster-secret bench --workers 1 > "$data/$n.out" 2> "$data/$n.log" &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q "listening on" "$data/$n.out" && break; sleep 0.1; done
  addrs+=("$(sed -n 's/^listening on //p' "$data/$n.out")")
done
curl -sf -X PUT "http://${addrs[0]}/v1/products/SOLDOUT" \
  -d '{"name":"sold out","price_cents":100,"currency":"EUR","stock":0}' > /dev/null
for addr in "${addrs[@]}"; do
  for _ in $(seq 1 50); do curl -sf "http://$addr/v1/products/SOLDOUT" > /dev/null && break; sleep 0.1; done
done
mysql_counts() {
  mysql -uroot -N -e "SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_select','Com_insert','Com_update','Com_commit')" \
    | awk '{printf "%s=%s ", $1, $2}'
}
redis_counts() {
  redis-cli info commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_/{total+=$3; if ($1 ~ /evalsha|eval$|set$|del$|get$|pttl$/) printf "%s=%s ", $1, $3} END {printf "total=%s", total}'
}
seconds=${duration%s}
echo "idle $duration (3 nodes renewing, reading the catalogue, looking for dead nodes):"
m0=$(mysql_counts); r0=$(redis_counts)
sleep "$seconds"
m1=$(mysql_counts); r1=$(redis_counts)
echo "  MySQL before: $m0"; echo "  MySQL after:  $m1"
echo "  Redis before: $r0"; echo "  Redis after:  $r1"
echo "flood $duration: $connections connections, $per_node per node, a sold-out SKU, a new key per request:"
outs=()
for i in 0 1 2; do
  wrk -t1 -c"$per_node" -d"$duration" -s loadtest/wrk/one_sku.lua "http://${addrs[$i]}" -- SOLDOUT "n$i" > "$data/wrk$i" &
  outs+=($!)
done
for pid in "${outs[@]}"; do wait "$pid"; done
m2=$(mysql_counts); r2=$(redis_counts)
echo "  MySQL after:  $m2"; echo "  Redis after:  $r2"
total=0
for i in 0 1 2; do
  n=$(awk '/requests in/{print $1}' "$data/wrk$i"); total=$((total + n))
  grep -E "Requests/sec|Non-2xx" "$data/wrk$i" | sed "s/^/  node-$i: /"
done
echo "  requests refused in all: $total"
