#!/usr/bin/env bash
# Makes sure the Python virtualenv DIR holds the packages REQUIREMENTS pins: made and installed
# from PyPI on first use, or again when REQUIREMENTS changed (or the venv no longer runs); one
# caller at a time. Run its tools as `DIR/bin/python DIR/bin/<tool>`: a script's #! line names the
# directory the venv was made in, and target/ may have moved since.
# Usage: tests/tools/venv.sh REQUIREMENTS DIR
set -euo pipefail
requirements=${1:?requirements file}
dir=${2:?venv directory}
mkdir -p "$(dirname "$dir")"
exec 8>"$dir.lock"
flock 8
if cmp -s "$requirements" "$dir/requirements.txt" 2>/dev/null && "$dir/bin/python" -c "" 2>/dev/null; then
  exit 0
fi
echo "venv.sh: installing $requirements into $dir (from PyPI)" >&2
rm -rf "$dir"
python3 -m venv "$dir" || {
  echo "venv.sh: python3 -m venv failed: install Python 3 with venv (Debian: python3-venv)" >&2
  exit 1
}
"$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" || {
  echo "venv.sh: pip could not install $requirements (is PyPI reachable?)" >&2
  rm -rf "$dir"
  exit 1
}
cp "$requirements" "$dir/requirements.txt"
