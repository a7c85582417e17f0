//! What survives a daemon restart of the simulated host (not a reboot): the
//! drivers loaded, each device's driver and override, what is unplugged,
//! which services run and how many virtual functions each physical function
//! has, kept in `--simulate-state`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{FixtureError, SimHost, SimState};
use crate::pci::PciAddress;

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
    /// *(issue 26)* Physical function -> `sriov_numvfs`.
    #[serde(default)]
    vfs: BTreeMap<String, u32>,
    /// *(issue 26)* Virtual function -> `current_vgpu_type`.
    #[serde(default)]
    vgpu_current: BTreeMap<String, String>,
    /// *(issue 26)* mdev UUID -> (function, type).
    #[serde(default)]
    mdevs: BTreeMap<String, (String, String)>,
    #[serde(default)]
    next_mdev: u64,
    /// *(issue 29)* Function -> AER totals.
    #[serde(default)]
    aer: BTreeMap<String, crate::host::aer::AerCounts>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedDevice {
    driver: Option<String>,
    driver_override: Option<String>,
}

/// Puts `state` back as `file` saved it; a missing file is a fresh boot.
pub(super) fn restore(state: &mut SimState, file: &Path) -> Result<(), FixtureError> {
    if let Ok(bytes) = std::fs::read(file) {
        let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| FixtureError::Parse {
            path: file.to_path_buf(),
            message: e.to_string(),
        })?;
        for (name, loaded) in saved.loaded {
            if let Some(d) = state.drivers.get_mut(&name) {
                d.loaded = loaded;
            }
        }
        // The virtual functions first: their drivers are restored below.
        for (addr, count) in &saved.vfs {
            let Ok(a) = PciAddress::parse(addr) else {
                continue;
            };
            let now = state.devices.get(&a).and_then(|d| d.sriov);
            if now.is_some_and(|s| s.num_vfs != *count && *count <= s.total_vfs) {
                state.disable_vfs(a);
                state.enable_vfs(a, *count, false);
            }
        }
        for (vf, id) in saved.vgpu_current {
            if let Ok(a) = PciAddress::parse(&vf) {
                state.vgpu_current.insert(a, id);
            }
        }
        for (uuid, (on, id)) in saved.mdevs {
            if let Ok(a) = PciAddress::parse(&on) {
                state.mdevs.insert(uuid, (a, id));
            }
        }
        state.next_mdev = saved.next_mdev;
        for (addr, counts) in saved.aer {
            if let Ok(a) = PciAddress::parse(&addr) {
                state.aer.insert(a, counts);
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
    Ok(())
}

impl SimHost {
    pub(super) fn save(&self, state: &SimState) {
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
            vfs: state
                .devices
                .iter()
                .filter_map(|(a, d)| Some((a.to_string(), d.sriov?.num_vfs)))
                .collect(),
            vgpu_current: state
                .vgpu_current
                .iter()
                .map(|(a, id)| (a.to_string(), id.clone()))
                .collect(),
            mdevs: state
                .mdevs
                .iter()
                .map(|(u, (a, id))| (u.clone(), (a.to_string(), id.clone())))
                .collect(),
            next_mdev: state.next_mdev,
            aer: state.aer.iter().map(|(a, c)| (a.to_string(), *c)).collect(),
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
}
