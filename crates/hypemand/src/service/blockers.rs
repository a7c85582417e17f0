//! Why a PCI function must not be taken from the host *(issue 14, first
//! part)*: decided from what the host says of the function and of its IOMMU
//! group. Hard blockers (`no-iommu`, `bridge`) can never be overridden; soft
//! ones (`boot-vga`, `group`) mean the host is using it.
//!
//! Not yet here (the rest of issue 14): `mounted`, `network-active`,
//! `open-by`, and forcing.

use crate::host::HostDevice;
use crate::pci::class::is_bridge;
use crate::pci::PciAddress;

/// One reason, about `address` (the function itself or a group member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub code: &'static str,
    pub message: String,
    pub address: PciAddress,
}

impl Blocker {
    /// Never overridden: vfio-pci cannot take the function at all.
    pub fn hard(&self) -> bool {
        matches!(self.code, "no-iommu" | "bridge")
    }

    pub fn record(&self) -> hypeman_api::Blocker {
        hypeman_api::Blocker {
            code: self.code.to_string(),
            message: self.message.clone(),
            pci_address: self.address.to_string(),
        }
    }
}

/// The function's own blockers.
pub fn own(dev: &HostDevice, virtual_machine: bool) -> Vec<Blocker> {
    let mut out = Vec::new();
    let mut add = |code, message: String| {
        out.push(Blocker {
            code,
            message,
            address: dev.address,
        })
    };
    if dev.iommu_group.is_none() {
        add(
            "no-iommu",
            if virtual_machine {
                format!("{} has no IOMMU group: this is a virtual machine without a virtual IOMMU; give the VM one (QEMU: -device intel-iommu or virtio-iommu) or pass the device through on the host that runs it", dev.address)
            } else {
                format!("{} has no IOMMU group: the IOMMU is off; enable VT-d (Intel) or AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on", dev.address)
            },
        );
    }
    if is_bridge(dev.class) {
        add(
            "bridge",
            format!(
                "{} is a PCI bridge: bridges stay with the host (vfio-pci refuses them)",
                dev.address
            ),
        );
    }
    if dev.boot_vga {
        add(
            "boot-vga",
            format!(
                "{} is the boot display: the host's console is on it",
                dev.address
            ),
        );
    }
    out
}

/// The function's blockers, its group's included: a member (other than a
/// bridge, which stays with the host in any case) that the host uses blocks
/// the whole group.
pub fn of(dev: &HostDevice, members: &[HostDevice], virtual_machine: bool) -> Vec<Blocker> {
    let mut out = own(dev, virtual_machine);
    for m in members
        .iter()
        .filter(|m| m.address != dev.address && !is_bridge(m.class))
    {
        for b in own(m, virtual_machine).into_iter().filter(|b| !b.hard()) {
            out.push(Blocker {
                code: "group",
                message: format!(
                    "{} shares IOMMU group {} with {}: {}",
                    dev.address,
                    dev.iommu_group.unwrap_or_default(),
                    m.address,
                    b.message
                ),
                address: m.address,
            });
        }
    }
    out
}

/// The message of `HostInUse`: every blocker, one after another.
pub fn describe(blockers: &[Blocker]) -> String {
    let list: Vec<String> = blockers
        .iter()
        .map(|b| format!("[{}] {}", b.code, b.message))
        .collect();
    format!(
        "the host is using this device or its IOMMU group, nothing was changed: {}",
        list.join("; ")
    )
}
