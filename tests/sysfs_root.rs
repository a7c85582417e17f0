//! End to end: `hypemand --sysfs-root` on a copy of this machine's real PCI sysfs.
//!
//! The copy is made by reading the real /sys (never writing it) and laying the
//! files and links out as the kernel does. The expected values are read from the
//! real /sys independently of the daemon's code, so the test fails if the daemon
//! misreads what a real kernel wrote.

use crate::common;

use std::path::Path;

use common::*;

struct Seen {
    address: String,
    vendor: String,
    device: String,
    driver: Option<String>,
    group: Option<i64>,
}

fn link_target_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Copies the PCI part of /sys into `tree`, returning what the kernel reported.
fn capture(tree: &SysfsTree) -> Vec<Seen> {
    let mut seen = Vec::new();
    let devices = Path::new("/sys/bus/pci/devices");
    let mut entries: Vec<_> = std::fs::read_dir(devices).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let addr = e.file_name().to_string_lossy().into_owned();
        let src = e.path();
        let attrs: Vec<(&str, Vec<u8>)> = [
            "vendor",
            "device",
            "class",
            "subsystem_vendor",
            "subsystem_device",
            "driver_override",
            "uevent",
        ]
        .into_iter()
        .filter_map(|a| std::fs::read(src.join(a)).ok().map(|b| (a, b)))
        .collect();
        let attrs: Vec<(&str, &[u8])> = attrs.iter().map(|(a, b)| (*a, b.as_slice())).collect();
        let driver = link_target_name(&src.join("driver"));
        let group = link_target_name(&src.join("iommu_group"));
        tree.function(&Function {
            address: &addr,
            parent: "pci",
            attrs: &attrs,
            driver: driver.as_deref(),
            group: group.as_deref(),
        });
        let hex = |a: &str| {
            std::fs::read_to_string(src.join(a))
                .unwrap()
                .trim()
                .trim_start_matches("0x")
                .to_lowercase()
        };
        seen.push(Seen {
            vendor: hex("vendor"),
            device: hex("device"),
            address: addr,
            driver,
            group: group.and_then(|g| g.parse().ok()),
        });
    }
    seen
}

#[test]
fn reports_what_the_real_kernel_reported() {
    if !Path::new("/sys/bus/pci/devices").exists() {
        eprintln!("no PCI sysfs on this machine; nothing to compare against");
        return;
    }
    let tree = SysfsTree::new();
    let seen = capture(&tree);
    assert!(!seen.is_empty());

    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::on_tree(TestBus::start(), &tree);

    let all = bus.manager("ListAvailable", &[]).unwrap();
    let rows = all[0].as_array().unwrap();
    assert_eq!(rows.len(), seen.len());
    for (row, want) in rows.iter().zip(&seen) {
        assert_eq!(row["pci_address"]["data"], want.address.as_str());
        assert_eq!(row["vendor_id"]["data"], want.vendor.as_str());
        assert_eq!(row["device_id"]["data"], want.device.as_str());
        match &want.driver {
            Some(d) => assert_eq!(row["current_driver"]["data"], d.as_str()),
            None => assert!(row.get("current_driver").is_none()),
        }
        match want.group {
            Some(g) => assert_eq!(row["iommu_group"]["data"], g),
            None => assert!(row.get("iommu_group").is_none()),
        }
    }

    // Only a function with an IOMMU group that is not a bridge can be
    // registered (issue 14); on a machine without an IOMMU (a VM without a
    // virtual IOMMU, like these), every Register is refused, typed.
    let bridge = |a: &str| {
        std::fs::read_to_string(format!("/sys/bus/pci/devices/{a}/class"))
            .is_ok_and(|c| c.trim().starts_with("0x06"))
    };
    let Some(first) = seen
        .iter()
        .find(|s| s.group.is_some() && !bridge(&s.address))
    else {
        let out = bus.gdbus_call(
            PATH,
            &format!("{IFACE}.Register"),
            &[&seen[0].address, "captured"],
        );
        let name = gdbus_error_name(&out);
        assert!(
            name.ends_with(".NoIommu") || name.ends_with(".NotPassable"),
            "{out:?}"
        );
        return;
    };
    let reg = bus
        .manager("Register", &["ss", &first.address, "captured"])
        .unwrap();
    assert_eq!(reg[1]["pci_address"]["data"], first.address.as_str());
    let got = bus.manager("Get", &["s", "captured"]).unwrap();
    assert_eq!(got[0]["vendor_id"]["data"], first.vendor.as_str());
    assert_eq!(got[0]["device_id"]["data"], first.device.as_str());
    assert_eq!(got[0]["present"]["data"], true);
    match &first.driver {
        Some(d) => assert_eq!(got[0]["driver"]["data"], d.as_str()),
        None => assert!(got[0].get("driver").is_none()),
    }
}
