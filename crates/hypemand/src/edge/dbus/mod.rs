//! The D-Bus edge: calls in, forwarded to the service; the service's changes
//! out, as objects and signals. No rule lives here.
//!
//! - [`manager`]: `org.hypeman.Devices1`, the registry's front door;
//! - [`device`]: `org.hypeman.Device1`, one object per registered device;
//! - [`objects`]: the ObjectManager, announcing registrations and deletions;
//! - [`authz`]: the method-to-action table and the one helper every change passes;
//! - [`polkit`]: the bouncer that asks polkitd;
//! - [`simulator`]: `org.hypeman.Simulator1`, only under `--simulate`;
//! - [`read_only`]: `PropertyReadOnly` for properties that cannot be set.

pub mod device;
pub mod manager;
pub mod objects;
pub mod read_only;
pub mod simulator;

use std::sync::Arc;

use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::Connection;

use hypeman_api::Error;
use zbus::OwnedObjectPath;

use super::authz::{self, Authz};
use crate::service::{BoxFuture, DeviceView, Publisher, Service};
use device::DeviceObject;
use manager::Manager;
use read_only::ReadOnly;

pub use hypeman_api::BusChoice;

/// A request body at least this large makes the daemon allocate a lot (a
/// million-pair `ListByTags` filter decodes to hundreds of MiB of strings):
/// the heap is trimmed once the call is answered.
pub const LARGE_REQUEST: u32 = 64 * 1024;

/// A call's arguments, checked. Dropped when the handler returns; if the
/// request was large, its memory is then handed back (see [`LARGE_REQUEST`]).
#[must_use = "keep the guard until the handler returns, so a large request's memory is trimmed afterwards"]
pub struct Args {
    large: bool,
}

impl Drop for Args {
    fn drop(&mut self) {
        if self.large {
            crate::memory::trim_soon();
        }
    }
}

/// Refuses a call whose arguments are not exactly `expected`: zbus reads the
/// arguments a method takes and would silently ignore any more.
pub fn expect_args(header: &zbus::message::Header<'_>, expected: &str) -> Result<Args, Error> {
    let args = Args {
        large: header.primary().body_len() >= LARGE_REQUEST,
    };
    let got = header.signature().to_string_no_parens();
    if got == expected {
        return Ok(args);
    }
    Err(Error::Other {
        name: "org.freedesktop.DBus.Error.InvalidArgs".into(),
        message: format!("this method takes arguments of type \"{expected}\", not \"{got}\""),
    })
}

/// Bind's method for the authorization table, from its options: a forced
/// Bind needs the force action too.
pub fn bind_method(
    options: &std::collections::HashMap<String, zbus::OwnedVariant>,
) -> Result<authz::Method, Error> {
    Ok(if hypeman_api::Options::from_dict(options)?.force {
        authz::Method::ForceBind
    } else {
        authz::Method::Bind
    })
}

/// Attach's method for the authorization table, from its options.
pub fn attach_method(
    options: &std::collections::HashMap<String, zbus::OwnedVariant>,
) -> Result<authz::Method, Error> {
    Ok(if hypeman_api::Options::from_dict(options)?.force {
        authz::Method::ForceAttach
    } else {
        authz::Method::Attach
    })
}

/// The object path of a device id.
pub fn device_path(id: &str) -> Result<OwnedObjectPath, Error> {
    hypeman_api::device_path(id)
        .ok_or_else(|| Error::Failed(format!("device id {id} makes no valid object path")))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot connect to the bus: {0}")]
    Connect(#[source] zbus::Error),
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

/// Exports the manager, the ObjectManager and every registered device, then takes
/// the well-known name, so the first client to see the name sees everything.
pub async fn serve(
    service: Arc<Service>,
    bus: &BusChoice,
    sim: Option<Arc<crate::host::sim::SimHost>>,
) -> Result<(Connection, Arc<Authz>), ServeError> {
    let authz = Arc::new(Authz::new(service.clone()));
    let mut builder = bus.builder().serve_at(
        hypeman_api::MANAGER_PATH,
        ReadOnly(Manager::new(service.clone(), authz.clone())),
    );
    if let Some(sim) = sim {
        builder = builder.serve_at(hypeman_api::SIMULATOR_PATH, simulator::Simulator::new(sim));
    }
    let conn = builder.build().await.map_err(ServeError::Connect)?;
    for d in service.snapshot().iter() {
        let path = device_path(&d.id)
            .map_err(|e| ServeError::Export(zbus::Error::Failure(e.to_string())))?;
        conn.object_server()
            .at(
                path,
                ReadOnly(DeviceObject::new(
                    service.clone(),
                    authz.clone(),
                    d.id.clone(),
                )),
            )
            .await
            .map_err(ServeError::Export)?;
    }
    tracing::debug!(
        devices = service.snapshot().len(),
        "device objects exported"
    );
    // Our own ObjectManager (see `objects.rs`): it announces nothing here.
    conn.object_server()
        .at(
            hypeman_api::MANAGER_PATH,
            objects::Objects::new(service.clone(), authz.clone()),
        )
        .await
        .map_err(ServeError::Export)?;
    tracing::debug!("object manager exported");
    service.set_publisher(Arc::new(BusPublisher {
        conn: conn.clone(),
        service: Arc::downgrade(&service),
        authz: authz.clone(),
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
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok((conn, authz)),
        RequestNameReply::Exists | RequestNameReply::InQueue => Err(ServeError::NameTaken),
    }
}

/// Turns the service's changes into exported or removed device objects.
struct BusPublisher {
    conn: Connection,
    service: std::sync::Weak<Service>,
    authz: Arc<Authz>,
}

impl Publisher for BusPublisher {
    fn added<'a>(&'a self, device: &'a DeviceView) -> BoxFuture<'a> {
        Box::pin(async move {
            // A change's buffers (the store write, the reply) are freed once
            // it is answered: hand them back soon after.
            crate::memory::trim_soon();
            let Some(service) = self.service.upgrade() else {
                return;
            };
            let id = device.stored.id.clone();
            let Ok(path) = device_path(&id) else { return };
            if let Err(e) = self
                .conn
                .object_server()
                .at(
                    path,
                    ReadOnly(DeviceObject::new(
                        service.clone(),
                        self.authz.clone(),
                        id.clone(),
                    )),
                )
                .await
            {
                tracing::error!(device_id = %id, error = %e, "cannot export the device object");
                return;
            }
            if let Err(e) = objects::announce_added(&service, &self.authz, &self.conn, &id).await {
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
            // One signal per property, as zbus's own property signals go.
            let result = async {
                let emitter = zbus::object_server::SignalEmitter::new(&self.conn, path)?;
                let iface = zbus::names::InterfaceName::from_static_str(hypeman_api::DEVICE_IFACE)?;
                for (name, value) in changed {
                    zbus::fdo::Properties::properties_changed(
                        &emitter,
                        iface.clone(),
                        std::collections::HashMap::from([(name, value)]),
                        std::borrow::Cow::Borrowed(&[]),
                    )
                    .await?;
                }
                Ok::<(), zbus::Error>(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(device_id = %id, error = %e, "cannot emit PropertiesChanged");
            }
        })
    }

    fn host_added<'a>(&'a self, address: crate::pci::PciAddress) -> BoxFuture<'a> {
        Box::pin(async move {
            let emitter = match zbus::object_server::SignalEmitter::new(
                &self.conn,
                hypeman_api::MANAGER_PATH,
            ) {
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
            let emitter = match zbus::object_server::SignalEmitter::new(
                &self.conn,
                hypeman_api::MANAGER_PATH,
            ) {
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
            crate::memory::trim_soon();
            let Ok(path) = device_path(id) else { return };
            if let Err(e) = self
                .conn
                .object_server()
                .remove::<ReadOnly<DeviceObject>, _>(path)
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
