#!/usr/bin/env bash
# The booted-system test (issue 16): the .deb on Debian bookworm with systemd
# as PID 1, under systemd-nspawn. It builds a minimal rootfs once per run,
# installs the package with apt as a user would, boots, and checks the unit,
# D-Bus activation, the real system bus, the system's polkitd, journald, the
# watchdog, restarts, the sandbox, and remove/purge.
#
# Never writes to the real /sys: the container sees this machine's sysfs
# read-only, and every driver change goes to a simulated host (a drop-in runs
# the daemon with --simulate). The second boot, with a writable /sys for the
# sandbox's `test -w` checks, keeps the daemon on the simulated host.
#
# Every container it boots it stops by the pid it started, on every path.
# A failing check prints the unit's journal.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ "$(id -u)" != 0 ]; then
  echo "test-system: run as root (mmdebstrap and systemd-nspawn need it)" >&2
  exit 1
fi
deb=$(ls -t target/debian/hypeman-devices_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
  echo "test-system: no target/debian/hypeman-devices_*.deb: run scripts/test-deb.sh first" >&2
  exit 1
fi

work=$root/target/system
rootfs=$work/rootfs
log=$work/log
mkdir -p "$work" "$log"
started=$(date +%s)

# --- the rootfs, once per run -------------------------------------------
rm -rf "$rootfs" "$rootfs.tmp"
echo "== mmdebstrap bookworm"
mmdebstrap --quiet --variant=apt \
  --include=systemd,systemd-sysv,dbus,polkitd,kmod,passwd,util-linux,procps \
  bookworm "$rootfs.tmp" >"$log/mmdebstrap.txt" 2>&1 || {
  tail -n 40 "$log/mmdebstrap.txt" >&2
  exit 1
}
mv "$rootfs.tmp" "$rootfs"
# Files for the container go outside /tmp (nspawn mounts a fresh one) and
# outside /root (the unit's ProtectHome hides it).
share=/usr/local/share/hypeman-test
mkdir -p "$rootfs$share"
cp "$deb" "$rootfs$share/hypeman-devices.deb"
cp examples/hosts/l4.toml "$rootfs$share/l4.toml"
echo "== rootfs ready in $(( $(date +%s) - started )) s"

# --- booting and stopping ------------------------------------------------
nspawn_pid=
pid1=

stop_container() {
  [ -n "$nspawn_pid" ] || return 0
  if kill -0 "$nspawn_pid" 2>/dev/null; then
    kill -TERM "$nspawn_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$nspawn_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$nspawn_pid" 2>/dev/null || true
  fi
  wait "$nspawn_pid" 2>/dev/null || true
  nspawn_pid=
  pid1=
}

in_ct() { nsenter -t "$pid1" -a "$@"; }

on_failure() {
  status=$?
  # With errtrace a failing command substitution runs this in its subshell
  # first: leave the reporting and the container to the main shell.
  [ "$BASHPID" = "$$" ] || exit "$status"
  trap - ERR
  echo "test-system: FAILED (exit $status); the unit's journal:" >&2
  if [ -n "$pid1" ]; then
    in_ct journalctl -u hypemand --no-pager -n 200 >&2 || true
  fi
  stop_container
  exit "$status"
}
trap on_failure ERR
trap stop_container EXIT

boot() { # [VAR=VALUE...] for nspawn's environment
  env "$@" systemd-nspawn -D "$rootfs" --boot --register=no --keep-unit \
    --quiet >"$log/console.txt" 2>&1 &
  nspawn_pid=$!
  # The container's PID 1: nspawn's child once it is systemd (nspawn's
  # setup child comes and goes first; picking it made a run fail).
  for _ in $(seq 1 200); do
    pid1=$(ps -o pid= --ppid "$nspawn_pid" | tr -d ' ' | head -n1 || true)
    if [ -n "$pid1" ] && [ "$(ps -o comm= -p "$pid1" 2>/dev/null || true)" = systemd ]; then
      break
    fi
    pid1=
    kill -0 "$nspawn_pid" 2>/dev/null || { cat "$log/console.txt" >&2; return 1; }
    sleep 0.05
  done
  [ -n "$pid1" ]
  # Until systemd answers, then until it says the boot is over (running or
  # degraded).
  for _ in $(seq 1 300); do
    in_ct systemctl is-system-running >/dev/null 2>&1 && break
    case "$(in_ct systemctl is-system-running 2>/dev/null || true)" in
      ''|offline) sleep 0.05 ;;
      *) break ;;
    esac
  done
  in_ct systemctl is-system-running --wait >/dev/null || true
}

check() { echo "ok: $*"; }
fail() { echo "test-system: $*" >&2; return 1; }
expect_in() { # TEXT NEEDLE WHAT
  case "$1" in *"$2"*) check "$3" ;; *) fail "$3: wanted \"$2\" in: $1" ;; esac
}

ctl() { in_ct hypemanctl --allow-interactive=false "$@"; }
bctl() { in_ct busctl "$@"; }

# --- first boot: /sys read-only -------------------------------------------
echo "== boot"
boot
echo "== 1. install with apt"
in_ct apt-get install -y -q "$share/hypeman-devices.deb" >"$log/apt-install.txt" 2>&1 ||
  { cat "$log/apt-install.txt" >&2; false; }
[ "$(in_ct systemctl is-enabled hypemand)" = enabled ] && check "the unit is enabled"
in_ct systemctl is-active --quiet hypemand && check "the unit is active"
status=$(in_ct systemctl show -p StatusText --value hypemand)
expect_in "$status" "devices registered, 0 on vfio-pci, 0 attached" "StatusText reads like the README"
for f in /usr/share/dbus-1/system.d/org.hypeman.Devices.conf \
  /usr/share/dbus-1/system-services/org.hypeman.Devices.service \
  /usr/share/polkit-1/actions/org.hypeman.devices.policy \
  /usr/share/polkit-1/rules.d/50-org.hypeman.devices.rules \
  /usr/lib/systemd/system/hypemand.service \
  /usr/lib/systemd/system/hypemand-api.socket; do
  in_ct test -f "$f" || fail "$f is missing"
done
check "the bus policy, activation file, polkit files and units are installed"
in_ct pkaction --action-id org.hypeman.devices.force >/dev/null && check "polkitd knows the actions"

echo "== 2. D-Bus activation"
in_ct systemctl stop hypemand
in_ct systemctl is-active --quiet hypemand && fail "still active after stop"
out=$(bctl call org.hypeman.Devices /org/hypeman/Devices org.hypeman.Devices1 List)
expect_in "$out" "aa{sv}" "a busctl call starts the stopped daemon and gets its answer"
in_ct systemctl is-active --quiet hypemand && check "the unit is active again (activated by the bus)"

echo "== 3. the real system bus"
out=$(ctl status)
expect_in "$out" "hypemand" "hypemanctl works without --bus"
host_functions=$(in_ct sh -c 'ls /sys/bus/pci/devices | wc -l')
listed=$(ctl --json available --all | grep -c '"passable"' || true)
[ "$listed" = "$host_functions" ] || fail "ListAvailable listed $listed functions, the container sees $host_functions"
check "ListAvailable lists the container's $host_functions real PCI functions (read only)"
in_ct mkdir -p /etc/systemd/system/hypemand.service.d
in_ct sh -c 'cat >/etc/systemd/system/hypemand.service.d/simulate.conf' <<EOF
[Service]
ExecStart=
ExecStart=/usr/libexec/hypemand --simulate $share/l4.toml --simulate-state /var/lib/hypeman/simulated-host.json
EOF
in_ct systemctl daemon-reload
in_ct systemctl restart hypemand
ctl register 0000:a2:00.0 --name l4-gpu >/dev/null
ctl bind l4-gpu | grep -q vfio-pci
ctl attach l4-gpu vm-1 | grep -q vm-1
ctl detach l4-gpu >/dev/null
ctl unbind l4-gpu | grep -q nvidia
ctl delete l4-gpu >/dev/null
check "Register, Bind, Attach, Detach, Unbind and Delete over the system bus (simulated host)"

echo "== 3a. metrics under the hardened unit, with the shipped drop-in (issue 29)"
in_ct sh -c 'cat >/etc/systemd/system/hypemand.service.d/metrics.conf' \
  <examples/systemd/hypemand.service.d/metrics.conf
in_ct systemctl daemon-reload
in_ct systemctl restart hypemand
ctl register 0000:a2:00.0 --name l4-gpu >/dev/null
# bash's /dev/tcp: the container has no HTTP client.
scrape=$(in_ct timeout 60 bash -c 'exec 3<>/dev/tcp/127.0.0.1/9977 &&
  printf "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3 && cat <&3')
expect_in "$scrape" 'hypeman_devices{state="registered"} 1' "the drop-in serves /metrics from inside the unit's sandbox"
expect_in "$scrape" "# EOF" "the scrape is whole OpenMetrics"
ctl delete l4-gpu >/dev/null

echo "== 3b. leases on systemd units (issue 27), with the system's systemd"
# Each release is waited for on the device's own signal: a monitor started
# before the unit ends, read line by line until AttachedTo is cleared (or
# the driver moves), and stopped by its pid.
monitor_pid=
start_monitor() {
  exec 3< <(in_ct hypemanctl monitor 2>&1)
  monitor_pid=$!
  local line
  while read -r -t 120 line <&3; do
    case "$line" in *monitoring*) return 0 ;; esac
  done
  fail "hypemanctl monitor did not start"
}
wait_line() { # NEEDLE WHAT: the monitor's next line ending in NEEDLE
  local line
  while read -r -t 120 line <&3; do
    case "$line" in *"$1") kill "$monitor_pid"; exec 3<&-; check "$2"; return 0 ;; esac
  done
  kill "$monitor_pid" 2>/dev/null || true
  fail "$2: no \"$1\" from the monitor"
}
ctl register 0000:a2:00.0 --name l4-gpu >/dev/null
in_ct systemd-run --quiet --unit=hm-vm1 sleep infinity
ctl attach --holder-unit hm-vm1.service l4-gpu vm-1 >/dev/null
inv=$(in_ct systemctl show -p InvocationID --value hm-vm1.service)
expect_in "$(ctl get l4-gpu)" "lease: unit hm-vm1.service, invocation $inv (on release: detach)" \
  "a unit lease shows the unit and the invocation systemd gave it"
ctl detach l4-gpu >/dev/null
out=$(ctl attach --holder-unit hm-nothing.service l4-gpu vm-2 2>&1 || true)
expect_in "$out" "systemd does not know unit hm-nothing.service" "a unit systemd does not know is refused"
expect_in "$(ctl --json get l4-gpu)" '"attached_to": null' "and nothing changed"
ctl attach --holder-unit hm-vm1.service l4-gpu vm-1 >/dev/null
in_ct systemctl restart hypemand
expect_in "$(ctl get l4-gpu)" "lease: unit hm-vm1.service, invocation $inv" \
  "a restart of hypemand keeps the lease of a unit still running the same invocation"
start_monitor
in_ct systemctl stop hm-vm1.service
wait_line "AttachedTo=" "the unit stopped: the device was released (AttachedTo cleared)"
expect_in "$(ctl --json get l4-gpu)" '"attached_to": null' "the record is released"
in_ct systemd-run --quiet --unit=hm-vm2 sleep infinity
ctl attach --holder-unit hm-vm2.service --on-release give-back l4-gpu vm-2 >/dev/null
start_monitor
in_ct systemctl kill --signal=KILL hm-vm2.service
wait_line "Driver=nvidia" "a unit killed (failed), on-release give-back: the device went back to nvidia"
in_ct systemd-run --quiet --unit=hm-vm3 --property=Restart=no sleep infinity
ctl attach --holder-unit hm-vm3.service l4-gpu vm-3 >/dev/null
in_ct systemctl stop hypemand
in_ct systemctl restart hm-vm3.service
in_ct systemctl start hypemand
expect_in "$(ctl --json get l4-gpu)" '"attached_to": null' \
  "a unit restarted while hypemand was stopped (another invocation): released at start-up"
in_ct systemctl stop hm-vm3.service
ctl unbind l4-gpu >/dev/null
ctl delete l4-gpu >/dev/null

echo "== 4. polkit, with the system's polkitd"
in_ct groupadd -f hypeman
in_ct useradd -M -G hypeman hmmember
in_ct useradd -M hmplain
in_ct setpriv --reuid hmmember --regid hmmember --init-groups \
  hypemanctl --allow-interactive=false register 0000:3b:00.0 --name member-nic >/dev/null
check "a member of hypeman may register"
out=$(in_ct setpriv --reuid hmplain --regid hmplain --init-groups \
  hypemanctl --allow-interactive=false register 0000:5e:00.0 --name plain 2>&1 || true)
expect_in "$out" "needs an administrator's password" "a plain user gets InteractiveAuthorizationRequired"
out=$(in_ct setpriv --reuid hmplain --regid hmplain --init-groups \
  hypemanctl --allow-interactive=true register 0000:5e:00.0 --name plain 2>&1 || true)
expect_in "$out" "not allowed to register" "with interaction allowed and no agent: AccessDenied"
ctl register 0000:5e:00.0 --name root-nvme >/dev/null
check "root may register"

echo "== 5. journald"
journal=$(in_ct journalctl -u hypemand -o json --no-pager)
expect_in "$journal" '"PCI_ADDRESS":"0000:3b:00.0"' "device lines carry PCI_ADDRESS"
expect_in "$journal" '"DEVICE_NAME":"member-nic"' "device lines carry DEVICE_NAME"

restarts() { in_ct systemctl show -p NRestarts --value hypemand; }
main_pid() { in_ct systemctl show -p MainPID --value hypemand; }
wait_for() { # CONDITION-COMMAND... : up to 60 s, checking every 0.2 s
  for _ in $(seq 1 300); do
    if "$@"; then return 0; fi
    sleep 0.2
  done
  return 1
}
restarted_since() { [ "$(restarts)" -gt "$1" ] && in_ct systemctl is-active --quiet hypemand; }

echo "== 6. the watchdog"
in_ct sh -c 'cat >/etc/systemd/system/hypemand.service.d/watchdog.conf' <<'EOF'
[Service]
WatchdogSec=2
EOF
in_ct systemctl daemon-reload
in_ct systemctl restart hypemand
before=$(restarts)
in_ct kill -STOP "$(main_pid)"
wait_for restarted_since "$before" || fail "the watchdog did not restart a stopped daemon"
check "SIGSTOP: systemd's watchdog killed and restarted it (NRestarts $before -> $(restarts))"
out=$(ctl list)
expect_in "$out" "member-nic" "the registry is intact after the watchdog restart"

echo "== 7. restart and stop"
before=$(restarts)
in_ct kill -KILL "$(main_pid)"
wait_for restarted_since "$before" || fail "SIGKILL was not followed by a restart"
check "SIGKILL: restarted (Restart=on-failure)"
in_ct systemctl stop hypemand
[ "$(in_ct systemctl show -p Result --value hypemand)" = success ] || fail "stop did not end in success"
[ "$(in_ct systemctl show -p ExecMainStatus --value hypemand)" = 0 ] || fail "stop did not exit 0"
journal=$(in_ct journalctl -u hypemand --no-pager -n 30)
expect_in "$journal" "SIGTERM: stopping" "systemctl stop: exit 0, after STOPPING"

echo "== 8. the sandbox (second boot, /sys writable for test -w only)"
stop_container
boot SYSTEMD_NSPAWN_API_VFS_WRITABLE=1
in_ct systemctl start hypemand
pid=$(main_pid)
for p in /sys/bus/pci/drivers_probe /sys/bus/pci/devices/*/driver_override; do
  real=$(in_ct sh -c "ls -d $p 2>/dev/null | head -n1")
  [ -n "$real" ] || continue
  in_ct nsenter -t "$pid" -m test -w "$real" || fail "$real is not writable in the unit's sandbox"
done
check "the sysfs paths the daemon writes are writable inside its sandbox (test -w only)"
[ "$(in_ct stat -c %a /var/lib/hypeman)" = 700 ] && check "/var/lib/hypeman is 0700"
[ "$(in_ct stat -c %a /var/lib/hypeman/devices.json)" = 600 ] && check "devices.json is 0600"
# The unit's own sandbox settings, for a helper command.
props=()
while IFS= read -r line; do
  case "$line" in
    ''|'#'*|'['*) ;;
    CapabilityBoundingSet=*|NoNewPrivileges=*|ProtectSystem=*|ProtectProc=*|ProcSubset=*|\
    PrivateDevices=*|RestrictAddressFamilies=*|RestrictNamespaces=*|SystemCallFilter=*|\
    SystemCallArchitectures=*|SystemCallErrorNumber=*|MemoryDenyWriteExecute=*|LockPersonality=*)
      props+=(-p "$line") ;;
  esac
done <"$root/systemd/hypemand.service"
out=$(in_ct systemd-run --quiet --wait --pipe "${props[@]}" modprobe -n -v vfio-pci 2>&1 || true)
case "$out" in
  *"Bad system call"*|*"Operation not permitted"*) fail "the syscall filter stops modprobe: $out" ;;
esac
check "modprobe runs under the unit's syscall filter (dry run: $(echo "$out" | head -n1))"
in_ct useradd -M hmholder 2>/dev/null || true
in_ct systemd-run --quiet --uid=hmholder --unit=hm-holder sleep infinity
holder=$(in_ct systemctl show -p MainPID --value hm-holder)
out=$(in_ct systemd-run --quiet --wait --pipe "${props[@]}" sh -c \
  "ls -l /proc/$holder/fd && cat /proc/self/mountinfo /proc/swaps /proc/net/route >/dev/null && echo visible")
in_ct systemctl stop hm-holder
expect_in "$out" "visible" "the sandbox sees another user's open files, the mounts, swaps and routes"

echo "== 9. remove and purge"
in_ct apt-get remove -y -q hypeman-devices >"$log/apt-remove.txt" 2>&1 || { cat "$log/apt-remove.txt" >&2; false; }
in_ct systemctl is-active --quiet hypemand && fail "still running after apt remove"
check "apt remove stops the daemon"
in_ct test -d /var/lib/hypeman && check "the registry stays after remove"
in_ct apt-get purge -y -q hypeman-devices >"$log/apt-purge.txt" 2>&1 || { cat "$log/apt-purge.txt" >&2; false; }
in_ct test -e /var/lib/hypeman && fail "/var/lib/hypeman is still there after purge"
check "apt purge removes /var/lib/hypeman"

stop_container
trap - ERR EXIT
echo "test-system: every check passed in $(( $(date +%s) - started )) s"
