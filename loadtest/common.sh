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
