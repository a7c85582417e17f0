//! The fixture: a host described in TOML (`examples/hosts`), parsed and
//! checked, then turned into the simulated kernel's starting state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::host::usage::{parse_route, route_counts, Usage, Use};
use crate::host::HostDevice;
use crate::pci::sysfs::parse_hex;
use crate::pci::PciAddress;

/// Why a fixture cannot be used. Names the file and the entry at fault.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read fixture {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fixture {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("fixture {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The fixture file, as written by people.
///
/// ```toml
/// [[driver]]
/// name = "nvidia"
/// ids = ["10de:*"]          # vendor:device, `*` for any device
///
/// [[driver]]
/// name = "vfio-pci"         # no id table: binds only through driver_override
///
/// [[device]]
/// address = "0000:a2:00.0"
/// vendor = "10de"
/// device = "27b8"
/// class = "030200"
/// iommu_group = 82
/// driver = "nvidia"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// What the host is, for people.
    #[serde(default)]
    pub description: String,
    /// The host is a virtual machine (for the no-IOMMU message).
    #[serde(default)]
    pub virtual_machine: bool,
    /// *(issue 28)* The kernel command line (`/proc/cmdline`).
    #[serde(default)]
    pub kernel_cmdline: String,
    /// *(issue 28)* The kernel offers the VFIO device cdev (6.2+): a
    /// function on a vfio driver has `vfio-dev/vfioN`.
    #[serde(default)]
    pub vfio_cdev: bool,
    /// *(issue 28)* The running kernel's `modules.alias` lines (the
    /// `alias vfio_pci:` ones name the vfio variant drivers).
    #[serde(default)]
    pub modules_alias: String,
    /// The drivers the kernel has (`[[driver]]`).
    #[serde(default, rename = "driver")]
    pub drivers: Vec<FixtureDriver>,
    /// The PCI functions (`[[device]]`).
    #[serde(default, rename = "device")]
    pub devices: Vec<FixtureDevice>,
    /// systemd services that hold devices open (nvidia-persistenced).
    #[serde(default, rename = "service")]
    pub services: Vec<FixtureService>,
}

/// A service that holds devices open: while it is active, unbinding a
/// device its process holds blocks, as the kernel's nvidia driver does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureService {
    pub name: String,
    #[serde(default = "yes")]
    pub active: bool,
    /// Its main process; the device nodes it holds are listed under the
    /// devices' `open_by` with this pid.
    pub pid: u32,
}

/// A block device under a function, as `[[device.block]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureBlock {
    /// `nvme0n1p2`, `dm-0`: shown as `/dev/NAME`.
    pub name: String,
    #[serde(default)]
    pub mounts: Vec<String>,
    #[serde(default)]
    pub swap: bool,
}

/// A network interface under a function, as `[[device.interface]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureInterface {
    pub name: String,
    #[serde(default)]
    pub up: bool,
    /// Route destinations: `default`, `10.0.0.0/8`, `fe80::/64`.
    #[serde(default)]
    pub routes: Vec<String>,
}

/// A process holding one of the function's device nodes, as `[[device.open_by]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureOpen {
    pub pid: u32,
    pub comm: String,
    pub node: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureDriver {
    pub name: String,
    /// `vvvv:dddd` or `vvvv:*`.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Whether the module is loaded at boot (`drivers/<name>` exists).
    #[serde(default = "yes")]
    pub loaded: bool,
    /// Whether `modprobe` could load it when it is not loaded.
    #[serde(default = "yes")]
    pub loadable: bool,
    /// *(issue 26)* Whether it configures SR-IOV through `sriov_numvfs` (the
    /// kernel's `sriov_configure`): true for NIC drivers and `pci-pf-stub`,
    /// false for `nvidia` (hence NVIDIA's `sriov-manage`); never for
    /// `vfio-pci`, which needs its `enable_sriov` parameter.
    #[serde(default = "yes")]
    pub sriov_configure: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureDevice {
    pub address: String,
    pub vendor: String,
    pub device: String,
    pub class: String,
    #[serde(default)]
    pub subsystem_vendor: Option<String>,
    #[serde(default)]
    pub subsystem_device: Option<String>,
    #[serde(default)]
    pub iommu_group: Option<u32>,
    #[serde(default)]
    pub driver: Option<String>,
    /// The NUMA node (sysfs `numa_node`); absent or -1 for none.
    #[serde(default)]
    pub numa_node: Option<i32>,
    /// The firmware's console is on this device (sysfs `boot_vga`).
    #[serde(default)]
    pub boot_vga: bool,
    /// *(issue 28)* Its `reset_method` (`"flr bus"`; `""`: the kernel
    /// cannot reset it); absent: the kernel does not say.
    #[serde(default)]
    pub reset_method: Option<String>,
    /// *(issue 26)* A physical function's `sriov_totalvfs`.
    #[serde(default)]
    pub sriov_total_vfs: Option<u32>,
    /// Its `sriov_numvfs`: as many functions must name it as `physfn`.
    #[serde(default)]
    pub sriov_vfs: Option<u32>,
    /// Its `sriov_vf_device` (hex).
    #[serde(default)]
    pub sriov_vf_device: Option<String>,
    /// Its `sriov_offset` (default 1): where its virtual functions are.
    #[serde(default)]
    pub sriov_offset: Option<u16>,
    /// Its `sriov_stride` (default 1).
    #[serde(default)]
    pub sriov_stride: Option<u16>,
    /// A virtual function's physical function (its `physfn` link).
    #[serde(default)]
    pub physfn: Option<String>,
    #[serde(default)]
    pub block: Vec<FixtureBlock>,
    #[serde(default)]
    pub interface: Vec<FixtureInterface>,
    #[serde(default)]
    pub open_by: Vec<FixtureOpen>,
    /// *(issue 26)* The vGPU framework of this GPU: `vendor-vfio` (its
    /// virtual functions get `nvidia/current_vgpu_type`) or `mdev`.
    #[serde(default)]
    pub vgpu_framework: Option<String>,
    /// The GPU's framebuffer in MiB (what its vGPUs share).
    #[serde(default)]
    pub framebuffer_mb: Option<u64>,
    /// The vGPU types its driver supports (`[[device.vgpu_type]]`).
    #[serde(default)]
    pub vgpu_type: Vec<FixtureVgpuType>,
}

/// One vGPU type of a GPU, as `[[device.vgpu_type]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureVgpuType {
    /// The driver's id: a number for vendor-VFIO, `nvidia-NNN` for mdev.
    pub id: String,
    /// The profile name: `NVIDIA L40S-4Q`.
    pub name: String,
    pub framebuffer_mb: u64,
}

/// *(issue 26)* A GPU's vGPU support in the simulated driver.
#[derive(Debug, Clone)]
pub struct SimVgpu {
    pub framework: crate::host::vgpu::Framework,
    pub framebuffer_mb: u64,
    /// (id, name, framebuffer in MiB), in the fixture's order.
    pub types: Vec<(String, String, u64)>,
}

/// One id-table entry: a vendor and, optionally, a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMatch {
    pub vendor: u16,
    pub device: Option<u16>,
}

impl IdMatch {
    pub(super) fn parse(s: &str) -> Option<Self> {
        let (v, d) = s.split_once(':')?;
        Some(IdMatch {
            vendor: parse_hex(v, 0xffff)? as u16,
            device: if d == "*" {
                None
            } else {
                Some(parse_hex(d, 0xffff)? as u16)
            },
        })
    }

    pub fn matches(&self, vendor: u16, device: u16) -> bool {
        self.vendor == vendor && self.device.is_none_or(|d| d == device)
    }
}

#[derive(Debug, Clone)]
pub struct SimDriver {
    pub ids: Vec<IdMatch>,
    pub loaded: bool,
    pub loadable: bool,
    /// Writing `sriov_numvfs` works while it has the physical function.
    pub sriov_configure: bool,
}

/// The simulated kernel's state.
#[derive(Debug, Clone)]
pub struct SimState {
    pub virtual_machine: bool,
    pub kernel_cmdline: String,
    pub modules_alias: String,
    pub vfio_cdev: bool,
    pub drivers: BTreeMap<String, SimDriver>,
    pub devices: BTreeMap<PciAddress, HostDevice>,
    /// Devices taken off the bus by `unplug`, kept so `plug` can bring them back.
    pub unplugged: BTreeMap<PciAddress, HostDevice>,
    /// How the host uses each device while its own driver has it.
    pub usage: Usage,
    /// Services by unit name: (active, main pid).
    pub services: BTreeMap<String, (bool, u32)>,
    /// Every function of each IOMMU group, plugged or not (groups never
    /// change): a group is read in the time of its size, as a kernel reads
    /// one directory, not by walking every function.
    pub groups: BTreeMap<u32, Vec<PciAddress>>,
    /// *(issue 26)* GPUs with vGPU support, by address.
    pub vgpu: BTreeMap<PciAddress, SimVgpu>,
    /// vendor-VFIO: each virtual function's `current_vgpu_type` (absent: 0).
    pub vgpu_current: BTreeMap<PciAddress, String>,
    /// mdev: each mediated device by UUID: the function it is on, its type.
    pub mdevs: BTreeMap<String, (PciAddress, String)>,
    /// The last mdev number the simulator gave out (its UUIDs count up).
    pub next_mdev: u64,
    /// VFIO nodes a process holds open (a VMM), by node: (pid, comm).
    pub vfio_holders: BTreeMap<String, (u32, String)>,
    /// *(issue 29)* Each present function's AER totals (absent: none
    /// counted yet); set at run time (`Simulator1.SetAerCounters`), and
    /// gone with an unplug, as a new device's counters start at 0.
    pub aer: BTreeMap<PciAddress, crate::host::aer::AerCounts>,
}

impl Fixture {
    /// Parses `text`, read from `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Fixture, FixtureError> {
        toml::from_str(text).map_err(|e| FixtureError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Checks the fixture and turns it into a booted host's state.
    pub fn into_state(self, path: &Path) -> Result<SimState, FixtureError> {
        let invalid = |message: String| FixtureError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut drivers = BTreeMap::new();
        for d in self.drivers {
            if d.name.is_empty() || d.name.contains('/') {
                return Err(invalid(format!(
                    "driver name {:?} is not a valid module name",
                    d.name
                )));
            }
            let ids = d
                .ids
                .iter()
                .map(|s| {
                    IdMatch::parse(s).ok_or_else(|| {
                        invalid(format!(
                            "driver {}: id {s:?} is not vvvv:dddd or vvvv:*",
                            d.name
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let driver = SimDriver {
                ids,
                loaded: d.loaded,
                loadable: d.loadable,
                sriov_configure: d.sriov_configure && d.name != hypeman_api::VFIO_DRIVER,
            };
            if drivers.insert(d.name.clone(), driver).is_some() {
                return Err(invalid(format!("driver {} is listed twice", d.name)));
            }
        }
        let mut devices = BTreeMap::new();
        let mut usage = Usage::new();
        let mut vgpu = BTreeMap::new();
        for d in self.devices {
            let address = PciAddress::parse(&d.address).map_err(|e| invalid(e.to_string()))?;
            let hex = |field: &str, value: &str, max: u32| {
                parse_hex(value, max).ok_or_else(|| {
                    invalid(format!(
                        "device {address}: {field} {value:?} is not a hex number"
                    ))
                })
            };
            let opt_hex = |field: &str, value: &Option<String>| match value {
                Some(v) => hex(field, v, 0xffff).map(|n| n as u16),
                None => Ok(0),
            };
            if let Some(drv) = &d.driver {
                match drivers.get(drv) {
                    Some(info) if info.loaded => {}
                    Some(_) => {
                        return Err(invalid(format!(
                            "device {address}: driver {drv} is not loaded"
                        )))
                    }
                    None => {
                        return Err(invalid(format!(
                            "device {address}: driver {drv} is not listed"
                        )))
                    }
                }
            }
            let mut uses = Vec::new();
            for b in &d.block {
                if b.name.is_empty() || b.name.contains('/') {
                    return Err(invalid(format!(
                        "device {address}: block device name {:?} is not a /dev name",
                        b.name
                    )));
                }
                let device = format!("/dev/{}", b.name);
                if !b.mounts.is_empty() {
                    uses.push(Use::Mounted {
                        device: device.clone(),
                        mount_points: b.mounts.clone(),
                    });
                }
                if b.swap {
                    uses.push(Use::Swap { device });
                }
            }
            for i in &d.interface {
                let mut counts = false;
                for r in &i.routes {
                    let dest = parse_route(r).ok_or_else(|| {
                        invalid(format!(
                            "device {address}: interface {}: route {r:?} is not default or an address/prefix",
                            i.name
                        ))
                    })?;
                    counts |= route_counts(dest);
                }
                if i.up && counts {
                    uses.push(Use::NetworkActive {
                        interface: i.name.clone(),
                    });
                }
            }
            for o in &d.open_by {
                if !crate::host::usage::is_node(&o.node) {
                    return Err(invalid(format!(
                        "device {address}: {:?} is not a device node the daemon checks (/dev/dri/card*, /dev/dri/renderD*, /dev/nvidiaN, /dev/nvme*)",
                        o.node
                    )));
                }
                uses.push(Use::OpenBy {
                    pid: o.pid,
                    comm: o.comm.clone(),
                    node: o.node.clone(),
                });
            }
            if !uses.is_empty() {
                uses.sort();
                usage.insert(address, uses);
            }
            let device = HostDevice {
                address,
                vendor: hex("vendor", &d.vendor, 0xffff)? as u16,
                device: hex("device", &d.device, 0xffff)? as u16,
                class: hex("class", &d.class, 0xff_ffff)?,
                subsystem_vendor: opt_hex("subsystem_vendor", &d.subsystem_vendor)?,
                subsystem_device: opt_hex("subsystem_device", &d.subsystem_device)?,
                driver: d.driver,
                iommu_group: d.iommu_group,
                driver_override: None,
                numa_node: d.numa_node.and_then(|n| u32::try_from(n).ok()),
                boot_vga: d.boot_vga,
                reset_method: d.reset_method.as_deref().map(crate::host::reset_methods),
                vfio_dev: None,
                sriov: match d.sriov_total_vfs {
                    Some(total_vfs) => Some(crate::host::Sriov {
                        total_vfs,
                        num_vfs: d.sriov_vfs.unwrap_or(0),
                        vf_device: d
                            .sriov_vf_device
                            .as_ref()
                            .map(|v| hex("sriov_vf_device", v, 0xffff).map(|v| v as u16))
                            .transpose()?,
                        offset: match d.sriov_offset.unwrap_or(1) {
                            0 => {
                                return Err(invalid(format!(
                                    "device {address}: sriov_offset 0 would put the first VF on the physical function"
                                )))
                            }
                            o => o,
                        },
                        stride: d.sriov_stride.unwrap_or(1).max(1),
                    }),
                    None if d.sriov_vfs.is_some()
                        || d.sriov_vf_device.is_some()
                        || d.sriov_offset.is_some()
                        || d.sriov_stride.is_some() =>
                    {
                        return Err(invalid(format!(
                            "device {address}: sriov_vfs, sriov_vf_device, sriov_offset and sriov_stride need sriov_total_vfs"
                        )))
                    }
                    None => None,
                },
                physfn: d
                    .physfn
                    .as_deref()
                    .map(|p| {
                        PciAddress::parse(p)
                            .map_err(|e| invalid(format!("device {address}: physfn {p:?}: {e}")))
                    })
                    .transpose()?,
            };
            if let Some(fw) = &d.vgpu_framework {
                use crate::host::vgpu::{valid_type_id, Framework};
                let framework = match fw.as_str() {
                    "vendor-vfio" => Framework::VendorVfio,
                    "mdev" => Framework::Mdev,
                    other => {
                        return Err(invalid(format!(
                            "device {address}: vgpu_framework {other:?} is not vendor-vfio or mdev"
                        )))
                    }
                };
                let total = d.framebuffer_mb.ok_or_else(|| {
                    invalid(format!(
                        "device {address}: vgpu_framework needs framebuffer_mb"
                    ))
                })?;
                let mut types = Vec::new();
                for t in &d.vgpu_type {
                    let numeric = t.id.parse::<u32>().is_ok_and(|n| n != 0);
                    let ok = match framework {
                        Framework::VendorVfio => numeric,
                        Framework::Mdev => valid_type_id(&t.id),
                    };
                    if !ok
                        || t.name.trim().is_empty()
                        || t.framebuffer_mb == 0
                        || t.framebuffer_mb > total
                    {
                        return Err(invalid(format!(
                            "device {address}: vgpu_type {:?} needs a {} id, a name and a framebuffer_mb within the GPU's {total}",
                            t.id,
                            if framework == Framework::VendorVfio { "non-zero numeric" } else { "directory-name" }
                        )));
                    }
                    types.push((t.id.clone(), t.name.clone(), t.framebuffer_mb));
                }
                vgpu.insert(
                    address,
                    SimVgpu {
                        framework,
                        framebuffer_mb: total,
                        types,
                    },
                );
            } else if d.framebuffer_mb.is_some() || !d.vgpu_type.is_empty() {
                return Err(invalid(format!(
                    "device {address}: framebuffer_mb and vgpu_type need vgpu_framework"
                )));
            }
            if devices.insert(address, device).is_some() {
                return Err(invalid(format!("device {address} is listed twice")));
            }
        }
        let mut services = BTreeMap::new();
        for sv in self.services {
            if !sv.name.ends_with(".service") || sv.name.contains('/') {
                return Err(invalid(format!(
                    "service {:?} is not a unit name ending in .service",
                    sv.name
                )));
            }
            if services
                .insert(sv.name.clone(), (sv.active, sv.pid))
                .is_some()
            {
                return Err(invalid(format!("service {} is listed twice", sv.name)));
            }
        }
        // As the kernel keeps them: a virtual function's physical function
        // is a declared function with SR-IOV, and has exactly as many
        // virtual functions as its sriov_vfs says, within its total, each
        // where the kernel's arithmetic puts it.
        let mut vfs: BTreeMap<PciAddress, u32> = BTreeMap::new();
        for (address, d) in &devices {
            if let Some(pf) = d.physfn {
                let capable = devices.get(&pf).is_some_and(|p| p.sriov.is_some());
                if !capable {
                    return Err(invalid(format!(
                        "device {address}: physfn {pf} is not a declared function with sriov_total_vfs"
                    )));
                }
                *vfs.entry(pf).or_default() += 1;
            }
        }
        for (address, d) in &devices {
            if let Some(s) = d.sriov {
                let have = vfs.get(address).copied().unwrap_or(0);
                if s.num_vfs > s.total_vfs || s.num_vfs != have {
                    return Err(invalid(format!(
                        "device {address}: sriov_vfs is {}, sriov_total_vfs {}, and {have} functions name it as physfn",
                        s.num_vfs, s.total_vfs
                    )));
                }
                for vf in s.current_vfs(*address) {
                    if devices.get(&vf).and_then(|v| v.physfn) != Some(*address) {
                        return Err(invalid(format!(
                            "device {address}: its sriov_offset {} and sriov_stride {} put a virtual function at {vf}, which is not declared with physfn = \"{address}\"",
                            s.offset, s.stride
                        )));
                    }
                }
            }
        }
        let mut groups: BTreeMap<u32, Vec<PciAddress>> = BTreeMap::new();
        for (address, d) in &devices {
            if let Some(g) = d.iommu_group {
                groups.entry(g).or_default().push(*address);
            }
        }
        Ok(SimState {
            virtual_machine: self.virtual_machine,
            kernel_cmdline: self.kernel_cmdline.clone(),
            modules_alias: self.modules_alias.clone(),
            vfio_cdev: self.vfio_cdev,
            drivers,
            devices,
            unplugged: BTreeMap::new(),
            usage,
            services,
            groups,
            vgpu,
            vgpu_current: BTreeMap::new(),
            mdevs: BTreeMap::new(),
            next_mdev: 0,
            vfio_holders: BTreeMap::new(),
            aer: BTreeMap::new(),
        })
    }
}
