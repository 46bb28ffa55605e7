# Shared by the loadtest/*.sh scripts (sourced): the tools a script needs, and the binary it runs.
# need TOOL...: exits 2 naming the first missing one.
need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 2; }
  done
}
# The binary to run: TURNSTILE_BIN if set, else this tree's release build (built now).
turnstile_bin() {
  if [ -n "${TURNSTILE_BIN:-}" ]; then
    echo "$TURNSTILE_BIN"
  else
    cargo build --release --quiet --bin turnstile >&2
    echo target/release/turnstile
  fi
}
# abba_rounds ROUNDS FILE: ROUNDS rounds of `run A` and `run B` (the caller's function), in the order
# A B, then B A, ...; each line prefixed "round N " and appended to FILE (read by abba_summary).
abba_rounds() {
  local round label order
  for round in $(seq 1 "$1"); do
    order="A B"; (( round % 2 == 0 )) && order="B A"
    for label in $order; do run "$label" | sed "s/^/round $round /" | tee -a "$2"; done
  done
}
# abba_summary FILE RPS_FIELD: the medians and each pair's B/A of an ABBA run's lines in FILE
# ("round N A|B ... <req/s at field RPS_FIELD> ... <CPU> us/request"): throughput and server CPU per
# request.
abba_summary() {
  awk -v f="$2" '
    { label = $3; rps[label, ++n[label]] = $f; cpu[label, n[label]] = $(NF - 1) + 0 }
    function median(arr, label, count,   i, j, t, v) {
      for (i = 1; i <= count; i++) v[i] = arr[label, i]
      for (i = 1; i <= count; i++) for (j = i + 1; j <= count; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
      return count % 2 ? v[(count + 1) / 2] : (v[count / 2] + v[count / 2 + 1]) / 2
    }
    END {
      printf "medians: A %.0f req/s, %.2f us/request; B %.0f req/s, %.2f us/request; B/A throughput %.2f, CPU %.2f\n",
        median(rps, "A", n["A"]), median(cpu, "A", n["A"]), median(rps, "B", n["B"]), median(cpu, "B", n["B"]),
        median(rps, "B", n["B"]) / median(rps, "A", n["A"]), median(cpu, "B", n["B"]) / median(cpu, "A", n["A"])
      for (i = 1; i <= n["A"]; i++) printf "pair %d: B/A throughput %.2f, CPU %.2f\n", i, rps["B", i] / rps["A", i], cpu["B", i] / cpu["A", i]
    }' "$1"
}
# serve_release DIR: starts this tree's release server on a free port with its data dir in DIR
# (the caller's EXIT trap kills "$server"); sets server (its pid), addr and url, and creates the
# wrk scenarios' products (loadtest/wrk/setup_products.py). Exits 1 with its log if it does not
# start.
serve_release() {
  target/release/turnstile serve --listen 127.0.0.1:0 --data-dir "$1/data" > "$1/out" 2> "$1/log" &
  server=$!
  for _ in $(seq 1 100); do grep -q "listening on" "$1/out" && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$1/out")
  [ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$1/log" >&2; exit 1; }
  url="http://$addr"
  python3 loadtest/wrk/setup_products.py "$url" > /dev/null
}
