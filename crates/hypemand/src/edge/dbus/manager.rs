//! `org.hypeman.Devices1` on `/org/hypeman/Devices`: the registry's front door.
//! Each handler forwards to the service; changing ones pass [`Authz`] first.

use std::sync::Arc;

use std::collections::{BTreeMap, HashMap};

use hypeman_api::{Available, Error, Record};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::OwnedVariant as OwnedValue;
use zbus::{interface, Connection, OwnedObjectPath};

use super::device_path;
use crate::edge::authz::{Authz, Method};
use crate::edge::polkit::Caller;
use crate::service::Service;

/// Replies of this many entries are followed by a heap trim: megabytes of
/// buffers would otherwise stay with the process after they are sent.
const LARGE_REPLY: usize = 1024;

pub struct Manager {
    service: Arc<Service>,
    authz: Arc<Authz>,
}

impl Manager {
    pub fn new(service: Arc<Service>, authz: Arc<Authz>) -> Self {
        Manager { service, authz }
    }
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
        let _args = super::expect_args(&header, "ss")?;
        self.authz
            .register(conn, &Caller::Bus(&header), pci_address, name)
            .await?;
        let view = self
            .service
            .register(pci_address, name, Default::default())
            .await?;
        Ok((device_path(&view.stored.id)?, view.record()))
    }

    /// Registers from the seed's create request as a dictionary:
    /// `pci_address` (s), optional `name` (s) and `tags` (a{ss}).
    async fn create(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedValue>,
    ) -> Result<(OwnedObjectPath, Record), Error> {
        let _args = super::expect_args(&header, "a{sv}")?;
        let r = hypeman_api::CreateRequest::from_dict(&request)?;
        let name = r.name.as_deref().unwrap_or("");
        self.authz
            .register(conn, &Caller::Bus(&header), &r.pci_address, name)
            .await?;
        let view = self.service.register(&r.pci_address, name, r.tags).await?;
        Ok((device_path(&view.stored.id)?, view.record()))
    }

    /// The registered devices carrying every pair of `tags` (exact match).
    async fn list_by_tags(
        &self,
        #[zbus(header)] header: Header<'_>,
        tags: BTreeMap<String, String>,
    ) -> Result<Vec<Record>, Error> {
        let _args = super::expect_args(&header, "a{ss}")?;
        Ok(self
            .service
            .list_tagged(&tags)
            .await?
            .into_iter()
            .map(|v| v.into_record())
            .collect())
    }

    /// Sets the pairs of `set` and removes the keys of `remove` on a
    /// device's tags (authorized as register).
    async fn set_tags(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "sa{ss}as")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::SetTags, id_or_name)
            .await?;
        Ok(self.service.set_tags(&t, set, remove).await?.record())
    }

    /// Every registered device.
    async fn list(&self, #[zbus(header)] header: Header<'_>) -> Result<Vec<Record>, Error> {
        let _args = super::expect_args(&header, "")?;
        let records: Vec<Record> = self
            .service
            .list()
            .await?
            .into_iter()
            .map(|v| v.into_record())
            .collect();
        if records.len() >= LARGE_REPLY {
            crate::memory::trim_soon();
        }
        Ok(records)
    }

    /// One device, by id or exact name.
    async fn get(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "s")?;
        Ok(self.service.get(id_or_name).await?.record())
    }

    /// Unregisters a device; refuses while it is attached.
    async fn delete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
    ) -> Result<(), Error> {
        let _args = super::expect_args(&header, "s")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Delete, id_or_name)
            .await?;
        self.service.delete(&t).await.map(|_| ())
    }

    /// Every PCI device on the host, registered or not.
    async fn list_available(
        &self,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<Vec<Available>, Error> {
        let _args = super::expect_args(&header, "")?;
        let available: Vec<Available> = self
            .service
            .list_available()
            .await?
            .iter()
            .map(|v| v.record())
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
        let _args = super::expect_args(&header, "s")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Bind, id_or_name)
            .await?;
        Ok(self.service.bind(&t).await?.record())
    }

    /// Gives a device back to its host driver (idempotent).
    async fn unbind(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "s")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Unbind, id_or_name)
            .await?;
        Ok(self.service.unbind(&t).await?.record())
    }

    /// Binds if needed, then marks the device attached to `instance_id`.
    async fn attach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
        instance_id: &str,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "ss")?;
        crate::store::registry::validate_instance_id(instance_id)?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Attach, id_or_name)
            .await?;
        Ok(self.service.attach(&t, instance_id).await?.record())
    }

    /// Bind, with options: `force` (b) overrides the soft blockers (the host
    /// is using the device) and needs `org.hypeman.devices.force` as well.
    async fn bind_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "sa{sv}")?;
        let method = super::bind_method(&options)?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), method, id_or_name)
            .await?;
        Ok(self.service.bind(&t).await?.record())
    }

    /// Attach, with options (as BindWithOptions).
    async fn attach_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
        instance_id: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "ssa{sv}")?;
        let method = super::attach_method(&options)?;
        crate::store::registry::validate_instance_id(instance_id)?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), method, id_or_name)
            .await?;
        Ok(self.service.attach(&t, instance_id).await?.record())
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        let _args = super::expect_args(&header, "s")?;
        let t = self
            .authz
            .device(conn, &Caller::Bus(&header), Method::Detach, id_or_name)
            .await?;
        Ok(self.service.detach(&t).await?.record())
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
