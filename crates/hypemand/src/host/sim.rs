//! The simulated host: a kernel's PCI bookkeeping in memory, described by a fixture.
//!
//! It exists so that everything above the [`Host`] trait can be run and tested on a
//! machine whose own PCI devices must never be touched. It keeps the same facts the
//! kernel keeps (DESIGN.md section 4): drivers with id tables, devices with their
//! bound driver, override and IOMMU group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::usage::{parse_route, route_counts, Usage, Use};
use super::{errno_by_name, EventKind, EventSink, Host, HostDevice, HostError, HostEvent, Op};
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
    #[serde(default)]
    pub description: String,
    /// The host is a virtual machine (for the no-IOMMU message).
    #[serde(default)]
    pub virtual_machine: bool,
    #[serde(default, rename = "driver")]
    pub drivers: Vec<FixtureDriver>,
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
    #[serde(default)]
    pub block: Vec<FixtureBlock>,
    #[serde(default)]
    pub interface: Vec<FixtureInterface>,
    #[serde(default)]
    pub open_by: Vec<FixtureOpen>,
}

/// One id-table entry: a vendor and, optionally, a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMatch {
    pub vendor: u16,
    pub device: Option<u16>,
}

impl IdMatch {
    fn parse(s: &str) -> Option<Self> {
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
}

/// The simulated kernel's state.
#[derive(Debug, Clone)]
pub struct SimState {
    pub virtual_machine: bool,
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
}

impl Fixture {
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
            };
            if drivers.insert(d.name.clone(), driver).is_some() {
                return Err(invalid(format!("driver {} is listed twice", d.name)));
            }
        }
        let mut devices = BTreeMap::new();
        let mut usage = Usage::new();
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
                if !super::usage::is_node(&o.node) {
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
            };
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
        let mut groups: BTreeMap<u32, Vec<PciAddress>> = BTreeMap::new();
        for (address, d) in &devices {
            if let Some(g) = d.iommu_group {
                groups.entry(g).or_default().push(*address);
            }
        }
        Ok(SimState {
            virtual_machine: self.virtual_machine,
            drivers,
            devices,
            unplugged: BTreeMap::new(),
            usage,
            services,
            groups,
        })
    }
}

/// What an injected fault does to one operation on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The write fails with this errno and changes nothing.
    Errno(i32),
    /// The write blocks (past any deadline) until faults are cleared, then fails
    /// with EINTR and changes nothing.
    Stall,
    /// For `unbind`: the unbind happens, then the device's native driver grabs it
    /// straight back, as a racing probe would.
    Grab,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultKind::Errno(e) => f.write_str(super::errno_name(*e).unwrap_or("errno")),
            FaultKind::Stall => f.write_str("stall"),
            FaultKind::Grab => f.write_str("grab"),
        }
    }
}

impl FaultKind {
    /// `ENODEV`, `EBUSY`, ... (see [`super::ERRNOS`]), `stall` or `grab`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stall" => Some(FaultKind::Stall),
            "grab" => Some(FaultKind::Grab),
            _ => errno_by_name(s).map(FaultKind::Errno),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub op: Op,
    pub address: PciAddress,
    pub kind: FaultKind,
}

/// The longest a stalled write blocks when nobody clears the fault.
const STALL_LIMIT: Duration = Duration::from_secs(120);

const ENOENT: i32 = 2;
const EINTR: i32 = 4;
const EBUSY: i32 = 16;
const ENODEV: i32 = 19;

/// What survives a daemon restart of the simulated host (not a reboot).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    loaded: BTreeMap<String, bool>,
    devices: BTreeMap<String, SavedDevice>,
    #[serde(default)]
    unplugged: Vec<String>,
    /// Service name -> active.
    #[serde(default)]
    services: BTreeMap<String, bool>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedDevice {
    driver: Option<String>,
    driver_override: Option<String>,
}

pub struct SimHost {
    source: PathBuf,
    state: Mutex<SimState>,
    faults: Mutex<Vec<Fault>>,
    /// Wakes stalled writes when faults are cleared.
    faults_cleared: Condvar,
    /// Where the kernel state is kept between daemon runs, if anywhere.
    state_file: Option<PathBuf>,
    /// Where hotplug events go (the daemon's event path), once connected.
    sink: Mutex<Option<EventSink>>,
    /// Wakes an unbind waiting for a service to let go of its device.
    state_changed: Condvar,
    /// Every write attempted and every service stopped or started, in order,
    /// for tests (Simulator1.Journal); bounded.
    journal: Mutex<std::collections::VecDeque<String>>,
}

/// The most journal entries kept (the oldest go first).
const JOURNAL_LIMIT: usize = 4096;

impl SimHost {
    /// Boots a simulated host from a fixture file.
    pub fn from_file(path: &Path) -> Result<Self, FixtureError> {
        Self::open(path, None)
    }

    /// Boots from `fixture`, or, when `state_file` holds a saved state, resumes
    /// the host as it was (a daemon restart is not a reboot). Every change is
    /// saved there. Deleting the file is a reboot.
    pub fn open(fixture: &Path, state_file: Option<&Path>) -> Result<Self, FixtureError> {
        let text = std::fs::read_to_string(fixture).map_err(|source| FixtureError::Read {
            path: fixture.to_path_buf(),
            source,
        })?;
        let mut state = Fixture::parse(fixture, &text)?.into_state(fixture)?;
        if let Some(file) = state_file {
            if let Ok(bytes) = std::fs::read(file) {
                let saved: Saved =
                    serde_json::from_slice(&bytes).map_err(|e| FixtureError::Parse {
                        path: file.to_path_buf(),
                        message: e.to_string(),
                    })?;
                for (name, loaded) in saved.loaded {
                    if let Some(d) = state.drivers.get_mut(&name) {
                        d.loaded = loaded;
                    }
                }
                for addr in &saved.unplugged {
                    let Ok(a) = PciAddress::parse(addr) else {
                        continue;
                    };
                    if let Some(d) = state.devices.remove(&a) {
                        state.unplugged.insert(a, d);
                    }
                }
                for (name, active) in saved.services {
                    if let Some(sv) = state.services.get_mut(&name) {
                        sv.0 = active;
                    }
                }
                for (addr, sd) in saved.devices {
                    let Ok(a) = PciAddress::parse(&addr) else {
                        continue;
                    };
                    if let Some(d) = state.devices.get_mut(&a) {
                        d.driver = sd.driver;
                        d.driver_override = sd.driver_override;
                    }
                }
            }
        }
        Ok(SimHost {
            source: fixture.to_path_buf(),
            state: Mutex::new(state),
            faults: Mutex::new(Vec::new()),
            faults_cleared: Condvar::new(),
            state_file: state_file.map(Path::to_path_buf),
            sink: Mutex::new(None),
            state_changed: Condvar::new(),
            journal: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        // The state is plain data and every change to it is a single assignment,
        // so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, state: &SimState) {
        let Some(file) = &self.state_file else { return };
        let saved = Saved {
            loaded: state
                .drivers
                .iter()
                .map(|(n, d)| (n.clone(), d.loaded))
                .collect(),
            devices: state
                .devices
                .iter()
                .map(|(a, d)| {
                    let sd = SavedDevice {
                        driver: d.driver.clone(),
                        driver_override: d.driver_override.clone(),
                    };
                    (a.to_string(), sd)
                })
                .collect(),
            unplugged: state.unplugged.keys().map(ToString::to_string).collect(),
            services: state
                .services
                .iter()
                .map(|(n, (active, _))| (n.clone(), *active))
                .collect(),
        };
        let tmp = file.with_extension("tmp");
        let result = serde_json::to_vec(&saved)
            .map_err(std::io::Error::from)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = result {
            tracing::warn!(path = %file.display(), error = %e, "cannot save the simulated host's state");
        }
    }

    fn note(&self, entry: String) {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        if j.len() >= JOURNAL_LIMIT {
            j.pop_front();
        }
        j.push_back(entry);
    }

    /// Every write attempted and every service stopped or started, oldest
    /// first: `unbind 0000:01:00.0 nvidia`, `stop nvidia-persistenced.service`.
    pub fn journal(&self) -> Vec<String> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// A declared service: `Some((active, main pid))`.
    pub fn unit(&self, name: &str) -> Option<(bool, u32)> {
        self.state().services.get(name).copied()
    }

    /// Stops or starts a declared service, as systemd would.
    pub fn set_unit(&self, name: &str, active: bool) -> Result<(), String> {
        let mut state = self.state();
        let Some(sv) = state.services.get_mut(name) else {
            return Err(format!("the simulated host has no service {name}"));
        };
        sv.0 = active;
        self.note(format!("{} {name}", if active { "start" } else { "stop" }));
        tracing::info!(
            holder_service = %name,
            active,
            "simulator: service state changed"
        );
        self.save(&state);
        drop(state);
        self.state_changed.notify_all();
        Ok(())
    }

    /// Whether an active service's process holds `address` open while
    /// `driver` has it: then the driver's unbind waits for it.
    fn held_by_service(state: &SimState, address: PciAddress, driver: &str) -> bool {
        let bound = driver != hypeman_api::VFIO_DRIVER
            && state
                .devices
                .get(&address)
                .is_some_and(|d| d.driver.as_deref() == Some(driver));
        let active: Vec<u32> = state
            .services
            .values()
            .filter(|(a, _)| *a)
            .map(|(_, pid)| *pid)
            .collect();
        bound
            && state.usage.get(&address).is_some_and(|uses| {
                uses.iter()
                    .any(|u| matches!(u, Use::OpenBy { pid, .. } if active.contains(pid)))
            })
    }

    /// Connects the event path; events before this are not delivered.
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    fn emit(&self, kind: EventKind, address: PciAddress) {
        if let Some(sink) = &*self.sink.lock().unwrap_or_else(|p| p.into_inner()) {
            sink(HostEvent::new(kind, address));
        }
    }

    /// Hot-removes a device: its driver lets go (`unbind`), then it leaves the
    /// bus (`remove`).
    pub fn unplug(&self, address: PciAddress) -> Result<(), String> {
        let had_driver = {
            let mut state = self.state();
            let Some(dev) = state.devices.remove(&address) else {
                return Err(format!("{address} is not on the simulated host"));
            };
            let had = dev.driver.is_some();
            state.unplugged.insert(address, dev);
            self.save(&state);
            had
        };
        tracing::info!(pci_address = %address, "simulator: unplugged");
        if had_driver {
            self.emit(EventKind::Unbind, address);
        }
        self.emit(EventKind::Remove, address);
        Ok(())
    }

    /// Hot-adds a device that was unplugged: it appears (`add`) with no driver
    /// and no override, then its native driver probes it (`bind`), as the
    /// kernel would.
    pub fn plug(&self, address: PciAddress) -> Result<(), String> {
        let native = {
            let mut state = self.state();
            let Some(mut dev) = state.unplugged.remove(&address) else {
                return Err(format!(
                    "{address} is not unplugged (plug only brings back an unplugged device)"
                ));
            };
            dev.driver = None;
            dev.driver_override = None;
            let native = Self::matching_driver(&state, &dev);
            state.devices.insert(address, dev);
            self.save(&state);
            native
        };
        tracing::info!(pci_address = %address, "simulator: plugged");
        self.emit(EventKind::Add, address);
        if let Some(n) = native {
            if let Some(d) = self.state().devices.get_mut(&address) {
                if d.driver.is_none() {
                    d.driver = Some(n);
                }
            }
            self.save(&self.state());
            self.emit(EventKind::Bind, address);
        }
        Ok(())
    }

    /// An outside actor binds `driver` (as `echo ADDR > drivers/X/bind` would,
    /// after unbinding the current driver).
    pub fn driver_bind(&self, address: PciAddress, driver: &str) -> Result<(), HostError> {
        let current = self
            .device(address)?
            .ok_or(HostError::NoDevice(address))?
            .driver;
        if let Some(c) = current {
            if c == driver {
                return Ok(());
            }
            self.unbind(address, &c)?;
            self.emit(EventKind::Unbind, address);
        }
        if let Err(e) = self.bind(address, driver) {
            // The way driverctl does it: an override makes the driver take a
            // device its id table does not list (vfio-pci has none).
            let HostError::Write { errno: ENODEV, .. } = e else {
                return Err(e);
            };
            self.set_override(address, Some(driver))?;
            self.bind(address, driver)?;
        }
        self.emit(EventKind::Bind, address);
        Ok(())
    }

    /// Adds a fault; it stays until [`SimHost::clear_faults`].
    pub fn inject(&self, fault: Fault) {
        tracing::info!(op = %fault.op, pci_address = %fault.address, kind = %fault.kind, "simulator: fault injected");
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    /// Removes every fault and releases stalled writes.
    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.faults_cleared.notify_all();
    }

    fn fault(&self, op: Op, address: PciAddress) -> Option<FaultKind> {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults
            .iter()
            .find(|f| f.op == op && f.address == address)
            .map(|f| f.kind.clone())
    }

    /// Applies an injected errno or stall before an operation. `Ok` means go on.
    fn before(
        &self,
        op: Op,
        address: PciAddress,
        path: &str,
        value: &str,
    ) -> Result<Option<FaultKind>, HostError> {
        let fail = |errno| HostError::Write {
            path: path.to_string(),
            value: value.to_string(),
            errno,
        };
        self.note(format!("{op} {address} {value}").trim_end().to_string());
        match self.fault(op, address) {
            Some(FaultKind::Errno(e)) => Err(fail(e)),
            Some(FaultKind::Stall) => {
                tracing::info!(%op, pci_address = %address, "simulator: write stalled");
                let started = Instant::now();
                let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
                while faults
                    .iter()
                    .any(|f| f.op == op && f.address == address && f.kind == FaultKind::Stall)
                    && started.elapsed() < STALL_LIMIT
                {
                    faults = match self
                        .faults_cleared
                        .wait_timeout(faults, Duration::from_millis(200))
                    {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
                Err(fail(EINTR))
            }
            other => Ok(other),
        }
    }

    /// The first loaded driver whose id table matches (what a probe without an
    /// override picks).
    fn matching_driver(state: &SimState, d: &HostDevice) -> Option<String> {
        state
            .drivers
            .iter()
            .find(|(_, drv)| drv.loaded && drv.ids.iter().any(|m| m.matches(d.vendor, d.device)))
            .map(|(n, _)| n.clone())
    }

    fn loaded(state: &SimState, driver: &str) -> bool {
        state.drivers.get(driver).is_some_and(|d| d.loaded)
    }
}

impl Host for SimHost {
    fn describe(&self) -> String {
        match &self.state_file {
            Some(f) => format!(
                "simulated host from {} (state kept in {})",
                self.source.display(),
                f.display()
            ),
            None => format!("simulated host from {}", self.source.display()),
        }
    }

    fn virtual_machine(&self) -> bool {
        self.state().virtual_machine
    }

    fn devices(&self) -> Result<Vec<HostDevice>, HostError> {
        Ok(self.state().devices.values().cloned().collect())
    }

    fn device(&self, address: PciAddress) -> Result<Option<HostDevice>, HostError> {
        Ok(self.state().devices.get(&address).cloned())
    }

    fn group_members(&self, group: u32) -> Result<Vec<HostDevice>, HostError> {
        let state = self.state();
        let Some(members) = state.groups.get(&group) else {
            return Ok(Vec::new());
        };
        Ok(members
            .iter()
            .filter_map(|a| state.devices.get(a))
            .filter(|d| d.iommu_group == Some(group))
            .cloned()
            .collect())
    }

    fn usage(&self, _deadline: std::time::Instant) -> super::usage::Walked {
        // Mounts, interfaces and open nodes exist only while the device's own
        // driver has it; a stopped service's process holds nothing.
        let state = self.state();
        let stopped: Vec<u32> = state
            .services
            .values()
            .filter(|(a, _)| !*a)
            .map(|(_, pid)| *pid)
            .collect();
        let usage = state
            .usage
            .keys()
            .filter_map(|a| {
                let d = state.devices.get(a)?;
                let own = d
                    .driver
                    .as_deref()
                    .is_some_and(|n| n != hypeman_api::VFIO_DRIVER);
                let uses: Vec<Use> = state
                    .usage
                    .get(a)?
                    .iter()
                    .filter(|u| !matches!(u, Use::OpenBy { pid, .. } if stopped.contains(pid)))
                    .cloned()
                    .collect();
                (own && !uses.is_empty()).then_some((*a, uses))
            })
            .collect();
        super::usage::Walked {
            usage,
            ..Default::default()
        }
    }

    fn driver_loaded(&self, driver: &str) -> bool {
        Self::loaded(&self.state(), driver)
    }

    fn load_driver(&self, driver: &str) -> bool {
        let mut state = self.state();
        let Some(d) = state.drivers.get_mut(driver) else {
            return false;
        };
        if !d.loaded && d.loadable {
            d.loaded = true;
            tracing::info!(driver = %driver, "simulator: module loaded");
            self.save(&state);
        }
        Self::loaded(&state, driver)
    }

    fn set_override(&self, address: PciAddress, driver: Option<&str>) -> Result<(), HostError> {
        let op = if driver.is_some() {
            Op::SetOverride
        } else {
            Op::ClearOverride
        };
        let path = format!("devices/{address}/driver_override");
        self.before(op, address, &path, driver.unwrap_or(""))?;
        let mut state = self.state();
        let d = state.devices.get_mut(&address).ok_or(HostError::Write {
            path,
            value: driver.unwrap_or("").into(),
            errno: ENOENT,
        })?;
        d.driver_override = driver.map(str::to_string);
        self.save(&state);
        Ok(())
    }

    fn unbind(&self, address: PciAddress, driver: &str) -> Result<(), HostError> {
        let path = format!("bus/pci/drivers/{driver}/unbind");
        let fault = self.before(Op::Unbind, address, &path, &address.to_string())?;
        let fail = |errno| HostError::Write {
            path: path.clone(),
            value: address.to_string(),
            errno,
        };
        let mut state = self.state();
        if !Self::loaded(&state, driver) {
            return Err(fail(ENOENT));
        }
        // The kernel's nvidia driver waits in remove() until the last holder
        // closes the device: so does this, until the service stops.
        let started = Instant::now();
        if Self::held_by_service(&state, address, driver) {
            tracing::info!(pci_address = %address, driver = %driver, "simulator: unbind waits for the service holding the device");
        }
        while Self::held_by_service(&state, address, driver) {
            if started.elapsed() >= STALL_LIMIT {
                return Err(fail(EINTR));
            }
            state = match self
                .state_changed
                .wait_timeout(state, Duration::from_millis(200))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        let d = state.devices.get(&address).ok_or_else(|| fail(ENODEV))?;
        if d.driver.as_deref() != Some(driver) {
            return Err(fail(ENODEV));
        }
        let grabber = match fault {
            Some(FaultKind::Grab) => Self::matching_driver(&state, d),
            _ => None,
        };
        let grabbed = grabber.is_some();
        if let Some(d) = state.devices.get_mut(&address) {
            d.driver = None;
            if let Some(g) = grabber {
                tracing::info!(pci_address = %address, driver = %g, "simulator: driver grabbed the device back");
                d.driver = Some(g);
            }
        }
        self.save(&state);
        drop(state);
        if grabbed {
            self.emit(EventKind::Bind, address);
        }
        Ok(())
    }

    fn bind(&self, address: PciAddress, driver: &str) -> Result<(), HostError> {
        let path = format!("bus/pci/drivers/{driver}/bind");
        self.before(Op::Bind, address, &path, &address.to_string())?;
        let fail = |errno| HostError::Write {
            path: path.clone(),
            value: address.to_string(),
            errno,
        };
        let mut state = self.state();
        if !Self::loaded(&state, driver) {
            return Err(fail(ENOENT));
        }
        let ids_match = {
            let d = state.devices.get(&address).ok_or_else(|| fail(ENODEV))?;
            if d.driver.is_some() {
                return Err(fail(EBUSY));
            }
            match &d.driver_override {
                Some(o) => o == driver,
                None => state
                    .drivers
                    .get(driver)
                    .is_some_and(|drv| drv.ids.iter().any(|m| m.matches(d.vendor, d.device))),
            }
        };
        if !ids_match {
            return Err(fail(ENODEV));
        }
        if let Some(d) = state.devices.get_mut(&address) {
            d.driver = Some(driver.to_string());
        }
        self.save(&state);
        Ok(())
    }

    fn probe(&self, address: PciAddress) -> Result<(), HostError> {
        let path = "bus/pci/drivers_probe".to_string();
        self.before(Op::Probe, address, &path, &address.to_string())?;
        let mut state = self.state();
        let d = state.devices.get(&address).ok_or(HostError::Write {
            path,
            value: address.to_string(),
            errno: ENODEV,
        })?;
        if d.driver.is_some() {
            return Ok(());
        }
        let chosen = match &d.driver_override {
            Some(o) => Self::loaded(&state, o).then(|| o.clone()),
            None => Self::matching_driver(&state, d),
        };
        if let Some(c) = chosen {
            if let Some(d) = state.devices.get_mut(&address) {
                d.driver = Some(c);
            }
            self.save(&state);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hosts")
    }

    #[test]
    fn shipped_fixtures_load() {
        for name in [
            "l4.toml",
            "desktop.toml",
            "no-iommu.toml",
            "workstation.toml",
        ] {
            let host = SimHost::from_file(&examples().join(name)).unwrap_or_else(|e| panic!("{e}"));
            let state = host.state().clone();
            assert!(
                state
                    .drivers
                    .get("vfio-pci")
                    .is_some_and(|d| d.loaded && d.ids.is_empty()),
                "{name}: vfio-pci must be available and have no id table"
            );
            assert!(!state.devices.is_empty());
        }
        let l4 = SimHost::from_file(&examples().join("l4.toml")).unwrap();
        let gpu = l4
            .device(PciAddress::parse("0000:a2:00.0").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (gpu.vendor, gpu.device, gpu.class),
            (0x10de, 0x27b8, 0x030200)
        );
        assert_eq!(gpu.iommu_group, Some(82));
        assert_eq!(gpu.driver.as_deref(), Some("nvidia"));
        let no = SimHost::from_file(&examples().join("no-iommu.toml")).unwrap();
        assert!(no
            .devices()
            .unwrap()
            .iter()
            .all(|d| d.iommu_group.is_none()));
    }

    #[test]
    fn bad_fixtures_are_refused_with_the_reason() {
        let p = Path::new("t.toml");
        let cases = [
            ("[[device]]\naddress = \"0000:a2:00.0/..\"\nvendor=\"10de\"\ndevice=\"1\"\nclass=\"0\"", "invalid PCI address"),
            ("[[device]]\naddress = \"a2:00.0\"\nvendor=\"zz\"\ndevice=\"1\"\nclass=\"0\"", "vendor"),
            ("[[device]]\naddress = \"a2:00.0\"\nvendor=\"10de\"\ndevice=\"1\"\nclass=\"0\"\ndriver=\"nv\"", "not listed"),
            ("[[driver]]\nname=\"x\"\nids=[\"10de\"]", "vvvv:dddd"),
            ("[[driver]]\nname=\"x\"\n[[driver]]\nname=\"x\"", "twice"),
            ("bogus = 1", "not valid"),
        ];
        for (text, want) in cases {
            let err = Fixture::parse(p, text)
                .and_then(|f| f.into_state(p))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn id_tables_match() {
        let m = IdMatch::parse("10de:*").unwrap();
        assert!(m.matches(0x10de, 0x27b8));
        assert!(!m.matches(0x8086, 0x27b8));
        let exact = IdMatch::parse("8086:1572").unwrap();
        assert!(exact.matches(0x8086, 0x1572) && !exact.matches(0x8086, 0x1573));
    }
}
