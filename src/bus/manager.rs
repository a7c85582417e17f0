//! `org.hypeman.Devices1` on `/org/hypeman/Devices`: the registry's front door.

use std::sync::Arc;

use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedObjectPath};

use super::device::device_path;
use super::record::{Available, Record};
use crate::error::Error;
use crate::service::Service;

pub struct Manager {
    service: Arc<Service>,
}

impl Manager {
    pub fn new(service: Arc<Service>) -> Self {
        Manager { service }
    }
}

#[interface(name = "org.hypeman.Devices1")]
impl Manager {
    /// Registers a host PCI device for passthrough (the seed's `POST /devices`).
    /// An empty `name` means `pci-<address>`.
    async fn register(
        &self,
        pci_address: &str,
        name: &str,
    ) -> Result<(OwnedObjectPath, Record), Error> {
        let view = self.service.register(pci_address, name).await?;
        Ok((device_path(&view.stored.id)?, Record::from(&view)))
    }

    /// Every registered device.
    async fn list(&self) -> Result<Vec<Record>, Error> {
        Ok(self
            .service
            .list()
            .await?
            .iter()
            .map(Record::from)
            .collect())
    }

    /// One device, by id or exact name.
    async fn get(&self, id_or_name: &str) -> Result<Record, Error> {
        Ok(Record::from(&self.service.get(id_or_name).await?))
    }

    /// Unregisters a device; refuses while it is attached.
    async fn delete(&self, id_or_name: &str) -> Result<(), Error> {
        self.service.delete(id_or_name).await.map(|_| ())
    }

    /// Every PCI device on the host, registered or not.
    async fn list_available(&self) -> Result<Vec<Available>, Error> {
        Ok(self
            .service
            .list_available()
            .await?
            .iter()
            .map(Available::from)
            .collect())
    }

    /// Moves a device to vfio-pci (idempotent).
    async fn bind(&self, id_or_name: &str) -> Result<Record, Error> {
        Ok(Record::from(&self.service.bind(id_or_name).await?))
    }

    /// Gives a device back to its host driver (idempotent).
    async fn unbind(&self, id_or_name: &str) -> Result<Record, Error> {
        Ok(Record::from(&self.service.unbind(id_or_name).await?))
    }

    /// Binds if needed, then marks the device attached to `instance_id`.
    async fn attach(&self, id_or_name: &str, instance_id: &str) -> Result<Record, Error> {
        Ok(Record::from(
            &self.service.attach(id_or_name, instance_id).await?,
        ))
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(&self, id_or_name: &str) -> Result<Record, Error> {
        Ok(Record::from(&self.service.detach(id_or_name).await?))
    }

    #[zbus(property)]
    fn version(&self) -> String {
        crate::VERSION.to_string()
    }

    /// A PCI device appeared on the host (registered or not).
    #[zbus(signal)]
    pub async fn host_device_added(
        emitter: &SignalEmitter<'_>,
        pci_address: &str,
    ) -> zbus::Result<()>;

    /// A PCI device left the host (registered or not).
    #[zbus(signal)]
    pub async fn host_device_removed(
        emitter: &SignalEmitter<'_>,
        pci_address: &str,
    ) -> zbus::Result<()>;
}
