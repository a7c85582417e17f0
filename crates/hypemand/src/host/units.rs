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
