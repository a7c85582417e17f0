#!/usr/bin/env bash
# The test command: install what the tests need, then run every test, as root.
#   sudo scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The docs: every intra-doc link resolves, no public item of the contract
# crate or the client is undocumented (#![warn(missing_docs)]).
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace
# The end-to-end tests in tests/ run the workspace's binaries: build them all.
cargo build --locked --workspace --all-targets
cargo test --locked --workspace --all-targets -- --include-ignored
cargo test --locked --workspace --doc
scripts/test-deb.sh
# The .deb on a booted Debian under systemd-nspawn (needs the package above).
scripts/test-system.sh
# The README's demo from a clean clone (a newcomer's first minutes).
scripts/test-newcomer.sh
scripts/test-fuzz.sh
