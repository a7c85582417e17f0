//! The dictionaries (`a{sv}`) the API sends, and the seed's JSON documents.
//!
//! [`Record`] is a registered device (`Register`, `List`, `Get`, ...);
//! [`Available`] a PCI function on the host (`ListAvailable`). Keys are the
//! seed's JSON field names, so `busctl --json=pretty` shows the seed's
//! document; optional keys are omitted when they have no value. The same types
//! are what a client receives: nothing is copied into a second type.

use serde::Serialize;
use zbus::zvariant::{DeserializeDict, SerializeDict, Type};

/// A registered device: what the daemon keeps, joined with the kernel's view now.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "a{sv}")]
pub struct Record {
    /// The device id: 24 lowercase letters and digits, starting with a letter.
    pub id: String,
    /// The unique name (`pci-<address>` unless one was given).
    pub name: String,
    /// The PCI address, `0000:a2:00.0`.
    pub pci_address: String,
    /// The PCI vendor id, 4 lowercase hex digits.
    pub vendor_id: String,
    /// The PCI device id, 4 lowercase hex digits.
    pub device_id: String,
    /// `gpu`, `nic`, `nvme`, ... from the PCI class (the seed's `type`).
    #[zvariant(rename = "type")]
    pub kind: String,
    /// The IOMMU group; absent when the device has none (or is unplugged).
    pub iommu_group: Option<i64>,
    /// Whether vfio-pci has the device now.
    pub bound_to_vfio: bool,
    /// The instance holding the device; absent when none.
    pub attached_to: Option<String>,
    /// When it was registered, RFC 3339, UTC, whole seconds.
    pub created_at: String,
    /// The driver bound now; absent when none.
    pub driver: Option<String>,
    /// Whether the device is on the host now (false while unplugged).
    pub present: bool,
    /// The vendor's name from the PCI ID database, empty when unknown.
    pub vendor_name: String,
    /// The device's name from the PCI ID database, empty when unknown.
    pub device_name: String,
    /// The NUMA node the device is attached to; absent when the platform has
    /// none (sysfs says -1) or the device is unplugged.
    pub numa_node: Option<i64>,
    /// User-defined labels (issue 15): `a{ss}`, empty when none.
    pub tags: std::collections::HashMap<String, String>,
    /// *(issue 26)* A physical function's most virtual functions
    /// (`sriov_totalvfs`); absent when it has no SR-IOV.
    pub sriov_total_vfs: Option<i64>,
    /// *(issue 26)* How many virtual functions it has now (`sriov_numvfs`).
    pub sriov_vfs: Option<i64>,
    /// *(issue 26)* A virtual function's physical function, by address;
    /// absent for every other function.
    pub parent: Option<String>,
    /// *(issue 27)* The process whose end releases the attachment (its pid
    /// in the daemon's pid namespace); absent without a process lease.
    pub holder_pid: Option<i64>,
    /// *(issue 27)* The systemd unit whose end releases the attachment (a
    /// unit lease), or the unit a process holder ran in when it was leased;
    /// absent otherwise.
    pub holder_unit: Option<String>,
    /// *(issue 27)* A unit lease's `InvocationID` (32 hex digits): the run
    /// of the unit that holds the device; absent for any other lease.
    pub holder_invocation: Option<String>,
    /// *(issue 27)* What the holder's end does: `detach` or `give-back`;
    /// absent without a lease.
    pub on_release: Option<String>,
    /// *(issue 28)* How the kernel can reset the function between tenants,
    /// its `reset_method` (`flr bus`); `""`: it cannot; absent: the kernel
    /// does not say (before 5.15), or the device is unplugged.
    pub reset_method: Option<String>,
    /// *(issue 28)* The subsystem vendor id registered (4 hex digits);
    /// absent for a record of before until the device is seen.
    pub subsystem_vendor_id: Option<String>,
    /// *(issue 28)* The subsystem device id registered, likewise.
    pub subsystem_device_id: Option<String>,
    /// *(issue 28)* The IOMMU group number at registration (`iommu_group`
    /// is the group now); absent when not known.
    pub registered_iommu_group: Option<i64>,
    /// *(issue 28)* Another card sits at the address than the one
    /// registered: what was registered and what is there now. Absent when
    /// it is the same (or unplugged).
    pub hardware_changed: Option<String>,
    /// *(issue 28)* The vfio driver the function is on, or that Bind would
    /// use: `vfio-pci`, or the variant the kernel's `modules.alias` names
    /// for it (`nvgrace_gpu_vfio_pci`). Absent while unplugged.
    pub vfio_driver: Option<String>,
    /// *(issue 28)* What a VMM opens through iommufd, beside the group node
    /// (`/dev/vfio/<iommu_group>`): the function's VFIO device cdev and
    /// `/dev/iommu`, while the kernel offers the cdev (6.2+, on a vfio
    /// driver); empty otherwise.
    pub vfio_devices: Vec<String>,
    /// *(issue 29)* `ok`, `degraded` (new non-fatal or correctable PCIe
    /// errors since registration, past the daemon's threshold) or `failed`
    /// (a fatal error, or gone while on vfio or attached).
    pub health: Option<String>,
}

/// Why a PCI function must not be taken from the host *(issue 14)*: `code`
/// (`no-iommu`, `bridge`, `boot-vga`, `group`, ...), a message a person can act
/// on, and the function it concerns (itself, or a member of its group).
#[derive(
    Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type, zbus::Variant,
)]
#[zvariant(signature = "a{sv}")]
pub struct Blocker {
    /// The kind of reason: `no-iommu`, `bridge`, `boot-vga`, `mounted`, `network-active`, `open-by`, `group`, `usage-unknown`.
    pub code: String,
    /// What it is, for a person.
    pub message: String,
    /// The PCI address, `0000:a2:00.0`.
    pub pci_address: String,
}

/// A PCI function on the host (`ListAvailable`), with the original API's
/// available-device field names.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "a{sv}")]
pub struct Available {
    /// The PCI address, `0000:a2:00.0`.
    pub pci_address: String,
    /// The PCI vendor id, 4 lowercase hex digits.
    pub vendor_id: String,
    /// The PCI device id, 4 lowercase hex digits.
    pub device_id: String,
    /// The vendor's name from the PCI ID database, empty when unknown.
    pub vendor_name: String,
    /// The device's name from the PCI ID database, empty when unknown.
    pub device_name: String,
    /// The IOMMU group; absent when the device has none (or is unplugged).
    pub iommu_group: Option<i64>,
    /// The driver bound now; absent when none.
    pub current_driver: Option<String>,
    /// `gpu`, `nic`, `nvme`, ... from the PCI class (the seed's `type`).
    #[zvariant(rename = "type")]
    pub kind: String,
    /// The id it is registered under, if it is.
    pub registered_as: Option<String>,
    /// The NUMA node; absent when the platform has none.
    pub numa_node: Option<i64>,
    /// *(issue 26)* As in [`Record`].
    pub sriov_total_vfs: Option<i64>,
    /// *(issue 26)* As in [`Record`].
    pub sriov_vfs: Option<i64>,
    /// *(issue 26)* A virtual function's physical function, by address.
    pub parent: Option<String>,
    /// No blocker: the function may be set aside for a VM.
    pub passable: bool,
    /// Why it must stay with the host, one entry per reason.
    pub blockers: Vec<Blocker>,
    /// *(issue 28)* As in [`Record`].
    pub reset_method: Option<String>,
    /// *(issue 28)* As in [`Record`].
    pub vfio_driver: Option<String>,
    /// *(issue 28)* What a client should know that does not block:
    /// `no-reset` (the kernel cannot reset it between tenants) and
    /// `acs-override` (the IOMMU groups are not isolation boundaries on this
    /// boot), in the blockers' shape.
    pub warnings: Vec<Blocker>,
}

/// The seed's `Device` document: exactly its keys, in its order, with
/// `attached_to: null` when not attached and `iommu_group` left out when the
/// device has none.
#[derive(Debug, Serialize)]
pub struct SeedDevice<'a> {
    /// The device id: 24 lowercase letters and digits, starting with a letter.
    pub id: &'a str,
    /// Whether vfio-pci has the device now.
    pub bound_to_vfio: bool,
    /// When it was registered, RFC 3339, UTC, whole seconds.
    pub created_at: &'a str,
    /// The PCI device id, 4 lowercase hex digits.
    pub device_id: &'a str,
    /// The IOMMU group; absent when the device has none (or is unplugged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<i64>,
    /// The PCI address, `0000:a2:00.0`.
    pub pci_address: &'a str,
    /// `gpu`, `nic`, `nvme`, ... from the PCI class (the seed's `type`).
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The PCI vendor id, 4 lowercase hex digits.
    pub vendor_id: &'a str,
    /// The instance holding the device; absent when none.
    pub attached_to: Option<&'a str>,
    /// The unique name (`pci-<address>` unless one was given).
    pub name: &'a str,
    /// Present when the device has tags, as Hypeman's `tags`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<std::collections::BTreeMap<&'a str, &'a str>>,
}

/// The original API's available-device document (absent values left out).
#[derive(Debug, Serialize)]
pub struct SeedAvailable<'a> {
    /// The PCI address, `0000:a2:00.0`.
    pub pci_address: &'a str,
    /// The PCI vendor id, 4 lowercase hex digits.
    pub vendor_id: &'a str,
    /// The PCI device id, 4 lowercase hex digits.
    pub device_id: &'a str,
    /// The vendor's name from the PCI ID database, empty when unknown.
    pub vendor_name: &'a str,
    /// The device's name from the PCI ID database, empty when unknown.
    pub device_name: &'a str,
    /// The IOMMU group; absent when the device has none (or is unplugged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<i64>,
    /// The driver bound now; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_driver: Option<&'a str>,
    /// `gpu`, `nic`, `nvme`, ... from the PCI class (the seed's `type`).
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The id it is registered under, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered_as: Option<&'a str>,
    /// The NUMA node; absent when the platform has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<i64>,
}

impl Record {
    /// The seed's JSON document of this device.
    pub fn seed(&self) -> SeedDevice<'_> {
        SeedDevice {
            id: &self.id,
            bound_to_vfio: self.bound_to_vfio,
            created_at: &self.created_at,
            device_id: &self.device_id,
            iommu_group: self.iommu_group,
            pci_address: &self.pci_address,
            kind: &self.kind,
            vendor_id: &self.vendor_id,
            attached_to: self.attached_to.as_deref(),
            name: &self.name,
            tags: (!self.tags.is_empty()).then(|| {
                self.tags
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect()
            }),
        }
    }
}

impl Available {
    /// The available-device JSON document of this function.
    pub fn seed(&self) -> SeedAvailable<'_> {
        SeedAvailable {
            pci_address: &self.pci_address,
            vendor_id: &self.vendor_id,
            device_id: &self.device_id,
            vendor_name: &self.vendor_name,
            device_name: &self.device_name,
            iommu_group: self.iommu_group,
            current_driver: self.current_driver.as_deref(),
            kind: &self.kind,
            registered_as: self.registered_as.as_deref(),
            numa_node: self.numa_node,
        }
    }
}
