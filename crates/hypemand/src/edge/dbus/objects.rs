//! `org.freedesktop.DBus.ObjectManager` at the manager's path, kept by hand.
//!
//! zbus's own ObjectManager announces every object under it when it is added
//! (and every object added after it): at start-up that is one
//! `InterfacesAdded` signal with every property per stored device, sent to a
//! bus where nobody can know our name yet. Measured at 4096 devices it was
//! half of the start-up time. This one announces only what happens while the
//! daemon serves: a device registered (`InterfacesAdded`) or deleted
//! (`InterfacesRemoved`), and answers `GetManagedObjects` from the registry.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::fdo;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath, OwnedObjectPath, Variant};

use super::device::DeviceObject;
use super::device_path;
use super::manager::Manager;
use hypeman_api::{DEVICE_IFACE, MANAGER_PATH};

/// Per object, per interface, the properties (`a{oa{sa{sv}}}`). *(issue
/// 30)* Names are the table's own strings: no copy per property.
pub type ManagedObjects =
    HashMap<OwnedObjectPath, HashMap<&'static str, HashMap<&'static str, Variant<'static>>>>;

/// The ObjectManager of the manager's path.
pub struct Objects {
    manager: Arc<Manager>,
}

impl Objects {
    /// The ObjectManager of the devices `manager` serves.
    pub fn new(manager: Arc<Manager>) -> Self {
        Objects { manager }
    }
}

impl super::exported::AllProperties for Objects {}

#[zbus::interface(name = "org.freedesktop.DBus.ObjectManager")]
impl Objects {
    /// Every registered device and its `org.hypeman.Device1` properties.
    async fn get_managed_objects(&self) -> fdo::Result<ManagedObjects> {
        let service = &self.manager.service;
        // *(issue 30)* Every device from one snapshot and the state the
        // events keep (no host read), and every device's blockers as last
        // read; those not read since the last change are read in one go
        // (one walk of /proc, not one per device); a device the batch could
        // not answer for reads its own, as before.
        let views = service
            .list()
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        let mut blockers = match service.all_last_blockers().await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the blockers in one go; reading them one by one");
                HashMap::new()
            }
        };
        let mut out = ManagedObjects::with_capacity(views.len());
        for view in views {
            let record = view.into_record();
            let path = device_path(&record.id).map_err(|e| fdo::Error::Failed(e.to_string()))?;
            let mine = match blockers.remove(&record.id) {
                Some(b) => b,
                // A device deleted meanwhile is simply left out.
                None => match service.last_blockers(&record.id).await {
                    Ok(b) => b,
                    Err(_) => continue,
                },
            };
            let props = super::device::table(&record, mine).into_iter().collect();
            out.insert(path, HashMap::from([(DEVICE_IFACE, props)]));
        }
        crate::memory::trim_soon();
        Ok(out)
    }

    #[zbus(signal)]
    pub async fn interfaces_added(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces_and_properties: HashMap<&str, HashMap<&str, Variant<'_>>>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn interfaces_removed(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces: &[&str],
    ) -> zbus::Result<()>;
}

/// Announces a newly registered device's object.
pub async fn announce_added(
    manager: &Arc<Manager>,
    conn: &Connection,
    id: &str,
) -> zbus::Result<()> {
    let path = device_path(id).map_err(|e| zbus::Error::Failure(e.to_string()))?;
    let props: HashMap<&str, Variant<'_>> = DeviceObject::new(manager.clone(), id.to_string())
        .table()
        .await?
        .into_iter()
        .collect();
    let emitter = SignalEmitter::new(conn, MANAGER_PATH)?;
    Objects::interfaces_added(
        &emitter,
        path.as_ref(),
        HashMap::from([(DEVICE_IFACE, props)]),
    )
    .await
}

/// Announces a device object that went away (its device deleted).
pub async fn announce_removed(conn: &Connection, id: &str) -> zbus::Result<()> {
    let path = device_path(id).map_err(|e| zbus::Error::Failure(e.to_string()))?;
    let emitter = SignalEmitter::new(conn, MANAGER_PATH)?;
    Objects::interfaces_removed(&emitter, path.as_ref(), &[DEVICE_IFACE]).await
}
