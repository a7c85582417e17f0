//! `org.hypeman.Device1`: one object per registered device, at
//! `/org/hypeman/Devices/<id>`, made for each call that names it
//! ([`super::fallback`], *issue 30*).
//!
//! The object holds only the id. Every property is a field of the device's
//! [`Record`] (the same record `Get` answers), built from the registry and the
//! host state last seen, so a property and `Get` cannot disagree. The
//! properties are one table, `ROWS`, and there is no getter per property:
//! `Get`, `GetAll`, `GetManagedObjects`, `InterfacesAdded`, `Set`'s refusal
//! and the introspection all come from it (through
//! [`Exported`](super::exported::Exported)), each from one record, and
//! `PropertiesChanged` is computed from its signalled rows. Its methods are
//! the manager's ([`Manager::change`]) with the device's own id.

use std::collections::HashMap;
use std::sync::Arc;

use hypeman_api::{Error, Record};
use zbus::message::Header;
use zbus::OwnedVariant as OwnedValue;
use zbus::Variant as Value;
use zbus::{fdo, interface};

use super::exported::{
    AllProperties, Declared, Emits, Exported, Properties, PropertiesFuture, PropertyFuture,
};
use super::manager::Manager;
use crate::service::Op;

/// One registered device on the bus: the manager, and the device's id.
pub struct DeviceObject {
    manager: Arc<Manager>,
    id: String,
}

/// A property of `Device1`: how it is declared, and its value in a record
/// (`None`: `Blockers`, read from the host when asked). -1 and "" stand for
/// none on D-Bus.
struct Row {
    declared: Declared,
    value: Option<fn(&Record) -> Value<'static>>,
}

const fn row(
    name: &'static str,
    signature: &'static str,
    emits: Emits,
    doc: &'static str,
    value: fn(&Record) -> Value<'static>,
) -> Row {
    Row {
        declared: Declared {
            name,
            signature,
            emits,
            doc,
        },
        value: Some(value),
    }
}

/// Every property, in introspection order. A new property is a row here
/// (and a field of [`Record`]).
static ROWS: [Row; 28] = [
    row("AttachedTo", "s", Emits::True, "The instance holding the device, \"\" when none.", |r| {
        r.attached_to.clone().unwrap_or_default().into()
    }),
    Row {
        declared: Declared {
            name: "Blockers",
            signature: "aa{sv}",
            emits: Emits::False,
            doc: "Why the host must keep this device (`code`, `message`,\n`pci_address`). Reading it alone reads the host now; GetAll and\nGetManagedObjects show the last read, taken again after any change\nthe daemon sees (issue 30). Mounts, routes and open nodes change\nwithout an event, so no change signal is sent.",
        },
        value: None,
    },
    row("BoundToVfio", "b", Emits::True, "", |r| r.bound_to_vfio.into()),
    row("CreatedAt", "s", Emits::Const, "", |r| r.created_at.clone().into()),
    row("DeviceId", "s", Emits::Const, "", |r| r.device_id.clone().into()),
    row("DeviceName", "s", Emits::Const, "", |r| r.device_name.clone().into()),
    row("Driver", "s", Emits::True, "The bound driver, \"\" when none.", |r| {
        r.driver.clone().unwrap_or_default().into()
    }),
    row(
        "HardwareChanged",
        "s",
        Emits::False,
        "Another card sits at the address than the one registered (issue 28): what was registered and what is there; \"\" when it is the same.",
        |r| r.hardware_changed.clone().unwrap_or_default().into(),
    ),
    row(
        "Health",
        "s",
        Emits::True,
        "ok, degraded (new non-fatal or correctable PCIe errors since registration, past the daemon's threshold) or failed (a fatal error, or gone while on vfio or attached); issue 29. Reading it alone reads the error counters now; GetAll and GetManagedObjects show the last read.",
        |r| r.health.clone().unwrap_or_else(|| "ok".into()).into(),
    ),
    row(
        "HolderInvocation",
        "s",
        Emits::True,
        "A unit lease's InvocationID (issue 27), \"\" for any other.",
        |r| r.holder_invocation.clone().unwrap_or_default().into(),
    ),
    row(
        "HolderPid",
        "x",
        Emits::True,
        "The process whose end releases the attachment (issue 27), -1 without a lease.",
        |r| r.holder_pid.unwrap_or(-1).into(),
    ),
    row(
        "HolderUnit",
        "s",
        Emits::True,
        "The systemd unit holding the device (issue 27): a unit lease's, or a process holder's own; \"\" when none.",
        |r| r.holder_unit.clone().unwrap_or_default().into(),
    ),
    row("Id", "s", Emits::Const, "", |r| r.id.clone().into()),
    row("IommuGroup", "x", Emits::True, "The IOMMU group, -1 when the device has none (or is unplugged).", |r| {
        r.iommu_group.unwrap_or(-1).into()
    }),
    row("Name", "s", Emits::True, "", |r| r.name.clone().into()),
    row("NumaNode", "x", Emits::True, "The NUMA node, -1 when the platform has none (or it is unplugged).", |r| {
        r.numa_node.unwrap_or(-1).into()
    }),
    row(
        "OnRelease",
        "s",
        Emits::True,
        "What the holder's end does: detach or give-back, \"\" without a lease.",
        |r| r.on_release.clone().unwrap_or_default().into(),
    ),
    row(
        "Parent",
        "s",
        Emits::Const,
        "A virtual function's physical function, \"\" for any other function.",
        |r| r.parent.clone().unwrap_or_default().into(),
    ),
    row("PciAddress", "s", Emits::Const, "", |r| r.pci_address.clone().into()),
    row("Present", "b", Emits::True, "", |r| r.present.into()),
    row(
        "ResetMethod",
        "s",
        Emits::False,
        "How the kernel can reset the function between tenants (reset_method, issue 28): \"flr bus\"; \"\" when it cannot; \"unknown\" when the kernel does not say (before 5.15) or the device is unplugged.",
        |r| r.reset_method.clone().unwrap_or_else(|| "unknown".into()).into(),
    ),
    row(
        "SriovTotalVfs",
        "x",
        Emits::Const,
        "The most virtual functions (sriov_totalvfs), -1 without SR-IOV.",
        |r| r.sriov_total_vfs.unwrap_or(-1).into(),
    ),
    row(
        "SriovVfs",
        "x",
        Emits::True,
        "The virtual functions enabled now (sriov_numvfs), -1 without SR-IOV.",
        |r| r.sriov_vfs.unwrap_or(-1).into(),
    ),
    row("Tags", "a{ss}", Emits::True, "User-defined labels (`SetTags` changes them).", |r| {
        Value::from(r.tags.clone())
    }),
    row("Type", "s", Emits::Const, "", |r| r.kind.clone().into()),
    row("VendorId", "s", Emits::Const, "", |r| r.vendor_id.clone().into()),
    row("VendorName", "s", Emits::Const, "", |r| r.vendor_name.clone().into()),
    row(
        "VfioDriver",
        "s",
        Emits::True,
        "The vfio driver the function is on, or that Bind would use (issue 28): vfio-pci or a variant (nvgrace_gpu_vfio_pci); \"\" while unplugged.",
        |r| r.vfio_driver.clone().unwrap_or_default().into(),
    ),
];

/// The order `PropertiesChanged` signals go in, one per changed property
/// (clients see the lease before the `AttachedTo` it holds, a device
/// detached before its driver moves, as a lease's `give-back` does, and the
/// driver move before `BoundToVfio`). `Name` is
/// announced as it always was, though no operation renames a device.
const SIGNAL_ORDER: [&str; 15] = [
    "Tags",
    "HolderPid",
    "HolderUnit",
    "HolderInvocation",
    "OnRelease",
    "AttachedTo",
    "Driver",
    "VfioDriver",
    "BoundToVfio",
    "Present",
    "Health",
    "IommuGroup",
    "NumaNode",
    "SriovVfs",
    "Name",
];

static DECLARED: std::sync::LazyLock<Vec<Declared>> =
    std::sync::LazyLock::new(|| ROWS.iter().map(|r| r.declared).collect());

fn value_of(name: &str, r: &Record) -> Option<Value<'static>> {
    ROWS.iter()
        .find(|row| row.declared.name == name)
        .and_then(|row| row.value)
        .map(|value| value(r))
}

/// The signalled properties that differ between two records, in signal order.
pub fn changed_properties(before: &Record, after: &Record) -> Vec<(&'static str, Value<'static>)> {
    SIGNAL_ORDER
        .iter()
        .filter_map(|name| {
            let (b, a) = (value_of(name, before)?, value_of(name, after)?);
            (a != b).then_some((*name, a))
        })
        .collect()
}

/// *(issue 30)* Every property of a device, in introspection order, from
/// its record and its blockers: what `GetAll`, `GetManagedObjects` and
/// `InterfacesAdded` carry. No read, no await: `GetManagedObjects` builds
/// thousands.
pub fn table(
    record: &Record,
    blockers: Vec<hypeman_api::Blocker>,
) -> Vec<(&'static str, Value<'static>)> {
    let mut blockers = Some(blockers);
    ROWS.iter()
        .map(|row| {
            let value = match row.value {
                Some(value) => value(record),
                None => Value::from(blockers.take().unwrap_or_default()),
            };
            (row.declared.name, value)
        })
        .collect()
}

fn owned(v: Value<'_>) -> fdo::Result<OwnedValue> {
    OwnedValue::try_from(v).map_err(|e| fdo::Error::Failed(e.to_string()))
}

impl DeviceObject {
    /// The object of device `id`.
    pub fn new(manager: Arc<Manager>, id: String) -> DeviceObject {
        DeviceObject { manager, id }
    }

    /// The object of device `id`, served through the daemon's base.
    pub fn exported(manager: Arc<Manager>, id: String) -> Exported<DeviceObject> {
        Exported::new(DeviceObject::new(manager, id))
    }

    /// The device's record from the registry and the host state as last seen
    /// (no host read on the common path).
    async fn record(&self) -> fdo::Result<Record> {
        let service = &self.manager.service;
        let stored = service
            .snapshot()
            .by_id(&self.id)
            .map(|d| (**d).clone())
            .ok_or_else(|| {
                fdo::Error::UnknownObject(format!("device {} is no longer registered", self.id))
            })?;
        let live = service
            .cached_live(&stored)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        Ok(service.view(stored, live).into_record())
    }

    /// Why the host must keep this device: read from the host now (`now`:
    /// the property read alone), or as last read (*issue 30*: `GetAll`).
    async fn blockers(&self, now: bool) -> fdo::Result<OwnedValue> {
        let service = &self.manager.service;
        let blockers = if now {
            service.device_blockers(&self.id).await
        } else {
            service.last_blockers(&self.id).await
        }
        .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        owned(Value::from(blockers))
    }

    /// Every property, in introspection order, from one record and the
    /// blockers as last read (`InterfacesAdded` sends this as it is).
    pub async fn table(&self) -> fdo::Result<Vec<(&'static str, Value<'static>)>> {
        let record = self.record().await?;
        let blockers = self
            .manager
            .service
            .last_blockers(&self.id)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        Ok(table(&record, blockers))
    }

    /// Every property, by name (`GetAll`).
    pub async fn all(&self) -> fdo::Result<Properties> {
        self.table()
            .await?
            .into_iter()
            .map(|(name, v)| Ok((name.to_string(), owned(v)?)))
            .collect()
    }

    /// *(issue 29)* Reads the device's error counters now (its health
    /// asked for).
    async fn read_health(&self) {
        let service = &self.manager.service;
        if let Some(d) = service.snapshot().by_id(&self.id) {
            service.read_health(vec![d.pci_address]).await;
        }
    }

    /// One property, from one record (or the blockers' read).
    async fn one(&self, name: &str) -> fdo::Result<OwnedValue> {
        if name == "Health" {
            self.read_health().await;
        }
        match ROWS.iter().find(|row| row.declared.name == name) {
            Some(Row {
                value: Some(value), ..
            }) => owned(value(&self.record().await?)),
            Some(Row { value: None, .. }) => self.blockers(true).await,
            None => Err(fdo::Error::UnknownProperty(format!("no property {name}"))),
        }
    }
}

impl AllProperties for DeviceObject {
    fn declared(&self) -> &'static [Declared] {
        &DECLARED
    }
    fn all_properties(&self) -> Option<PropertiesFuture<'_>> {
        Some(Box::pin(self.all()))
    }
    fn property<'a>(&'a self, name: &'a str) -> Option<PropertyFuture<'a>> {
        ROWS.iter()
            .any(|row| row.declared.name == name)
            .then(|| Box::pin(self.one(name)) as PropertyFuture<'a>)
    }
}

#[interface(name = "org.hypeman.Device1")]
impl DeviceObject {
    /// Unregisters this device; refuses while it is attached.
    async fn delete(&self, #[zbus(header)] header: Header<'_>) -> Result<(), Error> {
        self.manager
            .change(&header, &self.id, Op::Delete)
            .await
            .map(drop)
    }

    /// Moves this device to vfio-pci (idempotent).
    async fn bind(&self, #[zbus(header)] header: Header<'_>) -> Result<Record, Error> {
        let op = Manager::bind(None)?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Gives this device back to its host driver (idempotent).
    async fn unbind(&self, #[zbus(header)] header: Header<'_>) -> Result<Record, Error> {
        self.manager.change(&header, &self.id, Op::Unbind).await
    }

    /// Binds if needed, then marks this device attached to `instance_id`.
    async fn attach(
        &self,
        #[zbus(header)] header: Header<'_>,
        instance_id: &str,
    ) -> Result<Record, Error> {
        let op = self.manager.attach(instance_id, None).await?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Bind, with options: `force` (b) overrides the soft blockers and needs
    /// `org.hypeman.devices.force` as well.
    async fn bind_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let op = Manager::bind(Some(&options))?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Attach, with options (as BindWithOptions).
    async fn attach_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        instance_id: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let op = self.manager.attach(instance_id, Some(&options)).await?;
        self.manager.change(&header, &self.id, op).await
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(&self, #[zbus(header)] header: Header<'_>) -> Result<Record, Error> {
        self.manager.change(&header, &self.id, Op::Detach).await
    }

    /// *(issue 26)* Gives this physical function `count` SR-IOV virtual
    /// functions (as the manager's SetVirtualFunctions).
    async fn set_virtual_functions(
        &self,
        #[zbus(header)] header: Header<'_>,
        count: u32,
    ) -> Result<Record, Error> {
        let op = Op::SetVirtualFunctions { count };
        self.manager.change(&header, &self.id, op).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row's declared type is its value's, and the signalled rows are
    /// exactly those whose changes are announced.
    #[test]
    fn the_table_declares_what_it_answers() {
        let r = Record::default();
        for row in &ROWS {
            let d = row.declared;
            let signature = match row.value {
                Some(value) => value(&r).value_signature().to_string(),
                None => Value::from(Vec::<hypeman_api::Blocker>::new())
                    .value_signature()
                    .to_string(),
            };
            assert_eq!(signature, d.signature, "{}", d.name);
        }
        let mut announced: Vec<&str> = ROWS
            .iter()
            .filter(|r| r.declared.emits == Emits::True)
            .map(|r| r.declared.name)
            .collect();
        let mut order = SIGNAL_ORDER.to_vec();
        announced.sort();
        order.sort();
        assert_eq!(announced, order);
        let mut names: Vec<&str> = ROWS.iter().map(|r| r.declared.name).collect();
        names.dedup();
        assert_eq!(names.len(), ROWS.len(), "one row per property");
    }
}
