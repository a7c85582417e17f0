#!/usr/bin/env bash
# The test command: install what the tests need, then run every test, as root.
#   sudo scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --locked --all-targets
cargo test --locked --all-targets -- --include-ignored
cargo test --locked --doc
scripts/test-deb.sh
scripts/test-fuzz.sh
