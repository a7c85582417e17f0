//! The one door to the host: every read and every write runs on a blocking
//! thread, under the deadline, and nothing above it touches sysfs.
//!
//! Why a door and not plain calls: a sysfs read can block in the kernel (reading
//! `driver_override` takes the device lock, which a driver stuck in `remove()`
//! holds; a hostile `--sysfs-root` tree can put a FIFO where an attribute
//! should be). On the async runtime that would freeze the whole daemon. Here
//! the caller gets `Timeout` at the deadline, and the thread left behind is
//! remembered against the device it is stuck on: until it returns, the next
//! caller for that device is answered `Timeout` at once instead of leaving one
//! more thread stuck behind it. Other devices are not affected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::units::{Holder, UnitError, Units};
use super::usage::Walked;
use super::{Host, HostDevice, HostError, HostOp};
use crate::pci::PciAddress;

/// Why a call through the door did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    #[error("an earlier call on {0} is still stuck in the kernel; try again once it returns")]
    Stuck(Key),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{0}")]
    Verify(String),
}

impl StepError {
    /// Both a call that ran out of time and one refused because an earlier
    /// call is still stuck are timeouts to the caller.
    pub fn is_timeout(&self) -> bool {
        matches!(self, StepError::Timeout(_) | StepError::Stuck(_))
    }
}

/// What a blocking call can be stuck on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Device(PciAddress),
    /// A write; never refused, never marked (see [`Door::write`]).
    Write(PciAddress),
    /// A call about the host as a whole (enumeration, an IOMMU group, drivers).
    Host,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Device(a) | Key::Write(a) => write!(f, "{a}"),
            Key::Host => f.write_str("the host's PCI devices"),
        }
    }
}

/// Calls abandoned at their deadline and still running, per key.
type Stuck = Arc<Mutex<HashMap<Key, usize>>>;

/// Where a multi-device call has got to, so a timeout blames the device it is
/// stuck on rather than the whole host.
#[derive(Clone, Default)]
pub struct Progress(Arc<Mutex<Option<PciAddress>>>);

impl Progress {
    fn at(&self, a: Option<PciAddress>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }
    fn current(&self) -> Option<PciAddress> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The last walk's start number and result.
type LastWalk = Option<(u64, Arc<Walked>)>;

/// The walk of /proc, shared: one runs at a time, and a caller uses the
/// result of a walk that started after it asked (so what it is told is never
/// older than its question), joining the queue otherwise. A flood of
/// ListAvailable calls therefore costs at most one walk after another, and a
/// Bind behind it waits for at most the walk in progress and the next one.
#[derive(Default)]
struct Walks {
    /// The last walk; held while a walk runs.
    last: Arc<tokio::sync::Mutex<LastWalk>>,
    /// Walks started so far.
    started: std::sync::atomic::AtomicU64,
}

/// The default budget of one walk of /proc (`--usage-timeout`).
pub const USAGE_DEADLINE: Duration = Duration::from_secs(5);

/// The host, seen through deadlines.
#[derive(Clone)]
pub struct Door {
    host: Arc<dyn Host>,
    deadline: Duration,
    /// How long one walk of /proc may take before it stops and says how far
    /// it got.
    usage_deadline: Duration,
    walks: Arc<Walks>,
    stuck: Stuck,
    virtual_machine: Arc<tokio::sync::OnceCell<bool>>,
    acs_override: Arc<tokio::sync::OnceCell<bool>>,
    units: Arc<Units>,
}

impl Door {
    pub fn new(host: Arc<dyn Host>, deadline: Duration) -> Self {
        Door {
            host,
            deadline,
            usage_deadline: USAGE_DEADLINE,
            walks: Arc::default(),
            stuck: Arc::default(),
            virtual_machine: Arc::default(),
            acs_override: Arc::default(),
            units: Arc::new(Units::None),
        }
    }

    /// How long one host call may take.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Asks and moves holder services through `units` (default: none).
    pub fn with_units(mut self, units: Units) -> Self {
        self.units = Arc::new(units);
        self
    }

    /// Gives each walk of /proc `d` (default [`USAGE_DEADLINE`]).
    pub fn with_usage_deadline(mut self, d: Duration) -> Self {
        self.usage_deadline = d;
        self
    }

    fn is_stuck(&self, key: Key) -> bool {
        self.stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|n| *n > 0)
    }

    /// Runs one blocking host call for `key`. On timeout the thread is left to
    /// finish on its own (a call stuck in the kernel cannot be cancelled) and
    /// the key is marked stuck until it does.
    async fn call<T: Send + 'static>(
        &self,
        key: Key,
        f: impl FnOnce(&dyn Host, &Progress) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, StepError> {
        let marks = !matches!(key, Key::Write(_));
        if marks && self.is_stuck(key) {
            return Err(StepError::Stuck(key));
        }
        let host = self.host.clone();
        let stuck = self.stuck.clone();
        let progress = Progress::default();
        // Under `stuck`'s lock: `Some(key)` once abandoned, so the thread knows
        // what to release; `None` while the caller still waits.
        let abandoned: Arc<Mutex<Option<Option<Key>>>> = Arc::new(Mutex::new(None));
        let (p, ab) = (progress.clone(), abandoned.clone());
        let task = tokio::task::spawn_blocking(move || {
            let r = f(&*host, &p);
            let mut s = stuck.lock().unwrap_or_else(|e| e.into_inner());
            let mut ab = ab.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(Some(k)) = ab.take() {
                if let Some(n) = s.get_mut(&k) {
                    *n -= 1;
                    if *n == 0 {
                        s.remove(&k);
                    }
                }
                tracing::info!(key = %k, "a stuck host call returned");
            }
            // Mark done: a timeout racing with this return must not mark it.
            *ab = Some(None);
            r
        });
        match tokio::time::timeout(self.deadline, task).await {
            Err(_) => {
                let mut s = self.stuck.lock().unwrap_or_else(|e| e.into_inner());
                let mut ab = abandoned.lock().unwrap_or_else(|e| e.into_inner());
                if ab.is_none() && marks {
                    let blame = progress.current().map_or(key, Key::Device);
                    *s.entry(blame).or_default() += 1;
                    *ab = Some(Some(blame));
                    tracing::warn!(key = %blame, deadline_ms = self.deadline.as_millis() as u64, "a host call is stuck in the kernel");
                }
                Err(StepError::Timeout(self.deadline))
            }
            Ok(Err(join)) => Err(StepError::Verify(format!("the host call failed: {join}"))),
            Ok(Ok(r)) => r.map_err(StepError::Host),
        }
    }

    /// Reads one device.
    pub async fn read(&self, address: PciAddress) -> Result<Option<HostDevice>, StepError> {
        self.call(Key::Device(address), move |h, _| h.device(address))
            .await
    }

    /// One read per item in one blocking call, each with its own outcome:
    /// the batch costs one hop off the runtime, not one per item. An item
    /// whose function is known to be stuck is not read: it answers `Stuck`,
    /// and the others are read.
    async fn each<I, T>(
        &self,
        items: Vec<I>,
        address: fn(&I) -> PciAddress,
        read: fn(&dyn Host, &I) -> Result<T, HostError>,
    ) -> Result<Vec<Result<T, StepError>>, StepError>
    where
        I: Send + 'static,
        T: Send + 'static,
    {
        let stuck: Vec<bool> = items
            .iter()
            .map(|i| self.is_stuck(Key::Device(address(i))))
            .collect();
        self.call(Key::Host, move |h, progress| {
            Ok(items
                .iter()
                .zip(stuck)
                .map(|(i, stuck)| {
                    let a = address(i);
                    if stuck {
                        return Err(StepError::Stuck(Key::Device(a)));
                    }
                    progress.at(Some(a));
                    let r = read(h, i).map_err(StepError::Host);
                    progress.at(None);
                    r
                })
                .collect())
        })
        .await
    }

    /// Reads many devices in one blocking call, each with its own outcome.
    pub async fn read_many(
        &self,
        addresses: Vec<PciAddress>,
    ) -> Result<Vec<Result<Option<HostDevice>, StepError>>, StepError> {
        self.each(addresses, |a| *a, |h, a| h.device(*a)).await
    }

    /// *(issue 29)* The AER totals of many functions in one blocking call;
    /// a function stuck, or whose counters cannot be read, is `None`.
    pub async fn aer_many(
        &self,
        addresses: Vec<PciAddress>,
    ) -> Result<Vec<Option<super::aer::AerCounts>>, StepError> {
        let read = self.each(addresses, |a| *a, |h, a| h.aer(*a)).await?;
        Ok(read.into_iter().map(|r| r.ok().flatten()).collect())
    }

    /// Every PCI function on the host.
    pub async fn devices(&self) -> Result<Vec<HostDevice>, StepError> {
        self.call(Key::Host, |h, _| h.devices()).await
    }

    /// Whether the host is a virtual machine: read once, then remembered (it
    /// does not change while the daemon runs).
    pub async fn virtual_machine(&self) -> Result<bool, StepError> {
        self.virtual_machine
            .get_or_try_init(|| self.call(Key::Host, |h, _| Ok(h.virtual_machine())))
            .await
            .copied()
    }

    /// *(issue 28)* Reads the host's `alias vfio_pci:` table once, for the
    /// daemon's life ([`super::variant`]); says how many variant drivers it
    /// names.
    pub async fn load_vfio_aliases(&self) -> usize {
        let text = self
            .call(Key::Host, |h, _| Ok(h.vfio_aliases()))
            .await
            .unwrap_or_default();
        let table = super::variant::VfioAliases::parse(&text);
        let variants = table.variants();
        super::variant::set_table(table);
        variants
    }

    /// *(issue 28)* Whether the kernel runs with `pcie_acs_override=`: read
    /// once, then remembered (the command line is the boot's).
    pub async fn acs_override(&self) -> Result<bool, StepError> {
        self.acs_override
            .get_or_try_init(|| {
                self.call(Key::Host, |h, _| {
                    Ok(super::acs_override(&h.kernel_cmdline()))
                })
            })
            .await
            .copied()
    }

    /// How the host uses each of `addresses`, from a walk of /proc that
    /// started after this call (see `Walks`). Never an error and never a
    /// stuck mark: a walk that runs out of its own deadline says how far it
    /// got, one that does not return at all (a syscall stuck in the kernel)
    /// leaves the addresses unknown, and the caller decides (Bind answers
    /// `Busy` unless forced). Other reads are not held up by either.
    pub async fn usage(&self, addresses: Vec<PciAddress>) -> Walked {
        use std::sync::atomic::Ordering;
        let unknown = |why: String| Walked {
            unknown: addresses.iter().map(|a| (*a, why.clone())).collect(),
            ..Walked::default()
        };
        let arrived = self.walks.started.load(Ordering::SeqCst);
        // Waiting for the walk in progress, then running ours.
        let bound = self.usage_deadline + self.deadline;
        let guard = match tokio::time::timeout(bound, self.walks.last.clone().lock_owned()).await {
            Ok(g) => g,
            Err(_) => {
                return unknown(format!(
                    "could not finish: an earlier walk of /proc is still running after {bound:?}"
                ))
            }
        };
        if let Some((n, w)) = guard.as_ref() {
            if *n > arrived {
                return w.only(&addresses);
            }
        }
        let n = self.walks.started.fetch_add(1, Ordering::SeqCst) + 1;
        let host = self.host.clone();
        let until = std::time::Instant::now() + self.usage_deadline;
        // The guard goes with the walk: a walk stuck in a syscall keeps the
        // next ones waiting (answered as above) instead of piling up threads.
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            let began = std::time::Instant::now();
            let w = Arc::new(host.usage(until));
            tracing::debug!(
                processes = w.processes,
                fds = w.fds,
                elapsed_us = began.elapsed().as_micros() as u64,
                "walked /proc"
            );
            *guard = Some((n, w.clone()));
            w
        });
        match tokio::time::timeout(bound, task).await {
            Ok(Ok(w)) => {
                if let Some(u) = w.unfinished {
                    tracing::warn!(
                        processes = u.processes,
                        fds = u.fds,
                        within_ms = u.within.as_millis() as u64,
                        "the walk of /proc ran out of time"
                    );
                }
                w.only(&addresses)
            }
            Ok(Err(join)) => unknown(format!("the walk of /proc failed: {join}")),
            Err(_) => {
                tracing::warn!(
                    bound_ms = bound.as_millis() as u64,
                    "the walk of /proc has not returned"
                );
                unknown(format!(
                    "could not finish: the walk of /proc did not return within {bound:?}"
                ))
            }
        }
    }

    /// The active service holding devices bound to `driver`, under the
    /// deadline.
    pub async fn holder(&self, driver: &str) -> Result<Option<Holder>, UnitError> {
        tokio::time::timeout(self.deadline, self.units.holder(driver))
            .await
            .map_err(|_| UnitError::Timeout(self.deadline))?
    }

    /// Stops or starts a holder service, under the deadline.
    pub async fn set_unit(&self, unit: &str, active: bool) -> Result<(), UnitError> {
        tokio::time::timeout(self.deadline, self.units.set(unit, active))
            .await
            .map_err(|_| UnitError::Timeout(self.deadline))?
    }

    /// The members of an IOMMU group.
    pub async fn group_members(&self, group: u32) -> Result<Vec<HostDevice>, StepError> {
        self.call(Key::Host, move |h, _| h.group_members(group))
            .await
    }

    /// *(issue 26)* Who holds these VFIO nodes open, within the walk's
    /// deadline; `Err` (why) when that could not be told.
    pub async fn vfio_holders(&self, nodes: Vec<String>) -> Result<Vec<String>, String> {
        let until = std::time::Instant::now() + self.usage_deadline;
        match self
            .call(Key::Host, move |h, _| Ok(h.vfio_holders(&nodes, until)))
            .await
        {
            Ok(r) => r,
            Err(e) => Err(e.to_string()),
        }
    }

    /// *(issue 26)* One read about `function` by the host.
    pub async fn host_call<T: Send + 'static>(
        &self,
        function: PciAddress,
        f: impl FnOnce(&dyn Host) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, StepError> {
        self.call(Key::Device(function), move |h, _| f(h)).await
    }

    /// *(issue 26)* The vGPU slots of `parent`.
    pub async fn vgpu_slots(
        &self,
        parent: &HostDevice,
    ) -> Result<Vec<super::vgpu::Slot>, StepError> {
        let p = parent.clone();
        self.call(Key::Device(parent.address), move |h, _| h.vgpu_slots(&p))
            .await
    }

    /// *(issue 30)* The vGPU slots of many functions in one blocking call,
    /// each with its own outcome.
    pub async fn vgpu_slots_many(
        &self,
        parents: Vec<HostDevice>,
    ) -> Result<Vec<Result<Vec<super::vgpu::Slot>, StepError>>, StepError> {
        self.each(parents, |p| p.address, |h, p| h.vgpu_slots(p))
            .await
    }

    /// Loads a driver module if needed; true when it is loaded afterwards.
    pub async fn load_driver(&self, driver: &str) -> Result<bool, StepError> {
        let driver = driver.to_string();
        self.call(Key::Host, move |h, _| Ok(h.load_driver(&driver)))
            .await
    }

    /// One write to the kernel. Writes happen under the device's lock in the
    /// service, one at a time, and a rollback must be able to follow a write
    /// that timed out: they are not refused for an earlier stuck read, and a
    /// stuck write does not mark the device.
    pub async fn write(&self, address: PciAddress, op: HostOp) -> Result<(), StepError> {
        self.call(Key::Write(address), move |h, _| op.apply(h, address))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::sysfs::tests::add_device;
    use crate::host::sysfs::SysfsHost;

    /// A FIFO where `vendor` should be blocks the read forever: the caller gets
    /// `Timeout`, the next caller for that device is refused at once without a
    /// second stuck thread, and another device reads as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_read_holds_only_its_own_device() {
        let root = tempfile::tempdir().unwrap();
        let ids = ("0x10de", "0x27b8", "0x030200");
        add_device(root.path(), "0000:a2:00.0", ids, Some("nvidia"), Some(82));
        add_device(root.path(), "0000:b2:00.0", ids, Some("nvidia"), Some(83));
        let vendor = root.path().join("devices/pci0000:00/0000:a2:00.0/vendor");
        std::fs::remove_file(&vendor).unwrap();
        let c = std::ffi::CString::new(vendor.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let door = Door::new(
            Arc::new(SysfsHost::new(root.path())),
            Duration::from_millis(200),
        );
        let stuck = PciAddress::parse("0000:a2:00.0").unwrap();
        let other = PciAddress::parse("0000:b2:00.0").unwrap();
        assert!(matches!(door.read(stuck).await, Err(StepError::Timeout(_))));
        assert!(matches!(door.read(stuck).await, Err(StepError::Stuck(_))));
        assert!(door.read(other).await.unwrap().is_some());
        // A bulk read skips the stuck device and reads the rest.
        let many = door.read_many(vec![stuck, other]).await.unwrap();
        assert!(matches!(many[0], Err(StepError::Stuck(_))));
        assert!(many[1].as_ref().unwrap().is_some());
        // Unblock the reader (open the FIFO for writing, put a real attribute
        // in its place, close): the device reads again once the stuck thread
        // has returned, and only then.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(&vendor)
            .unwrap();
        std::fs::remove_file(&vendor).unwrap();
        std::fs::write(&vendor, "0x10de\n").unwrap();
        drop(w);
        loop {
            match door.read(stuck).await {
                Err(StepError::Stuck(_)) => tokio::task::yield_now().await,
                other => {
                    assert!(other.unwrap().is_some());
                    break;
                }
            }
        }
    }
}
