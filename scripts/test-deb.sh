#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks what it holds.
# If cargo-deb cannot be installed here, says so and stops (exit 0): the same
# files are tested through `make install` by tests/systemd.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
  if ! cargo install cargo-deb --locked; then
    echo "test-deb: cargo-deb could not be installed; no .deb built (make install is tested instead)"
    exit 0
  fi
fi

# The daemon's crate carries the package metadata; both binaries come from
# one release build of the workspace.
cargo build --release --locked --workspace --bins
# Man pages and completions, as make install generates them.
rm -rf target/assets
target/release/hypemanctl generate-assets target/assets
target/release/hypemand --write-man-page target/assets
cargo deb --locked --no-build -p hypemand --output target/debian/
deb=$(ls -t target/debian/*.deb | head -n1)
echo "== $deb"
dpkg-deb -c "$deb" | tee target/debian/contents.txt

failed=0
for path in \
  ./usr/libexec/hypemand \
  ./usr/bin/hypemanctl \
  ./usr/libexec/hypeman-device-plugin \
  ./usr/lib/systemd/system/hypeman-device-plugin.service \
  ./usr/lib/systemd/system/hypemand.service \
  ./usr/lib/systemd/system/hypemand-api.socket \
  ./usr/share/dbus-1/system.d/org.hypeman.Devices.conf \
  ./usr/share/dbus-1/system-services/org.hypeman.Devices.service \
  ./usr/share/polkit-1/actions/org.hypeman.devices.policy \
  ./usr/share/polkit-1/rules.d/50-org.hypeman.devices.rules \
  ./usr/share/man/man1/hypemanctl.1.gz \
  ./usr/share/man/man1/hypemanctl-register.1.gz \
  ./usr/share/man/man1/hypemanctl-sriov.1.gz \
  ./usr/share/man/man1/hypemanctl-vgpu-create.1.gz \
  ./usr/share/man/man8/hypemand.8.gz \
  ./usr/share/bash-completion/completions/hypemanctl \
  ./usr/share/zsh/vendor-completions/_hypemanctl \
  ./usr/share/fish/vendor_completions.d/hypemanctl.fish \
  ./usr/share/doc/hypeman-devices/examples/metrics.conf \
  ./usr/share/doc/hypeman-devices/examples/grafana-hypeman-devices.json
do
  if ! grep -q " $path\$" target/debian/contents.txt; then
    echo "test-deb: $path is missing from the package" >&2
    failed=$((failed + 1))
  fi
done
control=$(mktemp -d)
trap 'rm -rf "$control"' EXIT
dpkg-deb -e "$deb" "$control"
for script in postinst prerm postrm; do
  if [ ! -x "$control/$script" ]; then
    echo "test-deb: maintainer script $script is missing" >&2
    failed=$((failed + 1))
  fi
done
grep -q 'rm -rf /var/lib/hypeman' "$control/postrm" || { echo "test-deb: purge does not remove /var/lib/hypeman" >&2; failed=$((failed + 1)); }
if [ "$failed" != 0 ]; then
  echo "test-deb: $failed problem(s)" >&2
  exit 1
fi
echo "test-deb: the package holds every file and maintainer script"
