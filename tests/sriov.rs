//! *(issue 26, first step)* SR-IOV as the kernel shows it: a physical
//! function's `sriov_totalvfs`, `sriov_numvfs` and `sriov_vf_device`, a
//! virtual function's `physfn` link. `ListAvailable`, the records and
//! `Device1`'s properties show them, on the simulated host and on the real
//! backend reading a tree in the kernel's layout.

use crate::common;

use std::os::unix::fs::symlink;

use common::*;
use serde_json::Value;

const PF: &str = "0000:3b:00.0";
const VFS: [&str; 2] = ["0000:3b:02.0", "0000:3b:02.1"];

/// What both hosts must show: the physical function's counts, each virtual
/// function's parent, and no parent or counts where there are none.
fn shows_the_functions(bus: &TestBus) {
    let all = bus.available();
    let pf = all.of(PF);
    assert_eq!(pf["sriov_total_vfs"]["data"], 64, "{pf}");
    assert_eq!(pf["sriov_vfs"]["data"], 2, "{pf}");
    assert!(pf.get("parent").is_none(), "{pf}");
    for vf in VFS {
        let row = all.of(vf);
        assert_eq!(row["parent"]["data"], PF, "{row}");
        assert!(row.get("sriov_total_vfs").is_none(), "{row}");
    }

    // Registered, the records and the objects say the same.
    let pf_rec = bus.manager("Register", &["ss", PF, "x710"]).unwrap();
    assert_eq!(pf_rec[1]["sriov_total_vfs"]["data"], 64, "{pf_rec}");
    assert_eq!(pf_rec[1]["sriov_vfs"]["data"], 2, "{pf_rec}");
    let vf_rec = bus
        .manager("Register", &["ss", VFS[1], "x710-vf1"])
        .unwrap();
    assert_eq!(vf_rec[1]["parent"]["data"], PF, "{vf_rec}");
    let get = bus.manager("Get", &["s", "x710-vf1"]).unwrap();
    assert_eq!(get[0]["parent"]["data"], PF, "{get}");
    let property = |path: &Value, name: &str| {
        let out = bus.busctl(&[
            "get-property",
            NAME,
            path.as_str().unwrap(),
            "org.hypeman.Device1",
            name,
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(property(&pf_rec[0], "SriovTotalVfs"), "x 64");
    assert_eq!(property(&pf_rec[0], "SriovVfs"), "x 2");
    assert_eq!(property(&pf_rec[0], "Parent"), "s \"\"");
    assert_eq!(property(&vf_rec[0], "Parent"), format!("s \"{PF}\""));
    assert_eq!(property(&vf_rec[0], "SriovVfs"), "x -1");
}

#[test]
fn the_simulated_host_shows_its_virtual_functions() {
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::start("sriov-nic.toml");
    shows_the_functions(&bus);
}

#[test]
fn the_real_backend_reads_them_from_sysfs() {
    let tree = SysfsTree::new();
    let attrs = |device: &'static [u8]| -> Vec<(&'static str, &'static [u8])> {
        vec![
            ("vendor", b"0x8086\n"),
            ("device", device),
            ("class", b"0x020000\n"),
            ("driver_override", b"(null)\n"),
        ]
    };
    let mut pf_attrs = attrs(b"0x1572\n");
    pf_attrs.extend([
        ("sriov_totalvfs", b"64\n".as_slice()),
        ("sriov_numvfs", b"2\n".as_slice()),
        ("sriov_vf_device", b"154c\n".as_slice()),
    ]);
    let parent = "pci0000:3a/0000:3a:00.0";
    let pf = tree.function(&Function {
        address: PF,
        parent,
        attrs: &pf_attrs,
        driver: Some("i40e"),
        group: Some("40"),
    });
    for (i, vf) in VFS.iter().enumerate() {
        let group = format!("{}", 41 + i);
        let dir = tree.function(&Function {
            address: vf,
            parent,
            attrs: &attrs(b"0x154c\n"),
            driver: Some("iavf"),
            group: Some(&group),
        });
        // As the kernel links them: physfn next to the VF, virtfnN next to the PF.
        symlink(format!("../{PF}"), dir.join("physfn")).unwrap();
        symlink(format!("../{vf}"), pf.join(format!("virtfn{i}"))).unwrap();
    }
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::on_tree(TestBus::start(), &tree);
    shows_the_functions(&bus);
}

/// The error name and message of a failed `gdbus call`.
fn refused(out: std::process::Output) -> String {
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// *(issue 26)* SetVirtualFunctions over the bus, as an admin drives it:
/// 2 → 4 goes through 0, the new functions are announced before the answer
/// counts them, the physical function's `SriovVfs` is signalled, and the new
/// functions are listed with their parent; Bind of the physical function is
/// refused while they exist, forced too, naming them; `hypemanctl sriov`
/// removes them.
#[test]
fn set_virtual_functions_follows_the_new_functions() {
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::start("sriov-nic.toml");
    let pf = bus.manager("Register", &["ss", PF, "x710"]).unwrap();
    let path = pf[0].as_str().unwrap().to_string();
    let mut signals = Signals::watch(&bus, None);
    let set = bus
        .manager("SetVirtualFunctions", &["su", "x710", "4"])
        .unwrap();
    assert_eq!(set[0]["sriov_vfs"]["data"], 4, "{set}");
    for vf in ["0000:3b:02.2", "0000:3b:02.3"] {
        signals.wait_host(true, vf);
    }
    signals.wait_set(Some(&path), "SriovVfs", 4i64);
    let writes: Vec<String> = bus
        .journal()
        .into_iter()
        .filter(|j| j.starts_with("set_num_vfs"))
        .collect();
    assert_eq!(
        writes,
        ["set_num_vfs 0000:3b:00.0 0", "set_num_vfs 0000:3b:00.0 4"]
    );
    let all = bus.available();
    let vf = all.of("0000:3b:02.3");
    assert_eq!(vf["parent"]["data"], PF, "{vf}");
    assert_eq!(vf["current_driver"]["data"], "iavf", "{vf}");
    let pf_row = all.of(PF);
    assert_eq!(pf_row["passable"]["data"], false, "{pf_row}");

    // The physical function does not move while its functions exist.
    let e = refused(bus.gdbus_call(&path, "org.hypeman.Device1.Bind", &[]));
    assert!(e.contains("org.hypeman.Devices.Error.HostInUse"), "{e}");
    assert!(
        e.contains("0000:3b:02.0, 0000:3b:02.1, 0000:3b:02.2, 0000:3b:02.3"),
        "{e}"
    );
    let e = refused(bus.gdbus_call(
        &path,
        "org.hypeman.Device1.BindWithOptions",
        &["{'force': <true>}"],
    ));
    assert!(
        e.contains("HostInUse") && e.contains("virtual functions enabled"),
        "{e}"
    );

    // Past the total, a typed refusal; through Device1 the same method.
    let e = refused(bus.gdbus_call(&path, "org.hypeman.Device1.SetVirtualFunctions", &["65"]));
    assert!(
        e.contains("org.hypeman.Devices.Error.InvalidArgument") && e.contains("at most 64"),
        "{e}"
    );

    let out = bus.hypemanctl(&["sriov", "x710", "0"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sriov: 0 of 64 virtual functions"),
        "{out:?}"
    );
    for vf in ["0000:3b:02.0", "0000:3b:02.3"] {
        signals.wait_host(false, vf);
    }
    let bound = bus.manager("Bind", &["s", "x710"]).unwrap();
    assert_eq!(bound[0]["bound_to_vfio"]["data"], true, "{bound}");
}

/// A virtual function that never appears: the answer is `Timeout`, naming
/// it, and the previous count is made again. A registered virtual function
/// on vfio-pci refuses any change (`InUse`) before anything is written.
#[test]
fn a_lost_function_is_undone_and_a_held_one_refuses() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let f = fixture("sriov-nic.toml");
    let _d = Daemon::start(
        &bus,
        state.path(),
        &["--simulate", f.to_str().unwrap(), "--sysfs-timeout", "1"],
    );
    bus.manager("Register", &["ss", PF, "x710"]).unwrap();
    bus.inject("set_num_vfs", PF, "lost");
    let e = refused(bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.SetVirtualFunctions",
        &["x710", "3"],
    ));
    assert!(e.contains("org.hypeman.Devices.Error.Timeout"), "{e}");
    assert!(
        e.contains("0000:3b:02.2") && e.contains("put back to 2"),
        "{e}"
    );
    let get = bus.manager("Get", &["s", "x710"]).unwrap();
    assert_eq!(get[0]["sriov_vfs"]["data"], 2, "{get}");
    bus.sim("ClearFaults", &[]);

    bus.manager("Register", &["ss", VFS[0], "vf0"]).unwrap();
    bus.manager("Bind", &["s", "vf0"]).unwrap();
    let before = bus.journal().len();
    let e = refused(bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.SetVirtualFunctions",
        &["x710", "0"],
    ));
    assert!(
        e.contains("org.hypeman.Devices.Error.InUse")
            && e.contains("vf0 (0000:3b:02.0) is on vfio-pci"),
        "{e}"
    );
    assert_eq!(bus.journal().len(), before, "nothing was written");
}

/// The real backend on a tree in the kernel's layout, which sends no
/// uevents: the count is written through 0, the new functions never appear,
/// and the tree is left with the count it had.
#[test]
fn the_real_backend_writes_the_count_and_puts_it_back() {
    let tree = SysfsTree::new();
    let pf = tree.function(&Function {
        address: PF,
        parent: "pci0000:3a/0000:3a:00.0",
        attrs: &[
            ("vendor", b"0x8086\n"),
            ("device", b"0x1572\n"),
            ("class", b"0x020000\n"),
            ("driver_override", b"(null)\n"),
            ("sriov_totalvfs", b"64\n"),
            ("sriov_numvfs", b"0\n"),
            ("sriov_offset", b"16\n"),
            ("sriov_stride", b"1\n"),
            ("sriov_vf_device", b"154c\n"),
        ],
        driver: Some("i40e"),
        group: Some("40"),
    });
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let root = tree.root().to_str().unwrap().to_string();
    let _d = Daemon::start(
        &bus,
        state.path(),
        &["--sysfs-root", &root, "--sysfs-timeout", "1"],
    );
    bus.manager("Register", &["ss", PF, "x710"]).unwrap();
    let e = refused(bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.SetVirtualFunctions",
        &["x710", "2"],
    ));
    // Both functions are named missing: the count read back was 2, so it
    // was written.
    assert!(
        e.contains("Timeout") && e.contains("0000:3b:02.0, 0000:3b:02.1"),
        "{e}"
    );
    assert!(e.contains("put back to 0"), "{e}");
    let numvfs = std::fs::read_to_string(pf.join("sriov_numvfs")).unwrap();
    assert_eq!(numvfs, "0\n");
}
