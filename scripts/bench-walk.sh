#!/usr/bin/env bash
# The cost of hypemand's walk of /proc (issue 24): starts processes holding
# about FDS fds in all (default 1,000,000; each process as many as the hard
# NOFILE limit allows), then asks a hypemand on a private session bus, whose
# --host-root has tests/data/host-root.sh's /sys and the machine's own /proc,
# for ListAvailable RUNS times, and prints each walk's fds and time from the
# daemon's "walked /proc" debug line, and the cost per million fds.
#   scripts/bench-walk.sh [HYPEMAND [FDS [RUNS]]]
# Every process it starts is stopped by pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
hypemand=${1:-target/release/hypemand}
fds=${2:-1000000}
runs=${3:-5}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
per=$(( $(ulimit -Hn) - 64 ))
n=$(( (fds + per - 1) / per ))
mkfifo "$work/ready"
for _ in $(seq "$n"); do
  /usr/bin/python3 -c "
import os, resource, sys, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
null = os.open('/dev/null', os.O_RDONLY)
held = [os.dup(null) for _ in range($per)]
open('$work/ready', 'w').write('x\n')
while True:
    time.sleep(3600)
" &
  pids+=($!)
done
# One line through the FIFO per holder: all set up.
head -n "$n" "$work/ready" >/dev/null
bash tests/data/host-root.sh "$work/root"
rm -rf "$work/root/proc"
ln -s /proc "$work/root/proc"
dbus-daemon --session --fork --print-address=3 --print-pid=4 3>"$work/bus.addr" 4>"$work/bus.pid"
bus=$(head -1 "$work/bus.addr")
pids+=("$(head -1 "$work/bus.pid")")
RUST_LOG=debug "$hypemand" --bus "$bus" --state-dir "$work/state" \
  --host-root "$work/root" --api-socket none --usage-timeout 600 \
  2>"$work/log" &
daemon=$!
pids+=("$daemon")
until busctl --address="$bus" status org.hypeman.Devices >/dev/null 2>&1; do
  kill -0 "$daemon" 2>/dev/null || { echo "hypemand exited:" >&2; cat "$work/log" >&2; exit 1; }
  sleep 0.1
done
for _ in $(seq "$runs"); do
  busctl --address="$bus" call org.hypeman.Devices /org/hypeman/Devices \
    org.hypeman.Devices1 ListAvailable >/dev/null
done
grep 'walked /proc' "$work/log" | sed -E 's/.*processes=([0-9]+) fds=([0-9]+) elapsed_us=([0-9]+).*/\1 \2 \3/' |
  awk '{ printf "processes %d fds %d walk %.1f ms = %.1f ms per million fds\n", $1, $2, $3/1000, $3/1000/($2/1e6) }'
