//! systemd integration without systemd: the notify protocol over a datagram
//! socket the test binds, `systemd-analyze` on the shipped unit, and the
//! installed tree of `make install`.

use crate::common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Receives notify messages until `pred` holds for one, or the hang guard ends.
fn recv_until(
    sock: &UnixDatagram,
    mut pred: impl FnMut(&str) -> bool,
    all: &mut Vec<(Instant, String)>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            Instant::now() < deadline,
            "notify message never came; got {all:?}"
        );
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                all.push((Instant::now(), msg.clone()));
                if pred(&msg) {
                    return msg;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

#[test]
fn notify_ready_status_watchdog_stopping() {
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let sock_path = bus.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let f = fixture("l4.toml");
    let mut daemon = Proc {
        child: Daemon::command(&bus, state.path(), &["--simulate", f.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let mut all = Vec::new();

    let ready = recv_until(&sock, |m| m.contains("READY=1"), &mut all);
    // READY comes only once the name is owned: a call right now succeeds.
    assert!(
        bus.manager("List", &[]).is_ok(),
        "not callable right after READY"
    );
    assert!(
        ready.contains("STATUS=0 devices registered, 0 on vfio-pci, 0 attached"),
        "{ready}"
    );

    bus.manager("Register", &["ss", "0000:a2:00.0", "l4-gpu"])
        .unwrap();
    recv_until(
        &sock,
        |m| m.contains("STATUS=1 device registered, 0 on vfio-pci, 0 attached"),
        &mut all,
    );
    bus.manager("Attach", &["ss", "l4-gpu", "vm-1"]).unwrap();
    recv_until(
        &sock,
        |m| m.contains("STATUS=1 device registered, 1 on vfio-pci, 1 attached"),
        &mut all,
    );

    // WATCHDOG_USEC=200 ms: the daemon keeps pinging, on its own, with no
    // call to prompt it. Wait for ten pings (each wait bounded by the
    // socket's read timeout); how fast they came is printed, not judged.
    let start = Instant::now();
    for _ in 0..10 {
        recv_until(&sock, |m| m.contains("WATCHDOG=1"), &mut all);
    }
    eprintln!("10 watchdog pings in {:?} (period 100 ms)", start.elapsed());

    let t = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status();
    recv_until(&sock, |m| m.contains("STOPPING=1"), &mut all);
    // STOPPING came first, then the exit.
    let status = daemon.child.wait().unwrap();
    eprintln!("SIGTERM to exit: {:?}", t.elapsed());
    assert_eq!(status.code(), Some(0));
    assert!(!bus.has_owner(NAME));
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (apt-get install systemd)")
}

/// The unit with ExecStart pointed at the binary we built.
fn unit_for_tests(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("systemd/hypemand.service"))
        .unwrap()
        .replace("/usr/libexec/hypemand", &bin("hypemand"));
    let path = dir.join("hypemand.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_tests(dir.path());
    let out = analyze(&["verify", unit.to_str().unwrap()]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = analyze(&["security", "--offline=yes", unit.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .expect(&text);
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{text}");
}

#[test]
fn make_install_lays_out_a_tree_that_loads() {
    let dest = tempfile::tempdir().unwrap();
    let build_dir = Path::new(&bin("hypemand")).parent().unwrap().to_path_buf();
    let out = Command::new("make")
        .current_dir(root())
        .arg("install")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg(format!("BUILD_DIR={}", build_dir.display()))
        .output()
        .expect("make (apt-get install make)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dest.path();
    for (path, mode) in [
        ("usr/libexec/hypemand", 0o755),
        ("usr/bin/hypemanctl", 0o755),
        ("usr/libexec/hypeman-device-plugin", 0o755),
        ("usr/lib/systemd/system/hypemand.service", 0o644),
        ("usr/lib/systemd/system/hypemand-api.socket", 0o644),
        (
            "usr/lib/systemd/system/hypeman-device-plugin.service",
            0o644,
        ),
        ("usr/share/dbus-1/system.d/org.hypeman.Devices.conf", 0o644),
        (
            "usr/share/dbus-1/system-services/org.hypeman.Devices.service",
            0o644,
        ),
        (
            "usr/share/polkit-1/actions/org.hypeman.devices.policy",
            0o644,
        ),
        (
            "usr/share/polkit-1/rules.d/50-org.hypeman.devices.rules",
            0o644,
        ),
    ] {
        let meta = std::fs::metadata(d.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            mode,
            "{path}"
        );
    }

    // Every page hypemanctl(1) refers to exists.
    let man1 = d.join("usr/share/man/man1");
    let top = std::fs::read_to_string(man1.join("hypemanctl.1")).unwrap();
    for part in top.split("hypemanctl\\-").skip(1) {
        let sub = part.split('(').next().unwrap();
        assert!(
            man1.join(format!("hypemanctl-{sub}.1")).exists(),
            "hypemanctl(1) refers to hypemanctl-{sub}(1), which is not installed"
        );
    }
    assert!(
        top.contains("Exit status"),
        "hypemanctl(1) documents no exit status"
    );

    // The installed unit verifies, with ExecStart where the tree put it.
    let unit_text =
        std::fs::read_to_string(d.join("usr/lib/systemd/system/hypemand.service")).unwrap();
    assert!(unit_text.contains("ExecStart=/usr/libexec/hypemand"));
    let check = tempfile::tempdir().unwrap();
    let unit = check.path().join("hypemand.service");
    std::fs::write(
        &unit,
        unit_text.replace(
            "/usr/libexec/hypemand",
            d.join("usr/libexec/hypemand").to_str().unwrap(),
        ),
    )
    .unwrap();
    let out = analyze(&["verify", unit.to_str().unwrap()]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // dbus-daemon loads the installed policy, and finds the activation file.
    let conf = check.path().join("system.conf");
    let template = std::fs::read_to_string(root().join("tests/data/system.conf.in")).unwrap();
    std::fs::write(
        &conf,
        template
            .replace(
                "@LISTEN@",
                &format!("unix:path={}/bus", check.path().display()),
            )
            .replace(
                "@INCLUDES@",
                &format!(
                    "<include>{}</include><servicedir>{}</servicedir>",
                    d.join("usr/share/dbus-1/system.d/org.hypeman.Devices.conf")
                        .display(),
                    d.join("usr/share/dbus-1/system-services").display()
                ),
            ),
    )
    .unwrap();
    let mut bus = Proc {
        child: Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    };
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(bus.child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let address = line.trim().to_string();
    assert!(
        address.starts_with("unix:"),
        "dbus-daemon did not start with the installed files"
    );
    let out = Command::new("busctl")
        .arg(format!("--address={address}"))
        .args([
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ListActivatableNames",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("org.hypeman.Devices"),
        "{out:?}"
    );
    drop(bus);

    // And uninstall removes what install put there.
    let out = Command::new("make")
        .current_dir(root())
        .arg("uninstall")
        .arg(format!("DESTDIR={}", d.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!d.join("usr/libexec/hypemand").exists());
    assert!(!d
        .join("usr/share/polkit-1/actions/org.hypeman.devices.policy")
        .exists());
}

/// *(issue 19)* With `PREFIX=/usr/local` the binaries follow PREFIX, while the
/// bus policy, the activation file and the polkit files still go where the
/// system's dbus-daemon and polkitd read them (/usr/share).
#[test]
fn make_install_with_a_local_prefix_keeps_the_daemon_files_where_they_are_read() {
    let dest = tempfile::tempdir().unwrap();
    let build_dir = Path::new(&bin("hypemand")).parent().unwrap().to_path_buf();
    let out = Command::new("make")
        .current_dir(root())
        .arg("install")
        .arg("PREFIX=/usr/local")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg(format!("BUILD_DIR={}", build_dir.display()))
        .output()
        .expect("make");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dest.path();
    for path in [
        "usr/local/libexec/hypemand",
        "usr/local/bin/hypemanctl",
        "usr/share/dbus-1/system.d/org.hypeman.Devices.conf",
        "usr/share/dbus-1/system-services/org.hypeman.Devices.service",
        "usr/share/polkit-1/actions/org.hypeman.devices.policy",
        "usr/share/polkit-1/rules.d/50-org.hypeman.devices.rules",
    ] {
        assert!(d.join(path).exists(), "{path} is missing");
    }
    let activation = std::fs::read_to_string(
        d.join("usr/share/dbus-1/system-services/org.hypeman.Devices.service"),
    )
    .unwrap();
    assert!(
        activation.contains("Exec=/usr/local/libexec/hypemand"),
        "{activation}"
    );
    assert!(!d.join("usr/local/share/dbus-1").exists());
}

/// Starts the daemon with `args` on a notify socket of its own; the daemon
/// (stopped by pid when dropped) and its READY message.
fn ready_message(bus: &TestBus, state: &Path, args: &[&str]) -> (Proc, String) {
    // The bus's directory is the test's own.
    let sock_path = bus.dir.path().join("notify-ready.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let daemon = Proc {
        child: Daemon::command(bus, state, args)
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let ready = recv_until(&sock, |m| m.contains("READY=1"), &mut Vec::new());
    (daemon, ready)
}

/// *(issue 28)* A kernel booted with `pcie_acs_override=`: systemd's status
/// line says the IOMMU groups are not isolation boundaries, from READY on.
#[test]
fn the_status_line_says_the_acs_override() {
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let host = state.path().join("host.toml");
    let l4 = std::fs::read_to_string(fixture("l4.toml")).unwrap();
    std::fs::write(
        &host,
        format!("kernel_cmdline = \"ro pcie_acs_override=downstream,multifunction\"\n{l4}"),
    )
    .unwrap();
    let (_daemon, ready) =
        ready_message(&bus, state.path(), &["--simulate", host.to_str().unwrap()]);
    assert!(
        ready.contains(
            "STATUS=0 devices registered, 0 on vfio-pci, 0 attached; pcie_acs_override= is set: IOMMU groups are not isolation boundaries"
        ),
        "{ready}"
    );
}

/// *(issue 28)* A registered function already on a variant of vfio-pci at
/// start-up (no `vfio-dev/` to prove it) is counted on the status line:
/// the kernel's table of variants is read before the host is enumerated.
#[test]
fn a_function_on_a_variant_at_start_is_counted_on_vfio() {
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let host = state.path().join("host.toml");
    let gh = std::fs::read_to_string(fixture("grace-hopper.toml")).unwrap();
    std::fs::write(&host, gh.replace("vfio_cdev = true\n", "")).unwrap();
    let args = ["--simulate", host.to_str().unwrap()];
    let mut first = Daemon::start(&bus, state.path(), &args);
    bus.manager("Register", &["ss", "0009:02:00.1", "cx7-vf"])
        .unwrap();
    assert!(first.proc.signal_and_wait("TERM").success());

    let (_daemon, ready) = ready_message(&bus, state.path(), &args);
    assert!(
        ready.contains("STATUS=1 device registered, 1 on vfio-pci, 0 attached"),
        "{ready}"
    );
}
