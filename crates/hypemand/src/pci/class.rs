//! The device type rule: which PCI functions Hypeman calls a `gpu`.

use serde::{Deserialize, Serialize};

/// PCI vendors whose processing accelerators (class 0x12) are GPUs in all but name:
/// NVIDIA, AMD and Intel data-centre parts report 0x12 rather than 0x03.
const GPU_VENDORS: [u16; 3] = [0x10de, 0x1002, 0x8086];

/// The seed's `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    Gpu,
    Pci,
}

impl DeviceType {
    /// `gpu` for display controllers (base class 0x03) from any vendor, and for
    /// processing accelerators (0x12) from NVIDIA, AMD or Intel; `pci` otherwise.
    /// `class` is the 24-bit class code as sysfs shows it (`0x030200`).
    pub fn from_class(vendor: u16, class: u32) -> Self {
        match base_class(class) {
            0x03 => DeviceType::Gpu,
            0x12 if GPU_VENDORS.contains(&vendor) => DeviceType::Gpu,
            _ => DeviceType::Pci,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Gpu => "gpu",
            DeviceType::Pci => "pci",
        }
    }
}

/// The base class byte of a 24-bit class code.
pub fn base_class(class: u32) -> u8 {
    ((class >> 16) & 0xff) as u8
}

/// Every bridge (base class 0x06: host, ISA/LPC, PCI-to-PCI, CardBus and the
/// rest) stays with the host: a VM given the host bridge or the LPC bridge
/// (the firmware's TPM, the keyboard controller, the RTC) would take the
/// platform with it. These are the `bridge` hard blocker.
pub fn is_bridge(class: u32) -> bool {
    base_class(class) == 0x06
}

/// What kind of bridge a class code is, as `lspci` names the subclass.
pub fn bridge_kind(class: u32) -> &'static str {
    match (class >> 8) & 0xff {
        0x00 => "host bridge",
        0x01 => "ISA bridge",
        0x02 => "EISA bridge",
        0x03 => "MicroChannel bridge",
        0x04 => "PCI bridge",
        0x05 => "PCMCIA bridge",
        0x06 => "NuBus bridge",
        0x07 => "CardBus bridge",
        0x08 => "RACEway bridge",
        0x09 => "semi-transparent PCI-to-PCI bridge",
        0x0a => "InfiniBand to PCI host bridge",
        _ => "bridge",
    }
}

/// PCI-to-PCI bridges (0x0604) alone keep their special role in IOMMU group
/// viability: vfio lets a group be used while its PCI-to-PCI bridges stay on
/// pcieport or no driver, so they never stand in the way of their group.
pub fn is_pci_bridge(class: u32) -> bool {
    (class >> 8) & 0xffff == 0x0604
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_rules_by_class() {
        let table = [
            (0x10de, 0x030200, DeviceType::Gpu), // NVIDIA L4 (3D controller)
            (0x10de, 0x030000, DeviceType::Gpu), // VGA
            (0x1234, 0x030000, DeviceType::Gpu), // any vendor's display controller
            (0x1af4, 0x038000, DeviceType::Gpu), // other display controller
            (0x10de, 0x120000, DeviceType::Gpu), // NVIDIA processing accelerator
            (0x1002, 0x120000, DeviceType::Gpu), // AMD Instinct
            (0x8086, 0x120000, DeviceType::Gpu), // Intel accelerator
            (0x1e52, 0x120000, DeviceType::Pci), // other vendor's accelerator
            (0x10de, 0x040300, DeviceType::Pci), // NVIDIA HDMI audio
            (0x8086, 0x020000, DeviceType::Pci), // Ethernet
            (0x144d, 0x010802, DeviceType::Pci), // NVMe
            (0x8086, 0x060400, DeviceType::Pci), // bridge
            (0x8086, 0x0c0330, DeviceType::Pci), // USB xHCI
        ];
        for (vendor, class, want) in table {
            assert_eq!(
                DeviceType::from_class(vendor, class),
                want,
                "{vendor:04x} {class:06x}"
            );
        }
    }

    #[test]
    fn bridges() {
        assert!(is_bridge(0x060400));
        assert!(is_bridge(0x060401));
        assert!(is_bridge(0x060000)); // host bridge
        assert!(is_bridge(0x060100)); // ISA/LPC bridge
        assert!(is_bridge(0x068000)); // other bridge
        assert!(!is_bridge(0x030000));
        assert!(!is_bridge(0x050000));
        // Only PCI-to-PCI bridges are left out of group viability.
        assert!(is_pci_bridge(0x060400));
        assert!(is_pci_bridge(0x060401));
        assert!(!is_pci_bridge(0x060000));
        assert!(!is_pci_bridge(0x060100));
        assert_eq!(bridge_kind(0x060000), "host bridge");
        assert_eq!(bridge_kind(0x060100), "ISA bridge");
        assert_eq!(bridge_kind(0x060400), "PCI bridge");
        assert_eq!(bridge_kind(0x068000), "bridge");
    }
}
