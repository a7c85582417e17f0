//! The end-to-end tests: one binary, one module per area (as ripgrep's
//! `tests/tests.rs`), so `tests/common` is compiled once and every helper in
//! it is used somewhere.
//!
//! Each module starts the real programs (a private `dbus-daemon`, `polkitd`,
//! `hypemand`, `hypemanctl`, the device plugin, the SDK from PyPI) and stops
//! every process it started, by pid, on every path.

mod common;

mod bench;
mod crash;
mod device_plugin;
mod host_safety;
mod hostile;
mod hotplug;
mod hypemanctl;
mod lease;
mod metrics;
mod polkit;
mod registry;
mod rest;
mod sdk;
mod soak;
mod sriov;
mod state_dir;
mod store_faults;
mod stuck_host;
mod sysfs_root;
mod systemd;
mod tags;
mod umockdev;
mod vfio;
mod vgpu;
