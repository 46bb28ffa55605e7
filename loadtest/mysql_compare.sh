#!/usr/bin/env bash
# Successful checkouts with MySQL, side by side in one run, with wrk on 127.0.0.1 (1 thread,
# CONNECTIONS connections, DURATION per scenario):
#   embedded      Turnstile on its embedded journal (the ceiling);
#   mysql         Turnstile with --mysql-url (MySQL is the journal);
#   write-behind  Turnstile with --mysql-url --mysql-write-behind;
#   redis-lua     the harness's reference of the "Redis Lua decrement + INSERT" design.
# Scenarios: (b) one item of 10,000 SKUs; (c) one hot SKU; stock ample in both; tok_ok.
# Each target gets a database of its own (turnstile_cmp_*), created afresh on the machine's
# MariaDB (MYSQL_URL, default mysql://root@127.0.0.1:3306). Per MySQL target it reports what
# MariaDB wrote per order placed (rows inserted + updated, redo log bytes: the server's
# Innodb_* counters, so nothing else may write to MariaDB meanwhile), and for Turnstile how far
# the MySQL applier was behind when the load stopped and how long it took to drain; and the CPU the
# server and MariaDB used during each run (in cores, from /proc).
# Each run is bounded by DURATION; ROUNDS alternates the targets in ABBA order.
# Usage: loadtest/mysql_compare.sh [DURATION] [CONNECTIONS] [ROUNDS]
# With TURNSTILE_BIN=path, that binary is measured as Turnstile (default: this tree's release build).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
connections=${2:-64}
rounds=${3:-1}
server_url=${MYSQL_URL:-mysql://root@127.0.0.1:3306}
server_url=${server_url%/}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }
bin=${TURNSTILE_BIN:-target/release/turnstile}
[ -n "${TURNSTILE_BIN:-}" ] || cargo build --release --quiet --bin turnstile
cargo build --release --quiet -p loadtest
work=$(mktemp -d -p target mysql-compare.XXXXXX)
server=
stop_server() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=; fi
}
trap 'stop_server; rm -rf "$work"' EXIT

sql() { python3 - "$server_url" "$1" <<'PY'
import subprocess, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
args = ["mariadb", "-N", "-h", u.hostname or "127.0.0.1", "-P", str(u.port or 3306), "-u", u.username or "root"]
if u.password:
    args.append("-p" + u.password)
print(subprocess.run(args + ["-e", sys.argv[2]], check=True, capture_output=True, text=True).stdout.strip())
PY
}

innodb_counters() {
  sql "SELECT SUM(IF(VARIABLE_NAME IN ('HANDLER_WRITE','HANDLER_UPDATE'), VARIABLE_VALUE, 0)), SUM(IF(VARIABLE_NAME='INNODB_OS_LOG_WRITTEN', VARIABLE_VALUE, 0)) FROM information_schema.GLOBAL_STATUS"
}

ticks() { # ticks PID: CPU time used so far (utime + stime, in clock ticks)
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

metric() { # metric ADDR NAME: the value of one sample in /metrics
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
for line in urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode().splitlines():
    if line.startswith(sys.argv[2] + " "):
        print(line.split()[1]); break
else:
    print("0")
PY
}

# start TARGET: starts it on a fresh database; sets $server and $addr.
start() {
  local target=$1 db="turnstile_cmp_${1//-/_}"
  sql "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
  local out="$work/$target.out" log="$work/$target.log"
  rm -rf "$work/$target.data"
  case $target in
    embedded) "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/$target.data" > "$out" 2> "$log" & ;;
    mysql|write-behind)
      "$bin" migrate --mysql-url "$server_url/$db" 2>/dev/null
      local extra=()
      [ "$target" = write-behind ] && extra=(--mysql-write-behind)
      "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/$target.data" --mysql-url "$server_url/$db" "${extra[@]}" > "$out" 2> "$log" & ;;
    redis-lua)
      target/release/loadtest serve-reference --kind redis-lua --mysql-url "$server_url/$db" > "$out" 2> "$log" & ;;
  esac
  server=$!
  for _ in $(seq 1 200); do grep -q "listening on" "$out" && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$out")
  [ -n "$addr" ] || { echo "$target did not start:" >&2; cat "$log" >&2; exit 1; }
  python3 loadtest/wrk/setup_products.py "http://$addr" >/dev/null
}

# run TARGET SCENARIO: one wrk run; prints one line.
run() {
  local target=$1 scenario=$2 script args=()
  case $scenario in
    b) script=loadtest/wrk/steady.lua ;;
    c) script=loadtest/wrk/one_sku.lua; args=(-- HOT) ;;
  esac
  local before after
  before=$(innodb_counters)
  local mariadbd server_ticks0 db_ticks0 t0 result
  mariadbd=$(pgrep -x mariadbd | head -1)
  server_ticks0=$(ticks "$server"); db_ticks0=$(ticks "$mariadbd"); t0=$(date +%s.%N)
  result=$(wrk -t1 -c"$connections" -d"$duration" --latency -s "$script" "http://$addr" "${args[@]}")
  local cpu
  cpu=$(python3 -c "import os; hz = os.sysconf('SC_CLK_TCK'); wall = $(date +%s.%N) - $t0; print(f'CPU: server {($(ticks "$server") - $server_ticks0) / hz / wall:.2f}, MariaDB {($(ticks "$mariadbd") - $db_ticks0) / hz / wall:.2f} cores')")
  local rps p99 non2xx
  rps=$(sed -n 's/^Requests\/sec: *//p' <<<"$result")
  p99=$(awk '$1=="99%"{print $2}' <<<"$result")
  non2xx=$(sed -n 's/.*Non-2xx or 3xx responses: *//p' <<<"$result")
  local extra=""
  if [ "$target" = mysql ] || [ "$target" = write-behind ]; then
    local behind t0 t1
    behind=$(metric "$addr" turnstile_mysql_lag_records)
    t0=$(date +%s.%N)
    for _ in $(seq 1 1200); do [ "$(metric "$addr" turnstile_mysql_lag_records)" = 0 ] && break; sleep 0.1; done
    t1=$(date +%s.%N)
    extra=$(printf "; MySQL behind at the end: %s records, drained in %.1f s" "$behind" "$(echo "$t1 - $t0" | bc)")
  fi
  after=$(innodb_counters)
  local orders
  orders=$(python3 -c "import re; print(round(float('$rps') * float(re.sub('[a-z]', '', '$duration')) ))" 2>/dev/null || echo 0)
  local rows bytes
  read -r rows_b bytes_b <<<"$before"
  read -r rows_a bytes_a <<<"$after"
  rows=$(python3 -c "print(f'{($rows_a - $rows_b) / max($orders, 1):.1f}')")
  bytes=$(python3 -c "print(f'{($bytes_a - $bytes_b) / max($orders, 1):.0f}')")
  printf "%-13s (%s) %10s req/s  p99 %8s  non-2xx %s; %s; MariaDB per order: %s rows, %s redo bytes%s\n" \
    "$target" "$scenario" "$rps" "$p99" "${non2xx:-0}" "$cpu" "$rows" "$bytes" "$extra"
}

echo "machine: $(nproc) cores; wrk 1 thread, $connections connections, $duration per run; MariaDB $(sql 'SELECT VERSION()') at $server_url"
# TARGETS="mysql redis-lua" picks targets (an older binary has no write-behind).
targets=(${TARGETS:-embedded mysql write-behind redis-lua})
for round in $(seq 1 "$rounds"); do
  order=("${targets[@]}")
  if [ $((round % 2)) = 0 ]; then order=(); for ((i=${#targets[@]}-1; i>=0; i--)); do order+=("${targets[$i]}"); done; fi
  echo "== round $round"
  for target in "${order[@]}"; do
    start "$target"
    run "$target" b
    run "$target" c
    if [ "$target" = write-behind ]; then
      echo "               write-behind lag when applied: $(python3 - "$addr" <<'PY'
import sys, urllib.request
buckets = []
for line in urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode().splitlines():
    if line.startswith("turnstile_mysql_lag_at_apply_seconds_bucket"):
        le = line.split('le="')[1].split('"')[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
total = buckets[-1][1] if buckets else 0
def q(p):
    for le, n in buckets:
        if n >= p * total:
            return le
print(f"p50 <= {q(0.5)} s, p99 <= {q(0.99)} s over {int(total)} applied runs (histogram bucket bounds)")
PY
)"
    fi
    stop_server
  done
done
