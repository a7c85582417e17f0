//! The one place the rules live.
//!
//! Every D-Bus method (and, later, every udev event) enters here. The service owns
//! the registry: reads take a snapshot and never wait for the disk; changes are
//! serialised by one gate, written to the store first and only then made visible
//! and published, so nothing a client saw can be lost by a crash.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};

use crate::error::{Error, Result};
use crate::host::{Host, HostDevice};
use crate::pci::{DeviceType, PciAddress, PciIds};
use crate::registry::store::Store;
use crate::registry::{
    new_device_id, now_rfc3339, shorten, validate_name, Conflict, Registry, StoredDevice,
};

/// A registered device as clients see it: what the store keeps, joined with what
/// the kernel says right now.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub stored: StoredDevice,
    /// `None` while the device is not on the host (unplugged).
    pub live: Option<HostDevice>,
    pub vendor_name: String,
    pub device_name: String,
}

impl DeviceView {
    pub fn driver(&self) -> Option<&str> {
        self.live.as_ref()?.driver.as_deref()
    }
    pub fn bound_to_vfio(&self) -> bool {
        self.driver() == Some(crate::VFIO_DRIVER)
    }
    pub fn present(&self) -> bool {
        self.live.is_some()
    }
    pub fn iommu_group(&self) -> Option<u32> {
        self.live.as_ref()?.iommu_group
    }
}

fn require_key(id_or_name: &str) -> Result<()> {
    if id_or_name.is_empty() {
        return Err(Error::InvalidArgument(
            "a device id or name is required; `hypemanctl list` shows them".into(),
        ));
    }
    Ok(())
}

/// A PCI function on the host, registered or not (`ListAvailable`).
#[derive(Debug, Clone)]
pub struct AvailableView {
    pub host: HostDevice,
    pub kind: DeviceType,
    pub vendor_name: String,
    pub device_name: String,
    pub registered_as: Option<String>,
}

/// Where the service announces changes that clients must see (the bus layer).
///
/// Called while the change gate is held, so announcements arrive in the order
/// the changes were made.
pub trait Publisher: Send + Sync {
    fn added<'a>(&'a self, device: &'a DeviceView) -> BoxFuture<'a>;
    fn removed<'a>(&'a self, id: &'a str) -> BoxFuture<'a>;
}

pub type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub struct Service {
    host: Arc<dyn Host>,
    ids: PciIds,
    store: Store,
    registry: RwLock<Arc<Registry>>,
    /// Serialises changes; held across the store write, never by readers.
    gate: tokio::sync::Mutex<()>,
    publisher: OnceLock<Arc<dyn Publisher>>,
}

impl Service {
    pub fn new(host: Arc<dyn Host>, ids: PciIds, store: Store, registry: Registry) -> Self {
        Service {
            host,
            ids,
            store,
            registry: RwLock::new(Arc::new(registry)),
            gate: tokio::sync::Mutex::new(()),
            publisher: OnceLock::new(),
        }
    }

    /// Connects the bus layer. Only the first call has an effect.
    pub fn set_publisher(&self, p: Arc<dyn Publisher>) {
        let _ = self.publisher.set(p);
    }

    pub fn host(&self) -> &dyn Host {
        &*self.host
    }

    /// The registry as it is now. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, next: Registry) {
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }

    /// Writes `next` to disk off the reactor, then makes it current.
    async fn commit(&self, next: Registry) -> Result<()> {
        let store = self.store.clone();
        let next = tokio::task::spawn_blocking(move || store.save(&next).map(|()| next))
            .await
            .map_err(|e| Error::StoreFailed(format!("the writer thread failed: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "registry write failed");
                Error::StoreFailed(e.to_string())
            })?;
        self.install(next);
        Ok(())
    }

    fn live(&self, address: PciAddress) -> Result<Option<HostDevice>> {
        self.host.device(address).map_err(|e| {
            tracing::warn!(pci_address = %address, error = %e, "cannot read device from the host");
            Error::Failed(format!("cannot read {address} from the host: {e}"))
        })
    }

    fn names(&self, vendor: u16, device: u16) -> (String, String) {
        (
            self.ids.vendor_name(vendor).unwrap_or_default(),
            self.ids.device_name(vendor, device).unwrap_or_default(),
        )
    }

    fn view(&self, stored: StoredDevice, live: Option<HostDevice>) -> DeviceView {
        let vendor = u16::from_str_radix(&stored.vendor_id, 16).unwrap_or(0);
        let device = u16::from_str_radix(&stored.device_id, 16).unwrap_or(0);
        let (vendor_name, device_name) = self.names(vendor, device);
        DeviceView {
            stored,
            live,
            vendor_name,
            device_name,
        }
    }

    fn view_live(&self, stored: &StoredDevice) -> Result<DeviceView> {
        let live = self.live(stored.pci_address)?;
        Ok(self.view(stored.clone(), live))
    }

    /// `Register`: sets a host device aside under a new id and a unique name.
    pub async fn register(&self, pci_address: &str, name: &str) -> Result<DeviceView> {
        let address = PciAddress::parse(pci_address)?;
        if !name.is_empty() {
            validate_name(name)?;
        }
        let host = self
            .live(address)?
            .ok_or_else(|| Error::DeviceNotFound(address.to_string()))?;
        let name = if name.is_empty() {
            address.default_name()
        } else {
            name.to_string()
        };
        let stored = StoredDevice {
            id: new_device_id(),
            name,
            pci_address: address,
            vendor_id: format!("{:04x}", host.vendor),
            device_id: format!("{:04x}", host.device),
            kind: DeviceType::from_class(host.vendor, host.class),
            created_at: now_rfc3339(),
            attached_to: None,
            original_driver: None,
            want_vfio: false,
        };

        let _gate = self.gate.lock().await;
        let mut next = (*self.snapshot()).clone();
        next.insert(stored.clone()).map_err(|c| match c {
            Conflict::Address { address, name, id } => Error::AlreadyRegistered {
                address: address.to_string(),
                name,
                id,
            },
            Conflict::Name(n) => Error::NameTaken(n),
            Conflict::Id(id) => Error::Failed(format!("generated id {id} collided; try again")),
        })?;
        self.commit(next).await?;
        let view = self.view(stored, Some(host));
        tracing::info!(
            pci_address = %address,
            device_id = %view.stored.id,
            device_name = %view.stored.name,
            "device registered"
        );
        if let Some(p) = self.publisher.get() {
            p.added(&view).await;
        }
        Ok(view)
    }

    /// `List`: every registered device with its live state.
    pub fn list(&self) -> Result<Vec<DeviceView>> {
        self.snapshot().iter().map(|d| self.view_live(d)).collect()
    }

    /// `Get`: one device by id or exact name.
    pub fn get(&self, id_or_name: &str) -> Result<DeviceView> {
        require_key(id_or_name)?;
        let snapshot = self.snapshot();
        let stored = snapshot
            .resolve(id_or_name)
            .ok_or_else(|| Error::NotFound(shorten(id_or_name)))?;
        self.view_live(stored)
    }

    /// `Delete`: unregisters. Refuses while the device is attached to an instance.
    pub async fn delete(&self, id_or_name: &str) -> Result<StoredDevice> {
        require_key(id_or_name)?;
        let _gate = self.gate.lock().await;
        let mut next = (*self.snapshot()).clone();
        let id = next
            .resolve(id_or_name)
            .map(|d| d.id.clone())
            .ok_or_else(|| Error::NotFound(shorten(id_or_name)))?;
        let removed = next
            .remove(&id)
            .ok_or_else(|| Error::NotFound(shorten(id_or_name)))?;
        if let Some(instance) = &removed.attached_to {
            return Err(Error::InUse {
                name: removed.name.clone(),
                instance: instance.clone(),
            });
        }
        self.commit(next).await?;
        tracing::info!(
            pci_address = %removed.pci_address,
            device_id = %removed.id,
            device_name = %removed.name,
            "device unregistered"
        );
        if let Some(p) = self.publisher.get() {
            p.removed(&removed.id).await;
        }
        Ok(removed)
    }

    /// `ListAvailable`: every PCI function on the host, registered or not.
    pub fn list_available(&self) -> Result<Vec<AvailableView>> {
        let devices = self
            .host
            .devices()
            .map_err(|e| Error::Failed(format!("cannot list the host's PCI devices: {e}")))?;
        let snapshot = self.snapshot();
        Ok(devices
            .into_iter()
            .map(|host| {
                let (vendor_name, device_name) = self.names(host.vendor, host.device);
                AvailableView {
                    kind: DeviceType::from_class(host.vendor, host.class),
                    registered_as: snapshot.by_address(host.address).map(|d| d.id.clone()),
                    vendor_name,
                    device_name,
                    host,
                }
            })
            .collect())
    }
}

impl Service {
    /// Waits for an in-flight change to finish and blocks new ones; used at
    /// shutdown so no acknowledged write is cut short.
    pub async fn quiesce(&self) {
        std::mem::forget(self.gate.lock().await);
    }
}
