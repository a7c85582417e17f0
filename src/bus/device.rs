//! `org.hypeman.Device1`: one object per registered device, at
//! `/org/hypeman/Devices/<id>`.
//!
//! The object holds only the id; every property is read through the service, so
//! it always shows the registry and the kernel as they are now.

use std::sync::Arc;

use zbus::message::Header;
use zbus::{fdo, interface, Connection, OwnedObjectPath};

use super::bouncer::Action;
use super::manager::authorize;

use super::record::Record;
use crate::error::Error;
use crate::host::HostDevice;
use crate::registry::StoredDevice;
use crate::service::Service;

/// The object path of a device id. Ids are CUID2s (lowercase alphanumerics), which
/// are always valid path elements.
pub fn device_path(id: &str) -> Result<OwnedObjectPath, Error> {
    OwnedObjectPath::try_from(format!("{}/{id}", crate::MANAGER_PATH))
        .map_err(|e| Error::Failed(format!("device id {id} makes no valid object path: {e}")))
}

pub struct DeviceObject {
    service: Arc<Service>,
    id: String,
}

impl DeviceObject {
    pub fn new(service: Arc<Service>, id: String) -> Self {
        DeviceObject { service, id }
    }

    /// One field of the stored record: an index lookup, no copy of the rest.
    fn stored<T>(&self, f: impl FnOnce(&StoredDevice) -> T) -> fdo::Result<T> {
        let snapshot = self.service.snapshot();
        snapshot.resolve(&self.id).map(f).ok_or_else(|| {
            fdo::Error::UnknownObject(format!("device {} is no longer registered", self.id))
        })
    }

    /// The host state as last seen (no host read on the common path).
    async fn live(&self) -> fdo::Result<Option<HostDevice>> {
        let stored = self.stored(Clone::clone)?;
        self.service
            .cached_live(&stored)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))
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
        authorize(&self.service, conn, &header, Action::Delete, &self.id).await?;
        self.service.delete(&self.id).await.map(|_| ())
    }

    /// Moves this device to vfio-pci (idempotent).
    async fn bind(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Record, Error> {
        authorize(&self.service, conn, &header, Action::Bind, &self.id).await?;
        Ok(Record::from(&self.service.bind(&self.id).await?))
    }

    /// Gives this device back to its host driver (idempotent).
    async fn unbind(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Record, Error> {
        authorize(&self.service, conn, &header, Action::Bind, &self.id).await?;
        Ok(Record::from(&self.service.unbind(&self.id).await?))
    }

    /// Binds if needed, then marks this device attached to `instance_id`.
    async fn attach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        instance_id: &str,
    ) -> Result<Record, Error> {
        crate::registry::validate_instance_id(instance_id)?;
        authorize(&self.service, conn, &header, Action::Attach, &self.id).await?;
        Ok(Record::from(
            &self.service.attach(&self.id, instance_id).await?,
        ))
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Record, Error> {
        authorize(&self.service, conn, &header, Action::Attach, &self.id).await?;
        Ok(Record::from(&self.service.detach(&self.id).await?))
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.clone()
    }

    #[zbus(property)]
    async fn name(&self) -> fdo::Result<String> {
        self.stored(|d| d.name.clone())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn pci_address(&self) -> fdo::Result<String> {
        self.stored(|d| d.pci_address.to_string())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn vendor_id(&self) -> fdo::Result<String> {
        self.stored(|d| d.vendor_id.clone())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn device_id(&self) -> fdo::Result<String> {
        self.stored(|d| d.device_id.clone())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn vendor_name(&self) -> fdo::Result<String> {
        self.stored(|d| self.service.names_of(d).0)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn device_name(&self) -> fdo::Result<String> {
        self.stored(|d| self.service.names_of(d).1)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn r#type(&self) -> fdo::Result<String> {
        self.stored(|d| d.kind.as_str().to_string())
    }

    /// The IOMMU group, -1 when the device has none (or is unplugged).
    #[zbus(property)]
    async fn iommu_group(&self) -> fdo::Result<i64> {
        Ok(self
            .live()
            .await?
            .and_then(|d| d.iommu_group)
            .map_or(-1, i64::from))
    }

    /// The bound driver, "" when none.
    #[zbus(property)]
    async fn driver(&self) -> fdo::Result<String> {
        Ok(self
            .live()
            .await?
            .and_then(|d| d.driver)
            .unwrap_or_default())
    }

    #[zbus(property)]
    async fn bound_to_vfio(&self) -> fdo::Result<bool> {
        Ok(self.live().await?.and_then(|d| d.driver).as_deref() == Some(crate::VFIO_DRIVER))
    }

    /// The instance holding the device, "" when none.
    #[zbus(property)]
    async fn attached_to(&self) -> fdo::Result<String> {
        self.stored(|d| d.attached_to.clone().unwrap_or_default())
    }

    #[zbus(property)]
    async fn present(&self) -> fdo::Result<bool> {
        Ok(self.live().await?.is_some())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn created_at(&self) -> fdo::Result<String> {
        self.stored(|d| d.created_at.clone())
    }
}
