//! `org.hypeman.Devices1` on `/org/hypeman/Devices`: the registry's front door.

use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, OwnedObjectPath};

use super::bouncer::{self, Action, Target};

use super::device::device_path;
use super::record::{Available, Record};
use crate::error::Error;
use crate::service::Service;

/// Replies of this many entries are followed by a heap trim: megabytes of
/// buffers would otherwise stay with the process after they are sent.
const LARGE_REPLY: usize = 1024;

pub struct Manager {
    service: Arc<Service>,
}

impl Manager {
    pub fn new(service: Arc<Service>) -> Self {
        Manager { service }
    }
}

/// The polkit target of a registered device.
pub(crate) fn target_of(service: &Service, id_or_name: &str) -> Result<Target, Error> {
    let d = service.resolve(id_or_name)?;
    Ok(Target {
        pci_address: d.pci_address.to_string(),
        device_id: format!("{}:{}", d.vendor_id, d.device_id),
        name: d.name,
    })
}

/// Authorizes `action` on a registered device for the caller of `header`.
pub(crate) async fn authorize(
    service: &Service,
    conn: &Connection,
    header: &Header<'_>,
    action: Action,
    id_or_name: &str,
) -> Result<(), Error> {
    let target = target_of(service, id_or_name)?;
    bouncer::check(conn, header, action, &target).await
}

#[interface(name = "org.hypeman.Devices1")]
impl Manager {
    /// Registers a host PCI device for passthrough (the seed's `POST /devices`).
    /// An empty `name` means `pci-<address>`.
    async fn register(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        pci_address: &str,
        name: &str,
    ) -> Result<(OwnedObjectPath, Record), Error> {
        if !name.is_empty() {
            crate::registry::validate_name(name)?;
        }
        let host = self.service.inspect(pci_address).await?;
        let target = Target {
            pci_address: host.address.to_string(),
            device_id: format!("{:04x}:{:04x}", host.vendor, host.device),
            name: if name.is_empty() {
                host.address.default_name()
            } else {
                name.to_string()
            },
        };
        bouncer::check(conn, &header, Action::Register, &target).await?;
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
    async fn delete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
    ) -> Result<(), Error> {
        authorize(&self.service, conn, &header, Action::Delete, id_or_name).await?;
        self.service.delete(id_or_name).await.map(|_| ())
    }

    /// Every PCI device on the host, registered or not.
    async fn list_available(&self) -> Result<Vec<Available>, Error> {
        let available: Vec<Available> = self
            .service
            .list_available()
            .await?
            .iter()
            .map(Available::from)
            .collect();
        if available.len() >= LARGE_REPLY {
            crate::memory::trim_soon();
        }
        Ok(available)
    }

    /// Moves a device to vfio-pci (idempotent).
    async fn bind(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        authorize(&self.service, conn, &header, Action::Bind, id_or_name).await?;
        Ok(Record::from(&self.service.bind(id_or_name).await?))
    }

    /// Gives a device back to its host driver (idempotent).
    async fn unbind(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        authorize(&self.service, conn, &header, Action::Bind, id_or_name).await?;
        Ok(Record::from(&self.service.unbind(id_or_name).await?))
    }

    /// Binds if needed, then marks the device attached to `instance_id`.
    async fn attach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
        instance_id: &str,
    ) -> Result<Record, Error> {
        crate::registry::validate_instance_id(instance_id)?;
        authorize(&self.service, conn, &header, Action::Attach, id_or_name).await?;
        Ok(Record::from(
            &self.service.attach(id_or_name, instance_id).await?,
        ))
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        authorize(&self.service, conn, &header, Action::Attach, id_or_name).await?;
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
