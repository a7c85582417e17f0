#!/usr/bin/python3
"""Keeps N Register calls in flight to hypemand, from C connections, until it
is stopped: each answered call is sent again at once. Touches STARTED once
the first N are on their way. Run as the flooding user.

    flood.py ADDRESS N C STARTED
"""
import sys

from gi.repository import Gio, GLib

address, total, conns, started = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
         | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
connections = [Gio.DBusConnection.new_for_address_sync(address, flags, None, None)
               for _ in range(conns)]
answered = {}


def send(conn):
    conn.call("org.hypeman.Devices", "/org/hypeman/Devices", "org.hypeman.Devices1",
              "Register", GLib.Variant("(ss)", ("0000:a2:00.0", "flood")), None,
              Gio.DBusCallFlags.NONE, -1, None, done, conn)


def done(source, result, conn):
    try:
        source.call_finish(result)
        name = "ok"
    except GLib.Error as e:
        name = Gio.DBusError.get_remote_error(e) or e.message
    answered[name] = answered.get(name, 0) + 1
    send(conn)


loop = GLib.MainLoop()


def stop():
    # What the flood was answered, by error name, for the test to report.
    print(" ".join(f"{k}={v}" for k, v in sorted(answered.items())), file=sys.stderr, flush=True)
    loop.quit()
    return GLib.SOURCE_REMOVE


GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, 15, stop)
for i in range(total):
    send(connections[i % conns])
open(started, "w").close()
loop.run()
