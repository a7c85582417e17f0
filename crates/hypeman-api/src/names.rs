//! Names on the bus: one spelling for the daemon and its clients.

/// The well-known bus name.
pub const BUS_NAME: &str = "org.hypeman.Devices";
/// The manager's object path.
pub const MANAGER_PATH: &str = "/org/hypeman/Devices";
/// The manager's interface.
pub const MANAGER_IFACE: &str = "org.hypeman.Devices1";
/// Every registered device's interface, at `MANAGER_PATH/<id>`.
pub const DEVICE_IFACE: &str = "org.hypeman.Device1";
/// *(issue 26)* Where each vGPU's object is: `VGPUS_PATH/<id>`.
pub const VGPUS_PATH: &str = "/org/hypeman/Vgpus";
/// *(issue 26)* Each vGPU's interface.
pub const VGPU_IFACE: &str = "org.hypeman.Vgpu1";

/// *(issue 26)* The object path of a vGPU id (a CUID2); `None` for
/// anything else.
pub fn vgpu_path(id: &str) -> Option<zbus::OwnedObjectPath> {
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    ok.then(|| zbus::OwnedObjectPath::try_from(format!("{VGPUS_PATH}/{id}")).ok())
        .flatten()
}

/// The simulated kernel's test interface (only under `hypemand --simulate`).
pub const SIMULATOR_PATH: &str = "/org/hypeman/Simulator";
/// The simulator's interface (only under `--simulate`).
pub const SIMULATOR_IFACE: &str = "org.hypeman.Simulator1";
/// The prefix of the daemon's own error names.
pub const ERROR_PREFIX: &str = "org.hypeman.Devices.Error";
/// The driver that makes a device assignable to a VM.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// The object path of a device id. Ids are CUID2s (lowercase alphanumerics),
/// always valid path elements; anything else yields `None`.
pub fn device_path(id: &str) -> Option<zbus::OwnedObjectPath> {
    zbus::OwnedObjectPath::try_from(format!("{MANAGER_PATH}/{id}")).ok()
}
