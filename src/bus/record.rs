//! The dictionaries (`a{sv}`) the API sends: a registered device's record and an
//! available host device. Keys are the seed's JSON field names, so
//! `busctl --json=pretty` shows the seed's document; optional keys are omitted
//! when they have no value.

use zbus::{DeserializeDict, SerializeDict, Type};

use crate::service::{AvailableView, DeviceView};

/// A registered device (`Register`, `List`, `Get`, ...).
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct Record {
    pub id: String,
    pub name: String,
    pub pci_address: String,
    pub vendor_id: String,
    pub device_id: String,
    #[zbus(rename = "type")]
    pub kind: String,
    pub iommu_group: Option<i64>,
    pub bound_to_vfio: bool,
    pub attached_to: Option<String>,
    pub created_at: String,
    pub driver: Option<String>,
    pub present: bool,
    pub vendor_name: String,
    pub device_name: String,
}

impl From<&DeviceView> for Record {
    fn from(v: &DeviceView) -> Self {
        let s = &v.stored;
        Record {
            id: s.id.clone(),
            name: s.name.clone(),
            pci_address: s.pci_address.to_string(),
            vendor_id: s.vendor_id.clone(),
            device_id: s.device_id.clone(),
            kind: s.kind.as_str().to_string(),
            iommu_group: v.iommu_group().map(i64::from),
            bound_to_vfio: v.bound_to_vfio(),
            attached_to: s.attached_to.clone(),
            created_at: s.created_at.clone(),
            driver: v.driver().map(str::to_string),
            present: v.present(),
            vendor_name: v.vendor_name.clone(),
            device_name: v.device_name.clone(),
        }
    }
}

/// A PCI function on the host (`ListAvailable`), with the original API's
/// available-device field names.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct Available {
    pub pci_address: String,
    pub vendor_id: String,
    pub device_id: String,
    pub vendor_name: String,
    pub device_name: String,
    pub iommu_group: Option<i64>,
    pub current_driver: Option<String>,
    #[zbus(rename = "type")]
    pub kind: String,
    pub registered_as: Option<String>,
}

impl From<&AvailableView> for Available {
    fn from(v: &AvailableView) -> Self {
        Available {
            pci_address: v.host.address.to_string(),
            vendor_id: format!("{:04x}", v.host.vendor),
            device_id: format!("{:04x}", v.host.device),
            vendor_name: v.vendor_name.clone(),
            device_name: v.device_name.clone(),
            iommu_group: v.host.iommu_group.map(i64::from),
            current_driver: v.host.driver.clone(),
            kind: v.kind.as_str().to_string(),
            registered_as: v.registered_as.clone(),
        }
    }
}
