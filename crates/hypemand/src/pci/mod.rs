//! What a PCI function is: its address, its type, its names, and how sysfs spells
//! its attributes. Nothing here talks to a host; see [`crate::host`].

pub mod address;
pub mod class;
pub mod ids;
pub mod sysfs;

pub use address::{AddressError, PciAddress};
pub use class::DeviceType;
pub use ids::PciIds;
