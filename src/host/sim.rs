//! The simulated host: a kernel's PCI bookkeeping in memory, described by a fixture.
//!
//! It exists so that everything above the [`Host`] trait can be run and tested on a
//! machine whose own PCI devices must never be touched. It keeps the same facts the
//! kernel keeps (DESIGN.md section 4): drivers with id tables, devices with their
//! bound driver, override and IOMMU group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

use super::{Host, HostDevice, HostError};
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
    #[serde(default, rename = "driver")]
    pub drivers: Vec<FixtureDriver>,
    #[serde(default, rename = "device")]
    pub devices: Vec<FixtureDevice>,
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
    pub drivers: BTreeMap<String, SimDriver>,
    pub devices: BTreeMap<PciAddress, HostDevice>,
}

pub struct SimHost {
    source: PathBuf,
    state: Mutex<SimState>,
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
            };
            if devices.insert(address, device).is_some() {
                return Err(invalid(format!("device {address} is listed twice")));
            }
        }
        Ok(SimState { drivers, devices })
    }
}

impl SimHost {
    /// Boots a simulated host from a fixture file.
    pub fn from_file(path: &Path) -> Result<Self, FixtureError> {
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let state = Fixture::parse(path, &text)?.into_state(path)?;
        Ok(SimHost {
            source: path.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        // The state is plain data; a panic elsewhere cannot leave it half-written
        // in a way that matters more than losing the whole host would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Host for SimHost {
    fn describe(&self) -> String {
        format!("simulated host from {}", self.source.display())
    }

    fn devices(&self) -> Result<Vec<HostDevice>, HostError> {
        Ok(self.state().devices.values().cloned().collect())
    }

    fn device(&self, address: PciAddress) -> Result<Option<HostDevice>, HostError> {
        Ok(self.state().devices.get(&address).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hosts")
    }

    #[test]
    fn shipped_fixtures_load() {
        for name in ["l4.toml", "desktop.toml", "no-iommu.toml"] {
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
