//! *(issue 26)* `org.hypeman.Vgpu1` on `/org/hypeman/Vgpus/<id>`: each vGPU
//! hypemand made, an object of its own. Exported once it is ready (at
//! `VgpuCreated`), removed at `VgpuDeleted`; its properties never change.

use std::sync::Arc;

use zbus::{fdo, interface};

use super::manager::Manager;

/// One vGPU on the bus.
pub struct VgpuObject {
    manager: Arc<Manager>,
    id: String,
}

impl VgpuObject {
    pub fn exported(manager: Arc<Manager>, id: String) -> super::exported::Exported<VgpuObject> {
        super::exported::Exported::new(VgpuObject { manager, id })
    }

    fn record(&self) -> fdo::Result<crate::store::StoredVgpu> {
        self.manager
            .service
            .vgpu_record(&self.id)
            .map_err(|e| fdo::Error::UnknownObject(e.to_string()))
    }
}

impl super::exported::AllProperties for VgpuObject {}

#[interface(name = "org.hypeman.Vgpu1")]
impl VgpuObject {
    /// The vGPU's id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.clone()
    }

    /// The profile it was made of.
    #[zbus(property(emits_changed_signal = "const"))]
    fn profile(&self) -> fdo::Result<String> {
        Ok(self.record()?.profile)
    }

    /// The driver's type id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn type_id(&self) -> fdo::Result<String> {
        Ok(self.record()?.type_id)
    }

    /// `vendor-vfio` or `mdev`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn framework(&self) -> fdo::Result<String> {
        Ok(self.record()?.framework)
    }

    /// The GPU it is on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn parent_pci_address(&self) -> fdo::Result<String> {
        Ok(self.record()?.parent_pci_address.to_string())
    }

    /// The function it is on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn pci_address(&self) -> fdo::Result<String> {
        Ok(self.record()?.pci_address.to_string())
    }

    /// mdev: its UUID; "" for vendor-VFIO.
    #[zbus(property(emits_changed_signal = "const"))]
    fn mdev_uuid(&self) -> fdo::Result<String> {
        Ok(self.record()?.mdev_uuid.unwrap_or_default())
    }

    /// The instance holding it; "" when none was given.
    #[zbus(property(emits_changed_signal = "const"))]
    fn instance_id(&self) -> fdo::Result<String> {
        Ok(self.record()?.instance_id.unwrap_or_default())
    }

    /// When it was made.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> fdo::Result<String> {
        Ok(self.record()?.created_at)
    }
}
