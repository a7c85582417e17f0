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
}
