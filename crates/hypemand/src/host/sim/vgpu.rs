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
    /// An outside tool makes a vGPU of `type_id` on `function` (vendor-VFIO:
    /// writes its `current_vgpu_type`; mdev: creates an mdev), or, with an
    /// empty `type_id`, removes what it carries; only what the driver lists
    /// as creatable there now.
    pub fn set_vgpu(&self, function: PciAddress, type_id: &str) -> Result<(), String> {
        let mut state = self.state();
        let parent = state
            .devices
            .get(&function)
            .map(|d| d.physfn.unwrap_or(d.address))
            .and_then(|p| state.devices.get(&p).cloned())
            .ok_or_else(|| format!("{function} is not on the simulated host"))?;
        let slots = state.slots_of(&parent);
        let Some(slot) = slots.iter().find(|s| s.address == function) else {
            return Err(format!("{function} is not where a vGPU is made (a virtual function of a vGPU-capable GPU, bound to nvidia)"));
        };
        if type_id.is_empty() {
            state.vgpu_current.remove(&function);
            state.mdevs.retain(|_, (on, _)| *on != function);
        } else {
            let offered = slot
                .creatable
                .iter()
                .any(|t| t.id == type_id && t.available > 0);
            if !offered {
                return Err(format!("type {type_id} cannot be made on {function} now"));
            }
            match slot.framework {
                Framework::VendorVfio => {
                    state.vgpu_current.insert(function, type_id.to_string());
                }
                Framework::Mdev => {
                    state.next_mdev += 1;
                    let uuid = format!("5e5e5e5e-0000-4000-8000-{:012x}", state.next_mdev);
                    state.mdevs.insert(uuid, (function, type_id.to_string()));
                }
            }
        }
        tracing::info!(pci_address = %function, type_id = %type_id, "simulator: vGPU set");
        self.save(&state);
        Ok(())
    }
}
