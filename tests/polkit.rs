//! Authorization against the real polkitd on a private bus: who may change
//! what, what happens when polkitd is slow or gone, and whether the shipped
//! policy, rule and bus configuration load.
//!
//! The tests of this file share the `hypeman` group, so they run one at a time.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const DEV: &str = "org.hypeman.Device1";

fn shipped_rule() -> String {
    std::fs::read_to_string(root().join("polkit/50-org.hypeman.devices.rules")).unwrap()
}

/// A rule refusing `no` everything, and taking 2 s over `slow`'s checks; a
/// slow check first creates `started` (in a directory polkitd may write), so
/// a test can wait for the moment the rule runs.
fn test_rule(no: &str, slow: &str, started: &Path) -> String {
    format!(
        r#"polkit.addRule(function(action, subject) {{
    if (action.id.indexOf("org.hypeman.devices.") !== 0) return;
    if (subject.user == "{no}") return polkit.Result.NO;
    if (subject.user == "{slow}") {{ polkit.spawn(["/bin/sh", "-c", "touch {started}; sleep 2"]); return polkit.Result.YES; }}
}});
"#,
        started = started.display()
    )
}

/// `gdbus call` as `user` (root when `None`), with or without interaction.
fn call(
    bus: &TestBus,
    user: Option<&str>,
    interactive: bool,
    path: &str,
    method: &str,
    args: &[&str],
) -> Output {
    let mut cmd = match user {
        Some(u) => as_user(u, "gdbus"),
        None => Command::new("gdbus"),
    };
    cmd.args([
        "call",
        "--address",
        &bus.address,
        "--dest",
        NAME,
        "--object-path",
        path,
        "--method",
        method,
    ]);
    if interactive {
        cmd.arg("--interactive");
    }
    cmd.args(args).output().expect("gdbus")
}

/// "ok" or the last component of the error name.
fn outcome(out: &Output) -> String {
    if out.status.success() {
        return "ok".into();
    }
    let name = gdbus_error_name(out);
    match name.rsplit_once('.') {
        Some((_, short)) => short.to_string(),
        None => format!("?{}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// A non-interactive manager call as `user` (root when `None`) that must
/// succeed; how long it took.
fn succeeds_in(bus: &TestBus, user: Option<&str>, method: &str, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = call(bus, user, false, PATH, &m(method), args);
    let took = t.elapsed();
    assert_eq!(outcome(&out), "ok", "{method}: {out:?}");
    took
}

fn object_path(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("'/org/hypeman/Devices/")
        .expect("object path in reply")
        + 1;
    let end = text[start..].find('\'').unwrap() + start;
    text[start..end].to_string()
}

/// `call` that must succeed; its stderr when it does not.
fn ok_call(
    bus: &TestBus,
    user: Option<&str>,
    interactive: bool,
    path: &str,
    method: &str,
    args: &[&str],
) {
    let out = call(bus, user, interactive, path, method, args);
    assert!(
        out.status.success(),
        "{method} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn m(method: &str) -> String {
    format!("{IFACE}.{method}")
}

fn d(method: &str) -> String {
    format!("{DEV}.{method}")
}

/// The whole observable state: the registry and every host driver.
fn snapshot(bus: &TestBus) -> (serde_json::Value, serde_json::Value) {
    (
        bus.manager("List", &[]).unwrap(),
        bus.manager("ListAvailable", &[]).unwrap(),
    )
}

#[test]
fn authorization_matrix() {
    let _s = serial();
    let users = TestUsers::create(&["adm", "plain", "no"], &["adm"], "hypeman");
    let (adm, plain, no) = (&users.names[0], &users.names[1], &users.names[2]);
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(
        &bus,
        &[
            ("50-org.hypeman.devices.rules", shipped_rule()),
            (
                "10-test.rules",
                test_rule(no, "nobody", Path::new("/nonexistent")),
            ),
        ],
    );
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "l4.toml");

    // Callers who may: every change succeeds, on the manager and on the object.
    for user in [None, Some(adm.as_str())] {
        let who = user.unwrap_or("root");
        let name = format!("nic-{who}");
        let reg = call(
            &bus,
            user,
            false,
            PATH,
            &m("Register"),
            &["0000:3b:00.0", &name],
        );
        assert_eq!(outcome(&reg), "ok", "{who} Register: {reg:?}");
        for (method, args) in [
            ("Bind", vec![name.as_str()]),
            ("Attach", vec![name.as_str(), "vm-1"]),
            ("Detach", vec![name.as_str()]),
            ("Unbind", vec![name.as_str()]),
            ("Delete", vec![name.as_str()]),
        ] {
            let out = call(&bus, user, false, PATH, &m(method), &args);
            assert_eq!(outcome(&out), "ok", "{who} {method}: {out:?}");
        }
        let reg = call(
            &bus,
            user,
            false,
            PATH,
            &m("Register"),
            &["0000:3b:00.0", &name],
        );
        let path = object_path(&reg);
        for (method, args) in [
            ("Bind", vec![]),
            ("Attach", vec!["vm-2"]),
            ("Detach", vec![]),
            ("Unbind", vec![]),
            ("Delete", vec![]),
        ] {
            let out = call(&bus, user, false, &path, &d(method), &args);
            assert_eq!(outcome(&out), "ok", "{who} object {method}: {out:?}");
        }
        assert_eq!(bus.host_driver("0000:3b:00.0").as_deref(), Some("i40e"));
    }

    // Callers who may not: every change is refused and changes nothing.
    let victim = bus
        .manager("Register", &["ss", "0000:a2:00.0", "victim"])
        .unwrap();
    let victim_path = victim[0].as_str().unwrap().to_string();
    let before = snapshot(&bus);
    let cases: [(&str, bool, &str); 4] = [
        (plain, false, "InteractiveAuthorizationRequired"),
        (plain, true, "AccessDenied"),
        (no, false, "AccessDenied"),
        (no, true, "AccessDenied"),
    ];
    for (user, interactive, want) in cases {
        let cells: Vec<(String, &str, Vec<&str>)> = vec![
            (m("Register"), PATH, vec!["0000:5e:00.0", "nvme"]),
            (m("Bind"), PATH, vec!["victim"]),
            (m("Unbind"), PATH, vec!["victim"]),
            (m("Attach"), PATH, vec!["victim", "vm-1"]),
            (m("Detach"), PATH, vec!["victim"]),
            (m("Delete"), PATH, vec!["victim"]),
            (d("Bind"), &victim_path, vec![]),
            (d("Unbind"), &victim_path, vec![]),
            (d("Attach"), &victim_path, vec!["vm-1"]),
            (d("Detach"), &victim_path, vec![]),
            (d("Delete"), &victim_path, vec![]),
        ];
        for (method, path, args) in cells {
            let out = call(&bus, Some(user), interactive, path, &method, &args);
            assert_eq!(
                outcome(&out),
                want,
                "{user} (interactive {interactive}) {method}: {out:?}"
            );
        }
        assert_eq!(snapshot(&bus), before, "a refused call changed something");
    }
    // The messages say what to do.
    let out = call(&bus, Some(plain), false, PATH, &m("Bind"), &["victim"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--allow-interactive"),
        "{out:?}"
    );

    // Reads need nothing, for everyone.
    for user in [
        None,
        Some(adm.as_str()),
        Some(plain.as_str()),
        Some(no.as_str()),
    ] {
        for (path, method, args) in [
            (PATH, m("List"), vec![]),
            (PATH, m("Get"), vec!["victim"]),
            (PATH, m("ListAvailable"), vec![]),
            (
                PATH,
                "org.freedesktop.DBus.ObjectManager.GetManagedObjects".to_string(),
                vec![],
            ),
            (
                PATH,
                "org.freedesktop.DBus.Introspectable.Introspect".to_string(),
                vec![],
            ),
            (
                victim_path.as_str(),
                "org.freedesktop.DBus.Properties.Get".to_string(),
                vec![DEV, "Driver"],
            ),
            (
                victim_path.as_str(),
                "org.freedesktop.DBus.Properties.GetAll".to_string(),
                vec![DEV],
            ),
            (PATH, "org.freedesktop.DBus.Peer.Ping".to_string(), vec![]),
        ] {
            let out = call(&bus, user, false, path, &method, &args);
            assert_eq!(outcome(&out), "ok", "{user:?} {method}: {out:?}");
        }
    }
}

#[test]
fn a_slow_rule_blocks_no_reads_and_every_change_completes() {
    let _s = serial();
    let users = TestUsers::create(&["adm", "slow"], &["adm"], "hypeman");
    let (adm, slow) = (&users.names[0], &users.names[1]);
    let bus = TestBus::start_polkit();
    let marks = tempfile::tempdir().unwrap();
    std::fs::set_permissions(marks.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let started = marks.path().join("slow-rule-started");
    let _pk = Polkitd::start(
        &bus,
        &[
            ("50-org.hypeman.devices.rules", shipped_rule()),
            ("10-test.rules", test_rule("nobody", slow, &started)),
        ],
    );
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "l4.toml");
    bus.manager("Register", &["ss", "0000:a2:00.0", "l4-gpu"])
        .unwrap();

    let mut waiting = Proc {
        child: as_user(slow, "gdbus")
            .args([
                "call",
                "--address",
                &bus.address,
                "--dest",
                NAME,
                "--object-path",
                PATH,
            ])
            .args(["--method", &m("Register"), "0000:3b:00.0", "slow-nic"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    // The slow caller's check has reached polkitd when its rule starts.
    wait_until(|| started.exists());

    // Root's Get needs no authorization: hypemand answers it while polkitd is
    // still busy with someone else's check.
    let get_took = succeeds_in(&bus, None, "Get", &["l4-gpu"]);
    assert!(
        waiting.child.try_wait().unwrap().is_none(),
        "the slow caller finished before root's Get was answered ({get_took:?})"
    );

    // Changes by anyone else, root included, are checked by polkitd too, and
    // polkitd 122 runs its JavaScript rules one at a time on its main loop: a
    // second check waits inside polkitd until the sleeping rule returns. That
    // is polkitd's queue, not hypemand's, so here the calls are only required
    // to succeed; `a_caller_at_a_password_prompt_delays_nobody_else` shows
    // hypemand itself holds nobody up while a check is outstanding.
    let adm_took = succeeds_in(&bus, Some(adm), "Register", &["0000:5e:00.0", "nvme"]);
    let root_took = succeeds_in(&bus, None, "Bind", &["nvme"]);
    eprintln!(
        "during a 2 s polkit rule: root's Get {get_took:?}, a group member's Register {adm_took:?}, root's Bind after it {root_took:?}"
    );
    assert!(
        waiting.child.wait().unwrap().success(),
        "the slow caller is granted in the end"
    );
}

#[test]
fn without_polkitd_only_root_may_change() {
    let _s = serial();
    let users = TestUsers::create(&["plain", "adm"], &["adm"], "hypeman");
    let (plain, adm) = (&users.names[0], &users.names[1]);
    let bus = TestBus::start_polkit();
    let pk = Polkitd::start(&bus, &[("50-org.hypeman.devices.rules", shipped_rule())]);
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "l4.toml");
    assert_eq!(
        outcome(&call(
            &bus,
            Some(adm),
            false,
            PATH,
            &m("Register"),
            &["0000:5e:00.0", "nvme"]
        )),
        "ok"
    );

    // polkitd goes away mid-run.
    drop(pk);
    wait_name(&bus, "org.freedesktop.PolicyKit1", false, None);
    let out = call(
        &bus,
        Some(plain),
        false,
        PATH,
        &m("Register"),
        &["0000:3b:00.0", "nic"],
    );
    assert_eq!(outcome(&out), "AccessDenied", "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("polkit is unavailable"),
        "{out:?}"
    );
    let out = call(&bus, Some(adm), false, PATH, &m("Delete"), &["nvme"]);
    assert_eq!(
        outcome(&out),
        "AccessDenied",
        "group members need polkit too: {out:?}"
    );
    assert_eq!(
        outcome(&call(
            &bus,
            None,
            false,
            PATH,
            &m("Register"),
            &["0000:3b:00.0", "nic"]
        )),
        "ok"
    );
    assert_eq!(
        outcome(&call(&bus, None, false, PATH, &m("Bind"), &["nic"])),
        "ok"
    );
    assert_eq!(
        outcome(&call(&bus, Some(plain), false, PATH, &m("Get"), &["nic"])),
        "ok"
    );
}

#[test]
fn shipped_policy_and_bus_config_load() {
    let _s = serial();
    let users = TestUsers::create(&["plain"], &[], "hypeman");
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(&bus, &[("50-org.hypeman.devices.rules", shipped_rule())]);

    for (action, implicit) in [
        ("org.hypeman.devices.register", "auth_admin"),
        ("org.hypeman.devices.delete", "auth_admin"),
        ("org.hypeman.devices.bind", "auth_admin"),
        ("org.hypeman.devices.attach", "auth_admin_keep"),
    ] {
        let out = Command::new("pkaction")
            .args(["--verbose", "--action-id", action])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("implicit active:   {implicit}")),
            "{action}: {text}"
        );
        assert!(text.contains("Authentication is required"), "{text}");
    }

    // dbus-daemon loaded the project's bus configuration without a complaint
    // (the one line about the fd limit is the container's, not ours).
    let complaints: Vec<String> = bus
        .log()
        .lines()
        .filter(|l| !l.contains("Failed to set fd limit"))
        .map(str::to_string)
        .collect();
    assert!(complaints.is_empty(), "dbus-daemon said: {complaints:?}");

    // A non-root process cannot own org.hypeman.Devices.
    let state = tempfile::tempdir().unwrap();
    let st = Command::new("chown")
        .arg(&users.names[0])
        .arg(state.path())
        .status()
        .unwrap();
    assert!(st.success());
    let f = fixture("l4.toml");
    let out = as_user(&users.names[0], &bin("hypemand"))
        .arg(format!("--bus={}", bus.address))
        .arg(format!("--state-dir={}", state.path().display()))
        .args(["--simulate", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not allowed to own") || err.contains("AccessDenied"),
        "{err}"
    );
    assert!(!bus.has_owner(NAME));
}

/// A caller interrupted by a password prompt: its check is outstanding in
/// polkitd (which is free meanwhile), for as long as the person takes.
struct Prompt {
    caller: Proc,
    script: Proc,
    agent_pid: Option<u32>,
}

impl Prompt {
    /// `user` calls `Register` with interactive authorization, and a text
    /// agent (`pkttyagent` on a pseudo-terminal from `script`) registered for
    /// that very process shows the password prompt, which nobody answers.
    /// `None` when the agent was not registered in time (the caller was told
    /// no agent exists); the caller tries again then.
    fn start(bus: &TestBus, user: &str, dir: &std::path::Path) -> Option<Prompt> {
        Self::start_call(
            bus,
            user,
            dir,
            &m("Register"),
            &["0000:3b:00.0", "prompted-nic"],
            false,
        )
    }

    /// `user` calls `method` with `args` interactively, at a prompt nobody
    /// has answered yet. With `answerable`, the agent runs where its setuid
    /// helper finds the test bus at the system bus's path (a private mount
    /// namespace), so a password typed into the prompt reaches polkitd.
    fn start_call(
        bus: &TestBus,
        user: &str,
        dir: &std::path::Path,
        method: &str,
        args: &[&str],
        answerable: bool,
    ) -> Option<Prompt> {
        let go = dir.join("go");
        let typescript = dir.join("typescript");
        let agent_pid = dir.join("agent.pid");
        let registered = dir.join("registered");
        for f in [&go, &typescript, &agent_pid, &registered] {
            let _ = std::fs::remove_file(f);
        }
        // pkttyagent closes its --notify-fd once registered: a FIFO turns
        // that into an end of file the test can wait for.
        assert!(Command::new("mkfifo")
            .arg(&registered)
            .status()
            .unwrap()
            .success());
        let caller = Proc {
            child: as_user(user, "sh")
                .args([
                    "-c",
                    &format!(
                        "while [ ! -e {go} ]; do sleep 0.02; done; exec gdbus call --address {addr} --dest {NAME} --object-path {PATH} --interactive --method {method} {args}",
                        go = go.display(),
                        addr = bus.address,
                        args = args.join(" "),
                    ),
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("caller.err")).unwrap())
                .spawn()
                .unwrap(),
        };
        let agent = format!(
            "echo $$ > {pidfile}; exec pkttyagent --process {pid} --notify-fd 3 3>{registered}",
            pidfile = agent_pid.display(),
            pid = caller.pid(),
            registered = registered.display()
        );
        let agent = if answerable {
            let socket = bus.address.trim_start_matches("unix:path=");
            let socket = socket.split(',').next().unwrap_or(socket);
            format!(
                "mount -t tmpfs none /run && mkdir /run/dbus && touch /run/dbus/system_bus_socket && \
                 mount --bind {socket} /run/dbus/system_bus_socket && {agent}"
            )
        } else {
            agent
        };
        let mut script_cmd = if answerable {
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "script"]);
            c
        } else {
            Command::new("script")
        };
        let script = Proc {
            child: script_cmd
                .args(["-q", "-f", "-c", &agent])
                .arg(&typescript)
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        };
        let mut p = Prompt {
            caller,
            script,
            agent_pid: None,
        };
        wait_until(|| {
            std::fs::read_to_string(&agent_pid).is_ok_and(|s| s.trim().parse::<u32>().is_ok())
        });
        p.agent_pid = std::fs::read_to_string(&agent_pid)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        // Wait for the registration (or the agent's exit: end of file too),
        // in a thread so that the wait is bounded.
        let (done, registered_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut sink = Vec::new();
            let r = std::fs::File::open(&registered).and_then(|mut f| f.read_to_end(&mut sink));
            let _ = done.send(r.is_ok());
        });
        if registered_rx.recv_timeout(Duration::from_secs(20)) != Ok(true) {
            return None;
        }
        std::fs::write(&go, b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let shown = std::fs::read_to_string(&typescript).unwrap_or_default();
            if shown.contains("AUTHENTICATING FOR") {
                return Some(p);
            }
            if p.caller.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Prompt {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        // `script` and the caller are stopped by their own `Proc` guards.
    }
}

#[test]
fn a_caller_at_a_password_prompt_delays_nobody_else() {
    let _s = serial();
    let users = TestUsers::create(&["prompt", "adm"], &["adm"], "hypeman");
    let (prompted, adm) = (&users.names[0], &users.names[1]);
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(&bus, &[("50-org.hypeman.devices.rules", shipped_rule())]);
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "l4.toml");
    bus.manager("Register", &["ss", "0000:a2:00.0", "l4-gpu"])
        .unwrap();

    let work = tempfile::tempdir().unwrap();
    let mut prompt = None;
    for _ in 1..=3 {
        prompt = Prompt::start(&bus, prompted, work.path());
        if prompt.is_some() {
            break;
        }
    }
    let mut prompt = prompt.expect("pkttyagent never showed the password prompt");

    // While that check is outstanding, another user's change (granted by the
    // shipped group rule) and root's read and change go straight through.
    let adm_took = succeeds_in(&bus, Some(adm), "Register", &["0000:5e:00.0", "nvme"]);
    let get_took = succeeds_in(&bus, None, "Get", &["l4-gpu"]);
    let bind_took = succeeds_in(&bus, None, "Bind", &["nvme"]);
    eprintln!(
        "at a password prompt: a group member's Register {adm_took:?}, root's Get {get_took:?}, root's Bind {bind_took:?}"
    );
    // The order is the assertion: all three were answered while the
    // prompted caller was still waiting for its password.
    assert!(
        prompt.caller.child.try_wait().unwrap().is_none(),
        "the prompted caller stopped waiting before the others were answered"
    );

    // Nobody types the password: the agent goes away, polkitd gives up and
    // the prompted caller is refused; its device was never registered.
    if let Some(pid) = prompt.agent_pid.take() {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    let status = prompt.caller.child.wait().unwrap();
    assert!(
        !status.success(),
        "the unanswered prompt must not authorize"
    );
    assert!(bus.manager("Get", &["s", "prompted-nic"]).is_err());
}

/// *(issue 13)* One plain user keeps 400 Registers in flight, from 4
/// connections (each check rides hypemand's one bus connection, which the bus
/// allows 128 outstanding calls). Meanwhile a `hypeman`-group member's 10
/// Registers all succeed: the flood gets `Busy` beyond its share, never a
/// denial for everyone, and the log says so once, not per call. Before, the
/// bus's `LimitsExceeded` counted as "polkit unavailable" and everyone but
/// root was refused.
#[test]
fn a_flood_from_one_user_does_not_deny_another() {
    let _s = serial();
    let users = TestUsers::create(&["flood", "adm"], &["adm"], "hypeman");
    let (flood, adm) = (&users.names[0], &users.names[1]);
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(&bus, &[("50-org.hypeman.devices.rules", shipped_rule())]);
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::simulate(&bus, state.path(), "l4.toml");

    let marks = tempfile::tempdir().unwrap();
    std::fs::set_permissions(marks.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let started = marks.path().join("flooding");
    let script = root().join("tests/data/flood.py");
    let err = marks.path().join("flood.err");
    let mut flooder = Proc {
        child: as_user(flood, "/usr/bin/python3")
            .arg(&script)
            .args([bus.address.as_str(), "400", "4"])
            .arg(&started)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    };
    wait_until(|| {
        if let Ok(Some(st)) = flooder.child.try_wait() {
            panic!(
                "the flood stopped ({st}): {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        started.exists()
    });

    for i in 0..10 {
        let name = format!("nvme-{i}");
        let out = call(
            &bus,
            Some(adm),
            false,
            PATH,
            &m("Register"),
            &["0000:5e:00.0", &name],
        );
        assert!(
            out.status.success(),
            "Register {i} during the flood: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = call(&bus, Some(adm), false, PATH, &m("Delete"), &[&name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = flooder.signal_and_wait("TERM");
    let answered = std::fs::read_to_string(&err).unwrap_or_default();
    eprintln!("the flood was answered ({status}): {}", answered.trim());
    assert!(
        !answered.contains("AccessDenied"),
        "the flood itself was denied rather than told to wait: {answered}"
    );

    let log = d.log();
    let unavailable = log.matches("polkitd is not running").count();
    let floods = log
        .matches("too many authorization checks in flight")
        .count();
    let transient = log.matches("polkit could not answer a check").count();
    eprintln!(
        "log lines during the flood: not-running {unavailable}, flood {floods}, transient {transient}"
    );
    assert_eq!(unavailable, 0, "polkitd was there all along");
    assert!(floods <= 2, "the flood was logged {floods} times");
    assert!(
        transient <= 1,
        "transient failures logged {transient} times"
    );
}

/// *(issue 13)* Check-then-act: a caller at a password prompt for Bind of
/// its device re-points the name (deletes the device, registers an address a
/// rule forbids it under the same name), then answers the prompt. polkit
/// grants the Bind it was asked about; the daemon must act on that record
/// only, so the forbidden device is never touched. Before, the name was
/// resolved again after the check and the forbidden device was bound.
#[test]
fn a_name_re_pointed_during_the_check_does_not_redirect_the_bind() {
    let _s = serial();
    let users = TestUsers::create(&["swap"], &[], "hypeman");
    let user = &users.names[0];
    let password = "Hyp3man-test-pw";
    let mut chpasswd = Command::new("chpasswd")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = chpasswd.stdin.take().unwrap();
        writeln!(stdin, "{user}:{password}").unwrap();
    }
    assert!(chpasswd.wait().unwrap().success());
    let forbidden = "0000:a2:00.0";
    let rule = format!(
        r#"polkit.addRule(function(action, subject) {{
    if (action.id.indexOf("org.hypeman.devices.") !== 0 || subject.user != "{user}") return;
    if (action.id == "org.hypeman.devices.register" || action.id == "org.hypeman.devices.delete") return polkit.Result.YES;
    if (action.id == "org.hypeman.devices.bind") {{
        if (action.lookup("pci_address") == "{forbidden}") return polkit.Result.NO;
        return polkit.Result.AUTH_SELF;
    }}
}});
"#
    );
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(&bus, &[("10-test.rules", rule)]);
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "l4.toml");
    ok_call(
        &bus,
        Some(user),
        false,
        PATH,
        &m("Register"),
        &["0000:3b:00.0", "dev"],
    );
    // The rule does forbid the address to this user.
    ok_call(
        &bus,
        Some(user),
        false,
        PATH,
        &m("Register"),
        &[forbidden, "probe"],
    );
    let out = call(&bus, Some(user), true, PATH, &m("Bind"), &["probe"]);
    assert!(
        !out.status.success(),
        "the rule must forbid binding {forbidden}"
    );
    ok_call(&bus, Some(user), false, PATH, &m("Delete"), &["probe"]);

    let work = tempfile::tempdir().unwrap();
    let mut prompt = None;
    for _ in 1..=3 {
        prompt = Prompt::start_call(&bus, user, work.path(), &m("Bind"), &["dev"], true);
        if prompt.is_some() {
            break;
        }
    }
    let mut prompt = prompt.expect("pkttyagent never showed the password prompt");

    // At the prompt: the name now points at the forbidden address.
    ok_call(&bus, Some(user), false, PATH, &m("Delete"), &["dev"]);
    ok_call(
        &bus,
        Some(user),
        false,
        PATH,
        &m("Register"),
        &[forbidden, "dev"],
    );

    // The password: polkit grants the Bind it was asked about (0000:3b:00.0).
    {
        use std::io::Write;
        let stdin = prompt.script.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{password}").unwrap();
        stdin.flush().unwrap();
    }
    let status = prompt.caller.child.wait().unwrap();
    let err = std::fs::read_to_string(work.path().join("caller.err")).unwrap_or_default();
    let typescript = std::fs::read_to_string(work.path().join("typescript")).unwrap_or_default();
    assert!(
        !status.success(),
        "the Bind succeeded; typescript:\n{typescript}"
    );
    assert!(
        err.contains("NotFound") && err.contains("deleted meanwhile"),
        "{err}\ntypescript:\n{typescript}"
    );
    let got = bus.manager("Get", &["s", "dev"]).unwrap();
    assert_eq!(got[0]["pci_address"]["data"], forbidden);
    assert_eq!(got[0]["bound_to_vfio"]["data"], false, "{got}");
}

/// *(issue 13)* A caller that leaves the bus while its check waits at a
/// password prompt: hypemand cancels the check at polkitd (polkitd accepts
/// the cancellation), and nothing is registered.
#[test]
fn a_check_is_cancelled_when_the_caller_leaves() {
    let _s = serial();
    let users = TestUsers::create(&["leaver"], &[], "hypeman");
    let user = &users.names[0];
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(&bus, &[("50-org.hypeman.devices.rules", shipped_rule())]);
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::simulate(&bus, state.path(), "l4.toml");
    let work = tempfile::tempdir().unwrap();
    let mut prompt = None;
    for _ in 1..=3 {
        prompt = Prompt::start(&bus, user, work.path());
        if prompt.is_some() {
            break;
        }
    }
    let mut prompt = prompt.expect("pkttyagent never showed the password prompt");
    // The caller goes away (stopped by its pid) with its check outstanding.
    let status = prompt.caller.signal_and_wait("KILL");
    assert!(!status.success());
    wait_until(|| d.log().contains("authorization check cancelled at polkitd"));
    assert!(d.log().contains("the caller left the bus"), "{}", d.log());
    let list = bus.manager("List", &[]).unwrap();
    assert!(list[0].as_array().unwrap().is_empty(), "{list}");
}

/// *(issue 14)* Forcing is its own authorization: the shipped rule lets group
/// `hypeman` bind but not force, so a member's forced Bind is refused and
/// changes nothing; a rule that grants `org.hypeman.devices.force` lets the
/// forced Bind through. Neither overrides a hard blocker.
#[test]
fn forcing_needs_its_own_grant() {
    let _s = serial();
    let users = TestUsers::create(&["member", "forcer"], &["member", "forcer"], "hypeman");
    let (member, forcer) = (&users.names[0], &users.names[1]);
    let grant = format!(
        r#"polkit.addRule(function(action, subject) {{
    if (action.id == "org.hypeman.devices.force" && subject.user == "{forcer}") return polkit.Result.YES;
}});
"#
    );
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(
        &bus,
        &[
            ("50-org.hypeman.devices.rules", shipped_rule()),
            ("10-force.rules", grant),
        ],
    );
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "workstation.toml");
    // The data drive a benchmark holds open (open-by).
    ok_call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("Register"),
        &["0000:03:00.0", "data"],
    );
    let before = snapshot(&bus);
    let force = "{'force': <true>}";

    // Bind is granted to the member, but the host is using the drive.
    let out = call(&bus, Some(member), false, PATH, &m("Bind"), &["data"]);
    assert_eq!(outcome(&out), "HostInUse", "{out:?}");
    // Forcing is not granted to the member: refused, nothing changed.
    let out = call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("BindWithOptions"),
        &["data", force],
    );
    assert_eq!(outcome(&out), "InteractiveAuthorizationRequired", "{out:?}");
    let out = call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("AttachWithOptions"),
        &["data", "vm-1", force],
    );
    assert_eq!(outcome(&out), "InteractiveAuthorizationRequired", "{out:?}");
    assert_eq!(snapshot(&bus), before);

    // Granted: the forced Bind goes through.
    ok_call(
        &bus,
        Some(forcer),
        false,
        PATH,
        &m("BindWithOptions"),
        &["data", force],
    );
    assert_eq!(bus.host_driver("0000:03:00.0").as_deref(), Some("vfio-pci"));
}

/// *(issue 26)* SetVirtualFunctions is `org.hypeman.devices.partition`,
/// asked about the physical function: the shipped rule grants it to group
/// `hypeman`, anyone else gets polkit's `auth_admin` (a password they did
/// not allow to be asked for) and nothing changes; a rule can grant it for
/// one device by its address.
#[test]
fn partitioning_is_its_own_action() {
    let _s = serial();
    let users = TestUsers::create(&["member", "outsider"], &["member"], "hypeman");
    let (member, outsider) = (&users.names[0], &users.names[1]);
    // One device by address: the outsider may partition the X710, nothing else.
    let one = format!(
        r#"polkit.addRule(function(action, subject) {{
    if (action.id == "org.hypeman.devices.partition" && subject.user == "{outsider}" &&
        action.lookup("pci_address") == "0000:3b:00.0" && action.lookup("device_id") == "8086:1572") return polkit.Result.YES;
}});
"#
    );
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(
        &bus,
        &[
            ("50-org.hypeman.devices.rules", shipped_rule()),
            ("10-one-device.rules", one),
        ],
    );
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "sriov-nic.toml");
    let out = call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("Register"),
        &["0000:3b:00.0", "x710"],
    );
    assert_eq!(outcome(&out), "ok", "{out:?}");
    let pf = object_path(&out);
    ok_call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("Register"),
        &["0000:3b:02.0", "vf0"],
    );
    let before = snapshot(&bus);
    // The outsider may not register, and may partition only the X710: the
    // virtual function (an SR-IOV-less function, refused by the daemon only
    // once authorized) is asked about with its own address and refused.
    let out = call(
        &bus,
        Some(outsider),
        false,
        PATH,
        &m("SetVirtualFunctions"),
        &["vf0", "1"],
    );
    assert_eq!(outcome(&out), "InteractiveAuthorizationRequired", "{out:?}");
    assert_eq!(snapshot(&bus), before);
    ok_call(
        &bus,
        Some(outsider),
        false,
        &pf,
        &d("SetVirtualFunctions"),
        &["3"],
    );
    // The member, through the shipped rule.
    ok_call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("SetVirtualFunctions"),
        &["x710", "1"],
    );
    let get = bus.manager("Get", &["s", "x710"]).unwrap();
    assert_eq!(get[0]["sriov_vfs"]["data"], 1, "{get}");
}

/// *(issue 26)* CreateVgpu and DeleteVgpu are `org.hypeman.devices.partition`
/// too, asked about the GPU placement chose: a member of `hypeman` makes and
/// deletes one; anyone else is refused before anything is claimed or
/// written.
#[test]
fn vgpus_need_the_partition_action() {
    let _s = serial();
    let users = TestUsers::create(&["member", "outsider"], &["member"], "hypeman");
    let (member, outsider) = (&users.names[0], &users.names[1]);
    let bus = TestBus::start_polkit();
    let _pk = Polkitd::start(&bus, &[("50-org.hypeman.devices.rules", shipped_rule())]);
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::simulate(&bus, state.path(), "l40s-vgpu.toml");
    ok_call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("Register"),
        &["0000:41:00.0", "l40s"],
    );
    ok_call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("SetVirtualFunctions"),
        &["l40s", "2"],
    );
    let request = "{'profile': <'NVIDIA L40S-4Q'>}";
    let out = call(
        &bus,
        Some(outsider),
        false,
        PATH,
        &m("CreateVgpu"),
        &[request],
    );
    assert_eq!(outcome(&out), "InteractiveAuthorizationRequired", "{out:?}");
    assert_eq!(
        bus.manager("ListVgpus", &[]).unwrap()[0],
        serde_json::json!([])
    );
    let out = call(
        &bus,
        Some(member),
        false,
        PATH,
        &m("CreateVgpu"),
        &[request],
    );
    assert_eq!(outcome(&out), "ok", "{out:?}");
    let made = bus.manager("ListVgpus", &[]).unwrap();
    let id = made[0][0]["id"]["data"].as_str().unwrap().to_string();
    let out = call(&bus, Some(outsider), false, PATH, &m("DeleteVgpu"), &[&id]);
    assert_eq!(outcome(&out), "InteractiveAuthorizationRequired", "{out:?}");
    ok_call(&bus, Some(member), false, PATH, &m("DeleteVgpu"), &[&id]);
    assert_eq!(
        bus.manager("ListVgpus", &[]).unwrap()[0],
        serde_json::json!([])
    );
}
