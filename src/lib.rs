//! hypeman-devices: the library behind `hypemand` and `hypemanctl`.
//!
//! Layers, bottom up: [`pci`] knows what a PCI function is; [`host`] reads (and
//! later rebinds) them on a real or simulated kernel; [`registry`] keeps what the
//! kernel cannot remember; [`service`] holds the rules; [`bus`] puts the service on
//! D-Bus; [`daemon`] wires it all for `hypemand`.

pub mod bench;
pub mod bus;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod error;
pub mod host;
pub mod hotplug;
pub mod memory;
pub mod pci;
pub mod registry;
pub mod service;
pub mod systemd;
pub mod vfio;

/// The well-known bus name.
pub const BUS_NAME: &str = "org.hypeman.Devices";
/// The manager's object path.
pub const MANAGER_PATH: &str = "/org/hypeman/Devices";
/// The driver that makes a device assignable to a VM.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// This build's version, as the manager's `Version` property reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
