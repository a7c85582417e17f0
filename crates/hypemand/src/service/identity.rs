//! *(issue 28)* Never a different card than the one registered.
//!
//! At Register the record keeps, besides the vendor and device ids, the
//! subsystem ids, the class and the IOMMU group number ([`Identity`]). What
//! sits at the address is compared with them at start-up and before every
//! move to vfio-pci (Bind, Attach, the re-claim after a replug, the re-bind
//! at boot): another vendor, device or subsystem is a hard blocker,
//! `hardware-changed`, and the move is refused with `HardwareChanged` before
//! anything is written. A changed group number alone (common after a
//! firmware or kernel update) is logged and shown, never refused. Records of
//! before, without an identity, take it from the first start that sees the
//! device. As Proxmox's PCI mappings do (`assert_valid`).

use super::Service;
use crate::host::HostDevice;
use crate::store::registry::Identity;
use crate::store::StoredDevice;

/// What sits at the address now, as a record keeps it.
pub fn of(host: &HostDevice) -> Identity {
    Identity {
        subsystem_vendor: format!("{:04x}", host.subsystem_vendor),
        subsystem_device: format!("{:04x}", host.subsystem_device),
        class: format!("{:06x}", host.class),
        iommu_group: host.iommu_group,
    }
}

/// `vvvv:dddd (subsystem ssss:ssss)`.
fn shown(vendor: &str, device: &str, identity: Option<&Identity>) -> String {
    match identity {
        Some(i) => format!(
            "{vendor}:{device} (subsystem {}:{})",
            i.subsystem_vendor, i.subsystem_device
        ),
        None => format!("{vendor}:{device}"),
    }
}

/// Why `host` is not the card `stored` was registered for, or `None` when
/// it is (vendor, device and, when the record knows them, subsystem ids).
pub fn changed(stored: &StoredDevice, host: &HostDevice) -> Option<String> {
    // Compared as numbers: a List asks this of every record, and the same
    // card (the common case) costs no allocation.
    let hex = |s: &str| u16::from_str_radix(s, 16).ok();
    let same_ids =
        hex(&stored.vendor_id) == Some(host.vendor) && hex(&stored.device_id) == Some(host.device);
    let same_subsystem = stored.identity.as_ref().is_none_or(|i| {
        hex(&i.subsystem_vendor) == Some(host.subsystem_vendor)
            && hex(&i.subsystem_device) == Some(host.subsystem_device)
    });
    if same_ids && same_subsystem {
        return None;
    }
    let now = of(host);
    let (vendor, device) = (
        format!("{:04x}", host.vendor),
        format!("{:04x}", host.device),
    );
    Some(format!(
        "{} was registered as {} at {}, but {} sits there now: another card. It is not bound or attached; delete {} and register it again to accept the new card",
        stored.name,
        shown(&stored.vendor_id, &stored.device_id, stored.identity.as_ref()),
        stored.pci_address,
        shown(&vendor, &device, stored.identity.as_ref().map(|_| &now)),
        stored.name,
    ))
}

/// The refusal of a move of a card that is not the registered one.
pub fn refusal(stored: &StoredDevice, host: &HostDevice) -> Option<hypeman_api::Error> {
    changed(stored, host).map(hypeman_api::Error::HardwareChanged)
}

impl Service {
    /// At start-up, before anything is re-bound: a record without an
    /// identity takes it from the device now at its address (if it is
    /// there and the same vendor and device); a card that is not the one
    /// registered, and a group number that moved, are logged.
    pub async fn check_identities(&self) {
        let records: Vec<std::sync::Arc<StoredDevice>> = self.snapshot().iter().cloned().collect();
        let addresses = records.iter().map(|d| d.pci_address).collect();
        let live = self.door.read_many(addresses).await.unwrap_or_default();
        // The records to learn an identity are changed all at once: the
        // store writes changes that wait together in one sync, so a registry
        // of before costs a few syncs at its first start, not one per device.
        let mut learn = Vec::new();
        for (s, l) in records.iter().zip(live) {
            let Ok(Some(host)) = l else { continue };
            if let Some(why) = changed(s, &host) {
                tracing::warn!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    reason = %why,
                    "hardware changed: the device will not be bound or attached"
                );
                continue;
            }
            match &s.identity {
                None => learn.push((s.clone(), of(&host))),
                Some(i) if i.iommu_group != host.iommu_group => tracing::warn!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    registered_group = %i.iommu_group.map_or("none".into(), |g| g.to_string()),
                    group = %host.iommu_group.map_or("none".into(), |g| g.to_string()),
                    "the device's IOMMU group number changed since it was registered (a firmware or kernel update?); not refused"
                ),
                Some(_) => {}
            }
        }
        let learned = learn.iter().map(|(s, identity)| async move {
            match self
                .modify(&s.id, |d| d.identity = Some(identity.clone()))
                .await
            {
                Ok(_) => tracing::debug!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    "a record of before took the identity of the device at its address"
                ),
                Err(e) => {
                    tracing::warn!(device_id = %s.id, error = %e, "cannot keep the device's identity")
                }
            }
        });
        futures_util::future::join_all(learned).await;
        if !learn.is_empty() {
            tracing::info!(
                records = learn.len(),
                "records of before took the identity of the devices at their addresses"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::tests::sample;

    fn host(vendor: u16, device: u16, sub: (u16, u16), group: Option<u32>) -> HostDevice {
        HostDevice {
            vendor,
            device,
            subsystem_vendor: sub.0,
            subsystem_device: sub.1,
            iommu_group: group,
            ..HostDevice::example()
        }
    }

    #[test]
    fn another_vendor_device_or_subsystem_is_another_card_and_a_group_is_not() {
        let mut s = sample("0000:a2:00.0", "l4");
        let l4 = host(0x10de, 0x27b8, (0x10de, 0x16ca), Some(82));
        // A record of before knows only vendor and device.
        assert_eq!(changed(&s, &l4), None);
        s.identity = Some(of(&l4));
        assert_eq!(changed(&s, &l4), None);
        // The group number alone moved: the same card.
        assert_eq!(
            changed(&s, &host(0x10de, 0x27b8, (0x10de, 0x16ca), Some(17))),
            None
        );
        let other = host(0x1002, 0x73bf, (0x1002, 0x0e3a), Some(82));
        let why = changed(&s, &other).unwrap();
        assert!(
            why.contains("10de:27b8 (subsystem 10de:16ca)")
                && why.contains("1002:73bf (subsystem 1002:0e3a)"),
            "{why}"
        );
        // The same chip from another board maker is another card too.
        assert!(changed(&s, &host(0x10de, 0x27b8, (0x1043, 0x8888), Some(82))).is_some());
        assert!(matches!(
            refusal(&s, &other),
            Some(hypeman_api::Error::HardwareChanged(_))
        ));
    }
}
