//! The host: what the daemon needs from a kernel's PCI subsystem.
//!
//! Everything above this trait (the service, D-Bus, the store) is the same code in
//! production and under `--simulate`; only the backend differs. Methods are
//! synchronous because sysfs is: callers that must not block the reactor run them
//! on a blocking thread.

pub mod sim;
pub mod sysfs;

use crate::pci::PciAddress;

/// What the kernel reports about one PCI function right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
    /// 24-bit class code (`0x030200`).
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem_device: u16,
    /// The bound driver's name; `None` when unbound.
    pub driver: Option<String>,
    /// The IOMMU group; `None` when the host has no IOMMU.
    pub iommu_group: Option<u32>,
    /// `driver_override`; `None` when unset (`(null)`).
    pub driver_override: Option<String>,
}

/// Why the host could not answer.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Attr(#[from] crate::pci::sysfs::AttrError),
}

/// A source of truth about PCI devices: the real sysfs or the simulated kernel.
pub trait Host: Send + Sync + 'static {
    /// One line for logs and `--help`-level diagnostics: which host this is.
    fn describe(&self) -> String;

    /// Every PCI function on the host, sorted by address.
    fn devices(&self) -> Result<Vec<HostDevice>, HostError>;

    /// One function; `Ok(None)` when no such device exists (unplugged or never there).
    fn device(&self, address: PciAddress) -> Result<Option<HostDevice>, HostError>;
}
