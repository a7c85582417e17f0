"""A hostile REST client (tests/rest.rs): keeps N connections to SOCK busy
until its standard input closes, reopening each one the daemon ends.

  flood_rest.py SOCK N body       each sends a POST with Content-Length 16000
                                  and one byte of body, then nothing
  flood_rest.py SOCK N pipeline   each sends 3000 pipelined GETs and never
                                  reads a response
  flood_rest.py SOCK N requests   N sequential requests, a connection each
                                  (no flood: the connection-per-request client)

Prints "ready" once the first N are sent (flood modes), then on stdin EOF one
line: "held=H refused=R 408=T closed=C" (refused: closed before any byte of
answer; 408: the body deadline's answer; closed: ended with no answer while
pipelining). The requests mode prints "answered=A refused=R".
A hang guard ends it after 300 s (it says "stuck").
"""
import os
import signal
import socket
import sys


def say(line):
    """One write(2) a line: several floods may share one pipe."""
    os.write(1, (line + "\n").encode())


def stuck(*_):
    say("stuck")
    os._exit(3)


signal.signal(signal.SIGALRM, stuck)
signal.alarm(300)

path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]

if mode == "requests":
    answered = refused = 0
    # Kept alive, as HTTP/1.1 clients are: the client reads its answer (by
    # Content-Length) and hangs up itself, then connects again at once.
    req = b"GET /devices HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        got = b""
        try:
            s.sendall(req)
            while b"\r\n\r\n" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            head, _, body = got.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            while len(body) < length:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            if len(body) < length:
                got = b""
        except OSError:
            got = b""
        s.close()
        if got.startswith(b"HTTP/1.1 200"):
            answered += 1
        else:
            refused += 1
    say(f"answered={answered} refused={refused}")
    sys.exit(0)

import select

poller = select.poll()
socks = {}  # fd -> (socket, bytes answered so far)
counts = {"held": 0, "refused": 0, "408": 0, "closed": 0}
PIPELINE = b"GET /devices HTTP/1.1\r\nHost: x\r\n\r\n" * 3000


def open_one():
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.setblocking(False)
    try:
        if mode == "body":
            s.send(b"POST /devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 16000\r\n\r\n{")
        else:
            s.send(PIPELINE)  # as much as fits; the rest is never sent
    except OSError:
        pass
    counts["held"] += 1
    socks[s.fileno()] = (s, bytearray())
    # Body mode reads the answer; pipeline mode never reads, it only waits
    # for the daemon to hang up (POLLRDHUP, not POLLIN).
    poller.register(s, select.POLLIN if mode == "body" else select.POLLRDHUP)


for _ in range(n):
    open_one()
say("ready")
poller.register(sys.stdin, select.POLLIN)
while True:
    for fd, ev in poller.poll():
        if fd == sys.stdin.fileno():
            if not os.read(fd, 4096):
                say(" ".join(f"{k}={v}" for k, v in counts.items()))
                sys.exit(0)
            continue
        s, got = socks[fd]
        if mode == "body":
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                got += chunk
                continue
            if got.startswith(b"HTTP/1.1 408"):
                counts["408"] += 1
            elif not got:
                counts["refused"] += 1
            else:
                counts["closed"] += 1
        else:
            counts["closed"] += 1
        poller.unregister(fd)
        del socks[fd]
        s.close()
        open_one()
