#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for FUZZ_SECONDS
# (default 30). Needs the nightly toolchain; without it, says so and stops.
#   FUZZ_SECONDS=300 scripts/test-fuzz.sh     # the README's 5-minute runs
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-30}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "test-fuzz: no nightly toolchain here; fuzz targets not built"
  exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
cargo +nightly fuzz build
passed=0
for target in $(cargo +nightly fuzz list); do
  # New inputs go to a scratch corpus; the committed seeds stay as they are.
  scratch=fuzz/target/corpus/$target
  mkdir -p "$scratch"
  echo "== fuzz $target for ${secs}s"
  cargo +nightly fuzz run "$target" "$scratch" "fuzz/corpus/$target" -- -max_total_time="$secs" -print_final_stats=1 2>&1 | tail -n 4
  passed=$((passed + 1))
done
echo "test-fuzz: $passed targets ran ${secs}s each without a finding"
