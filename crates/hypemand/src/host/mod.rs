//! The host: what the daemon needs from a kernel's PCI subsystem.
//!
//! Everything above the [`Host`] trait (the service, D-Bus, the store) is the
//! same code in production and under `--simulate`; only the backend differs.
//! Methods are synchronous because sysfs is, and nothing above this module
//! calls them directly: [`door::Door`] runs every read and every write off the
//! async runtime under a deadline, and [`vfio`] builds the driver moves from
//! its [`HostOp`]s.
//!
//! - [`door`]: the one way in, with deadlines and stuck-call bookkeeping;
//! - [`vfio`]: take a device to vfio-pci and give it back, with rollback;
//! - [`sriov`]: change a physical function's virtual functions, with rollback;
//! - [`vgpu`]: where vGPUs are made and what the drivers offer;
//! - [`sysfs`]: the real kernel; [`sim`]: the simulated one;
//! - [`usage`]: how the host uses a function (mounts, routes, open nodes);
//! - [`units`]: the systemd services that hold devices (nvidia-persistenced);
//! - [`aer`]: a function's PCIe error counters.

pub mod aer;
pub mod door;
pub mod sim;
pub mod sriov;
pub mod sysfs;
pub mod units;
pub mod usage;
pub mod variant;
pub mod vfio;
pub mod vgpu;

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
    /// `numa_node`; `None` when the platform has none (-1).
    pub numa_node: Option<u32>,
    /// `boot_vga` is 1: the firmware's console is on this device.
    pub boot_vga: bool,
    /// *(issue 26)* A physical function's SR-IOV capability; `None` when it
    /// has none (or is itself a virtual function).
    pub sriov: Option<Sriov>,
    /// *(issue 26)* A virtual function's physical function (the `physfn`
    /// link); `None` for every other function.
    pub physfn: Option<PciAddress>,
    /// *(issue 28)* How the kernel can reset the function between tenants,
    /// in its order of preference (`reset_method`, kernel 5.15+): `flr bus`.
    /// `Some("")`: it cannot (the kernel hides the attribute, and `reset`,
    /// when a function has no method). `None`: the kernel does not say (no
    /// `reset_method` but a `reset`: a kernel before 5.15).
    pub reset_method: Option<String>,
    /// *(issue 28)* The function's VFIO device (`vfio-dev/vfioN`, kernel
    /// 6.2+), by name: only a vfio-pci-core driver registers one.
    pub vfio_dev: Option<String>,
}

#[cfg(test)]
impl HostDevice {
    /// A function for unit tests: an NVIDIA L4 (10de:27b8, class 030200)
    /// at 0000:a2:00.0 in IOMMU group 82, unbound, with nothing else said.
    /// A test sets what it is about with struct update syntax.
    pub fn example() -> HostDevice {
        HostDevice {
            address: PciAddress::parse("0000:a2:00.0").expect("an address"),
            vendor: 0x10de,
            device: 0x27b8,
            class: 0x030200,
            subsystem_vendor: 0,
            subsystem_device: 0,
            driver: None,
            iommu_group: Some(82),
            driver_override: None,
            numa_node: None,
            boot_vga: false,
            sriov: None,
            physfn: None,
            reset_method: None,
            vfio_dev: None,
        }
    }
}

/// *(issue 28)* Whether a kernel command line has `pcie_acs_override=`
/// (the out-of-tree ACS override patch): then the IOMMU groups the kernel
/// reports are not isolation boundaries.
pub fn acs_override(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w.starts_with("pcie_acs_override="))
}

/// *(issue 28)* A `reset_method` file's text as shown: the method names
/// (lowercase letters, digits, `_`; at most 16 of at most 32 bytes each),
/// one space apart. Anything else in the file is dropped.
pub fn reset_methods(text: &str) -> String {
    text.split_whitespace()
        .filter(|w| {
            w.len() <= 32
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .take(16)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What sysfs says of a physical function's SR-IOV capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sriov {
    /// `sriov_totalvfs`: the most virtual functions it can have.
    pub total_vfs: u32,
    /// `sriov_numvfs`: how many it has now.
    pub num_vfs: u32,
    /// `sriov_vf_device`: its virtual functions' device id.
    pub vf_device: Option<u16>,
    /// `sriov_offset`: the first virtual function's routing id, relative to
    /// the physical function's; 0 when the kernel does not say.
    pub offset: u16,
    /// `sriov_stride`: the distance between two virtual functions' routing ids.
    pub stride: u16,
}

impl Sriov {
    /// The addresses of `pf`'s first `count` virtual functions, by the
    /// kernel's own arithmetic (`pci_iov_virtfn_bus` and
    /// `pci_iov_virtfn_devfn` in `drivers/pci/iov.c`): routing id = the
    /// physical function's + offset + stride × index, whose high byte is the
    /// bus and low byte the device and function. Empty when the offset is
    /// unknown; functions past bus 255 do not exist and are left out.
    pub fn vfs(&self, pf: PciAddress, count: u32) -> Vec<PciAddress> {
        if self.offset == 0 {
            return Vec::new();
        }
        let rid = (u32::from(pf.bus) << 8) | (u32::from(pf.device) << 3) | u32::from(pf.function);
        (0..count.min(self.total_vfs))
            .map(|i| rid + u32::from(self.offset) + u32::from(self.stride) * i)
            .take_while(|r| *r <= 0xffff)
            .map(|r| PciAddress {
                domain: pf.domain,
                bus: (r >> 8) as u8,
                device: ((r >> 3) & 0x1f) as u8,
                function: (r & 0x7) as u8,
            })
            .collect()
    }

    /// The virtual functions `pf` has now.
    pub fn current_vfs(&self, pf: PciAddress) -> Vec<PciAddress> {
        self.vfs(pf, self.num_vfs)
    }
}

/// What a uevent (or the simulated kernel) says happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Add,
    Remove,
    Bind,
    Unbind,
    Change,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Add => "add",
            EventKind::Remove => "remove",
            EventKind::Bind => "bind",
            EventKind::Unbind => "unbind",
            EventKind::Change => "change",
        }
    }
}

/// One hotplug event for one PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEvent {
    pub kind: EventKind,
    pub address: PciAddress,
    /// *(issue 29)* A `change` from the kernel's AER recovery
    /// (`ERROR_EVENT`, `DEVICE_ONLINE`).
    pub aer: Option<aer::Recovery>,
    /// Produced by the start-up enumeration rather than by the kernel.
    pub enumerated: bool,
    /// *(issue 30)* Stands for events that were lost: what a re-read of
    /// every function found different from what clients were told.
    pub reread: bool,
    /// The device as the enumeration read it (saves reading it again).
    pub device: Option<HostDevice>,
}

impl HostEvent {
    pub fn new(kind: EventKind, address: PciAddress) -> Self {
        HostEvent {
            kind,
            address,
            aer: None,
            enumerated: false,
            reread: false,
            device: None,
        }
    }
}

/// Where a host backend delivers its events.
pub type EventSink = Box<dyn Fn(HostEvent) + Send + Sync>;

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
    /// A write the kernel refused, with its errno.
    #[error("writing {value:?} to {path} failed: {}", errno_text(*.errno))]
    Write {
        path: String,
        value: String,
        errno: i32,
    },
    /// The driver is not loaded (no `drivers/<name>`).
    #[error("driver {0} is not loaded")]
    NoDriver(String),
    #[error("no PCI device {0} on this host")]
    NoDevice(PciAddress),
}

/// `ENODEV (No such device)`, for messages a person reads.
pub fn errno_text(errno: i32) -> String {
    let name = errno_name(errno).unwrap_or("errno");
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    format!("{name} ({text})")
}

/// The errno values a sysfs write can plausibly fail with, by name.
pub const ERRNOS: [(&str, i32); 12] = [
    ("EPERM", 1),
    ("ENOENT", 2),
    ("EINTR", 4),
    ("EIO", 5),
    ("ENXIO", 6),
    ("EAGAIN", 11),
    ("EACCES", 13),
    ("EBUSY", 16),
    ("EEXIST", 17),
    ("ENODEV", 19),
    ("EINVAL", 22),
    ("ERANGE", 34),
];

pub fn errno_name(errno: i32) -> Option<&'static str> {
    ERRNOS.iter().find(|(_, n)| *n == errno).map(|(s, _)| *s)
}

pub fn errno_by_name(name: &str) -> Option<i32> {
    ERRNOS.iter().find(|(s, _)| *s == name).map(|(_, n)| *n)
}

/// The kernel operations the daemon performs, by the name faults and messages use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Write a driver name to `driver_override`.
    SetOverride,
    /// Write an empty line to `driver_override`.
    ClearOverride,
    /// Write the address to `drivers/<name>/unbind`.
    Unbind,
    /// Write the address to `drivers/<name>/bind`.
    Bind,
    /// Write the address to `drivers_probe`.
    Probe,
    /// *(issue 26)* Write a count to a physical function's `sriov_numvfs`.
    SetNumVfs,
    /// *(issue 26)* Write a type id (or 0) to `nvidia/current_vgpu_type`.
    SetVgpuType,
    /// *(issue 26)* Write a UUID to an mdev type's `create`.
    CreateMdev,
    /// *(issue 26)* Write 1 to an mdev's `remove`.
    RemoveMdev,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::SetOverride,
        Op::ClearOverride,
        Op::Unbind,
        Op::Bind,
        Op::Probe,
        Op::SetNumVfs,
        Op::SetVgpuType,
        Op::CreateMdev,
        Op::RemoveMdev,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::SetOverride => "set_override",
            Op::ClearOverride => "clear_override",
            Op::Unbind => "unbind",
            Op::Bind => "bind",
            Op::Probe => "probe",
            Op::SetNumVfs => "set_num_vfs",
            Op::SetVgpuType => "set_vgpu_type",
            Op::CreateMdev => "create_mdev",
            Op::RemoveMdev => "remove_mdev",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// One write to the kernel, with what it needs: an operation cannot be asked
/// for without its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    /// Write this driver's name to `driver_override`.
    SetOverride(String),
    /// Clear `driver_override`.
    ClearOverride,
    /// `drivers/<driver>/unbind`.
    Unbind(String),
    /// `drivers/<driver>/bind`.
    Bind(String),
    /// `drivers_probe`.
    Probe,
    /// `sriov_numvfs`.
    SetNumVfs(u32),
    /// `nvidia/current_vgpu_type` (0 frees it).
    SetVgpuType(u32),
    /// `class/mdev_bus/<function>/mdev_supported_types/<type>/create`.
    CreateMdev {
        /// The type directory.
        type_id: String,
        /// The new mdev's UUID.
        uuid: String,
    },
    /// `bus/mdev/devices/<uuid>/remove`.
    RemoveMdev(String),
}

impl HostOp {
    /// Performs the write on `host` (blocking).
    pub fn apply(&self, host: &dyn Host, address: PciAddress) -> Result<(), HostError> {
        match self {
            HostOp::SetOverride(d) => host.set_override(address, Some(d)),
            HostOp::ClearOverride => host.set_override(address, None),
            HostOp::Unbind(d) => host.unbind(address, d),
            HostOp::Bind(d) => host.bind(address, d),
            HostOp::Probe => host.probe(address),
            HostOp::SetNumVfs(n) => host.set_num_vfs(address, *n),
            HostOp::SetVgpuType(t) => host.set_vgpu_type(address, *t),
            HostOp::CreateMdev { type_id, uuid } => host.create_mdev(address, type_id, uuid),
            HostOp::RemoveMdev(uuid) => host.remove_mdev(address, uuid),
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source of truth about PCI devices: the real sysfs or the simulated kernel.
pub trait Host: Send + Sync + 'static {
    /// One line for logs and `--help`-level diagnostics: which host this is.
    fn describe(&self) -> String;

    /// Every PCI function on the host, sorted by address.
    fn devices(&self) -> Result<Vec<HostDevice>, HostError>;

    /// One function; `Ok(None)` when no such device exists (unplugged or never there).
    fn device(&self, address: PciAddress) -> Result<Option<HostDevice>, HostError>;

    /// The devices in an IOMMU group, sorted by address.
    fn group_members(&self, group: u32) -> Result<Vec<HostDevice>, HostError>;

    /// Whether this host is a virtual machine (a hypervisor is visible), so
    /// a missing IOMMU means a VM without a virtual IOMMU, not firmware
    /// settings.
    fn virtual_machine(&self) -> bool;

    /// *(issue 28)* The kernel command line (`/proc/cmdline`), at most
    /// 4 KiB of it; empty when it cannot be read.
    fn kernel_cmdline(&self) -> String;

    /// *(issue 28)* The `alias vfio_pci:` lines of the running kernel's
    /// `modules.alias`; empty when there is none.
    fn vfio_aliases(&self) -> String;

    /// How the host uses each of its functions (mounts, swap, routed
    /// interfaces, open device nodes), walking /proc until `deadline`;
    /// functions it does not use are absent.
    fn usage(&self, deadline: std::time::Instant) -> usage::Walked;

    /// *(issue 29)* The function's AER error totals; `Ok(None)` when the
    /// kernel shows none (no AER capability, no AER driver, not present).
    fn aer(&self, address: PciAddress) -> Result<Option<aer::AerCounts>, HostError>;

    /// Whether `drivers/<name>` exists.
    fn driver_loaded(&self, driver: &str) -> bool;

    /// Tries once to load a driver module (`modprobe`); true when it is loaded
    /// afterwards.
    fn load_driver(&self, driver: &str) -> bool;

    /// `driver_override`: `Some(driver)` sets it, `None` clears it.
    fn set_override(&self, address: PciAddress, driver: Option<&str>) -> Result<(), HostError>;

    /// `drivers/<driver>/unbind`.
    fn unbind(&self, address: PciAddress, driver: &str) -> Result<(), HostError>;

    /// `drivers/<driver>/bind`.
    fn bind(&self, address: PciAddress, driver: &str) -> Result<(), HostError>;

    /// `drivers_probe`.
    fn probe(&self, address: PciAddress) -> Result<(), HostError>;

    /// *(issue 26)* `sriov_numvfs`: the kernel makes (or removes) the
    /// virtual functions before the write returns, and sends their uevents.
    fn set_num_vfs(&self, address: PciAddress, count: u32) -> Result<(), HostError>;

    /// *(issue 26)* Where vGPUs are made on `parent` (its virtual functions,
    /// or itself for an mdev parent), and what each offers and carries now.
    fn vgpu_slots(&self, parent: &HostDevice) -> Result<Vec<vgpu::Slot>, HostError>;

    /// *(issue 26)* vendor-VFIO: writes `type_id` (0 frees it) to the
    /// function's `nvidia/current_vgpu_type`.
    fn set_vgpu_type(&self, function: PciAddress, type_id: u32) -> Result<(), HostError>;

    /// *(issue 26)* vendor-VFIO: the function's `current_vgpu_type`; `None`
    /// for 0.
    fn current_vgpu_type(&self, function: PciAddress) -> Result<Option<u32>, HostError>;

    /// *(issue 26)* mdev: writes `uuid` to the function's type's `create`.
    fn create_mdev(&self, function: PciAddress, type_id: &str, uuid: &str)
        -> Result<(), HostError>;

    /// *(issue 26)* mdev: writes 1 to `bus/mdev/devices/<uuid>/remove` (the
    /// mdev on `function`).
    fn remove_mdev(&self, function: PciAddress, uuid: &str) -> Result<(), HostError>;

    /// *(issue 26)* mdev: whether `bus/mdev/devices/<uuid>` exists.
    fn mdev_exists(&self, uuid: &str) -> Result<bool, HostError>;

    /// *(issue 26)* The device nodes a VMM opens for a vGPU on `function`
    /// (its mdev's, if `mdev`): `/dev/vfio/devices/vfioN` where the kernel
    /// offers the VFIO cdev, else `/dev/vfio/<group>`.
    fn vfio_nodes(
        &self,
        function: PciAddress,
        mdev: Option<&str>,
    ) -> Result<Vec<String>, HostError>;

    /// *(issue 26)* Who holds these VFIO nodes open, walking /proc until
    /// `deadline`; `Err` (why) when that could not be established.
    fn vfio_holders(
        &self,
        nodes: &[String],
        deadline: std::time::Instant,
    ) -> Result<Vec<String>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acs_override_and_reset_methods_are_read_as_the_kernel_writes_them() {
        assert!(acs_override(
            "BOOT_IMAGE=/vmlinuz ro pcie_acs_override=downstream,multifunction quiet\n"
        ));
        assert!(!acs_override("ro quiet intel_iommu=on"));
        assert!(!acs_override("xpcie_acs_override=downstream"));
        assert_eq!(reset_methods("flr bus\n"), "flr bus");
        assert_eq!(reset_methods("\n"), "");
        assert_eq!(
            reset_methods("device_specific  af_flr\tpm"),
            "device_specific af_flr pm"
        );
        assert_eq!(reset_methods("flr ../../x \u{1b}[31m bus"), "flr bus");
    }
}
