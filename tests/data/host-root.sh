#!/usr/bin/env bash
# Lays out a host root in DIR as the kernel lays out /sys and /proc, for the
# real backend's `--host-root` (tests/host_root.rs and the unit test in
# crates/hypemand/src/host/usage.rs read the same tree):
#
#   00:1d.0  PCIe root port (bridge)            group 10
#   02:00.0  NVMe behind it: nvme0n1 with p1 (btrfs on /srv), p2 (ext4 on /),
#            p3 an LVM PV carrying dm-0 (/home dir) and dm-1 (swap)   group 11
#   05:00.0  NIC, enp5s0 up with a default route            group 12
#   06:00.0  NIC, enp6s0 up with link-local and multicast routes only  group 13
#   01:00.0  GPU, card1 held open by Xorg (pid 812)         group 14
#   07:00.0  GPU, renderD129 held open by nobody; pid 900 holds card7, which is
#            no device here                                 group 15
#
# Device numbers are the evidence, as on a real host: card1's `dev` is 1:7,
# the number of the machine's real /dev/full, which Xorg's fd 12 links to, so
# a stat through /proc/812/fd/12 finds a character device with it. Pid 901
# plays the attacker: its fds' link texts say /dev/dri/renderD128 and
# /dev/nvme0n1 (on this machine they are no device at all), and a FUSE mount
# names itself /dev/nvme0n1p3 in mountinfo. None of it is a use.
#
# Nothing here is written outside DIR.
set -euo pipefail
root=${1:?usage: host-root.sh DIR}
sys=$root/sys
proc=$root/proc
mkdir -p "$sys/bus/pci/devices" "$sys/kernel/iommu_groups" "$proc"

# pci FUNCTION-PATH VENDOR DEVICE CLASS DRIVER GROUP
pci() {
  local path=$1 vendor=$2 device=$3 class=$4 driver=$5 group=$6
  local dir=$sys/devices/$path addr=${path##*/}
  mkdir -p "$dir" "$sys/bus/pci/drivers/$driver" "$sys/kernel/iommu_groups/$group/devices"
  printf '%s\n' "$vendor" >"$dir/vendor"
  printf '%s\n' "$device" >"$dir/device"
  printf '%s\n' "$class" >"$dir/class"
  printf '(null)\n' >"$dir/driver_override"
  printf -- '-1\n' >"$dir/numa_node"
  ln -s "../../../devices/$path" "$sys/bus/pci/devices/$addr"
  ln -s "$(realpath -m --relative-to="$dir" "$sys/bus/pci/drivers/$driver")" "$dir/driver"
  ln -s "$(realpath -m --relative-to="$dir" "$sys/kernel/iommu_groups/$group")" "$dir/iommu_group"
  ln -s "$(realpath -m --relative-to="$sys/kernel/iommu_groups/$group/devices" "$dir")" \
    "$sys/kernel/iommu_groups/$group/devices/$addr"
}

# link TARGET-UNDER-SYS LINK-UNDER-SYS: a relative link, as the kernel makes.
link() {
  local target=$sys/$1 link=$sys/$2
  mkdir -p "$(dirname "$link")"
  ln -s "$(realpath -m --relative-to="$(dirname "$link")" "$target")" "$link"
}

port=pci0000:00/0000:00:1d.0
nvme=$port/0000:02:00.0
nic=pci0000:00/0000:00:1c.0/0000:05:00.0
nic2=pci0000:00/0000:00:1c.1/0000:06:00.0
gpu=pci0000:00/0000:00:01.0/0000:01:00.0
gpu2=pci0000:00/0000:00:01.1/0000:07:00.0
pci "$port" 0x8086 0x7ab0 0x060400 pcieport 10
pci "$nvme" 0x144d 0xa80a 0x010802 nvme 11
pci "$nic" 0x8086 0x15f3 0x020000 igc 12
pci "$nic2" 0x8086 0x15f3 0x020000 igc 13
pci "$gpu" 0x10de 0x2684 0x030000 nvidia 14
pci "$gpu2" 0x10de 0x2684 0x030000 nvidia 15

# Block: the disk, its partitions, and dm devices stacked on p3.
disk=devices/$nvme/nvme/nvme0/nvme0n1
mkdir -p "$sys/$disk"
echo 259:0 >"$sys/$disk/dev"
for p in 1 2 3; do
  mkdir -p "$sys/$disk/nvme0n1p$p"
  echo "259:$p" >"$sys/$disk/nvme0n1p$p/dev"
  link "$disk/nvme0n1p$p" "class/block/nvme0n1p$p"
done
link "$disk" class/block/nvme0n1
# p1 is a mounted btrfs filesystem's member: the kernel lists it there.
link "$disk/nvme0n1p1" fs/btrfs/6f1d3b52-8e0e-4c5a-9a53-0b2c1d7e9f10/devices/nvme0n1p1
mkdir -p "$sys/fs/btrfs/features"
for n in 0 1; do
  mkdir -p "$sys/devices/virtual/block/dm-$n/dm"
  echo "253:$n" >"$sys/devices/virtual/block/dm-$n/dev"
  link "devices/virtual/block/dm-$n" "class/block/dm-$n"
  link "devices/virtual/block/dm-$n" "$disk/nvme0n1p3/holders/dm-$n"
done
echo vg-home >"$sys/devices/virtual/block/dm-0/dm/name"
echo vg-swap >"$sys/devices/virtual/block/dm-1/dm/name"
echo 241:0 >"$sys/devices/$nvme/nvme/nvme0/dev"
link "devices/$nvme/nvme/nvme0" class/nvme/nvme0

# Net.
for pair in "$nic:enp5s0" "$nic2:enp6s0"; do
  # Split at the last colon: the PCI address has colons of its own.
  dev=${pair%:*}; name=${pair##*:}
  mkdir -p "$sys/devices/$dev/net/$name"
  echo 0x1003 >"$sys/devices/$dev/net/$name/flags"
  echo up >"$sys/devices/$dev/net/$name/operstate"
  link "devices/$dev" "devices/$dev/net/$name/device"
  link "devices/$dev/net/$name" "class/net/$name"
done
mkdir -p "$sys/devices/virtual/net/lo"
echo 0x9 >"$sys/devices/virtual/net/lo/flags"
link devices/virtual/net/lo class/net/lo

# DRM: card1 is 1:7 (see above), the others the DRM major's numbers.
drm() {
  local dev=$1 name=$2 num=$3
  mkdir -p "$sys/devices/$dev/drm/$name"
  echo "$num" >"$sys/devices/$dev/drm/$name/dev"
  link "devices/$dev" "devices/$dev/drm/$name/device"
  link "devices/$dev/drm/$name" "class/drm/$name"
}
drm "$gpu" card1 1:7
drm "$gpu" renderD128 226:128
drm "$gpu2" card2 226:2
drm "$gpu2" renderD129 226:129

# /proc.
mkdir -p "$proc/self" "$proc/net"
cat >"$proc/self/mountinfo" <<'EOF'
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
23 22 253:0 / /home\040dir rw,relatime shared:2 - ext4 /dev/mapper/vg-home rw
24 22 0:22 / /proc rw - proc proc rw
25 22 0:30 / /srv rw - btrfs /dev/nvme0n1p1 rw
26 22 0:45 / /home/mallory/x rw,nosuid,nodev - fuse.sshfs /dev/nvme0n1p3 rw,user_id=1000
EOF
printf 'Filename\tType\tSize\tUsed\tPriority\n/dev/dm-1   partition\t8388604\t0\t-2\n' >"$proc/swaps"
cat >"$proc/net/route" <<'EOF'
Iface	Destination	Gateway 	Flags	RefCnt	Use	Metric	Mask		MTU	Window	IRTT
enp5s0	00000000	0101A8C0	0003	0	0	100	00000000	0	0	0
enp6s0	0000FEA9	00000000	0001	0	0	1000	0000FFFF	0	0	0
enp6s0	000000E0	00000000	0001	0	0	0	000000F0	0	0	0
EOF
cat >"$proc/net/ipv6_route" <<'EOF'
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 enp6s0
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 enp6s0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 00200001 lo
EOF
# proc_pid PID COMM FD=TARGET...
proc_pid() {
  local pid=$1 comm=$2
  shift 2
  mkdir -p "$proc/$pid/fd"
  echo "$comm" >"$proc/$pid/comm"
  for fd in "$@"; do
    ln -s "${fd#*=}" "$proc/$pid/fd/${fd%%=*}"
  done
}
proc_pid 812 Xorg 0=/dev/null 3='socket:[1234]' 12=/dev/full
proc_pid 900 bash 0=/dev/pts/0 1=/dev/dri/card7
proc_pid 901 sh 7=/dev/dri/renderD128 8=/dev/nvme0n1
