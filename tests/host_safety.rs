//! End to end, issue 14: the daemon never takes a device the host is using.
//!
//! One simulated fixture per blocker: Bind and Attach are refused with
//! `HostInUse` naming it, and the simulated kernel records zero writes. Then
//! forcing (as root, whom the daemon lets through without polkitd; the polkit
//! rules themselves are in tests/polkit.rs), nvidia-persistenced stopped and
//! started around the driver moves, and the real backend on a host root laid
//! out as the kernel lays it out.

use crate::common;

use common::*;
use serde_json::Value;

const HEADER: &str = r#"
[[driver]]
name = "nvidia"
ids = ["10de:*"]
[[driver]]
name = "nvme"
ids = ["144d:a80a"]
[[driver]]
name = "igc"
ids = ["8086:15f3"]
[[driver]]
name = "i915"
ids = ["8086:a780"]
[[driver]]
name = "vfio-pci"
"#;

fn device(addr: &str, ids: (&str, &str, &str), driver: &str, group: u32) -> String {
    format!(
        "[[device]]\naddress = \"{addr}\"\nvendor = \"{}\"\ndevice = \"{}\"\nclass = \"{}\"\niommu_group = {group}\ndriver = \"{driver}\"\n",
        ids.0, ids.1, ids.2
    )
}

const GPU: (&str, &str, &str) = ("10de", "2684", "030000");
const NVME: (&str, &str, &str) = ("144d", "a80a", "010802");
const NIC: (&str, &str, &str) = ("8086", "15f3", "020000");

/// Starts a daemon on a fixture written from `text`.
fn on_host(bus: &TestBus, state: &std::path::Path, text: &str) -> Daemon {
    let host = state.join("host.toml");
    std::fs::write(&host, format!("{HEADER}{text}")).unwrap();
    Daemon::start(bus, state, &["--simulate", host.to_str().unwrap()])
}

fn call_error(bus: &TestBus, method: &str, args: &[&str]) -> (String, String) {
    let out = bus.gdbus_call(PATH, &format!("{IFACE}.{method}"), args);
    assert!(!out.status.success(), "{method} {args:?} succeeded");
    (
        gdbus_error_name(&out),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `code: message`, one a blocker, of `addr` in ListAvailable.
fn blocker_lines(bus: &TestBus, addr: &str) -> Vec<String> {
    blockers_of(bus, addr)
        .into_iter()
        .map(|(c, m)| format!("{c}: {m}"))
        .collect()
}

fn blockers_of(bus: &TestBus, addr: &str) -> Vec<(String, String)> {
    let all = bus.manager("ListAvailable", &[]).unwrap();
    let row = all[0]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pci_address"]["data"] == addr)
        .unwrap_or_else(|| panic!("{addr} not listed"))
        .clone();
    assert_eq!(
        row["passable"]["data"],
        row["blockers"]["data"].as_array().unwrap().is_empty()
    );
    row["blockers"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["code"]["data"].as_str().unwrap().to_string(),
                b["message"]["data"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn each_blocker_refuses_bind_and_attach_without_a_write() {
    let target = "0000:01:00.0";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "boot-vga",
            device(target, ("8086", "a780", "030000"), "i915", 1) + "boot_vga = true\n",
            "is the boot display",
        ),
        (
            "mounted",
            device(target, NVME, "nvme", 1)
                + "[[device.block]]\nname = \"nvme0n1p2\"\nmounts = [\"/\", \"/home\"]\n",
            "/dev/nvme0n1p2 is mounted on /, /home",
        ),
        (
            "mounted",
            device(target, NVME, "nvme", 1)
                + "[[device.block]]\nname = \"dm-1\"\nswap = true\n",
            "/dev/dm-1 is active swap",
        ),
        (
            "network-active",
            device(target, NIC, "igc", 1)
                + "[[device.interface]]\nname = \"enp1s0\"\nup = true\nroutes = [\"default\"]\n",
            "network interface enp1s0 is up and carries routes",
        ),
        (
            "open-by",
            device(target, GPU, "nvidia", 1)
                + "[[device.open_by]]\npid = 4242\ncomm = \"blender\"\nnode = \"/dev/dri/renderD128\"\n",
            "/dev/dri/renderD128 is open by process 4242 (blender)",
        ),
        (
            "group",
            device(target, GPU, "nvidia", 1)
                + &device("0000:01:00.1", NVME, "nvme", 1)
                + "[[device.block]]\nname = \"nvme1n1\"\nmounts = [\"/data\"]\n",
            "shares IOMMU group 1 with 0000:01:00.1",
        ),
    ];
    for (code, text, says) in cases {
        let bus = TestBus::start_sim();
        let state = tempfile::tempdir().unwrap();
        let _d = on_host(&bus, state.path(), &text);
        let blockers = blockers_of(&bus, target);
        assert_eq!(blockers.len(), 1, "{code}: {blockers:?}");
        assert_eq!(blockers[0].0, code);
        assert!(blockers[0].1.contains(says), "{code}: {blockers:?}");
        // Soft blockers do not stop a registration, only a move.
        bus.manager("Register", &["ss", target, "dev"]).unwrap();
        for (method, args) in [("Bind", &["dev"][..]), ("Attach", &["dev", "vm-1"])] {
            let (name, text) = call_error(&bus, method, args);
            assert_eq!(
                name, "org.hypeman.Devices.Error.HostInUse",
                "{code} {method}"
            );
            assert!(text.contains(&format!("[{code}]")), "{text}");
            assert!(text.contains(says), "{text}");
        }
        assert_eq!(bus.writes(), Vec::<String>::new(), "{code}");
        // The device object says the same.
        let got = bus.hypemanctl(&["get", "dev"]);
        let out = String::from_utf8_lossy(&got.stdout);
        assert!(
            out.contains(&format!("[{code}]")) && out.contains(says),
            "{out}"
        );
    }
}

/// Register refuses the hard blockers with typed errors, so every record has
/// an IOMMU group; forcing never overrides them (a bridge registered by an
/// earlier version is refused a forced Bind and Attach, typed, unwritten).
#[test]
fn register_refuses_bridges_and_forcing_cannot_help() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    stored_earlier(
        state.path(),
        &[(
            "tz4a98xxat96iws9zmbrgj3a",
            "old-port",
            "0000:00:01.0",
            "8086:a70d",
        )],
    );
    let _d = Daemon::simulate(&bus, state.path(), "workstation.toml");
    let (name, text) = call_error(&bus, "Register", &["0000:00:01.0", "port"]);
    assert_eq!(name, "org.hypeman.Devices.Error.NotPassable");
    assert!(text.contains("is a PCI bridge"), "{text}");
    // *(issue 24)* The host bridge and the ISA/LPC bridge too.
    for (address, kind) in [
        ("0000:00:00.0", "host bridge"),
        ("0000:00:1f.0", "ISA bridge"),
    ] {
        let (name, text) = call_error(&bus, "Register", &[address, "platform"]);
        assert_eq!(name, "org.hypeman.Devices.Error.NotPassable", "{address}");
        assert!(text.contains(&format!("{address} is a {kind}")), "{text}");
    }
    let force = "{'force': <true>}";
    for (method, args) in [
        ("BindWithOptions", &["old-port", force][..]),
        ("AttachWithOptions", &["old-port", "vm-1", force]),
    ] {
        let (name, text) = call_error(&bus, method, args);
        assert_eq!(name, "org.hypeman.Devices.Error.NotPassable", "{method}");
        assert!(text.contains("is a PCI bridge"), "{text}");
    }
    let listed = bus.manager("List", &[]).unwrap();
    assert_eq!(listed[0].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(bus.writes(), Vec::<String>::new());
}

/// `--force` (BindWithOptions / AttachWithOptions with force) overrides the
/// soft blockers, and says so in the log; unknown options are refused.
#[test]
fn forcing_overrides_soft_blockers_and_is_logged() {
    let Sim {
        bus,
        state: _state,
        daemon: d,
    } = Sim::start("workstation.toml");
    bus.manager("Register", &["ss", "0000:03:00.0", "data"])
        .unwrap();
    let (name, _) = call_error(&bus, "BindWithOptions", &["data", "{'forse': <true>}"]);
    assert_eq!(name, "org.hypeman.Devices.Error.InvalidArgument");
    let (name, _) = call_error(&bus, "BindWithOptions", &["data", "{'force': <1>}"]);
    assert_eq!(name, "org.hypeman.Devices.Error.InvalidArgument");
    // Without force: refused, as Bind.
    let (name, _) = call_error(&bus, "BindWithOptions", &["data", "{}"]);
    assert_eq!(name, "org.hypeman.Devices.Error.HostInUse");
    assert_eq!(bus.writes(), Vec::<String>::new());

    let out = bus.hypemanctl(&["--json", "attach", "data", "vm-1", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["bound_to_vfio"], true);
    assert_eq!(doc["attached_to"], "vm-1");
    assert!(!bus.writes().is_empty());
    wait_until(|| {
        d.log()
            .contains("forced: taking a device the host is using")
    });
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("forced: taking"))
        .unwrap()
        .to_string();
    assert!(line.contains("overridden=open-by"), "{line}");
    assert!(line.contains("WARN"), "{line}");
}

/// nvidia-persistenced holds the GPU: the daemon stops it through the service
/// manager before unbinding from nvidia, and starts it again afterwards, on
/// success and after a failed Bind. (Without the stop, the simulated unbind
/// waits for the service, as the kernel's does, past the deadline.)
#[test]
fn persistenced_is_stopped_and_started_around_the_moves() {
    const UNIT: &str = "nvidia-persistenced.service";
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &bus,
        state.path(),
        &[
            "--simulate",
            fixture("workstation.toml").to_str().unwrap(),
            "--sysfs-timeout",
            "30",
        ],
    );
    bus.manager("Register", &["ss", "0000:01:00.0", "rtx"])
        .unwrap();
    bus.manager("Register", &["ss", "0000:01:00.1", "rtx-audio"])
        .unwrap();
    let around = |journal: &[String], step: &str| {
        let at = |e: &str| {
            journal
                .iter()
                .position(|j| j == e)
                .unwrap_or_else(|| panic!("{e} not in {journal:?}"))
        };
        let (stop, start) = (at(&format!("stop {UNIT}")), at(&format!("start {UNIT}")));
        let s = journal
            .iter()
            .position(|j| j.starts_with(step))
            .unwrap_or_else(|| panic!("{step} not in {journal:?}"));
        assert!(stop < s && s < start, "{journal:?}");
    };

    bus.manager("Bind", &["s", "rtx"]).unwrap();
    let journal = bus.journal();
    around(&journal, "unbind 0000:01:00.0");
    assert!(bus.unit_active(UNIT));
    assert_eq!(bus.host_driver("0000:01:00.0").as_deref(), Some("vfio-pci"));

    let mark = bus.journal().len();
    bus.manager("Unbind", &["s", "rtx"]).unwrap();
    around(&bus.journal()[mark..], "probe 0000:01:00.0");
    assert!(bus.unit_active(UNIT));
    assert_eq!(bus.host_driver("0000:01:00.0").as_deref(), Some("nvidia"));
    // *(issue 19)* Logs show values, not Rust debug output.
    wait_until(|| d.log().contains("device given back to the host"));
    let log = d.log();
    assert!(
        log.contains("from=nvidia") && log.contains("to=nvidia"),
        "{log}"
    );
    assert!(!log.contains("from=\"") && !log.contains("Some("), "{log}");

    // A Bind that fails at the probe is rolled back to nvidia, and the
    // service is started again all the same.
    bus.inject("probe", "0000:01:00.0", "EIO");
    let mark = bus.journal().len();
    let (name, _) = call_error(&bus, "Bind", &["rtx"]);
    assert_eq!(name, "org.hypeman.Devices.Error.BindFailed");
    around(&bus.journal()[mark..], "unbind 0000:01:00.0");
    assert!(bus.unit_active(UNIT));
    assert_eq!(bus.host_driver("0000:01:00.0").as_deref(), Some("nvidia"));
}

/// tests/data/host-root.sh's tree in a temporary directory.
fn host_root_tree() -> tempfile::TempDir {
    let host_root = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("bash")
        .arg(root().join("tests/data/host-root.sh"))
        .arg(host_root.path())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    host_root
}

/// The real backend on a temporary host root laid out as the kernel lays out
/// /sys and /proc (tests/data/host-root.sh): ListAvailable's blockers are
/// exact, and Bind refuses the mounted drive without writing.
#[test]
fn the_real_backend_reads_the_host_root() {
    let host_root = host_root_tree();
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::start(
        &bus,
        state.path(),
        &["--host-root", host_root.path().to_str().unwrap()],
    );
    let codes = |addr: &str| blocker_lines(&bus, addr);
    assert_eq!(
        codes("0000:02:00.0"),
        [
            "mounted: 0000:02:00.0: /dev/dm-0 is mounted on /home dir",
            "mounted: 0000:02:00.0: /dev/nvme0n1p1 is mounted on /srv",
            "mounted: 0000:02:00.0: /dev/nvme0n1p2 is mounted on /",
            "mounted: 0000:02:00.0: /dev/dm-1 is active swap",
        ]
    );
    assert_eq!(
        codes("0000:05:00.0"),
        ["network-active: 0000:05:00.0: network interface enp5s0 is up and carries routes"]
    );
    assert_eq!(
        codes("0000:01:00.0"),
        ["open-by: 0000:01:00.0: /dev/dri/card1 is open by process 812 (Xorg)"]
    );
    assert_eq!(
        codes("0000:00:1d.0"),
        ["bridge: 0000:00:1d.0 is a PCI bridge: bridges stay with the host (vfio-pci refuses them)"]
    );
    assert!(codes("0000:06:00.0").is_empty());
    assert!(codes("0000:07:00.0").is_empty());

    bus.manager("Register", &["ss", "0000:02:00.0", "system"])
        .unwrap();
    let override_file = host_root
        .path()
        .join("sys/bus/pci/devices/0000:02:00.0/driver_override");
    let (name, _) = call_error(&bus, "Bind", &["system"]);
    assert_eq!(name, "org.hypeman.Devices.Error.HostInUse");
    assert_eq!(std::fs::read_to_string(override_file).unwrap(), "(null)\n");
}

/// A process the test starts, which says `ready` on stdout once set up and
/// holds what it opened until its stdin closes; stopped by pid on every path
/// ([`Proc`]'s drop).
fn holder(mut cmd: std::process::Command) -> Proc {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let p = Proc { child };
    assert_eq!(line.trim(), "ready", "the holder did not set up");
    p
}

/// A host root whose /sys is tests/data/host-root.sh's tree and whose /proc
/// is the machine's own, so real processes' fds are what is walked.
fn live_host_root() -> tempfile::TempDir {
    let host_root = host_root_tree();
    std::fs::remove_dir_all(host_root.path().join("proc")).unwrap();
    std::os::unix::fs::symlink("/proc", host_root.path().join("proc")).unwrap();
    host_root
}

/// *(issue 24)* `open-by` believes only the kernel, and sees every fd.
///
/// A plain user in its own user and mount namespaces mounts a tmpfs on
/// /dev, makes regular files named renderD128, nvme0n1 and nvme0 there and
/// holds them open: nothing is blocked (before: the GPU and the NVMe were
/// `open-by` the user, and root's Bind answered `HostInUse`). A real holder
/// of card1's device number (1:7, the machine's /dev/full), behind 18,000
/// other fds, is seen. (The fd past 65,536 that the old cap hid is the unit
/// test `every_fd_is_read`: this sandbox's hard NOFILE limit is 20,000, and
/// raising it needs CAP_SYS_RESOURCE, which it lacks.) Then a walk given 1 ms runs out of time: it says how far it got, Bind
/// answers `Busy` saying so, nothing is marked stuck, and a forced Bind goes
/// past it.
#[test]
fn open_by_believes_only_the_kernel_and_sees_every_fd() {
    let host_root = live_host_root();
    let users = TestUsers::create(&["mallory"], &[], "hypeman");
    let mut fake = as_user(&users.names[0], "unshare");
    fake.args([
        "-Urm",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && mkdir /dev/dri && touch /dev/dri/renderD128 /dev/nvme0n1 /dev/nvme0 \
         && exec 7</dev/dri/renderD128 8</dev/nvme0n1 9</dev/nvme0 && echo ready && exec cat",
    ]);
    let _fake = holder(fake);
    let mut real = std::process::Command::new("/usr/bin/python3");
    real.args([
        "-c",
        "import os, resource, sys\n\
         hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
         null = os.open('/dev/null', os.O_RDONLY)\n\
         held = [os.dup(null) for _ in range(18000)]\n\
         os.open('/dev/full', os.O_RDONLY)\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n",
    ]);
    let real = holder(real);

    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let hr = host_root.path().to_str().unwrap().to_string();
    let d = Daemon::start(&bus, state.path(), &["--host-root", &hr]);
    let codes = |addr: &str| blocker_lines(&bus, addr);
    assert_eq!(
        codes("0000:01:00.0"),
        [format!(
            "open-by: 0000:01:00.0: /dev/dri/card1 is open by process {} (python3)",
            real.pid()
        )]
    );
    // The fake nodes are regular files: nothing. The tree's disks are
    // mounted nowhere on this machine; only the tree's own btrfs member list
    // says p1 is.
    assert_eq!(
        codes("0000:02:00.0"),
        ["mounted: 0000:02:00.0: /dev/nvme0n1p1 is mounted on (btrfs filesystem 6f1d3b52-8e0e-4c5a-9a53-0b2c1d7e9f10)"]
    );
    assert_eq!(codes("0000:07:00.0"), Vec::<String>::new());
    drop(d);
    wait_name(&bus, NAME, false, None);

    // 1 ms for a walk of 18,000 fds and more: out of time.
    let d = Daemon::start(
        &bus,
        state.path(),
        &["--host-root", &hr, "--usage-timeout", "0.001"],
    );
    let unknown = codes("0000:07:00.0");
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(
        unknown[0].starts_with(
            "usage-unknown: 0000:07:00.0: cannot tell whether the host uses it: could not finish: "
        ) && unknown[0].contains(" processes and ")
            && unknown[0].contains(" fds read in "),
        "{unknown:?}"
    );
    // A NIC has no nodes: its answer does not depend on the fds.
    assert_eq!(codes("0000:06:00.0"), Vec::<String>::new());
    bus.manager("Register", &["ss", "0000:07:00.0", "gpu2"])
        .unwrap();
    let override_file = host_root
        .path()
        .join("sys/bus/pci/devices/0000:07:00.0/driver_override");
    for _ in 0..2 {
        // Busy each time, never "stuck": a slow walk is no stuck kernel.
        let (name, text) = call_error(&bus, "Bind", &["gpu2"]);
        assert_eq!(name, "org.hypeman.Devices.Error.Busy", "{text}");
        assert!(
            text.contains("cannot tell whether the host is using this device")
                && text.contains("could not finish")
                && text.contains("force"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&override_file).unwrap(), "(null)\n");
    }
    let got = bus.manager("Get", &["s", "gpu2"]).unwrap();
    assert_eq!(got[0]["driver"]["data"], "nvidia");
    // Forced: past the unknown (this tree has no vfio-pci, so it stops there).
    let (name, text) = call_error(&bus, "BindWithOptions", &["gpu2", "{'force': <true>}"]);
    assert_eq!(name, "org.hypeman.Devices.Error.VfioUnavailable", "{text}");
    assert!(d.log().contains("overridden=usage-unknown"), "{}", d.log());
}

/// *(issue 28)* A swapped card: the daemon is stopped, another card (other
/// vendor and device) is put at a registered GPU's address, and the daemon
/// started again. The GPU was bound before, so start-up would re-bind it:
/// nothing is written, the record and ListAvailable say `hardware-changed`
/// with both cards, and Bind and Attach answer `HardwareChanged`. Another
/// subsystem alone is another card too; a moved IOMMU group alone is not.
/// Delete and Register again accept the new card.
#[test]
fn a_swapped_card_is_never_bound_until_it_is_registered_again() {
    const ADDR: &str = "0000:01:00.0";
    let card = |ids: (&str, &str, &str), sub: &str, group: u32| {
        format!(
            "{}subsystem_vendor = \"{}\"\nsubsystem_device = \"{sub}\"\n",
            device(ADDR, ids, "nvidia", group),
            ids.0
        )
    };
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let d = on_host(&bus, state.path(), &card(GPU, "16ca", 20));
    bus.manager("Register", &["ss", ADDR, "gpu"]).unwrap();
    bus.manager("Bind", &["s", "gpu"]).unwrap();
    let got = bus.manager("Get", &["s", "gpu"]).unwrap();
    assert_eq!(got[0]["subsystem_device_id"]["data"], "16ca", "{got}");
    assert_eq!(got[0]["registered_iommu_group"]["data"], 20, "{got}");
    let mut d = d;
    assert!(d.proc.signal_and_wait("TERM").success());

    // Another vendor and device at the address.
    let amd = ("1002", "73bf", "030000");
    let d = on_host(&bus, state.path(), &card(amd, "0e3a", 20));
    assert!(bus.writes().is_empty(), "written: {:?}", bus.writes());
    let got = bus.manager("Get", &["s", "gpu"]).unwrap();
    let why = got[0]["hardware_changed"]["data"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("10de:2684 (subsystem 10de:16ca)")
            && why.contains("1002:73bf (subsystem 1002:0e3a)"),
        "{why}"
    );
    assert_eq!(got[0]["bound_to_vfio"]["data"], false);
    let blockers = blockers_of(&bus, ADDR);
    assert!(
        blockers
            .iter()
            .any(|(c, m)| c == "hardware-changed" && *m == why),
        "{blockers:?}"
    );
    let text = bus.hypemanctl(&["get", "gpu"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("hardware changed: "),
        "{text:?}"
    );
    for (method, args) in [
        ("Bind", vec!["gpu"]),
        ("Attach", vec!["gpu", "vm-1"]),
        ("BindWithOptions", vec!["gpu", "{'force': <true>}"]),
    ] {
        let (name, message) = call_error(&bus, method, &args);
        assert_eq!(
            name, "org.hypeman.Devices.Error.HardwareChanged",
            "{method}"
        );
        assert!(message.contains("register it again"), "{method}: {message}");
    }
    assert!(bus.writes().is_empty(), "written: {:?}", bus.writes());
    assert!(d.log().contains("hardware changed"), "{}", d.log());

    // Delete and Register again: the new card is accepted.
    bus.manager("Delete", &["s", "gpu"]).unwrap();
    bus.manager("Register", &["ss", ADDR, "gpu"]).unwrap();
    bus.manager("Bind", &["s", "gpu"]).unwrap();
    let got = bus.manager("Get", &["s", "gpu"]).unwrap();
    assert!(got[0].get("hardware_changed").is_none(), "{got}");
    let mut d = d;
    assert!(d.proc.signal_and_wait("TERM").success());

    // The same chip from another board maker (subsystem): another card.
    let d = on_host(&bus, state.path(), &card(amd, "0e3b", 20));
    let (name, _) = call_error(&bus, "Attach", &["gpu", "vm-1"]);
    assert_eq!(name, "org.hypeman.Devices.Error.HardwareChanged");
    let mut d = d;
    assert!(d.proc.signal_and_wait("TERM").success());

    // The same card in another IOMMU group (a firmware update): re-bound at
    // start-up as before, the move logged, and both numbers shown.
    let d = on_host(&bus, state.path(), &card(amd, "0e3a", 21));
    let got = bus.manager("Get", &["s", "gpu"]).unwrap();
    assert!(got[0].get("hardware_changed").is_none(), "{got}");
    assert_eq!(got[0]["bound_to_vfio"]["data"], true, "{got}");
    assert_eq!(got[0]["iommu_group"]["data"], 21);
    assert_eq!(got[0]["registered_iommu_group"]["data"], 20);
    assert!(
        d.log().contains("IOMMU group number changed"),
        "{}",
        d.log()
    );
}

/// A host with the GPU at `address` on nvidia, its subsystem ids said.
fn gpu_with_subsystem(address: &str) -> String {
    format!(
        "{}subsystem_vendor = \"10de\"\nsubsystem_device = \"16ca\"\n",
        device(address, GPU, "nvidia", 20)
    )
}

/// *(issue 28)* A record stored before identities existed takes the
/// identity of the card at its address at the first start that sees it.
#[test]
fn a_record_of_before_learns_its_identity_at_start() {
    const ADDR: &str = "0000:01:00.0";
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let host = gpu_with_subsystem(ADDR);
    let mut d = on_host(&bus, state.path(), &host);
    bus.manager("Register", &["ss", ADDR, "gpu"]).unwrap();
    assert!(d.proc.signal_and_wait("TERM").success());
    let file = state.path().join("devices.json");
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(doc["devices"][0]["identity"].is_object(), "{doc}");
    doc["devices"][0]
        .as_object_mut()
        .unwrap()
        .remove("identity");
    std::fs::write(&file, doc.to_string()).unwrap();

    let d = on_host(&bus, state.path(), &host);
    let got = bus.manager("Get", &["s", "gpu"]).unwrap();
    assert_eq!(got[0]["subsystem_vendor_id"]["data"], "10de", "{got}");
    assert_eq!(got[0]["subsystem_device_id"]["data"], "16ca", "{got}");
    assert!(d.log().contains("took the identity"), "{}", d.log());
}

/// *(issue 28)* The re-claim after a replug: a bound GPU is unplugged,
/// another card goes into its slot (`Simulator1.Swap`) and is plugged. The
/// daemon would move a returning device to vfio-pci again; this one it
/// refuses, and the new card keeps its native driver, nothing written.
#[test]
fn a_card_swapped_while_unplugged_is_not_reclaimed() {
    const ADDR: &str = "0000:01:00.0";
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let host = gpu_with_subsystem(ADDR);
    let d = on_host(&bus, state.path(), &host);
    let reg = bus.manager("Register", &["ss", ADDR, "gpu"]).unwrap();
    let path = reg[0].as_str().unwrap().to_string();
    bus.manager("Bind", &["s", "gpu"]).unwrap();
    let mut signals = Signals::watch(&bus, Some(&path));
    bus.sim("Unplug", &["s", ADDR]);
    signals.wait_set(Some(&path), "Present", false);
    bus.sim("Swap", &["ss", ADDR, "10de:2236"]);
    let before = bus.writes().len();
    bus.sim("Plug", &["s", ADDR]);
    signals.wait_set(Some(&path), "Present", true);
    wait_until(|| d.log().contains("could not move the returning device"));
    assert!(
        d.log().contains("HardwareChanged") || d.log().contains("another card"),
        "{}",
        d.log()
    );
    assert_eq!(
        bus.writes()[before..],
        [] as [String; 0],
        "written after the plug"
    );
    assert_eq!(bus.host_driver(ADDR).as_deref(), Some("nvidia"));
    let got = bus.manager("Get", &["s", "gpu"]).unwrap();
    let why = got[0]["hardware_changed"]["data"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("10de:2236"), "{got}");
}
