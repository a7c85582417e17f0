//! Typed proxies, for programs that want zbus directly. Replies that fail come
//! back as [`crate::Error`], the same table the daemon answers from.

use zbus::OwnedObjectPath;

use crate::error::Error;
use crate::record::{Available, Record};

/// The manager, `org.hypeman.Devices1` on `/org/hypeman/Devices`.
#[zbus::proxy(
    interface = "org.hypeman.Devices1",
    default_service = "org.hypeman.Devices",
    default_path = "/org/hypeman/Devices"
)]
pub trait Devices {
    fn register(&self, pci_address: &str, name: &str) -> Result<(OwnedObjectPath, Record), Error>;
    fn create(
        &self,
        request: std::collections::HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<(OwnedObjectPath, Record), Error>;
    fn list(&self) -> Result<Vec<Record>, Error>;
    fn list_by_tags(
        &self,
        tags: std::collections::HashMap<&str, &str>,
    ) -> Result<Vec<Record>, Error>;
    fn set_tags(
        &self,
        id_or_name: &str,
        set: std::collections::HashMap<&str, &str>,
        remove: &[&str],
    ) -> Result<Record, Error>;
    fn get(&self, id_or_name: &str) -> Result<Record, Error>;
    fn delete(&self, id_or_name: &str) -> Result<(), Error>;
    fn list_available(&self) -> Result<Vec<Available>, Error>;
    fn bind(&self, id_or_name: &str) -> Result<Record, Error>;
    fn unbind(&self, id_or_name: &str) -> Result<Record, Error>;
    fn attach(&self, id_or_name: &str, instance_id: &str) -> Result<Record, Error>;
    fn bind_with_options(
        &self,
        id_or_name: &str,
        options: std::collections::HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<Record, Error>;
    fn attach_with_options(
        &self,
        id_or_name: &str,
        instance_id: &str,
        options: std::collections::HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<Record, Error>;
    fn detach(&self, id_or_name: &str) -> Result<Record, Error>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(signal)]
    fn host_device_added(&self, pci_address: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn host_device_removed(&self, pci_address: &str) -> zbus::Result<()>;
}

/// One device object, `org.hypeman.Device1` on `/org/hypeman/Devices/<id>`.
#[zbus::proxy(
    interface = "org.hypeman.Device1",
    default_service = "org.hypeman.Devices"
)]
pub trait Device {
    fn bind(&self) -> Result<Record, Error>;
    fn unbind(&self) -> Result<Record, Error>;
    fn attach(&self, instance_id: &str) -> Result<Record, Error>;
    fn detach(&self) -> Result<Record, Error>;
    fn delete(&self) -> Result<(), Error>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pci_address(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn driver(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn bound_to_vfio(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn attached_to(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn present(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn iommu_group(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn numa_node(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn tags(&self) -> zbus::Result<std::collections::HashMap<String, String>>;
    /// Why the host must keep it, read when asked (no change signal).
    #[zbus(property)]
    fn blockers(&self) -> zbus::Result<Vec<crate::record::Blocker>>;
}
