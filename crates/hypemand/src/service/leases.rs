//! *(issue 27)* Leases: an attachment released when its holder ends.
//!
//! A holder is a process, named by a pidfd the caller passes
//! (`holder_pidfd`). Only the kernel is believed: the fd is a pidfd if
//! `pidfd_send_signal(fd, 0)` accepts it, its process is the one
//! `/proc/self/fdinfo` names, and that process is recognised after a restart
//! by the boot id, the pid and its start time (`/proc/PID/stat` field 22),
//! read while the pidfd shows it alive (so the pid was not reused between).
//!
//! A holder may instead be a systemd unit (`holder_unit`): systemd is asked
//! on the daemon's own bus, the unit must be running, and its
//! `InvocationID` names the run that holds the device ([`crate::host::units`]).
//!
//! A pidfd becomes readable when its process exits and cannot be fooled by
//! a reused pid; a unit's end is its `ActiveState` becoming `inactive` or
//! `failed`, another invocation, or systemd forgetting it. One task per
//! leased device waits for that, then releases the device through the
//! service's own path (under the device's lock, journaled, signalled), only
//! if the record still has that lease. A Detach in between ends the watch.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{Service, Target};
use crate::host::units::{self, UnitError};
use crate::store::registry::{Holder, Lease, OnRelease};
use hypeman_api::options::pidfd_open;
use hypeman_api::Error;

/// The most of a `/proc` file read: fdinfo and stat are a few hundred bytes.
const PROC_READ_LIMIT: u64 = 16 * 1024;

/// A pidfd, registered with the reactor once.
type WatchedFd = Arc<AsyncFd<OwnedFd>>;

/// What is watched for a holder's end.
#[derive(Clone)]
enum Watch {
    /// A pidfd: readable once its process has exited.
    Pidfd(WatchedFd),
    /// A unit's run, on the bus its systemd answers on.
    Unit(zbus::Connection),
}

/// A lease a caller asked for, its holder proven: what is stored, and what
/// is watched. Two requests are the same if they store the same.
#[derive(Clone)]
pub struct LeaseRequest {
    pub lease: Lease,
    watch: Watch,
}

impl PartialEq for LeaseRequest {
    fn eq(&self, other: &Self) -> bool {
        self.lease == other.lease
    }
}

impl Eq for LeaseRequest {}

impl std::fmt::Debug for LeaseRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.lease.fmt(f)
    }
}

fn invalid(m: String) -> Error {
    Error::InvalidArgument(m)
}

/// `pidfd_send_signal(fd, 0)`: `Ok` while the process lives; `ESRCH` once
/// it has exited; `EBADF`/`EINVAL` when `fd` is not a pidfd.
///
/// `EPERM` is an answer too: the kernel checks the fd is a pidfd and finds
/// its process before it checks the permission to signal it, and the shipped
/// unit has no `CAP_KILL`, so a holder run by another user (a VMM under its
/// own account) answers `EPERM` while it lives.
fn pidfd_alive(fd: RawFd) -> std::io::Result<()> {
    match pidfd_signal0(fd) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        r => r,
    }
}

fn pidfd_signal0(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: the syscall reads only its arguments; `fd` is open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether a pidfd's process has exited (its pidfd is readable), reaped or
/// not: a zombie still answers `pidfd_send_signal`.
fn exited(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0
}

/// Whether a pidfd's process still runs: it takes signals (or answers
/// `EPERM`) and has not exited. An exited process not yet reaped still
/// takes signals; its pidfd is readable, and that is its end.
fn still_running(fd: RawFd) -> bool {
    pidfd_alive(fd).is_ok() && !exited(fd)
}

/// A small `/proc` file, at most [`PROC_READ_LIMIT`] bytes.
fn read_proc(path: &str) -> std::io::Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(PROC_READ_LIMIT)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// This boot's id, read once.
pub fn boot_id() -> std::io::Result<String> {
    static ID: OnceLock<String> = OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(id.clone());
    }
    let id = read_proc("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string();
    Ok(ID.get_or_init(|| id).clone())
}

/// The pid `/proc/self/fdinfo/FD` gives a pidfd (`Pid:`): `None` when the
/// line is absent; -1 once the process is gone, 0 outside our namespace.
fn fdinfo_pid(fd: RawFd) -> std::io::Result<Option<i64>> {
    let text = read_proc(&format!("/proc/self/fdinfo/{fd}"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok()))
}

/// A process's start time, `/proc/PID/stat` field 22 (clock ticks since
/// boot). The name (field 2) may hold anything but is in parentheses and
/// the fields after the last `)` are numbers, so they are counted from it.
pub fn start_time(pid: u32) -> std::io::Result<u64> {
    let stat = read_proc(&format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed stat"))
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: field 22 is the 20th.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Registers a pidfd with the reactor (refused for an fd epoll cannot watch).
fn watched(fd: OwnedFd) -> std::io::Result<WatchedFd> {
    // Registering outside a runtime would panic: say so instead.
    tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    // SAFETY: the `OwnedFd` is open and owned by the `AsyncFd` until it is
    // dropped; nothing else closes or replaces it.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    Ok(Arc::new(fd))
}

impl LeaseRequest {
    /// The lease on the process `pidfd` refers to. Refused, with a message a
    /// person can act on, when it is not a pidfd or its process is gone.
    pub fn on_pidfd(pidfd: &OwnedFd, on_release: OnRelease) -> std::result::Result<Self, Error> {
        let fd = pidfd
            .try_clone()
            .map_err(|e| Error::Failed(format!("cannot keep the holder's pidfd: {e}")))?;
        let raw = fd.as_raw_fd();
        let not_pidfd = || {
            invalid(
                "holder_pidfd is not a pidfd: pass the fd pidfd_open(2) gives for the holder's pid"
                    .into(),
            )
        };
        let gone = || {
            invalid(
                "the holder (holder_pidfd) has already exited: nothing would hold the device"
                    .into(),
            )
        };
        match pidfd_alive(raw) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(gone()),
            Err(_) => return Err(not_pidfd()),
        }
        let pid = match fdinfo_pid(raw) {
            Ok(Some(p)) if p > 0 => u32::try_from(p).map_err(|_| not_pidfd())?,
            Ok(Some(-1)) => return Err(gone()),
            Ok(Some(_)) => {
                return Err(invalid(
                    "the holder (holder_pidfd) is in another pid namespace than hypemand's: pass a pidfd of a process hypemand can see".into(),
                ))
            }
            Ok(None) => return Err(not_pidfd()),
            Err(e) => return Err(Error::Failed(format!("cannot read the holder's pidfd: {e}"))),
        };
        let start_time = start_time(pid).map_err(|_| gone())?;
        // Read while the pidfd shows its process running: the pid was its.
        if !still_running(raw) {
            return Err(gone());
        }
        let boot_id =
            boot_id().map_err(|e| Error::Failed(format!("cannot read the boot id: {e}")))?;
        let fd = watched(fd)
            .map_err(|e| Error::Failed(format!("cannot watch the holder's pidfd: {e}")))?;
        Ok(LeaseRequest {
            lease: Lease {
                holder: Holder::Process {
                    boot_id,
                    pid,
                    start_time,
                    unit: process_unit(pid),
                },
                on_release,
            },
            watch: Watch::Pidfd(fd),
        })
    }

    /// The lease on the running unit `name`, asked of systemd on `bus`.
    /// Refused when systemd does not know the unit or it is not running.
    pub async fn on_unit(
        bus: Option<&zbus::Connection>,
        name: &str,
        on_release: OnRelease,
    ) -> std::result::Result<Self, Error> {
        hypeman_api::options::validate_unit_name(name)?;
        let bus = bus.ok_or_else(|| {
            Error::Failed("hypemand is not connected to the bus yet: try again".into())
        })?;
        match units::unit_run(bus, name).await {
            Ok(None) => Err(invalid(format!(
                "systemd does not know unit {name}: check the name (systemctl status {name}), or start the VM's unit before attaching"
            ))),
            Ok(Some((_, run))) if !run.running() => Err(invalid(format!(
                "unit {name} is {} and not running: nothing would hold the device",
                run.state
            ))),
            Ok(Some((_, run))) => Ok(LeaseRequest {
                lease: Lease {
                    holder: Holder::Unit {
                        name: name.to_string(),
                        invocation_id: run.invocation,
                    },
                    on_release,
                },
                watch: Watch::Unit(bus.clone()),
            }),
            Err(e) => Err(Error::Failed(format!(
                "cannot ask systemd about unit {name}: {e}"
            ))),
        }
    }

    /// The same process found again after a restart, or why not.
    fn recognise_process(
        boot_id_then: &str,
        pid: u32,
        t: u64,
    ) -> std::result::Result<WatchedFd, String> {
        let now = boot_id().map_err(|e| format!("cannot read the boot id: {e}"))?;
        if boot_id_then != now {
            return Err("the host rebooted since the lease was taken".into());
        }
        let fd = pidfd_open(pid).map_err(|_| format!("process {pid} has exited"))?;
        let found = start_time(pid).map_err(|_| format!("process {pid} has exited"))?;
        if found != t {
            return Err(format!(
                "pid {pid} is another process now (start time {found}, the holder's was {t})"
            ));
        }
        if !still_running(fd.as_raw_fd()) {
            return Err(format!("process {pid} has exited"));
        }
        watched(fd).map_err(|e| format!("cannot watch process {pid}: {e}"))
    }
}

/// What start-up finds of a stored lease's holder.
enum Found {
    /// The same holder: watched again.
    Same(Watch),
    /// Another, or none: released, for this reason.
    Gone(String),
    /// It cannot be told now (systemd does not answer): kept, and said.
    Unknown(String),
}

/// The same holder found again after a restart, or why not.
async fn recognise(lease: &Lease, bus: Option<&zbus::Connection>) -> Found {
    match &lease.holder {
        Holder::Process {
            boot_id: b,
            pid,
            start_time: t,
            ..
        } => match LeaseRequest::recognise_process(b, *pid, *t) {
            Ok(fd) => Found::Same(Watch::Pidfd(fd)),
            Err(why) => Found::Gone(why),
        },
        Holder::Unit {
            name,
            invocation_id,
        } => {
            let Some(bus) = bus else {
                return Found::Unknown("hypemand has no bus to ask systemd on".into());
            };
            match units::unit_run(bus, name).await {
                Ok(None) => Found::Gone(format!("systemd no longer knows unit {name}")),
                Ok(Some((_, run))) if run.invocation != *invocation_id => {
                    Found::Gone(format!(
                        "unit {name} is another run now (invocation {:?}, the holder's was {invocation_id})",
                        run.invocation
                    ))
                }
                Ok(Some((_, run))) if !run.running() => {
                    Found::Gone(format!("unit {name} is {}", run.state))
                }
                Ok(Some(_)) => Found::Same(Watch::Unit(bus.clone())),
                Err(e) => Found::Unknown(format!("cannot ask systemd about unit {name}: {e}")),
            }
        }
    }
}

/// The systemd unit `/proc/PID/cgroup` puts a process in (the first
/// `.service` or `.scope` below the slices of its cgroup v2 path), shown
/// beside its pid. Only shown: a process may move, and the lease is on
/// the process.
fn process_unit(pid: u32) -> Option<String> {
    let text = read_proc(&format!("/proc/{pid}/cgroup")).ok()?;
    unit_of_cgroup(&text)
}

fn unit_of_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/')
        .filter(|c| !c.ends_with(".slice"))
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .filter(|c| hypeman_api::options::validate_unit_name(c).is_ok())
        .map(String::from)
}

/// What a lease holds: a device's attachment, or a vGPU.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Leased {
    Device(String),
    Vgpu(String),
}

impl std::fmt::Display for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leased::Device(id) => write!(f, "device {id}"),
            Leased::Vgpu(id) => write!(f, "vGPU {id}"),
        }
    }
}

/// The watches, one per leased device or vGPU.
#[derive(Default)]
pub struct Leases {
    watches: Mutex<HashMap<Leased, (Lease, tokio::task::AbortHandle)>>,
}

impl Leases {
    fn set(&self, what: Leased, lease: Lease, task: tokio::task::AbortHandle) {
        let old = self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what, (lease, task));
        if let Some((_, t)) = old {
            t.abort();
        }
    }

    /// Ends the watch of `what` (of any lease, or only of `lease`).
    fn end(&self, what: &Leased, lease: Option<&Lease>) {
        let mut w = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if w.get(what)
            .is_some_and(|(l, _)| lease.is_none_or(|x| x == l))
        {
            if let Some((_, t)) = w.remove(what) {
                // Not the running task itself: it ends by returning.
                if lease.is_none() {
                    t.abort();
                }
            }
        }
    }
}

impl Service {
    /// Watches for the end of the holder of `what`'s `lease`.
    fn watch_lease(&self, what: Leased, lease: Lease, watch: Watch) {
        let me = self.me.clone();
        let (leased, held) = (what.clone(), lease.clone());
        let task = tokio::spawn(async move {
            let reason = match (watch, &held.holder) {
                // Readable once the process has exited; an error means the
                // fd can no longer be watched, which only its end explains.
                (Watch::Pidfd(fd), _) => {
                    let _ = fd.readable().await;
                    "the holder exited".to_string()
                }
                (
                    Watch::Unit(bus),
                    Holder::Unit {
                        name,
                        invocation_id,
                    },
                ) => match units::unit_end(&bus, name, invocation_id).await {
                    Ok(reason) => reason,
                    Err(e) => {
                        unwatched(&leased, &held, &e);
                        return;
                    }
                },
                (Watch::Unit(_), Holder::Process { .. }) => return,
            };
            crate::pause::at(crate::pause::Point::HolderEnded);
            if let Some(service) = me.upgrade() {
                match &leased {
                    Leased::Device(id) => service.release_lease(id, &held, &reason).await,
                    Leased::Vgpu(id) => service.release_vgpu_lease(id, &held, &reason).await,
                }
            }
        });
        self.leases.set(what, lease, task.abort_handle());
    }

    /// Watches a lease just stored by Attach (or CreateVgpu).
    pub(super) fn start_lease(&self, what: Leased, request: &LeaseRequest) {
        self.watch_lease(what, request.lease.clone(), request.watch.clone());
    }

    /// *(issue 27)* The bus systemd is asked on about unit holders: the
    /// daemon's own, once connected.
    pub fn set_holders_bus(&self, bus: zbus::Connection) {
        let _ = self.holders_bus.set(bus);
    }

    /// The bus unit holders are asked about on, once there is one.
    pub fn holders_bus(&self) -> Option<&zbus::Connection> {
        self.holders_bus.get()
    }

    /// A Detach (or Delete, or DeleteVgpu) ends the watch of whatever
    /// lease `what` had.
    pub(super) fn end_lease(&self, what: &Leased) {
        self.leases.end(what, None);
    }

    /// A release ends the watch of `lease` (from within it: not aborted).
    pub(super) fn end_lease_of(&self, what: &Leased, lease: &Lease) {
        self.leases.end(what, Some(lease));
    }

    /// Releases `id` if it still has `lease`: the attachment is cleared
    /// and, for `give-back`, the device goes back to its host driver, under
    /// the device's lock as Detach and Unbind do.
    pub async fn release_lease(&self, id: &str, lease: &Lease, reason: &str) {
        self.end_lease_of(&Leased::Device(id.to_string()), lease);
        let Some(stored) = self.snapshot().by_id(id).cloned() else {
            return;
        };
        let target = Target(stored, false);
        let result = self
            .with_device(&target, |s, live| async move {
                let before = self.view(s.clone(), live.clone());
                if s.lease.as_ref() != Some(lease) {
                    // Detached, or leased again, meanwhile.
                    return Ok((before.clone(), before));
                }
                let stored = self
                    .modify(&s.id, |d| {
                        d.attached_to = None;
                        d.lease = None;
                    })
                    .await?;
                tracing::info!(
                    pci_address = %stored.pci_address,
                    device_id = %stored.id,
                    device_name = %stored.name,
                    instance = %s.attached_to.as_deref().unwrap_or_default(),
                    holder = %lease.describe(),
                    on_release = %lease.on_release.as_str(),
                    %reason,
                    "lease released: device detached"
                );
                if lease.on_release == OnRelease::Detach {
                    return Ok((before, self.view(stored, live)));
                }
                let _group = self.hold_group(&stored, live.as_ref(), None).await?;
                let (_, after) = self.unbind_locked(stored, live).await?;
                tracing::info!(
                    pci_address = %after.stored.pci_address,
                    device_id = %after.stored.id,
                    driver = %after.driver().unwrap_or("(none)"),
                    "lease released: device given back to the host"
                );
                Ok((before, after))
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(
                device_id = %id,
                holder = %lease.describe(),
                error = %e,
                "releasing a lease did not finish"
            );
        }
    }

    /// At start-up, before READY (and after the vGPU claims are resolved):
    /// each stored lease, a device's or a vGPU's, whose holder is the same
    /// (a process of the same boot, pid and start time; a unit running the
    /// same invocation) is watched again; every other is released. A unit
    /// lease systemd cannot be asked about is kept, unwatched, and logged:
    /// releasing a device whose holder may still run is the worse mistake.
    pub async fn reconcile_leases(&self) {
        let snapshot = self.snapshot();
        let devices = snapshot
            .iter()
            .filter_map(|d| Some((Leased::Device(d.id.clone()), d.lease.clone()?)));
        let vgpus = snapshot
            .vgpus()
            .filter_map(|v| Some((Leased::Vgpu(v.id.clone()), v.lease.clone()?)));
        let leased: Vec<(Leased, Lease)> = devices.chain(vgpus).collect();
        drop(snapshot);
        for (what, lease) in leased {
            match recognise(&lease, self.holders_bus()).await {
                Found::Same(watch) => {
                    tracing::info!(leased = %what, holder = %lease.describe(), "lease kept: the holder still runs");
                    self.watch_lease(what, lease, watch);
                }
                Found::Gone(why) => match &what {
                    Leased::Device(id) => self.release_lease(id, &lease, &why).await,
                    Leased::Vgpu(id) => self.release_vgpu_lease(id, &lease, &why).await,
                },
                Found::Unknown(why) => tracing::warn!(
                    leased = %what,
                    holder = %lease.describe(),
                    reason = %why,
                    "lease kept unwatched: its holder cannot be asked about; detach the device (or delete the vGPU) when the holder is gone"
                ),
            }
        }
    }
}

/// A unit's watch ended without telling its end (systemd unreachable).
fn unwatched(what: &Leased, lease: &Lease, e: &UnitError) {
    tracing::warn!(
        leased = %what,
        holder = %lease.describe(),
        error = %e,
        "cannot watch the holder unit any more: the lease stays until the device is detached"
    );
}

/// The check Attach makes of a lease on a device already attached to the
/// same instance: the same lease (or none asked) answers as it is.
pub(super) fn same_attachment(stored: Option<&Lease>, asked: Option<&LeaseRequest>) -> bool {
    match (stored, asked) {
        (_, None) => true,
        (Some(l), Some(r)) => *l == r.lease,
        (None, Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_of_a_cgroup_path() {
        let unit = |t: &str| unit_of_cgroup(t);
        assert_eq!(
            unit("0::/system.slice/vm-1.service\n").as_deref(),
            Some("vm-1.service")
        );
        assert_eq!(
            unit("0::/machine.slice/machine-qemu\\x2d1.scope/libvirt/vcpu0").as_deref(),
            Some("machine-qemu\\x2d1.scope")
        );
        assert_eq!(unit("0::/user.slice/user-1000.slice"), None);
        assert_eq!(unit("0::/"), None);
        // cgroup v1 lines only: no unified path.
        assert_eq!(unit("1:name=systemd:/system.slice/x.service"), None);
        assert_eq!(unit("0::/system.slice/a b.service"), None);
    }

    #[test]
    fn start_time_is_field_22_whatever_the_name() {
        let fields = |name: &str| {
            format!("4242 ({name}) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10")
        };
        assert_eq!(parse_start_time(&fields("qemu")), Some(987654));
        assert_eq!(parse_start_time(&fields("a) b ) 1 2 3")), Some(987654));
        assert_eq!(parse_start_time("4242 (x) S 1 2"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn our_own_process_is_recognised_and_a_file_is_not_a_pidfd() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let me = pidfd_open(std::process::id()).unwrap();
            let r = LeaseRequest::on_pidfd(&me, OnRelease::Detach).unwrap();
            assert_eq!(r.lease.pid(), Some(std::process::id()));
            assert!(matches!(
                recognise(&r.lease, None).await,
                Found::Same(Watch::Pidfd(_))
            ));
            // The same pid with another start time is another process.
            let mut reused = r.lease.clone();
            if let Holder::Process { start_time, .. } = &mut reused.holder {
                *start_time += 1;
            }
            let Found::Gone(why) = recognise(&reused, None).await else {
                panic!("a reused pid was recognised");
            };
            assert!(why.contains("another process"), "{why}");
            // A unit lease with no bus to ask on is kept, not released.
            let unit = Lease {
                holder: Holder::Unit {
                    name: "vm-1.service".into(),
                    invocation_id: "0".repeat(32),
                },
                on_release: OnRelease::Detach,
            };
            assert!(matches!(recognise(&unit, None).await, Found::Unknown(_)));
            let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
            let e = LeaseRequest::on_pidfd(&file, OnRelease::Detach).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(m) if m.contains("not a pidfd")));
        });
    }
}
