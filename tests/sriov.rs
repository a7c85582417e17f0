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
