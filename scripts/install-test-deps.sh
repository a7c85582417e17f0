#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (run as root).
# Safe to run again: apt-get skips what is already there.
set -euo pipefail
packages=(
  dbus-daemon      # the private test bus
  systemd          # busctl, systemd-analyze
  libglib2.0-bin   # gdbus
  jq               # the demo's JSON output
  polkitd          # the real polkit daemon and pkaction, for authorization tests
  util-linux bsdutils       # unshare (polkitd's private mounts), setpriv (test callers), script (a pty for pkttyagent)
  passwd           # useradd/userdel for the test users
  make             # make install / uninstall tests
  pkg-config libudev-dev   # building the udev crate (libudev)
  umockdev libumockdev-dev gir1.2-umockdev-1.0 python3-gi   # uevent tests
  python3-venv ca-certificates   # tests/sdk.rs and tests/rest.rs: the hypeman SDK from PyPI in a virtualenv
  mmdebstrap systemd-container   # scripts/test-system.sh: a Debian rootfs booted with systemd-nspawn
  uidmap           # newuidmap: tests/rest.rs floods from a user's subordinate uids (unshare --map-users)
  protobuf-compiler   # protoc, for hypeman-device-plugin's gRPC code (tonic-build)
)
if [ "$(id -u)" != 0 ]; then
  echo "install-test-deps: run as root (apt-get needs it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
# --no-upgrade: what is installed already stays as it is (nothing is upgraded).
apt-get install -y --no-install-recommends --no-upgrade "${packages[@]}"
# promtool (tests/metrics.rs checks a scrape with it) ships only in Debian's
# prometheus package, whose postinst starts a Prometheus server. Nothing is
# started: a policy-rc.d that refuses every start, for this one install.
if ! command -v promtool >/dev/null; then
  if [ -e /usr/sbin/policy-rc.d ]; then
    apt-get install -y --no-install-recommends --no-upgrade prometheus
  else
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y --no-install-recommends --no-upgrade prometheus
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
fi
# rustfmt and clippy check the style in scripts/test.sh; the machine's
# toolchain ships them, rustup adds them where it does not.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done
