//! `org.hypeman.Device1`: one object per registered device, at
//! `/org/hypeman/Devices/<id>`.
//!
//! The object holds only the id. Every property is a field of the device's
//! [`Record`] (the same record `Get` answers), built from the registry and the
//! host state last seen, so a property and `Get` cannot disagree. The
//! properties that follow the host are listed once in [`live_properties`],
//! which is also what `PropertiesChanged` is computed from.

use std::sync::Arc;

use std::collections::HashMap;

use hypeman_api::{Error, Record};
use zbus::message::Header;
use zbus::OwnedVariant as OwnedValue;
use zbus::Variant as Value;
use zbus::{fdo, interface, Connection};

use crate::edge::authz::{Authz, Method};
use crate::edge::polkit::Caller;
use crate::service::Service;

pub struct DeviceObject {
    service: Arc<Service>,
    authz: Arc<Authz>,
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

/// The properties that change after the object was made (the host moved, the
/// device was attached, its tags were set): name and value.
pub fn live_properties(r: &Record) -> [(&'static str, Value<'static>); 7] {
    [
        ("Tags", Value::from(r.tags.clone())),
        ("Driver", prop::driver(r).into()),
        ("BoundToVfio", r.bound_to_vfio.into()),
        ("AttachedTo", prop::attached_to(r).into()),
        ("Present", r.present.into()),
        ("IommuGroup", prop::iommu_group(r).into()),
        ("NumaNode", prop::numa_node(r).into()),
    ]
}

/// The live properties that differ between two records, in table order.
pub fn changed_properties(before: &Record, after: &Record) -> Vec<(&'static str, Value<'static>)> {
    live_properties(before)
        .into_iter()
        .zip(live_properties(after))
        .filter(|((_, b), (_, a))| a != b)
        .map(|(_, (name, a))| (name, a))
        .collect()
}

impl DeviceObject {
    pub fn new(service: Arc<Service>, authz: Arc<Authz>, id: String) -> Self {
        DeviceObject { service, authz, id }
    }

    /// The device's record from the registry and the host state as last seen
    /// (no host read on the common path).
    async fn record(&self) -> fdo::Result<Record> {
        let stored = self
            .service
            .snapshot()
            .by_id(&self.id)
            .cloned()
            .ok_or_else(|| {
                fdo::Error::UnknownObject(format!("device {} is no longer registered", self.id))
            })?;
        let live = self
            .service
            .cached_live(&stored)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        Ok(self.service.view(stored, live).record())
    }
}

#[interface(name = "org.hypeman.Device1")]
impl DeviceObject {
    /// Unregisters this device; refuses while it is attached.
    async fn delete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let _args = super::expect_args(&header, "")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Delete, &self.id)
            .await?;
        self.service.delete(&t).await.map(|_| ())
    }

    /// Moves this device to vfio-pci (idempotent).
    async fn bind(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Bind, &self.id)
            .await?;
        Ok(self.service.bind(&t).await?.record())
    }

    /// Gives this device back to its host driver (idempotent).
    async fn unbind(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Unbind, &self.id)
            .await?;
        Ok(self.service.unbind(&t).await?.record())
    }

    /// Binds if needed, then marks this device attached to `instance_id`.
    async fn attach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        instance_id: &str,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "s")?;
        crate::store::registry::validate_instance_id(instance_id)?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Attach, &self.id)
            .await?;
        Ok(self.service.attach(&t, instance_id).await?.record())
    }

    /// Bind, with options: `force` (b) overrides the soft blockers and needs
    /// `org.hypeman.devices.force` as well.
    async fn bind_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "a{sv}")?;
        let method = super::bind_method(&options)?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), method, &self.id)
            .await?;
        Ok(self.service.bind(&t).await?.record())
    }

    /// Attach, with options (as BindWithOptions).
    async fn attach_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        instance_id: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "sa{sv}")?;
        let method = super::attach_method(&options)?;
        crate::store::registry::validate_instance_id(instance_id)?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), method, &self.id)
            .await?;
        Ok(self.service.attach(&t, instance_id).await?.record())
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Detach, &self.id)
            .await?;
        Ok(self.service.detach(&t).await?.record())
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
        self.service
            .device_blockers(&self.id)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn created_at(&self) -> fdo::Result<String> {
        Ok(self.record().await?.created_at)
    }
}
