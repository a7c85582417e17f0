//! The host state clients were last told about, per address.
//!
//! Property reads answer from it without a host read, and hotplug events
//! compare against it so that `PropertiesChanged` goes out only on a real
//! change. `None` for an address means known to be absent; no entry means
//! never looked at.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::error::{device_not_found, host_error, Result};
use super::{DeviceView, Service};
use crate::host::HostDevice;
use crate::pci::PciAddress;
use crate::store::StoredDevice;

#[derive(Default)]
pub struct Seen(Mutex<Known>);

#[derive(Default)]
struct Known {
    by_address: HashMap<PciAddress, Option<HostDevice>>,
    /// The addresses last seen on vfio-pci: the status line counts them
    /// without walking every device at every change.
    on_vfio: HashSet<PciAddress>,
}

impl Seen {
    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what is now known of `address`; returns what was known before.
    pub fn set(&self, address: PciAddress, live: Option<HostDevice>) -> Option<Option<HostDevice>> {
        let mut known = self.known();
        if live.as_ref().is_some_and(crate::host::variant::on_vfio) {
            known.on_vfio.insert(address);
        } else {
            known.on_vfio.remove(&address);
        }
        known.by_address.insert(address, live)
    }

    pub fn get(&self, address: PciAddress) -> Option<Option<HostDevice>> {
        self.known().by_address.get(&address).cloned()
    }

    /// Whether `address` was looked at (present or known to be absent).
    pub fn knows(&self, address: PciAddress) -> bool {
        self.known().by_address.contains_key(&address)
    }

    /// *(issue 30)* Every address looked at, and whether it was present.
    pub fn addresses(&self) -> Vec<(PciAddress, bool)> {
        self.known()
            .by_address
            .iter()
            .map(|(a, l)| (*a, l.is_some()))
            .collect()
    }

    /// The addresses last seen on vfio-pci.
    pub fn on_vfio(&self) -> Vec<PciAddress> {
        self.known().on_vfio.iter().copied().collect()
    }
}

impl Service {
    pub(crate) fn seen(&self) -> &Seen {
        &self.seen
    }

    /// A device as the kernel shows it now.
    pub(crate) async fn live(&self, address: PciAddress) -> Result<Option<HostDevice>> {
        self.door
            .read(address)
            .await
            .map_err(|e| host_error(format!("cannot read {address} from the host"), e))
    }

    /// Tells clients what changed, and remembers it.
    pub(crate) async fn publish_change(&self, before: &DeviceView, after: &DeviceView) {
        self.seen.set(after.stored.pci_address, after.live.clone());
        self.change_notify.notify_one();
        if let Some(p) = self.publisher() {
            p.changed(before, after).await;
        }
    }

    /// A device's host state as last seen (kept current by hotplug events and by
    /// every operation), without a host read: what property reads answer from.
    pub async fn cached_live(&self, stored: &StoredDevice) -> Result<Option<HostDevice>> {
        match self.seen.get(stored.pci_address) {
            Some(l) => Ok(l),
            None => {
                let l = self.live(stored.pci_address).await?;
                self.seen.set(stored.pci_address, l.clone());
                Ok(l)
            }
        }
    }

    /// After the start-up enumeration: registered devices it did not find are
    /// known to be absent (the baseline later events are compared with).
    pub fn remember_absent(&self) {
        let mut known = self.seen.known();
        for s in self.snapshot().iter() {
            known.by_address.entry(s.pci_address).or_insert(None);
        }
    }
}

/// The refusal of an operation on a registered device that is not on the host now.
pub(crate) fn absent(stored: &StoredDevice) -> hypeman_api::Error {
    device_not_found(format!(
        "{} (registered as {}; it is not on the host now, unplugged?)",
        stored.pci_address, stored.name
    ))
}
