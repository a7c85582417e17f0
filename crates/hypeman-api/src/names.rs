//! Names on the bus: one spelling for the daemon and its clients.

/// The well-known bus name.
pub const BUS_NAME: &str = "org.hypeman.Devices";
/// The manager's object path.
pub const MANAGER_PATH: &str = "/org/hypeman/Devices";
/// The manager's interface.
pub const MANAGER_IFACE: &str = "org.hypeman.Devices1";
/// Every registered device's interface, at `MANAGER_PATH/<id>`.
pub const DEVICE_IFACE: &str = "org.hypeman.Device1";
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
