//! `hypeman-device-plugin`: the devices hypemand sets aside, offered to the
//! kubelet as extended resources through the device plugin API (v1beta1).
//!
//! It is a D-Bus client of hypemand on the node and a gRPC server per
//! resource; the registry, the safety rules and the authorization stay
//! hypemand's.
//!
//! - [`api`]: the kubelet's APIs, generated from `proto/`;
//! - [`config`]: which device goes to which resource;
//! - [`node`]: what hypemand says of the registered devices, kept current
//!   from its signals (never polled);
//! - [`plugin`]: the DevicePlugin service of one resource;
//! - [`vgpu`]: *(issue 26)* vGPU profiles as resources: slots, a vGPU made
//!   at Allocate, deleted when its pod is gone;
//! - [`kubelet`]: registering, the kubelet's restarts, and keeping
//!   attachments in step with pods through PodResources.

pub mod api {
    /// The device plugin API (`v1beta1`).
    pub mod deviceplugin {
        tonic::include_proto!("v1beta1");
    }
    /// The PodResources API (`v1`).
    pub mod podresources {
        tonic::include_proto!("v1");
    }
}

pub mod config;
pub mod kubelet;
pub mod node;
pub mod plugin;
pub mod vgpu;

/// The API version the plugin speaks.
pub const API_VERSION: &str = "v1beta1";

/// Where an allocated device is reachable: the VFIO container and its group.
pub const VFIO_CONTAINER: &str = "/dev/vfio/vfio";

/// *(issue 28)* What a VMM opens beside a VFIO device cdev (iommufd).
pub const IOMMU_DEVICE: &str = "/dev/iommu";

/// The environment variable KubeVirt reads the PCI addresses of a resource
/// from: `PCI_RESOURCE_` and the resource name, uppercased, `.` and `/` as `_`
/// (KubeVirt's `util.ResourceNameToEnvVar`; `-` stays).
pub fn pci_resource_env(resource: &str) -> String {
    resource_env("PCI_RESOURCE", resource)
}

/// *(issue 26)* The variable KubeVirt reads a resource's mdev UUIDs from:
/// `MDEV_PCI_RESOURCE_` and the name as [`pci_resource_env`] writes it
/// (virt-launcher's `MDEV_RESOURCE_PREFIX`).
pub fn mdev_resource_env(resource: &str) -> String {
    resource_env("MDEV_PCI_RESOURCE", resource)
}

fn resource_env(prefix: &str, resource: &str) -> String {
    let name: String = resource
        .chars()
        .map(|c| match c {
            '.' | '/' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("{prefix}_{name}")
}

/// A plugin socket's file name for a resource (`hypeman.io/gpu` ->
/// `hypeman-hypeman.io_gpu.sock`).
pub fn socket_name(resource: &str) -> String {
    let safe: String = resource
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("hypeman-{safe}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            pci_resource_env("hypeman.io/nvidia-l4"),
            "PCI_RESOURCE_HYPEMAN_IO_NVIDIA-L4"
        );
        assert_eq!(
            mdev_resource_env("hypeman.io/vgpu-grid-a100-4c"),
            "MDEV_PCI_RESOURCE_HYPEMAN_IO_VGPU-GRID-A100-4C"
        );
        assert_eq!(socket_name("hypeman.io/gpu"), "hypeman-hypeman.io_gpu.sock");
    }
}
