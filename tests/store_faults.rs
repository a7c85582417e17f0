//! The store on a tiny tmpfs: full (ENOSPC), then read-only. Every change
//! answers StoreFailed and changes nothing; reads go on; once space is back the
//! next change works without a restart. (A full disk still takes changes
//! while the journal's last page has room, so the daemon runs with
//! `--journal-limit 1`: every change is compacted into `devices.json` and the
//! journal left empty, and the next change needs a page it cannot get.)

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, opt: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn state_of(bus: &TestBus) -> (serde_json::Value, serde_json::Value) {
    (
        bus.manager("List", &[]).unwrap(),
        bus.manager("ListAvailable", &[]).unwrap(),
    )
}

fn all_store_failed(bus: &TestBus) {
    let calls: [(&str, &[&str]); 6] = [
        ("Register", &["0000:5e:00.0", "nvme"]),
        ("Bind", &["nic"]),
        ("Attach", &["nic", "vm-2"]),
        ("Detach", &["gpu"]),
        ("Unbind", &["nic2"]),
        ("Delete", &["nic2"]),
    ];
    for (method, args) in calls {
        let out = bus.gdbus_call(PATH, &format!("{IFACE}.{method}"), args);
        assert!(!out.status.success(), "{method} succeeded on a full disk");
        assert_eq!(
            gdbus_error_name(&out),
            "org.hypeman.Devices.Error.StoreFailed",
            "{method}: {out:?}"
        );
    }
}

#[test]
fn full_then_read_only_then_back() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(dir.path(), "256k");
    // l4.toml with a second NIC function, to sit on vfio-pci for Unbind and
    // Delete (its bridge cannot be registered).
    let text = std::fs::read_to_string(fixture("l4.toml")).unwrap()
        + "\n[[device]]\naddress = \"0000:3b:00.1\"\nvendor = \"8086\"\ndevice = \"1572\"\nclass = \"020000\"\niommu_group = 41\ndriver = \"i40e\"\n";
    let host = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host.path(), text).unwrap();
    let _d = Daemon::start(
        &bus,
        dir.path(),
        &[
            "--simulate",
            host.path().to_str().unwrap(),
            "--journal-limit",
            "1",
        ],
    );
    bus.manager("Register", &["ss", "0000:a2:00.0", "gpu"])
        .unwrap();
    bus.manager("Register", &["ss", "0000:3b:00.0", "nic"])
        .unwrap();
    bus.manager("Register", &["ss", "0000:3b:00.1", "nic2"])
        .unwrap();
    bus.manager("Attach", &["ss", "gpu", "vm-1"]).unwrap();
    bus.manager("Bind", &["s", "nic2"]).unwrap();

    // Every change compacted, the journal is empty. Fill the disk.
    wait_until(|| journal_len(dir.path()) == 0);
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1k"])
        .arg(format!("of={}", dir.path().join("filler").display()))
        .output();
    let stored = stored_records(dir.path());
    let before = state_of(&bus);
    all_store_failed(&bus);
    assert_eq!(state_of(&bus), before, "a refused change is visible");
    assert_eq!(stored_records(dir.path()), stored);
    assert!(bus.manager("Get", &["s", "gpu"]).is_ok());

    // Read-only.
    std::fs::remove_file(dir.path().join("filler")).unwrap();
    fs.remount("ro");
    all_store_failed(&bus);
    assert_eq!(state_of(&bus), before);

    // Space and write access back: the next change works, no restart.
    fs.remount("rw");
    bus.manager("Register", &["ss", "0000:5e:00.0", "nvme"])
        .unwrap();
    bus.manager("Detach", &["s", "gpu"]).unwrap();
    assert_eq!(stored_records(dir.path()).len(), 4);
}
