//! The systemd services that hold devices open and must let go before the
//! daemon can unbind them: today `nvidia-persistenced.service`, which keeps
//! every NVIDIA GPU open so the driver stays initialised.
//!
//! Why: the kernel's nvidia driver waits in `remove()` until the last holder
//! closes the device, so writing to `nvidia/unbind` while the service runs
//! blocks past any deadline, with the write still pending in the kernel.
//! Hypeman stops the service around its binds and starts it again; so do we,
//! through systemd's D-Bus API (never by killing a process), under the
//! daemon's deadline. The simulated host declares services of its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::OwnedObjectPath;

use super::sim::SimHost;

/// The service that holds NVIDIA GPUs, and the driver it holds them through.
pub const NVIDIA_HOLDER: &str = "nvidia-persistenced.service";
pub const NVIDIA_DRIVER: &str = "nvidia";

/// Why a service could not be asked or moved.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("systemd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach systemd: {0}")]
    Bus(#[from] zbus::Error),
    #[error("systemd could not {verb} {unit}: job {result}")]
    Job {
        verb: &'static str,
        unit: String,
        result: String,
    },
    #[error("{0}")]
    Sim(String),
}

/// An active holder service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub unit: String,
    /// Its main process, whose open device nodes are not `open-by` blockers
    /// (the daemon stops it around the unbind instead).
    pub main_pid: Option<u32>,
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: zbus::ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    /// *(issue 27)* The run of the unit: 16 bytes, new at each start, empty
    /// while it is not running.
    #[zbus(property, name = "InvocationID")]
    fn invocation_id(&self) -> zbus::Result<Vec<u8>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait SystemdService {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
}

/// Where services are asked and moved.
pub enum Units {
    /// systemd on the system bus, connected on first use (most hosts never
    /// need it: only an unbind from nvidia does).
    Systemd(tokio::sync::OnceCell<zbus::Connection>),
    /// The simulated host's declared services.
    Sim(Arc<SimHost>),
    /// Not the running kernel (a `--sysfs-root` tree): this machine's
    /// services have nothing to do with its devices.
    None,
}

impl Units {
    async fn conn(
        cell: &tokio::sync::OnceCell<zbus::Connection>,
    ) -> zbus::Result<&zbus::Connection> {
        cell.get_or_try_init(zbus::Connection::system).await
    }

    /// The active service holding devices bound to `driver`, if any.
    pub async fn holder(&self, driver: &str) -> Result<Option<Holder>, UnitError> {
        if driver != NVIDIA_DRIVER {
            return Ok(None);
        }
        match self {
            Units::None => Ok(None),
            Units::Sim(sim) => {
                Ok(sim
                    .unit(NVIDIA_HOLDER)
                    .filter(|(active, _)| *active)
                    .map(|(_, pid)| Holder {
                        unit: NVIDIA_HOLDER.to_string(),
                        main_pid: Some(pid),
                    }))
            }
            Units::Systemd(cell) => {
                let conn = Self::conn(cell).await?;
                let manager = ManagerProxy::new(conn).await?;
                // Not loaded: not running.
                let path = match manager.get_unit(NVIDIA_HOLDER).await {
                    Ok(p) => p,
                    Err(zbus::Error::MethodError(name, _, _))
                        if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
                    {
                        return Ok(None)
                    }
                    Err(e) => return Err(e.into()),
                };
                let unit = UnitProxy::builder(conn).path(path.clone()).build().await?;
                let state = unit.active_state().await?;
                if !matches!(state.as_str(), "active" | "reloading" | "activating") {
                    return Ok(None);
                }
                let service = SystemdServiceProxy::builder(conn)
                    .path(path)
                    .build()
                    .await?;
                let pid = service.main_pid().await.ok().filter(|p| *p != 0);
                Ok(Some(Holder {
                    unit: NVIDIA_HOLDER.to_string(),
                    main_pid: pid,
                }))
            }
        }
    }

    /// Stops (`active` false) or starts a unit and waits for systemd's job to
    /// finish.
    pub async fn set(&self, unit: &str, active: bool) -> Result<(), UnitError> {
        match self {
            Units::None => Ok(()),
            Units::Sim(sim) => sim.set_unit(unit, active).map_err(UnitError::Sim),
            Units::Systemd(cell) => {
                let conn = Self::conn(cell).await?;
                let manager = ManagerProxy::new(conn).await?;
                // Listen before asking, so the job's end cannot be missed.
                let mut removed = manager.receive_job_removed().await?;
                manager.subscribe().await.ok();
                let job = if active {
                    manager.start_unit(unit, "replace").await?
                } else {
                    manager.stop_unit(unit, "replace").await?
                };
                while let Some(signal) = removed.next().await {
                    let Ok(args) = signal.args() else { continue };
                    if args.job.as_str() != job.as_str() {
                        continue;
                    }
                    return if args.result == "done" {
                        Ok(())
                    } else {
                        Err(UnitError::Job {
                            verb: if active { "start" } else { "stop" },
                            unit: unit.to_string(),
                            result: args.result.to_string(),
                        })
                    };
                }
                Err(UnitError::Bus(zbus::Error::Failure(
                    "the bus connection closed while waiting for systemd".into(),
                )))
            }
        }
    }
}

/// *(issue 27)* A unit that holds a leased device, as systemd shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitRun {
    /// `ActiveState`: `active`, `reloading`, `inactive`, `failed`,
    /// `activating`, `deactivating`.
    pub state: String,
    /// `InvocationID` as 32 lowercase hex digits; empty while not running.
    pub invocation: String,
}

impl UnitRun {
    /// Whether the unit runs: a lease may be taken on it, and kept.
    pub fn running(&self) -> bool {
        matches!(self.state.as_str(), "active" | "reloading" | "activating")
            && !self.invocation.is_empty()
    }

    /// Whether the run has ended: what releases a lease (`inactive`,
    /// `failed`, or a run without an invocation). A unit that is
    /// `deactivating` still has its processes.
    pub fn ended(&self) -> bool {
        matches!(self.state.as_str(), "inactive" | "failed") || self.invocation.is_empty()
    }
}

/// The error systemd answers for a unit it has not loaded.
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";

/// Every systemd call of a lease is bounded: a systemd that does not
/// answer is an error, never a wait without end.
pub const UNIT_DEADLINE: Duration = Duration::from_secs(10);

/// At most this many of a unit's signals wait to be read; past that the
/// oldest are dropped, which loses nothing: each wakes a fresh read.
const UNIT_SIGNAL_QUEUE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(16).unwrap();

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, UnitError>>,
) -> Result<T, UnitError> {
    tokio::time::timeout(UNIT_DEADLINE, f)
        .await
        .map_err(|_| UnitError::Timeout(UNIT_DEADLINE))?
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The state and run of the unit at `path`, read now (never cached).
async fn run_at(conn: &zbus::Connection, path: &OwnedObjectPath) -> Result<UnitRun, UnitError> {
    let unit = UnitProxy::builder(conn)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let state = unit.active_state().await?;
    let id: Vec<u8> = unit.invocation_id().await?;
    let invocation = hex(&id);
    Ok(UnitRun { state, invocation })
}

/// *(issue 27)* The unit `name` on `conn`'s systemd, with its object path:
/// `None` when systemd does not know it (not loaded: no unit file, or a
/// transient unit that has gone).
pub async fn unit_run(
    conn: &zbus::Connection,
    name: &str,
) -> Result<Option<(OwnedObjectPath, UnitRun)>, UnitError> {
    bounded(async {
        let Some(path) = unit_path(conn, name).await? else {
            return Ok(None);
        };
        let run = run_at(conn, &path).await?;
        Ok(Some((path, run)))
    })
    .await
}

/// `GetUnit`: the unit's object path, `None` when systemd has not loaded it.
async fn unit_path(
    conn: &zbus::Connection,
    name: &str,
) -> Result<Option<OwnedObjectPath>, UnitError> {
    let manager = ManagerProxy::new(conn).await?;
    match manager.get_unit(name).await {
        Ok(p) => Ok(Some(p)),
        Err(zbus::Error::MethodError(e, _, _)) if e.as_str() == NO_SUCH_UNIT => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether a read failed because the unit's object went between `GetUnit`
/// and the read of its properties: systemd forgot the unit meanwhile.
fn forgotten(e: &UnitError) -> bool {
    use zbus::fdo::Error as Fdo;
    match e {
        UnitError::Bus(zbus::Error::FDO(e)) => matches!(
            **e,
            Fdo::UnknownObject(_) | Fdo::UnknownInterface(_) | Fdo::UnknownMethod(_)
        ),
        UnitError::Bus(zbus::Error::MethodError(name, _, _)) => matches!(
            name.as_str(),
            "org.freedesktop.DBus.Error.UnknownObject"
                | "org.freedesktop.DBus.Error.UnknownInterface"
                | "org.freedesktop.DBus.Error.UnknownMethod"
        ),
        _ => false,
    }
}

/// *(issue 27)* Waits for the end of run `invocation` of unit `name`, and
/// says how it ended: its `ActiveState` became `inactive` or `failed`, it
/// runs again as another invocation, or systemd no longer knows it. Woken
/// by systemd's signals (the unit's `PropertiesChanged` and the manager's
/// `UnitRemoved`), each followed by a fresh read, never by a timer. An
/// error means it cannot be told (systemd unreachable): the caller keeps
/// the lease.
pub async fn unit_end(
    conn: &zbus::Connection,
    name: &str,
    invocation: &str,
) -> Result<String, UnitError> {
    use zbus::message::Type;
    use zbus::MatchRule;
    // The path alone, for the match rule: the state is read after it.
    let Some(path) = bounded(unit_path(conn, name)).await? else {
        return Ok(format!("systemd no longer knows unit {name}"));
    };
    // Listen first, read second: an end in between is not missed.
    let changed = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.freedesktop.systemd1")
        .path(path.clone())
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .build()?;
    let removed = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.freedesktop.systemd1")
        .path("/org/freedesktop/systemd1")
        .interface("org.freedesktop.systemd1.Manager")
        .member("UnitRemoved")
        .arg(0, name)
        .build()?;
    let mut changed =
        zbus::MessageStream::for_match_rule(changed, conn, Some(UNIT_SIGNAL_QUEUE)).await?;
    let mut removed =
        zbus::MessageStream::for_match_rule(removed, conn, Some(UNIT_SIGNAL_QUEUE)).await?;
    // systemd sends unit signals only to clients that subscribed; a second
    // Subscribe of the same connection is refused, which is fine.
    let manager = ManagerProxy::new(conn).await?;
    let _ = bounded(async { Ok(manager.subscribe().await?) }).await;
    loop {
        // By name each time: a unit systemd has forgotten answers NoSuchUnit.
        match unit_run(conn, name).await {
            Ok(None) => return Ok(format!("systemd no longer knows unit {name}")),
            Ok(Some((_, run))) if run.invocation != invocation && !run.invocation.is_empty() => {
                return Ok(format!(
                    "unit {name} runs again as another invocation ({}; the holder was {invocation})",
                    run.invocation
                ))
            }
            Ok(Some((_, run))) if run.ended() => {
                return Ok(format!("unit {name} is {}", run.state))
            }
            Ok(Some(_)) => {}
            Err(e) if forgotten(&e) => {
                return Ok(format!("systemd no longer knows unit {name}"))
            }
            Err(e) => return Err(e),
        }
        let woke = tokio::select! {
            m = changed.next() => m.is_some(),
            m = removed.next() => m.is_some(),
        };
        if !woke {
            return Err(UnitError::Bus(zbus::Error::Failure(
                "the bus connection closed while watching the unit".into(),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_running_or_ended_by_its_state_and_invocation() {
        let run = |state: &str, inv: &str| UnitRun {
            state: state.into(),
            invocation: inv.into(),
        };
        let id = "0123456789abcdef0123456789abcdef";
        assert!(run("active", id).running() && !run("active", id).ended());
        assert!(run("activating", id).running());
        // Stopping: not a new holder, not ended yet.
        assert!(!run("deactivating", id).running() && !run("deactivating", id).ended());
        assert!(run("inactive", "").ended() && run("failed", id).ended());
        assert!(!run("active", "").running() && run("active", "").ended());
        assert_eq!(hex(&[0x01, 0xab, 0xff]), "01abff");
    }
}
