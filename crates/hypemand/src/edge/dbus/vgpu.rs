//! *(issue 26)* `org.hypeman.Vgpu1` on `/org/hypeman/Vgpus/<id>`: each vGPU
//! hypemand made, an object of its own. Exported once it is ready (at
//! `VgpuCreated`), removed at `VgpuDeleted`. Only a lease's release changes
//! its properties *(issue 27)*: the lease's, then `InstanceId`, signalled in
//! that order.

use std::sync::Arc;

use zbus::Variant as Value;
use zbus::{fdo, interface};

use crate::service::LeaseShown;

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

    fn lease(&self) -> fdo::Result<LeaseShown> {
        Ok(LeaseShown::of(self.record()?.lease.as_ref()))
    }
}

impl super::exported::AllProperties for VgpuObject {}

/// *(issue 27)* The properties that differ between `before` and `after`, in
/// the order they are signalled: the lease's, then the instance.
pub fn changed_properties(
    before: &hypeman_api::Vgpu,
    after: &hypeman_api::Vgpu,
) -> Vec<(&'static str, Value<'static>)> {
    type Get = fn(&hypeman_api::Vgpu) -> Value<'static>;
    let rows: [(&'static str, Get); 5] = [
        ("HolderInvocation", |v| {
            v.holder_invocation.clone().unwrap_or_default().into()
        }),
        ("HolderPid", |v| v.holder_pid.unwrap_or(-1).into()),
        ("HolderUnit", |v| {
            v.holder_unit.clone().unwrap_or_default().into()
        }),
        ("OnRelease", |v| {
            v.on_release.clone().unwrap_or_default().into()
        }),
        ("InstanceId", |v| {
            v.instance_id.clone().unwrap_or_default().into()
        }),
    ];
    rows.iter()
        .filter_map(|(name, get)| {
            let (b, a) = (get(before), get(after));
            (a != b).then_some((*name, a))
        })
        .collect()
}

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

    /// The instance holding it; "" when none was given, or once a
    /// `detach` lease was released.
    #[zbus(property)]
    fn instance_id(&self) -> fdo::Result<String> {
        Ok(self.record()?.instance_id.unwrap_or_default())
    }

    /// *(issue 27)* The process whose end releases the vGPU, -1 without a
    /// process lease.
    #[zbus(property)]
    fn holder_pid(&self) -> fdo::Result<i64> {
        Ok(self.lease()?.pid.unwrap_or(-1))
    }

    /// *(issue 27)* The systemd unit holding the vGPU: a unit lease's, or a
    /// process holder's own; "" when none.
    #[zbus(property)]
    fn holder_unit(&self) -> fdo::Result<String> {
        Ok(self.lease()?.unit.unwrap_or_default())
    }

    /// *(issue 27)* A unit lease's InvocationID, "" for any other.
    #[zbus(property)]
    fn holder_invocation(&self) -> fdo::Result<String> {
        Ok(self.lease()?.invocation.unwrap_or_default())
    }

    /// *(issue 27)* What the holder's end does: `detach` (the instance is
    /// cleared) or `give-back` (the vGPU is deleted); "" without a lease.
    #[zbus(property)]
    fn on_release(&self) -> fdo::Result<String> {
        Ok(self.lease()?.on_release.unwrap_or_default())
    }

    /// When it was made.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> fdo::Result<String> {
        Ok(self.record()?.created_at)
    }
}
