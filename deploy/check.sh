#!/usr/bin/env bash
# Renders deploy/kubernetes and checks what it renders, offline:
#   1. every manifest (the base, data-stores/ and secret.example.yaml) against the Kubernetes schemas of each version we support, in strict mode
#      (an unknown or misspelt field fails): kubernetes-validate --strict;
#   2. checkov's Kubernetes policies on the manifests and its Dockerfile policies on the
#      Dockerfile: no failed check (those skipped on purpose say why in a checkov.io/skip
#      annotation, or a checkov:skip comment in the Dockerfile).
# Usage: deploy/check.sh              run both checks (tests/deploy.rs runs this)
#        deploy/check.sh --json FILE  only render (all three), as a JSON list of manifests, into FILE
# Needs kubectl (or kustomize) and python3; the validators (deploy/requirements.txt) are installed
# into target/deploy-tools from PyPI on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSIONS="1.30 1.31 1.32 1.33 1.34"
tools=target/deploy-tools
out=target/deploy
mkdir -p "$out"

# One run at a time (two tests may ask at once, and the files under target/deploy are shared):
# the lock is held until the script ends.
exec 9>"$out/check.lock"
flock 9

# The validators, once (tests/tools/venv.sh: made on first use, again when the list changed).
ensure_tools() {
  bash tests/tools/venv.sh deploy/requirements.txt "$tools"
}

# One kustomization, rendered.
render() {
  if command -v kubectl >/dev/null; then
    kubectl kustomize "$1"
  elif command -v kustomize >/dev/null; then
    kustomize build "$1"
  else
    echo "deploy/check.sh: neither kubectl nor kustomize is installed; install kubectl (it renders with 'kubectl kustomize')" >&2
    exit 1
  fi
}

ensure_tools
# What is checked: the base (rendered.yaml), plus the data stores' policies and the example
# Secret, which the base does not apply but a deployment does (all.yaml).
render deploy/kubernetes >"$out/rendered.yaml"
{
  cat "$out/rendered.yaml"
  echo "---"
  render deploy/kubernetes/data-stores
  echo "---"
  cat deploy/kubernetes/secret.example.yaml
} >"$out/all.yaml"

if [[ ${1:-} == --json ]]; then
  "$tools/bin/python" -c 'import json, sys, yaml
json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], open(sys.argv[2], "w"))' \
    "$out/all.yaml" "${2:?--json needs a file}"
  exit 0
fi

echo "== kubernetes-validate --strict ($(grep -c '^kind:' "$out/all.yaml") manifests)"
for version in $KUBERNETES_VERSIONS; do
  "$tools/bin/python" "$tools/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "$out/all.yaml"
  echo "Kubernetes $version: every manifest valid"
done

# checkov asks its vendor's servers for guidelines unless told not to; this machine is offline.
export BC_SKIP_MAPPING=TRUE
# One framework on one file; fails on any failed check, and on a scan that read nothing (a file
# checkov cannot parse is skipped silently, with exit 0).
checkov() {
  local framework=$1 file=$2 report="$out/checkov-$1.json"
  echo "== checkov ($framework: $file)"
  "$tools/bin/python" "$tools/bin/checkov" --skip-download --framework "$framework" -f "$file" -o json >"$report" || true
  "$tools/bin/python" - "$report" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
summary = report["summary"]
for check in report["results"].get("failed_checks", []):
    print(f"FAILED {check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']}:{check['file_line_range']})")
for check in report["results"].get("skipped_checks", []):
    print(f"skipped {check['check_id']} on {check['resource']}: {check['check_result'].get('suppress_comment', '')}")
print(f"passed {summary['passed']}, failed {summary['failed']}, skipped {summary['skipped']}, parsing errors {summary['parsing_errors']}, resources {summary['resource_count']}")
if summary["failed"] or summary["parsing_errors"] or not summary["passed"]:
    sys.exit(1)
PY
}
checkov kubernetes "$out/all.yaml"
checkov dockerfile Dockerfile
echo "deploy/check.sh: all checks passed"
