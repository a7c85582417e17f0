//! *(issue 26)* The simulated vGPU driver: what NVIDIA's shows in sysfs,
//! with its default rule (NVIDIA's vGPU documentation: a GPU runs in
//! equal-size mode unless switched to mixed-size, so every vGPU on it has
//! the same framebuffer, and together they never exceed the GPU's).
//!
//! The daemon never applies this rule itself: it reads what the driver lists
//! as creatable. Only the simulator has to produce those lists.

use super::{SimHost, SimState};
use crate::host::vgpu::{Framework, Mdev, Slot, VgpuType};
use crate::host::HostDevice;
use crate::pci::PciAddress;

/// The driver that publishes vGPU sysfs on a GPU's functions.
const NVIDIA: &str = crate::host::units::NVIDIA_DRIVER;

impl SimState {
    /// The functions of `parent` where vGPUs are made: its virtual
    /// functions while nvidia has them, or (mdev, no SR-IOV) the GPU itself.
    pub(super) fn slot_addresses(&self, parent: &HostDevice) -> Vec<PciAddress> {
        let Some(v) = self.vgpu.get(&parent.address) else {
            return Vec::new();
        };
        let on_nvidia = |a: &PciAddress| {
            self.devices
                .get(a)
                .is_some_and(|d| d.driver.as_deref() == Some(NVIDIA))
        };
        match parent.sriov {
            Some(s) => s
                .current_vfs(parent.address)
                .into_iter()
                .filter(on_nvidia)
                .collect(),
            None if v.framework == Framework::Mdev && on_nvidia(&parent.address) => {
                vec![parent.address]
            }
            None => Vec::new(),
        }
    }

    /// The framebuffer each vGPU on `parent` takes, in MiB.
    fn used(&self, parent: PciAddress, slots: &[PciAddress]) -> Vec<u64> {
        let Some(v) = self.vgpu.get(&parent) else {
            return Vec::new();
        };
        let fb = |id: &str| v.types.iter().find(|t| t.0 == id).map(|t| t.2);
        let vendor = slots
            .iter()
            .filter_map(|a| self.vgpu_current.get(a))
            .filter_map(|id| fb(id));
        let mdev = self
            .mdevs
            .values()
            .filter(|(a, _)| slots.contains(a))
            .filter_map(|(_, id)| fb(id));
        vendor.chain(mdev).collect()
    }

    /// Whether one more vGPU of `fb` MiB fits on `parent` now: within the
    /// framebuffer left, and of the size already in use (equal-size mode).
    pub(super) fn fits(&self, parent: PciAddress, slots: &[PciAddress], fb: u64) -> u64 {
        let Some(v) = self.vgpu.get(&parent) else {
            return 0;
        };
        let used = self.used(parent, slots);
        if used.iter().any(|u| *u != fb) {
            return 0;
        }
        (v.framebuffer_mb - used.iter().sum::<u64>().min(v.framebuffer_mb)) / fb
    }

    /// What the driver shows on `parent`'s slots now.
    pub(super) fn slots_of(&self, parent: &HostDevice) -> Vec<Slot> {
        let Some(v) = self.vgpu.get(&parent.address) else {
            return Vec::new();
        };
        let addresses = self.slot_addresses(parent);
        addresses
            .iter()
            .map(|a| {
                let current = self
                    .vgpu_current
                    .get(a)
                    .and_then(|id| id.parse::<u32>().ok());
                let mdevs: Vec<Mdev> = self
                    .mdevs
                    .iter()
                    .filter(|(_, (on, _))| on == a)
                    .map(|(uuid, (_, id))| Mdev {
                        uuid: uuid.clone(),
                        type_id: id.clone(),
                    })
                    .collect();
                // A function carries one vGPU at most; the PF of an mdev GPU
                // without SR-IOV carries as many as fit.
                let busy = current.is_some() || (*a != parent.address && !mdevs.is_empty());
                let creatable = v
                    .types
                    .iter()
                    .filter_map(|(id, name, fb)| {
                        let room = if busy {
                            0
                        } else {
                            self.fits(parent.address, &addresses, *fb)
                        };
                        let available = if *a == parent.address {
                            room
                        } else {
                            room.min(1)
                        };
                        let listed = v.framework == Framework::Mdev || available > 0;
                        listed.then(|| VgpuType {
                            id: id.clone(),
                            name: name.clone(),
                            framebuffer_mb: Some(*fb),
                            available: available as u32,
                            max_instances: (v.framework == Framework::Mdev)
                                .then(|| (v.framebuffer_mb / fb) as u32),
                        })
                    })
                    .collect();
                Slot {
                    address: *a,
                    framework: v.framework,
                    current,
                    mdevs,
                    creatable,
                }
            })
            .collect()
    }
}

impl SimHost {
    /// Sets a virtual function's `current_vgpu_type` behind the daemon's
    /// back (`None`: 0), as another tool would.
    #[cfg(test)]
    pub fn put_vgpu(&self, vf: PciAddress, type_id: Option<&str>) {
        let mut state = self.state();
        match type_id {
            Some(id) => state.vgpu_current.insert(vf, id.to_string()),
            None => state.vgpu_current.remove(&vf),
        };
    }
}
