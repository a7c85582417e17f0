//! A host read that blocks in the kernel holds only its own device.
//!
//! In a `--sysfs-root` tree, one registered device's `vendor` is a FIFO whose
//! write end the test holds open: reading it blocks, as reading
//! `driver_override` does on a real kernel while a driver is stuck in
//! `remove()`. That device's Get answers `Timeout` at the deadline; meanwhile
//! `Peer.Ping` and the other device's Get are answered; the next Get of the
//! stuck device answers `Timeout` at once without another stuck thread; and
//! SIGTERM still stops the daemon.

use crate::common;

use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};

use common::*;

const STUCK: &str = "0000:a2:00.0";
const OTHER: &str = "0000:b2:00.0";

fn add_device(tree: &SysfsTree, addr: &str, group: &str) {
    tree.function(&Function {
        address: addr,
        parent: "pci0000:00",
        attrs: &[
            ("vendor", b"0x10de\n"),
            ("device", b"0x27b8\n"),
            ("class", b"0x030200\n"),
            ("driver_override", b"(null)\n"),
            ("numa_node", b"1\n"),
        ],
        driver: Some("nvidia"),
        group: Some(group),
    });
}

#[test]
fn a_stuck_read_holds_only_its_own_device() {
    let tree = SysfsTree::new();
    let root = tree.root();
    add_device(&tree, STUCK, "82");
    add_device(&tree, OTHER, "83");
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &bus,
        state.path(),
        &[
            "--sysfs-root",
            root.to_str().unwrap(),
            "--sysfs-timeout",
            "3",
        ],
    );
    bus.manager("Register", &["ss", STUCK, "stuck-gpu"])
        .unwrap();
    bus.manager("Register", &["ss", OTHER, "other-gpu"])
        .unwrap();

    let vendor = root.join("devices/pci0000:00").join(STUCK).join("vendor");
    std::fs::remove_file(&vendor).unwrap();
    assert!(Command::new("mkfifo")
        .arg(&vendor)
        .status()
        .unwrap()
        .success());

    // Root's Get of the stuck device, in the background.
    let out = bus.dir.path().join("get-stuck.out");
    let mut get = Proc {
        child: Command::new("busctl")
            .args([
                &format!("--address={}", bus.address),
                "call",
                NAME,
                PATH,
                IFACE,
                "Get",
                "s",
                "stuck-gpu",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&out).unwrap())
            .spawn()
            .unwrap(),
    };
    // The daemon's read has opened the FIFO once a non-blocking open for
    // writing succeeds; holding that write end open keeps the read blocked.
    let mut writer = None;
    wait_until(|| {
        writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&vendor)
            .ok();
        writer.is_some()
    });

    // While that read is stuck: the bus's Ping and the other device's Get.
    bus.call(PATH, "org.freedesktop.DBus.Peer", "Ping", &[])
        .unwrap();
    let got = bus.manager("Get", &["s", "other-gpu"]).unwrap();
    assert_eq!(got[0]["pci_address"]["data"], OTHER);
    assert!(
        get.child.try_wait().unwrap().is_none(),
        "the stuck Get finished before Ping and the other Get were answered"
    );

    // The stuck Get answers Timeout (at the deadline).
    let status = get.child.wait().unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("did not answer within"), "{text}");

    // The next Get of that device answers Timeout at once: its read is still
    // stuck (the FIFO is still held), and no second thread joins it.
    let e = bus.manager("Get", &["s", "stuck-gpu"]).unwrap_err();
    assert!(e.contains("still stuck in the kernel"), "{e}");
    assert!(bus.manager("Get", &["s", "other-gpu"]).is_ok());

    // SIGTERM stops the daemon with the read still stuck.
    let status = d.proc.signal_and_wait("TERM");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    drop(writer);
}

/// `numa_node` is read from sysfs: in the record, on the object, and in
/// `ListAvailable`; -1 (no NUMA) leaves it out.
#[test]
fn numa_node_is_read_from_sysfs() {
    let tree = SysfsTree::new();
    let root = tree.root();
    add_device(&tree, STUCK, "82");
    add_device(&tree, OTHER, "83");
    std::fs::write(
        root.join("devices/pci0000:00")
            .join(OTHER)
            .join("numa_node"),
        "-1\n",
    )
    .unwrap();
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::start(
        &bus,
        state.path(),
        &["--sysfs-root", root.to_str().unwrap()],
    );
    let one = bus.manager("Register", &["ss", STUCK, "one"]).unwrap();
    assert_eq!(one[1]["numa_node"]["data"], 1, "{one}");
    let path = one[0].as_str().unwrap();
    let prop = bus.busctl(&[
        "--json=short",
        "get-property",
        NAME,
        path,
        "org.hypeman.Device1",
        "NumaNode",
    ]);
    assert!(
        String::from_utf8_lossy(&prop.stdout).contains("\"data\":1"),
        "{prop:?}"
    );
    let none = bus.manager("Register", &["ss", OTHER, "none"]).unwrap();
    assert!(none[1].get("numa_node").is_none(), "{none}");
    let available = bus.manager("ListAvailable", &[]).unwrap();
    let numas: Vec<_> = available[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.get("numa_node").map(|n| n["data"].clone()))
        .collect();
    assert_eq!(numas, vec![Some(serde_json::json!(1)), None]);
}
