//! Shared pieces of the end-to-end tests: a private system-type `dbus-daemon`
//! with the project's bus policy, the real `hypemand`, and the real clients
//! (`busctl`, `gdbus`, `hypemanctl`). Every process started here is stopped by
//! pid when its guard drops, on success and on panic alike.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod signals;
mod systemd;
mod tree;
pub use signals::{wait_name, Signal, Signals};
pub use systemd::FakeSystemd;
pub use tree::{Function, SysfsTree};

pub const NAME: &str = "org.hypeman.Devices";
pub const PATH: &str = "/org/hypeman/Devices";
pub const IFACE: &str = "org.hypeman.Devices1";

/// The seed's example document (the original API's registration reply).
pub const SEED: &str = r#"{
  "id": "tz4a98xxat96iws9zmbrgj3a",
  "bound_to_vfio": false,
  "created_at": "2025-01-15T10:00:00Z",
  "device_id": "27b8",
  "iommu_group": 82,
  "pci_address": "0000:a2:00.0",
  "type": "gpu",
  "vendor_id": "10de",
  "attached_to": null,
  "name": "l4-gpu"
}"#;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A binary of the workspace, built next to this test (`cargo build
/// --workspace` builds them; `cargo test` alone builds only this package's).
pub fn bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("the test runs from target/<profile>/deps");
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// A process's resident set in KiB (the bench's reading, shared).
pub fn rss_kib(pid: u32) -> u64 {
    hypeman_bench::rss_kib(pid).expect("read the process's VmRSS") as u64
}

/// Writes `devices.json` into `state_dir` as an earlier version stored it
/// (before a daemon starts, without an identity): one record per `(id,
/// name, address, "vvvv:dddd")`, of the card at that address (another would
/// be refused as `HardwareChanged`, issue 28).
pub fn stored_earlier(state_dir: &Path, records: &[(&str, &str, &str, &str)]) {
    let devices: Vec<Value> = records
        .iter()
        .map(|(id, name, addr, ids)| {
            let (vendor, device) = ids.split_once(':').expect("vvvv:dddd");
            serde_json::json!({
                "id": id, "name": name, "pci_address": addr,
                "vendor_id": vendor, "device_id": device, "type": "gpu",
                "created_at": "2025-01-15T10:00:00Z", "want_vfio": false
            })
        })
        .collect();
    let doc = serde_json::json!({"version": 1, "devices": devices});
    std::fs::write(state_dir.join("devices.json"), doc.to_string()).expect("write devices.json");
}

/// The records the store holds, by id: `devices.json`, then the changes of
/// `devices.journal` after its `seq`, up to the last whole write. Read here
/// from DESIGN.md's description of the files, not with the daemon's code.
pub fn stored_records(state_dir: &Path) -> Vec<Value> {
    let snapshot: Value = std::fs::read_to_string(state_dir.join("devices.json"))
        .map(|t| serde_json::from_str(&t).expect("devices.json parses"))
        .unwrap_or_else(|_| serde_json::json!({"version": 1, "devices": []}));
    let mut seq = snapshot["seq"].as_u64().unwrap_or(0);
    let mut records: std::collections::BTreeMap<String, Value> = snapshot["devices"]
        .as_array()
        .expect("a devices list")
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    let journal = std::fs::read_to_string(state_dir.join("devices.journal")).unwrap_or_default();
    let mut write = Vec::new();
    for line in journal.split_inclusive('\n') {
        let Some(line) = line.strip_suffix('\n') else {
            break; // a torn write
        };
        let entry: Value = serde_json::from_str(line).expect("a whole journal line parses");
        write.push(entry.clone());
        if entry["end"] != Value::Bool(true) {
            continue;
        }
        for e in write.drain(..) {
            let n = e["seq"].as_u64().unwrap();
            if n <= seq {
                continue;
            }
            assert_eq!(n, seq + 1, "the journal goes on from devices.json");
            seq = n;
            if let Some(r) = e.get("add").or_else(|| e.get("replace")) {
                records.insert(r["id"].as_str().unwrap().to_string(), r.clone());
            } else {
                records.remove(e["remove"].as_str().unwrap());
            }
        }
    }
    records.into_values().collect()
}

/// Sets a running process's soft file size limit (`None`: unlimited), so its
/// next write past `bytes` fails with EFBIG: a store that cannot be written.
pub fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let limit = bytes.map_or("unlimited".to_string(), |b| b.to_string());
    let st = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}:")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(st.success(), "prlimit --fsize={limit}: failed");
}

/// The journal's size now (0 when there is none yet).
pub fn journal_len(state_dir: &Path) -> u64 {
    std::fs::metadata(state_dir.join("devices.journal")).map_or(0, |m| m.len())
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("examples/hosts").join(name)
}

/// A child process that is killed (by its pid) and reaped when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by pid and waits for the exit status.
    pub fn signal_and_wait(&mut self, sig: &str) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status();
        self.child.wait().expect("wait for child")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private bus: Debian's system policy plus `dbus/org.hypeman.Devices.conf`.
pub struct TestBus {
    pub address: String,
    pub dir: tempfile::TempDir,
    _proc: Proc,
    /// Dropped last: the bus is gone before another test may run alone.
    _turn: Turn,
}

/// Every test shares the machine with the others in this binary, except
/// the few that run alone: those that measure how long events take to reach
/// a client (umockdev's script waits a fixed time for each signal). A test
/// holds its turn for as long as its bus lives.
static TURNS: (std::sync::Mutex<Turns>, std::sync::Condvar) = (
    std::sync::Mutex::new(Turns::new()),
    std::sync::Condvar::new(),
);

/// A test that shares never waits for one that wants to be alone (a test
/// that starts a second bus while it holds the first must not deadlock);
/// the one alone waits until nobody shares.
struct Turns {
    sharing: usize,
    alone: bool,
}

impl Turns {
    const fn new() -> Turns {
        Turns {
            sharing: 0,
            alone: false,
        }
    }
}

/// A test's turn on the machine.
pub struct Turn {
    alone: bool,
}

impl Turn {
    fn take(alone: bool) -> Turn {
        let (lock, cv) = &TURNS;
        let mut t = lock.lock().unwrap_or_else(|p| p.into_inner());
        if alone {
            while t.alone || t.sharing > 0 {
                t = cv.wait(t).unwrap_or_else(|p| p.into_inner());
            }
            t.alone = true;
        } else {
            while t.alone {
                t = cv.wait(t).unwrap_or_else(|p| p.into_inner());
            }
            t.sharing += 1;
        }
        Turn { alone }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let (lock, cv) = &TURNS;
        let mut t = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.alone {
            t.alone = false;
        } else {
            t.sharing -= 1;
        }
        cv.notify_all();
    }
}

impl TestBus {
    pub fn start() -> TestBus {
        Self::start_with_includes(&[root().join("dbus/org.hypeman.Devices.conf")])
    }

    /// A bus on which tests may also drive the simulator (`org.hypeman.Simulator1`).
    pub fn start_sim() -> TestBus {
        Self::start_with_includes(&[
            root().join("dbus/org.hypeman.Devices.conf"),
            root().join("tests/data/simulator.conf"),
        ])
    }

    /// *(issue 27)* A bus on which a stand-in systemd ([`FakeSystemd`]) may
    /// own `org.freedesktop.systemd1`.
    pub fn start_systemd() -> TestBus {
        Self::start_with_includes(&[
            root().join("dbus/org.hypeman.Devices.conf"),
            root().join("tests/data/systemd1.conf"),
        ])
    }

    /// `Simulator1.InjectFault(op, address, error)`.
    pub fn inject(&self, op: &str, address: &str, error: &str) {
        self.call(
            "/org/hypeman/Simulator",
            "org.hypeman.Simulator1",
            "InjectFault",
            &["sss", op, address, error],
        )
        .expect("InjectFault");
    }

    /// A `Simulator1` method that must succeed (`Unplug`, `Plug`, ...).
    pub fn sim(&self, method: &str, args: &[&str]) {
        self.call(
            "/org/hypeman/Simulator",
            "org.hypeman.Simulator1",
            method,
            args,
        )
        .unwrap_or_else(|e| panic!("{method}: {e}"));
    }

    pub fn clear_faults(&self) {
        self.call(
            "/org/hypeman/Simulator",
            "org.hypeman.Simulator1",
            "ClearFaults",
            &[],
        )
        .expect("ClearFaults");
    }

    /// `Simulator1.Journal`: every write attempted on the simulated kernel and
    /// every service stopped or started, oldest first.
    pub fn journal(&self) -> Vec<String> {
        let v = self
            .call(
                "/org/hypeman/Simulator",
                "org.hypeman.Simulator1",
                "Journal",
                &[],
            )
            .expect("Journal");
        v[0].as_array()
            .expect("as")
            .iter()
            .map(|e| e.as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The journal's writes only (not services stopped or started).
    pub fn writes(&self) -> Vec<String> {
        self.journal()
            .into_iter()
            .filter(|e| !e.starts_with("stop ") && !e.starts_with("start "))
            .collect()
    }

    /// `Simulator1.UnitActive`.
    pub fn unit_active(&self, unit: &str) -> bool {
        let v = self
            .call(
                "/org/hypeman/Simulator",
                "org.hypeman.Simulator1",
                "UnitActive",
                &["s", unit],
            )
            .expect("UnitActive");
        v[0].as_bool().expect("b")
    }

    /// The host's view of one device from `ListAvailable`: (driver, group).
    pub fn host_driver(&self, address: &str) -> Option<String> {
        let all = self.manager("ListAvailable", &[]).expect("ListAvailable");
        all[0]
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["pci_address"]["data"] == address)
            .and_then(|r| r.get("current_driver"))
            .and_then(|d| d["data"].as_str().map(str::to_string))
    }

    pub fn start_with_includes(includes: &[PathBuf]) -> TestBus {
        Self::start_taking(includes, Turn::take(false))
    }

    /// A bus for a test that must have the machine to itself (see [`Turn`]).
    pub fn start_alone() -> TestBus {
        let includes = [root().join("dbus/org.hypeman.Devices.conf")];
        Self::start_taking(&includes, Turn::take(true))
    }

    fn start_taking(includes: &[PathBuf], turn: Turn) -> TestBus {
        let dir = tempfile::tempdir().expect("tempdir");
        // Other users (polkitd, test callers) must reach the bus socket.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let template =
            std::fs::read_to_string(root().join("tests/data/system.conf.in")).expect("template");
        let includes: String = includes
            .iter()
            .map(|p| format!("<include>{}</include>\n", p.display()))
            .collect();
        let conf = template
            .replace(
                "@LISTEN@",
                &format!("unix:path={}/bus", dir.path().display()),
            )
            .replace("@INCLUDES@", &includes);
        let conf_path = dir.path().join("system.conf");
        std::fs::write(&conf_path, conf).expect("write bus config");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("dbus-daemon.log")).expect("bus log"))
            .spawn()
            .expect("dbus-daemon must be installed (apt-get install dbus-daemon)");
        let stdout = child.stdout.take().expect("stdout");
        let proc = Proc { child };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("bus address");
        let address = line.trim().to_string();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon printed {address:?}"
        );
        TestBus {
            address,
            dir,
            _proc: proc,
            _turn: turn,
        }
    }

    /// What dbus-daemon printed on stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dbus-daemon.log")).unwrap_or_default()
    }

    pub fn has_owner(&self, name: &str) -> bool {
        let out = self.busctl(&[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        ]);
        String::from_utf8_lossy(&out.stdout).trim() == "b true"
    }

    /// Runs `busctl --address=<bus> ARGS`.
    pub fn busctl(&self, args: &[&str]) -> Output {
        Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .output()
            .expect("busctl must be installed (apt-get install systemd)")
    }

    /// `busctl --json=short call org.hypeman.Devices <path> <iface> <method> ...`;
    /// `Ok(data)` or `Err(stderr)`.
    pub fn call(
        &self,
        path: &str,
        iface: &str,
        method: &str,
        sig_and_args: &[&str],
    ) -> Result<Value, String> {
        let mut args = vec!["--json=short", "call", NAME, path, iface, method];
        args.extend_from_slice(sig_and_args);
        let out = self.busctl(&args);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null); // a method with no reply arguments
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(v["data"].clone())
    }

    /// `ListAvailable`'s entries (busctl's JSON), read once.
    pub fn available(&self) -> Available {
        let all = self.manager("ListAvailable", &[]).expect("ListAvailable");
        Available(all[0].as_array().expect("an array").clone())
    }

    /// `GetManagedObjects` on the manager's path: every object path to its
    /// interfaces and their properties (busctl's JSON).
    pub fn managed_objects(&self) -> Value {
        let all = self
            .call(
                PATH,
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
                &[],
            )
            .expect("GetManagedObjects");
        all[0].clone()
    }

    /// A manager method through busctl.
    pub fn manager(&self, method: &str, sig_and_args: &[&str]) -> Result<Value, String> {
        self.call(PATH, IFACE, method, sig_and_args)
    }

    /// Runs `gdbus call --address <bus> --dest org.hypeman.Devices ...`.
    pub fn gdbus_call(&self, path: &str, method: &str, args: &[&str]) -> Output {
        Command::new("gdbus")
            .args([
                "call",
                "--address",
                &self.address,
                "--dest",
                NAME,
                "--object-path",
                path,
                "--method",
                method,
            ])
            .args(args)
            .output()
            .expect("gdbus must be installed (apt-get install libglib2.0-bin)")
    }

    /// Runs the real `hypemanctl` against this bus.
    pub fn hypemanctl(&self, args: &[&str]) -> Output {
        Command::new(bin("hypemanctl"))
            .arg(format!("--bus={}", self.address))
            .args(args)
            .output()
            .expect("run hypemanctl")
    }
}

/// One answer of `ListAvailable`.
pub struct Available(pub Vec<Value>);

impl Available {
    /// The entry of `address`.
    pub fn of(&self, address: &str) -> &Value {
        self.0
            .iter()
            .find(|r| r["pci_address"]["data"] == address)
            .unwrap_or_else(|| panic!("{address} is not listed: {:?}", self.0))
    }
}

/// What most tests start with: a private bus, a fresh state directory, and
/// `hypemand --simulate` on one of `examples/hosts`. Fields drop in order:
/// the daemon is stopped before its bus and its state go.
pub struct Sim {
    pub daemon: Daemon,
    pub bus: TestBus,
    pub state: tempfile::TempDir,
}

impl Sim {
    /// On a bus where the simulator may be driven (`Simulator1`).
    pub fn start(fixture: &str) -> Sim {
        Sim::on(TestBus::start_sim(), fixture)
    }

    /// On `bus`.
    pub fn on(bus: TestBus, fixture: &str) -> Sim {
        let state = tempfile::tempdir().expect("a state directory");
        let daemon = Daemon::simulate(&bus, state.path(), fixture);
        Sim { daemon, bus, state }
    }

    /// The real backend on a `--sysfs-root` tree instead of a fixture.
    pub fn on_tree(bus: TestBus, tree: &SysfsTree) -> Sim {
        let state = tempfile::tempdir().expect("a state directory");
        let root = tree.root().to_str().expect("a UTF-8 path");
        let daemon = Daemon::start(&bus, state.path(), &["--sysfs-root", root]);
        Sim { daemon, bus, state }
    }
}

/// How a child that exited said so, for a failure message.
fn exit_status(child: &mut Child) -> String {
    child.wait().map(|s| s.to_string()).unwrap_or_default()
}

/// A running `hypemand` on a [`TestBus`].
pub struct Daemon {
    pub proc: Proc,
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn command(bus: &TestBus, state_dir: &Path, host_args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("hypemand"));
        cmd.arg(format!("--bus={}", bus.address))
            .arg(format!("--state-dir={}", state_dir.display()))
            .args(host_args)
            .env("RUST_LOG", "debug");
        cmd
    }

    /// Starts `hypemand --simulate FIXTURE` and waits until it owns its name.
    pub fn simulate(bus: &TestBus, state_dir: &Path, fixture_name: &str) -> Daemon {
        let f = fixture(fixture_name);
        Self::start(
            bus,
            state_dir,
            &["--simulate", f.to_str().expect("utf-8 path")],
        )
    }

    pub fn start(bus: &TestBus, state_dir: &Path, host_args: &[&str]) -> Daemon {
        Self::from_command(bus, Self::command(bus, state_dir, host_args))
    }

    /// Starts a prepared [`Daemon::command`] and waits until it owns its name.
    pub fn from_command(bus: &TestBus, mut cmd: Command) -> Daemon {
        let stderr_path = bus
            .dir
            .path()
            .join(format!("hypemand-{}.log", rand_suffix()));
        let log = std::fs::File::create(&stderr_path).expect("log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hypemand");
        let mut d = Daemon {
            proc: Proc { child },
            stderr_path,
        };
        // A hang guard, not a timing assertion: a daemon that never comes up fails
        // the test instead of hanging CI.
        if !wait_name(bus, NAME, true, Some(d.proc.child.id())) {
            let status = exit_status(&mut d.proc.child);
            panic!("hypemand exited early ({status}):\n{}", d.log());
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL: the crash case.
    pub fn kill9(mut self, bus: &TestBus) {
        self.proc.signal_and_wait("KILL");
        wait_name(bus, NAME, false, None);
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `cond` for up to 20 s (a hang guard).
pub fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The D-Bus error name in a busctl failure message, e.g. `AlreadyRegistered`.
/// busctl prints only the message, so the tests use gdbus where the name matters.
pub fn gdbus_error_name(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    // "GDBus.Error:org.hypeman.Devices.Error.NotFound: message"
    err.split("GDBus.Error:")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The real polkitd on a test bus, in a private mount namespace where the
/// project's policy and the given rules replace the machine's.
pub struct Polkitd {
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl Polkitd {
    /// The bus must include `org.freedesktop.PolicyKit1.conf`
    /// (see [`TestBus::start_polkit`]). `rules` are (file name, JavaScript).
    pub fn start(bus: &TestBus, rules: &[(&str, String)]) -> Polkitd {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let actions = dir.path().join("actions");
        let rules_dir = dir.path().join("rules");
        let empty = dir.path().join("empty");
        for d in [&actions, &rules_dir, &empty] {
            std::fs::create_dir(d).expect("mkdir");
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::copy(
            root().join("polkit/org.hypeman.devices.policy"),
            actions.join("org.hypeman.devices.policy"),
        )
        .expect("copy policy");
        for (name, js) in rules {
            std::fs::write(rules_dir.join(name), js).expect("write rule");
        }
        let status = Command::new("chown")
            .args(["-R", "polkitd:"])
            .arg(&rules_dir)
            .status()
            .expect("chown");
        assert!(
            status.success(),
            "the polkitd user must exist (apt-get install polkitd)"
        );
        std::fs::set_permissions(&rules_dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod rules");
        let script = format!(
            "mount --bind {a} /usr/share/polkit-1/actions && mount --bind {r} /etc/polkit-1/rules.d && \
             mount --bind {e} /usr/share/polkit-1/rules.d && exec /usr/lib/polkit-1/polkitd --no-debug",
            a = actions.display(),
            r = rules_dir.display(),
            e = empty.display()
        );
        let child = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("polkitd.log")).expect("log"))
            .spawn()
            .expect("unshare");
        let mut p = Polkitd {
            proc: Proc { child },
            _dir: dir,
        };
        let pid = p.proc.child.id();
        if !wait_name(bus, "org.freedesktop.PolicyKit1", true, Some(pid)) {
            let st = exit_status(&mut p.proc.child);
            panic!("polkitd exited ({st}): {}", p.log());
        }
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("polkitd.log")).unwrap_or_default()
    }
}

impl TestBus {
    /// A bus that also lets polkitd own its name.
    pub fn start_polkit() -> TestBus {
        Self::start_with_includes(&[
            root().join("dbus/org.hypeman.Devices.conf"),
            PathBuf::from("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf"),
        ])
    }
}

/// Test users, created for a test and removed (with their groups) when dropped.
/// Tests of one binary that have test users run one after another: a group
/// one of them created (and removes when done) must not vanish under another.
pub struct TestUsers {
    pub names: Vec<String>,
    created_group: Option<String>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static USERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl TestUsers {
    /// Creates one user per role, named `hm<role><pid>`; those in `admins` join
    /// group `group` (created if missing, and then removed again).
    pub fn create(roles: &[&str], admins: &[&str], group: &str) -> TestUsers {
        let one_at_a_time = USERS.lock().unwrap_or_else(|p| p.into_inner());
        let exists = Command::new("getent")
            .args(["group", group])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let mut users = TestUsers {
            names: Vec::new(),
            created_group: None,
            _one_at_a_time: one_at_a_time,
        };
        if !exists {
            let st = Command::new("groupadd")
                .arg(group)
                .status()
                .expect("groupadd");
            assert!(st.success(), "groupadd {group}");
            users.created_group = Some(group.to_string());
        }
        for role in roles {
            let name = Self::name_of(role);
            let _ = Command::new("userdel").arg(&name).output(); // left over from a killed run
            let mut cmd = Command::new("useradd");
            cmd.args(["-M", "-s", "/usr/sbin/nologin"]);
            if admins.contains(role) {
                cmd.args(["-G", group]);
            }
            let st = cmd.arg(&name).status().expect("useradd");
            assert!(st.success(), "useradd {name}");
            users.names.push(name);
        }
        users
    }

    pub fn name_of(role: &str) -> String {
        format!("hm{role}{}", std::process::id() % 100_000)
    }
}

impl Drop for TestUsers {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("userdel").arg(n).output();
        }
        if let Some(g) = &self.created_group {
            let _ = Command::new("groupdel").arg(g).output();
        }
    }
}

/// A command run as `user` (with its groups), through setpriv.
pub fn as_user(user: &str, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        user,
        "--regid",
        user,
        "--init-groups",
        "--",
        program,
    ]);
    cmd
}

/// The official SDK the REST and document tests check against.
pub const SDK: &str = "hypeman==0.28.0";

/// A virtualenv with the official hypeman SDK from PyPI, made once per
/// target directory: built under a name of its own, then renamed into place,
/// so processes running at once never see a half-made one; within this
/// binary, the first test to ask makes it and the others wait for it.
pub fn sdk_python() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(|| make_venv("sdk-venv", SDK)).clone()
}

/// *(issue 29)* The parser the metrics are checked with, independently of
/// hypemand's encoder.
pub const PROMETHEUS_CLIENT: &str = "prometheus_client==0.26.0";

/// *(issue 29)* A virtualenv with [`PROMETHEUS_CLIENT`] from PyPI, made as
/// [`sdk_python`]'s is.
pub fn metrics_python() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(|| make_venv("metrics-venv", PROMETHEUS_CLIENT))
        .clone()
}

/// `target/<name>` with `requirement` installed, made once.
fn make_venv(name: &str, requirement: &str) -> PathBuf {
    let dir = root().join("target").join(name);
    let python = dir.join("bin/python");
    if dir.join(".ready").exists() {
        return python;
    }
    let mine = root().join(format!("target/{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&mine);
    let st = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&mine)
        .status()
        .expect("python3 -m venv (apt-get install python3-venv)");
    assert!(st.success(), "creating the virtualenv failed");
    let out = Command::new(mine.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            requirement,
        ])
        .output()
        .expect("pip");
    assert!(
        out.status.success(),
        "pip install {requirement} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(mine.join(".ready"), requirement).unwrap();
    if dir.exists() && !dir.join(".ready").exists() {
        let _ = std::fs::remove_dir_all(&dir); // left by a killed run
    }
    if std::fs::rename(&mine, &dir).is_err() {
        // Another test made it first.
        let _ = std::fs::remove_dir_all(&mine);
    }
    assert!(dir.join(".ready").exists());
    python
}

/// One raw HTTP/1.1 exchange; the status line and the body.
pub fn raw(sock: &Path, request: &[u8]) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(request).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}
