//! The state directory and `devices.json` as an attacker would leave them
//! (issue 13, defects 4 to 9), against the real `hypemand`: what is unsafe is
//! refused at once with exit 3 and left as it is, what breaks a rule is
//! dropped record by record, and nothing is followed through a link.

use crate::common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;

use common::*;
use serde_json::json;

const GPU: &str = "0000:a2:00.0";

/// Runs hypemand on `state` and returns its output once it exits; a daemon
/// that has not exited when the wait's bound passes is stopped and reported
/// (the old code hung on a FIFO).
fn run_to_exit(bus: &TestBus, state: &Path) -> Output {
    let f = fixture("l4.toml");
    let child: Child = Daemon::command(bus, state, &["--simulate", f.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // The bound: a daemon still running after it is stopped by its pid.
    let guard = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    guard.join().unwrap();
    out
}

fn record(id: &str, name: &str, addr: &str) -> serde_json::Value {
    json!({
        "id": id, "name": name, "pci_address": addr,
        "vendor_id": "10de", "device_id": "27b8", "type": "gpu",
        "created_at": "2025-01-15T10:00:00Z", "want_vfio": false
    })
}

const ID_A: &str = "tz4a98xxat96iws9zmbrgj3a";
const ID_B: &str = "qe2ne9cyq0c4s7dwbn1yw1r8";

#[test]
fn a_state_directory_others_may_write_is_refused() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run_to_exit(&bus, state.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by group or others"), "{err}");
}

#[test]
fn a_registry_owned_by_someone_else_is_refused() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("devices.json");
    let text = json!({"version": 1, "devices": [record(ID_A, "l4-gpu", GPU)]}).to_string();
    std::fs::write(&file, &text).unwrap();
    std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
    let out = run_to_exit(&bus, state.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("owned by uid 65534"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}

#[test]
fn a_link_at_the_registry_is_not_followed() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let planted = tempfile::tempdir().unwrap();
    let target = planted.path().join("theirs.json");
    let text = json!({"version": 1, "devices": [record(ID_A, "l4-gpu", GPU)]}).to_string();
    std::fs::write(&target, &text).unwrap();
    std::os::unix::fs::symlink(&target, state.path().join("devices.json")).unwrap();
    let out = run_to_exit(&bus, state.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link"));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), text);
}

/// The journal follows the same rules: a link there is refused, not
/// followed, and one owned by someone else is refused; both are left as they are.
#[test]
fn the_journal_is_held_to_the_same_rules() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let planted = tempfile::tempdir().unwrap();
    let target = planted.path().join("theirs.journal");
    let line =
        json!({"seq": 1, "end": true, "add": record(ID_A, "l4-gpu", GPU)}).to_string() + "\n";
    std::fs::write(&target, &line).unwrap();
    let journal = state.path().join("devices.journal");
    std::os::unix::fs::symlink(&target, &journal).unwrap();
    let out = run_to_exit(&bus, state.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symbolic link; the journal"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), line);

    std::fs::remove_file(&journal).unwrap();
    std::fs::write(&journal, &line).unwrap();
    std::os::unix::fs::chown(&journal, Some(65534), Some(65534)).unwrap();
    let out = run_to_exit(&bus, state.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("owned by uid 65534"));
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), line);
}

#[test]
fn a_fifo_as_the_registry_is_refused_at_once() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    assert!(Command::new("mkfifo")
        .arg(state.path().join("devices.json"))
        .status()
        .unwrap()
        .success());
    let out = run_to_exit(&bus, state.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
}

#[test]
fn a_huge_version_is_newer_and_left_in_place() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("devices.json");
    let text = r#"{"version": 18446744073709551616, "devices": []}"#;
    std::fs::write(&file, text).unwrap();
    let out = run_to_exit(&bus, state.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("newer"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 1);
}

/// Bad records (ids and names the API refuses, a duplicate) are dropped one by
/// one: the valid ones stay, with their attachment, and the original file is
/// kept aside. Before, the whole registry was moved aside (or, for an id like
/// `x-y`, the daemon exited 5 in a restart loop).
#[test]
fn bad_records_are_dropped_and_the_rest_kept() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let mut attached = record(ID_A, "l4-gpu", GPU);
    attached["attached_to"] = json!("vm-1");
    let text = json!({"version": 1, "devices": [
        attached,
        record(ID_B, "nic", "0000:3b:00.0"),
        record("x-y", "bad-id", "0000:5e:00.0"),
        record("", "empty-id", "0000:5e:00.0"),
        record("abcdefghijklmnopqrstuvwx", "a/b", "0000:5e:00.0"),
        record("bbcdefghijklmnopqrstuvwx", "bell\u{7}", "0000:5e:00.0"),
        record("cbcdefghijklmnopqrstuvwx", "again", GPU),
    ]})
    .to_string();
    std::fs::write(state.path().join("devices.json"), &text).unwrap();
    let d = Daemon::simulate(&bus, state.path(), "l4.toml");
    let list = bus.manager("List", &[]).unwrap();
    let names: Vec<&str> = list[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"]["data"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{list}");
    assert!(
        names.contains(&"l4-gpu") && names.contains(&"nic"),
        "{names:?}"
    );
    let gpu = bus.manager("Get", &["s", "l4-gpu"]).unwrap();
    assert_eq!(gpu[0]["attached_to"]["data"], "vm-1");
    let aside: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("devices.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read_to_string(aside[0].path()).unwrap(), text);
    assert_eq!(
        d.log().matches("dropped a record").count(),
        5,
        "{}",
        d.log()
    );
}

#[test]
fn a_name_may_not_be_another_devices_id() {
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::start("l4.toml");
    let reg = bus.manager("Register", &["ss", GPU, "l4-gpu"]).unwrap();
    let id = reg[1]["id"]["data"].as_str().unwrap().to_string();
    let e = bus
        .manager("Register", &["ss", "0000:3b:00.0", &id])
        .unwrap_err();
    assert!(e.contains("already taken"), "{e}");
    // Get by that key still reaches the GPU, and nothing else was registered.
    let got = bus.manager("Get", &["s", &id]).unwrap();
    assert_eq!(got[0]["pci_address"]["data"], GPU);
    assert_eq!(
        bus.manager("List", &[]).unwrap()[0]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// The files are 0600 whatever the umask, and links planted at the temp
/// files (the snapshot's and the journal's, both rewritten at every change
/// with `--journal-limit 1`) are replaced rather than written through.
#[test]
fn the_registry_is_0600_and_the_temp_files_are_never_followed() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let f = fixture("l4.toml");
    let mut cmd = Daemon::command(
        &bus,
        state.path(),
        &["--simulate", f.to_str().unwrap(), "--journal-limit", "1"],
    );
    // The daemon's umask is 0 here: the mode must not come from it.
    use std::os::unix::process::CommandExt;
    // SAFETY: umask in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let d = Daemon::from_command(&bus, cmd);
    bus.manager("Register", &["ss", GPU, "l4-gpu"]).unwrap();
    let file = state.path().join("devices.json");
    let journal = state.path().join("devices.journal");
    // The compaction that follows the change.
    wait_until(|| std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"l4-gpu\"")));
    wait_until(|| std::fs::metadata(&journal).is_ok_and(|m| m.len() == 0));
    for f in [&file, &journal] {
        assert_eq!(std::fs::metadata(f).unwrap().mode() & 0o777, 0o600, "{f:?}");
    }

    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    for tmp in [".devices.json.tmp", ".devices.journal.tmp"] {
        std::os::unix::fs::symlink(&victim, state.path().join(tmp)).unwrap();
    }
    bus.manager("Register", &["ss", "0000:3b:00.0", "nic"])
        .unwrap();
    wait_until(|| std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"nic\"")));
    wait_until(|| std::fs::metadata(&journal).is_ok_and(|m| m.len() == 0));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    for f in [&file, &journal] {
        assert_eq!(std::fs::metadata(f).unwrap().mode() & 0o777, 0o600, "{f:?}");
    }
    drop(d);
}
