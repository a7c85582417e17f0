//! Smoke test of `hypeman-bench`: a small, quick run produces every figure and
//! no errors. No timing is asserted here: the targets belong to the benchmark.

use crate::common;

use common::bin;
use std::process::Command;

#[test]
fn bench_smoke_run_reports_every_figure() {
    let out = Command::new(bin("hypeman-bench"))
        .args(["--devices", "64", "--quick", "--hypemand", &bin("hypemand")])
        .output()
        .expect("run hypeman-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "ping_p50_us",
        "ping_p99_us",
        "get_p50_us",
        "get_p99_us",
        "get_over_ping",
        "list_ms",
        "list_floor_ms",
        "list_over_floor",
        "get_over_floor",
        "getall_over_floor",
        "managed_objects_ms",
        "managed_objects_floor_ms",
        "managed_objects_over_floor",
        "available_ms",
        "register_per_s",
        "register_16_per_s",
        "startup_ready_ms",
        "rss_idle_kib",
        "bind_unbind_per_s",
        "hotplug_to_signal_p99_ms",
        "lease_release_p50_ms",
        "lease_release_p99_ms",
        "metrics_scrape_ms",
        "metrics_scrape_over_list",
        "concurrent_get_per_s",
        "errors",
    ] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"));
        assert!(x.is_finite() && x >= 0.0, "{key} = {x}");
    }
    assert_eq!(v["errors"], 0);
    assert_eq!(v["devices"], 64);
    let table = String::from_utf8_lossy(&out.stderr);
    assert!(table.contains("get_over_ping"), "{table}");
}
