//! What hotplug events mean for the registered devices: the service's rules,
//! fed by the udev edge (`edge/udev.rs`), which only delivers events.

use std::collections::HashMap;
use std::sync::Arc;

use super::placement::{placement, Needed};
use super::Service;
use crate::host::{EventKind, HostDevice, HostEvent};
use crate::pci::PciAddress;

impl Service {
    /// Handles a batch of hotplug events (udev, or the simulated kernel).
    ///
    /// Every `add` and `remove` is announced (`HostDeviceAdded`/`Removed`), for
    /// registered and unregistered devices alike. The rest is coalesced per
    /// device: each address in the batch is read once, and a registered device's
    /// object signals only what really changed. A registered device that came
    /// back and should be on vfio-pci is bound again, through the same code and
    /// rollback as `Bind`, in a task of its own so events keep flowing.
    pub async fn on_events(self: &Arc<Self>, batch: Vec<HostEvent>) {
        // *(issue 30)* A function that came, went or changed driver may
        // change any registered device's blockers (its group's).
        self.forget_blockers();
        let mut order: Vec<PciAddress> = Vec::new();
        let mut last: HashMap<PciAddress, EventKind> = HashMap::new();
        let mut added: std::collections::HashSet<PciAddress> = Default::default();
        // *(issue 29)* Registered functions the kernel's AER recovery spoke
        // of: their counters are read once the batch is handled.
        let mut recovering: Vec<PciAddress> = Vec::new();
        for ev in &batch {
            if let Some(r) = &ev.aer {
                tracing::warn!(
                    pci_address = %ev.address,
                    error_event = %r.error_event,
                    device_online = %r.device_online.map_or("unknown", |o| if o { "1" } else { "0" }),
                    "the kernel's PCIe error recovery reports on this device"
                );
                if self.snapshot().by_address(ev.address).is_some()
                    && !recovering.contains(&ev.address)
                {
                    recovering.push(ev.address);
                }
            }
            tracing::debug!(pci_address = %ev.address, action = ev.kind.as_str(), enumerated = ev.enumerated, "host event");
            if !ev.enumerated {
                if !ev.reread {
                    crate::telemetry::get().hotplug(ev.kind.as_str());
                }
                // A function that comes or goes starts its counters again.
                if matches!(ev.kind, EventKind::Add | EventKind::Remove) {
                    self.aer.forget(ev.address);
                }
                if let Some(p) = self.publisher() {
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
        let mut known: HashMap<PciAddress, HostDevice> = batch
            .into_iter()
            .filter_map(|e| e.device.map(|d| (e.address, d)))
            .collect();
        // The kernel sends `remove` as the device goes: trust it rather than a
        // sysfs read that may still see the last of it.
        let to_read: Vec<PciAddress> = order
            .iter()
            .copied()
            .filter(|a| !known.contains_key(a) && last.get(a) != Some(&EventKind::Remove))
            .collect();
        // *(issue 30)* What each address's state was before the read: an
        // operation that publishes meanwhile read the device later, and
        // this read must not be announced over what it published.
        let generations: HashMap<PciAddress, u64> = order
            .iter()
            .map(|a| (*a, self.seen().generation(*a)))
            .collect();
        let read: Vec<_> = match self.door.read_many(to_read.clone()).await {
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
            let live = if let Some(d) = known.remove(&address) {
                Some(d)
            } else if last.get(&address) == Some(&EventKind::Remove) {
                None
            } else if let Some(l) = fresh.remove(&address) {
                l
            } else {
                continue;
            };
            let generation = generations.get(&address).copied().unwrap_or(0);
            self.refresh(address, live, added.contains(&address), generation)
                .await;
        }
        self.read_health(recovering).await;
        self.hotplug.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// *(issue 30)* Events were lost (the kernel's uevent queue overflowed,
    /// ENOBUFS): every function is read again, and whatever differs from
    /// what clients were told is handled as the lost events would have
    /// been: a function that came is announced (and a registered one that
    /// should be on vfio re-claimed), one that went is announced, and a
    /// registered device that changed signals what changed.
    pub async fn reread(self: &Arc<Self>) {
        let devices = match self.door.devices().await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the host's PCI devices again after lost events");
                return;
            }
        };
        let known: HashMap<PciAddress, bool> = self.seen().addresses().into_iter().collect();
        let mut found: std::collections::HashSet<PciAddress> = Default::default();
        let mut batch = Vec::new();
        for d in devices {
            found.insert(d.address);
            let kind = match known.get(&d.address) {
                Some(true) => EventKind::Change,
                _ => EventKind::Add,
            };
            let mut ev = HostEvent::new(kind, d.address);
            ev.reread = true;
            ev.device = Some(d);
            batch.push(ev);
        }
        for (address, present) in known {
            if present && !found.contains(&address) {
                let mut ev = HostEvent::new(EventKind::Remove, address);
                ev.reread = true;
                batch.push(ev);
            }
        }
        tracing::info!(
            functions = found.len(),
            "read every function again after lost events"
        );
        self.on_events(batch).await;
    }

    async fn refresh(
        self: &Arc<Self>,
        address: PciAddress,
        live: Option<HostDevice>,
        came_back: bool,
        generation: u64,
    ) {
        let first_sight = !self.seen().knows(address);
        let stored = {
            let snapshot = self.snapshot();
            match snapshot.by_address(address) {
                // First sight of a registered device (the start-up
                // enumeration): nothing was announced yet, so nothing to
                // compare with; no record is copied.
                Some(_) if first_sight && !came_back => None,
                Some(s) => Some(s.clone()),
                None => None,
            }
        };
        let Some(stored) = stored else {
            self.seen().set(address, live);
            return;
        };
        if first_sight {
            self.seen().set(address, live.clone());
        } else {
            // An operation on the device is under way: it publishes the final
            // state itself, so the intermediate steps it causes are not announced.
            let lock = self.device_lock(address);
            let held = lock.try_lock();
            // An operation published after this event's read: what it
            // published is newer than what this read saw.
            let overtaken = self.seen().generation(address) != generation;
            if held.is_ok() && !overtaken {
                if let Some(prev) = self.seen().get(address) {
                    if prev != live {
                        let before = self.view((*stored).clone(), prev);
                        let after = self.view((*stored).clone(), live.clone());
                        self.publish_change(&before, &after).await;
                    }
                }
            }
            drop(held);
        }
        // What the event showed is announced first (the native driver, back
        // from the unplug), and only then does the re-claim take the device:
        // clients see the device return before they see it move.
        if came_back && placement(&stored, live.as_ref()).needed() == Needed::Bind {
            tracing::info!(
                pci_address = %address,
                device_id = %stored.id,
                device_name = %stored.name,
                "a registered device came back: moving it to vfio-pci again"
            );
            let this = self.clone();
            let name = stored.name.clone();
            let Ok(target) = self.resolve(&stored.id) else {
                return;
            };
            // Its own task: it waits for the device's lock, and events keep flowing.
            tokio::spawn(async move {
                if let Err(e) = this.reconcile_one(&target).await {
                    tracing::warn!(pci_address = %address, device_name = %name, error = %e, "could not move the returning device to vfio-pci");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::service::testing::{example, service_on};
    use hypeman_api::VFIO_DRIVER;
    use std::time::Duration;

    /// *(issue 30)* An event's read that an operation's publication
    /// overtook is not announced over it: the state then says what the
    /// operation published, not the older read. (The simulated kernel's
    /// events are not wired here, so nothing else moves the state.)
    #[tokio::test]
    async fn an_overtaken_read_is_not_announced() {
        let f = service_on(&example("l4.toml"), Duration::from_secs(5));
        let s = &f.service;
        s.register_at("0000:a2:00.0", "l4-gpu", Default::default())
            .await
            .unwrap();
        let address = s.resolve("l4-gpu").unwrap().record().pci_address;
        // What an event's read saw, and the generation it was read at.
        let read = s.seen().get(address).unwrap();
        let generation = s.seen().generation(address);
        assert_eq!(read.as_ref().unwrap().driver.as_deref(), Some("nvidia"));

        // Bind publishes meanwhile.
        s.bind(&s.resolve("l4-gpu").unwrap()).await.unwrap();
        s.refresh(address, read, false, generation).await;
        let kept = s.seen().get(address).unwrap();
        assert_eq!(kept.unwrap().driver.as_deref(), Some(VFIO_DRIVER));

        // A read taken after the publication is announced as usual.
        let fresh = s.live(address).await.unwrap();
        let mut unbound = fresh.clone().unwrap();
        unbound.driver = None;
        s.refresh(address, Some(unbound), false, s.seen().generation(address))
            .await;
        assert_eq!(s.seen().get(address).unwrap().unwrap().driver, None);
    }
}
