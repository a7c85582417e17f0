//! *(issue 29)* `--metrics-listen`: a scrape checked by promtool (Debian's
//! prometheus package) and read by prometheus_client's own parsers (PyPI),
//! after a known series of operations; PCIe errors set in the simulator
//! moving a device's health, with its signal; and a listener that silent
//! connections cannot take.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const GPU: &str = "0000:a2:00.0";
const NIC: &str = "0000:3b:00.0";

/// A hang guard on every read of a socket, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// `hypemand --simulate l4.toml --metrics-listen 127.0.0.1:0`, and the
/// address it says it bound.
fn start(bus: &TestBus, state: &std::path::Path) -> (Daemon, SocketAddr) {
    let f = fixture("l4.toml");
    start_on(bus, state, &["--simulate", f.to_str().unwrap()])
}

/// `hypemand HOST_ARGS --metrics-listen 127.0.0.1:0`, and the address.
fn start_on(bus: &TestBus, state: &std::path::Path, host_args: &[&str]) -> (Daemon, SocketAddr) {
    let args = [host_args, &["--metrics-listen", "127.0.0.1:0"]].concat();
    let d = Daemon::start(bus, state, &args);
    // Logged before the bus name is taken, so it is in the log by now.
    let log = d.log();
    let addr = log
        .split("metrics_listen=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics_listen= in the log:\n{log}"));
    (d, addr)
}

/// One `GET /metrics` with `accept`: the status line, the content type and
/// the body.
fn scrape(addr: SocketAddr, accept: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(HANG_GUARD)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8(got).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    (status, content_type, body.to_string())
}

const OPENMETRICS: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
const PROMETHEUS: &str = "text/plain;version=0.0.4";

/// What `cmd` wrote, given `text` on its stdin; it is waited for.
fn fed(mut cmd: Command, text: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} (promtool: apt-get install prometheus): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The samples prometheus_client's parser reads from `text`.
fn parse(text: &str, format: &str) -> Vec<Value> {
    let mut parser = Command::new(metrics_python());
    parser
        .arg(root().join("tests/data/parse_metrics.py"))
        .arg(format);
    let out = fed(parser, text);
    assert!(
        out.status.success(),
        "prometheus_client cannot parse the {format} scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!samples.is_empty(), "no samples parsed from:\n{text}");
    samples
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .and_then(|s| s["value"].as_f64())
}

/// `promtool check metrics` on `text`: its exit status and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut promtool = Command::new("promtool");
    promtool.args(["check", "metrics"]);
    let out = fed(promtool, text);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

fn error_name(bus: &TestBus, method: &str, args: &[&str]) -> String {
    let out = bus.gdbus_call(PATH, &format!("org.hypeman.Devices1.{method}"), args);
    assert!(!out.status.success(), "{method} {args:?} succeeded");
    gdbus_error_name(&out)
}

#[test]
fn a_scrape_counts_what_happened_and_parses_independently() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let (_d, addr) = start(&bus, state.path());

    // Before anything: every family is there, with nothing registered.
    let (status, content_type, empty) = scrape(addr, OPENMETRICS);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(empty.ends_with("# EOF\n"), "{empty}");
    let before = parse(&empty, "openmetrics");
    assert_eq!(
        value(&before, "hypeman_devices", &[("state", "registered")]),
        Some(0.0)
    );

    // A known series: a Register, a Bind of nothing, a Bind the kernel
    // refuses, a Bind, an Attach.
    bus.manager("Register", &["ss", GPU, "l4-gpu"]).unwrap();
    assert_eq!(
        error_name(&bus, "Bind", &["nosuch"]),
        "org.hypeman.Devices.Error.NotFound"
    );
    bus.inject("unbind", GPU, "EBUSY");
    assert_eq!(
        error_name(&bus, "Bind", &["l4-gpu"]),
        "org.hypeman.Devices.Error.BindFailed"
    );
    bus.clear_faults();
    bus.manager("Bind", &["s", "l4-gpu"]).unwrap();
    bus.manager("Attach", &["ss", "l4-gpu", "vm-1"]).unwrap();
    // And the NIC pulled and put back: a remove and an add from the kernel.
    let mut signals = Signals::watch(&bus, None);
    bus.sim("Unplug", &["s", NIC]);
    bus.sim("Plug", &["s", NIC]);
    signals.wait_host(true, NIC);

    let (_, _, text) = scrape(addr, OPENMETRICS);
    let s = parse(&text, "openmetrics");
    let ops = |operation: &str, result: &str| {
        value(
            &s,
            "hypeman_operations_total",
            &[("operation", operation), ("result", result)],
        )
    };
    assert_eq!(ops("register", "ok"), Some(1.0), "{text}");
    assert_eq!(ops("bind", "ok"), Some(1.0), "{text}");
    assert_eq!(ops("bind", "NotFound"), Some(1.0), "{text}");
    assert_eq!(ops("bind", "BindFailed"), Some(1.0), "{text}");
    assert_eq!(ops("attach", "ok"), Some(1.0), "{text}");
    assert_eq!(ops("unbind", "ok"), None, "nothing unbound: {text}");
    // Timed from authorization: the refused lookup never got there.
    assert_eq!(
        value(
            &s,
            "hypeman_operation_duration_seconds_count",
            &[("operation", "bind")]
        ),
        Some(2.0),
        "{text}"
    );
    for (state, n) in [
        ("registered", 1.0),
        ("present", 1.0),
        ("on_vfio", 1.0),
        ("attached", 1.0),
    ] {
        assert_eq!(
            value(&s, "hypeman_devices", &[("state", state)]),
            Some(n),
            "{state}: {text}"
        );
    }
    assert_eq!(
        value(
            &s,
            "hypeman_device_info",
            &[
                ("name", "l4-gpu"),
                ("pci_address", GPU),
                ("vendor_id", "10de"),
                ("device_id", "27b8"),
                ("type", "gpu"),
                ("driver", "vfio-pci"),
            ]
        ),
        Some(1.0),
        "{text}"
    );
    // No polkitd on this bus: root is let through, and each check counted
    // (the two Binds that reached it, and the Attach).
    assert_eq!(
        value(
            &s,
            "hypeman_polkit_checks_total",
            &[
                ("action", "org.hypeman.devices.bind"),
                ("result", "granted")
            ]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&s, "hypeman_polkit_check_duration_seconds_count", &[]),
        Some(4.0),
        "register, two binds, attach: {text}"
    );
    // The Register, the Bind and the Attach were each written.
    let count = value(&s, "hypeman_store_commit_duration_seconds_count", &[]);
    assert!(count.is_some_and(|n| n >= 3.0), "{text}");
    let journal = value(&s, "hypeman_store_journal_bytes", &[]);
    assert!(journal.is_some_and(|n| n > 0.0), "{text}");
    for action in ["remove", "add"] {
        assert_eq!(
            value(&s, "hypeman_hotplug_events_total", &[("action", action)]),
            Some(1.0),
            "{action}: {text}"
        );
    }
    assert_eq!(
        value(
            &s,
            "hypeman_device_pcie_errors_total",
            &[("pci_address", GPU), ("severity", "fatal")]
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&s, "hypeman_device_health", &[("pci_address", GPU)]),
        Some(0.0),
        "{text}"
    );

    // The Prometheus text format, for a client that asks for it: promtool
    // lints it, and the other parser reads the same values.
    let (status, content_type, plain) = scrape(addr, PROMETHEUS);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let (ok, said) = promtool(&plain);
    assert!(ok, "promtool check metrics: {said}\n{plain}");
    let p = parse(&plain, "prometheus");
    assert_eq!(
        value(
            &p,
            "hypeman_operations_total",
            &[("operation", "bind"), ("result", "BindFailed")]
        ),
        Some(1.0),
        "{plain}"
    );
    assert_eq!(
        value(&p, "hypeman_devices", &[("state", "on_vfio")]),
        Some(1.0)
    );
    the_dashboard_asks_for_what_is_served(&s);
}

/// `examples/grafana/hypeman-devices.json`: every query is PromQL that
/// promtool accepts (as recording rules, Grafana's variables given values),
/// and every series it names is in the scrape `served`.
fn the_dashboard_asks_for_what_is_served(served: &[Value]) {
    let text =
        std::fs::read_to_string(root().join("examples/grafana/hypeman-devices.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let names: std::collections::BTreeSet<&str> =
        served.iter().filter_map(|s| s["name"].as_str()).collect();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(at) = rest.find("hypeman_") {
            let series: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            assert!(
                names.contains(series.as_str()),
                "{series} (in {e}) is not served: {names:?}"
            );
            rest = &rest[at + series.len()..];
        }
    }
    let rules: String = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            format!(
                "      - record: dashboard:query{i}\n        expr: {}\n",
                serde_json::to_string(&e).unwrap()
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.yml");
    std::fs::write(
        &file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pcie_errors_move_health_through_degraded_to_failed_with_the_signal() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let (_d, addr) = start(&bus, state.path());
    // Errors before registration are not the device's since then.
    bus.sim("SetAerCounters", &["sttt", GPU, "40", "3", "0"]);
    bus.manager("Register", &["ss", GPU, "l4-gpu"]).unwrap();
    let got = bus.hypemanctl(&["--json", "get", "l4-gpu"]);
    let doc: Value = serde_json::from_slice(&got.stdout).unwrap();
    let path = hypeman_api::device_path(doc["id"].as_str().unwrap()).unwrap();
    let path = path.as_str();
    let health = || {
        let out = bus.busctl(&["get-property", NAME, path, "org.hypeman.Device1", "Health"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(health(), "s \"ok\"");
    bus.manager("Bind", &["s", "l4-gpu"]).unwrap();

    let mut signals = Signals::watch(&bus, Some(path));
    // 11 new errors since registration, past the threshold of 10: the
    // scrape reads them, shows them and signals the verdict.
    bus.sim("SetAerCounters", &["sttt", GPU, "45", "9", "0"]);
    let (_, _, text) = scrape(addr, OPENMETRICS);
    let s = parse(&text, "openmetrics");
    let errors = |s: &[Value], severity: &str| {
        value(
            s,
            "hypeman_device_pcie_errors_total",
            &[("pci_address", GPU), ("severity", severity)],
        )
    };
    assert_eq!(errors(&s, "correctable"), Some(45.0), "{text}");
    assert_eq!(errors(&s, "nonfatal"), Some(9.0), "{text}");
    assert_eq!(errors(&s, "fatal"), Some(0.0), "{text}");
    assert_eq!(
        value(&s, "hypeman_device_health", &[("pci_address", GPU)]),
        Some(1.0),
        "{text}"
    );
    signals.wait_set(Some(path), "Health", "degraded".to_string());
    assert_eq!(health(), "s \"degraded\"");

    // A fatal error and the kernel's recovery uevent: failed, signalled
    // with no scrape and no read.
    bus.sim("SetAerCounters", &["sttt", GPU, "45", "9", "1"]);
    bus.sim("RecoveryEvent", &["ssb", GPU, "FAILED_RECOVERY", "false"]);
    signals.wait_set(Some(path), "Health", "failed".to_string());
    let get = bus.hypemanctl(&["get", "l4-gpu"]);
    assert!(
        String::from_utf8_lossy(&get.stdout).contains("health: failed"),
        "{}",
        String::from_utf8_lossy(&get.stdout)
    );
    let (_, _, text) = scrape(addr, OPENMETRICS);
    let s = parse(&text, "openmetrics");
    assert_eq!(errors(&s, "fatal"), Some(1.0), "{text}");
    assert_eq!(
        value(&s, "hypeman_device_health", &[("pci_address", GPU)]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&s, "hypeman_hotplug_events_total", &[("action", "change")]),
        Some(1.0),
        "{text}"
    );

    // Counters reset (the kernel re-enumerated it) and a recovery: ok
    // again. Then gone while on vfio: failed, from the unplug alone.
    bus.sim("SetAerCounters", &["sttt", GPU, "0", "0", "0"]);
    bus.sim(
        "RecoveryEvent",
        &["ssb", GPU, "SUCCESSFUL_RECOVERY", "true"],
    );
    signals.wait_set(Some(path), "Health", "ok".to_string());
    bus.sim("Unplug", &["s", GPU]);
    signals.wait_set(Some(path), "Health", "failed".to_string());
    let (_, _, text) = scrape(addr, OPENMETRICS);
    let s = parse(&text, "openmetrics");
    assert_eq!(
        value(&s, "hypeman_devices", &[("state", "present")]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&s, "hypeman_device_health", &[("pci_address", GPU)]),
        Some(2.0),
        "{text}"
    );
    // Unplugged: no counters to show.
    assert_eq!(errors(&s, "fatal"), None, "{text}");
}

#[test]
fn sixty_four_silent_connections_leave_metrics_answering() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let (_d, addr) = start(&bus, state.path());
    // Twice the table: every one of them is accepted, and none sends a byte.
    let silent: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let (status, _, text) = scrape(addr, OPENMETRICS);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(text.ends_with("# EOF\n"));
    // The oldest silent ones were closed to make room: they read EOF.
    let mut first = &silent[0];
    first.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(first.read(&mut buf).unwrap(), 0);
    // A body over the REST limit is refused as there (413).
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let body = vec![b'x'; 20 * 1024];
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    drop(silent);
}

/// The kernel's own files (`aer_dev_correctable`, `aer_dev_nonfatal`,
/// `aer_dev_fatal`, in drivers/pci/pcie/aer.c's format) in a `--sysfs-root`
/// tree: their totals are the counters, read when Health is asked for; a
/// function without them has none.
#[test]
fn the_kernels_aer_files_are_the_counters() {
    let tree = SysfsTree::new();
    let gpu: &[(&str, &[u8])] = &[
        ("vendor", b"0x10de\n"),
        ("device", b"0x27b8\n"),
        ("class", b"0x030200\n"),
    ];
    let aer = |dev: &std::path::Path, cor: u64, nonfatal: u64, fatal: u64| {
        std::fs::write(
            dev.join("aer_dev_correctable"),
            format!("RxErr 0\nBadTLP {cor}\nBadDLLP 0\nRollover 0\nTimeout 0\nNonFatalErr 0\nCorrIntErr 0\nHeaderOF 0\nTOTAL_ERR_COR {cor}\n"),
        )
        .unwrap();
        std::fs::write(
            dev.join("aer_dev_nonfatal"),
            format!("Undefined 0\nDLP 0\nSDES 0\nTLP 0\nFCP 0\nCmpltTO {nonfatal}\nCmpltAbrt 0\nUnxCmplt 0\nRxOF 0\nMalfTLP 0\nECRC 0\nUnsupReq 0\nACSViol 0\nTOTAL_ERR_NONFATAL {nonfatal}\n"),
        )
        .unwrap();
        std::fs::write(
            dev.join("aer_dev_fatal"),
            format!("Undefined 0\nDLP {fatal}\nSDES 0\nTLP 0\nTOTAL_ERR_FATAL {fatal}\n"),
        )
        .unwrap();
    };
    let with = tree.function(&Function {
        address: "0000:a2:00.0",
        parent: "pci0000:a0",
        attrs: gpu,
        driver: None,
        group: Some("82"),
    });
    aer(&with, 2, 0, 0);
    tree.function(&Function {
        address: "0000:a3:00.0",
        parent: "pci0000:a0",
        attrs: gpu,
        driver: None,
        group: Some("83"),
    });
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let root = tree.root().to_str().unwrap();
    let (_d, addr) = start_on(&bus, state.path(), &["--sysfs-root", root]);
    bus.manager("Register", &["ss", "0000:a2:00.0", "with"])
        .unwrap();
    bus.manager("Register", &["ss", "0000:a3:00.0", "without"])
        .unwrap();
    let path_of = |name: &str| {
        let got = bus.hypemanctl(&["--json", "get", name]);
        let doc: Value = serde_json::from_slice(&got.stdout).unwrap();
        hypeman_api::device_path(doc["id"].as_str().unwrap()).unwrap()
    };
    let (with_path, without_path) = (path_of("with"), path_of("without"));
    let health = |path: &str| {
        let out = bus.busctl(&["get-property", NAME, path, "org.hypeman.Device1", "Health"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(health(with_path.as_str()), "s \"ok\"");
    assert_eq!(health(without_path.as_str()), "s \"ok\"");
    let (_, _, text) = scrape(addr, OPENMETRICS);
    let s = parse(&text, "openmetrics");
    let errors = |s: &[Value], address: &str, severity: &str| {
        value(
            s,
            "hypeman_device_pcie_errors_total",
            &[("pci_address", address), ("severity", severity)],
        )
    };
    assert_eq!(
        errors(&s, "0000:a2:00.0", "correctable"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(errors(&s, "0000:a3:00.0", "correctable"), None, "{text}");

    // The kernel counts more: 11 new since registration, then a fatal one.
    let mut signals = Signals::watch(&bus, Some(with_path.as_str()));
    aer(&with, 8, 5, 0);
    assert_eq!(health(with_path.as_str()), "s \"degraded\"");
    signals.wait_set(Some(with_path.as_str()), "Health", "degraded".to_string());
    aer(&with, 8, 5, 1);
    let get = bus.hypemanctl(&["--json", "get", "with"]);
    let doc: Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(doc["health"], "failed", "{doc}");
    signals.wait_set(Some(with_path.as_str()), "Health", "failed".to_string());
    // A file the kernel did not write (no total) is not believed.
    std::fs::write(with.join("aer_dev_fatal"), "DLP 1\n").unwrap();
    let (_, _, text) = scrape(addr, OPENMETRICS);
    let s = parse(&text, "openmetrics");
    assert_eq!(errors(&s, "0000:a2:00.0", "fatal"), None, "{text}");
}
