//! *(issue 14)* Every seed-shaped document `hypemanctl` prints passes the
//! official SDK's models: the `hypeman` package from PyPI, installed into a
//! virtualenv this test creates, on every shipped fixture (`no-iommu.toml`
//! included, where nothing may be registered and nothing is available).
//!
//! *(issue 26)* `hypemanctl resources` (Hypeman's `GPUResourceStatus`) too,
//! before and after a GPU gets virtual functions.
//!
//! The SDK requires an integer `iommu_group` on `Device` and
//! `AvailableDevice`; before issue 14 one record without a group made a whole
//! `List` unreadable to SDK clients. The test also shows the validator
//! refusing such a document, so it cannot pass vacuously.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};

struct Docs(std::fs::File, usize);

impl Docs {
    fn add(&mut self, model: &str, what: String, doc: Value) {
        let line = json!({"model": model, "what": what, "doc": doc});
        writeln!(self.0, "{line}").unwrap();
        self.1 += 1;
    }
}

/// `hypemanctl --json ARGS`: the document, or `None` when the command failed.
fn ctl_json(bus: &TestBus, args: &[&str]) -> Option<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = bus.hypemanctl(&all);
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("hypemanctl printed JSON"))
}

/// Everything seed-shaped hypemanctl prints on one fixture.
fn collect(fixture_path: &Path, docs: &mut Docs) {
    let name = fixture_path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::start(
        &bus,
        state.path(),
        &["--simulate", fixture_path.to_str().unwrap()],
    );
    let available = ctl_json(&bus, &["available"]).expect("available");
    docs.add(
        "AvailableList",
        format!("{name}: available"),
        available.clone(),
    );
    // Register every function that may be passed through; the others are
    // refused (hard blockers) or registered without being passable (soft).
    let every = ctl_json(&bus, &["available", "--all"]).expect("available --all");
    let mut ids = Vec::new();
    for f in every.as_array().unwrap() {
        let addr = f["pci_address"].as_str().unwrap();
        if let Some(doc) = ctl_json(&bus, &["register", addr]) {
            ids.push(doc["id"].as_str().unwrap().to_string());
            docs.add("Device", format!("{name}: register {addr}"), doc);
        } else {
            let hard = f["blockers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["code"] == "bridge" || b["code"] == "no-iommu");
            assert!(
                hard,
                "{name}: register {addr} refused without a hard blocker: {f}"
            );
        }
    }
    docs.add(
        "DeviceList",
        format!("{name}: list"),
        ctl_json(&bus, &["list"]).expect("list"),
    );
    // *(issue 26)* The GPU capacity, and again once every registered GPU
    // that can have virtual functions has some (vGPU mode where it offers
    // types).
    docs.add(
        "GPUResourceStatus",
        format!("{name}: resources"),
        ctl_json(&bus, &["resources"]).expect("resources"),
    );
    let registered = ctl_json(&bus, &["list"]).expect("list");
    let sriov_gpus: Vec<&str> = registered
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["type"] == "gpu")
        .filter_map(|d| d["id"].as_str())
        .filter(|id| {
            let get = bus.manager("Get", &["s", id]).unwrap();
            get[0].get("sriov_total_vfs").is_some()
        })
        .collect();
    for id in &sriov_gpus {
        ctl_json(&bus, &["sriov", id, "2"]).expect("sriov");
        docs.add(
            "GPUResourceStatus",
            format!("{name}: resources with the virtual functions of {id}"),
            ctl_json(&bus, &["resources"]).expect("resources"),
        );
        ctl_json(&bus, &["sriov", id, "0"]).expect("sriov 0");
    }
    let mut moved = 0;
    for id in &ids {
        docs.add(
            "Device",
            format!("{name}: get {id}"),
            ctl_json(&bus, &["get", id]).expect("get"),
        );
        // Moves are refused for devices the host uses or whose group is not
        // ready; every one that succeeds prints a document.
        for args in [
            &["bind", id][..],
            &["attach", id, "vm-sdk"],
            &["detach", id],
            &["unbind", id],
        ] {
            if let Some(doc) = ctl_json(&bus, args) {
                moved += 1;
                docs.add("Device", format!("{name}: {}", args.join(" ")), doc);
            }
        }
    }
    let passable = available.as_array().unwrap().len();
    assert!(
        passable == 0 || moved > 0,
        "{name}: nothing could be moved, so no move printed a document"
    );
    docs.add(
        "DeviceList",
        format!("{name}: list after the moves"),
        ctl_json(&bus, &["list"]).expect("list"),
    );
}

#[test]
fn every_seed_shaped_document_passes_the_official_sdk() {
    let python = sdk_python();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("docs.jsonl");
    let mut docs = Docs(std::fs::File::create(&file).unwrap(), 0);
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(root().join("examples/hosts"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    fixtures.sort();
    assert!(fixtures.iter().any(|f| f.ends_with("no-iommu.toml")));
    for f in &fixtures {
        collect(f, &mut docs);
    }
    let count = docs.1;
    drop(docs);
    let out = Command::new(&python)
        .arg(root().join("tests/data/validate_sdk.py"))
        .arg(&file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(&format!("checked {count} documents, 0 invalid")),
        "{report}"
    );

    // The validator does refuse what main used to print on a host without an
    // IOMMU: a record with no iommu_group.
    let bad = work.path().join("bad.jsonl");
    let doc = json!({"id": "tz4a98xxat96iws9zmbrgj3a", "bound_to_vfio": false,
        "created_at": "2025-01-15T10:00:00Z", "device_id": "27b8",
        "pci_address": "0000:a2:00.0", "type": "gpu", "vendor_id": "10de",
        "attached_to": null, "name": "l4-gpu"});
    std::fs::write(
        &bad,
        format!(
            "{}\n",
            json!({"model": "DeviceList", "what": "no group", "doc": [doc]})
        ),
    )
    .unwrap();
    let out = Command::new(&python)
        .arg(root().join("tests/data/validate_sdk.py"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("iommu_group"));
}
