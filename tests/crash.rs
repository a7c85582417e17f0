//! Crash consistency: the daemon is killed with SIGKILL at random moments while
//! a client drives mixed Register/Delete/Attach/Detach calls (with a small
//! journal limit, so compactions run among them). After every restart the
//! store parses, every acknowledged call is there, at most the one call in
//! flight is uncertain, and no device is left without a driver. Then at each
//! exact moment of a write (stopped there with `HYPEMAN_PAUSE_AT`): between
//! the journal's sync and the reply, and inside a compaction; *(issue 26)*
//! around a vGPU's writes; *(issue 27)* around a lease's release.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use common::*;
use hypeman_api::BusChoice;
use hypemanctl::{Client, ClientError};

const DEVICES: usize = 16;

/// A small xorshift generator: the run is random but printed, so a failure can
/// be replayed with HYPEMAN_CRASH_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Dev {
    name: String,
    attached: Option<String>,
}

#[derive(Debug, Clone)]
enum Op {
    Register(String, String),
    Delete(String),
    Attach(String, String),
    Detach(String),
}

impl Op {
    fn address(&self, model: &HashMap<String, Dev>) -> Option<String> {
        match self {
            Op::Register(a, _) => Some(a.clone()),
            Op::Delete(n) | Op::Attach(n, _) | Op::Detach(n) => model
                .iter()
                .find(|(_, d)| &d.name == n)
                .map(|(a, _)| a.clone()),
        }
    }
}

/// The registry as the daemon reports it: address -> (name, attachment).
async fn observed(client: &Client) -> HashMap<String, Dev> {
    client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            (
                d.pci_address,
                Dev {
                    name: d.name,
                    attached: d.attached_to,
                },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let seed = std::env::var("HYPEMAN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("HYPEMAN_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let bus = TestBus::start();
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.toml");
    std::fs::write(&host, hypeman_bench::generated_host(DEVICES)).unwrap();
    let kernel = dir.path().join("kernel.json");
    let state = dir.path().join("state");
    let args = [
        "--simulate",
        host.to_str().unwrap(),
        "--simulate-state",
        kernel.to_str().unwrap(),
        "--journal-limit",
        "4096",
    ];
    let addresses: Vec<String> = (0..DEVICES).map(hypeman_bench::pci_address).collect();
    // Bridges (every 16th from 15) are left alone: vfio-pci does not take them on real hosts.
    let usable: Vec<String> = addresses
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 16 != 15)
        .map(|(_, a)| a.clone())
        .collect();

    let mut model: HashMap<String, Dev> = HashMap::new();
    let (mut ops, mut acked, mut kills, mut uncertain_seen) = (0, 0, 0, 0);
    while ops < 500 || kills < 20 {
        let d = Daemon::start(&bus, &state, &args);
        let client = Client::connect(&BusChoice::Address(bus.address.clone()))
            .await
            .unwrap();

        // Check the restart against everything acknowledged so far.
        let seen = observed(&client).await;
        assert_eq!(
            seen, model,
            "after kill {kills}: the registry differs from what was acknowledged"
        );
        // The files say the same (the snapshot and the journal's whole writes).
        assert_eq!(stored_records(&state).len(), model.len());
        for a in client.available().await.unwrap() {
            assert!(
                a.current_driver.is_some(),
                "after kill {kills}: {} is left without a driver",
                a.pci_address
            );
            if let Some(m) = model.get(&a.pci_address) {
                if m.attached.is_some() {
                    assert_eq!(
                        a.current_driver.as_deref(),
                        Some("vfio-pci"),
                        "{} is attached but not on vfio-pci",
                        a.pci_address
                    );
                }
            }
        }

        // Kill at a random moment while calls are going on.
        let pid = d.proc.pid();
        let delay = Duration::from_millis(20 + rng.below(150));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        // Calls go on until one fails because the daemon is gone: that one was
        // in flight at the kill.
        let in_flight: (Op, Option<String>) = loop {
            let addr = usable[rng.below(usable.len() as u64) as usize].clone();
            let existing = model.get(&addr).cloned();
            let op = match (&existing, rng.below(4)) {
                (None, _) => Op::Register(addr.clone(), format!("d{}", rng.below(1_000_000))),
                (Some(dv), 0) => Op::Delete(dv.name.clone()),
                (Some(dv), 1 | 2) => Op::Attach(dv.name.clone(), format!("vm-{}", rng.below(3))),
                (Some(dv), _) => Op::Detach(dv.name.clone()),
            };
            let target = op.address(&model);
            let result = match &op {
                Op::Register(a, n) => client.register(a, n).await.map(|_| ()),
                Op::Delete(n) => client.delete(n).await,
                Op::Attach(n, vm) => client.attach(n, vm).await.map(|_| ()),
                Op::Detach(n) => client.detach(n).await.map(|_| ()),
            };
            ops += 1;
            match result {
                Ok(()) => {
                    acked += 1;
                    let a = target.clone().unwrap();
                    match &op {
                        Op::Register(_, n) => {
                            model.insert(
                                a,
                                Dev {
                                    name: n.clone(),
                                    attached: None,
                                },
                            );
                        }
                        Op::Delete(_) => {
                            model.remove(&a);
                        }
                        Op::Attach(_, vm) => model.get_mut(&a).unwrap().attached = Some(vm.clone()),
                        Op::Detach(_) => model.get_mut(&a).unwrap().attached = None,
                    }
                }
                // Refusals are answers too: nothing changed.
                Err(
                    ClientError::InUse(_)
                    | ClientError::NameTaken(_)
                    | ClientError::AlreadyRegistered(_),
                ) => acked += 1,
                Err(_) => break (op, target),
            }
        };
        killer.join().unwrap();
        d.kill9(&bus);
        kills += 1;

        // The call in flight may or may not have happened: take the daemon's
        // word for that one device, and only that one.
        if let (op, Some(addr)) = in_flight {
            let d = Daemon::start(&bus, &state, &args);
            let client = Client::connect(&BusChoice::Address(bus.address.clone()))
                .await
                .unwrap();
            let seen = observed(&client).await;
            for (a, want) in &model {
                if *a != addr {
                    assert_eq!(
                        seen.get(a),
                        Some(want),
                        "acknowledged state of {a} lost (in flight: {op:?})"
                    );
                }
            }
            for a in seen.keys() {
                assert!(
                    model.contains_key(a) || *a == addr,
                    "{a} appeared from nowhere"
                );
            }
            let before = model.get(&addr).cloned();
            match seen.get(&addr) {
                Some(dv) => {
                    model.insert(addr.clone(), dv.clone());
                }
                None => {
                    model.remove(&addr);
                }
            }
            if model.get(&addr) != before.as_ref() {
                uncertain_seen += 1;
            }
            d.kill9(&bus);
        }
    }
    eprintln!("{ops} calls, {acked} answered, {kills} SIGKILLs, {uncertain_seen} in-flight calls that took effect");
}

/// The state letter of `/proc/PID/stat` ('T' once the process stopped itself).
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .unwrap_or('?')
}

/// Names and tags as the daemon lists them.
fn listed(bus: &TestBus) -> Vec<(String, serde_json::Value)> {
    let out = bus.hypemanctl(&["--json", "list"]);
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut v: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["tags"].clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// SIGKILL at each moment of a write, reached exactly: the daemon stops itself
/// there. A Register stopped between the journal's sync and its reply was never
/// answered, but is on disk and there after the restart; a compaction killed
/// before or after its rename loses nothing and leaves no temp file behind.
#[test]
fn sigkill_at_each_moment_of_a_write_loses_nothing() {
    let bus = TestBus::start();
    for point in ["journal-synced", "snapshot-written", "snapshot-renamed"] {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host.toml");
        std::fs::write(&host, hypeman_bench::generated_host(8)).unwrap();
        let state = dir.path().join("state");
        // Every change is compacted at once.
        let args = ["--simulate", host.to_str().unwrap(), "--journal-limit", "1"];
        let d = Daemon::start(&bus, &state, &args);
        for (i, name) in ["a0", "a1"].iter().enumerate() {
            bus.manager("Register", &["ss", &hypeman_bench::pci_address(i), name])
                .unwrap();
        }
        bus.manager("SetTags", &["sa{ss}as", "a0", "1", "k", "v", "0"])
            .unwrap();
        let before = listed(&bus);
        d.kill9(&bus);

        let mut cmd = Daemon::command(&bus, &state, &args);
        cmd.env("HYPEMAN_PAUSE_AT", point);
        let d = Daemon::from_command(&bus, cmd);
        let mut call = Proc {
            child: std::process::Command::new("gdbus")
                .args(["call", "--address", &bus.address, "--dest", NAME])
                .args(["--object-path", PATH, "--method"])
                .arg(format!("{IFACE}.Register"))
                .args([&hypeman_bench::pci_address(2), "a2"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        };
        let pid = d.proc.pid();
        wait_until(|| process_state(pid) == 'T');
        let snapshot = std::fs::read_to_string(state.join("devices.json")).unwrap_or_default();
        let journal = std::fs::read_to_string(state.join("devices.journal")).unwrap_or_default();
        let temp = state.join(".devices.json.tmp");
        match point {
            "journal-synced" => {
                assert!(journal.contains("\"a2\""), "{point}: {journal}");
                assert!(!snapshot.contains("\"a2\""), "{point}: {snapshot}");
            }
            "snapshot-written" => {
                assert!(temp.exists(), "{point}: no temp snapshot");
                assert!(!snapshot.contains("\"a2\""), "{point}: {snapshot}");
            }
            _ => {
                assert!(snapshot.contains("\"a2\""), "{point}: {snapshot}");
                assert!(journal.contains("\"a2\""), "{point}: the journal was cut");
            }
        }
        d.kill9(&bus);
        let answered = call.child.wait().unwrap().success();
        if point == "journal-synced" {
            assert!(!answered, "{point}: the Register was answered");
        }

        let _d = Daemon::start(&bus, &state, &args);
        let mut want = before.clone();
        want.push(("a2".into(), serde_json::Value::Null));
        assert_eq!(listed(&bus), want, "{point}");
        assert!(!temp.exists(), "{point}: the temp snapshot is left");
    }
}

/// A clean stop leaves one complete `devices.json` and no journal; a torn
/// last write of the journal (never acknowledged) is dropped and logged.
#[test]
fn a_clean_stop_compacts_and_a_torn_write_is_dropped() {
    let Sim {
        bus,
        state,
        daemon: mut d,
    } = Sim::on(TestBus::start(), "l4.toml");
    bus.manager("Register", &["ss", "0000:a2:00.0", "gpu"])
        .unwrap();
    bus.manager("Register", &["ss", "0000:3b:00.0", "nic"])
        .unwrap();
    assert!(journal_len(state.path()) > 0);
    assert!(d.proc.signal_and_wait("TERM").success());
    assert!(!state.path().join("devices.journal").exists());
    let snapshot: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("devices.json")).unwrap())
            .unwrap();
    assert_eq!(snapshot["seq"], 2);
    assert_eq!(snapshot["devices"].as_array().unwrap().len(), 2);

    // A write cut short: one whole line, then half of the next one.
    let gpu = snapshot["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gpu")
        .unwrap()
        .clone();
    let torn = format!(
        "{{\"seq\":3,\"remove\":\"{}\"}}\n{{\"seq\":4,\"end\":tr",
        gpu["id"].as_str().unwrap()
    );
    std::fs::write(state.path().join("devices.journal"), &torn).unwrap();
    let d = Daemon::simulate(&bus, state.path(), "l4.toml");
    let names: Vec<String> = listed(&bus).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["gpu", "nic"]);
    wait_until(|| d.log().contains("never finished"));
    assert_eq!(journal_len(state.path()), 0, "the torn write is cut");
}

/// A simulated host whose kernel state outlives each daemon
/// (`--simulate-state`), in a directory of its own with the state dir.
struct PersistentHost {
    _dir: tempfile::TempDir,
    state: std::path::PathBuf,
    fixture: std::path::PathBuf,
    sim: std::path::PathBuf,
}

impl PersistentHost {
    fn new(fixture_name: &str) -> PersistentHost {
        let dir = tempfile::tempdir().unwrap();
        PersistentHost {
            state: dir.path().join("state"),
            fixture: fixture(fixture_name),
            sim: dir.path().join("sim.json"),
            _dir: dir,
        }
    }

    /// The daemon's arguments for it.
    fn args(&self) -> [&str; 4] {
        [
            "--simulate",
            self.fixture.to_str().unwrap(),
            "--simulate-state",
            self.sim.to_str().unwrap(),
        ]
    }
}

/// `hypemanctl ARGS`, which must succeed.
fn ctl_ok(bus: &TestBus, args: &[&str]) {
    let out = bus.hypemanctl(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// *(issue 26)* SIGKILL between a vGPU's claim and its write, and after the
/// write before it is marked ready: at the next start the claim is resolved
/// before anyone is answered, by what the host shows: nothing written, the
/// claim goes; written, it is kept, ready. Never left unknown.
#[test]
fn sigkill_around_a_vgpu_write_is_resolved_at_start() {
    let bus = TestBus::start();
    for (point, kept) in [("vgpu-claimed", false), ("vgpu-written", true)] {
        let host = PersistentHost::new("l40s-vgpu.toml");
        let (state, args) = (&host.state, host.args());
        let d = Daemon::start(&bus, state, &args);
        let ok = |a: &[&str]| ctl_ok(&bus, a);
        ok(&["register", "0000:41:00.0", "--name", "l40s"]);
        ok(&["sriov", "l40s", "2"]);
        d.kill9(&bus);

        let mut cmd = Daemon::command(&bus, state, &args);
        cmd.env("HYPEMAN_PAUSE_AT", point);
        let d = Daemon::from_command(&bus, cmd);
        let mut call = Proc {
            child: std::process::Command::new("gdbus")
                .args(["call", "--address", &bus.address, "--dest", NAME])
                .args(["--object-path", PATH, "--method"])
                .arg(format!("{IFACE}.CreateVgpu"))
                .arg("{'profile': <'NVIDIA L40S-4Q'>}")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        };
        let pid = d.proc.pid();
        wait_until(|| process_state(pid) == 'T');
        let journal = std::fs::read_to_string(state.join("devices.journal")).unwrap_or_default();
        assert!(
            journal.contains("\"add_vgpu\"") && journal.contains("\"ready\":false"),
            "{point}: the claim is in the journal: {journal}"
        );
        d.kill9(&bus);
        assert!(!call.child.wait().unwrap().success(), "{point}: answered");

        let _d = Daemon::start(&bus, state, &args);
        let out = bus.hypemanctl(&["--json", "vgpu", "list"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let resources = bus.hypemanctl(&["--json", "resources"]);
        let r: serde_json::Value = serde_json::from_slice(&resources.stdout).unwrap();
        if kept {
            assert_eq!(list[0]["state"], "ready", "{point}: {list}");
            assert_eq!(list[0]["pci_address"], "0000:41:00.4", "{point}: {list}");
            assert_eq!(r["used_slots"], 1, "{point}: {r}");
        } else {
            assert_eq!(list, serde_json::json!([]), "{point}");
            assert_eq!(r["used_slots"], 0, "{point}: nothing was written: {r}");
        }
    }
}

/// The device's record as `hypemanctl --json get` shows it.
fn got(bus: &TestBus, name: &str) -> serde_json::Value {
    let out = bus.hypemanctl(&["--json", "get", name]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The last line of the journal, parsed (`Null` when there is none).
fn last_journal_line(state: &std::path::Path) -> serde_json::Value {
    let journal = std::fs::read_to_string(state.join("devices.journal")).unwrap_or_default();
    journal.lines().last().map_or(serde_json::Value::Null, |l| {
        serde_json::from_str(l).unwrap()
    })
}

/// *(issue 27)* A daemon killed while a lease's holder dies releases the
/// device at its next start, wherever the kill lands: while the daemon was
/// down as the holder died; after the holder ended and before its release
/// was written (`holder-ended`); after the release was synced and before it
/// was signalled (`journal-synced`). The device stays on vfio-pci (detach).
#[test]
fn sigkill_around_a_lease_release_releases_at_start() {
    let bus = TestBus::start();
    for point in [None, Some("holder-ended"), Some("journal-synced")] {
        let host = PersistentHost::new("l4.toml");
        let (state, args) = (&host.state, host.args());
        let d = Daemon::start(&bus, state, &args);
        let ok = |a: &[&str]| ctl_ok(&bus, a);
        ok(&["register", "0000:a2:00.0", "--name", "l4"]);
        ok(&["bind", "l4"]);
        let mut vmm = Proc {
            child: std::process::Command::new("sleep")
                .arg("infinity")
                .spawn()
                .unwrap(),
        };
        let pid = vmm.pid().to_string();
        ok(&["attach", "--holder-pid", &pid, "l4", "vm-1"]);
        assert_eq!(got(&bus, "l4")["lease"]["pid"], vmm.pid(), "{point:?}");
        d.kill9(&bus);

        let log = match point {
            None => {
                vmm.signal_and_wait("KILL");
                None
            }
            Some(p) => {
                // The next daemon finds the holder alive and watches it; it
                // stops itself at `p` once the holder is killed.
                let mut cmd = Daemon::command(&bus, state, &args);
                cmd.env("HYPEMAN_PAUSE_AT", p);
                let d = Daemon::from_command(&bus, cmd);
                assert_eq!(got(&bus, "l4")["attached_to"], "vm-1", "{p}: kept");
                vmm.signal_and_wait("KILL");
                let stopped = d.proc.pid();
                wait_until(|| process_state(stopped) == 'T');
                let last = last_journal_line(state);
                let released = last["replace"].is_object()
                    && last["replace"].get("attached_to").is_none()
                    && last["replace"].get("lease").is_none();
                assert_eq!(released, p == "journal-synced", "{p}: {last}");
                let log = d.log();
                d.kill9(&bus);
                Some(log)
            }
        };

        let d = Daemon::start(&bus, state, &args);
        let r = got(&bus, "l4");
        assert!(r["attached_to"].is_null(), "{point:?}: {r}");
        assert!(r.get("lease").is_none(), "{point:?}: {r}");
        assert_eq!(r["bound_to_vfio"], true, "{point:?}: {r}");
        if point != Some("journal-synced") {
            assert!(
                d.log().contains("has exited"),
                "{point:?}: released at start: {}",
                d.log()
            );
        }
        drop((d, log));
    }
}
