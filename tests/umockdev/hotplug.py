#!/usr/bin/python3
"""Hotplug through real uevents: run under umockdev-wrapper.

    umockdev-wrapper /usr/bin/python3 hotplug.py BUS_ADDRESS HYPEMAND STATE_DIR

Builds a umockdev testbed with two PCI devices (a GPU that gets registered and a
NIC that does not), starts the real hypemand on the real sysfs backend (umockdev
serves it the testbed as /sys), sends uevents, and checks on the bus that each
is reflected, timing each from uevent to signal. Prints one JSON line of
latencies (ms) and exits 0, or prints what went wrong and exits 1. The daemon it
starts is stopped by pid on every path.
"""
import json
import os
import subprocess
import sys
import time

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import Gio, GLib, UMockdev  # noqa: E402

NAME = "org.hypeman.Devices"
PATH = "/org/hypeman/Devices"
GPU = "/sys/devices/pci0000:a0/0000:a2:00.0"
NVME = "/sys/devices/pci0000:50/0000:5e:00.0"


def device(path, vendor, dev, cls, driver, group):
    return f"""P: {path[4:]}
E: SUBSYSTEM=pci
E: DRIVER={driver}
E: PCI_SLOT_NAME={os.path.basename(path)}
A: vendor=0x{vendor}
A: device=0x{dev}
A: class=0x{cls}
A: driver_override=(null)
L: driver=../../../bus/pci/drivers/{driver}
L: iommu_group=../../../kernel/iommu_groups/{group}
"""


GPU_TEXT = device(GPU, "10de", "27b8", "030200", "nvidia", 82)
NIC_TEXT = device("/sys/devices/pci0000:30/0000:3b:00.0", "8086", "1572", "020000", "i40e", 40)
NVME_TEXT = device(NVME, "144d", "a80a", "010802", "nvme", 55)


class Fail(Exception):
    pass


def main():
    bus, hypemand, state = sys.argv[1:4]
    tb = UMockdev.Testbed.new()
    tb.add_from_string(GPU_TEXT)
    tb.add_from_string(NIC_TEXT)
    log = open(os.path.join(state, "hypemand.log"), "w")
    daemon = subprocess.Popen(
        [hypemand, "--bus", bus, "--state-dir", state, "--log-level", "debug"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    # The caller stops it by this pid should this script die without cleaning up.
    with open(os.path.join(state, "hypemand.pid"), "w") as f:
        f.write(str(daemon.pid))
    try:
        return scenario(tb, bus, daemon)
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        os.unlink(os.path.join(state, "hypemand.pid"))


def scenario(tb, bus, daemon):
    flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
    conn = Gio.DBusConnection.new_for_address_sync(bus, flags, None, None)
    ctx = GLib.MainContext.default()

    def call(path, iface, method, args=None, sig=None):
        res = conn.call_sync(NAME, path, iface, method, GLib.Variant(sig, args) if sig else None,
                             None, Gio.DBusCallFlags.NONE, 10000, None)
        return res.unpack()

    deadline = time.monotonic() + 20
    while True:
        owned = conn.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                               "NameHasOwner", GLib.Variant("(s)", (NAME,)), None,
                               Gio.DBusCallFlags.NONE, 5000, None).unpack()[0]
        if owned:
            break
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise Fail(f"hypemand did not come up (exit {daemon.poll()})")
        time.sleep(0.02)

    gpu_path, record = call(PATH, "org.hypeman.Devices1", "Register", ("0000:a2:00.0", "l4-gpu"), "(ss)")
    if record.get("driver") != "nvidia" or record.get("iommu_group") != 82:
        raise Fail(f"the registered record does not show the testbed's device: {record}")

    seen = []  # (monotonic time, member, path, args)

    def on_signal(_c, _sender, path, _iface, member, params):
        seen.append((time.monotonic(), member, path, params.unpack()))

    conn.signal_subscribe(None, "org.freedesktop.DBus.Properties", "PropertiesChanged", None, None,
                          Gio.DBusSignalFlags.NONE, on_signal)
    conn.signal_subscribe(None, "org.hypeman.Devices1", None, PATH, None, Gio.DBusSignalFlags.NONE, on_signal)
    # signal_subscribe sends AddMatch without waiting for it; the bus handles a
    # connection's messages in order, so once a later call is answered the
    # matches are in place, and no signal of the first uevent can be missed.
    conn.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                   "GetId", None, None, Gio.DBusCallFlags.NONE, -1, None)

    def wait_for(pred, what):
        end = time.monotonic() + 10
        while time.monotonic() < end:
            while ctx.iteration(False):
                pass
            for s in seen:
                if pred(s):
                    return s
            time.sleep(0.001)
        raise Fail(f"no signal for {what}; seen: {[(m, p, a) for _, m, p, a in seen]}")

    def prop_changed(path, key, value):
        return lambda s: s[1] == "PropertiesChanged" and s[2] == path and s[3][1].get(key) == value

    def get(key):
        return call(PATH, "org.hypeman.Devices1", "Get", (key,), "(s)")[0]

    latency = {}

    # remove: the kernel says remove as the device goes.
    seen.clear()
    t0 = time.monotonic()
    tb.uevent(GPU, "remove")
    tb.remove_device(GPU)
    s = wait_for(prop_changed(gpu_path, "Present", False), "Present false after remove")
    latency["remove_to_present_false_ms"] = (s[0] - t0) * 1000
    if get("l4-gpu").get("present") is not False:
        raise Fail("Get still shows the removed GPU as present")

    # add: the device is back (umockdev sends `add` as it adds the device).
    seen.clear()
    t0 = time.monotonic()
    tb.add_from_string(GPU_TEXT)
    s = wait_for(prop_changed(gpu_path, "Present", True), "Present true after add")
    latency["add_to_present_true_ms"] = (s[0] - t0) * 1000
    wait_for(lambda s: s[1] == "HostDeviceAdded" and s[3] == ("0000:a2:00.0",), "HostDeviceAdded for the GPU")

    # bind of a new driver: an outside tool moved the GPU to vfio-pci.
    seen.clear()
    os.unlink(tb.get_root_dir() + GPU + "/driver")
    tb.set_attribute_link(GPU, "driver", "../../../bus/pci/drivers/vfio-pci")
    t0 = time.monotonic()
    tb.uevent(GPU, "bind")
    s = wait_for(prop_changed(gpu_path, "Driver", "vfio-pci"), "Driver vfio-pci after bind")
    latency["bind_to_driver_changed_ms"] = (s[0] - t0) * 1000
    wait_for(prop_changed(gpu_path, "BoundToVfio", True), "BoundToVfio after bind")
    if get("l4-gpu").get("driver") != "vfio-pci":
        raise Fail("Get does not show the new driver")

    # (issue 29) the kernel's AER recovery: a fatal error counted in the
    # kernel's own files, then the `change` uevent with ERROR_EVENT and
    # DEVICE_ONLINE. The daemon reads the counters and says failed.
    seen.clear()
    for name, total, n in (("aer_dev_correctable", "TOTAL_ERR_COR", 0),
                           ("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL", 0),
                           ("aer_dev_fatal", "TOTAL_ERR_FATAL", 1)):
        tb.set_attribute(GPU, name, f"Undefined 0\nDLP {n}\n{total} {n}\n")
    tb.set_property(GPU, "ERROR_EVENT", "FAILED_RECOVERY")
    tb.set_property(GPU, "DEVICE_ONLINE", "0")
    t0 = time.monotonic()
    tb.uevent(GPU, "change")
    s = wait_for(prop_changed(gpu_path, "Health", "failed"), "Health failed after the AER recovery uevent")
    latency["aer_event_to_health_ms"] = (s[0] - t0) * 1000

    # a new device's add: HostDeviceAdded, and nothing on device objects.
    seen.clear()
    t0 = time.monotonic()
    tb.add_from_string(NVME_TEXT)
    s = wait_for(lambda s: s[1] == "HostDeviceAdded" and s[3] == ("0000:5e:00.0",), "HostDeviceAdded for a new device")
    latency["new_device_add_to_signal_ms"] = (s[0] - t0) * 1000
    if any(m == "PropertiesChanged" for _, m, _, _ in seen):
        raise Fail(f"a new, unregistered device changed a device object: {seen}")
    available = call(PATH, "org.hypeman.Devices1", "ListAvailable")[0]
    if "0000:5e:00.0" not in [a["pci_address"] for a in available]:
        raise Fail("ListAvailable does not list the new device")

    print(json.dumps({k: round(v, 2) for k, v in latency.items()}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
