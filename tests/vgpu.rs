//! *(issue 26)* vGPU types and GPU capacity: `ListVgpuTypes`,
//! `GpuResources` over D-Bus and `GET /resources/gpu` over the REST socket,
//! the same document both ways and accepted by the official SDK's
//! `GPUResourceStatus`, on the simulator (vendor-VFIO and mdev) and on the
//! real backend reading a tree in the kernel's and NVIDIA's layout.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

/// Validates `docs` (model, document) with the SDK; the validator's report.
fn sdk_validates(docs: &[(&str, Value)]) -> (bool, String) {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("docs.jsonl");
    let lines: Vec<String> = docs
        .iter()
        .map(|(m, d)| json!({"model": m, "what": m, "doc": d}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = Command::new(sdk_python())
        .arg(root().join("tests/data/validate_sdk.py"))
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `hypemanctl --json ARGS`'s document.
fn ctl(bus: &TestBus, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = bus.hypemanctl(&all);
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET /resources/gpu` on the REST socket.
fn rest_gpu(sock: &Path) -> Value {
    let (status, body) = raw(
        sock,
        b"GET /resources/gpu HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains("200"), "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A daemon on `fixture` with the REST socket; its socket's directory too.
fn with_api(bus: &TestBus, state: &Path, fixture_name: &str) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("devices.sock");
    let f = fixture(fixture_name);
    let d = Daemon::start(
        bus,
        state,
        &[
            "--simulate",
            f.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    (dir, d)
}

/// Both frameworks on the simulator: passthrough until the GPU has virtual
/// functions, then vGPU mode with every type counted; the D-Bus and REST
/// documents are the same and the SDK accepts both (and refuses a broken
/// one, so it cannot pass vacuously).
#[test]
fn capacity_in_hypemans_shape_on_both_frameworks() {
    for (fixture_name, gpu, first, framework) in [
        (
            "l40s-vgpu.toml",
            "0000:41:00.0",
            "NVIDIA L40S-1Q",
            "vendor-vfio",
        ),
        ("a100-mdev.toml", "0000:82:00.0", "GRID A100-10C", "mdev"),
    ] {
        let bus = TestBus::start_sim();
        let state = tempfile::tempdir().unwrap();
        let (dir, _d) = with_api(&bus, state.path(), fixture_name);
        let sock = dir.path().join("devices.sock");
        ctl(&bus, &["register", gpu, "--name", "gpu0"]);
        let before = rest_gpu(&sock);
        assert_eq!(before["mode"], "passthrough", "{before}");
        assert_eq!(before["devices"][0]["available"], true, "{before}");

        ctl(&bus, &["sriov", "gpu0", "4"]);
        let types = ctl(&bus, &["vgpu", "types"]);
        let types = types.as_array().unwrap();
        assert!(
            types
                .iter()
                .all(|t| t["parent"] == gpu && t["framework"] == framework),
            "{types:?}"
        );
        let named = |n: &str| types.iter().find(|t| t["name"] == n).unwrap().clone();
        assert_eq!(named(first)["available"], 4, "{types:?}");
        let after = rest_gpu(&sock);
        assert_eq!(after, ctl(&bus, &["resources"]), "REST and D-Bus agree");
        assert_eq!(
            (&after["mode"], &after["total_slots"], &after["used_slots"]),
            (&json!("vgpu"), &json!(4), &json!(0)),
            "{after}"
        );
        assert!(after.get("devices").is_none(), "{after}");
        let dbus = bus.manager("GpuResources", &[]).unwrap();
        assert_eq!(dbus[0]["mode"]["data"], "vgpu", "{dbus}");
        let (ok, report) = sdk_validates(&[
            ("GPUResourceStatus", before.clone()),
            ("GPUResourceStatus", after.clone()),
        ]);
        assert!(
            ok && report.contains("checked 2 documents, 0 invalid"),
            "{report}"
        );
        let mut broken = after.clone();
        broken["mode"] = json!("shared");
        let (ok, report) = sdk_validates(&[("GPUResourceStatus", broken)]);
        assert!(!ok && report.contains("mode"), "{report}");
    }
}

/// The real backend reads NVIDIA's files: a vendor-VFIO L40S with one
/// virtual function carrying a 4Q and one free, and an mdev A100 whose one
/// function carries an mdev (its type's `devices/` lists it), so nothing
/// more is available there.
#[test]
fn the_real_backend_reads_vgpus_from_sysfs() {
    let tree = SysfsTree::new();
    let gpu_attrs =
        |device: &'static [u8], numvfs: &'static [u8]| -> Vec<(&'static str, &'static [u8])> {
            vec![
                ("vendor", b"0x10de\n"),
                ("device", device),
                ("class", b"0x030200\n"),
                ("driver_override", b"(null)\n"),
                ("sriov_totalvfs", b"32\n"),
                ("sriov_numvfs", numvfs),
                ("sriov_offset", b"4\n"),
                ("sriov_stride", b"1\n"),
            ]
        };
    let vf_attrs: Vec<(&str, &[u8])> = vec![
        ("vendor", b"0x10de\n"),
        ("device", b"0x26b9\n"),
        ("class", b"0x030200\n"),
        ("driver_override", b"(null)\n"),
    ];
    let l40s = tree.function(&Function {
        address: "0000:41:00.0",
        parent: "pci0000:40/0000:40:01.0",
        attrs: &gpu_attrs(b"0x26b9\n", b"2\n"),
        driver: Some("nvidia"),
        group: Some("30"),
    });
    for (i, (vf, current, creatable)) in [
        ("0000:41:00.4", "1152\n", "ID : vGPU Name\n"),
        (
            "0000:41:00.5",
            "0\n",
            "ID : vGPU Name\n1152 : NVIDIA L40S-4Q\n",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tree.function(&Function {
            address: vf,
            parent: "pci0000:40/0000:40:01.0",
            attrs: &vf_attrs,
            driver: Some("nvidia"),
            group: Some(&format!("{}", 31 + i)),
        });
        std::os::unix::fs::symlink("../0000:41:00.0", dir.join("physfn")).unwrap();
        std::fs::create_dir(dir.join("nvidia")).unwrap();
        std::fs::write(dir.join("nvidia/current_vgpu_type"), current).unwrap();
        std::fs::write(dir.join("nvidia/creatable_vgpu_types"), creatable).unwrap();
        std::os::unix::fs::symlink(format!("../{vf}"), l40s.join(format!("virtfn{i}"))).unwrap();
    }
    tree.function(&Function {
        address: "0000:82:00.0",
        parent: "pci0000:80/0000:80:01.0",
        attrs: &gpu_attrs(b"0x20f1\n", b"1\n"),
        driver: Some("nvidia"),
        group: Some("60"),
    });
    let vf = tree.function(&Function {
        address: "0000:82:00.4",
        parent: "pci0000:80/0000:80:01.0",
        attrs: &vf_attrs,
        driver: Some("nvidia"),
        group: Some("61"),
    });
    std::os::unix::fs::symlink("../0000:82:00.0", vf.join("physfn")).unwrap();
    let uuid = "aa618089-8b16-4d01-a136-25a0f3c73123";
    let ty = tree
        .root()
        .join("class/mdev_bus/0000:82:00.4/mdev_supported_types/nvidia-470");
    std::fs::create_dir_all(ty.join("devices").join(uuid)).unwrap();
    std::fs::write(ty.join("name"), "GRID A100-4C\n").unwrap();
    std::fs::write(
        ty.join("description"),
        "num_heads=1, frl_config=60, framebuffer=4096M, max_resolution=4096x2160, max_instance=10\n",
    )
    .unwrap();
    std::fs::write(ty.join("available_instances"), "0\n").unwrap();
    std::fs::write(ty.join("device_api"), "vfio-pci\n").unwrap();
    // A hostile type directory name is never read as a type.
    std::fs::create_dir_all(
        tree.root()
            .join("class/mdev_bus/0000:82:00.4/mdev_supported_types/x y"),
    )
    .unwrap();

    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::on_tree(TestBus::start(), &tree);
    ctl(&bus, &["register", "0000:41:00.0", "--name", "l40s"]);
    ctl(&bus, &["register", "0000:82:00.0", "--name", "a100"]);
    let types = ctl(&bus, &["vgpu", "types"]);
    assert_eq!(
        types,
        json!([
            {"parent": "0000:41:00.0", "framework": "vendor-vfio", "type_id": "1152",
             "name": "NVIDIA L40S-4Q", "framebuffer_mb": 4096, "available": 1},
            {"parent": "0000:82:00.0", "framework": "mdev", "type_id": "nvidia-470",
             "name": "GRID A100-4C", "framebuffer_mb": 4096, "available": 0},
        ])
    );
    let r = ctl(&bus, &["resources"]);
    assert_eq!(
        (&r["mode"], &r["total_slots"], &r["used_slots"]),
        (&json!("vgpu"), &json!(3), &json!(2)),
        "{r}"
    );
    let (ok, report) = sdk_validates(&[("GPUResourceStatus", r)]);
    assert!(ok, "{report}");
}

/// The L40S registered as `l40s` with two virtual functions: its object path.
fn l40s_with_two_vfs(bus: &TestBus) -> String {
    let gpu = ctl(bus, &["register", "0000:41:00.0", "--name", "l40s"]);
    ctl(bus, &["sriov", "l40s", "2"]);
    format!("/org/hypeman/Devices/{}", gpu["id"].as_str().unwrap())
}

/// A device's `Blockers` read alone (busctl's JSON data).
fn blockers_read_alone(bus: &TestBus, path: &str) -> Value {
    let out = bus.busctl(&[
        "--json=short",
        "get-property",
        NAME,
        path,
        "org.hypeman.Device1",
        "Blockers",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["data"].clone()
}

/// A vGPU made behind the daemon's back (Simulator1.SetVgpu, as another
/// tool would): the GPU shows the `vgpus` blocker naming it, keeps its
/// virtual functions and its registration (`InUse`), and the capacity counts
/// it; once it is gone, the GPU is deleted.
#[test]
fn a_gpu_carrying_vgpus_stays_as_it_is() {
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::start("l40s-vgpu.toml");
    let path = l40s_with_two_vfs(&bus);
    bus.sim("SetVgpu", &["ss", "0000:41:00.4", "1152"]);
    let blockers = blockers_read_alone(&bus, &path);
    let vgpus = blockers
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["code"]["data"] == "vgpus")
        .unwrap_or_else(|| panic!("{blockers}"))
        .clone();
    assert!(
        vgpus["message"]["data"]
            .as_str()
            .unwrap()
            .contains("0000:41:00.4 (type 1152)"),
        "{vgpus}"
    );
    for (method, args) in [
        ("org.hypeman.Devices1.Delete", &["l40s"][..]),
        ("org.hypeman.Devices1.SetVirtualFunctions", &["l40s", "0"]),
    ] {
        let out = bus.gdbus_call(PATH, method, args);
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && e.contains("org.hypeman.Devices.Error.InUse"),
            "{method}: {e}"
        );
    }
    let r = ctl(&bus, &["resources"]);
    assert_eq!(
        (&r["total_slots"], &r["used_slots"]),
        (&json!(2), &json!(1)),
        "{r}"
    );
    assert_eq!(
        r["profiles"],
        json!([{"name": "NVIDIA L40S-4Q", "framebuffer_mb": 4096, "available": 1}]),
        "equal-size mode: only 4 GB types are left, once (one free function)"
    );
    bus.sim("SetVgpu", &["ss", "0000:41:00.4", ""]);
    ctl(&bus, &["sriov", "l40s", "0"]);
    let out = bus.hypemanctl(&["delete", "l40s"]);
    assert!(out.status.success(), "{out:?}");
}

/// The error name and message of a `gdbus call` that must fail.
fn gdbus_refused(out: std::process::Output) -> String {
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// CreateVgpu, ListVgpus and DeleteVgpu over the bus and through
/// hypemanctl: each made vGPU is announced (`VgpuCreated`), listed and
/// counted; a bad request is `InvalidArgument`; a vGPU a VMM holds open is
/// not deleted (`HostInUse`); deleting one is announced (`VgpuDeleted`),
/// and with none left the GPU can go.
#[test]
fn vgpus_are_made_listed_and_deleted_over_the_bus() {
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::start("l40s-vgpu.toml");
    ctl(&bus, &["register", "0000:41:00.0", "--name", "l40s"]);
    ctl(&bus, &["sriov", "l40s", "2"]);
    let mut signals = Signals::watch(&bus, Some(PATH));
    let out = bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.CreateVgpu",
        &["{'profile': <'NVIDIA L40S-4Q'>, 'instance_id': <'vm-1'>}"],
    );
    assert!(out.status.success(), "{out:?}");
    signals.wait_for(|s| matches!(s, Signal::Other { member, .. } if member == "VgpuCreated"));
    let made = ctl(
        &bus,
        &[
            "vgpu",
            "create",
            "NVIDIA L40S-4Q",
            "--instance",
            "vm-2",
            "--parent",
            "l40s",
        ],
    );
    assert_eq!(made["pci_address"], "0000:41:00.5", "{made}");
    assert_eq!(made["state"], "ready", "{made}");
    assert!(
        made["device_nodes"][0]
            .as_str()
            .unwrap()
            .starts_with("/dev/vfio/"),
        "{made}"
    );
    let list = ctl(&bus, &["vgpu", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let first = list
        .iter()
        .find(|v| v["instance_id"] == "vm-1")
        .unwrap()
        .clone();
    assert_eq!(first["type_id"], "1152", "{first}");
    // Each vGPU is an object of its own.
    let object = format!("/org/hypeman/Vgpus/{}", first["id"].as_str().unwrap());
    let property = |name: &str| {
        let out = bus.busctl(&["get-property", NAME, &object, "org.hypeman.Vgpu1", name]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(property("Profile"), "s \"NVIDIA L40S-4Q\"");
    assert_eq!(property("PciAddress"), "s \"0000:41:00.4\"");
    assert_eq!(property("InstanceId"), "s \"vm-1\"");
    let r = ctl(&bus, &["resources"]);
    assert_eq!(r["used_slots"], 2, "{r}");

    for bad in [
        "{'profile': <'NVIDIA L40S-4Q'>, 'colour': <'red'>}",
        "{'instance_id': <'vm-3'>}",
        "{'profile': <'NVIDIA L40S-4Q'>, 'instance_id': <'bad id'>}",
    ] {
        let e = gdbus_refused(bus.gdbus_call(PATH, "org.hypeman.Devices1.CreateVgpu", &[bad]));
        assert!(
            e.contains("org.hypeman.Devices.Error.InvalidArgument"),
            "{bad}: {e}"
        );
    }
    let e = gdbus_refused(bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.CreateVgpu",
        &["{'profile': <'NVIDIA L40S-4Q'>}"],
    ));
    assert!(
        e.contains("InvalidArgument") && e.contains("vgpu types"),
        "no function left: {e}"
    );

    let node = first["device_nodes"][0].as_str().unwrap().to_string();
    let id = first["id"].as_str().unwrap().to_string();
    bus.sim("HoldNode", &["sus", &node, "4242", "qemu-system-x86"]);
    let e = gdbus_refused(bus.gdbus_call(PATH, "org.hypeman.Devices1.DeleteVgpu", &[&id]));
    assert!(
        e.contains("org.hypeman.Devices.Error.HostInUse") && e.contains("4242"),
        "{e}"
    );
    bus.sim("HoldNode", &["sus", &node, "0", ""]);
    let out = bus.hypemanctl(&["vgpu", "delete", &id]);
    assert!(out.status.success(), "{out:?}");
    signals.wait_for(|s| matches!(s, Signal::Other { member, .. } if member == "VgpuDeleted"));
    let gone = bus.busctl(&["introspect", NAME, &object]);
    assert!(
        !String::from_utf8_lossy(&gone.stdout).contains("org.hypeman.Vgpu1"),
        "the object went with the vGPU: {gone:?}"
    );
    let other = made["id"].as_str().unwrap();
    assert!(bus.hypemanctl(&["vgpu", "delete", other]).status.success());
    ctl(&bus, &["sriov", "l40s", "0"]);
    assert!(bus.hypemanctl(&["delete", "l40s"]).status.success());
}

/// The real backend's exact writes on a tree in the kernel's and NVIDIA's
/// layout: a vendor-VFIO create writes the type id (and reads it back), a
/// delete writes 0; an mdev create whose device never appears is undone
/// and answered as failed, no record kept.
#[test]
fn the_real_backend_writes_vgpus() {
    let tree = SysfsTree::new();
    let gpu = |address: &'static str, device: &'static [u8], group: &'static str| {
        tree.function(&Function {
            address,
            parent: "pci0000:40/0000:40:01.0",
            attrs: &[
                ("vendor", b"0x10de\n"),
                ("device", device),
                ("class", b"0x030200\n"),
                ("driver_override", b"(null)\n"),
                ("sriov_totalvfs", b"32\n"),
                ("sriov_numvfs", b"1\n"),
                ("sriov_offset", b"4\n"),
                ("sriov_stride", b"1\n"),
            ],
            driver: Some("nvidia"),
            group: Some(group),
        })
    };
    let vf = |address: &'static str, pf: &str, group: &'static str| {
        let dir = tree.function(&Function {
            address,
            parent: "pci0000:40/0000:40:01.0",
            attrs: &[
                ("vendor", b"0x10de\n"),
                ("device", b"0x26b9\n"),
                ("class", b"0x030200\n"),
                ("driver_override", b"(null)\n"),
            ],
            driver: Some("nvidia"),
            group: Some(group),
        });
        std::os::unix::fs::symlink(format!("../{pf}"), dir.join("physfn")).unwrap();
        dir
    };
    gpu("0000:41:00.0", b"0x26b9\n", "30");
    let l40s_vf = vf("0000:41:00.4", "0000:41:00.0", "31");
    std::fs::create_dir(l40s_vf.join("nvidia")).unwrap();
    std::fs::write(l40s_vf.join("nvidia/current_vgpu_type"), "0\n").unwrap();
    std::fs::write(
        l40s_vf.join("nvidia/creatable_vgpu_types"),
        "ID : vGPU Name\n1152 : NVIDIA L40S-4Q\n",
    )
    .unwrap();
    gpu("0000:82:00.0", b"0x20f1\n", "60");
    vf("0000:82:00.4", "0000:82:00.0", "61");
    let ty = tree
        .root()
        .join("class/mdev_bus/0000:82:00.4/mdev_supported_types/nvidia-473");
    std::fs::create_dir_all(ty.join("devices")).unwrap();
    std::fs::write(ty.join("name"), "GRID A100-10C\n").unwrap();
    std::fs::write(
        ty.join("description"),
        "framebuffer=10240M, max_instance=4\n",
    )
    .unwrap();
    std::fs::write(ty.join("available_instances"), "1\n").unwrap();
    std::fs::write(ty.join("create"), "").unwrap();

    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::on_tree(TestBus::start(), &tree);
    ctl(&bus, &["register", "0000:41:00.0", "--name", "l40s"]);
    ctl(&bus, &["register", "0000:82:00.0", "--name", "a100"]);
    let v = ctl(&bus, &["vgpu", "create", "NVIDIA L40S-4Q"]);
    assert_eq!(v["pci_address"], "0000:41:00.4", "{v}");
    assert_eq!(v["device_nodes"], json!(["/dev/vfio/31"]), "{v}");
    let current = l40s_vf.join("nvidia/current_vgpu_type");
    assert_eq!(std::fs::read_to_string(&current).unwrap(), "1152\n");
    let out = bus.hypemanctl(&["vgpu", "delete", v["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&current).unwrap(), "0\n");

    let out = bus.hypemanctl(&["vgpu", "create", "GRID A100-10C"]);
    assert!(!out.status.success(), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("did not appear") && e.contains("no mdev was left behind"),
        "{e}"
    );
    let uuid = std::fs::read_to_string(ty.join("create")).unwrap();
    assert_eq!(
        uuid.trim().len(),
        36,
        "the UUID was written to create: {uuid:?}"
    );
    assert_eq!(ctl(&bus, &["vgpu", "list"]), json!([]));
}

/// *(issue 30)* `GetAll` and `GetManagedObjects` show a device's blockers as
/// last read; reading `Blockers` alone reads the host now. A vGPU made
/// behind the daemon's back (no event) is in `Blockers` at once, and in
/// `GetAll` once read; after a change the daemon sees, `GetAll` reads again.
#[test]
fn getall_shows_the_blockers_last_read() {
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::start("l40s-vgpu.toml");
    let path = l40s_with_two_vfs(&bus);
    let codes = |blockers: &Value| -> Vec<String> {
        blockers
            .as_array()
            .unwrap_or_else(|| panic!("{blockers}"))
            .iter()
            .map(|b| b["code"]["data"].as_str().unwrap().to_string())
            .collect()
    };
    let get_all = || {
        let all = bus
            .call(
                &path,
                "org.freedesktop.DBus.Properties",
                "GetAll",
                &["s", "org.hypeman.Device1"],
            )
            .unwrap();
        codes(&all[0]["Blockers"]["data"])
    };
    let managed =
        || codes(&bus.managed_objects()[&path]["org.hypeman.Device1"]["Blockers"]["data"]);
    let alone = || codes(&blockers_read_alone(&bus, &path));
    let vgpus = "vgpus".to_string();
    assert!(!get_all().contains(&vgpus));

    bus.sim("SetVgpu", &["ss", "0000:41:00.4", "1152"]);
    assert!(!get_all().contains(&vgpus), "GetAll shows the last read");
    assert!(!managed().contains(&vgpus), "so does GetManagedObjects");
    assert!(alone().contains(&vgpus), "Blockers alone reads now");
    assert!(
        get_all().contains(&vgpus),
        "the last read is now the new one"
    );
    assert!(managed().contains(&vgpus));

    bus.sim("SetVgpu", &["ss", "0000:41:00.4", ""]);
    assert!(get_all().contains(&vgpus));
    // A change the daemon sees: the next GetAll reads again.
    ctl(&bus, &["tag", "l40s", "pool=a"]);
    assert!(!get_all().contains(&vgpus));
    assert!(!managed().contains(&vgpus));
}
