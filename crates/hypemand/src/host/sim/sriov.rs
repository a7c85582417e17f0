//! *(issue 26)* Virtual functions as the kernel makes and removes them when
//! `sriov_numvfs` is written (`drivers/pci/iov.c`): each where the routing
//! id arithmetic puts it, with the physical function's vendor, class and
//! NUMA node, the `sriov_vf_device` id, an IOMMU group of its own, an `add`
//! uevent, then its driver's probe (`bind`).

use super::{SimHost, SimState};
use crate::host::{EventKind, HostDevice};
use crate::pci::PciAddress;

/// What the kernel announced, in order, for the daemon's event path.
pub(super) type Events = Vec<(EventKind, PciAddress)>;

impl SimState {
    /// The group a function had (groups outlive their functions here), or a
    /// new one.
    fn group_for(&mut self, address: PciAddress) -> u32 {
        if let Some((g, _)) = self.groups.iter().find(|(_, m)| m.contains(&address)) {
            return *g;
        }
        let g = self.groups.keys().next_back().map_or(0, |g| g + 1);
        self.groups.insert(g, vec![address]);
        g
    }

    /// Makes `pf`'s first `count` virtual functions (it has none now);
    /// `lost` leaves out the last one, as a fault. Returns the events.
    pub(super) fn enable_vfs(&mut self, pf: PciAddress, count: u32, lost: bool) -> Events {
        let Some(p) = self.devices.get_mut(&pf) else {
            return Vec::new();
        };
        let Some(sriov) = p.sriov.as_mut() else {
            return Vec::new();
        };
        sriov.num_vfs = count;
        let (sriov, parent) = (*sriov, p.clone());
        let mut vfs = sriov.vfs(pf, count);
        if lost {
            vfs.pop();
        }
        let mut events = Vec::new();
        for address in vfs {
            if self.devices.contains_key(&address) {
                continue;
            }
            let iommu_group = parent.iommu_group.map(|_| self.group_for(address));
            let mut vf = HostDevice {
                address,
                device: sriov.vf_device.unwrap_or(parent.device),
                driver: None,
                iommu_group,
                driver_override: None,
                boot_vga: false,
                sriov: None,
                physfn: Some(pf),
                // SR-IOV requires FLR of every virtual function.
                reset_method: Some("flr".into()),
                ..parent.clone()
            };
            self.devices.insert(address, vf.clone());
            events.push((EventKind::Add, address));
            if let Some(d) = SimHost::matching_driver(self, &vf) {
                vf.driver = Some(d);
                self.devices.insert(address, vf);
                events.push((EventKind::Bind, address));
            }
        }
        events
    }

    /// Removes every virtual function of `pf`: each one's driver lets go,
    /// then it leaves the bus. Returns the events.
    pub(super) fn disable_vfs(&mut self, pf: PciAddress) -> Events {
        let Some(sriov) = self.devices.get_mut(&pf).and_then(|p| p.sriov.as_mut()) else {
            return Vec::new();
        };
        let vfs = sriov.current_vfs(pf);
        sriov.num_vfs = 0;
        let mut events = Vec::new();
        for address in vfs {
            // What the functions carried goes with them.
            self.vgpu_current.remove(&address);
            self.mdevs.retain(|_, (on, _)| *on != address);
            let Some(vf) = self.devices.remove(&address) else {
                continue;
            };
            if vf.driver.is_some() {
                events.push((EventKind::Unbind, address));
            }
            events.push((EventKind::Remove, address));
        }
        events
    }
}
