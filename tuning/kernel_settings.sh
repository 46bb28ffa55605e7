#!/usr/bin/env bash
# Measures the effect of the kernel settings in tuning/CAPACITY.md on this machine: each setting at
# a low value and at the recommended one, in turn (ROUNDS rounds, low then recommended), against a
# fresh `turnstile serve` (this tree's release build, embedded journal) on 127.0.0.1:
#   - net.core.somaxconn 128 vs 4096, net.ipv4.tcp_max_syn_backlog 128 vs 8192 and
#     net.core.netdev_max_backlog 100 vs 16384: a storm of STORM connections at once
#     (tuning/connect_storm.py: answered, p99, how many took >= 1 s) and the kernel's listen-queue
#     overflow counter (TcpExtListenOverflows) over the storm;
#   - the server's file limit (ulimit -n) 1024 vs 20000: the same storm;
#   - net.ipv4.ip_local_port_range 1000 ports vs 32768-60999: the same storm, whose client needs a
#     local port per connection (as a load generator, or a node's outbound pools, do).
# Needs root (sysctl -w); every setting is put back as it was on exit, however the script ends.
# Bounded: each storm is STORM connections and 10 s at most.
# Usage: sudo tuning/kernel_settings.sh [STORM] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
storm=${1:-4000}
rounds=${2:-2}
[ "$(id -u)" = 0 ] || { echo "kernel_settings.sh changes sysctls: run it as root" >&2; exit 2; }
# The storm's client holds a descriptor per connection.
(( $(ulimit -n) > storm + 100 )) || { echo "ulimit -n is $(ulimit -n): raise it above $storm + 100" >&2; exit 2; }
command -v nstat >/dev/null || { echo "nstat is missing: apt-get install iproute2" >&2; exit 2; }
cargo build --release --quiet --bin turnstile
bin=target/release/turnstile
settings=(net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.core.netdev_max_backlog net.ipv4.ip_local_port_range)
declare -A saved
for s in "${settings[@]}"; do saved[$s]=$(sysctl -n "$s"); done
data=$(mktemp -d -p target kernel-data.XXXXXX)
out=$(mktemp)
server=
stop_server() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; server=; fi
}
cleanup() {
  stop_server
  for s in "${settings[@]}"; do sysctl -qw "$s=${saved[$s]}"; done
  rm -rf "$data" "$data.log" "$out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server FILE_LIMIT: a fresh server with that many file descriptors allowed.
start_server() {
  rm -rf "$data"; mkdir -p "$data"; : > "$out"
  (ulimit -n "$1"; exec "$bin" serve --listen 127.0.0.1:0 --data-dir "$data") > "$out" 2> "$data.log" &
  server=$!
  for _ in $(seq 1 100); do grep -q "listening on" "$out" && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$out")
  [ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$data.log" >&2; exit 1; }
}

# measure LABEL FILE_LIMIT: one storm against a fresh server.
measure() {
  start_server "$2"
  nstat -n > /dev/null
  result=$(python3 tuning/connect_storm.py "$addr" "$storm" 10)
  overflows=$(nstat -z TcpExtListenOverflows | awk '/TcpExtListenOverflows/ {print $2}')
  printf '  %-44s %s; listen-queue overflows %s\n' "$1" "$result" "${overflows:-?}"
  stop_server
}

echo "machine: $(nproc) cores; kernel $(uname -r); storm of $storm connections; $rounds rounds"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  sysctl -qw net.core.somaxconn=128;   measure "somaxconn 128" 20000
  sysctl -qw net.core.somaxconn=4096;  measure "somaxconn 4096" 20000
  sysctl -qw net.ipv4.tcp_max_syn_backlog=128;  measure "tcp_max_syn_backlog 128" 20000
  sysctl -qw net.ipv4.tcp_max_syn_backlog=8192; measure "tcp_max_syn_backlog 8192" 20000
  sysctl -qw net.ipv4.tcp_max_syn_backlog="${saved[net.ipv4.tcp_max_syn_backlog]}"
  sysctl -qw net.core.netdev_max_backlog=100;   measure "netdev_max_backlog 100" 20000
  sysctl -qw net.core.netdev_max_backlog=16384; measure "netdev_max_backlog 16384" 20000
  sysctl -qw net.core.netdev_max_backlog="${saved[net.core.netdev_max_backlog]}"
  measure "ulimit -n 1024 (server)" 1024
  measure "ulimit -n 20000 (server)" 20000
  sysctl -qw net.ipv4.ip_local_port_range="40000 40999"; measure "ip_local_port_range 40000-40999" 20000
  sysctl -qw net.ipv4.ip_local_port_range="32768 60999"; measure "ip_local_port_range 32768-60999" 20000
  sysctl -qw net.ipv4.ip_local_port_range="${saved[net.ipv4.ip_local_port_range]}"
done
