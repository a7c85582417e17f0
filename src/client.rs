//! A small typed client for `org.hypeman.Devices1`, used by `hypemanctl`.

use serde_json::{json, Value};
use zbus::{Connection, OwnedObjectPath};

use crate::bus::record::{Available, Record};
use crate::bus::BusChoice;

/// A failed call, as a person should read it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("hypemand is not running on this bus (start it with `systemctl start hypemand`, or install its D-Bus activation file)")]
    NotRunning,
    /// The daemon answered with an error: its D-Bus name and message.
    #[error("{message}")]
    Remote { name: String, message: String },
    #[error("{0}")]
    Other(#[source] zbus::Error),
}

impl From<zbus::Error> for ClientError {
    fn from(e: zbus::Error) -> Self {
        match e {
            zbus::Error::MethodError(name, desc, _) => {
                let name = name.to_string();
                if name == "org.freedesktop.DBus.Error.ServiceUnknown"
                    || name == "org.freedesktop.DBus.Error.NameHasNoOwner"
                {
                    return ClientError::NotRunning;
                }
                ClientError::Remote {
                    message: desc.unwrap_or_else(|| name.clone()),
                    name,
                }
            }
            e => ClientError::Other(e),
        }
    }
}

pub struct Client {
    conn: Connection,
}

impl Client {
    pub async fn connect(bus: &BusChoice) -> Result<Self, ClientError> {
        let conn = bus.builder().build().await.map_err(ClientError::Connect)?;
        Ok(Client { conn })
    }

    async fn call<B, R>(&self, method: &str, body: &B) -> Result<R, ClientError>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
        R: for<'d> serde::Deserialize<'d> + zbus::wire::Type,
    {
        let reply = self
            .conn
            .call_method(
                Some(crate::BUS_NAME),
                crate::MANAGER_PATH,
                Some("org.hypeman.Devices1"),
                method,
                body,
            )
            .await?;
        Ok(reply.body().deserialize::<R>()?)
    }

    pub async fn register(&self, pci_address: &str, name: &str) -> Result<Record, ClientError> {
        let (_, record): (OwnedObjectPath, Record) =
            self.call("Register", &(pci_address, name)).await?;
        Ok(record)
    }

    pub async fn list(&self) -> Result<Vec<Record>, ClientError> {
        self.call("List", &()).await
    }

    pub async fn get(&self, id_or_name: &str) -> Result<Record, ClientError> {
        self.call("Get", &(id_or_name,)).await
    }

    pub async fn delete(&self, id_or_name: &str) -> Result<(), ClientError> {
        self.call("Delete", &(id_or_name,)).await
    }

    pub async fn available(&self) -> Result<Vec<Available>, ClientError> {
        self.call("ListAvailable", &()).await
    }
}

/// The seed's JSON document for a record: its keys, in its order, with
/// `attached_to: null` when the device is not attached.
pub fn seed_json(r: &Record) -> Value {
    let mut doc = serde_json::Map::new();
    doc.insert("id".into(), json!(r.id));
    doc.insert("bound_to_vfio".into(), json!(r.bound_to_vfio));
    doc.insert("created_at".into(), json!(r.created_at));
    doc.insert("device_id".into(), json!(r.device_id));
    if let Some(g) = r.iommu_group {
        doc.insert("iommu_group".into(), json!(g));
    }
    doc.insert("pci_address".into(), json!(r.pci_address));
    doc.insert("type".into(), json!(r.kind));
    doc.insert("vendor_id".into(), json!(r.vendor_id));
    doc.insert("attached_to".into(), json!(r.attached_to));
    doc.insert("name".into(), json!(r.name));
    Value::Object(doc)
}

/// The original API's available-device document.
pub fn available_json(a: &Available) -> Value {
    let mut doc = serde_json::Map::new();
    doc.insert("pci_address".into(), json!(a.pci_address));
    doc.insert("vendor_id".into(), json!(a.vendor_id));
    doc.insert("device_id".into(), json!(a.device_id));
    doc.insert("vendor_name".into(), json!(a.vendor_name));
    doc.insert("device_name".into(), json!(a.device_name));
    if let Some(g) = a.iommu_group {
        doc.insert("iommu_group".into(), json!(g));
    }
    if let Some(d) = &a.current_driver {
        doc.insert("current_driver".into(), json!(d));
    }
    doc.insert("type".into(), json!(a.kind));
    if let Some(id) = &a.registered_as {
        doc.insert("registered_as".into(), json!(id));
    }
    Value::Object(doc)
}
