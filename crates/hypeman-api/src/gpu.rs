//! *(issue 26)* GPU sharing: the vGPU types a registered GPU offers
//! (`ListVgpuTypes`) and the capacity in Hypeman's own shape
//! (`GpuResources`, `GET /resources/gpu`: what the SDK's
//! `GPUResourceStatus` validates).

use serde::Serialize;
use zbus::zvariant::{DeserializeDict, SerializeDict, Type};

/// The framework of vendor-specific VFIO (NVIDIA vGPU 17+ on Ada, Hopper,
/// Blackwell): a type id written to a virtual function's
/// `nvidia/current_vgpu_type`.
pub const VENDOR_VFIO: &str = "vendor-vfio";
/// The mediated-device framework: a UUID written to a type's `create`.
pub const MDEV: &str = "mdev";

/// One vGPU type one registered parent offers now.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type, zbus::Variant,
)]
#[zvariant(signature = "a{sv}")]
pub struct VgpuType {
    /// The parent GPU's PCI address.
    pub parent: String,
    /// [`VENDOR_VFIO`] or [`MDEV`].
    pub framework: String,
    /// The driver's id of the type: `1155` (vendor-VFIO), `nvidia-556` (mdev).
    pub type_id: String,
    /// The profile name: `NVIDIA L40S-4Q`.
    pub name: String,
    /// Its framebuffer in MiB; 0 when the driver does not say.
    pub framebuffer_mb: i64,
    /// How many more can be made on this parent now (conservative: never
    /// more than the parent's free framebuffer holds).
    pub available: i64,
}

/// A vGPU profile in Hypeman's `GPUProfile` shape.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type, zbus::Variant,
)]
#[zvariant(signature = "a{sv}")]
pub struct GpuProfile {
    /// The profile name, as Hypeman's clients ask for it.
    pub name: String,
    /// Its framebuffer in MiB.
    pub framebuffer_mb: i64,
    /// How many can be made now, over every parent.
    pub available: i64,
}

/// A whole GPU in Hypeman's `PassthroughDevice` shape.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type, zbus::Variant,
)]
#[zvariant(signature = "a{sv}")]
pub struct GpuDevice {
    /// The GPU's name (the PCI ID database's, else its registered name).
    pub name: String,
    /// Not attached to an instance.
    pub available: bool,
}

/// The GPU capacity of the host, in Hypeman's `GPUResourceStatus` shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "a{sv}")]
pub struct GpuResources {
    /// `vgpu` when a registered GPU offers vGPU types, else `passthrough`.
    pub mode: String,
    /// The virtual functions that can carry a vGPU (vgpu), or the registered
    /// GPUs (passthrough).
    pub total_slots: i64,
    /// Those carrying a vGPU, or attached.
    pub used_slots: i64,
    /// The profiles (vgpu mode only).
    pub profiles: Option<Vec<GpuProfile>>,
    /// The GPUs (passthrough mode only).
    pub devices: Option<Vec<GpuDevice>>,
}

/// *(issue 26)* A vGPU (`CreateVgpu`, `ListVgpus`).
#[derive(
    Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type, zbus::Variant,
)]
#[zvariant(signature = "a{sv}")]
pub struct Vgpu {
    /// Its id: 24 lowercase letters and digits, starting with a letter.
    pub id: String,
    /// The profile it was made of: `NVIDIA L40S-4Q`.
    pub profile: String,
    /// The driver's type id.
    pub type_id: String,
    /// [`VENDOR_VFIO`] or [`MDEV`].
    pub framework: String,
    /// The GPU it is on.
    pub parent_pci_address: String,
    /// The function it is on (vendor-VFIO: the virtual function a VMM is
    /// given; mdev: the mdev's parent).
    pub pci_address: String,
    /// mdev: its UUID.
    pub mdev_uuid: Option<String>,
    /// What a VMM opens: `/dev/vfio/devices/vfioN` where the kernel offers
    /// the VFIO cdev, else `/dev/vfio/<group>`.
    pub device_nodes: Vec<String>,
    /// The instance holding it.
    pub instance_id: Option<String>,
    /// When it was made, RFC 3339, UTC, whole seconds.
    pub created_at: String,
    /// `ready`, or `creating` while it is being made.
    pub state: String,
    /// *(issue 27)* The process whose end releases the vGPU (its pid in the
    /// daemon's pid namespace); absent without a process lease.
    pub holder_pid: Option<i64>,
    /// *(issue 27)* The systemd unit whose end releases the vGPU (a unit
    /// lease), or the unit a process holder ran in; absent otherwise.
    pub holder_unit: Option<String>,
    /// *(issue 27)* A unit lease's `InvocationID`; absent otherwise.
    pub holder_invocation: Option<String>,
    /// *(issue 27)* What the holder's end does: `detach` (the instance is
    /// cleared, the vGPU stays) or `give-back` (the vGPU is deleted);
    /// absent without a lease.
    pub on_release: Option<String>,
}

/// *(issue 26)* `CreateVgpu`'s request.
#[derive(Debug, Clone, Default)]
pub struct VgpuRequest {
    /// The profile name, required: `NVIDIA L40S-4Q`.
    pub profile: String,
    /// The instance that will hold it.
    pub instance_id: Option<String>,
    /// A registered GPU's id, name or address; placement chooses when absent.
    pub parent: Option<String>,
    /// Only GPUs on this NUMA node.
    pub numa_node: Option<u32>,
    /// *(issue 27)* The lease: `holder_pidfd`, `holder_unit` and
    /// `on_release`, as `AttachWithOptions` takes them (`force` is not a
    /// vGPU option and stays false).
    pub lease: crate::options::Options,
}

impl VgpuRequest {
    /// The dictionary a D-Bus client sends (borrowing the holder's pidfd).
    pub fn to_dict(&self) -> std::collections::HashMap<&'static str, zbus::Variant<'_>> {
        use zbus::Variant as Value;
        let mut d = self.lease.to_dict();
        d.insert("profile", Value::from(self.profile.clone()));
        if let Some(i) = &self.instance_id {
            d.insert("instance_id", Value::from(i.clone()));
        }
        if let Some(p) = &self.parent {
            d.insert("parent", Value::from(p.clone()));
        }
        if let Some(n) = self.numa_node {
            d.insert("numa_node", Value::from(n));
        }
        d
    }

    /// Reads what the daemon received: unknown keys and wrong types are
    /// `InvalidArgument`.
    pub fn from_dict(
        d: &std::collections::HashMap<String, zbus::OwnedVariant>,
    ) -> Result<VgpuRequest, crate::Error> {
        use crate::Error;
        let wrong = |key: &str, want: &str, v: &zbus::OwnedVariant| {
            Error::InvalidArgument(format!(
                "{key:?} must be {want}, not {}",
                v.value_signature()
            ))
        };
        let string = |key: &str, v: &zbus::OwnedVariant| {
            String::try_from(v.clone()).map_err(|_| wrong(key, "a string (s)", v))
        };
        use crate::options::{HOLDER_PIDFD, HOLDER_UNIT, ON_RELEASE};
        let mut out = VgpuRequest::default();
        let mut has_profile = false;
        // The lease's keys are read as AttachWithOptions reads them.
        let mut lease = std::collections::HashMap::new();
        for (key, v) in d {
            match key.as_str() {
                HOLDER_PIDFD | HOLDER_UNIT | ON_RELEASE => {
                    lease.insert(
                        key.clone(),
                        v.try_clone().map_err(|e| {
                            Error::Failed(format!("cannot keep option {key:?}: {e}"))
                        })?,
                    );
                }
                "profile" => {
                    out.profile = string(key, v)?;
                    has_profile = true;
                }
                "instance_id" => out.instance_id = Some(string(key, v)?),
                "parent" => out.parent = Some(string(key, v)?),
                "numa_node" => {
                    let n = u32::try_from(v.clone())
                        .ok()
                        .or_else(|| {
                            i64::try_from(v.clone())
                                .ok()
                                .and_then(|n| u32::try_from(n).ok())
                        })
                        .ok_or_else(|| wrong(key, "a node number (u or x, not negative)", v))?;
                    out.numa_node = Some(n);
                }
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(Error::InvalidArgument(format!(
                        "unknown key {shown:?}; a vGPU request has profile (s), instance_id (s), parent (s), numa_node (u), holder_pidfd (h), holder_unit (s) and on_release (s: detach or give-back)"
                    )));
                }
            }
        }
        out.lease = crate::options::Options::from_dict(&lease)?;
        if !has_profile || out.profile.trim().is_empty() || out.profile.len() > 128 {
            return Err(Error::InvalidArgument(
                "a vGPU request needs profile (s): a profile name of 1-128 characters, as ListVgpuTypes shows".into(),
            ));
        }
        Ok(out)
    }
}

/// The JSON document of [`GpuResources`] (Hypeman's `GPUResourceStatus`).
#[derive(Debug, Serialize)]
pub struct GpuDocument<'a> {
    /// `vgpu` or `passthrough`.
    pub mode: &'a str,
    /// See [`GpuResources::total_slots`].
    pub total_slots: i64,
    /// See [`GpuResources::used_slots`].
    pub used_slots: i64,
    /// Only in vgpu mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiles: Option<Vec<ProfileDocument<'a>>>,
    /// Only in passthrough mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceDocument<'a>>>,
}

/// The JSON document of a [`GpuProfile`].
#[derive(Debug, Serialize)]
pub struct ProfileDocument<'a> {
    /// See [`GpuProfile::name`].
    pub name: &'a str,
    /// See [`GpuProfile::framebuffer_mb`].
    pub framebuffer_mb: i64,
    /// See [`GpuProfile::available`].
    pub available: i64,
}

/// The JSON document of a [`GpuDevice`].
#[derive(Debug, Serialize)]
pub struct DeviceDocument<'a> {
    /// See [`GpuDevice::name`].
    pub name: &'a str,
    /// See [`GpuDevice::available`].
    pub available: bool,
}

impl GpuResources {
    /// The document Hypeman's REST API answers.
    pub fn document(&self) -> GpuDocument<'_> {
        GpuDocument {
            mode: &self.mode,
            total_slots: self.total_slots,
            used_slots: self.used_slots,
            profiles: self.profiles.as_ref().map(|p| {
                p.iter()
                    .map(|p| ProfileDocument {
                        name: &p.name,
                        framebuffer_mb: p.framebuffer_mb,
                        available: p.available,
                    })
                    .collect()
            }),
            devices: self.devices.as_ref().map(|d| {
                d.iter()
                    .map(|d| DeviceDocument {
                        name: &d.name,
                        available: d.available,
                    })
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON document has Hypeman's keys and plain values, and leaves out
    /// the list of the other mode.
    #[test]
    fn the_document_is_hypemans() {
        let r = GpuResources {
            mode: "vgpu".into(),
            total_slots: 4,
            used_slots: 1,
            profiles: Some(vec![GpuProfile {
                name: "L40S-4Q".into(),
                framebuffer_mb: 4096,
                available: 3,
            }]),
            devices: None,
        };
        let v = serde_json::to_value(r.document()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"mode": "vgpu", "total_slots": 4, "used_slots": 1,
                "profiles": [{"name": "L40S-4Q", "framebuffer_mb": 4096, "available": 3}]})
        );
    }

    /// *(issue 27)* A request's lease keys are read as AttachWithOptions
    /// reads them and come back whole; `force` is not a vGPU key.
    #[test]
    fn a_request_carries_its_lease() {
        use crate::options::{OnRelease, Options};
        let sent = VgpuRequest {
            profile: "NVIDIA L40S-4Q".into(),
            instance_id: Some("vm-1".into()),
            lease: Options {
                holder_unit: Some("vm-1.service".into()),
                on_release: Some(OnRelease::GiveBack),
                ..Default::default()
            },
            ..Default::default()
        };
        let owned = |d: std::collections::HashMap<&'static str, zbus::Variant<'_>>| {
            d.into_iter()
                .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        let got = VgpuRequest::from_dict(&owned(sent.to_dict())).unwrap();
        assert_eq!(got.lease.holder_unit.as_deref(), Some("vm-1.service"));
        assert_eq!(got.lease.on_release, Some(OnRelease::GiveBack));
        assert_eq!(got.instance_id.as_deref(), Some("vm-1"));

        let mut d = owned(sent.to_dict());
        d.remove("holder_unit");
        assert!(matches!(
            VgpuRequest::from_dict(&d),
            Err(crate::Error::InvalidArgument(m)) if m.contains("needs a holder")
        ));
        let mut d = owned(sent.to_dict());
        d.insert("force".into(), zbus::OwnedVariant::from(true));
        assert!(matches!(
            VgpuRequest::from_dict(&d),
            Err(crate::Error::InvalidArgument(m)) if m.contains("unknown key")
        ));
    }
}
