//! *(issue 15)* Hypeman's `/devices` REST API on hypemand's unix socket,
//! driven by the official SDK (PyPI `hypeman`, over an httpx unix-socket
//! transport) and by raw HTTP for the hostile cases.

mod common;

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

/// One raw HTTP/1.1 exchange; the status line and the body.
fn raw(sock: &Path, request: &[u8]) -> (String, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(request).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[test]
fn the_official_sdk_over_the_socket() {
    let python = sdk_python();
    let users = TestUsers::create(&["member", "plain"], &["member"], "hypeman");
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(
        &bus,
        &[(
            "50-org.hypeman.devices.rules",
            std::fs::read_to_string(root().join("polkit/50-org.hypeman.devices.rules")).unwrap(),
        )],
    );
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
    let state = tempfile::tempdir().unwrap();
    let dir = open_dir();
    let sock = dir.path().join("devices.sock");
    let _d = Daemon::start(
        &bus,
        state.path(),
        &[
            "--simulate",
            fixture("l4.toml").to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
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

    // The connection cap per uid: 16 idle connections are held; the 17th
    // is closed at once, while the held ones still answer.
    let mut held: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut extra = UnixStream::connect(&sock).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        extra.read(&mut buf).unwrap_or(0),
        0,
        "the 17th connection was served"
    );
    held[0]
        .write_all(b"GET /devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    held[0].read_to_string(&mut got).unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // A client that never sends its headers is cut off by the header
    // timeout, not kept forever (the read returns at EOF).
    let mut slow = held.pop().unwrap();
    slow.write_all(b"GET /dev").unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
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
