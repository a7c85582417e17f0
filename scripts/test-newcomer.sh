#!/usr/bin/env bash
# The newcomer's first minutes (issue 19): the README's demo command, run in
# a clean clone of this repository in a temporary directory (the build
# dependencies are present: scripts/install-test-deps.sh ran first). Passes
# when the demo printed the registered record.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone --quiet "$PWD" "$work/hypeman-devices"
cd "$work/hypeman-devices"
started=$(date +%s)
# The command exactly as the README gives it.
command=$(grep -m1 -E '^    scripts/demo\.sh$' README.md | sed 's/^    //')
[ -n "$command" ] || { echo "test-newcomer: the README gives no demo command" >&2; exit 1; }
out=$($command 2>&1) || { echo "$out" >&2; echo "test-newcomer: the demo failed" >&2; exit 1; }
for want in '"name": "l4-gpu"' '"pci_address": "0000:a2:00.0"' '"iommu_group": 82'; do
  if ! grep -qF "$want" <<<"$out"; then
    echo "$out" >&2
    echo "test-newcomer: the demo's output has no $want" >&2
    exit 1
  fi
done
echo "test-newcomer: the README's demo works from a clean clone ($(( $(date +%s) - started )) s)"
