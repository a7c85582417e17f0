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
    /// `Register(pci_address, name)`: sets a host device aside.
    fn register(&self, pci_address: &str, name: &str) -> Result<(OwnedObjectPath, Record), Error>;
    /// `Create(request)`: Register from the seed's create request.
    fn create(
        &self,
        request: std::collections::HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<(OwnedObjectPath, Record), Error>;
    /// `List`: every registered device.
    fn list(&self) -> Result<Vec<Record>, Error>;
    /// `ListByTags(tags)`: the devices carrying every pair.
    fn list_by_tags(
        &self,
        tags: std::collections::HashMap<&str, &str>,
    ) -> Result<Vec<Record>, Error>;
    /// `SetTags(id_or_name, set, remove)`: changes a device's tags.
    fn set_tags(
        &self,
        id_or_name: &str,
        set: std::collections::HashMap<&str, &str>,
        remove: &[&str],
    ) -> Result<Record, Error>;
    /// `Get(id_or_name)`: one device.
    fn get(&self, id_or_name: &str) -> Result<Record, Error>;
    /// `Delete`: unregisters the device.
    fn delete(&self, id_or_name: &str) -> Result<(), Error>;
    /// `ListAvailable`: every PCI function on the host.
    fn list_available(&self) -> Result<Vec<Available>, Error>;
    /// `Bind`: moves the device to vfio-pci.
    fn bind(&self, id_or_name: &str) -> Result<Record, Error>;
    /// `Unbind`: gives the device back to its host driver.
    fn unbind(&self, id_or_name: &str) -> Result<Record, Error>;
    /// `Attach`: binds if needed, then marks the device held by `instance_id`.
    fn attach(&self, id_or_name: &str, instance_id: &str) -> Result<Record, Error>;
    /// `BindWithOptions`: Bind, with `force`.
    fn bind_with_options(
        &self,
        id_or_name: &str,
        options: std::collections::HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<Record, Error>;
    /// `AttachWithOptions`: Attach, with `force`.
    fn attach_with_options(
        &self,
        id_or_name: &str,
        instance_id: &str,
        options: std::collections::HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<Record, Error>;
    /// `Detach`: clears the attachment.
    fn detach(&self, id_or_name: &str) -> Result<Record, Error>;
    /// `SetVirtualFunctions` *(issue 26)*: a physical function's SR-IOV
    /// virtual functions.
    fn set_virtual_functions(&self, id_or_name: &str, count: u32) -> Result<Record, Error>;
    /// The daemon's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// `HostDeviceAdded`: a PCI function appeared on the host.
    #[zbus(signal)]
    fn host_device_added(&self, pci_address: &str) -> zbus::Result<()>;
    /// `HostDeviceRemoved`: a PCI function left the host.
    #[zbus(signal)]
    fn host_device_removed(&self, pci_address: &str) -> zbus::Result<()>;
}

/// One device object, `org.hypeman.Device1` on `/org/hypeman/Devices/<id>`.
#[zbus::proxy(
    interface = "org.hypeman.Device1",
    default_service = "org.hypeman.Devices"
)]
pub trait Device {
    /// `Bind`: moves the device to vfio-pci.
    fn bind(&self) -> Result<Record, Error>;
    /// `Unbind`: gives the device back to its host driver.
    fn unbind(&self) -> Result<Record, Error>;
    /// `Attach`: binds if needed, then marks the device held by `instance_id`.
    fn attach(&self, instance_id: &str) -> Result<Record, Error>;
    /// `Detach`: clears the attachment.
    fn detach(&self) -> Result<Record, Error>;
    /// `Delete`: unregisters the device.
    fn delete(&self) -> Result<(), Error>;
    /// The `Id` property.
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// The `Name` property.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// The `PciAddress` property.
    #[zbus(property)]
    fn pci_address(&self) -> zbus::Result<String>;
    /// The `Driver` property.
    #[zbus(property)]
    fn driver(&self) -> zbus::Result<String>;
    /// The `BoundToVfio` property.
    #[zbus(property)]
    fn bound_to_vfio(&self) -> zbus::Result<bool>;
    /// The `AttachedTo` property.
    #[zbus(property)]
    fn attached_to(&self) -> zbus::Result<String>;
    /// The `Present` property.
    #[zbus(property)]
    fn present(&self) -> zbus::Result<bool>;
    /// The `IommuGroup` property.
    #[zbus(property)]
    fn iommu_group(&self) -> zbus::Result<i64>;
    /// The `NumaNode` property.
    #[zbus(property)]
    fn numa_node(&self) -> zbus::Result<i64>;
    /// The `Tags` property.
    #[zbus(property)]
    fn tags(&self) -> zbus::Result<std::collections::HashMap<String, String>>;
    /// Why the host must keep it, read when asked (no change signal).
    #[zbus(property)]
    fn blockers(&self) -> zbus::Result<Vec<crate::record::Blocker>>;
    /// *(issue 29)* `ok`, `degraded` or `failed`, from the PCIe error
    /// counters read when asked.
    #[zbus(property)]
    fn health(&self) -> zbus::Result<String>;
}
