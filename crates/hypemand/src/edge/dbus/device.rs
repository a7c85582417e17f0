//! `org.hypeman.Device1`: one object per registered device, at
//! `/org/hypeman/Devices/<id>`.
//!
//! The object holds only the id. Every property is a field of the device's
//! [`Record`] (the same record `Get` answers), built from the registry and the
//! host state last seen, so a property and `Get` cannot disagree. The
//! properties are listed once, in `properties`: `GetAll`, `GetManagedObjects`
//! and `InterfacesAdded` build one record per object from it, and
//! `PropertiesChanged` is computed from its live rows. Its methods are the
//! manager's ([`Manager::change`]) with the device's own id.

use std::collections::HashMap;
use std::sync::Arc;

use hypeman_api::{Error, Record};
use zbus::message::Header;
use zbus::OwnedVariant as OwnedValue;
use zbus::Variant as Value;
use zbus::{fdo, interface};

use super::exported::{AllProperties, Exported, Properties, PropertiesFuture};
use super::manager::Manager;
use crate::service::Op;

/// One registered device on the bus: the manager, and the device's id.
pub struct DeviceObject {
    manager: Arc<Manager>,
    id: String,
}

/// How each property reads from a record (-1 and "" stand for none on D-Bus).
mod prop {
    use hypeman_api::Record;

    pub fn driver(r: &Record) -> String {
        r.driver.clone().unwrap_or_default()
    }
    pub fn attached_to(r: &Record) -> String {
        r.attached_to.clone().unwrap_or_default()
    }
    pub fn iommu_group(r: &Record) -> i64 {
        r.iommu_group.unwrap_or(-1)
    }
    pub fn numa_node(r: &Record) -> i64 {
        r.numa_node.unwrap_or(-1)
    }
}

/// Whether a property changes after the object was made (the host moved,
/// the device was attached, its tags were set): those are signalled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Const,
    Live,
}

/// Every property but `Blockers` (read from the host when asked), from one
/// record: name, whether it changes, value. The live rows come first, in
/// the order their `PropertiesChanged` signals are sent.
fn properties(r: &Record) -> [(&'static str, Change, Value<'static>); 16] {
    use Change::{Const, Live};
    [
        ("Tags", Live, Value::from(r.tags.clone())),
        ("Driver", Live, prop::driver(r).into()),
        ("BoundToVfio", Live, r.bound_to_vfio.into()),
        ("AttachedTo", Live, prop::attached_to(r).into()),
        ("Present", Live, r.present.into()),
        ("IommuGroup", Live, prop::iommu_group(r).into()),
        ("NumaNode", Live, prop::numa_node(r).into()),
        ("Id", Const, r.id.clone().into()),
        ("Name", Const, r.name.clone().into()),
        ("PciAddress", Const, r.pci_address.clone().into()),
        ("VendorId", Const, r.vendor_id.clone().into()),
        ("DeviceId", Const, r.device_id.clone().into()),
        ("VendorName", Const, r.vendor_name.clone().into()),
        ("DeviceName", Const, r.device_name.clone().into()),
        ("Type", Const, r.kind.clone().into()),
        ("CreatedAt", Const, r.created_at.clone().into()),
    ]
}

/// The live properties that differ between two records, in table order.
pub fn changed_properties(before: &Record, after: &Record) -> Vec<(&'static str, Value<'static>)> {
    properties(before)
        .into_iter()
        .zip(properties(after))
        .filter(|((_, change, b), (_, _, a))| *change == Change::Live && a != b)
        .map(|(_, (name, _, a))| (name, a))
        .collect()
}

impl DeviceObject {
    /// The object of device `id`.
    pub fn new(manager: Arc<Manager>, id: String) -> DeviceObject {
        DeviceObject { manager, id }
    }

    /// The object of device `id`, served through the daemon's base.
    pub fn exported(manager: Arc<Manager>, id: String) -> Exported<DeviceObject> {
        Exported::new(DeviceObject::new(manager, id))
    }

    /// The device's record from the registry and the host state as last seen
    /// (no host read on the common path).
    async fn record(&self) -> fdo::Result<Record> {
        let service = &self.manager.service;
        let stored = service
            .snapshot()
            .by_id(&self.id)
            .map(|d| (**d).clone())
            .ok_or_else(|| {
                fdo::Error::UnknownObject(format!("device {} is no longer registered", self.id))
            })?;
        let live = service
            .cached_live(&stored)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        Ok(service.view(stored, live).into_record())
    }

    /// Every property, from one record and one read of the blockers.
    pub async fn all(&self) -> fdo::Result<Properties> {
        let record = self.record().await?;
        let mut all = Properties::with_capacity(17);
        for (name, _, value) in properties(&record) {
            let value =
                OwnedValue::try_from(value).map_err(|e| fdo::Error::Failed(e.to_string()))?;
            all.insert(name.to_string(), value);
        }
        let blockers = OwnedValue::try_from(Value::from(self.blockers().await?))
            .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        all.insert("Blockers".to_string(), blockers);
        Ok(all)
    }
}

impl AllProperties for DeviceObject {
    fn all_properties(&self) -> Option<PropertiesFuture<'_>> {
        Some(Box::pin(self.all()))
    }
}

#[interface(name = "org.hypeman.Device1")]
impl DeviceObject {
    /// Unregisters this device; refuses while it is attached.
    async fn delete(&self, #[zbus(header)] header: Header<'_>) -> Result<(), Error> {
        self.manager
            .change(&header, &self.id, Op::Delete)
            .await
            .map(drop)
    }

    /// Moves this device to vfio-pci (idempotent).
    async fn bind(&self, #[zbus(header)] header: Header<'_>) -> Result<Record, Error> {
        let op = Manager::bind(None)?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Gives this device back to its host driver (idempotent).
    async fn unbind(&self, #[zbus(header)] header: Header<'_>) -> Result<Record, Error> {
        self.manager.change(&header, &self.id, Op::Unbind).await
    }

    /// Binds if needed, then marks this device attached to `instance_id`.
    async fn attach(
        &self,
        #[zbus(header)] header: Header<'_>,
        instance_id: &str,
    ) -> Result<Record, Error> {
        let op = Manager::attach(instance_id, None)?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Bind, with options: `force` (b) overrides the soft blockers and needs
    /// `org.hypeman.devices.force` as well.
    async fn bind_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let op = Manager::bind(Some(&options))?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Attach, with options (as BindWithOptions).
    async fn attach_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        instance_id: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let op = Manager::attach(instance_id, Some(&options))?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(&self, #[zbus(header)] header: Header<'_>) -> Result<Record, Error> {
        self.manager.change(&header, &self.id, Op::Detach).await
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.clone()
    }

    #[zbus(property)]
    async fn name(&self) -> fdo::Result<String> {
        Ok(self.record().await?.name)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn pci_address(&self) -> fdo::Result<String> {
        Ok(self.record().await?.pci_address)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn vendor_id(&self) -> fdo::Result<String> {
        Ok(self.record().await?.vendor_id)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn device_id(&self) -> fdo::Result<String> {
        Ok(self.record().await?.device_id)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn vendor_name(&self) -> fdo::Result<String> {
        Ok(self.record().await?.vendor_name)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn device_name(&self) -> fdo::Result<String> {
        Ok(self.record().await?.device_name)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn r#type(&self) -> fdo::Result<String> {
        Ok(self.record().await?.kind)
    }

    /// The IOMMU group, -1 when the device has none (or is unplugged).
    #[zbus(property)]
    async fn iommu_group(&self) -> fdo::Result<i64> {
        Ok(prop::iommu_group(&self.record().await?))
    }

    /// The NUMA node, -1 when the platform has none (or it is unplugged).
    #[zbus(property)]
    async fn numa_node(&self) -> fdo::Result<i64> {
        Ok(prop::numa_node(&self.record().await?))
    }

    /// The bound driver, "" when none.
    #[zbus(property)]
    async fn driver(&self) -> fdo::Result<String> {
        Ok(prop::driver(&self.record().await?))
    }

    #[zbus(property)]
    async fn bound_to_vfio(&self) -> fdo::Result<bool> {
        Ok(self.record().await?.bound_to_vfio)
    }

    /// The instance holding the device, "" when none.
    #[zbus(property)]
    async fn attached_to(&self) -> fdo::Result<String> {
        Ok(prop::attached_to(&self.record().await?))
    }

    #[zbus(property)]
    async fn present(&self) -> fdo::Result<bool> {
        Ok(self.record().await?.present)
    }

    /// User-defined labels (`SetTags` changes them).
    #[zbus(property)]
    async fn tags(&self) -> fdo::Result<HashMap<String, String>> {
        Ok(self.record().await?.tags)
    }

    /// Why the host must keep this device (`code`, `message`,
    /// `pci_address`), read from the host when asked: mounts, routes and
    /// open nodes change without an event, so no change signal is sent.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn blockers(&self) -> fdo::Result<Vec<hypeman_api::Blocker>> {
        self.manager
            .service
            .device_blockers(&self.id)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn created_at(&self) -> fdo::Result<String> {
        Ok(self.record().await?.created_at)
    }
}
