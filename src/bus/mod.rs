//! D-Bus adapters: they turn calls into service calls and service changes into
//! objects and signals. No rule lives here.

pub mod bouncer;
pub mod device;
pub mod errors;
pub mod manager;
pub mod objects;
pub mod record;
pub mod simulator;

use std::sync::Arc;

use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::Connection;

use crate::service::{BoxFuture, DeviceView, Publisher, Service};
use device::{device_path, DeviceObject};
use manager::Manager;

/// Which bus to serve on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusChoice {
    /// The system bus; honours `DBUS_SYSTEM_BUS_ADDRESS`.
    System,
    Session,
    /// A bus address such as `unix:path=/run/test/bus`.
    Address(String),
}

impl std::str::FromStr for BusChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "system" => BusChoice::System,
            "session" => BusChoice::Session,
            other => BusChoice::Address(other.to_string()),
        })
    }
}

impl BusChoice {
    /// A connection builder for this bus.
    pub fn builder(&self) -> zbus::connection::Builder<'static> {
        match self {
            BusChoice::System => zbus::connection::Builder::system(),
            BusChoice::Session => zbus::connection::Builder::session(),
            BusChoice::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot connect to the bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("cannot export objects: {0}")]
    Export(#[source] zbus::Error),
    #[error(
        "the name {} is taken: another hypemand is already running on this bus",
        crate::BUS_NAME
    )]
    NameTaken,
    #[error("cannot own the name org.hypeman.Devices: {0}")]
    Name(#[source] zbus::Error),
}

/// Exports the manager, the ObjectManager and every registered device, then takes
/// the well-known name, so the first client to see the name sees everything.
pub async fn serve(
    service: Arc<Service>,
    bus: &BusChoice,
    sim: Option<Arc<crate::host::sim::SimHost>>,
) -> Result<Connection, ServeError> {
    let mut builder = bus
        .builder()
        .serve_at(crate::MANAGER_PATH, Manager::new(service.clone()));
    if let Some(sim) = sim {
        builder = builder.serve_at(simulator::SIMULATOR_PATH, simulator::Simulator::new(sim));
    }
    let conn = builder.build().await.map_err(ServeError::Connect)?;
    for d in service.snapshot().iter() {
        let path = device_path(&d.id)
            .map_err(|e| ServeError::Export(zbus::Error::Failure(e.to_string())))?;
        conn.object_server()
            .at(path, DeviceObject::new(service.clone(), d.id.clone()))
            .await
            .map_err(ServeError::Export)?;
    }
    tracing::debug!(
        devices = service.snapshot().len(),
        "device objects exported"
    );
    // Our own ObjectManager (see `objects.rs`): it announces nothing here.
    conn.object_server()
        .at(crate::MANAGER_PATH, objects::Objects::new(service.clone()))
        .await
        .map_err(ServeError::Export)?;
    tracing::debug!("object manager exported");
    service.set_publisher(Arc::new(BusPublisher {
        conn: conn.clone(),
        service: Arc::downgrade(&service),
    }));
    // No REPLACE_EXISTING / ALLOW_REPLACEMENT: a second daemon must fail, not
    // take the name over, and must not wait in the queue either.
    match conn
        .request_name_with_flags(crate::BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(|e| match e {
            zbus::Error::NameTaken => ServeError::NameTaken,
            e => ServeError::Name(e),
        })? {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(conn),
        RequestNameReply::Exists | RequestNameReply::InQueue => Err(ServeError::NameTaken),
    }
}

/// Turns the service's changes into exported or removed device objects.
struct BusPublisher {
    conn: Connection,
    service: std::sync::Weak<Service>,
}

impl Publisher for BusPublisher {
    fn added<'a>(&'a self, device: &'a DeviceView) -> BoxFuture<'a> {
        Box::pin(async move {
            let Some(service) = self.service.upgrade() else {
                return;
            };
            let id = device.stored.id.clone();
            let Ok(path) = device_path(&id) else { return };
            if let Err(e) = self
                .conn
                .object_server()
                .at(path, DeviceObject::new(service.clone(), id.clone()))
                .await
            {
                tracing::error!(device_id = %id, error = %e, "cannot export the device object");
                return;
            }
            if let Err(e) = objects::announce_added(&service, &self.conn, &id).await {
                tracing::warn!(device_id = %id, error = %e, "cannot emit InterfacesAdded");
            }
        })
    }

    fn changed<'a>(&'a self, before: &'a DeviceView, after: &'a DeviceView) -> BoxFuture<'a> {
        Box::pin(async move {
            let id = &after.stored.id;
            let Ok(path) = device_path(id) else { return };
            let iface = match self
                .conn
                .object_server()
                .interface::<_, DeviceObject>(path)
                .await
            {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!(device_id = %id, error = %e, "no device object to signal on");
                    return;
                }
            };
            let obj = iface.get().await;
            let em = iface.signal_emitter();
            let emit = |r: zbus::Result<()>| {
                if let Err(e) = r {
                    tracing::warn!(device_id = %id, error = %e, "cannot emit PropertiesChanged");
                }
            };
            if before.driver() != after.driver() {
                emit(obj.driver_changed(em).await);
            }
            if before.bound_to_vfio() != after.bound_to_vfio() {
                emit(obj.bound_to_vfio_changed(em).await);
            }
            if before.stored.attached_to != after.stored.attached_to {
                emit(obj.attached_to_changed(em).await);
            }
            if before.present() != after.present() {
                emit(obj.present_changed(em).await);
            }
            if before.iommu_group() != after.iommu_group() {
                emit(obj.iommu_group_changed(em).await);
            }
        })
    }

    fn host_added<'a>(&'a self, address: crate::pci::PciAddress) -> BoxFuture<'a> {
        Box::pin(async move {
            let emitter =
                match zbus::object_server::SignalEmitter::new(&self.conn, crate::MANAGER_PATH) {
                    Ok(e) => e,
                    Err(e) => return tracing::warn!(error = %e, "cannot emit HostDeviceAdded"),
                };
            if let Err(e) = Manager::host_device_added(&emitter, &address.to_string()).await {
                tracing::warn!(pci_address = %address, error = %e, "cannot emit HostDeviceAdded");
            }
        })
    }

    fn host_removed<'a>(&'a self, address: crate::pci::PciAddress) -> BoxFuture<'a> {
        Box::pin(async move {
            let emitter =
                match zbus::object_server::SignalEmitter::new(&self.conn, crate::MANAGER_PATH) {
                    Ok(e) => e,
                    Err(e) => return tracing::warn!(error = %e, "cannot emit HostDeviceRemoved"),
                };
            if let Err(e) = Manager::host_device_removed(&emitter, &address.to_string()).await {
                tracing::warn!(pci_address = %address, error = %e, "cannot emit HostDeviceRemoved");
            }
        })
    }

    fn removed<'a>(&'a self, id: &'a str) -> BoxFuture<'a> {
        Box::pin(async move {
            let Ok(path) = device_path(id) else { return };
            if let Err(e) = self
                .conn
                .object_server()
                .remove::<DeviceObject, _>(path)
                .await
            {
                tracing::error!(device_id = %id, error = %e, "cannot remove the device object");
                return;
            }
            if let Err(e) = objects::announce_removed(&self.conn, id).await {
                tracing::warn!(device_id = %id, error = %e, "cannot emit InterfacesRemoved");
            }
        })
    }
}
