//! *(issue 15)* Hypeman's `/devices` REST API on hypemand's unix socket,
//! driven by the official SDK (PyPI `hypeman`, over an httpx unix-socket
//! transport) and by raw HTTP for the hostile cases.

use crate::common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::*;

/// A directory others may enter (the socket's own mode is 0666), removed
/// when dropped.
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("hypeman-api")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A daemon on l4.toml serving the API on `devices.sock` in a directory of
/// its own; the state directory, that directory and the daemon.
fn l4_with_api(bus: &TestBus) -> (tempfile::TempDir, tempfile::TempDir, Daemon) {
    let state = tempfile::tempdir().unwrap();
    let dir = open_dir();
    let sock = dir.path().join("devices.sock");
    let d = Daemon::start(
        bus,
        state.path(),
        &[
            "--simulate",
            fixture("l4.toml").to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    (state, dir, d)
}

/// l4.toml with one more NIC function, to be attached over D-Bus.
fn host(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixture("l4.toml")).unwrap()
        + "\n[[device]]\naddress = \"0000:3b:00.1\"\nvendor = \"8086\"\ndevice = \"1572\"\nclass = \"020000\"\niommu_group = 41\ndriver = \"i40e\"\n";
    let path = dir.join("host.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn session(python: &Path, user: Option<&str>, sock: &Path, mode: &str) -> std::process::Output {
    let script = root().join("tests/data/sdk_session.py");
    let mut cmd = match user {
        Some(u) => as_user(u, python.to_str().unwrap()),
        None => std::process::Command::new(python),
    };
    cmd.arg(script).arg(sock).arg(mode).output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The real polkitd on `bus`, with the shipped rule.
fn shipped_polkit(bus: &TestBus) -> Polkitd {
    Polkitd::start(
        bus,
        &[(
            "50-org.hypeman.devices.rules",
            std::fs::read_to_string(root().join("polkit/50-org.hypeman.devices.rules")).unwrap(),
        )],
    )
}

#[test]
fn the_official_sdk_over_the_socket() {
    let python = sdk_python();
    let users = TestUsers::create(&["member", "plain"], &["member"], "hypeman");
    let bus = TestBus::start_polkit();
    let _pk = shipped_polkit(&bus);
    let state = tempfile::tempdir().unwrap();
    let dir = open_dir();
    let sock = dir.path().join("devices.sock");
    let fixture = host(state.path());
    let _d = Daemon::start(
        &bus,
        state.path(),
        &[
            "--simulate",
            fixture.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o666
    );
    // A device attached over D-Bus, for the in-use refusal.
    bus.manager("Register", &["ss", "0000:3b:00.1", "attached"])
        .unwrap();
    bus.manager("Attach", &["ss", "attached", "vm-1"]).unwrap();

    let text = ok(session(&python, None, &sock, "admin"));
    for want in [
        "created with a name",
        "created with tags",
        "ConflictError 409 conflict",
        "ConflictError 409 not_passable",
        "NotFoundError 404 not_found",
        "NotFoundError 404 device_not_found",
        "BadRequestError 400 invalid_pci_address",
        "BadRequestError 400 invalid_name",
        "BadRequestError 400 invalid_request",
        "ConflictError 409 in_use",
        "deleted",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    // The same registry over D-Bus.
    let listed = bus.manager("List", &[]).unwrap();
    assert_eq!(listed[0].as_array().unwrap().len(), 3);

    // polkit, with the caller's own credentials: a plain user is refused
    // (403, the SDK's PermissionDeniedError), a member of hypeman may.
    let (member, plain) = (&users.names[0], &users.names[1]);
    let text = ok(session(&python, Some(plain), &sock, "plain"));
    assert!(
        text.contains("PermissionDeniedError 403 forbidden"),
        "{text}"
    );
    let text = ok(session(&python, Some(member), &sock, "member"));
    assert!(
        text.contains("created") && text.contains("deleted"),
        "{text}"
    );
}

#[test]
fn hostile_clients_are_bounded() {
    let bus = TestBus::start();
    let (_state, dir, _d) = l4_with_api(&bus);
    let sock = dir.path().join("devices.sock");
    let post = |body: &str| {
        raw(
            &sock,
            format!(
                "POST /devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    for (body, status, code) in [
        ("{", "400", "invalid_request"),
        (r#"{"pci_address": 7}"#, "400", "invalid_request"),
        (
            r#"{"pci_address": "0000:a2:00.0", "colour": "red"}"#,
            "400",
            "invalid_request",
        ),
        (
            r#"{"pci_address": "0000:a2:00.0", "tags": {"k": 1}}"#,
            "400",
            "invalid_request",
        ),
    ] {
        let (s, b) = post(body);
        assert!(s.contains(status), "{body}: {s}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b}"));
        assert_eq!(v["code"], code, "{body}: {b}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let big = format!(
        r#"{{"pci_address": "0000:a2:00.0", "name": "{}"}}"#,
        "x".repeat(20_000)
    );
    let (s, b) = post(&big);
    assert!(s.contains("413"), "{s}");
    assert!(b.contains("payload_too_large"), "{b}");
    let (s, _) = raw(
        &sock,
        b"GET /devices?limit=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(s.contains("400"), "{s}");
    assert_eq!(bus.manager("List", &[]).unwrap()[0], serde_json::json!([]));

    // Root is not held to the per-user cap (tests below hold plain users
    // to it): 20 connections at once are served.
    let mut held: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    held[19]
        .write_all(b"GET /devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    held[19].read_to_string(&mut got).unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // A client that never sends its headers is cut off by the header
    // timeout, not kept forever (the read returns at EOF).
    let mut slow = held.swap_remove(0);
    slow.write_all(b"GET /dev").unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

/// *(issue 24)* Every phase of a request has its deadline, checked at once
/// (each case waits for the daemon to act; before, each connection was held
/// for good): a body that never arrives, a kept-alive connection left idle,
/// pipelined requests whose answers are never read.
#[test]
fn every_phase_has_a_deadline() {
    let bus = TestBus::start();
    let (_state, dir, _d) = l4_with_api(&bus);
    let sock = dir.path().join("devices.sock");
    std::thread::scope(|t| {
        // a body that never arrives is answered 408 at the body deadline;
        t.spawn(|| {
            let got = until_closed(&sock, b"POST /devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{");
            assert!(
                got.starts_with("HTTP/1.1 408") && got.contains("request_timeout"),
                "{got}"
            );
        });
        // a kept-alive connection left idle after its answer is closed;
        t.spawn(|| {
            let got = until_closed(&sock, b"GET /devices HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(got.matches("HTTP/1.1 200").count(), 1, "{got}");
        });
        // pipelined requests whose answers are never read: the connection
        // is closed at the write deadline (the test never reads, it waits
        // for the hang-up).
        t.spawn(|| {
            use std::os::fd::AsRawFd;
            let mut c = UnixStream::connect(&sock).unwrap();
            c.set_nonblocking(true).unwrap();
            let many = b"GET /devices HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000);
            let _ = c.write(&many);
            let mut p = libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: poll on one descriptor this test owns.
            let n = unsafe { libc::poll(&mut p, 1, HANG_GUARD.as_millis() as i32) };
            assert_eq!(n, 1, "the pipelining client was never cut off");
            assert!(p.revents & libc::POLLRDHUP != 0, "{:x}", p.revents);
        });
    });
}

/// Sends `request` and reads until the daemon closes the connection (a read
/// past [`HANG_GUARD`] fails the test).
fn until_closed(sock: &Path, request: &[u8]) -> String {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(HANG_GUARD)).unwrap();
    c.write_all(request).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    got
}

/// How long a test waits for the daemon to act before it calls it a hang
/// (a guard, not a timing assertion: every deadline here is 10 s).
const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(120);

/// tests/data/flood_rest.py, started as `user`, once it says it is ready.
struct Flood {
    proc: Proc,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Flood {
    fn start(mut cmd: std::process::Command, ready: usize) -> Flood {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        for _ in 0..ready {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "the flood did not start");
        }
        Flood {
            proc: Proc { child },
            out,
        }
    }

    /// Ends the flood; its summary lines.
    fn stop(mut self) -> Vec<String> {
        drop(self.proc.child.stdin.take());
        let mut text = String::new();
        self.out.read_to_string(&mut text).unwrap();
        self.proc.child.wait().unwrap();
        text.lines().map(str::to_string).collect()
    }
}

fn script() -> String {
    root()
        .join("tests/data/flood_rest.py")
        .display()
        .to_string()
}

/// `key=N` in a flood's summary line.
fn count(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// The start of `user`'s first subordinate range in `file` (useradd gives
/// every user one).
fn first_subordinate(file: &str, user: &str) -> u32 {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{user}:"))?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{user} has no subordinate range in {file}"))
}

/// *(issue 24)* Plain users cannot lock root out of the socket. Four users
/// hold 16 connections each with bodies that never arrive (64, the old
/// total); then one user does the same from four of its subordinate uids
/// (before: each uid had its own 16). Meanwhile root's and a `hypeman`
/// member's requests are all answered. Before: both were refused for as
/// long as the flood went on.
#[test]
fn no_user_locks_root_out() {
    let users = TestUsers::create(
        &["p1", "p2", "p3", "p4", "sub", "member"],
        &["member"],
        "hypeman",
    );
    let bus = TestBus::start();
    let (_state, dir, d) = l4_with_api(&bus);
    let sock = dir.path().join("devices.sock");
    let sock_s = sock.to_str().unwrap().to_string();
    let root_requests = |n: usize| -> usize {
        (0..n)
            .filter(|_| {
                raw(
                    &sock,
                    b"GET /devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .0
                .contains("200")
            })
            .count()
    };
    let member = |n: usize| -> String {
        let out = as_user(&users.names[5], "/usr/bin/python3")
            .args([&script(), &sock_s, &n.to_string(), "requests"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let refusals = || d.log().matches("API connection refused").count();

    // Several users.
    let floods: Vec<Flood> = users.names[..4]
        .iter()
        .map(|u| {
            let mut c = as_user(u, "/usr/bin/python3");
            c.args([&script(), &sock_s, "16", "body"]);
            Flood::start(c, 1)
        })
        .collect();
    // Every slot a plain user may have is taken, and more are being asked
    // for: the 16 refused reconnect at once.
    let before = refusals();
    wait_until(|| refusals() > before + 16);
    assert_eq!(root_requests(100), 100);
    let m = member(20);
    assert_eq!(
        m,
        "answered=20 refused=0",
        "{}",
        d.log()
            .lines()
            .filter(|l| l.contains("refused"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let body = r#"{"pci_address": "0000:a2:00.0"}"#;
    let made = raw(
        &sock,
        format!("POST /devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    );
    assert!(made.0.contains("201"), "{made:?}");
    for f in floods {
        let summary = f.stop();
        assert!(count(&summary[0], "held") >= 16, "{summary:?}");
    }

    // One user's subordinate uids: inside its own user namespace, four uids
    // that are 100000 + 1..4 outside, 16 connections each. They count as
    // the user: 16 in all.
    let sub = &users.names[4];
    let start = first_subordinate("/etc/subuid", sub);
    let gstart = first_subordinate("/etc/subgid", sub);
    let mut c = as_user(sub, "unshare");
    c.args([
        "--map-user=0",
        "--map-group=0",
        &format!("--map-users={start},1,8"),
        &format!("--map-groups={gstart},1,8"),
        "sh",
        "-c",
        &format!(
            // A background job's stdin would be /dev/null: give it ours.
            "exec 3<&0; for u in 1 2 3 4; do setpriv --reuid $u --regid $u --clear-groups /usr/bin/python3 {} {sock_s} 16 body <&3 & done; wait",
            script()
        ),
    ]);
    let flood = Flood::start(c, 4);
    let before = refusals();
    wait_until(|| refusals() > before + 16);
    let owner_refusals = d.log().matches("refused=Owner").count();
    assert!(
        owner_refusals > 0,
        "the subordinate uids were not counted as their user"
    );
    assert_eq!(root_requests(100), 100);
    assert_eq!(member(20), "answered=20 refused=0");
    let summary = flood.stop();
    assert_eq!(summary.len(), 4, "{summary:?}");
    let refused: u64 = summary.iter().map(|l| count(l, "refused")).sum();
    assert!(refused > 0, "{summary:?}");
}

/// *(issue 24)* Twelve clients of one plain user, each opening a connection
/// per request, are never refused: a connection's place is given back as
/// soon as the client hangs up, not when the daemon's task for it ends.
/// Before: 38,747 of 157,000 requests were closed unanswered.
#[test]
fn a_connection_per_request_is_never_refused() {
    let users = TestUsers::create(&["cpr"], &[], "hypeman");
    let bus = TestBus::start();
    let (_state, dir, _d) = l4_with_api(&bus);
    let sock = dir.path().join("devices.sock");
    let clients: Vec<std::process::Child> = (0..12)
        .map(|_| {
            as_user(&users.names[0], "/usr/bin/python3")
                .args([&script(), sock.to_str().unwrap(), "400", "requests"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut answered = 0;
    for c in clients {
        let mut p = Proc { child: c };
        let mut text = String::new();
        p.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        p.child.wait().unwrap();
        assert_eq!(count(&text, "refused"), 0, "{text}");
        answered += count(&text, "answered");
    }
    assert_eq!(answered, 12 * 400);
}

/// Socket activation: a listening socket passed as systemd passes it
/// (`systemd-socket-activate`, as `hypemand-api.socket` would) is served, and
/// the first request, made before the daemon runs, is what starts it.
#[test]
fn a_socket_passed_by_systemd_is_served() {
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let dir = open_dir();
    let sock = dir.path().join("activated.sock");
    let log = std::fs::File::create(state.path().join("activate.log")).unwrap();
    let mut cmd = std::process::Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(&sock)
        .arg(bin("hypemand"))
        .arg(format!("--bus={}", bus.address))
        .arg(format!("--state-dir={}", state.path().join("st").display()))
        .args(["--simulate", fixture("l4.toml").to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // systemd-socket-activate execs the daemon in its own place: one pid.
    let _activator = Proc {
        child: cmd
            .spawn()
            .expect("systemd-socket-activate (apt-get install systemd)"),
    };
    wait_until(|| sock.exists());
    assert!(
        !bus.has_owner(NAME),
        "the daemon started before any request"
    );
    let (status, body) = raw(
        &sock,
        b"GET /devices/available HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");
    assert!(bus.has_owner(NAME));
}

/// *(issue 24)* A connector that has left: the process that connected hands
/// its connection to a child and exits; the child's POST is answered 403,
/// saying so (before: 503 `busy` with polkit's "Failed to open file
/// /proc/PID/status").
#[test]
fn a_connector_that_has_left_is_forbidden_not_busy() {
    let users = TestUsers::create(&["leaver"], &["leaver"], "hypeman");
    let bus = TestBus::start_polkit();
    let _pk = shipped_polkit(&bus);
    let (_state, dir, _d) = l4_with_api(&bus);
    let sock = dir.path().join("devices.sock");
    // The parent connects, forks and exits; once the test has reaped it,
    // it tells the child (on stdin) to send.
    let program = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
if os.fork() == 0:
    sys.stdin.readline()  # the connector is gone and reaped
    body = b'{"pci_address": "0000:a2:00.0"}'
    s.sendall(b"POST /devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    os.write(1, got)
    os._exit(0)
os._exit(0)
"#;
    let out = as_user(&users.names[0], "/usr/bin/python3")
        .args(["-c", program, sock.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Proc { child: out };
    let mut go = p.child.stdin.take().unwrap();
    p.child.wait().unwrap();
    go.write_all(b"go\n").unwrap();
    drop(go);
    // The child inherits stdout: reading to its end waits for the child.
    let mut got = String::new();
    p.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut got)
        .unwrap();
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(
        got.contains("forbidden") && got.contains("has exited"),
        "{got}"
    );
    assert_eq!(bus.manager("List", &[]).unwrap()[0], serde_json::json!([]));
}
