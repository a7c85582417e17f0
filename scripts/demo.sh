#!/usr/bin/env bash
# The demo: build hypemand, start it against the simulated L4 host on a private
# bus of its own, register the seed's GPU with busctl and with hypemanctl, print
# the record, and stop everything it started. No system bus, no IOMMU needed.
#
#   scripts/demo.sh          # the demo, then everything is stopped
#   scripts/demo.sh --keep   # the demo, then the bus and the daemon keep
#                            # running: it prints the address and the exact
#                            # commands to try, and stops them on Ctrl-C
#
# It makes sure of what it needs first: the tools (dbus-daemon, busctl, jq)
# and what the build needs (pkg-config, libudev, protoc, a C compiler, cargo).
# As root it installs what is missing (Debian packages); otherwise it names
# the packages to install.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
case "${1:-}" in
  --keep) keep=true ;;
  '') ;;
  *) echo "usage: scripts/demo.sh [--keep]" >&2; exit 2 ;;
esac

# What is missing, as Debian packages.
missing=()
need_tool() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need_tool dbus-daemon dbus-daemon
need_tool busctl systemd
need_tool jq jq
need_tool pkg-config pkg-config
need_tool protoc protobuf-compiler
need_tool cc gcc
if command -v pkg-config >/dev/null 2>&1 && ! pkg-config --exists libudev; then
  missing+=(libudev-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing what the demo needs: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends --no-upgrade "${missing[@]}" >/dev/null
  else
    echo "demo: missing: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "demo: cargo is missing; install Rust (https://rustup.rs) and run the demo again" >&2
  exit 1
fi

echo "== building (cargo build --workspace --bins)"
cargo build --quiet --workspace --bins
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

if ! $keep; then
  echo "== stopping everything the demo started"
  exit 0
fi

cat <<EOF

== the bus and hypemand keep running (simulated L4 host); try, in another terminal:

    export DBUS_SYSTEM_BUS_ADDRESS='$address'
    busctl call org.hypeman.Devices /org/hypeman/Devices org.hypeman.Devices1 List
    busctl --json=pretty call org.hypeman.Devices /org/hypeman/Devices org.hypeman.Devices1 ListAvailable
    busctl call org.hypeman.Devices /org/hypeman/Devices org.hypeman.Devices1 Bind s l4-gpu
    $PWD/target/debug/hypemanctl list
    $PWD/target/debug/hypemanctl attach l4-gpu vm-1
    $PWD/target/debug/hypemanctl monitor

(busctl and hypemanctl use \$DBUS_SYSTEM_BUS_ADDRESS as the system bus; or
pass --address=$address to busctl and --bus=$address to hypemanctl.)
The daemon's log: $work/hypemand.log

Press Ctrl-C to stop the bus and the daemon.
EOF
# Until Ctrl-C (or the daemon ends); the trap stops both by pid.
trap 'echo; echo "== stopping"; exit 0' INT TERM
wait "$daemon_pid"
