#!/usr/bin/env bash
# The harness against one release build, plain HTTP/1.1 then TLS 1.3 + HTTP/2 (h2 by ALPN, a
# self-signed certificate made by openssl), alternating, ROUNDS rounds: flash-sale (nearly all
# answers are 409 sold out) and steady (durable 201s), closed model, 64 connections, DURATION each.
# Usage: [TURNSTILE_BIN=path] loadtest/tls_compare.sh [DURATION] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
rounds=${2:-3}
bin=${TURNSTILE_BIN:-target/release/turnstile}
[ -n "${TURNSTILE_BIN:-}" ] || cargo build --release --quiet --bin turnstile
cargo build --release --quiet -p loadtest
dir=$(mktemp -d)
server=
trap 'if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi; rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null
# run NAME SCHEME [harness options...] [-- server options...]
run() {
  local name=$1 scheme=$2; shift 2
  local client=() serve=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do client+=("$1"); shift; done
  [ $# -gt 0 ] && shift && serve=("$@")
  rm -rf "$dir/data"
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$dir/data" "${serve[@]}" > "$dir/out" 2> "$dir/log" &
  server=$!
  for _ in $(seq 1 100); do grep -q "listening on" "$dir/out" && break; sleep 0.1; done
  local addr
  addr=$(sed -n 's/^listening on //p' "$dir/out")
  [ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$dir/log" >&2; exit 1; }
  for scenario in flash-sale steady; do
    echo "### $name, $scenario"
    target/release/loadtest "$scenario" --model closed --connections 64 --duration "$duration" \
      --requests 2000000 --stock 1000 --target "$scheme://$addr" "${client[@]}" 2>&1 | grep -vE "^(checked|setting up)"
  done
  kill "$server"; wait "$server" 2>/dev/null || true; server=
}
for round in $(seq 1 "$rounds"); do
  run "round $round, plain HTTP/1.1" http
  run "round $round, TLS 1.3 + h2" https --insecure --http2 -- --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem"
done
