//! End to end with real uevents: the real `hypemand` on its real sysfs backend,
//! run under umockdev (`umockdev-wrapper`), which serves it a testbed as /sys
//! and delivers uevents to its monitor. The scenario and its timings live in
//! `tests/umockdev/hotplug.py` (umockdev's API is GObject; Python drives it);
//! this test gives it a private bus and checks its verdict.

use crate::common;

use std::process::{Command, Stdio};

use common::*;

#[test]
fn uevents_reach_clients() {
    // Alone: the script gives each signal a fixed time to arrive.
    let bus = TestBus::start_alone();
    let state = tempfile::tempdir().unwrap();
    let script = root().join("tests/umockdev/hotplug.py");
    let child = Command::new("umockdev-wrapper")
        .args(["/usr/bin/python3", script.to_str().unwrap(), &bus.address])
        .arg(bin("hypemand"))
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("umockdev-wrapper must be installed (apt-get install umockdev gir1.2-umockdev-1.0 python3-gi)");
    let mut proc = Proc { child };
    // The script starts hypemand itself (it must inherit umockdev's preload);
    // should the script die first, the daemon is stopped here, by its pid.
    struct DaemonPid(std::path::PathBuf);
    impl Drop for DaemonPid {
        fn drop(&mut self) {
            if let Ok(pid) = std::fs::read_to_string(&self.0) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
    let _daemon = DaemonPid(state.path().join("hypemand.pid"));
    let child = std::mem::replace(&mut proc.child, Command::new("true").spawn().unwrap());
    let out = child.wait_with_output().unwrap();
    let _ = proc.child.wait();
    let log = std::fs::read_to_string(state.path().join("hypemand.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n--- hypemand log ---\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("uevent to signal latencies (ms): {report}");
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    for key in [
        "remove_to_present_false_ms",
        "add_to_present_true_ms",
        "bind_to_driver_changed_ms",
        "new_device_add_to_signal_ms",
        "aer_event_to_health_ms",
    ] {
        assert!(v[key].is_number(), "{key} missing from {report}");
    }
    assert!(
        log.contains("group=\"kernel\"") || log.contains("group=\"udev\""),
        "{log}"
    );
}
