//! The registry operations: Register, List, Get, ListAvailable, Delete, and
//! resolving what a caller named to one record.

use hypeman_api::Error;

use super::error::{host_error, in_use, not_found, Result};
use super::placement::placement;
use super::{AvailableView, DeviceView, Service, Target};
use crate::host::HostDevice;
use crate::pci::{DeviceType, PciAddress};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::store::registry::{new_device_id, now_rfc3339, tags_match};
use crate::store::{Change, StoredDevice};
use hypeman_api::validate::{validate_filter, validate_tags};

fn require_key(id_or_name: &str) -> Result<()> {
    if id_or_name.is_empty() {
        return Err(Error::InvalidArgument(
            "a device id or name is required; `hypemanctl list` shows them".into(),
        ));
    }
    Ok(())
}

/// Each IOMMU group's functions, from one enumeration (in its order).
fn groups_of(devices: &[HostDevice]) -> HashMap<u32, Vec<HostDevice>> {
    let mut groups: HashMap<u32, Vec<HostDevice>> = HashMap::new();
    for d in devices {
        if let Some(g) = d.iommu_group {
            groups.entry(g).or_default().push(d.clone());
        }
    }
    groups
}

/// *(issue 30)* Every registered device's blockers as last read, by id, and
/// how many times they were forgotten: a read that a change overtook (it
/// began before the change was forgotten) is not kept, or it would show the
/// state before the change until the next one.
#[derive(Default)]
pub struct BlockersRead {
    epoch: u64,
    by_id: HashMap<String, Vec<hypeman_api::Blocker>>,
}

impl BlockersRead {
    fn forget(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.by_id.clear();
    }

    /// Keeps what a read that began at `epoch` found, unless a change was
    /// forgotten since.
    fn keep(
        &mut self,
        epoch: u64,
        read: impl IntoIterator<Item = (String, Vec<hypeman_api::Blocker>)>,
    ) {
        if epoch == self.epoch {
            self.by_id.extend(read);
        }
    }
}

impl Service {
    /// Resolves what a caller named (an id, or an exact name) to one record,
    /// once. Everything that acts afterwards acts on that record's id.
    pub fn resolve(&self, id_or_name: &str) -> Result<Target> {
        require_key(id_or_name)?;
        self.snapshot()
            .resolve(id_or_name)
            .cloned()
            .map(|d| Target(d, false))
            .ok_or_else(|| not_found(id_or_name))
    }

    /// The record of a resolved target as it is now; `NotFound` if that id
    /// was deleted meanwhile (a new record under the same name is another id).
    pub(crate) fn current(&self, target: &Target) -> Result<StoredDevice> {
        self.snapshot()
            .by_id(target.id())
            .map(|d| (**d).clone())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "device {} ({}) was deleted meanwhile; nothing was changed",
                    target.record().name,
                    target.id()
                ))
            })
    }

    /// Registers `host` under `name` (both already checked).
    pub(super) async fn register_host(
        &self,
        host: HostDevice,
        name: String,
        tags: BTreeMap<String, String>,
    ) -> Result<DeviceView> {
        let address = host.address;
        // As Hypeman does: a function that can never be passed through (no
        // IOMMU group, a bridge) is not registered, so every new record has
        // an IOMMU group.
        let vm = self.door.virtual_machine().await.unwrap_or(false);
        if let Some(e) = super::blockers::hard_refusal(&host, vm) {
            return Err(e);
        }
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
            tags,
            lease: None,
            identity: Some(super::identity::of(&host)),
            aer_baseline: self
                .door
                .aer_many(vec![address])
                .await
                .ok()
                .and_then(|r| r.into_iter().next().flatten()),
        };

        // Under the address's lock, so a Delete of this device cannot be
        // announced before its registration is.
        let lock = self.device_lock(address);
        let _held = lock.lock().await;
        self.refuse_if_stopping()?;
        self.commit(Change::Add(stored.clone())).await?;
        self.seen().set(address, Some(host.clone()));
        self.aer.set(address, stored.aer_baseline);
        let view = self.view(stored, Some(host));
        tracing::info!(
            pci_address = %address,
            device_id = %view.stored.id,
            device_name = %view.stored.name,
            "device registered"
        );
        if let Some(p) = self.publisher() {
            p.added(&view).await;
        }
        Ok(view)
    }

    /// `List`: every registered device with its host state as last seen.
    pub async fn list(&self) -> Result<Vec<DeviceView>> {
        self.list_tagged(&BTreeMap::new()).await
    }

    /// `ListByTags`: the registered devices carrying every pair of `filter`.
    pub async fn list_tagged(&self, filter: &BTreeMap<String, String>) -> Result<Vec<DeviceView>> {
        validate_filter(filter)?;
        let stored: Vec<StoredDevice> = self
            .snapshot()
            .iter()
            .filter(|d| tags_match(&d.tags, filter))
            .map(|d| (**d).clone())
            .collect();
        let addresses: Vec<PciAddress> = stored.iter().map(|d| d.pci_address).collect();
        // *(issue 30)* From the state the events keep, as the properties.
        let live = self.cached_live_many(addresses).await?;
        Ok(stored
            .into_iter()
            .zip(live)
            .map(|(s, l)| self.view(s, l))
            .collect())
    }

    /// `Get`: one device by id or exact name, with its host state as last
    /// seen (*issue 30*: no host read; the events keep it current).
    pub async fn get(&self, id_or_name: &str) -> Result<DeviceView> {
        let stored = self.resolve(id_or_name)?.0;
        let live = self.cached_live(&stored).await?;
        Ok(self.view(Arc::unwrap_or_clone(stored), live))
    }

    /// `SetTags`: sets the pairs of `set` and removes the keys of `remove`
    /// (a key in both is set), then checks the result against the tag rules.
    pub async fn set_tags(
        &self,
        target: &Target,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<DeviceView> {
        self.refuse_if_stopping()?;
        // Under the device's lock, so two changes of one device's tags are
        // applied one after the other, neither lost.
        let lock = self.device_lock(target.record().pci_address);
        let _held = lock.lock().await;
        let before_stored = self.current(target)?;
        let mut next = before_stored.tags.clone();
        for k in &remove {
            next.remove(k);
        }
        next.extend(set);
        validate_tags(&next)?;
        let (live, told) = self.read_through(before_stored.pci_address).await?;
        let before = self.view(before_stored, told.unwrap_or_else(|| live.clone()));
        let stored = self.modify(target.id(), |d| d.tags = next).await?;
        let after = self.view(stored, live);
        tracing::info!(
            pci_address = %after.stored.pci_address,
            device_id = %after.stored.id,
            device_name = %after.stored.name,
            tags = after.stored.tags.len(),
            "device tags changed"
        );
        self.publish_change(&before, &after).await;
        Ok(after)
    }

    /// *(issue 30)* Forgets every device's blockers as last read: something
    /// the daemon sees changed (a device, its group, the registry).
    pub(crate) fn forget_blockers(&self) {
        self.blockers_read().forget();
    }

    fn blockers_read(&self) -> std::sync::MutexGuard<'_, BlockersRead> {
        self.blockers_read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// *(issue 30)* A device's blockers as last read (`GetAll`), read now
    /// if they were not read since the last change the daemon saw.
    pub async fn last_blockers(&self, id: &str) -> Result<Vec<hypeman_api::Blocker>> {
        if let Some(b) = self.blockers_read().by_id.get(id) {
            return Ok(b.clone());
        }
        self.device_blockers(id).await
    }

    /// *(issue 30)* Every registered device's blockers as last read
    /// (`GetManagedObjects`); those not read since the last change are read
    /// in one go ([`Service::all_device_blockers`]).
    pub async fn all_last_blockers(&self) -> Result<HashMap<String, Vec<hypeman_api::Blocker>>> {
        let snapshot = self.snapshot();
        let epoch = {
            let read = self.blockers_read();
            if snapshot.iter().all(|d| read.by_id.contains_key(&d.id)) {
                return Ok(snapshot
                    .iter()
                    .filter_map(|d| Some((d.id.clone(), read.by_id.get(&d.id)?.clone())))
                    .collect());
            }
            read.epoch
        };
        drop(snapshot);
        let all = self.all_device_blockers().await?;
        self.blockers_read()
            .keep(epoch, all.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(all)
    }

    /// `Device1.Blockers`: why the host must keep a registered device, read
    /// now (none while it is unplugged, or once it is on vfio-pci: then the
    /// host no longer uses it); *(issue 30)* kept as the device's last read.
    pub async fn device_blockers(&self, id: &str) -> Result<Vec<hypeman_api::Blocker>> {
        let epoch = self.blockers_read().epoch;
        let b = self.device_blockers_now(id).await?;
        self.blockers_read()
            .keep(epoch, [(id.to_string(), b.clone())]);
        Ok(b)
    }

    async fn device_blockers_now(&self, id: &str) -> Result<Vec<hypeman_api::Blocker>> {
        let stored = self
            .snapshot()
            .by_id(id)
            .cloned()
            .ok_or_else(|| super::error::not_found(id))?;
        let Some(dev) = self.live(stored.pci_address).await? else {
            return Ok(Vec::new());
        };
        let members = self.door.read_group(&dev).await?;
        let mut blockers = self.blockers_now(&dev, &members).await?;
        blockers.extend(super::blockers::hardware_changed(&stored, &dev));
        Ok(blockers
            .iter()
            .map(super::blockers::Blocker::record)
            .collect())
    }

    /// Every function on the host, each IOMMU group's functions from that
    /// one enumeration, and whether the host is a virtual machine.
    async fn enumerated(&self) -> Result<(Vec<HostDevice>, HashMap<u32, Vec<HostDevice>>, bool)> {
        let devices = self
            .door
            .devices()
            .await
            .map_err(|e| host_error("cannot list the host's PCI devices".into(), e))?;
        let vm = self.door.virtual_machine().await.unwrap_or(false);
        let groups = groups_of(&devices);
        Ok((devices, groups, vm))
    }

    /// *(issue 30)* Every registered device's blockers, as
    /// [`Service::device_blockers`] reads them one by one, read in one go:
    /// one enumeration (the groups from it), one walk of /proc for every
    /// function they concern, one host call for the vGPU slots. A device
    /// not on the host has none; one whose slots could not be read is left
    /// out (its own read then says why). What `GetManagedObjects` shows.
    pub async fn all_device_blockers(&self) -> Result<HashMap<String, Vec<hypeman_api::Blocker>>> {
        let snapshot = self.snapshot();
        let (devices, groups, vm) = self.enumerated().await?;
        let members = |d: &HostDevice| -> Vec<HostDevice> {
            d.iommu_group
                .and_then(|g| groups.get(&g))
                .cloned()
                .unwrap_or_default()
        };
        let present: Vec<(Arc<StoredDevice>, HostDevice)> = devices
            .iter()
            .filter_map(|d| Some((snapshot.by_address(d.address)?.clone(), d.clone())))
            .collect();
        let mut addresses: Vec<PciAddress> = Vec::new();
        for (_, d) in &present {
            addresses.extend(members(d).iter().map(|m| m.address));
            addresses.push(d.address);
        }
        addresses.sort();
        addresses.dedup();
        let walked = self.host_usage(addresses).await?;
        let slots = self
            .door
            .vgpu_slots_many(present.iter().map(|(_, d)| d.clone()).collect())
            .await
            .map_err(|e| host_error("cannot read the vGPUs of the registered devices".into(), e))?;
        let mut out: HashMap<String, Vec<hypeman_api::Blocker>> = snapshot
            .iter()
            .map(|s| (s.id.clone(), Vec::new()))
            .collect();
        for ((stored, dev), slots) in present.iter().zip(slots) {
            let Ok(slots) = slots else {
                out.remove(&stored.id);
                continue;
            };
            let mut blockers = super::blockers::of(dev, &members(dev), vm, &walked);
            blockers.extend(super::blockers::vgpus(dev.address, &slots));
            blockers.extend(super::blockers::hardware_changed(stored, dev));
            out.insert(
                stored.id.clone(),
                blockers
                    .iter()
                    .map(super::blockers::Blocker::record)
                    .collect(),
            );
        }
        Ok(out)
    }

    /// `ListAvailable`: every PCI function on the host, registered or not.
    pub async fn list_available(&self) -> Result<Vec<AvailableView>> {
        // Groups from the one enumeration: no read per function.
        let (devices, groups, vm) = self.enumerated().await?;
        let acs_override = self.door.acs_override().await.unwrap_or(false);
        // One walk of /proc for every function.
        let walked = self
            .host_usage(devices.iter().map(|d| d.address).collect())
            .await?;
        let snapshot = self.snapshot();
        Ok(devices
            .into_iter()
            .map(|host| {
                let (vendor_name, device_name) = self.names(host.vendor, host.device);
                let members = host
                    .iommu_group
                    .and_then(|g| groups.get(&g))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let registered = snapshot.by_address(host.address);
                let mut blockers = super::blockers::of(&host, members, vm, &walked);
                if let Some(s) = registered {
                    blockers.extend(super::blockers::hardware_changed(s, &host));
                }
                AvailableView {
                    kind: DeviceType::from_class(host.vendor, host.class),
                    registered_as: registered.map(|d| d.id.clone()),
                    blockers,
                    warnings: super::warnings::of(&host, acs_override),
                    vendor_name,
                    device_name,
                    host,
                }
            })
            .collect())
    }

    /// `Delete`: unregisters. Refuses while attached; a device the daemon moved
    /// to vfio-pci is given back to its driver first.
    pub async fn delete(&self, target: &Target) -> Result<StoredDevice> {
        self.refuse_if_stopping()?;
        let lock = self.device_lock(target.record().pci_address);
        let _held = lock.lock().await;
        self.refuse_if_stopping()?;
        let stored = self.current(target)?;
        if let Some(instance) = &stored.attached_to {
            return Err(in_use(&stored.name, instance));
        }
        let live = self.live(stored.pci_address).await?;
        if let Some(dev) = &live {
            if let Some(b) = self.vgpus_blocker(dev).await? {
                return Err(hypeman_api::Error::InUse(b.message));
            }
        }
        let _group = self.hold_group(&stored, live.as_ref(), None).await?;
        let moved = stored.want_vfio || stored.original_driver.is_some();
        if moved && live.is_some() && placement(&stored, live.as_ref()).held() {
            let (before, after) = self.unbind_locked(stored.clone(), live).await?;
            self.publish_change(&before, &after).await;
        }
        let removed = self.current(target)?;
        self.commit(Change::Remove(removed.id.clone())).await?;
        tracing::info!(
            pci_address = %removed.pci_address,
            device_id = %removed.id,
            device_name = %removed.name,
            "device unregistered"
        );
        if let Some(p) = self.publisher() {
            p.removed(&removed.id).await;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::BlockersRead;

    /// *(issue 30)* A blockers read that a change overtook is not kept: the
    /// next `GetAll` reads again instead of showing the state before the
    /// change.
    #[test]
    fn a_read_overtaken_by_a_change_is_not_kept() {
        let stale = hypeman_api::Blocker {
            code: "open-by".into(),
            message: "held open by qemu (pid 4242)".into(),
            pci_address: "0000:a2:00.0".into(),
        };
        let mut read = BlockersRead::default();
        let began = read.epoch;
        read.forget();
        read.keep(began, [("gpu".to_string(), vec![stale.clone()])]);
        assert!(!read.by_id.contains_key("gpu"));
        read.keep(read.epoch, [("gpu".to_string(), vec![stale])]);
        assert_eq!(read.by_id["gpu"].len(), 1);
    }
}
