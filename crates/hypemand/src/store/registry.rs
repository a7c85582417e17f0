//! The registry: which devices are set aside, under which id and name, and what
//! the daemon must remember about each that the kernel cannot tell it again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pci::{DeviceType, PciAddress};
pub use hypeman_api::options::OnRelease;
use hypeman_api::validate::{shorten, validate_instance_id, validate_name, validate_tags};

/// One registered device as the store keeps it.
///
/// The live state (driver, `bound_to_vfio`, presence) is deliberately absent: the
/// kernel is the truth for it and it is read back on every query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDevice {
    pub id: String,
    pub name: String,
    pub pci_address: PciAddress,
    /// 4 lowercase hex digits, kept so an unplugged device still reports them.
    pub vendor_id: String,
    pub device_id: String,
    #[serde(rename = "type")]
    pub kind: DeviceType,
    /// RFC 3339, UTC, whole seconds.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    /// The driver the device had before the daemon moved it to vfio-pci.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_driver: Option<String>,
    /// Whether the device should be on vfio-pci (re-claimed after a replug).
    #[serde(default)]
    pub want_vfio: bool,
    /// User-defined labels (issue 15), Hypeman's tag rules ([`validate_tags`]).
    /// Absent in files of earlier versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// *(issue 27)* What releases the attachment when its holder ends;
    /// only with `attached_to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// *(issue 28)* What sat at the address when it was registered, besides
    /// `vendor_id` and `device_id`; absent in records of before, until the
    /// first start that sees the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// *(issue 29)* The PCIe error totals when it was registered: the
    /// health verdict counts errors since then. Absent in records of before
    /// (counted from zero) and for a function whose kernel shows none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aer_baseline: Option<crate::host::aer::AerCounts>,
}

/// *(issue 28)* The hardware a record was registered for: compared with
/// what sits at its address at start-up and at every re-claim, so a card
/// swapped into the slot is never bound or passed to a VM in its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// 4 lowercase hex digits (`0000` when the function has none).
    pub subsystem_vendor: String,
    pub subsystem_device: String,
    /// The 24-bit class code, 6 lowercase hex digits.
    pub class: String,
    /// The IOMMU group number then (it may change with firmware or the
    /// kernel: a change alone is shown, never refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
}

impl Identity {
    fn validate(&self) -> Result<(), String> {
        for (what, v, n) in [
            ("subsystem_vendor", &self.subsystem_vendor, 4),
            ("subsystem_device", &self.subsystem_device, 4),
            ("class", &self.class, 6),
        ] {
            if v.len() != n
                || !v
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            {
                return Err(format!(
                    "identity {what} {:?} is not {n} lowercase hex digits",
                    shorten(v)
                ));
            }
        }
        Ok(())
    }
}

/// *(issue 27)* A lease: the holder whose end releases an attachment, and
/// what the release does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub holder: Holder,
    #[serde(default)]
    pub on_release: OnRelease,
}

/// *(issue 27)* Who holds a leased device, as it can be recognised again
/// after a restart: a pid alone could be another process by then, and a
/// unit's name another run of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Holder {
    /// A process: the boot it ran in (`/proc/sys/kernel/random/boot_id`),
    /// its pid, and its start time (`/proc/PID/stat` field 22, clock ticks
    /// since boot). The same three mean the same process. `unit` is the
    /// systemd unit it ran in when leased (shown, never relied on).
    Process {
        boot_id: String,
        pid: u32,
        start_time: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit: Option<String>,
    },
    /// A systemd unit: its name and the `InvocationID` of the run that
    /// holds the device (32 lowercase hex digits). A restarted unit has
    /// another invocation: it is another holder.
    Unit { name: String, invocation_id: String },
}

impl Lease {
    /// The holder's pid, when it is a process.
    pub fn pid(&self) -> Option<u32> {
        match &self.holder {
            Holder::Process { pid, .. } => Some(*pid),
            Holder::Unit { .. } => None,
        }
    }

    /// The holder's unit: a unit lease's, or the one a process ran in.
    pub fn unit(&self) -> Option<&str> {
        match &self.holder {
            Holder::Process { unit, .. } => unit.as_deref(),
            Holder::Unit { name, .. } => Some(name),
        }
    }

    /// A unit lease's invocation.
    pub fn invocation(&self) -> Option<&str> {
        match &self.holder {
            Holder::Process { .. } => None,
            Holder::Unit { invocation_id, .. } => Some(invocation_id),
        }
    }

    /// The holder, for logs: `pid 4242` or `unit vm-1.service`.
    pub fn describe(&self) -> String {
        match &self.holder {
            Holder::Process { pid, .. } => format!("pid {pid}"),
            Holder::Unit { name, .. } => format!("unit {name}"),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match &self.holder {
            Holder::Process {
                boot_id, pid, unit, ..
            } => {
                let uuid = boot_id.len() == 36
                    && boot_id.bytes().enumerate().all(|(i, c)| {
                        if matches!(i, 8 | 13 | 18 | 23) {
                            c == b'-'
                        } else {
                            c.is_ascii_hexdigit() && !c.is_ascii_uppercase()
                        }
                    });
                if !uuid {
                    return Err(format!(
                        "lease boot_id {:?} is not a boot id (a lowercase UUID)",
                        shorten(boot_id)
                    ));
                }
                if *pid == 0 || i32::try_from(*pid).is_err() {
                    return Err(format!("lease pid {pid} is not a process id"));
                }
                if let Some(u) = unit {
                    hypeman_api::options::validate_unit_name(u).map_err(|e| e.to_string())?;
                }
            }
            Holder::Unit {
                name,
                invocation_id,
            } => {
                hypeman_api::options::validate_unit_name(name).map_err(|e| e.to_string())?;
                if !is_invocation_id(invocation_id) {
                    return Err(format!(
                        "lease invocation_id {:?} is not an invocation id (32 lowercase hex digits)",
                        shorten(invocation_id)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `s` is an invocation id as systemd shows it: 32 lowercase hex
/// digits (a 128-bit id).
pub fn is_invocation_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

impl StoredDevice {
    /// The API's rules for a record, applied to what the store loads: the
    /// same ids, names and instance ids the bus would accept. (Addresses are
    /// checked by their parser when the record is read.)
    pub fn validate(&self) -> Result<(), String> {
        if !is_device_id(&self.id) {
            return Err(format!(
                "id {:?} is not a device id (24 lowercase letters and digits, starting with a letter)",
                shorten(&self.id)
            ));
        }
        validate_name(&self.name).map_err(|e| e.to_string())?;
        if let Some(i) = &self.attached_to {
            validate_instance_id(i).map_err(|e| e.to_string())?;
        }
        for (what, v) in [
            ("vendor_id", &self.vendor_id),
            ("device_id", &self.device_id),
        ] {
            if v.len() != 4
                || !v
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            {
                return Err(format!(
                    "{what} {:?} is not 4 lowercase hex digits",
                    shorten(v)
                ));
            }
        }
        validate_tags(&self.tags).map_err(|e| e.to_string())?;
        if let Some(identity) = &self.identity {
            identity.validate()?;
        }
        if let Some(lease) = &self.lease {
            if self.attached_to.is_none() {
                return Err("a lease without an attachment".into());
            }
            lease.validate()?;
        }
        if let Some(d) = &self.original_driver {
            let ok = !d.is_empty()
                && d.len() <= 64
                && d.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'));
            if !ok {
                return Err(format!(
                    "original_driver {:?} is not a driver name",
                    shorten(d)
                ));
            }
        }
        Ok(())
    }
}

/// *(issue 26)* A vGPU as the store keeps it: claimed (`ready` false)
/// before the first write to the host, ready once the host shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVgpu {
    pub id: String,
    /// The profile name it was made of: `NVIDIA L40S-4Q`.
    pub profile: String,
    /// The driver's type id: `1152`, `nvidia-470`.
    pub type_id: String,
    /// `vendor-vfio` or `mdev`.
    pub framework: String,
    /// The GPU it is on.
    pub parent_pci_address: PciAddress,
    /// The function it is on (a virtual function, or the GPU itself).
    pub pci_address: PciAddress,
    /// mdev: its UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// RFC 3339, UTC, whole seconds.
    pub created_at: String,
    /// False between the claim and the host showing it.
    pub ready: bool,
    /// *(issue 27)* What releases the vGPU when its holder ends: `detach`
    /// clears `instance_id`, `give-back` deletes the vGPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

impl StoredVgpu {
    /// The rules for a vGPU record, applied to what the store loads.
    pub fn validate(&self) -> Result<(), String> {
        use crate::host::vgpu::{valid_type_id, valid_uuid};
        if !is_device_id(&self.id) {
            return Err(format!("vGPU id {:?} is not an id", shorten(&self.id)));
        }
        let shown_ok =
            |s: &str| !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control);
        if !shown_ok(&self.profile) {
            return Err(format!(
                "vGPU profile {:?} is not a profile name",
                shorten(&self.profile)
            ));
        }
        let (numeric, mdev) = match self.framework.as_str() {
            hypeman_api::gpu::VENDOR_VFIO => (true, false),
            hypeman_api::gpu::MDEV => (false, true),
            other => {
                return Err(format!(
                    "vGPU framework {:?} is not vendor-vfio or mdev",
                    shorten(other)
                ))
            }
        };
        let type_ok = if numeric {
            self.type_id.parse::<u32>().is_ok_and(|n| n != 0)
        } else {
            valid_type_id(&self.type_id)
        };
        if !type_ok {
            return Err(format!(
                "vGPU type {:?} is not a type id",
                shorten(&self.type_id)
            ));
        }
        match (&self.mdev_uuid, mdev) {
            (Some(u), true) if valid_uuid(u) => {}
            (None, false) => {}
            _ => return Err("an mdev vGPU has a UUID, and only it".into()),
        }
        if let Some(i) = &self.instance_id {
            validate_instance_id(i).map_err(|e| e.to_string())?;
        }
        if let Some(lease) = &self.lease {
            lease.validate()?;
        }
        Ok(())
    }
}

/// Whether `tags` carries every pair of `filter` (exact, case-sensitive; an
/// empty filter matches everything), as Hypeman's tag filter.
pub fn tags_match(tags: &BTreeMap<String, String>, filter: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// A CUID2 as we generate it: 24 lowercase alphanumerics, the first a letter.
pub fn is_device_id(s: &str) -> bool {
    s.len() == 24
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// A fresh device id.
pub fn new_device_id() -> String {
    loop {
        let id = cuid2::create_id();
        if is_device_id(&id) {
            return id;
        }
    }
}

/// Now, formatted like the seed's `created_at`.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The in-memory registry: devices by id, with the uniqueness rules enforced.
///
/// A change is first checked against the registry ([`Registry::check`]), then
/// journaled, and only then applied ([`Registry::apply`]). Records and keys
/// are shared (`Arc`), so a copy (the service keeps a published and a staged
/// one, and copies when a reader still holds an old snapshot) is a shallow
/// one. Records are encoded when written, not kept encoded: only a change's
/// own record is encoded on the way to disk, and the whole registry only when
/// the journal is compacted, off the path of any request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    devices: BTreeMap<Arc<str>, Entry>,
    /// Indexes: address and name to id (both unique).
    by_address: HashMap<PciAddress, Arc<str>>,
    by_name: HashMap<Arc<str>, Arc<str>>,
    /// How many records are attached to an instance.
    attached: usize,
    /// *(issue 26)* vGPUs by id.
    vgpus: BTreeMap<Arc<str>, Arc<StoredVgpu>>,
}

/// A record in the registry. Shared (`Arc`), so the service's two copies
/// (published and staged) and a snapshot a reader still holds share it.
type Entry = Arc<StoredDevice>;

/// One durable change to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new device.
    Add(StoredDevice),
    /// New contents for a registered device (same id, name and address).
    Replace(StoredDevice),
    /// The device with this id goes.
    Remove(String),
    /// *(issue 26)* A new vGPU (claimed, or ready).
    AddVgpu(StoredVgpu),
    /// New contents for a vGPU (same id, function and UUID).
    ReplaceVgpu(StoredVgpu),
    /// The vGPU with this id goes.
    RemoveVgpu(String),
}

/// A registry invariant that a set of records breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("{address} is already registered as {name} ({id})")]
    Address {
        address: PciAddress,
        name: String,
        id: String,
    },
    #[error("the name {0} is already taken (by a device's name or id)")]
    Name(String),
    #[error("the id {0} is already taken")]
    Id(String),
    /// *(issue 26)* A function carries one vGPU record at most (vendor-VFIO), and
    /// an mdev UUID is one vGPU's.
    #[error("{0} already carries a vGPU")]
    Vgpu(String),
}

/// Why a [`Change`] cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("no device with id {0} is registered")]
    Missing(String),
    #[error("the id, name and address of device {0} cannot change")]
    KeyChanged(String),
}

impl Registry {
    /// Builds a registry, checking every invariant.
    pub fn from_devices(devices: Vec<StoredDevice>) -> Result<Self, Conflict> {
        let mut r = Registry::default();
        for d in devices {
            r.insert(d)?;
        }
        Ok(r)
    }

    pub fn insert(&mut self, d: StoredDevice) -> Result<(), Conflict> {
        self.conflict(&d)?;
        let id: Arc<str> = Arc::from(d.id.as_str());
        self.by_address.insert(d.pci_address, id.clone());
        self.by_name.insert(Arc::from(d.name.as_str()), id.clone());
        self.attached += usize::from(d.attached_to.is_some());
        self.devices.insert(id, Arc::new(d));
        Ok(())
    }

    /// Which rule a new device would break, if any.
    fn conflict(&self, d: &StoredDevice) -> Result<(), Conflict> {
        if self.devices.contains_key(d.id.as_str()) {
            return Err(Conflict::Id(d.id.clone()));
        }
        if let Some(other) = self.by_address(d.pci_address) {
            return Err(Conflict::Address {
                address: d.pci_address,
                name: other.name.clone(),
                id: other.id.clone(),
            });
        }
        // A name and an id are both keys callers use: neither may stand for
        // the other device, or `Get`/`Delete` by that key reach the wrong one.
        if self.by_name(&d.name).is_some() || self.devices.contains_key(d.name.as_str()) {
            return Err(Conflict::Name(d.name.clone()));
        }
        if self.by_name.contains_key(d.id.as_str()) {
            return Err(Conflict::Id(d.id.clone()));
        }
        Ok(())
    }

    /// *(issue 26)* Adds a vGPU record, checking its rules.
    pub fn insert_vgpu(&mut self, v: StoredVgpu) -> Result<(), Conflict> {
        self.vgpu_conflict(&v)?;
        self.vgpus.insert(Arc::from(v.id.as_str()), Arc::new(v));
        Ok(())
    }

    fn vgpu_conflict(&self, v: &StoredVgpu) -> Result<(), Conflict> {
        if self.vgpus.contains_key(v.id.as_str()) || self.devices.contains_key(v.id.as_str()) {
            return Err(Conflict::Id(v.id.clone()));
        }
        let taken = self
            .vgpus
            .values()
            .any(|o| match (&o.mdev_uuid, &v.mdev_uuid) {
                (Some(a), Some(b)) => a == b,
                (None, None) => o.pci_address == v.pci_address,
                _ => false,
            });
        if taken {
            return Err(Conflict::Vgpu(
                v.mdev_uuid
                    .clone()
                    .unwrap_or_else(|| v.pci_address.to_string()),
            ));
        }
        Ok(())
    }

    /// Every vGPU record, by id.
    pub fn vgpus(&self) -> impl Iterator<Item = &Arc<StoredVgpu>> {
        self.vgpus.values()
    }

    /// One vGPU record.
    pub fn vgpu(&self, id: &str) -> Option<&Arc<StoredVgpu>> {
        self.vgpus.get(id)
    }

    pub fn remove(&mut self, id: &str) -> Option<StoredDevice> {
        let d = self.devices.remove(id)?;
        self.attached -= usize::from(d.attached_to.is_some());
        self.by_address.remove(&d.pci_address);
        self.by_name.remove(d.name.as_str());
        Some(Arc::unwrap_or_clone(d))
    }

    // Lookups hand out the registry's own `Arc`: a caller that keeps the
    // record clones a pointer, not the record.

    /// The device registered at `address`.
    pub fn by_address(&self, address: PciAddress) -> Option<&Arc<StoredDevice>> {
        self.by_address
            .get(&address)
            .and_then(|id| self.devices.get(id))
    }

    /// The device registered under `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<StoredDevice>> {
        self.by_name.get(name).and_then(|id| self.devices.get(id))
    }

    /// By id only: what an operation acts on once its target is resolved.
    pub fn by_id(&self, id: &str) -> Option<&Arc<StoredDevice>> {
        self.devices.get(id)
    }

    /// By id first, then by exact name.
    pub fn resolve(&self, id_or_name: &str) -> Option<&Arc<StoredDevice>> {
        self.devices
            .get(id_or_name)
            .or_else(|| self.by_name(id_or_name))
    }

    /// Every registered device, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<StoredDevice>> {
        self.devices.values()
    }

    /// Whether `change` can be applied: a new device breaks no rule, a
    /// replaced or removed one exists (and keeps its id, name and address).
    pub fn check(&self, change: &Change) -> Result<(), ChangeError> {
        match change {
            Change::Add(d) => Ok(self.conflict(d)?),
            Change::Replace(d) => match self.devices.get(d.id.as_str()) {
                Some(old) if old.name == d.name && old.pci_address == d.pci_address => Ok(()),
                Some(_) => Err(ChangeError::KeyChanged(d.id.clone())),
                None => Err(ChangeError::Missing(d.id.clone())),
            },
            Change::Remove(id) => match self.devices.contains_key(id.as_str()) {
                true => Ok(()),
                false => Err(ChangeError::Missing(id.clone())),
            },
            Change::AddVgpu(v) => Ok(self.vgpu_conflict(v)?),
            Change::ReplaceVgpu(v) => match self.vgpus.get(v.id.as_str()) {
                Some(old) if old.pci_address == v.pci_address && old.mdev_uuid == v.mdev_uuid => {
                    Ok(())
                }
                Some(_) => Err(ChangeError::KeyChanged(v.id.clone())),
                None => Err(ChangeError::Missing(v.id.clone())),
            },
            Change::RemoveVgpu(id) => match self.vgpus.contains_key(id.as_str()) {
                true => Ok(()),
                false => Err(ChangeError::Missing(id.clone())),
            },
        }
    }

    /// Applies a change that [`Registry::check`] accepted.
    pub fn apply(&mut self, change: Change) -> Result<(), ChangeError> {
        // `insert` checks an addition itself, as it inserts.
        if !matches!(change, Change::Add(_) | Change::AddVgpu(_)) {
            self.check(&change)?;
        }
        match change {
            Change::Add(d) => self.insert(d)?,
            Change::Replace(d) => {
                if let Some(slot) = self.devices.get_mut(d.id.as_str()) {
                    self.attached -= usize::from(slot.attached_to.is_some());
                    self.attached += usize::from(d.attached_to.is_some());
                    *slot = Arc::new(d);
                }
            }
            Change::Remove(id) => {
                self.remove(&id);
            }
            Change::AddVgpu(v) => self.insert_vgpu(v)?,
            Change::ReplaceVgpu(v) => {
                if let Some(slot) = self.vgpus.get_mut(v.id.as_str()) {
                    *slot = Arc::new(v);
                }
            }
            Change::RemoveVgpu(id) => {
                self.vgpus.remove(id.as_str());
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// How many records are attached to an instance.
    pub fn attached(&self) -> usize {
        self.attached
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(addr: &str, name: &str) -> StoredDevice {
        StoredDevice {
            id: new_device_id(),
            name: name.into(),
            pci_address: PciAddress::parse(addr).unwrap(),
            vendor_id: "10de".into(),
            device_id: "27b8".into(),
            kind: DeviceType::Gpu,
            created_at: "2025-01-15T10:00:00Z".into(),
            attached_to: None,
            original_driver: None,
            want_vfio: false,
            tags: BTreeMap::new(),
            lease: None,
            identity: None,
            aer_baseline: None,
        }
    }

    #[test]
    fn tags_follow_hypemans_rules() {
        let t = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(validate_tags(&t(&[
            ("team", "ml platform"),
            ("cost_center", ""),
            ("a/b:c=d+e@f-g.h", "x")
        ]))
        .is_ok());
        for bad in [
            t(&[("", "x")]),
            t(&[("k\n", "x")]),
            t(&[("k", "caf\u{e9}")]),
            t(&[(&"k".repeat(129), "x")]),
            t(&[("k", &"v".repeat(257))]),
        ] {
            assert!(validate_tags(&bad).is_err(), "{bad:?}");
        }
        let many: BTreeMap<String, String> =
            (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_tags(&many).is_err());
        assert!(tags_match(&t(&[("a", "1"), ("b", "2")]), &t(&[("a", "1")])));
        assert!(!tags_match(&t(&[("a", "1")]), &t(&[("a", "2")])));
        assert!(!tags_match(&t(&[]), &t(&[("a", "1")])));
        assert!(tags_match(&t(&[]), &t(&[])));
    }

    /// The attached count follows every kind of change.
    #[test]
    fn the_attached_count_follows_changes() {
        let mut r = Registry::default();
        let mut a = sample("0000:01:00.0", "aa");
        a.attached_to = Some("vm-1".into());
        let b = sample("0000:02:00.0", "bb");
        r.apply(Change::Add(a.clone())).unwrap();
        r.apply(Change::Add(b.clone())).unwrap();
        assert_eq!(r.attached(), 1);
        let mut b2 = b.clone();
        b2.attached_to = Some("vm-2".into());
        r.apply(Change::Replace(b2)).unwrap();
        assert_eq!(r.attached(), 2);
        r.apply(Change::Replace(b)).unwrap();
        r.apply(Change::Remove(a.id.clone())).unwrap();
        assert_eq!(r.attached(), 0);
        assert_eq!(
            r.attached(),
            r.iter().filter(|d| d.attached_to.is_some()).count()
        );
    }

    #[test]
    fn a_change_that_breaks_a_rule_is_refused_and_changes_nothing() {
        let mut r = Registry::default();
        let a = sample("0000:01:00.0", "a");
        r.insert(a.clone()).unwrap();
        let before = r.clone();
        let mut same_addr = sample("0000:01:00.0", "b");
        let mut same_name = sample("0000:02:00.0", "a");
        let mut renamed = a.clone();
        renamed.name = "other".into();
        let mut moved = a.clone();
        moved.pci_address = PciAddress::parse("0000:09:00.0").unwrap();
        let refused = [
            (Change::Add(a.clone()), "already taken"),
            (
                Change::Add(std::mem::replace(&mut same_addr, a.clone())),
                "already registered",
            ),
            (
                Change::Add(std::mem::replace(&mut same_name, a.clone())),
                "name a is already taken",
            ),
            (Change::Replace(renamed), "cannot change"),
            (Change::Replace(moved), "cannot change"),
            (
                Change::Replace(sample("0000:05:00.0", "ghost")),
                "no device",
            ),
            (Change::Remove("nope".into()), "no device"),
            // A name equal to another device's id, and an id equal to a name.
            (
                Change::Add(sample("0000:06:00.0", &a.id.clone())),
                "already taken",
            ),
            (
                Change::Add({
                    let mut d = sample("0000:07:00.0", "c");
                    d.id = "a".into();
                    d
                }),
                "already taken",
            ),
        ];
        for (c, why) in refused {
            let e = r.check(&c).unwrap_err();
            assert!(e.to_string().contains(why), "{c:?}: {e}");
            assert!(r.apply(c).is_err());
            assert_eq!(r, before);
        }
    }

    #[test]
    fn ids_are_cuid2() {
        for _ in 0..100 {
            assert!(is_device_id(&new_device_id()));
        }
        assert!(!is_device_id("1z4a98xxat96iws9zmbrgj3a"));
        assert!(is_device_id("tz4a98xxat96iws9zmbrgj3a"));
    }

    #[test]
    fn uniqueness() {
        let mut r = Registry::default();
        let a = sample("a2:00.0", "l4-gpu");
        r.insert(a.clone()).unwrap();
        let dup_addr = sample("0000:a2:00.0", "other");
        assert!(matches!(r.insert(dup_addr), Err(Conflict::Address { .. })));
        let dup_name = sample("a3:00.0", "l4-gpu");
        assert_eq!(r.insert(dup_name), Err(Conflict::Name("l4-gpu".into())));
        assert_eq!(r.resolve(&a.id).unwrap().name, "l4-gpu");
        assert_eq!(r.resolve("l4-gpu").unwrap().id, a.id);
        assert!(r.resolve("nope").is_none());
    }

    #[test]
    fn timestamps_look_like_the_seed() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2025-01-15T10:00:00Z".len());
        assert!(t.ends_with('Z'));
        assert!(chrono::DateTime::parse_from_rfc3339(&t).is_ok());
    }
}
