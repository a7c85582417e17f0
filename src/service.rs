//! The one place the rules live.
//!
//! Every D-Bus method (and, later, every udev event) enters here. The service owns
//! the registry: reads take a snapshot and never wait for the disk or for another
//! device's kernel operation; changes to the registry are serialised by one gate
//! and written to the store before they become visible; operations on one device
//! are serialised by that device's own lock, so a bind stuck in the kernel holds
//! up nobody else.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::error::{Error, Result};
use crate::host::{EventKind, HostDevice, HostEvent};
use crate::pci::{DeviceType, PciAddress, PciIds};
use crate::registry::store::Store;
use crate::registry::{
    new_device_id, now_rfc3339, shorten, validate_instance_id, validate_name, Change, ChangeError,
    Conflict, Registry, StoredDevice,
};
use crate::vfio::{Kernel, StepError};
use crate::VFIO_DRIVER;

/// A registered device as clients see it: what the store keeps, joined with what
/// the kernel says right now.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub stored: StoredDevice,
    /// `None` while the device is not on the host (unplugged).
    pub live: Option<HostDevice>,
    pub vendor_name: String,
    pub device_name: String,
}

impl DeviceView {
    pub fn driver(&self) -> Option<&str> {
        self.live.as_ref()?.driver.as_deref()
    }
    pub fn bound_to_vfio(&self) -> bool {
        self.driver() == Some(VFIO_DRIVER)
    }
    pub fn present(&self) -> bool {
        self.live.is_some()
    }
    pub fn iommu_group(&self) -> Option<u32> {
        self.live.as_ref()?.iommu_group
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
}

/// Where the service announces changes that clients must see (the bus layer).
pub trait Publisher: Send + Sync {
    /// A device was registered (called while the registry gate is held, so
    /// announcements come in the order the changes were made).
    fn added<'a>(&'a self, device: &'a DeviceView) -> BoxFuture<'a>;
    /// A device was unregistered (likewise under the gate).
    fn removed<'a>(&'a self, id: &'a str) -> BoxFuture<'a>;
    /// A device's state changed from `before` to `after`.
    fn changed<'a>(&'a self, before: &'a DeviceView, after: &'a DeviceView) -> BoxFuture<'a>;
    /// A PCI function appeared on the host (registered or not).
    fn host_added<'a>(&'a self, address: PciAddress) -> BoxFuture<'a>;
    /// A PCI function left the host (registered or not).
    fn host_removed<'a>(&'a self, address: PciAddress) -> BoxFuture<'a>;
}

pub type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub struct Service {
    kernel: Kernel,
    ids: PciIds,
    store: Store,
    registry: RwLock<Arc<Registry>>,
    /// Serialises registry changes; held across the store write, never by readers.
    gate: tokio::sync::Mutex<()>,
    /// One lock per PCI address: operations on one device happen one at a time.
    device_locks: Mutex<HashMap<PciAddress, Arc<tokio::sync::Mutex<()>>>>,
    publisher: OnceLock<Arc<dyn Publisher>>,
    /// The last host state the clients were told about, per address (`None`:
    /// known to be absent; no entry: never looked at). Hotplug events compare
    /// against it so that `PropertiesChanged` goes out only on a real change.
    seen: Mutex<HashMap<PciAddress, Option<HostDevice>>>,
    /// Woken on every registry or device change (for systemd's status line).
    change_notify: tokio::sync::Notify,
    /// Set at shutdown: no new change may start.
    stopping: std::sync::atomic::AtomicBool,
}

fn require_key(id_or_name: &str) -> Result<()> {
    if id_or_name.is_empty() {
        return Err(Error::InvalidArgument(
            "a device id or name is required; `hypemanctl list` shows them".into(),
        ));
    }
    Ok(())
}

fn host_error(what: String, e: StepError) -> Error {
    match e {
        StepError::Timeout(d) => {
            Error::Timeout(format!("{what}: the kernel did not answer within {d:?}"))
        }
        e => Error::Failed(format!("{what}: {e}")),
    }
}

impl Service {
    pub fn new(kernel: Kernel, ids: PciIds, store: Store, registry: Registry) -> Self {
        Service {
            kernel,
            ids,
            store,
            registry: RwLock::new(Arc::new(registry)),
            gate: tokio::sync::Mutex::new(()),
            device_locks: Mutex::new(HashMap::new()),
            publisher: OnceLock::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            seen: Mutex::new(HashMap::new()),
            change_notify: tokio::sync::Notify::new(),
        }
    }

    /// Resolves at the next change of the registry or of a device's state (or
    /// at once if one happened since the last call). One waiter: systemd's
    /// status line.
    pub async fn changed(&self) {
        self.change_notify.notified().await;
    }

    fn refuse_if_stopping(&self) -> Result<()> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Failed(
                "hypemand is stopping; try again once it is back".into(),
            ));
        }
        Ok(())
    }

    /// Connects the bus layer. Only the first call has an effect.
    pub fn set_publisher(&self, p: Arc<dyn Publisher>) {
        let _ = self.publisher.set(p);
    }

    /// The registry as it is now. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks `change`, writes the registry as it will be to disk off the
    /// reactor, then applies it. The caller holds the gate, so nothing else
    /// changes the registry in between.
    async fn commit(&self, change: Change) -> Result<()> {
        let current = self.snapshot();
        current.check(&change).map_err(change_error)?;
        let store = self.store.clone();
        let change = tokio::task::spawn_blocking(move || {
            // `current` is dropped here, so applying below copies nothing
            // unless a reader still holds this snapshot.
            store.save_with(&current, &change).map(|()| change)
        })
        .await
        .map_err(|e| Error::StoreFailed(format!("the writer thread failed: {e}")))?
        .map_err(|e| {
            tracing::error!(error = %e, "registry write failed");
            Error::StoreFailed(e.to_string())
        })?;
        {
            let mut guard = self.registry.write().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = Arc::make_mut(&mut guard).apply(change) {
                // Unreachable while the gate is held; said loudly if it ever is.
                tracing::error!(error = %e, "a checked change no longer applies");
                return Err(Error::Failed(e.to_string()));
            }
        }
        self.change_notify.notify_one();
        crate::memory::trim_soon();
        Ok(())
    }

    /// Changes one stored device durably; `NotFound` if it is gone.
    async fn modify(&self, id: &str, f: impl FnOnce(&mut StoredDevice)) -> Result<StoredDevice> {
        let _gate = self.gate.lock().await;
        let before = self
            .snapshot()
            .resolve(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let mut after = before.clone();
        f(&mut after);
        // The id, name and address are keys: they never change this way.
        after.id.clone_from(&before.id);
        after.name.clone_from(&before.name);
        after.pci_address = before.pci_address;
        if after != before {
            self.commit(Change::Replace(after.clone())).await?;
        }
        Ok(after)
    }

    fn device_lock(&self, a: PciAddress) -> Arc<tokio::sync::Mutex<()>> {
        self.device_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(a)
            .or_default()
            .clone()
    }

    /// A registered device's stored record, by id or exact name.
    pub fn resolve(&self, id_or_name: &str) -> Result<StoredDevice> {
        require_key(id_or_name)?;
        self.snapshot()
            .resolve(id_or_name)
            .cloned()
            .ok_or_else(|| Error::NotFound(shorten(id_or_name)))
    }

    async fn live(&self, address: PciAddress) -> Result<Option<HostDevice>> {
        self.kernel
            .read(address)
            .await
            .map_err(|e| host_error(format!("cannot read {address} from the host"), e))
    }

    async fn present(&self, stored: &StoredDevice) -> Result<HostDevice> {
        self.live(stored.pci_address).await?.ok_or_else(|| {
            Error::DeviceNotFound(format!(
                "{} (registered as {}; it is not on the host now, unplugged?)",
                stored.pci_address, stored.name
            ))
        })
    }

    fn names(&self, vendor: u16, device: u16) -> (String, String) {
        (
            self.ids.vendor_name(vendor).unwrap_or_default(),
            self.ids.device_name(vendor, device).unwrap_or_default(),
        )
    }

    fn view(&self, stored: StoredDevice, live: Option<HostDevice>) -> DeviceView {
        let vendor = u16::from_str_radix(&stored.vendor_id, 16).unwrap_or(0);
        let device = u16::from_str_radix(&stored.device_id, 16).unwrap_or(0);
        let (vendor_name, device_name) = self.names(vendor, device);
        DeviceView {
            stored,
            live,
            vendor_name,
            device_name,
        }
    }

    async fn publish_change(&self, before: &DeviceView, after: &DeviceView) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(after.stored.pci_address, after.live.clone());
        self.change_notify.notify_one();
        if let Some(p) = self.publisher.get() {
            p.changed(before, after).await;
        }
    }

    /// A host device by address, as `Register` would find it.
    pub async fn inspect(&self, pci_address: &str) -> Result<HostDevice> {
        let address = PciAddress::parse(pci_address)?;
        self.live(address)
            .await?
            .ok_or_else(|| Error::DeviceNotFound(address.to_string()))
    }

    /// `Register`: sets a host device aside under a new id and a unique name.
    pub async fn register(&self, pci_address: &str, name: &str) -> Result<DeviceView> {
        let address = PciAddress::parse(pci_address)?;
        if !name.is_empty() {
            validate_name(name)?;
        }
        let host = self
            .live(address)
            .await?
            .ok_or_else(|| Error::DeviceNotFound(address.to_string()))?;
        let name = if name.is_empty() {
            address.default_name()
        } else {
            name.to_string()
        };
        let stored = StoredDevice {
            id: new_device_id(),
            name,
            pci_address: address,
            vendor_id: format!("{:04x}", host.vendor),
            device_id: format!("{:04x}", host.device),
            kind: DeviceType::from_class(host.vendor, host.class),
            created_at: now_rfc3339(),
            attached_to: None,
            original_driver: None,
            want_vfio: false,
        };

        let _gate = self.gate.lock().await;
        self.refuse_if_stopping()?;
        self.commit(Change::Add(stored.clone())).await?;
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(address, Some(host.clone()));
        let view = self.view(stored, Some(host));
        tracing::info!(
            pci_address = %address,
            device_id = %view.stored.id,
            device_name = %view.stored.name,
            "device registered"
        );
        if let Some(p) = self.publisher.get() {
            p.added(&view).await;
        }
        Ok(view)
    }

    /// `List`: every registered device with its live state, read in one go.
    pub async fn list(&self) -> Result<Vec<DeviceView>> {
        let stored: Vec<StoredDevice> = self.snapshot().iter().cloned().collect();
        let addresses: Vec<PciAddress> = stored.iter().map(|d| d.pci_address).collect();
        let live = self
            .kernel
            .read_many(addresses)
            .await
            .and_then(|v| {
                v.into_iter()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StepError::Host)
            })
            .map_err(|e| {
                host_error("cannot read the registered devices from the host".into(), e)
            })?;
        Ok(stored
            .into_iter()
            .zip(live)
            .map(|(s, l)| self.view(s, l))
            .collect())
    }

    /// A device's host state as last seen (kept current by hotplug events and by
    /// every operation), without a host read: what property reads answer from.
    pub async fn cached_live(&self, stored: &StoredDevice) -> Result<Option<HostDevice>> {
        let known = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&stored.pci_address)
            .cloned();
        match known {
            Some(l) => Ok(l),
            None => {
                let l = self.live(stored.pci_address).await?;
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(stored.pci_address, l.clone());
                Ok(l)
            }
        }
    }

    /// Vendor and device names of a stored device.
    pub fn names_of(&self, stored: &StoredDevice) -> (String, String) {
        let vendor = u16::from_str_radix(&stored.vendor_id, 16).unwrap_or(0);
        let device = u16::from_str_radix(&stored.device_id, 16).unwrap_or(0);
        self.names(vendor, device)
    }

    /// `Get`: one device by id or exact name.
    pub async fn get(&self, id_or_name: &str) -> Result<DeviceView> {
        let stored = self.resolve(id_or_name)?;
        let live = self.live(stored.pci_address).await?;
        Ok(self.view(stored, live))
    }

    /// `ListAvailable`: every PCI function on the host, registered or not.
    pub async fn list_available(&self) -> Result<Vec<AvailableView>> {
        let devices = self
            .kernel
            .run(|h| h.devices())
            .await
            .map_err(|e| host_error("cannot list the host's PCI devices".into(), e))?;
        let snapshot = self.snapshot();
        Ok(devices
            .into_iter()
            .map(|host| {
                let (vendor_name, device_name) = self.names(host.vendor, host.device);
                AvailableView {
                    kind: DeviceType::from_class(host.vendor, host.class),
                    registered_as: snapshot.by_address(host.address).map(|d| d.id.clone()),
                    vendor_name,
                    device_name,
                    host,
                }
            })
            .collect())
    }

    /// Runs `op` holding the device's lock, with the stored record re-read
    /// under the lock (it may have changed or gone while we waited), then
    /// publishes what changed.
    async fn with_device<F, Fut>(&self, id_or_name: &str, op: F) -> Result<DeviceView>
    where
        F: FnOnce(StoredDevice) -> Fut,
        Fut: Future<Output = Result<(DeviceView, DeviceView)>>,
    {
        self.refuse_if_stopping()?;
        let first = self.resolve(id_or_name)?;
        let lock = self.device_lock(first.pci_address);
        let _held = lock.lock().await;
        self.refuse_if_stopping()?;
        let stored = self.resolve(&first.id)?;
        let initial = self.live(stored.pci_address).await.ok().flatten();
        match op(stored.clone()).await {
            Ok((before, after)) => {
                self.publish_change(&before, &after).await;
                Ok(after)
            }
            Err(e) => {
                // A failed operation may still have moved something (a rollback
                // that could not finish, a device that vanished): say what is
                // true now.
                if let Ok(now) = self.live(stored.pci_address).await {
                    let current = self.resolve(&stored.id).unwrap_or_else(|_| stored.clone());
                    let before = self.view(stored, initial);
                    let after = self.view(current, now);
                    self.publish_change(&before, &after).await;
                }
                Err(e)
            }
        }
    }

    /// `Bind`: moves the device to vfio-pci (idempotent).
    pub async fn bind(&self, id_or_name: &str) -> Result<DeviceView> {
        self.with_device(id_or_name, |s| self.bind_locked(s, false))
            .await
    }

    /// `Unbind`: gives the device back to its host driver (idempotent).
    pub async fn unbind(&self, id_or_name: &str) -> Result<DeviceView> {
        self.with_device(id_or_name, |s| async move {
            if let Some(instance) = &s.attached_to {
                return Err(Error::InUse {
                    name: s.name.clone(),
                    instance: instance.clone(),
                });
            }
            self.unbind_locked(s).await
        })
        .await
    }

    /// `Attach`: binds if needed, then marks the device as held by `instance`.
    pub async fn attach(&self, id_or_name: &str, instance: &str) -> Result<DeviceView> {
        validate_instance_id(instance)?;
        let instance = instance.to_string();
        self.with_device(id_or_name, |s| async move {
            match &s.attached_to {
                Some(other) if *other != instance => {
                    return Err(Error::InUse {
                        name: s.name.clone(),
                        instance: other.clone(),
                    })
                }
                Some(_) => {
                    let live = self.live(s.pci_address).await?;
                    let v = self.view(s, live);
                    return Ok((v.clone(), v));
                }
                None => {}
            }
            let (before, bound) = self.bind_locked(s, true).await?;
            let stored = self
                .modify(&bound.stored.id, |d| d.attached_to = Some(instance.clone()))
                .await?;
            tracing::info!(
                pci_address = %stored.pci_address,
                device_id = %stored.id,
                device_name = %stored.name,
                instance = %instance,
                "device attached"
            );
            Ok((before, self.view(stored, bound.live)))
        })
        .await
    }

    /// `Detach`: clears the attachment; the device stays on vfio-pci.
    pub async fn detach(&self, id_or_name: &str) -> Result<DeviceView> {
        self.with_device(id_or_name, |s| async move {
            let live = self.live(s.pci_address).await?;
            let before = self.view(s.clone(), live.clone());
            if s.attached_to.is_none() {
                return Ok((before.clone(), before));
            }
            let stored = self.modify(&s.id, |d| d.attached_to = None).await?;
            tracing::info!(
                pci_address = %stored.pci_address,
                device_id = %stored.id,
                device_name = %stored.name,
                "device detached"
            );
            Ok((before, self.view(stored, live)))
        })
        .await
    }

    /// `Delete`: unregisters. Refuses while attached; a device the daemon moved
    /// to vfio-pci is given back to its driver first.
    pub async fn delete(&self, id_or_name: &str) -> Result<StoredDevice> {
        self.refuse_if_stopping()?;
        let first = self.resolve(id_or_name)?;
        let lock = self.device_lock(first.pci_address);
        let _held = lock.lock().await;
        self.refuse_if_stopping()?;
        let stored = self.resolve(&first.id)?;
        if let Some(instance) = &stored.attached_to {
            return Err(Error::InUse {
                name: stored.name.clone(),
                instance: instance.clone(),
            });
        }
        if stored.want_vfio || stored.original_driver.is_some() {
            if let Some(live) = self.live(stored.pci_address).await? {
                let stranded = live.driver.is_none() && stored.original_driver.is_some();
                if live.driver.as_deref() == Some(VFIO_DRIVER) || stranded {
                    let (before, after) = self.unbind_locked(stored.clone()).await?;
                    self.publish_change(&before, &after).await;
                }
            }
        }
        let _gate = self.gate.lock().await;
        let removed = self
            .snapshot()
            .resolve(&stored.id)
            .cloned()
            .ok_or_else(|| Error::NotFound(shorten(id_or_name)))?;
        self.commit(Change::Remove(removed.id.clone())).await?;
        tracing::info!(
            pci_address = %removed.pci_address,
            device_id = %removed.id,
            device_name = %removed.name,
            "device unregistered"
        );
        if let Some(p) = self.publisher.get() {
            p.removed(&removed.id).await;
        }
        Ok(removed)
    }

    /// Moves a device to vfio-pci; the caller holds its lock. `strict` (Attach)
    /// requires the whole IOMMU group to be assignable now, not merely movable.
    async fn bind_locked(&self, s: StoredDevice, strict: bool) -> Result<(DeviceView, DeviceView)> {
        let dev = self.present(&s).await?;
        let before = self.view(s.clone(), Some(dev.clone()));
        let on_vfio = dev.driver.as_deref() == Some(VFIO_DRIVER);
        if strict || !on_vfio {
            // Scoped: a snapshot held across the changes below would make each
            // of them copy the registry.
            let snapshot = self.snapshot();
            let registered = |a: PciAddress| snapshot.by_address(a).is_some();
            self.kernel.check(&dev, strict, registered).await?;
        }
        if on_vfio {
            // Already there: nothing on the host changes; remember it should stay.
            let stored = self.modify(&s.id, |d| d.want_vfio = true).await?;
            return Ok((before, self.view(stored, Some(dev))));
        }
        // Store before touching: if we crash half way, the next start knows the
        // device should be on vfio-pci and which driver it came from.
        let original = s.original_driver.clone().or_else(|| dev.driver.clone());
        self.modify(&s.id, |d| {
            d.want_vfio = true;
            d.original_driver = original.clone();
        })
        .await?;
        match self.kernel.take(&dev).await {
            Ok(after) => {
                tracing::info!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    from = ?dev.driver,
                    "device bound to vfio-pci"
                );
                let stored = self.resolve(&s.id)?;
                Ok((before, self.view(stored, Some(after))))
            }
            Err(e) => {
                if let Err(se) = self
                    .modify(&s.id, |d| {
                        d.want_vfio = s.want_vfio;
                        d.original_driver = s.original_driver.clone();
                    })
                    .await
                {
                    tracing::error!(pci_address = %s.pci_address, error = %se, "cannot record the failed bind");
                }
                tracing::warn!(pci_address = %s.pci_address, device_name = %s.name, error = %e, "bind failed");
                Err(e.into())
            }
        }
    }

    /// Gives a device back to its host driver; the caller holds its lock.
    async fn unbind_locked(&self, s: StoredDevice) -> Result<(DeviceView, DeviceView)> {
        let dev = self.present(&s).await?;
        let before = self.view(s.clone(), Some(dev.clone()));
        // A device left with no driver by an unbind cut short (a crash between
        // unbind and probe) is given back too, not only one still on vfio-pci.
        let stranded = dev.driver.is_none() && s.original_driver.is_some();
        if dev.driver.as_deref() != Some(VFIO_DRIVER) && !stranded {
            let stored = self
                .modify(&s.id, |d| {
                    d.want_vfio = false;
                    d.original_driver = None;
                })
                .await?;
            return Ok((before, self.view(stored, Some(dev))));
        }
        // Store first (keeping the original driver): a crash half way leaves a
        // record that the next start completes.
        self.modify(&s.id, |d| d.want_vfio = false).await?;
        match self
            .kernel
            .give_back(&dev, s.original_driver.as_deref())
            .await
        {
            Ok(after) => {
                let stored = self.modify(&s.id, |d| d.original_driver = None).await?;
                tracing::info!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    to = ?after.driver,
                    "device given back to the host"
                );
                Ok((before, self.view(stored, Some(after))))
            }
            Err(e) => {
                if let Err(se) = self.modify(&s.id, |d| d.want_vfio = s.want_vfio).await {
                    tracing::error!(pci_address = %s.pci_address, error = %se, "cannot record the failed unbind");
                }
                tracing::warn!(pci_address = %s.pci_address, device_name = %s.name, error = %e, "unbind failed");
                Err(e.into())
            }
        }
    }

    /// Brings the host in line with the registry: a device that should be on
    /// vfio-pci but is elsewhere (after a reboot, a replug) is bound again, and
    /// one whose unbind was cut short is given back. Failures are logged.
    pub async fn reconcile(&self) {
        let devices: Vec<StoredDevice> = self
            .snapshot()
            .iter()
            .filter(|d| d.want_vfio || d.original_driver.is_some())
            .cloned()
            .collect();
        let addrs: Vec<PciAddress> = devices.iter().map(|d| d.pci_address).collect();
        let live: Vec<Option<HostDevice>> = self
            .kernel
            .read_many(addrs)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.ok().flatten())
            .collect();
        for (i, s) in devices.into_iter().enumerate() {
            // Only devices away from where they belong need the device's lock.
            if let Some(Some(l)) = live.get(i) {
                let on_vfio = l.driver.as_deref() == Some(VFIO_DRIVER);
                let stranded = l.driver.is_none() && s.original_driver.is_some();
                if on_vfio == s.want_vfio && !stranded {
                    continue;
                }
            }
            if let Err(e) = self.reconcile_one(&s.id).await {
                tracing::warn!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    error = %e,
                    "could not bring the device to its desired state"
                );
            }
        }
    }

    /// Reconciles one device (also the path a returning device takes).
    pub async fn reconcile_one(&self, id: &str) -> Result<()> {
        self.with_device(id, |s| async move {
            let live = self.live(s.pci_address).await?;
            let view = self.view(s.clone(), live.clone());
            let Some(dev) = live else {
                return Ok((view.clone(), view));
            };
            let on_vfio = dev.driver.as_deref() == Some(VFIO_DRIVER);
            if s.want_vfio && !on_vfio {
                tracing::info!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    driver = ?dev.driver,
                    "device should be on vfio-pci: binding it again"
                );
                return self.bind_locked(s, false).await;
            }
            let stranded = dev.driver.is_none() && s.original_driver.is_some();
            if !s.want_vfio && s.original_driver.is_some() && (on_vfio || stranded) {
                tracing::info!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    "an unbind was cut short: giving the device back"
                );
                return self.unbind_locked(s).await;
            }
            Ok((view.clone(), view))
        })
        .await
        .map(|_| ())
    }

    /// Handles a batch of hotplug events (udev, or the simulated kernel).
    ///
    /// Every `add` and `remove` is announced (`HostDeviceAdded`/`Removed`), for
    /// registered and unregistered devices alike. The rest is coalesced per
    /// device: each address in the batch is read once, and a registered device's
    /// object signals only what really changed. A registered device that came
    /// back and should be on vfio-pci is bound again, through the same code and
    /// rollback as `Bind`, in a task of its own so events keep flowing.
    pub async fn on_events(self: &Arc<Self>, batch: Vec<HostEvent>) {
        let mut order: Vec<PciAddress> = Vec::new();
        let mut last: HashMap<PciAddress, EventKind> = HashMap::new();
        let mut added: std::collections::HashSet<PciAddress> = Default::default();
        for ev in &batch {
            if ev.error_event {
                tracing::warn!(pci_address = %ev.address, "the kernel reports a PCIe error event (AER recovery) for this device");
            }
            tracing::debug!(pci_address = %ev.address, action = ev.kind.as_str(), enumerated = ev.enumerated, "host event");
            if !ev.enumerated {
                if let Some(p) = self.publisher.get() {
                    match ev.kind {
                        EventKind::Add => p.host_added(ev.address).await,
                        EventKind::Remove => p.host_removed(ev.address).await,
                        _ => {}
                    }
                }
                if ev.kind == EventKind::Add {
                    added.insert(ev.address);
                }
            }
            if last.insert(ev.address, ev.kind).is_none() {
                order.push(ev.address);
            }
        }
        // The enumeration already read its devices; the rest are read in one go.
        let known: HashMap<PciAddress, HostDevice> = batch
            .iter()
            .filter_map(|e| e.device.clone().map(|d| (e.address, d)))
            .collect();
        // The kernel sends `remove` as the device goes: trust it rather than a
        // sysfs read that may still see the last of it.
        let to_read: Vec<PciAddress> = order
            .iter()
            .copied()
            .filter(|a| !known.contains_key(a) && last.get(a) != Some(&EventKind::Remove))
            .collect();
        let read: Vec<_> = match self.kernel.read_many(to_read.clone()).await {
            Ok(results) => to_read.iter().copied().zip(results).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh devices after events");
                Vec::new()
            }
        };
        let mut fresh: HashMap<PciAddress, Option<HostDevice>> = HashMap::new();
        for (a, r) in read {
            match r {
                Ok(l) => {
                    fresh.insert(a, l);
                }
                Err(e) => {
                    tracing::warn!(pci_address = %a, error = %e, "cannot refresh the device after an event")
                }
            }
        }
        for address in order {
            let live = if let Some(d) = known.get(&address) {
                Some(d.clone())
            } else if last.get(&address) == Some(&EventKind::Remove) {
                None
            } else if let Some(l) = fresh.remove(&address) {
                l
            } else {
                continue;
            };
            self.refresh(address, live, added.contains(&address)).await;
        }
    }

    async fn refresh(
        self: &Arc<Self>,
        address: PciAddress,
        live: Option<HostDevice>,
        came_back: bool,
    ) {
        let Some(stored) = self.snapshot().by_address(address).cloned() else {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(address, live);
            return;
        };
        // An operation on the device is under way: it publishes the final state
        // itself, so the intermediate steps it causes are not announced.
        let lock = self.device_lock(address);
        if let Ok(_held) = lock.try_lock() {
            let previous = self
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(address, live.clone());
            if let Some(prev) = previous {
                if prev != live {
                    self.change_notify.notify_one();
                    let before = self.view(stored.clone(), prev);
                    let after = self.view(stored.clone(), live.clone());
                    if let Some(p) = self.publisher.get() {
                        p.changed(&before, &after).await;
                    }
                }
            }
        }
        // What the event showed is announced first (the native driver, back
        // from the unplug), and only then does the re-claim take the device:
        // clients see the device return before they see it move.
        let on_vfio = live.as_ref().and_then(|d| d.driver.as_deref()) == Some(VFIO_DRIVER);
        if came_back && stored.want_vfio && live.is_some() && !on_vfio {
            tracing::info!(
                pci_address = %address,
                device_id = %stored.id,
                device_name = %stored.name,
                "a registered device came back: moving it to vfio-pci again"
            );
            let this = self.clone();
            let (id, name) = (stored.id.clone(), stored.name.clone());
            // Its own task: it waits for the device's lock, and events keep flowing.
            tokio::spawn(async move {
                if let Err(e) = this.reconcile_one(&id).await {
                    tracing::warn!(pci_address = %address, device_name = %name, error = %e, "could not move the returning device to vfio-pci");
                }
            });
        }
    }

    /// After the start-up enumeration: registered devices it did not find are
    /// known to be absent (the baseline later events are compared with).
    pub fn remember_absent(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for s in self.snapshot().iter() {
            seen.entry(s.pci_address).or_insert(None);
        }
    }

    /// A one-line summary for systemd's status.
    pub fn summary(&self) -> String {
        let snapshot = self.snapshot();
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let on_vfio = snapshot
            .iter()
            .filter(|d| {
                seen.get(&d.pci_address)
                    .and_then(|l| l.as_ref())
                    .and_then(|l| l.driver.as_deref())
                    == Some(VFIO_DRIVER)
            })
            .count();
        let attached = snapshot.iter().filter(|d| d.attached_to.is_some()).count();
        let n = snapshot.len();
        format!(
            "{n} device{} registered, {on_vfio} on vfio-pci, {attached} attached",
            if n == 1 { "" } else { "s" }
        )
    }

    /// Refuses new changes, waits for every device operation in flight (each
    /// ends within its deadlines, rolled back if it failed) and for the last
    /// registry write; used at shutdown so nothing acknowledged is cut short and
    /// no device is left between drivers.
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
        std::mem::forget(self.gate.lock().await);
    }
}

/// What a refused registry change means to the caller.
fn change_error(e: ChangeError) -> Error {
    match e {
        ChangeError::Conflict(Conflict::Address { address, name, id }) => {
            Error::AlreadyRegistered {
                address: address.to_string(),
                name,
                id,
            }
        }
        ChangeError::Conflict(Conflict::Name(n)) => Error::NameTaken(n),
        ChangeError::Conflict(Conflict::Id(id)) => {
            Error::Failed(format!("generated id {id} collided; try again"))
        }
        ChangeError::Missing(id) => Error::NotFound(id),
        ChangeError::KeyChanged(id) => Error::Failed(format!(
            "internal error: the keys of device {id} were about to change"
        )),
    }
}

#[cfg(test)]
mod tests {
    //! The transition table: every state crossed with every operation, and every
    //! injected fault at every step, on the simulated kernel.

    use super::*;
    use crate::host::sim::{Fault, FaultKind, SimHost};
    use crate::host::{Host, Op};
    use std::path::Path;
    use std::time::Duration;

    const GPU: &str = "0000:a2:00.0";

    struct Fixture {
        sim: Arc<SimHost>,
        service: Service,
        _dir: tempfile::TempDir,
    }

    /// A service on a simulated host booted from `fixture`, with an empty
    /// store in a fresh directory.
    fn service_on(fixture: &Path, deadline: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sim = Arc::new(SimHost::from_file(fixture).unwrap());
        let kernel = Kernel::new(sim.clone(), deadline);
        let service = Service::new(
            kernel,
            PciIds::default(),
            Store::new(dir.path()),
            Registry::default(),
        );
        Fixture {
            sim,
            service,
            _dir: dir,
        }
    }

    fn example(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/hosts")
            .join(name)
    }

    fn setup() -> Fixture {
        service_on(&example("l4.toml"), Duration::from_millis(300))
    }

    fn addr() -> PciAddress {
        PciAddress::parse(GPU).unwrap()
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Unbound,
        Native,
        Vfio,
        Attached,
    }

    #[derive(Debug, Clone, Copy)]
    enum Action {
        Bind,
        Unbind,
        Attach1,
        Attach2,
        Detach,
        Delete,
    }

    const STATES: [State; 4] = [State::Unbound, State::Native, State::Vfio, State::Attached];
    const ACTIONS: [Action; 6] = [
        Action::Bind,
        Action::Unbind,
        Action::Attach1,
        Action::Attach2,
        Action::Detach,
        Action::Delete,
    ];

    async fn enter(f: &Fixture, state: State) {
        f.service.register(GPU, "l4-gpu").await.unwrap();
        match state {
            State::Unbound => f.sim.unbind(addr(), "nvidia").unwrap(),
            State::Native => {}
            State::Vfio => {
                f.service.bind("l4-gpu").await.unwrap();
            }
            State::Attached => {
                f.service.attach("l4-gpu", "vm-1").await.unwrap();
            }
        }
    }

    async fn act(f: &Fixture, action: Action) -> Result<()> {
        match action {
            Action::Bind => f.service.bind("l4-gpu").await.map(|_| ()),
            Action::Unbind => f.service.unbind("l4-gpu").await.map(|_| ()),
            Action::Attach1 => f.service.attach("l4-gpu", "vm-1").await.map(|_| ()),
            Action::Attach2 => f.service.attach("l4-gpu", "vm-2").await.map(|_| ()),
            Action::Detach => f.service.detach("l4-gpu").await.map(|_| ()),
            Action::Delete => f.service.delete("l4-gpu").await.map(|_| ()),
        }
    }

    /// What each (state, action) must lead to: Ok((driver, attached, registered))
    /// or the error name.
    fn expected(
        state: State,
        action: Action,
    ) -> std::result::Result<(Option<&'static str>, Option<&'static str>, bool), &'static str> {
        use Action as A;
        use State as S;
        let vfio = Some(VFIO_DRIVER);
        let nv = Some("nvidia");
        match (state, action) {
            (S::Unbound, A::Bind) => Ok((vfio, None, true)),
            (S::Unbound, A::Unbind | A::Detach) => Ok((None, None, true)),
            (S::Unbound, A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Unbound, A::Attach2) => Ok((vfio, Some("vm-2"), true)),
            (S::Unbound, A::Delete) => Ok((None, None, false)),
            (S::Native, A::Bind) => Ok((vfio, None, true)),
            (S::Native, A::Unbind | A::Detach) => Ok((nv, None, true)),
            (S::Native, A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Native, A::Attach2) => Ok((vfio, Some("vm-2"), true)),
            (S::Native, A::Delete) => Ok((nv, None, false)),
            (S::Vfio, A::Bind | A::Detach) => Ok((vfio, None, true)),
            (S::Vfio, A::Unbind) => Ok((nv, None, true)),
            (S::Vfio, A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Vfio, A::Attach2) => Ok((vfio, Some("vm-2"), true)),
            (S::Vfio, A::Delete) => Ok((nv, None, false)),
            (S::Attached, A::Bind | A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Attached, A::Detach) => Ok((vfio, None, true)),
            (S::Attached, A::Unbind | A::Attach2 | A::Delete) => Err("InUse"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_state_by_every_operation() {
        for state in STATES {
            for action in ACTIONS {
                let f = setup();
                enter(&f, state).await;
                let host_before = f.sim.device(addr()).unwrap().unwrap();
                let got = act(&f, action).await;
                let dev = f.sim.device(addr()).unwrap().unwrap();
                let stored = f.service.snapshot().by_address(addr()).cloned();
                let case = format!("{state:?} x {action:?}");
                match expected(state, action) {
                    Ok((driver, attached, registered)) => {
                        assert!(got.is_ok(), "{case}: {got:?}");
                        assert_eq!(dev.driver.as_deref(), driver, "{case}");
                        assert_eq!(stored.is_some(), registered, "{case}");
                        if let Some(s) = stored {
                            assert_eq!(s.attached_to.as_deref(), attached, "{case}");
                            assert_eq!(s.want_vfio, driver == Some(VFIO_DRIVER), "{case}");
                        }
                        // The override is set exactly while on vfio-pci.
                        let want_override =
                            (driver == Some(VFIO_DRIVER)).then(|| VFIO_DRIVER.to_string());
                        assert_eq!(dev.driver_override, want_override, "{case}");
                    }
                    Err(name) => {
                        let e = got.expect_err(&case);
                        assert_eq!(e.dbus_name(), name, "{case}: {e}");
                        assert_eq!(dev, host_before, "{case}: the host changed");
                    }
                }
            }
        }
    }

    fn fault_kinds(op: Op) -> Vec<FaultKind> {
        let mut k = vec![FaultKind::Errno(5), FaultKind::Errno(16), FaultKind::Stall];
        if op == Op::Unbind {
            k.push(FaultKind::Grab);
        }
        k
    }

    /// Every fault at every step of every path that touches the host: either the
    /// operation succeeds as it would have, or it fails and the device's driver,
    /// override and stored record are exactly as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_fault_at_every_step_restores_the_device() {
        let paths = [
            (State::Native, Action::Bind),
            (State::Unbound, Action::Bind),
            (State::Native, Action::Attach1),
            (State::Vfio, Action::Unbind),
            (State::Vfio, Action::Delete),
        ];
        let mut failures_seen = 0;
        for (state, action) in paths {
            for op in Op::ALL {
                for kind in fault_kinds(op) {
                    let f = setup();
                    enter(&f, state).await;
                    let host_before = f.sim.device(addr()).unwrap().unwrap();
                    let stored_before = f.service.snapshot().by_address(addr()).cloned();
                    f.sim.inject(Fault {
                        op,
                        address: addr(),
                        kind: kind.clone(),
                    });
                    let got = act(&f, action).await;
                    f.sim.clear_faults();
                    let case = format!("{state:?} x {action:?} with {kind:?} on {op}");
                    match got {
                        Ok(()) => {
                            let (driver, _, registered) = expected(state, action).unwrap();
                            let dev = f.sim.device(addr()).unwrap().unwrap();
                            assert_eq!(dev.driver.as_deref(), driver, "{case}");
                            assert_eq!(
                                f.service.snapshot().by_address(addr()).is_some(),
                                registered,
                                "{case}"
                            );
                        }
                        Err(e) => {
                            failures_seen += 1;
                            let dev = f.sim.device(addr()).unwrap().unwrap();
                            assert_eq!(dev, host_before, "{case}: {e}");
                            assert_eq!(
                                f.service.snapshot().by_address(addr()).cloned(),
                                stored_before,
                                "{case}"
                            );
                            let name = e.dbus_name();
                            if kind == FaultKind::Stall {
                                assert_eq!(name, "Timeout", "{case}: {e}");
                            } else {
                                assert_eq!(name, "BindFailed", "{case}: {e}");
                            }
                            assert!(e.to_string().contains("step"), "{case}: {e}");
                            assert!(e.to_string().contains("put back"), "{case}: {e}");
                        }
                    }
                }
            }
        }
        assert!(
            failures_seen > 20,
            "only {failures_seen} faults made an operation fail"
        );
    }

    /// The re-claim after a replug, with every fault at every step: it fails,
    /// and the device stays as the kernel plugged it (on its native driver,
    /// no override) with the registry unchanged, ready for the next try.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_fault_during_the_reclaim_after_a_replug() {
        let mut failures_seen = 0;
        for op in Op::ALL {
            for kind in fault_kinds(op) {
                let f = setup();
                enter(&f, State::Vfio).await;
                f.sim.unplug(addr()).unwrap();
                f.sim.plug(addr()).unwrap();
                let plugged = f.sim.device(addr()).unwrap().unwrap();
                assert_eq!(plugged.driver.as_deref(), Some("nvidia"));
                let stored_before = f.service.snapshot().by_address(addr()).cloned().unwrap();
                f.sim.inject(Fault {
                    op,
                    address: addr(),
                    kind: kind.clone(),
                });
                let got = f.service.reconcile_one(&stored_before.id).await;
                f.sim.clear_faults();
                let case = format!("reclaim with {kind:?} on {op}");
                let now = f.sim.device(addr()).unwrap().unwrap();
                match got {
                    Ok(()) => assert_eq!(now.driver.as_deref(), Some(VFIO_DRIVER), "{case}"),
                    Err(e) => {
                        failures_seen += 1;
                        assert_eq!(now, plugged, "{case}: {e}");
                        assert_eq!(
                            f.service.snapshot().by_address(addr()).cloned().unwrap(),
                            stored_before,
                            "{case}"
                        );
                        // And the next try, without the fault, succeeds.
                        f.service.reconcile_one(&stored_before.id).await.unwrap();
                        assert_eq!(
                            f.sim.device(addr()).unwrap().unwrap().driver.as_deref(),
                            Some(VFIO_DRIVER)
                        );
                    }
                }
            }
        }
        // The re-claim writes the override, unbinds and probes: each of the
        // three kinds of fault on those steps (and the grab on unbind) must fail it.
        assert!(
            failures_seen >= 10,
            "only {failures_seen} faults made the re-claim fail"
        );
    }

    #[tokio::test]
    async fn group_rules() {
        let f = service_on(&example("desktop.toml"), Duration::from_secs(5));
        let s = &f.service;
        s.register("0000:01:00.0", "gpu").await.unwrap();
        let e = s.bind("gpu").await.unwrap_err();
        assert_eq!(e.dbus_name(), "IommuGroupConflict");
        assert!(
            e.to_string()
                .contains("0000:01:00.1 (driver snd_hda_intel)"),
            "{e}"
        );
        s.register("0000:01:00.1", "gpu-audio").await.unwrap();
        // The GPU is registered, so it can follow: the audio function may go first.
        s.bind("gpu-audio").await.unwrap();
        // But it cannot be attached while the GPU still sits on nvidia.
        let e = s.attach("gpu-audio", "vm-1").await.unwrap_err();
        assert_eq!(e.dbus_name(), "IommuGroupConflict");
        s.bind("gpu").await.unwrap();
        s.attach("gpu-audio", "vm-1").await.unwrap();
        s.attach("gpu", "vm-1").await.unwrap();
    }

    #[tokio::test]
    async fn vfio_missing_and_no_iommu() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(example("l4.toml"))
            .unwrap()
            .replace(
                "name = \"vfio-pci\"",
                "name = \"vfio-pci\"\nloaded = false\nloadable = false",
            );
        let fixture = dir.path().join("novfio.toml");
        std::fs::write(&fixture, text).unwrap();
        let f = service_on(&fixture, Duration::from_secs(5));
        let (s, sim) = (&f.service, &f.sim);
        s.register(GPU, "gpu").await.unwrap();
        assert_eq!(
            s.bind("gpu").await.unwrap_err().dbus_name(),
            "VfioUnavailable"
        );
        assert_eq!(
            sim.device(addr()).unwrap().unwrap().driver.as_deref(),
            Some("nvidia")
        );

        // Loadable but not loaded: modprobe (simulated) brings it.
        let text = std::fs::read_to_string(&fixture)
            .unwrap()
            .replace("loadable = false", "loadable = true");
        std::fs::write(&fixture, text).unwrap();
        let f = service_on(&fixture, Duration::from_secs(5));
        let s = &f.service;
        s.register(GPU, "gpu").await.unwrap();
        assert!(s.bind("gpu").await.unwrap().bound_to_vfio());
    }
}
