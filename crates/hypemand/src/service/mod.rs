//! The service: the one place the rules live, and the one owner of the state.
//!
//! Every front end (the D-Bus methods, the hotplug events) calls in here, and
//! nothing here knows about D-Bus. The service owns the registry: reads take a
//! snapshot and never wait for the disk or for another device's kernel
//! operation; changes to the registry are checked one at a time and written to
//! the store before they become visible; operations on one device are serialised by that
//! device's own lock, so a bind stuck in the kernel holds up nobody else.
//!
//! - [`registry`]: Register, List, Get, ListAvailable, Delete, and resolving a
//!   caller's key to one record;
//! - [`placement`]: where a device is against where it should be, decided once;
//! - [`blockers`]: why a function must not be taken from the host;
//! - [`transitions`]: Bind, Unbind, Attach, Detach and reconciling, with rollback;
//! - [`group`]: the IOMMU group as the unit of assignment;
//! - [`hotplug`]: what the host's events mean for the registered devices;
//! - [`leases`]: attachments released when their holder ends;
//! - [`commit`]: the way every change takes to disk, group-committed;
//! - [`request`]: what an edge may ask for, as values ([`Op`], [`Candidate`]);
//! - [`seen`]: the host state clients were last told about;
//! - [`sriov`]: a physical function's virtual functions;
//! - [`vgpu`]: the vGPU types registered GPUs offer, and GPU capacity;
//! - [`vgpus`]: the vGPUs made (Create, Delete, List, start-up);
//! - [`census`]: what a metrics scrape shows of the devices;
//! - [`health`]: a verdict per device from its PCIe error counters;
//! - [`status`]: the summary systemd's status line shows;
//! - [`error`]: the daemon's failures as the contract's errors.

pub mod blockers;
pub mod census;
pub mod commit;
pub mod error;
pub mod group;
pub mod health;
pub mod hotplug;
pub mod identity;
pub mod leases;
pub mod placement;
pub mod registry;
pub mod request;
pub mod seen;
pub mod sriov;
pub mod status;
pub mod transitions;
pub mod vgpu;
pub mod vgpus;
pub mod warnings;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use hypeman_api::{Available, Record};

use crate::host::door::Door;
use crate::host::HostDevice;
use crate::pci::{DeviceType, PciAddress, PciIds};
use crate::store::{Registry, StoredDevice};
pub use error::Result;
pub use request::{Candidate, Op};

/// A registered device as clients see it: what the store keeps, joined with what
/// the kernel says right now.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub stored: StoredDevice,
    /// `None` while the device is not on the host (unplugged).
    pub live: Option<HostDevice>,
    pub vendor_name: String,
    pub device_name: String,
    /// *(issue 29)* The verdict from the counters last read.
    pub health: health::Health,
}

impl DeviceView {
    pub fn driver(&self) -> Option<&str> {
        self.live.as_ref()?.driver.as_deref()
    }
    /// On vfio-pci or a variant of it *(issue 28)*.
    pub fn bound_to_vfio(&self) -> bool {
        self.live
            .as_ref()
            .is_some_and(crate::host::variant::on_vfio)
    }
    pub fn present(&self) -> bool {
        self.live.is_some()
    }
    pub fn iommu_group(&self) -> Option<u32> {
        self.live.as_ref()?.iommu_group
    }

    /// The contract's record: the one place a view becomes what clients get.
    pub fn record(&self) -> Record {
        self.clone().into_record()
    }

    /// The record, moving the view's strings instead of copying them (a
    /// `List` of thousands of devices makes one per device).
    pub fn into_record(self) -> Record {
        let (iommu_group, bound_to_vfio, present) =
            (self.iommu_group(), self.bound_to_vfio(), self.present());
        let hardware_changed = self
            .live
            .as_ref()
            .and_then(|l| identity::changed(&self.stored, l));
        let vfio_driver = self.live.as_ref().map(crate::host::variant::shown);
        let vfio_devices = self
            .live
            .as_ref()
            .and_then(|l| l.vfio_dev.as_ref())
            .map(|n| vec![format!("/dev/vfio/devices/{n}"), "/dev/iommu".to_string()])
            .unwrap_or_default();
        let (driver, numa_node, sriov, physfn, reset_method) = match self.live {
            Some(l) => (l.driver, l.numa_node, l.sriov, l.physfn, l.reset_method),
            None => (None, None, None, None, None),
        };
        let s = self.stored;
        let lease = LeaseShown::of(s.lease.as_ref());
        let health = Some(self.health.as_str().to_string());
        let registered = s.identity.as_ref();
        Record {
            id: s.id,
            name: s.name,
            pci_address: s.pci_address.to_string(),
            vendor_id: s.vendor_id,
            device_id: s.device_id,
            kind: s.kind.as_str().to_string(),
            iommu_group: iommu_group.map(i64::from),
            bound_to_vfio,
            attached_to: s.attached_to,
            created_at: s.created_at,
            driver,
            present,
            vendor_name: self.vendor_name,
            device_name: self.device_name,
            numa_node: numa_node.map(i64::from),
            tags: s.tags.into_iter().collect(),
            sriov_total_vfs: sriov.map(|s| i64::from(s.total_vfs)),
            sriov_vfs: sriov.map(|s| i64::from(s.num_vfs)),
            parent: physfn.map(|p| p.to_string()),
            holder_pid: lease.pid,
            holder_unit: lease.unit,
            holder_invocation: lease.invocation,
            on_release: lease.on_release,
            reset_method,
            subsystem_vendor_id: registered.map(|i| i.subsystem_vendor.clone()),
            subsystem_device_id: registered.map(|i| i.subsystem_device.clone()),
            registered_iommu_group: registered.and_then(|i| i.iommu_group).map(i64::from),
            hardware_changed,
            vfio_driver,
            vfio_devices,
            health,
        }
    }
}

/// *(issue 27)* A lease as records show it (a device's or a vGPU's).
#[derive(Debug, Default)]
pub struct LeaseShown {
    pub pid: Option<i64>,
    pub unit: Option<String>,
    pub invocation: Option<String>,
    pub on_release: Option<String>,
}

impl LeaseShown {
    pub fn of(lease: Option<&crate::store::registry::Lease>) -> LeaseShown {
        let Some(l) = lease else {
            return LeaseShown::default();
        };
        LeaseShown {
            pid: l.pid().map(i64::from),
            unit: l.unit().map(String::from),
            invocation: l.invocation().map(String::from),
            on_release: Some(l.on_release.as_str().to_string()),
        }
    }
}

/// A PCI function on the host, registered or not (`ListAvailable`).
#[derive(Debug, Clone)]
pub struct AvailableView {
    pub host: HostDevice,
    pub kind: DeviceType,
    pub vendor_name: String,
    pub device_name: String,
    pub registered_as: Option<String>,
    pub blockers: Vec<blockers::Blocker>,
    /// *(issue 28)* What does not block but should be known.
    pub warnings: Vec<hypeman_api::Blocker>,
}

impl AvailableView {
    /// The contract's available-device dictionary.
    pub fn record(&self) -> Available {
        Available {
            pci_address: self.host.address.to_string(),
            vendor_id: format!("{:04x}", self.host.vendor),
            device_id: format!("{:04x}", self.host.device),
            vendor_name: self.vendor_name.clone(),
            device_name: self.device_name.clone(),
            iommu_group: self.host.iommu_group.map(i64::from),
            current_driver: self.host.driver.clone(),
            kind: self.kind.as_str().to_string(),
            registered_as: self.registered_as.clone(),
            numa_node: self.host.numa_node.map(i64::from),
            sriov_total_vfs: self.host.sriov.map(|s| i64::from(s.total_vfs)),
            sriov_vfs: self.host.sriov.map(|s| i64::from(s.num_vfs)),
            parent: self.host.physfn.map(|p| p.to_string()),
            passable: self.blockers.is_empty(),
            blockers: self
                .blockers
                .iter()
                .map(blockers::Blocker::record)
                .collect(),
            reset_method: self.host.reset_method.clone(),
            vfio_driver: Some(crate::host::variant::shown(&self.host)),
            warnings: self.warnings.clone(),
        }
    }
}

/// A registered device resolved once from what a caller named: operations act
/// on its id and nothing else, and answer `NotFound` if that id is gone.
///
/// A target may also carry the force: set only by the edge once the caller
/// was authorized for `org.hypeman.devices.force`, it lets a Bind or Attach
/// override the soft blockers (never the hard ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(Arc<StoredDevice>, bool);

impl Target {
    /// The same target, with the soft blockers overridden.
    pub fn forced(self) -> Target {
        Target(self.0, true)
    }
    pub fn is_forced(&self) -> bool {
        self.1
    }
    /// The record as it was when resolved (what authorization looked at).
    pub fn record(&self) -> &StoredDevice {
        &self.0
    }
    pub fn id(&self) -> &str {
        &self.0.id
    }
}

/// Where the service announces changes that clients must see (the bus layer).
pub trait Publisher: Send + Sync {
    /// A device was registered (called under the device's lock, so a
    /// device's announcements come in the order its changes were made).
    fn added<'a>(&'a self, device: &'a DeviceView) -> BoxFuture<'a>;
    /// A device was unregistered (likewise under the device's lock).
    fn removed<'a>(&'a self, id: &'a str) -> BoxFuture<'a>;
    /// A device's state changed from `before` to `after`.
    fn changed<'a>(&'a self, before: &'a DeviceView, after: &'a DeviceView) -> BoxFuture<'a>;
    /// A PCI function appeared on the host (registered or not).
    fn host_added<'a>(&'a self, address: PciAddress) -> BoxFuture<'a>;
    /// A PCI function left the host (registered or not).
    fn host_removed<'a>(&'a self, address: PciAddress) -> BoxFuture<'a>;
    /// *(issue 26)* A vGPU was made.
    fn vgpu_created<'a>(&'a self, vgpu: &'a hypeman_api::Vgpu) -> BoxFuture<'a>;
    /// *(issue 26)* A vGPU was deleted.
    fn vgpu_deleted<'a>(&'a self, id: &'a str) -> BoxFuture<'a>;
    /// *(issue 27)* A vGPU's instance or lease changed (a lease released).
    fn vgpu_changed<'a>(
        &'a self,
        before: &'a hypeman_api::Vgpu,
        after: &'a hypeman_api::Vgpu,
    ) -> BoxFuture<'a>;
}

pub type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The service: the rules and the one owner of the state.
pub struct Service {
    /// The one way to the host (private: edges ask the service, never the host).
    door: Door,
    ids: PciIds,
    /// The registry, published and staged, and the way changes take to disk.
    commits: commit::Commits,
    /// One lock per PCI address: operations on one device happen one at a time.
    device_locks: Mutex<HashMap<PciAddress, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per IOMMU group, taken after a device's lock (never before):
    /// the group's attachments are checked and changed one at a time.
    group_locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    publisher: OnceLock<Arc<dyn Publisher>>,
    /// The host state clients were last told about (see [`seen`]).
    seen: seen::Seen,
    /// Woken on every registry or device change (for systemd's status line).
    change_notify: tokio::sync::Notify,
    /// *(issue 30)* Woken when a read-through found a device unlike what
    /// its events said: the event path reads every function again.
    reread_wanted: tokio::sync::Notify,
    /// *(issue 30)* Set once the host's events are followed (the udev
    /// monitor, or the simulated kernel): reads then answer from the state
    /// they keep. Without events (a `--sysfs-root` tree that is not the
    /// running kernel) every read goes to the host.
    events_followed: std::sync::atomic::AtomicBool,
    /// Counts the batches of host events the hotplug path has handled: what
    /// waits for functions to appear ([`sriov`]) wakes on it.
    hotplug: tokio::sync::watch::Sender<u64>,
    /// What each GPU's driver has shown of its framebuffer ([`vgpu`]).
    vgpu_capacity: Mutex<HashMap<PciAddress, vgpu::Capacity>>,
    /// Set at shutdown: no new change may start.
    stopping: std::sync::atomic::AtomicBool,
    /// A standing remark for systemd's status line (records dropped at load).
    status_note: OnceLock<String>,
    /// *(issue 27)* The watched leases.
    leases: leases::Leases,
    /// *(issue 29)* The PCIe error counters last read, for the verdicts.
    aer: health::Counters,
    /// *(issue 30)* Each registered device's blockers as last read, by id:
    /// what `GetAll` and `GetManagedObjects` show. Forgotten at every change
    /// the daemon sees (an event, an operation, a registration).
    blockers_read: Mutex<registry::BlockersRead>,
    /// *(issue 27)* The bus systemd is asked on about unit holders.
    holders_bus: OnceLock<zbus::Connection>,
    /// The service itself, for the tasks that watch leases.
    me: Weak<Service>,
}

impl Service {
    pub fn new(door: Door, ids: PciIds, commits: commit::Commits) -> Arc<Self> {
        Arc::new_cyclic(|me| Service {
            door,
            ids,
            commits,
            device_locks: Mutex::new(HashMap::new()),
            group_locks: Mutex::new(HashMap::new()),
            publisher: OnceLock::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            seen: seen::Seen::default(),
            change_notify: tokio::sync::Notify::new(),
            reread_wanted: tokio::sync::Notify::new(),
            events_followed: std::sync::atomic::AtomicBool::new(false),
            hotplug: tokio::sync::watch::Sender::new(0),
            vgpu_capacity: Mutex::default(),
            status_note: OnceLock::new(),
            leases: leases::Leases::default(),
            holders_bus: OnceLock::new(),
            aer: health::Counters::default(),
            blockers_read: Mutex::default(),
            me: me.clone(),
        })
    }

    /// Adds a standing remark to the status line.
    pub fn set_status_note(&self, note: String) {
        let _ = self.status_note.set(note);
    }

    pub(crate) fn status_note(&self) -> Option<&str> {
        self.status_note.get().map(String::as_str)
    }

    /// Resolves at the next change of the registry or of a device's state (or
    /// at once if one happened since the last call). One waiter: systemd's
    /// status line.
    pub async fn changed(&self) {
        self.change_notify.notified().await;
    }

    fn refuse_if_stopping(&self) -> Result<()> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(error::stopping());
        }
        Ok(())
    }

    /// Connects the bus layer. Only the first call has an effect.
    pub fn set_publisher(&self, p: Arc<dyn Publisher>) {
        let _ = self.publisher.set(p);
    }

    pub(crate) fn publisher(&self) -> Option<&Arc<dyn Publisher>> {
        self.publisher.get()
    }

    /// The registry as it is now. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.commits.snapshot()
    }

    pub(crate) fn device_lock(&self, a: PciAddress) -> Arc<tokio::sync::Mutex<()>> {
        self.device_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(a)
            .or_default()
            .clone()
    }

    pub(crate) fn group_lock(&self, group: u32) -> Arc<tokio::sync::Mutex<()>> {
        self.group_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(group)
            .or_default()
            .clone()
    }

    fn names(&self, vendor: u16, device: u16) -> (String, String) {
        (
            self.ids.vendor_name(vendor).unwrap_or_default(),
            self.ids.device_name(vendor, device).unwrap_or_default(),
        )
    }

    /// Vendor and device names of a stored device.
    pub fn names_of(&self, stored: &StoredDevice) -> (String, String) {
        let vendor = u16::from_str_radix(&stored.vendor_id, 16).unwrap_or(0);
        let device = u16::from_str_radix(&stored.device_id, 16).unwrap_or(0);
        self.names(vendor, device)
    }

    pub(crate) fn view(&self, stored: StoredDevice, live: Option<HostDevice>) -> DeviceView {
        let (vendor_name, device_name) = self.names_of(&stored);
        let health = self.health_of(&stored, live.as_ref());
        DeviceView {
            stored,
            live,
            vendor_name,
            device_name,
            health,
        }
    }

    /// Refuses new changes, waits for every device operation in flight (each
    /// ends within its deadlines, rolled back if it failed) and for the last
    /// registry write, then compacts the journal into `devices.json`; used at
    /// shutdown so nothing acknowledged is cut short and no device is left
    /// between drivers.
    pub async fn quiesce(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let locks: Vec<_> = self
            .device_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for l in locks {
            std::mem::forget(l.lock_owned().await);
        }
        self.commits.close().await;
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A service on a simulated host, for the unit tests of the rules.

    use super::*;
    use crate::host::sim::SimHost;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    pub struct Fixture {
        pub sim: Arc<SimHost>,
        pub service: Arc<Service>,
        _dir: tempfile::TempDir,
    }

    /// A service on a simulated host booted from `fixture`, with an empty
    /// store in a fresh directory.
    pub fn service_on(fixture: &Path, deadline: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sim = Arc::new(SimHost::from_file(fixture).unwrap());
        let door = Door::new(sim.clone(), deadline);
        let commits = commit::Commits::start(
            crate::store::Store::new(dir.path()),
            crate::store::Opened::empty(dir.path()),
            None,
        )
        .unwrap();
        let service = Service::new(door, PciIds::default(), commits);
        Fixture {
            sim,
            service,
            _dir: dir,
        }
    }

    impl Service {
        /// SetVirtualFunctions that must be refused: its error.
        pub async fn vfs_refused(&self, target: &Target, count: u32) -> hypeman_api::Error {
            self.set_virtual_functions(target, count)
                .await
                .expect_err("SetVirtualFunctions must be refused")
        }

        /// Register, as an edge asks for it (without authorization).
        pub async fn register_at(
            &self,
            pci_address: &str,
            name: &str,
            tags: std::collections::BTreeMap<String, String>,
        ) -> Result<DeviceView> {
            let candidate = self.propose(pci_address, name, tags).await?;
            self.register(candidate).await
        }
    }

    /// A service on `fixture` (of `examples/hosts`) with the daemon's event
    /// path: the start-up enumeration, then every event the simulated kernel
    /// sends, in order.
    pub async fn with_events(fixture: &str, deadline: Duration) -> Fixture {
        service_on_events(&example(fixture), deadline).await
    }

    /// [`with_events`] on a fixture file anywhere.
    pub async fn service_on_events(fixture: &Path, deadline: Duration) -> Fixture {
        use crate::host::{EventKind, Host, HostEvent};
        let f = service_on(fixture, deadline);
        f.service.follow_events();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        f.sim.set_event_sink(Box::new(move |e| {
            let _ = tx.send(e);
        }));
        let all = f.sim.devices().unwrap().into_iter().map(|d| {
            let mut e = HostEvent::new(EventKind::Add, d.address);
            e.enumerated = true;
            e.device = Some(d);
            e
        });
        f.service.on_events(all.collect()).await;
        let service: Arc<Service> = f.service.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                service.on_events(vec![e]).await;
            }
        });
        f
    }

    impl Fixture {
        /// The IOMMU group the simulated host gives `address`.
        pub fn sim_group(&self, address: &str) -> u32 {
            use crate::host::Host;
            self.sim
                .device(PciAddress::parse(address).unwrap())
                .unwrap()
                .and_then(|d| d.iommu_group)
                .unwrap()
        }
    }

    /// A file of `examples/hosts`.
    pub fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/hosts")
            .join(name)
    }
}
