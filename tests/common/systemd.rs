//! *(issue 27)* A stand-in for systemd's D-Bus API on a private test bus:
//! `org.freedesktop.systemd1` with the few members a unit lease uses
//! (`Manager.GetUnit`, `Manager.Subscribe`, `Manager.UnitRemoved`, and a
//! unit's `ActiveState` and `InvocationID`, signalled as systemd signals
//! them). No systemd runs as PID 1 here; the real one is exercised by
//! `scripts/test-system.sh` on a booted Debian. This one lets a test end a
//! unit at a point of its choosing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath};

use super::TestBus;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
enum SdError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
}

/// Units by name: their object paths.
type Loaded = Arc<Mutex<HashMap<String, OwnedObjectPath>>>;

struct Manager {
    loaded: Loaded,
    subscribed: Arc<Mutex<u32>>,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    fn get_unit(&self, name: &str) -> Result<OwnedObjectPath, SdError> {
        self.loaded
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| SdError::NoSuchUnit(format!("Unit {name} not loaded.")))
    }

    fn subscribe(&self) {
        *self.subscribed.lock().unwrap() += 1;
    }

    #[zbus(signal)]
    async fn unit_removed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        unit: zbus::ObjectPath<'_>,
    ) -> zbus::Result<()>;
}

struct Unit {
    state: String,
    invocation: Vec<u8>,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Unit")]
impl Unit {
    #[zbus(property)]
    fn active_state(&self) -> String {
        self.state.clone()
    }

    #[zbus(property, name = "InvocationID")]
    fn invocation_id(&self) -> Vec<u8> {
        self.invocation.clone()
    }
}

/// The stand-in, serving until dropped.
pub struct FakeSystemd {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    loaded: Loaded,
    subscribed: Arc<Mutex<u32>>,
    runs: u8,
}

/// systemd's object path of a unit (`bus_label_escape`): every byte
/// outside `A-Za-z0-9` as `_xx`.
fn unit_path(name: &str) -> OwnedObjectPath {
    let label: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect();
    OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/unit/{label}")).unwrap()
}

impl FakeSystemd {
    /// Owns `org.freedesktop.systemd1` on `bus`, knowing no unit yet.
    pub fn start(bus: &TestBus) -> FakeSystemd {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let loaded = Loaded::default();
        let subscribed = Arc::new(Mutex::new(0));
        let conn = rt.block_on(async {
            let manager = Manager {
                loaded: loaded.clone(),
                subscribed: subscribed.clone(),
            };
            zbus::connection::Builder::address(bus.address.as_str())
                .serve_at("/org/freedesktop/systemd1", manager)
                .name("org.freedesktop.systemd1")
                .build()
                .await
                .expect("the stand-in systemd on the test bus")
        });
        FakeSystemd {
            rt,
            conn,
            loaded,
            subscribed,
            runs: 0,
        }
    }

    /// Starts `name` (loading it first): `active`, with a new invocation,
    /// which it answers.
    pub fn start_unit(&mut self, name: &str) -> String {
        self.runs += 1;
        let invocation = vec![self.runs; 16];
        let hex: String = invocation.iter().map(|b| format!("{b:02x}")).collect();
        let path = unit_path(name);
        let known = self.loaded.lock().unwrap().contains_key(name);
        self.rt.block_on(async {
            if known {
                self.set(&path, "active", invocation).await;
            } else {
                let unit = Unit {
                    state: "active".into(),
                    invocation,
                };
                self.conn.object_server().at(&path, unit).await.unwrap();
                self.loaded.lock().unwrap().insert(name.into(), path);
            }
        });
        hex
    }

    /// Stops `name` as systemd does: `deactivating` first (still running),
    /// then `state` (`inactive` or `failed`) without an invocation.
    pub fn stop_unit(&self, name: &str, state: &str) {
        let path = unit_path(name);
        self.rt.block_on(async {
            let invocation = {
                let iface = self
                    .conn
                    .object_server()
                    .interface::<_, Unit>(&path)
                    .await
                    .unwrap();
                let inv = iface.get().await.invocation.clone();
                inv
            };
            self.set(&path, "deactivating", invocation).await;
            self.set(&path, state, Vec::new()).await;
        });
    }

    /// Forgets `name` (garbage-collected): `UnitRemoved`, and `GetUnit`
    /// answers `NoSuchUnit`.
    pub fn remove_unit(&self, name: &str) {
        let path = self.loaded.lock().unwrap().remove(name).unwrap();
        self.rt.block_on(async {
            let server = self.conn.object_server();
            server.remove::<Unit, _>(&path).await.unwrap();
            let emitter = SignalEmitter::new(&self.conn, "/org/freedesktop/systemd1").unwrap();
            Manager::unit_removed(&emitter, name, path.as_ref())
                .await
                .unwrap();
        });
    }

    /// How many times a client subscribed.
    pub fn subscriptions(&self) -> u32 {
        *self.subscribed.lock().unwrap()
    }

    async fn set(&self, path: &OwnedObjectPath, state: &str, invocation: Vec<u8>) {
        let iface = self
            .conn
            .object_server()
            .interface::<_, Unit>(path)
            .await
            .unwrap();
        let mut unit = iface.get_mut().await;
        unit.state = state.into();
        unit.invocation = invocation;
        unit.active_state_changed(iface.signal_emitter())
            .await
            .unwrap();
        unit.invocation_i_d_changed(iface.signal_emitter())
            .await
            .unwrap();
    }
}
