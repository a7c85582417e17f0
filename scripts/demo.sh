#!/usr/bin/env bash
# The demo: build hypemand, start it against the simulated L4 host on a private
# bus of its own, register the seed's GPU with busctl and with hypemanctl, print
# the record, and stop everything it started. Needs dbus-daemon, busctl and jq
# (scripts/install-test-deps.sh installs them); no system bus, no IOMMU.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in dbus-daemon busctl jq; do
  command -v "$tool" >/dev/null && continue
  if [ "$(id -u)" = 0 ]; then scripts/install-test-deps.sh >/dev/null; break; fi
  echo "demo: $tool is missing; run: sudo scripts/install-test-deps.sh" >&2; exit 1
done

cargo build --quiet --bins
work=$(mktemp -d)
bus_pid= daemon_pid=
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  [ -n "$bus_pid" ] && kill "$bus_pid" 2>/dev/null && wait "$bus_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

sed -e "s|@LISTEN@|unix:path=$work/bus|" \
    -e "s|@INCLUDES@|<include>$PWD/dbus/org.hypeman.Devices.conf</include>|" \
    tests/data/system.conf.in > "$work/system.conf"
dbus-daemon --config-file="$work/system.conf" --nofork --print-address=3 3>"$work/address" 2>/dev/null &
bus_pid=$!
for _ in $(seq 100); do [ -s "$work/address" ] && break; sleep 0.05; done
address=$(head -n1 "$work/address")
echo "== private bus: $address"

target/debug/hypemand --bus "$address" --state-dir "$work/state" \
  --simulate examples/hosts/l4.toml 2>"$work/hypemand.log" &
daemon_pid=$!
for _ in $(seq 200); do
  busctl --address="$address" status org.hypeman.Devices >/dev/null 2>&1 && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/hypemand.log" >&2; exit 1; }
  sleep 0.05
done

echo "== busctl: Register 0000:a2:00.0 as l4-gpu"
busctl --address="$address" --json=short call org.hypeman.Devices /org/hypeman/Devices \
  org.hypeman.Devices1 Register ss 0000:a2:00.0 l4-gpu \
  | jq '.data[1] | with_entries(.value = .value.data)'

echo "== hypemanctl: registering it again is refused"
target/debug/hypemanctl --bus "$address" register 0000:a2:00.0 --name l4-gpu 2>&1 || true

echo "== hypemanctl: delete it, then the seed's registration with hypemanctl (--json: the seed's document)"
target/debug/hypemanctl --bus "$address" delete l4-gpu
target/debug/hypemanctl --bus "$address" --json register 0000:a2:00.0 --name l4-gpu

echo "== hypemanctl list"
target/debug/hypemanctl --bus "$address" list
echo "== stopping everything the demo started"
