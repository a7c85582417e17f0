//! hypemand: the daemon that sets PCI devices aside for VM passthrough.
//!
//! Read it top down, edges to host:
//!
//! - `edge`: where the world talks to the service: D-Bus, REST, udev, systemd;
//! - `service`: the rules, and the one owner of the state;
//! - `host`: the one door to the kernel (real sysfs or simulated), and the vfio moves;
//! - `store`: the registry, its snapshot `devices.json` and its journal;
//! - `pci`: what a PCI address, class and ID name are;
//! - [`daemon`]: wires it all together for one run of `hypemand`;
//! - [`args`]: the command line;
//! - [`memory`]: giving freed heap back to the system;
//! - `telemetry`: what every layer counts, for the metrics edge;
//! - `pause`: a test seam that stops a simulated daemon mid-write.
//!
//! The contract with clients (names, records, errors) is the `hypeman-api`
//! crate, which `hypemanctl` uses too; nothing of this crate is in a client.

#![warn(missing_docs)]

// Public: what `main.rs` runs (args, daemon, memory), and [`fuzzing`], the
// few parsers the targets in `fuzz/` feed. The rest is the daemon's own.
pub mod args;
pub mod daemon;
pub(crate) mod edge;
pub(crate) mod host;
pub mod memory;
pub(crate) mod pause;
pub(crate) mod pci;
pub(crate) mod service;
pub(crate) mod store;
pub(crate) mod telemetry;

/// What the fuzz targets in `fuzz/` reach: the parsers of everything the
/// daemon reads from outside (fixtures, addresses, sysfs attributes, the
/// store's files), and nothing else.
pub mod fuzzing {
    pub use crate::host::sim::Fixture;
    pub use crate::pci::sysfs::{parse_hex, parse_override};
    pub use crate::pci::PciAddress;
    pub use crate::store::{Loaded, Store, StoreError};
}

/// This build's version, as the manager's `Version` property reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
