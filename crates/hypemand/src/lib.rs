//! hypemand: the daemon that sets PCI devices aside for VM passthrough.
//!
//! Read it top down, edges to host:
//!
//! - [`edge`]: where the world talks to the service: D-Bus, udev, systemd;
//! - [`service`]: the rules, and the one owner of the state;
//! - [`host`]: the one door to the kernel (real sysfs or simulated), and the vfio moves;
//! - [`store`]: the registry, its snapshot `devices.json` and its journal;
//! - [`pci`]: what a PCI address, class and ID name are;
//! - [`daemon`]: wires it all together for one run of `hypemand`;
//! - [`args`]: the command line;
//! - [`memory`]: giving freed heap back to the system;
//! - [`pause`]: a test seam that stops a simulated daemon mid-write.
//!
//! The contract with clients (names, records, errors) is the `hypeman-api`
//! crate, which `hypemanctl` uses too; nothing of this crate is in a client.

pub mod args;
pub mod daemon;
pub mod edge;
pub mod host;
pub mod memory;
pub mod pause;
pub mod pci;
pub mod service;
pub mod store;

/// This build's version, as the manager's `Version` property reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
