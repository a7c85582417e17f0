//! The D-Bus edge: calls in, forwarded to the service; the service's changes
//! out, as objects and signals. No rule lives here.
//!
//! - [`exported`]: the base every interface is served through: argument
//!   signatures, read-only properties, heap trims, `GetAll` from one record;
//! - [`manager`]: `org.hypeman.Devices1`, the registry's front door, and the
//!   one helper every changing method goes through;
//! - [`device`]: `org.hypeman.Device1`, one object per registered device,
//!   whose methods are the manager's with the device's own id;
//! - [`objects`]: the ObjectManager, announcing registrations and deletions;
//! - [`socket`] and [`fallback`]: *(issue 30)* the bus socket, whose reader
//!   hands calls on device objects to the fallback, which makes each object
//!   for the call: no device costs an exported object;
//! - [`simulator`]: `org.hypeman.Simulator1`, only under `--simulate`.
//!
//! Authorization is [`crate::edge::authz`]'s, for every edge.

pub mod device;
pub mod exported;
pub mod fallback;
pub mod manager;
pub mod objects;
pub mod simulator;
pub mod socket;
pub mod vgpu;

use std::sync::Arc;

use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::Connection;

use hypeman_api::Error;
use zbus::OwnedObjectPath;

use super::authz::Authz;
use crate::service::{BoxFuture, DeviceView, Publisher, Service};
use exported::Exported;
use fallback::Fallback;
use manager::Manager;

pub use hypeman_api::BusChoice;

/// The object path of a device id.
pub fn device_path(id: &str) -> Result<OwnedObjectPath, Error> {
    hypeman_api::device_path(id)
        .ok_or_else(|| Error::Failed(format!("device id {id} makes no valid object path")))
}

/// Why the bus cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot connect to the bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("cannot connect to the bus: {0}")]
    Socket(#[source] socket::SocketError),
    #[error("cannot export objects: {0}")]
    Export(#[source] zbus::Error),
    #[error(
        "the name {} is taken: another hypemand is already running on this bus",
        hypeman_api::BUS_NAME
    )]
    NameTaken,
    #[error("cannot own the name org.hypeman.Devices: {0}")]
    Name(#[source] zbus::Error),
}

/// Connects to the bus (nothing is exported and no name is taken yet),
/// over the daemon's own socket ([`socket`]): calls on device objects go to
/// the returned [`Fallback`], which answers them as unknown until [`serve`].
pub async fn connect(bus: &BusChoice) -> Result<(Connection, Arc<Fallback>), ServeError> {
    let address = match bus {
        BusChoice::System => zbus::Address::system(),
        BusChoice::Session => zbus::Address::session(),
        BusChoice::Address(a) => a.parse(),
    }
    .map_err(|e| ServeError::Socket(socket::SocketError::Address(e)))?;
    let (socket, calls) = socket::connect(address, fallback::takes)
        .await
        .map_err(ServeError::Socket)?;
    let conn = zbus::connection::Builder::socket(socket)
        .build()
        .await
        .map_err(ServeError::Connect)?;
    let fallback = Fallback::start(&conn, calls);
    Ok((conn, fallback))
}

/// Exports the manager and the ObjectManager on `conn`, has the fallback
/// serve every registered device (*issue 30*: none is exported), then takes
/// the well-known name, so the first client to see the name sees everything.
pub async fn serve(
    conn: &Connection,
    fallback: &Fallback,
    service: Arc<Service>,
    authz: Arc<Authz>,
    sim: Option<(Arc<crate::host::sim::SimHost>, crate::edge::udev::Sender)>,
) -> Result<(), ServeError> {
    let manager = Arc::new(Manager::new(service.clone(), authz));
    let server = conn.object_server();
    server
        .at(
            hypeman_api::MANAGER_PATH,
            Exported::new(manager::ManagerObject(manager.clone())),
        )
        .await
        .map_err(ServeError::Export)?;
    if let Some((sim, events)) = sim {
        server
            .at(
                hypeman_api::SIMULATOR_PATH,
                Exported::new(simulator::Simulator::new(sim, events)),
            )
            .await
            .map_err(ServeError::Export)?;
    }
    for v in service.snapshot().vgpus() {
        if let Some(path) = hypeman_api::vgpu_path(&v.id) {
            server
                .at(
                    path,
                    vgpu::VgpuObject::exported(manager.clone(), v.id.clone()),
                )
                .await
                .map_err(ServeError::Export)?;
        }
    }
    // Our own ObjectManager (see `objects.rs`): it announces nothing here.
    server
        .at(
            hypeman_api::MANAGER_PATH,
            Exported::new(objects::Objects::new(manager.clone())),
        )
        .await
        .map_err(ServeError::Export)?;
    tracing::debug!("object manager exported");
    // *(issue 30)* Every registered device's object, and those registered
    // from now on: none is exported, the fallback makes each for its calls.
    fallback.serve(manager.clone());
    service.set_publisher(Arc::new(BusPublisher {
        conn: conn.clone(),
        manager: Arc::downgrade(&manager),
    }));
    // No REPLACE_EXISTING / ALLOW_REPLACEMENT: a second daemon must fail, not
    // take the name over, and must not wait in the queue either.
    match conn
        .request_name_with_flags(hypeman_api::BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(|e| match e {
            zbus::Error::NameTaken => ServeError::NameTaken,
            e => ServeError::Name(e),
        })? {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(()),
        RequestNameReply::Exists | RequestNameReply::InQueue => Err(ServeError::NameTaken),
    }
}

impl BusPublisher {
    /// `HostDeviceAdded` or `HostDeviceRemoved` for `address`.
    async fn host_signal(&self, address: crate::pci::PciAddress, added: bool) {
        let name = if added {
            "HostDeviceAdded"
        } else {
            "HostDeviceRemoved"
        };
        let result = async {
            let emitter =
                zbus::object_server::SignalEmitter::new(&self.conn, hypeman_api::MANAGER_PATH)?;
            let address = address.to_string();
            if added {
                manager::ManagerObject::host_device_added(&emitter, &address).await
            } else {
                manager::ManagerObject::host_device_removed(&emitter, &address).await
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(pci_address = %address, error = %e, signal = name, "cannot emit a host device signal");
        }
    }
}

/// Turns the service's changes into signals (and vGPU objects); a device's
/// object exists while the registry holds it (`fallback`).
struct BusPublisher {
    conn: Connection,
    /// Weak: the service holds this publisher, and the manager the service.
    manager: std::sync::Weak<Manager>,
}

/// `PropertiesChanged` on `path`'s `iface`, one signal per property in
/// the order given, as zbus's own property signals go.
async fn properties_changed(
    conn: &zbus::Connection,
    path: OwnedObjectPath,
    iface: &'static str,
    changed: Vec<(&'static str, zbus::Variant<'static>)>,
) -> zbus::Result<()> {
    let emitter = zbus::object_server::SignalEmitter::new(conn, path)?;
    let iface = zbus::names::InterfaceName::from_static_str(iface)?;
    for (name, value) in changed {
        zbus::fdo::Properties::properties_changed(
            &emitter,
            iface.clone(),
            std::collections::HashMap::from([(name, value)]),
            std::borrow::Cow::Borrowed(&[]),
        )
        .await?;
    }
    Ok(())
}

impl Publisher for BusPublisher {
    fn added<'a>(&'a self, device: &'a DeviceView) -> BoxFuture<'a> {
        Box::pin(async move {
            // A change's buffers (the store write, the reply) are freed once
            // it is answered: hand them back soon after.
            crate::memory::trim_soon();
            let Some(manager) = self.manager.upgrade() else {
                return;
            };
            // The object exists from the registry's change on (`fallback`).
            let id = &device.stored.id;
            if let Err(e) = objects::announce_added(&manager, &self.conn, id).await {
                tracing::warn!(device_id = %id, error = %e, "cannot emit InterfacesAdded");
            }
        })
    }

    fn changed<'a>(&'a self, before: &'a DeviceView, after: &'a DeviceView) -> BoxFuture<'a> {
        Box::pin(async move {
            crate::memory::trim_soon();
            let id = &after.stored.id;
            let changed = device::changed_properties(&before.record(), &after.record());
            if changed.is_empty() {
                return;
            }
            let Ok(path) = device_path(id) else { return };
            let result =
                properties_changed(&self.conn, path, hypeman_api::DEVICE_IFACE, changed).await;
            if let Err(e) = result {
                tracing::warn!(device_id = %id, error = %e, "cannot emit PropertiesChanged");
            }
        })
    }

    fn host_added<'a>(&'a self, address: crate::pci::PciAddress) -> BoxFuture<'a> {
        Box::pin(self.host_signal(address, true))
    }

    fn host_removed<'a>(&'a self, address: crate::pci::PciAddress) -> BoxFuture<'a> {
        Box::pin(self.host_signal(address, false))
    }

    fn vgpu_created<'a>(&'a self, vgpu: &'a hypeman_api::Vgpu) -> BoxFuture<'a> {
        Box::pin(async move {
            if let (Some(manager), Some(path)) =
                (self.manager.upgrade(), hypeman_api::vgpu_path(&vgpu.id))
            {
                let object = vgpu::VgpuObject::exported(manager, vgpu.id.clone());
                if let Err(e) = self.conn.object_server().at(path, object).await {
                    tracing::error!(vgpu_id = %vgpu.id, error = %e, "cannot export the vGPU object");
                }
            }
            let result = async {
                let emitter =
                    zbus::object_server::SignalEmitter::new(&self.conn, hypeman_api::MANAGER_PATH)?;
                manager::ManagerObject::vgpu_created(&emitter, vgpu.clone()).await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(vgpu_id = %vgpu.id, error = %e, "cannot emit VgpuCreated");
            }
        })
    }

    fn vgpu_deleted<'a>(&'a self, id: &'a str) -> BoxFuture<'a> {
        Box::pin(async move {
            if let Some(path) = hypeman_api::vgpu_path(id) {
                if let Err(e) = self
                    .conn
                    .object_server()
                    .remove::<Exported<vgpu::VgpuObject>, _>(path)
                    .await
                {
                    tracing::error!(vgpu_id = %id, error = %e, "cannot remove the vGPU object");
                }
            }
            let result = async {
                let emitter =
                    zbus::object_server::SignalEmitter::new(&self.conn, hypeman_api::MANAGER_PATH)?;
                manager::ManagerObject::vgpu_deleted(&emitter, id).await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(vgpu_id = %id, error = %e, "cannot emit VgpuDeleted");
            }
        })
    }

    fn vgpu_changed<'a>(
        &'a self,
        before: &'a hypeman_api::Vgpu,
        after: &'a hypeman_api::Vgpu,
    ) -> BoxFuture<'a> {
        Box::pin(async move {
            let changed = vgpu::changed_properties(before, after);
            let Some(path) = hypeman_api::vgpu_path(&after.id) else {
                return;
            };
            if changed.is_empty() {
                return;
            }
            let result =
                properties_changed(&self.conn, path, hypeman_api::VGPU_IFACE, changed).await;
            if let Err(e) = result {
                tracing::warn!(vgpu_id = %after.id, error = %e, "cannot emit PropertiesChanged");
            }
        })
    }

    fn removed<'a>(&'a self, id: &'a str) -> BoxFuture<'a> {
        Box::pin(async move {
            crate::memory::trim_soon();
            if let Err(e) = objects::announce_removed(&self.conn, id).await {
                tracing::warn!(device_id = %id, error = %e, "cannot emit InterfacesRemoved");
            }
        })
    }
}
