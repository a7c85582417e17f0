//! The client side of `org.hypeman.Devices`: typed proxies, the seed's `Device`
//! document, and errors a program can match on. `hypemanctl` is built on it.
//!
//! The seed registers a device like this (Go):
//!
//! ```go
//! device, err := client.Devices.New(context.TODO(), hypeman.DeviceNewParams{
//!     PciAddress: "0000:a2:00.0",
//! })
//! fmt.Printf("%+v\n", device.ID)
//! ```
//!
//! Here, over D-Bus:
//!
//! ```no_run
//! # async fn demo() -> Result<(), hypeman_devices::client::ClientError> {
//! use hypeman_devices::bus::BusChoice;
//! use hypeman_devices::client::Client;
//!
//! let client = Client::connect(&BusChoice::System).await?;
//! let device = client.register("0000:a2:00.0", "").await?;
//! println!("{}", device.id);
//! // The seed's JSON document, `attached_to: null` included:
//! println!("{}", serde_json::to_string_pretty(&device).unwrap());
//! # Ok(()) }
//! ```

use serde::Serialize;
use zbus::proxy::MethodFlags;
use zbus::{Connection, OwnedObjectPath};

use crate::bus::record::{Available, Record};
use crate::bus::BusChoice;

/// Typed proxy of the manager, for programs that want zbus directly.
#[zbus::proxy(
    interface = "org.hypeman.Devices1",
    default_service = "org.hypeman.Devices",
    default_path = "/org/hypeman/Devices"
)]
pub trait Devices {
    fn register(&self, pci_address: &str, name: &str) -> zbus::Result<(OwnedObjectPath, Record)>;
    fn list(&self) -> zbus::Result<Vec<Record>>;
    fn get(&self, id_or_name: &str) -> zbus::Result<Record>;
    fn delete(&self, id_or_name: &str) -> zbus::Result<()>;
    fn list_available(&self) -> zbus::Result<Vec<Available>>;
    fn bind(&self, id_or_name: &str) -> zbus::Result<Record>;
    fn unbind(&self, id_or_name: &str) -> zbus::Result<Record>;
    fn attach(&self, id_or_name: &str, instance_id: &str) -> zbus::Result<Record>;
    fn detach(&self, id_or_name: &str) -> zbus::Result<Record>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(signal)]
    fn host_device_added(&self, pci_address: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn host_device_removed(&self, pci_address: &str) -> zbus::Result<()>;
}

/// Typed proxy of one device object (`/org/hypeman/Devices/<id>`).
#[zbus::proxy(
    interface = "org.hypeman.Device1",
    default_service = "org.hypeman.Devices"
)]
pub trait Device {
    fn bind(&self) -> zbus::Result<Record>;
    fn unbind(&self) -> zbus::Result<Record>;
    fn attach(&self, instance_id: &str) -> zbus::Result<Record>;
    fn detach(&self) -> zbus::Result<Record>;
    fn delete(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pci_address(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn driver(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn bound_to_vfio(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn attached_to(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn present(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn iommu_group(&self) -> zbus::Result<i64>;
}

/// A registered device. Serialises to exactly the seed's document: its keys in
/// its order, `attached_to: null` when not attached. The live extras (driver,
/// presence, names) are fields too, but not part of that document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    pub bound_to_vfio: bool,
    pub created_at: String,
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<i64>,
    pub pci_address: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub vendor_id: String,
    pub attached_to: Option<String>,
    pub name: String,
    #[serde(skip)]
    pub driver: Option<String>,
    #[serde(skip)]
    pub present: bool,
    #[serde(skip)]
    pub vendor_name: String,
    #[serde(skip)]
    pub device_name: String,
}

impl From<Record> for DeviceInfo {
    fn from(r: Record) -> Self {
        DeviceInfo {
            id: r.id,
            bound_to_vfio: r.bound_to_vfio,
            created_at: r.created_at,
            device_id: r.device_id,
            iommu_group: r.iommu_group,
            pci_address: r.pci_address,
            kind: r.kind,
            vendor_id: r.vendor_id,
            attached_to: r.attached_to,
            name: r.name,
            driver: r.driver,
            present: r.present,
            vendor_name: r.vendor_name,
            device_name: r.device_name,
        }
    }
}

/// A PCI function on the host, with the original API's available-device keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AvailableDevice {
    pub pci_address: String,
    pub vendor_id: String,
    pub device_id: String,
    pub vendor_name: String,
    pub device_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_driver: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered_as: Option<String>,
}

impl From<Available> for AvailableDevice {
    fn from(a: Available) -> Self {
        AvailableDevice {
            pci_address: a.pci_address,
            vendor_id: a.vendor_id,
            device_id: a.device_id,
            vendor_name: a.vendor_name,
            device_name: a.device_name,
            iommu_group: a.iommu_group,
            current_driver: a.current_driver,
            kind: a.kind,
            registered_as: a.registered_as,
        }
    }
}

/// What the daemon answered (or why it could not be asked), by D-Bus error name.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("hypemand is not running on this bus (start it with `systemctl start hypemand`, or install its D-Bus activation file so the bus starts it)")]
    NotRunning,
    #[error("{0}")]
    InvalidPciAddress(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    DeviceNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyRegistered(String),
    #[error("{0}")]
    NameTaken(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    NoIommu(String),
    #[error("{0}")]
    VfioUnavailable(String),
    #[error("{0}")]
    IommuGroupConflict(String),
    #[error("{0}")]
    BindFailed(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    StoreFailed(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    InteractiveAuthorizationRequired(String),
    /// Any other D-Bus error: its name and message.
    #[error("{message} ({name})")]
    Other { name: String, message: String },
    #[error("{0}")]
    Bus(#[source] zbus::Error),
}

impl From<zbus::Error> for ClientError {
    fn from(e: zbus::Error) -> Self {
        let (name, message) = match e {
            zbus::Error::MethodError(name, desc, _) => {
                let name = name.to_string();
                (name.clone(), desc.unwrap_or(name))
            }
            // Standard errors (ServiceUnknown, AccessDenied, ...) arrive typed.
            zbus::Error::FDO(fdo) => {
                let name = zbus::DBusError::name(&*fdo).to_string();
                let message = zbus::DBusError::description(&*fdo)
                    .unwrap_or(&name)
                    .to_string();
                (name, message)
            }
            e => return ClientError::Bus(e),
        };
        let short = name.rsplit('.').next().unwrap_or_default();
        match (name.as_str(), short) {
            (
                "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner",
                _,
            ) => ClientError::NotRunning,
            ("org.freedesktop.DBus.Error.AccessDenied", _) => ClientError::AccessDenied(message),
            ("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", _) => {
                ClientError::InteractiveAuthorizationRequired(message)
            }
            (n, s) if n.starts_with("org.hypeman.Devices.Error.") => match s {
                "InvalidPciAddress" => ClientError::InvalidPciAddress(message),
                "InvalidName" => ClientError::InvalidName(message),
                "InvalidArgument" => ClientError::InvalidArgument(message),
                "DeviceNotFound" => ClientError::DeviceNotFound(message),
                "NotFound" => ClientError::NotFound(message),
                "AlreadyRegistered" => ClientError::AlreadyRegistered(message),
                "NameTaken" => ClientError::NameTaken(message),
                "InUse" => ClientError::InUse(message),
                "NoIommu" => ClientError::NoIommu(message),
                "VfioUnavailable" => ClientError::VfioUnavailable(message),
                "IommuGroupConflict" => ClientError::IommuGroupConflict(message),
                "BindFailed" => ClientError::BindFailed(message),
                "Timeout" => ClientError::Timeout(message),
                "StoreFailed" => ClientError::StoreFailed(message),
                "Failed" => ClientError::Failed(message),
                _ => ClientError::Other { name, message },
            },
            _ => ClientError::Other { name, message },
        }
    }
}

/// A connection to the daemon's manager object.
pub struct Client {
    conn: Connection,
    proxy: zbus::Proxy<'static>,
    flags: MethodFlags,
}

impl Client {
    pub async fn connect(bus: &BusChoice) -> Result<Self, ClientError> {
        let conn = bus.builder().build().await.map_err(ClientError::Connect)?;
        let proxy = zbus::proxy::Builder::new(&conn)
            .destination(crate::BUS_NAME)
            .path(crate::MANAGER_PATH)
            .interface("org.hypeman.Devices1")
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(ClientError::Connect)?;
        Ok(Client {
            conn,
            proxy,
            flags: MethodFlags::empty(),
        })
    }

    /// Lets polkit ask the user for a password (through their agent) instead of
    /// failing with `InteractiveAuthorizationRequired`.
    pub fn allow_interactive(mut self, yes: bool) -> Self {
        self.flags.set(MethodFlags::ALLOW_INTERACTIVE_AUTH, yes);
        self
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    async fn call<B, R>(&self, method: &str, body: &B) -> Result<R, ClientError>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
        R: for<'d> zbus::wire::DynamicDeserialize<'d>,
    {
        self.proxy
            .call_with_flags(method, self.flags, body)
            .await?
            .ok_or_else(|| ClientError::Failed(format!("{method} returned no reply")))
    }

    pub async fn register(&self, pci_address: &str, name: &str) -> Result<DeviceInfo, ClientError> {
        let (_, r): (OwnedObjectPath, Record) = self.call("Register", &(pci_address, name)).await?;
        Ok(r.into())
    }

    pub async fn list(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        let v: Vec<Record> = self.call("List", &()).await?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    pub async fn get(&self, id_or_name: &str) -> Result<DeviceInfo, ClientError> {
        let r: Record = self.call("Get", &(id_or_name,)).await?;
        Ok(r.into())
    }

    pub async fn delete(&self, id_or_name: &str) -> Result<(), ClientError> {
        self.proxy
            .call_with_flags::<_, _, ()>("Delete", self.flags, &(id_or_name,))
            .await?;
        Ok(())
    }

    pub async fn available(&self) -> Result<Vec<AvailableDevice>, ClientError> {
        let v: Vec<Available> = self.call("ListAvailable", &()).await?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    pub async fn bind(&self, id_or_name: &str) -> Result<DeviceInfo, ClientError> {
        let r: Record = self.call("Bind", &(id_or_name,)).await?;
        Ok(r.into())
    }

    pub async fn unbind(&self, id_or_name: &str) -> Result<DeviceInfo, ClientError> {
        let r: Record = self.call("Unbind", &(id_or_name,)).await?;
        Ok(r.into())
    }

    pub async fn attach(
        &self,
        id_or_name: &str,
        instance_id: &str,
    ) -> Result<DeviceInfo, ClientError> {
        let r: Record = self.call("Attach", &(id_or_name, instance_id)).await?;
        Ok(r.into())
    }

    pub async fn detach(&self, id_or_name: &str) -> Result<DeviceInfo, ClientError> {
        let r: Record = self.call("Detach", &(id_or_name,)).await?;
        Ok(r.into())
    }

    pub async fn version(&self) -> Result<String, ClientError> {
        Ok(self.proxy.get_property::<String>("Version").await?)
    }
}
