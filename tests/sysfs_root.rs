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
    /// *(issue 28)* What the daemon must make of the kernel's reset files.
    reset_method: Option<String>,
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
            "reset_method",
        ]
        .into_iter()
        .filter_map(|a| std::fs::read(src.join(a)).ok().map(|b| (a, b)))
        .collect();
        let attrs: Vec<(&str, &[u8])> = attrs.iter().map(|(a, b)| (*a, b.as_slice())).collect();
        let driver = link_target_name(&src.join("driver"));
        let group = link_target_name(&src.join("iommu_group"));
        // `reset` is write-only: its presence is what the kernel says.
        let resettable = src.join("reset").exists();
        let reset_method = match std::fs::read_to_string(src.join("reset_method")) {
            Ok(t) => Some(t.split_whitespace().collect::<Vec<_>>().join(" ")),
            Err(_) if resettable => None,
            Err(_) => Some(String::new()),
        };
        tree.function(&Function {
            address: &addr,
            parent: "pci",
            attrs: &attrs,
            driver: driver.as_deref(),
            group: group.as_deref(),
        });
        if resettable {
            std::fs::write(
                tree.root()
                    .join("bus/pci/devices")
                    .join(&addr)
                    .join("reset"),
                "",
            )
            .unwrap();
        }
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
            reset_method,
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
        // *(issue 28)* The reset method as the kernel says it, and a
        // function it cannot reset warned of (never blocked for it).
        let warned = row["warnings"]["data"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["code"]["data"] == "no-reset"));
        match &want.reset_method {
            Some(r) => assert_eq!(row["reset_method"]["data"], r.as_str(), "{row}"),
            None => assert!(row.get("reset_method").is_none(), "{row}"),
        }
        assert_eq!(warned, want.reset_method.as_deref() == Some(""), "{row}");
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

/// *(issue 28)* On a tree in the kernel's layout: a function with
/// `reset_method` shows its methods (`Device1.ResetMethod`, records,
/// `hypemanctl get`); one with neither `reset_method` nor `reset` cannot be
/// reset and is warned of (`no-reset`); one with only `reset` (a kernel
/// before 5.15) is not said. `pcie_acs_override=` on the host root's
/// `/proc/cmdline` is a warning on every entry, on `hypemanctl status` and
/// on the status line. Neither blocks.
#[test]
fn reset_methods_and_the_acs_override_warn_and_never_block() {
    let tree = SysfsTree::new();
    let gpu: &[(&str, &[u8])] = &[
        ("vendor", b"0x10de\n"),
        ("device", b"0x27b8\n"),
        ("class", b"0x030200\n"),
    ];
    for (address, group, reset) in [
        ("0000:a2:00.0", "82", Some("flr bus\n")),
        ("0000:a3:00.0", "83", None),
        ("0000:a4:00.0", "84", Some("")),
    ] {
        let dev = tree.function(&Function {
            address,
            parent: "pci0000:a0",
            attrs: gpu,
            driver: None,
            group: Some(group),
        });
        match reset {
            Some("") => std::fs::write(dev.join("reset"), "").unwrap(),
            Some(methods) => {
                std::fs::write(dev.join("reset"), "").unwrap();
                std::fs::write(dev.join("reset_method"), methods).unwrap();
            }
            None => {}
        }
    }
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(host.path().join("proc")).unwrap();
    std::fs::write(
        host.path().join("proc/cmdline"),
        "BOOT_IMAGE=/vmlinuz ro pcie_acs_override=downstream,multifunction quiet\n",
    )
    .unwrap();
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let root = tree.root().to_str().unwrap();
    let host_root = host.path().to_str().unwrap();
    let d = Daemon::start(
        &bus,
        state.path(),
        &["--sysfs-root", root, "--host-root", host_root],
    );

    let all = bus.manager("ListAvailable", &[]).unwrap();
    let rows = all[0].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{all}");
    let codes = |row: &serde_json::Value| -> Vec<String> {
        row["warnings"]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["code"]["data"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(rows[0]["reset_method"]["data"], "flr bus");
    assert_eq!(codes(&rows[0]), ["acs-override"]);
    assert_eq!(rows[1]["reset_method"]["data"], "");
    assert_eq!(codes(&rows[1]), ["no-reset", "acs-override"]);
    assert!(rows[2].get("reset_method").is_none(), "{}", rows[2]);
    assert_eq!(codes(&rows[2]), ["acs-override"]);
    for row in rows {
        let blockers = row["blockers"]["data"].as_array().unwrap();
        assert!(
            blockers.iter().all(|b| {
                let c = b["code"]["data"].as_str().unwrap();
                c != "no-reset" && c != "acs-override"
            }),
            "{row}"
        );
    }

    // Registered: Device1 and `hypemanctl get` say it too.
    for (address, name) in [
        ("0000:a2:00.0", "flr"),
        ("0000:a3:00.0", "none"),
        ("0000:a4:00.0", "old"),
    ] {
        bus.manager("Register", &["ss", address, name]).unwrap();
    }
    let property = |name: &str| {
        let id = bus.manager("Get", &["s", name]).unwrap()[0]["id"]["data"]
            .as_str()
            .unwrap()
            .to_string();
        let out = bus.busctl(&[
            "get-property",
            NAME,
            &format!("{PATH}/{id}"),
            "org.hypeman.Device1",
            "ResetMethod",
        ]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(property("flr"), "s \"flr bus\"");
    assert_eq!(property("none"), "s \"\"");
    assert_eq!(property("old"), "s \"unknown\"");
    let get = bus.hypemanctl(&["get", "none"]);
    assert!(
        String::from_utf8_lossy(&get.stdout).contains("reset method: none"),
        "{get:?}"
    );
    let get = bus.hypemanctl(&["--json", "get", "flr"]);
    let doc: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(doc["reset_method"], "flr bus", "{doc}");

    let status = bus.hypemanctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("pcie_acs_override"),
        "{status:?}"
    );
    let status = bus.hypemanctl(&["--json", "status"]);
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(doc["acs_override"], true, "{doc}");
    assert!(d.log().contains("pcie_acs_override"), "{}", d.log());
}

/// *(issue 28)* The vfio driver of each function, from the running kernel's
/// `modules.alias` under `--host-root` (`lib/modules/<osrelease>/`, the
/// release read from the host root's `/proc/sys/kernel/osrelease`), in the
/// lines depmod writes: a Grace Hopper GPU (10de:2342) gets
/// `nvgrace_gpu_vfio_pci`, a ConnectX-7 virtual function (15b3:101e)
/// `mlx5_vfio_pci`, and an L4 the catch-all's `vfio-pci`. A function bound
/// to a variant counts as on vfio (`vfio-dev/` too proves it).
#[test]
fn the_vfio_driver_is_the_best_alias_of_the_kernels_modules() {
    let tree = SysfsTree::new();
    for (address, group, ids, driver) in [
        ("0009:01:00.0", "9", ("0x10de", "0x2342", "0x030200"), None),
        (
            "0009:02:00.1",
            "10",
            ("0x15b3", "0x101e", "0x020000"),
            Some("mlx5_vfio_pci"),
        ),
        ("0000:a2:00.0", "82", ("0x10de", "0x27b8", "0x030200"), None),
    ] {
        let attrs: &[(&str, &[u8])] = &[
            ("vendor", ids.0.as_bytes()),
            ("device", ids.1.as_bytes()),
            ("class", ids.2.as_bytes()),
            ("subsystem_vendor", ids.0.as_bytes()),
            ("subsystem_device", b"0x0001"),
        ];
        let dev = tree.function(&Function {
            address,
            parent: "pci0009:00",
            attrs,
            driver,
            group: Some(group),
        });
        if driver.is_some() {
            std::fs::create_dir_all(dev.join("vfio-dev/vfio3")).unwrap();
        }
    }
    let host = tempfile::tempdir().unwrap();
    let release = "6.12.48+deb13-arm64";
    std::fs::create_dir_all(host.path().join("proc/sys/kernel")).unwrap();
    std::fs::write(
        host.path().join("proc/sys/kernel/osrelease"),
        format!("{release}\n"),
    )
    .unwrap();
    let modules = host.path().join("lib/modules").join(release);
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::write(
        modules.join("modules.alias"),
        "# Aliases extracted from modules themselves.\n\
         alias pci:v000010DEd*sv*sd*bc03sc*i* nouveau\n\
         alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci\n\
         alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n\
         alias vfio_pci:v000010DEd00002345sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n\
         alias vfio_pci:v000010DEd00002348sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n\
         alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n",
    )
    .unwrap();
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let root = tree.root().to_str().unwrap();
    let d = Daemon::start(
        &bus,
        state.path(),
        &[
            "--sysfs-root",
            root,
            "--host-root",
            host.path().to_str().unwrap(),
        ],
    );
    let all = bus.manager("ListAvailable", &[]).unwrap();
    let rows = all[0].as_array().unwrap();
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["pci_address"]["data"].as_str().unwrap().to_string(),
                r["vfio_driver"]["data"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("0000:a2:00.0".to_string(), "vfio-pci".to_string()),
            (
                "0009:01:00.0".to_string(),
                "nvgrace_gpu_vfio_pci".to_string()
            ),
            ("0009:02:00.1".to_string(), "mlx5_vfio_pci".to_string()),
        ]
    );
    bus.manager("Register", &["ss", "0009:02:00.1", "cx7-vf"])
        .unwrap();
    let vf = bus.manager("Get", &["s", "cx7-vf"]).unwrap();
    assert_eq!(vf[0]["bound_to_vfio"]["data"], true, "{vf}");
    // Its VFIO cdev, as the kernel lays it out, for iommufd.
    assert_eq!(
        vf[0]["vfio_devices"]["data"],
        serde_json::json!(["/dev/vfio/devices/vfio3", "/dev/iommu"]),
        "{vf}"
    );
    assert!(d.log().contains("variants=2"), "{}", d.log());
}
