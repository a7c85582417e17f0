//! *(issue 26)* The simulated vGPU driver: what NVIDIA's shows in sysfs,
//! with its default rule (NVIDIA's vGPU documentation: a GPU runs in
//! equal-size mode unless switched to mixed-size, so every vGPU on it has
//! the same framebuffer, and together they never exceed the GPU's).
//!
//! The daemon never applies this rule itself: it reads what the driver lists
//! as creatable. Only the simulator has to produce those lists.

use super::faults::{FaultKind, EBUSY, EEXIST, EINVAL, ENOENT};
use super::kernel::failing;
use super::{SimHost, SimState};
use crate::host::vgpu::{Framework, Mdev, Slot, VgpuType};
use crate::host::{HostDevice, HostError, Op};
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

    /// The slot `function` is, as the driver shows it now.
    fn slot(&self, function: PciAddress) -> Option<Slot> {
        let parent = self.devices.get(&function)?;
        let parent = self.devices.get(&parent.physfn.unwrap_or(parent.address))?;
        self.slots_of(parent)
            .into_iter()
            .find(|s| s.address == function)
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

/// The simulated driver's writes (DESIGN.md section 4, "vGPUs"). Where
/// NVIDIA's driver documents no errno, the simulator's choice is said.
impl SimHost {
    pub(super) fn write_vgpu_type(
        &self,
        function: PciAddress,
        type_id: u32,
    ) -> Result<(), HostError> {
        let path = format!("devices/{function}/nvidia/current_vgpu_type");
        let value = type_id.to_string();
        let fault = self.before(Op::SetVgpuType, function, &path, &value)?;
        let fail = failing(&path, &value);
        let mut state = self.state();
        let slot = state
            .slot(function)
            .filter(|s| s.framework == Framework::VendorVfio)
            .ok_or_else(|| fail(ENOENT))?;
        if type_id == 0 {
            state.vgpu_current.remove(&function);
        } else {
            if slot.current.is_some() {
                return Err(fail(EBUSY));
            }
            // The simulator's choice: a type not listed now is EINVAL.
            if !slot.creatable.iter().any(|t| t.id == value) {
                return Err(fail(EINVAL));
            }
            if fault != Some(FaultKind::Mismatch) {
                state.vgpu_current.insert(function, value);
            }
        }
        self.save(&state);
        Ok(())
    }

    pub(super) fn read_vgpu_type(&self, function: PciAddress) -> Result<Option<u32>, HostError> {
        let state = self.state();
        if state.slot(function).is_none() {
            return Err(HostError::Io {
                path: format!("devices/{function}/nvidia/current_vgpu_type"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Ok(state
            .vgpu_current
            .get(&function)
            .and_then(|t| t.parse().ok()))
    }

    pub(super) fn make_mdev(
        &self,
        function: PciAddress,
        type_id: &str,
        uuid: &str,
    ) -> Result<(), HostError> {
        let path = format!("class/mdev_bus/{function}/mdev_supported_types/{type_id}/create");
        let fault = self.before(Op::CreateMdev, function, &path, uuid)?;
        let fail = failing(&path, uuid);
        let mut state = self.state();
        let slot = state
            .slot(function)
            .filter(|s| s.framework == Framework::Mdev)
            .ok_or_else(|| fail(ENOENT))?;
        if state.mdevs.contains_key(uuid) {
            return Err(fail(EEXIST));
        }
        // The simulator's choice: no instance left is EINVAL.
        if !slot
            .creatable
            .iter()
            .any(|t| t.id == type_id && t.available > 0)
        {
            return Err(fail(EINVAL));
        }
        if fault != Some(FaultKind::Lost) {
            state
                .mdevs
                .insert(uuid.to_string(), (function, type_id.to_string()));
        }
        self.save(&state);
        Ok(())
    }

    pub(super) fn unmake_mdev(&self, function: PciAddress, uuid: &str) -> Result<(), HostError> {
        let path = format!("bus/mdev/devices/{uuid}/remove");
        self.before(Op::RemoveMdev, function, &path, "1")?;
        let mut state = self.state();
        if state.mdevs.remove(uuid).is_none() {
            return Err(failing(&path, "1")(ENOENT));
        }
        self.save(&state);
        Ok(())
    }

    pub(super) fn has_mdev(&self, uuid: &str) -> bool {
        self.state().mdevs.contains_key(uuid)
    }

    /// A VMM opens `node` (`pid` 0: closes it), as Simulator1.HoldNode.
    pub fn hold_node(&self, node: &str, pid: u32, comm: &str) {
        let mut state = self.state();
        if pid == 0 {
            state.vfio_holders.remove(node);
        } else {
            state
                .vfio_holders
                .insert(node.to_string(), (pid, comm.to_string()));
        }
    }

    /// A function's group node; an mdev's own group (mdevs get one each),
    /// numbered from 10000 by its place among the mdevs.
    pub(super) fn nodes(&self, function: PciAddress, mdev: Option<&str>) -> Vec<String> {
        let state = self.state();
        match mdev {
            Some(u) => state
                .mdevs
                .keys()
                .position(|k| k == u)
                .map(|i| vec![format!("/dev/vfio/{}", 10000 + i)])
                .unwrap_or_default(),
            None => state
                .devices
                .get(&function)
                .and_then(|d| d.iommu_group)
                .map(|g| vec![format!("/dev/vfio/{g}")])
                .unwrap_or_default(),
        }
    }
}
