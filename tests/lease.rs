//! *(issue 27)* Leases: an attachment released when its holder ends. The
//! real `hypemand` on a private bus; holders are processes these tests start
//! (and stop by pid); every release is waited for as the `PropertiesChanged`
//! of `AttachedTo`, never by time.

use crate::common;

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use hypeman_api::{BusChoice, Error, Options};
use hypemanctl::{Client, ClientError};

const GPU: &str = "0000:a2:00.0";
const NAME_: &str = "l4-gpu";

/// A holder: a process that runs until it is killed (or its stdin closes).
fn holder(cmd: &mut Command) -> Proc {
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start a holder");
    Proc { child }
}

/// `sh -c read`: exits 0 once its stdin is closed.
fn reader() -> Proc {
    holder(Command::new("sh").args(["-c", "read x; exit 0"]))
}

fn sleeper() -> Proc {
    holder(Command::new("sleep").arg("infinity"))
}

/// The L4 registered and on vfio-pci; its object path.
fn registered(bus: &TestBus) -> String {
    let data = bus.manager("Register", &["ss", GPU, NAME_]).unwrap();
    bus.manager("Bind", &["s", NAME_]).unwrap();
    data[0].as_str().unwrap().to_string()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `hypemanctl attach --holder-pid PID [extra] l4-gpu INSTANCE`.
fn attach(bus: &TestBus, pid: u32, instance: &str, extra: &[&str]) -> std::process::Output {
    let pid = pid.to_string();
    let mut args = vec!["attach", "--holder-pid", &pid];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[NAME_, instance]);
    bus.hypemanctl(&args)
}

/// `hypemanctl --json get l4-gpu`.
fn get(bus: &TestBus) -> serde_json::Value {
    serde_json::from_str(&ok(&bus.hypemanctl(&["--json", "get", NAME_]))).unwrap()
}

/// The position of the signal setting `property` to `value`.
fn at<V>(signals: &Signals, path: &str, property: &str, value: V) -> Option<usize>
where
    V: TryFrom<zbus::OwnedVariant> + PartialEq + Clone,
{
    signals
        .seen
        .iter()
        .position(|s| s.sets(Some(path), property, value.clone()))
}

/// Waits for the release of the lease on `pid`: `HolderPid` back to -1
/// announced before `AttachedTo` is cleared, and the record says so.
fn wait_released(bus: &TestBus, signals: &mut Signals, path: &str) {
    let cleared = signals.wait_set(Some(path), "AttachedTo", String::new());
    let holder = at(signals, path, "HolderPid", -1i64).expect("HolderPid back to -1");
    assert!(holder < cleared, "{:?}", signals.seen);
    let d = get(bus);
    assert!(d["attached_to"].is_null(), "{d}");
    assert!(d.get("lease").is_none(), "{d}");
}

/// SIGKILL and a normal exit each release the device, which stays on
/// vfio-pci (`detach`, the default); the journal and the log say why.
#[test]
fn a_holder_killed_or_exiting_releases_the_device() {
    let sim = Sim::on(TestBus::start(), "l4.toml");
    let bus = &sim.bus;
    let path = registered(bus);
    let mut signals = Signals::watch(bus, Some(&path));

    let mut vmm = sleeper();
    ok(&attach(bus, vmm.pid(), "vm-1", &[]));
    signals.wait_set(Some(&path), "AttachedTo", "vm-1".to_string());
    let pid = i64::from(vmm.pid());
    let lease_seen = at(&signals, &path, "HolderPid", pid).expect("HolderPid signalled");
    assert!(lease_seen < at(&signals, &path, "AttachedTo", "vm-1".to_string()).unwrap());
    let d = get(bus);
    assert_eq!(d["attached_to"], "vm-1");
    assert_eq!(d["lease"]["pid"], pid, "{d}");
    assert_eq!(d["lease"]["on_release"], "detach");
    let text = ok(&bus.hypemanctl(&["get", NAME_]));
    // `lease: pid N (on release: detach)`, or `pid N in UNIT (...)` where
    // the test runs inside a systemd unit.
    assert!(
        text.contains(&format!("lease: pid {pid} ")) && text.contains("(on release: detach)"),
        "{text}"
    );
    let status = ok(&bus.hypemanctl(&["--json", "status"]));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["attached_without_lease"], 0, "{status}");

    vmm.signal_and_wait("KILL");
    wait_released(bus, &mut signals, &path);
    assert_eq!(bus.host_driver(GPU).as_deref(), Some("vfio-pci"));
    let log = sim.daemon.log();
    assert!(
        log.contains("lease released") && log.contains(&format!("pid {pid}")),
        "{log}"
    );

    // A holder that ends by itself (exit 0), after an unleased attachment
    // was counted.
    bus.manager("Attach", &["ss", NAME_, "vm-2"]).unwrap();
    let status = ok(&bus.hypemanctl(&["--json", "status"]));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["attached_without_lease"], 1, "{status}");
    bus.manager("Detach", &["s", NAME_]).unwrap();
    let mut quiet = reader();
    ok(&attach(bus, quiet.pid(), "vm-3", &[]));
    signals.wait_set(Some(&path), "AttachedTo", "vm-3".to_string());
    drop(quiet.child.stdin.take());
    assert!(quiet.child.wait().unwrap().success());
    signals.seen.clear();
    wait_released(bus, &mut signals, &path);
    assert_eq!(bus.host_driver(GPU).as_deref(), Some("vfio-pci"));

    // A Detach first ends the lease: the holder's later end changes nothing.
    let mut vmm = sleeper();
    ok(&attach(bus, vmm.pid(), "vm-4", &[]));
    bus.manager("Detach", &["s", NAME_]).unwrap();
    bus.manager("Attach", &["ss", NAME_, "vm-5"]).unwrap();
    vmm.signal_and_wait("KILL");
    // Something the daemon does after the kill, answered in order: the
    // attachment to vm-5 is still there.
    bus.manager("SetTags", &["sa{ss}as", NAME_, "1", "after", "kill", "0"])
        .unwrap();
    assert_eq!(get(bus)["attached_to"], "vm-5");
}

/// `give-back`: the holder's end detaches and unbinds, back to nvidia.
#[test]
fn give_back_returns_the_device_to_its_driver() {
    let sim = Sim::on(TestBus::start(), "l4.toml");
    let bus = &sim.bus;
    let path = registered(bus);
    let mut signals = Signals::watch(bus, Some(&path));
    let mut vmm = sleeper();
    ok(&attach(
        bus,
        vmm.pid(),
        "vm-1",
        &["--on-release", "give-back"],
    ));
    assert_eq!(get(bus)["lease"]["on_release"], "give-back");
    vmm.signal_and_wait("KILL");
    let cleared = signals.wait_set(Some(&path), "AttachedTo", String::new());
    let unbound = signals.wait_set(Some(&path), "BoundToVfio", false);
    assert!(cleared < unbound, "{:?}", signals.seen);
    assert_eq!(bus.host_driver(GPU).as_deref(), Some("nvidia"));
    let d = get(bus);
    assert!(d["attached_to"].is_null(), "{d}");
    assert!(sim.daemon.log().contains("given back to the host"));
}

/// Stops the daemon cleanly (its registry compacted into devices.json).
fn stop(sim: Sim) -> (TestBus, tempfile::TempDir) {
    let Sim {
        mut daemon,
        bus,
        state,
    } = sim;
    assert!(daemon.proc.signal_and_wait("TERM").success());
    (bus, state)
}

fn restart(bus: TestBus, state: tempfile::TempDir) -> Sim {
    let daemon = Daemon::simulate(&bus, state.path(), "l4.toml");
    Sim { daemon, bus, state }
}

/// Starts the daemon again and checks it released the device before
/// answering: no attachment, no lease, and the log gives `why`.
fn restarted_released(bus: TestBus, state: tempfile::TempDir, why: &str) -> Sim {
    let sim = restart(bus, state);
    let d = get(&sim.bus);
    assert!(d["attached_to"].is_null(), "{d}");
    assert!(d.get("lease").is_none(), "{d}");
    let log = sim.daemon.log();
    assert!(log.contains(why), "wanted {why:?} in: {log}");
    sim
}

/// Edits the stored lease of the one device in `state`'s devices.json.
fn edit_lease(state: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let file = state.join("devices.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(doc["version"], 3, "a leased registry is format 3: {doc}");
    edit(&mut doc["devices"][0]["lease"]["holder"]["process"]);
    std::fs::write(&file, doc.to_string()).unwrap();
}

/// Across restarts: a living holder keeps its lease (and its later death
/// still releases); a holder that died while hypemand was stopped, and a
/// pid now belonging to another process (same pid, other start time), are
/// released before the daemon answers anyone.
#[test]
fn a_restart_keeps_a_living_holder_and_releases_the_rest() {
    let sim = Sim::on(TestBus::start(), "l4.toml");
    let path = registered(&sim.bus);
    let mut vmm = sleeper();
    let pid = i64::from(vmm.pid());
    ok(&attach(&sim.bus, vmm.pid(), "vm-1", &[]));

    // Alive: kept.
    let (bus, state) = stop(sim);
    let sim = restart(bus, state);
    let d = get(&sim.bus);
    assert_eq!(d["attached_to"], "vm-1", "{d}");
    assert_eq!(d["lease"]["pid"], pid);
    assert!(sim.daemon.log().contains("lease kept"));
    let mut signals = Signals::watch(&sim.bus, Some(&path));
    vmm.signal_and_wait("KILL");
    wait_released(&sim.bus, &mut signals, &path);

    // Gone while the daemon was stopped: released at start-up.
    let mut vmm = sleeper();
    ok(&attach(&sim.bus, vmm.pid(), "vm-2", &[]));
    let (bus, state) = stop(sim);
    vmm.signal_and_wait("KILL");
    let sim = restarted_released(bus, state, "has exited");

    // The same pid, another start time: another process, released.
    let vmm = sleeper();
    ok(&attach(&sim.bus, vmm.pid(), "vm-3", &[]));
    let (bus, state) = stop(sim);
    edit_lease(state.path(), |p| {
        let t = p["start_time"].as_u64().unwrap();
        p["start_time"] = (t + 1).into();
    });
    let sim = restarted_released(bus, state, "is another process now");
    // Another boot: released as well.
    let vmm2 = sleeper();
    ok(&attach(&sim.bus, vmm2.pid(), "vm-4", &[]));
    let (bus, state) = stop(sim);
    edit_lease(state.path(), |p| {
        p["boot_id"] = "00000000-0000-4000-8000-000000000000".into();
    });
    restarted_released(bus, state, "rebooted");
    drop((vmm, vmm2));
}

/// `hypemanctl attach DEV INSTANCE -- COMMAND`: the command runs holding
/// the device, hypemanctl exits with its status once the device is
/// released, however the command ended; a refused attach runs nothing.
#[test]
fn the_command_form_holds_the_device_for_the_commands_life() {
    let sim = Sim::on(TestBus::start(), "l4.toml");
    let bus = &sim.bus;
    registered(bus);
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen.json");
    let ctl = bin("hypemanctl");
    // The command looks at the device while it runs.
    let script = format!(
        "{ctl} --bus={} --json get {NAME_} > {}; exit 3",
        bus.address,
        seen.display()
    );
    let out = bus.hypemanctl(&["attach", NAME_, "vm-1", "--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let during: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    assert_eq!(during["attached_to"], "vm-1", "{during}");
    assert!(during["lease"]["pid"].as_i64().unwrap() > 0, "{during}");
    // Released before hypemanctl answered.
    assert!(get(bus)["attached_to"].is_null());

    // Killed by a signal: 128 + 9, released.
    let out = bus.hypemanctl(&["attach", NAME_, "vm-1", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(get(bus)["attached_to"].is_null());

    // Refused (attached elsewhere): the command never runs.
    bus.manager("Attach", &["ss", NAME_, "vm-9"]).unwrap();
    let ran = dir.path().join("ran");
    let touch = format!("touch {}", ran.display());
    let out = bus.hypemanctl(&["attach", NAME_, "vm-1", "--", "sh", "-c", &touch]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vm-9"),
        "{out:?}"
    );
    assert!(
        !ran.exists(),
        "the command ran though the attach was refused"
    );
    assert_eq!(get(bus)["attached_to"], "vm-9");
    // A command that cannot be found is refused before anything changes.
    bus.manager("Detach", &["s", NAME_]).unwrap();
    let out = bus.hypemanctl(&["attach", NAME_, "vm-1", "--", "no-such-command-here"]);
    assert!(!out.status.success());
    assert!(get(bus)["attached_to"].is_null());
    // A command is the holder: another holder beside it is refused, and
    // the command never runs.
    let out = bus.hypemanctl(&[
        "attach",
        "--holder-unit",
        "vm-1.service",
        NAME_,
        "vm-1",
        "--",
        "sh",
        "-c",
        &touch,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the command is the holder"),
        "{out:?}"
    );
    assert!(!ran.exists() && get(bus)["attached_to"].is_null());
}

async fn client(bus: &TestBus) -> Client {
    Client::connect(&BusChoice::Address(bus.address.clone()))
        .await
        .unwrap()
}

/// Blocks until the process of `pidfd` has exited, without reaping it.
fn wait_exit_unreaped(pidfd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd; -1 waits for the event (the exit).
    assert_eq!(unsafe { libc::poll(&mut p, 1, -1) }, 1);
}

fn invalid(r: Result<hypeman_api::Record, ClientError>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("not InvalidArgument: {other:?}"),
    }
}

/// Bad leases are typed errors that change nothing: an fd that is not a
/// pidfd, a pidfd of a process that has exited, an unknown `on_release`,
/// `on_release` without a holder, a holder on Bind, and a lease on a device
/// attached elsewhere.
#[test]
fn bad_leases_are_refused_and_change_nothing() {
    let sim = Sim::on(TestBus::start(), "l4.toml");
    let bus = &sim.bus;
    registered(bus);
    let before = stored_records(sim.state.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client(bus).await;
        let with = |fd: OwnedFd| Options {
            holder_pidfd: Some(Arc::new(fd)),
            ..Default::default()
        };
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let m = invalid(c.attach_with(NAME_, "vm-1", with(file)).await);
        assert!(m.contains("not a pidfd"), "{m}");

        let mut gone = sleeper();
        let fd = hypemanctl::hold::pidfd_open(gone.pid()).unwrap();
        gone.signal_and_wait("KILL");
        let m = invalid(c.attach_with(NAME_, "vm-1", with(fd)).await);
        assert!(m.contains("already exited"), "{m}");

        // Exited but not reaped (a zombie still takes signals): refused
        // too (regression: it was taken, then released at once).
        let mut zombie = holder(Command::new("sh").args(["-c", "read x"]));
        let fd = hypemanctl::hold::pidfd_open(zombie.pid()).unwrap();
        drop(zombie.child.stdin.take());
        wait_exit_unreaped(&fd);
        let m = invalid(c.attach_with(NAME_, "vm-1", with(fd)).await);
        assert!(m.contains("already exited"), "{m}");
        zombie.child.wait().unwrap();
    });
    // Over gdbus: an unknown on_release, and on_release alone.
    let out = bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.AttachWithOptions",
        &[NAME_, "vm-1", "{'on_release': <'keep'>}"],
    );
    assert!(
        gdbus_error_name(&out).ends_with("InvalidArgument"),
        "{out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("give-back"));
    let out = bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.AttachWithOptions",
        &[NAME_, "vm-1", "{'on_release': <'detach'>}"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a holder"));
    let out = bus.hypemanctl(&["attach", "--holder-pid", "0", NAME_, "vm-1"]);
    assert!(!out.status.success());
    assert_eq!(stored_records(sim.state.path()), before);

    // A lease on a device attached elsewhere: InUse, naming the holder, and
    // the attachment stays unleased.
    bus.manager("Attach", &["ss", NAME_, "vm-9"]).unwrap();
    let attached = stored_records(sim.state.path());
    let vmm = sleeper();
    let out = attach(bus, vmm.pid(), "vm-1", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vm-9"), "{err}");
    // The same instance with a lease it does not have is refused too: a
    // lease is never added behind an attachment's back.
    let out = attach(bus, vmm.pid(), "vm-9", &[]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(stored_records(sim.state.path()), attached);
    assert!(get(bus).get("lease").is_none());
    // Bind takes no holder.
    rt.block_on(async {
        let c = client(bus).await;
        let fd = hypemanctl::hold::pidfd_open(vmm.pid()).unwrap();
        let r = c
            .bind_with(
                NAME_,
                Options {
                    holder_pidfd: Some(Arc::new(fd)),
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    });
}

/// The shipped unit has no CAP_KILL: a holder run by another user answers
/// `EPERM` to a signal check, and is still a living holder (regression: it
/// was refused as "not a pidfd"). Here the daemon runs without CAP_KILL
/// and the holder as `nobody`.
#[test]
fn a_holder_of_another_user_without_cap_kill() {
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let fixture = fixture("l4.toml");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-kill", "--inh-caps", "-kill", "--"])
        .arg(bin("hypemand"))
        .arg(format!("--bus={}", bus.address))
        .arg(format!("--state-dir={}", state.path().display()))
        .arg("--simulate")
        .arg(&fixture)
        .env("RUST_LOG", "debug");
    let daemon = Daemon::from_command(&bus, cmd);
    let path = registered(&bus);
    let mut signals = Signals::watch(&bus, Some(&path));
    let mut vmm = holder(Command::new("setpriv").args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--",
        "sleep",
        "infinity",
    ]));
    ok(&attach(&bus, vmm.pid(), "vm-1", &[]));
    vmm.signal_and_wait("KILL");
    wait_released(&bus, &mut signals, &path);
    drop(daemon);
}

/// Polkit decides a leased Attach as it does any: the shipped rule lets
/// group `hypeman` attach under a lease; someone else is refused and
/// nothing changes; `give-back` is an Unbind at the holder's end, so it
/// also needs the bind action, and a rule granting only attach refuses it.
#[test]
fn polkit_decides_a_leased_attach() {
    let users = TestUsers::create(&["member", "other", "attacher"], &["member"], "hypeman");
    let (member, other, attacher) = (&users.names[0], &users.names[1], &users.names[2]);
    let shipped =
        std::fs::read_to_string(root().join("polkit/50-org.hypeman.devices.rules")).unwrap();
    let only_attach = format!(
        r#"polkit.addRule(function(action, subject) {{
    if (action.id == "org.hypeman.devices.attach" && subject.user == "{attacher}") return polkit.Result.YES;
}});
"#
    );
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(
        &bus,
        &[
            ("50-org.hypeman.devices.rules", shipped),
            ("10-attach.rules", only_attach),
        ],
    );
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "l4.toml");
    registered(&bus);
    let ctl = |user: &str, args: &[&str]| {
        as_user(user, &bin("hypemanctl"))
            .arg(format!("--bus={}", bus.address))
            .args(args)
            .output()
            .unwrap()
    };
    let before = stored_records(state.path());
    let mut vmm = holder(as_user(other, "sleep").arg("infinity"));
    vmm.child.stdin.take();
    let pid = vmm.pid().to_string();
    let out = ctl(other, &["attach", "--holder-pid", &pid, NAME_, "vm-1"]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(stored_records(state.path()), before);
    let give_back = ["attach", "--holder-pid", &pid, "--on-release", "give-back"];
    let out = ctl(attacher, &[&give_back[..], &[NAME_, "vm-1"]].concat());
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(stored_records(state.path()), before);
    // Attach alone is granted to the attacher.
    let out = ctl(attacher, &["attach", "--holder-pid", &pid, NAME_, "vm-1"]);
    ok(&out);
    ok(&bus.hypemanctl(&["detach", NAME_]));
    let out = ctl(member, &[&give_back[..], &[NAME_, "vm-1"]].concat());
    ok(&out);
    assert_eq!(get(&bus)["lease"]["on_release"], "give-back");
    let path = hypeman_api::device_path(get(&bus)["id"].as_str().unwrap()).unwrap();
    let mut signals = Signals::watch(&bus, Some(path.as_str()));
    vmm.signal_and_wait("KILL");
    signals.wait_set(Some(path.as_str()), "BoundToVfio", false);
    assert!(matches!(signals.seen.last(), Some(Signal::Changed { .. })));
    assert_eq!(bus.host_driver(GPU).as_deref(), Some("nvidia"));
}

/// Waits for the release of a unit lease: `HolderUnit` cleared before
/// `AttachedTo` is, and the record says so.
fn wait_unit_released(bus: &TestBus, signals: &mut Signals, path: &str) {
    let cleared = signals.wait_set(Some(path), "AttachedTo", String::new());
    let holder = at(signals, path, "HolderUnit", String::new()).expect("HolderUnit cleared");
    assert!(holder < cleared, "{:?}", signals.seen);
    let d = get(bus);
    assert!(d["attached_to"].is_null(), "{d}");
    assert!(d.get("lease").is_none(), "{d}");
}

/// A systemd stand-in on the test bus, then the daemon, the L4 registered
/// and on vfio-pci.
fn with_systemd() -> (FakeSystemd, Sim, String) {
    let bus = TestBus::start_systemd();
    let systemd = FakeSystemd::start(&bus);
    let sim = Sim::on(bus, "l4.toml");
    let path = registered(&sim.bus);
    (systemd, sim, path)
}

/// A unit lease: the holder is shown (record, Device1, hypemanctl), and
/// the unit's end releases the device however it ends: stopped
/// (`inactive`), failed (with `give-back`: back to nvidia), forgotten by
/// systemd, or run again as another invocation. (That `deactivating`
/// alone releases nothing is `units::tests`' to check: no event tells a
/// test that nothing happened.)
#[test]
fn a_unit_holder_that_ends_releases_the_device() {
    let (mut systemd, sim, path) = with_systemd();
    let bus = &sim.bus;
    let mut signals = Signals::watch(bus, Some(&path));

    let inv = systemd.start_unit("vm-1.service");
    ok(&bus.hypemanctl(&["attach", "--holder-unit", "vm-1.service", NAME_, "vm-1"]));
    signals.wait_set(Some(&path), "AttachedTo", "vm-1".to_string());
    let unit = at(&signals, &path, "HolderUnit", "vm-1.service".to_string()).expect("HolderUnit");
    let inv_seen = at(&signals, &path, "HolderInvocation", inv.clone()).expect("HolderInvocation");
    let attached = at(&signals, &path, "AttachedTo", "vm-1".to_string()).unwrap();
    assert!(unit < attached && inv_seen < attached, "{:?}", signals.seen);
    let d = get(bus);
    assert_eq!(d["lease"]["unit"], "vm-1.service", "{d}");
    assert_eq!(d["lease"]["invocation"], inv.as_str(), "{d}");
    assert!(d["lease"].get("pid").is_none(), "{d}");
    let text = ok(&bus.hypemanctl(&["get", NAME_]));
    assert!(
        text.contains(&format!(
            "lease: unit vm-1.service, invocation {inv} (on release: detach)"
        )),
        "{text}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(&bus.hypemanctl(&["--json", "status"]))).unwrap();
    assert_eq!(status["attached_without_lease"], 0, "{status}");

    systemd.stop_unit("vm-1.service", "inactive");
    wait_unit_released(bus, &mut signals, &path);
    assert_eq!(bus.host_driver(GPU).as_deref(), Some("vfio-pci"));
    assert!(
        systemd.subscriptions() >= 1,
        "systemd signals only to subscribers"
    );
    let log = sim.daemon.log();
    assert!(log.contains("unit vm-1.service is inactive"), "{log}");

    // Failed, giving back.
    systemd.start_unit("vm-2.service");
    ok(&bus.hypemanctl(&[
        "attach",
        "--holder-unit",
        "vm-2.service",
        "--on-release",
        "give-back",
        NAME_,
        "vm-2",
    ]));
    signals.seen.clear();
    systemd.stop_unit("vm-2.service", "failed");
    let cleared = signals.wait_set(Some(&path), "AttachedTo", String::new());
    let unbound = signals.wait_set(Some(&path), "BoundToVfio", false);
    assert!(cleared < unbound, "{:?}", signals.seen);
    assert_eq!(bus.host_driver(GPU).as_deref(), Some("nvidia"));

    // Forgotten by systemd (a transient unit collected).
    systemd.start_unit("vm-3.scope");
    ok(&bus.hypemanctl(&["attach", "--holder-unit", "vm-3.scope", NAME_, "vm-3"]));
    signals.seen.clear();
    systemd.remove_unit("vm-3.scope");
    wait_unit_released(bus, &mut signals, &path);
    assert!(sim.daemon.log().contains("no longer knows unit vm-3.scope"));

    // Run again: another invocation is another holder.
    systemd.start_unit("vm-4.service");
    ok(&bus.hypemanctl(&["attach", "--holder-unit", "vm-4.service", NAME_, "vm-4"]));
    signals.seen.clear();
    systemd.start_unit("vm-4.service");
    wait_unit_released(bus, &mut signals, &path);
    assert!(sim
        .daemon
        .log()
        .contains("runs again as another invocation"));
}

/// Bad unit leases are typed errors that change nothing: a unit systemd
/// does not know, one that is not running, a name that is not a unit's,
/// and two holders at once.
#[test]
fn bad_unit_leases_are_refused_and_change_nothing() {
    let (mut systemd, sim, _path) = with_systemd();
    let bus = &sim.bus;
    let before = stored_records(sim.state.path());
    let attach_unit = |unit: &str| {
        let out = bus.hypemanctl(&["attach", "--holder-unit", unit, NAME_, "vm-1"]);
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = attach_unit("vm-9.service");
    assert!(
        err.contains("systemd does not know unit vm-9.service"),
        "{err}"
    );
    systemd.start_unit("vm-1.service");
    systemd.stop_unit("vm-1.service", "inactive");
    let err = attach_unit("vm-1.service");
    assert!(err.contains("is inactive and not running"), "{err}");
    let err = attach_unit("vm-1.timer");
    assert!(err.contains("not a unit name"), "{err}");
    let out = bus.gdbus_call(
        PATH,
        "org.hypeman.Devices1.AttachWithOptions",
        &[NAME_, "vm-1", "{'holder_unit': <'../../x.service'>}"],
    );
    assert!(
        gdbus_error_name(&out).ends_with("InvalidArgument"),
        "{out:?}"
    );
    let vmm = sleeper();
    let pid = vmm.pid().to_string();
    let out = bus.hypemanctl(&[
        "attach",
        "--holder-pid",
        &pid,
        "--holder-unit",
        "vm-1.service",
        NAME_,
        "vm-1",
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(stored_records(sim.state.path()), before);
}

/// Across restarts: a unit running the same invocation keeps its lease
/// (and its later end still releases); a unit run again, or forgotten,
/// while hypemand was stopped is released before the daemon answers.
#[test]
fn a_restart_keeps_a_running_unit_and_releases_another_run() {
    let (mut systemd, sim, path) = with_systemd();
    systemd.start_unit("vm-1.service");
    ok(&sim
        .bus
        .hypemanctl(&["attach", "--holder-unit", "vm-1.service", NAME_, "vm-1"]));

    let (bus, state) = stop(sim);
    let sim = restart(bus, state);
    let d = get(&sim.bus);
    assert_eq!(d["attached_to"], "vm-1", "{d}");
    assert_eq!(d["lease"]["unit"], "vm-1.service", "{d}");
    assert!(sim.daemon.log().contains("lease kept"));
    let mut signals = Signals::watch(&sim.bus, Some(&path));
    systemd.stop_unit("vm-1.service", "inactive");
    wait_unit_released(&sim.bus, &mut signals, &path);

    // Run again while hypemand was stopped.
    systemd.start_unit("vm-1.service");
    ok(&sim
        .bus
        .hypemanctl(&["attach", "--holder-unit", "vm-1.service", NAME_, "vm-1"]));
    let (bus, state) = stop(sim);
    systemd.stop_unit("vm-1.service", "inactive");
    systemd.start_unit("vm-1.service");
    let sim = restarted_released(bus, state, "is another run now");

    // Forgotten while hypemand was stopped.
    ok(&sim
        .bus
        .hypemanctl(&["attach", "--holder-unit", "vm-1.service", NAME_, "vm-1"]));
    let (bus, state) = stop(sim);
    systemd.remove_unit("vm-1.service");
    restarted_released(bus, state, "no longer knows unit vm-1.service");
}

/// `hypemanctl --json ARGS…`, parsed.
fn ctl_json(bus: &TestBus, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&bus.hypemanctl(&all))).unwrap()
}

/// `vgpu create "NVIDIA L40S-4Q" --instance INSTANCE --holder-pid PID
/// [extra]`: the vGPU's record.
fn leased_vgpu(bus: &TestBus, pid: u32, instance: &str, extra: &[&str]) -> serde_json::Value {
    let pid = pid.to_string();
    let mut args = vec!["vgpu", "create", "NVIDIA L40S-4Q", "--instance", instance];
    args.extend_from_slice(&["--holder-pid", &pid]);
    args.extend_from_slice(extra);
    ctl_json(bus, &args)
}

/// The vGPUs `hypemanctl vgpu list` shows, by id.
fn vgpus(bus: &TestBus) -> std::collections::HashMap<String, serde_json::Value> {
    let list = ctl_json(bus, &["vgpu", "list"]);
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| (v["id"].as_str().unwrap().to_string(), v.clone()))
        .collect()
}

/// *(issue 27)* A vGPU made with a lease (`CreateVgpu`'s `holder_pidfd`):
/// `detach` clears its instance when the holder is killed (the vGPU stays,
/// signalled lease first, then `InstanceId`), `give-back` deletes it
/// (`VgpuDeleted`), and a holder that died while hypemand was stopped is
/// released at the next start. Bad lease options are refused, and nothing
/// is made.
#[test]
fn a_vgpu_lease_clears_its_instance_or_deletes_the_vgpu() {
    const FIXTURE: &str = "l40s-vgpu.toml";
    let sim = Sim::on(TestBus::start(), FIXTURE);
    let bus = &sim.bus;
    ok(&bus.hypemanctl(&["register", "0000:41:00.0", "--name", "l40s"]));
    ok(&bus.hypemanctl(&["sriov", "l40s", "2"]));
    let mut signals = Signals::watch(bus, None);

    // detach: the instance is cleared, the vGPU stays made.
    let mut vmm = sleeper();
    let made = leased_vgpu(bus, vmm.pid(), "vm-1", &[]);
    let pid = i64::from(vmm.pid());
    assert_eq!(made["lease"]["pid"], pid, "{made}");
    assert_eq!(made["lease"]["on_release"], "detach", "{made}");
    let kept = made["id"].as_str().unwrap().to_string();
    let object = format!("/org/hypeman/Vgpus/{kept}");
    let property = |name: &str| {
        let out = bus.busctl(&["get-property", NAME, &object, "org.hypeman.Vgpu1", name]);
        ok(&out).trim().to_string()
    };
    assert_eq!(property("HolderPid"), format!("x {pid}"));
    assert_eq!(property("OnRelease"), "s \"detach\"");
    vmm.signal_and_wait("KILL");
    let cleared = signals.wait_set(Some(&object), "InstanceId", String::new());
    let holder = at(&signals, &object, "HolderPid", -1i64).expect("HolderPid back to -1");
    assert!(holder < cleared, "{:?}", signals.seen);
    let v = &vgpus(bus)[&kept];
    assert!(v["instance_id"].is_null() && v["lease"].is_null(), "{v}");
    assert_eq!(v["state"], "ready", "{v}");
    assert!(sim.daemon.log().contains("vGPU's instance cleared"));

    // give-back: the vGPU is deleted, its function free again.
    let mut vmm = sleeper();
    let made = leased_vgpu(bus, vmm.pid(), "vm-2", &["--on-release", "give-back"]);
    let gone = made["id"].as_str().unwrap().to_string();
    assert_eq!(made["lease"]["on_release"], "give-back", "{made}");
    vmm.signal_and_wait("KILL");
    signals.wait_for(|s| matches!(s, Signal::Other { member, .. } if member == "VgpuDeleted"));
    let now = vgpus(bus);
    assert!(
        !now.contains_key(&gone) && now.contains_key(&kept),
        "{now:?}"
    );
    assert_eq!(ctl_json(bus, &["resources"])["used_slots"], 1);

    // Bad lease options: refused, nothing made.
    for bad in [
        "{'profile': <'NVIDIA L40S-4Q'>, 'on_release': <'detach'>}",
        "{'profile': <'NVIDIA L40S-4Q'>, 'holder_unit': <'not a unit'>}",
        "{'profile': <'NVIDIA L40S-4Q'>, 'holder_unit': <'vm-404.service'>, 'on_release': <'keep'>}",
        "{'profile': <'NVIDIA L40S-4Q'>, 'force': <true>}",
    ] {
        let out = bus.gdbus_call(PATH, "org.hypeman.Devices1.CreateVgpu", &[bad]);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && e.contains("org.hypeman.Devices.Error.InvalidArgument"),
            "{bad}: {out:?}"
        );
    }
    assert_eq!(vgpus(bus).len(), 1);

    // A holder that dies while hypemand is stopped: released at start-up.
    let mut vmm = sleeper();
    let made = leased_vgpu(bus, vmm.pid(), "vm-3", &[]);
    let third = made["id"].as_str().unwrap().to_string();
    drop(signals);
    let (bus, state) = stop(sim);
    vmm.signal_and_wait("KILL");
    let daemon = Daemon::simulate(&bus, state.path(), FIXTURE);
    let v = &vgpus(&bus)[&third];
    assert!(v["instance_id"].is_null() && v["lease"].is_null(), "{v}");
    assert!(daemon.log().contains("has exited"), "{}", daemon.log());
}
