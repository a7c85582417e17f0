//! The host state clients were last told about, per address: the daemon's
//! picture of every function, kept as udisks keeps its devices.
//!
//! It is kept current by the kernel's events (add, remove, bind, unbind,
//! change: `service/hotplug.rs`) and by the daemon's own operations, which
//! publish what they did. *(issue 30)* `Get`, `List` and every property
//! answer from it without a host read; what changes a device still reads the
//! device first, and a difference from what is kept here means events were
//! missed: every function is then read again ([`Service::want_reread`]).
//! `None` for an address means known to be absent; no entry means never
//! looked at.
//!
//! Each address carries a generation, bumped at every change, so an event's
//! read that an operation's publication overtook is not announced over it.

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
    /// What is known of each address, and its generation (bumped at every
    /// [`Seen::set`]; one map, not two: it holds every function).
    by_address: HashMap<PciAddress, (Option<HostDevice>, u64)>,
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
        let entry = known.by_address.entry(address).or_insert((None, 0));
        let before = std::mem::replace(&mut entry.0, live);
        entry.1 += 1;
        // The first set of an address had nothing before it.
        (entry.1 > 1).then_some(before)
    }

    /// *(issue 30)* Records what a first read of `address` found, unless
    /// something was recorded meanwhile (an event or an operation, newer
    /// than that read); returns what is known now.
    pub fn learn(&self, address: PciAddress, live: Option<HostDevice>) -> Option<HostDevice> {
        if let Some(known) = self.known().by_address.get(&address) {
            return known.0.clone();
        }
        self.set(address, live.clone());
        live
    }

    /// *(issue 30)* How many times `address` was set (0: never).
    pub fn generation(&self, address: PciAddress) -> u64 {
        self.known().by_address.get(&address).map_or(0, |e| e.1)
    }

    pub fn get(&self, address: PciAddress) -> Option<Option<HostDevice>> {
        self.known().by_address.get(&address).map(|e| e.0.clone())
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
            .map(|(a, l)| (*a, l.0.is_some()))
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
        self.forget_blockers();
        self.change_notify.notify_one();
        if let Some(p) = self.publisher() {
            p.changed(before, after).await;
        }
    }

    /// A device's host state as last seen (kept current by hotplug events and by
    /// every operation), without a host read: what `Get` and the properties
    /// answer from. An address never looked at is read once.
    pub async fn cached_live(&self, stored: &StoredDevice) -> Result<Option<HostDevice>> {
        if !self.events_followed() {
            return self.live(stored.pci_address).await;
        }
        let mut all = self.cached_live_many(vec![stored.pci_address]).await?;
        Ok(all.pop().flatten())
    }

    /// *(issue 30)* The host's events are followed from now on: reads
    /// answer from the state they keep.
    pub fn follow_events(&self) {
        self.events_followed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether reads answer from the state the events keep.
    pub(crate) fn events_followed(&self) -> bool {
        self.events_followed
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// *(issue 30)* [`Service::cached_live`] for many addresses (`List`),
    /// in their order: the ones never looked at are read in one go. Without
    /// events every one is read (nothing would keep the state current).
    pub async fn cached_live_many(
        &self,
        addresses: Vec<PciAddress>,
    ) -> Result<Vec<Option<HostDevice>>> {
        if !self.events_followed() {
            return self.read_registered(addresses).await;
        }
        let mut out: Vec<Option<Option<HostDevice>>> = {
            let known = self.seen.known();
            addresses
                .iter()
                .map(|a| known.by_address.get(a).map(|e| e.0.clone()))
                .collect()
        };
        let unknown: Vec<PciAddress> = addresses
            .iter()
            .zip(&out)
            .filter(|(_, l)| l.is_none())
            .map(|(a, _)| *a)
            .collect();
        if !unknown.is_empty() {
            let read = self.read_registered(unknown.clone()).await?;
            let mut read: HashMap<PciAddress, Option<HostDevice>> =
                unknown.into_iter().zip(read).collect();
            for (a, slot) in addresses.iter().zip(out.iter_mut()) {
                if slot.is_none() {
                    *slot = Some(self.seen.learn(*a, read.remove(a).flatten()));
                }
            }
        }
        Ok(out.into_iter().map(Option::flatten).collect())
    }

    /// Registered devices read from the host now, in one go.
    async fn read_registered(&self, addresses: Vec<PciAddress>) -> Result<Vec<Option<HostDevice>>> {
        let what = "cannot read the registered devices from the host";
        self.door
            .read_many(addresses)
            .await
            .map_err(|e| host_error(what.into(), e))?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| host_error(what.into(), e))
    }

    /// *(issue 30)* The read an operation acts on: the device read now, and
    /// what clients were last told of it when that differs (`None` when it
    /// is the same, or was never told). A difference means the events that
    /// would have carried it were missed: every function is read again
    /// (after this operation, by the event path), and the operation
    /// announces its change from what clients were told, so they see the
    /// missed change too.
    pub(crate) async fn read_through(
        &self,
        address: PciAddress,
    ) -> Result<(Option<HostDevice>, Option<Option<HostDevice>>)> {
        let now = self.live(address).await?;
        let told = self.seen.get(address).filter(|t| *t != now);
        // Without events a difference is expected (nothing kept the state):
        // the change is announced from what clients were told all the same.
        if let Some(t) = told.as_ref().filter(|_| self.events_followed()) {
            tracing::info!(
                pci_address = %address,
                told_driver = %t.as_ref().and_then(|d| d.driver.as_deref()).unwrap_or("(none)"),
                driver = %now.as_ref().and_then(|d| d.driver.as_deref()).unwrap_or("(none)"),
                present = now.is_some(),
                "the device is not what its events said: every function is read again"
            );
            self.want_reread();
        }
        Ok((now, told))
    }

    /// *(issue 30)* Asks the event path for a full re-read of the host
    /// (coalesced: many asks before it runs make one).
    pub(crate) fn want_reread(&self) {
        self.reread_wanted.notify_one();
    }

    /// Resolves when a full re-read was asked for ([`Service::want_reread`]).
    pub async fn reread_wanted(&self) {
        self.reread_wanted.notified().await;
    }

    /// After the start-up enumeration: registered devices it did not find are
    /// known to be absent (the baseline later events are compared with).
    pub fn remember_absent(&self) {
        let mut known = self.seen.known();
        for s in self.snapshot().iter() {
            known.by_address.entry(s.pci_address).or_insert((None, 1));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each set bumps the address's generation and answers what was known
    /// before (`None`: never looked at); what the event path compares to
    /// tell an overtaken read.
    #[test]
    fn each_set_bumps_the_generation_and_answers_what_was_known() {
        let seen = Seen::default();
        let a = PciAddress::parse("0000:a2:00.0").unwrap();
        assert_eq!(seen.generation(a), 0);
        assert!(!seen.knows(a));
        assert_eq!(seen.set(a, None), None);
        assert_eq!(seen.generation(a), 1);
        assert_eq!(seen.get(a), Some(None));
        assert_eq!(seen.set(a, None), Some(None));
        assert_eq!(seen.generation(a), 2);
        assert_eq!(seen.addresses(), vec![(a, false)]);
    }

    /// A first read does not overwrite what was recorded while it ran.
    #[test]
    fn a_first_read_does_not_overwrite_a_newer_one() {
        let seen = Seen::default();
        let a = PciAddress::parse("0000:a2:00.0").unwrap();
        let b = PciAddress::parse("0000:3b:00.0").unwrap();
        let device = |driver: &str| HostDevice {
            driver: Some(driver.to_string()),
            ..HostDevice::example()
        };
        assert_eq!(seen.learn(b, None), None);
        assert_eq!(seen.generation(b), 1);
        seen.set(a, Some(device("vfio-pci")));
        let kept = seen.learn(a, Some(device("nvidia")));
        assert_eq!(kept.unwrap().driver.as_deref(), Some("vfio-pci"));
        assert_eq!(seen.generation(a), 1);
    }
}
