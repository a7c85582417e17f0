//! The simulated kernel's answers to the [`Host`] trait: reads, and the
//! writes (override, unbind, bind, probe) with the kernel's rules (DESIGN.md
//! section 4), faults applied first.

use std::time::{Duration, Instant};

use super::faults::{FaultKind, EBUSY, EINTR, ENODEV, ENOENT, ERANGE, STALL_LIMIT};
use super::{SimHost, SimState};
use crate::host::usage::{Use, Walked};
use crate::host::{EventKind, Host, HostDevice, HostError, Op};
use crate::pci::PciAddress;

/// The failure of writing `value` to `path`, by errno, as the kernel reports it.
pub(super) fn failing(path: &str, value: &str) -> impl Fn(i32) -> HostError {
    let (path, value) = (path.to_string(), value.to_string());
    move |errno| HostError::Write {
        path: path.clone(),
        value: value.clone(),
        errno,
    }
}

impl SimHost {
    /// The first loaded driver whose id table matches (what a probe without an
    /// override picks).
    pub(super) fn matching_driver(state: &SimState, d: &HostDevice) -> Option<String> {
        state
            .drivers
            .iter()
            .find(|(_, drv)| drv.loaded && drv.ids.iter().any(|m| m.matches(d.vendor, d.device)))
            .map(|(n, _)| n.clone())
    }
    /// *(issue 28)* A function as read: on a kernel with the VFIO cdev
    /// (`vfio_cdev`), one bound to a vfio driver has `vfio-dev/vfioN`, N
    /// its place among the functions (stable while the fixture is).
    pub(super) fn shown(state: &SimState, d: &HostDevice) -> HostDevice {
        let mut d = d.clone();
        let on_vfio = d
            .driver
            .as_deref()
            .is_some_and(crate::host::variant::is_vfio_driver);
        d.vfio_dev = (state.vfio_cdev && on_vfio)
            .then(|| state.devices.keys().position(|a| *a == d.address))
            .flatten()
            .map(|n| format!("vfio{n}"));
        d
    }
    pub(super) fn loaded(state: &SimState, driver: &str) -> bool {
        state.drivers.get(driver).is_some_and(|d| d.loaded)
    }
    /// Whether an active service's process holds `address` open while
    /// `driver` has it: then the driver's unbind waits for it.
    pub(super) fn held_by_service(state: &SimState, address: PciAddress, driver: &str) -> bool {
        let bound = !crate::host::variant::is_vfio_driver(driver)
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

    fn kernel_cmdline(&self) -> String {
        self.state().kernel_cmdline.clone()
    }

    fn vfio_aliases(&self) -> String {
        self.state().modules_alias.clone()
    }

    fn devices(&self) -> Result<Vec<HostDevice>, HostError> {
        let state = self.state();
        Ok(state
            .devices
            .values()
            .map(|d| Self::shown(&state, d))
            .collect())
    }

    fn device(&self, address: PciAddress) -> Result<Option<HostDevice>, HostError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let state = self.state();
        Ok(state.devices.get(&address).map(|d| Self::shown(&state, d)))
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
            .map(|d| Self::shown(&state, d))
            .collect())
    }

    fn usage(&self, _deadline: std::time::Instant) -> Walked {
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
                    .is_some_and(|n| !crate::host::variant::is_vfio_driver(n));
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
        Walked {
            usage,
            ..Default::default()
        }
    }

    fn aer(&self, address: PciAddress) -> Result<Option<crate::host::aer::AerCounts>, HostError> {
        let state = self.state();
        Ok(state
            .devices
            .contains_key(&address)
            .then(|| state.aer.get(&address).copied().unwrap_or_default()))
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
        let fail = failing(&path, &address.to_string());
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
        // *(issue 30)* The kernel announces every driver change, the
        // daemon's own writes included.
        self.emit(EventKind::Unbind, address);
        if grabbed {
            self.emit(EventKind::Bind, address);
        }
        Ok(())
    }

    fn bind(&self, address: PciAddress, driver: &str) -> Result<(), HostError> {
        let path = format!("bus/pci/drivers/{driver}/bind");
        self.before(Op::Bind, address, &path, &address.to_string())?;
        let fail = failing(&path, &address.to_string());
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
        drop(state);
        self.emit(EventKind::Bind, address);
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
            drop(state);
            self.emit(EventKind::Bind, address);
        }
        Ok(())
    }

    /// `sriov_numvfs_store` in `drivers/pci/pci-sysfs.c`, in its order:
    /// past the total `ERANGE`; the same count, nothing; no driver, or one
    /// without `sriov_configure`, `ENOENT`; 0 removes the virtual functions;
    /// another count while some exist `EBUSY`; else they are made.
    fn set_num_vfs(&self, address: PciAddress, count: u32) -> Result<(), HostError> {
        let path = format!("devices/{address}/sriov_numvfs");
        let value = count.to_string();
        let fault = self.before(Op::SetNumVfs, address, &path, &value)?;
        let fail = failing(&path, &value);
        let mut state = self.state();
        let pf = state.devices.get(&address).ok_or_else(|| fail(ENODEV))?;
        let sriov = pf.sriov.ok_or_else(|| fail(ENOENT))?;
        if count > sriov.total_vfs {
            return Err(fail(ERANGE));
        }
        if count == sriov.num_vfs {
            return Ok(());
        }
        let configures = pf
            .driver
            .as_deref()
            .and_then(|d| state.drivers.get(d))
            .is_some_and(|d| d.sriov_configure);
        if !configures {
            return Err(fail(ENOENT));
        }
        let events = if count == 0 {
            state.disable_vfs(address)
        } else if sriov.num_vfs != 0 {
            return Err(fail(EBUSY));
        } else {
            state.enable_vfs(address, count, fault == Some(FaultKind::Lost))
        };
        tracing::info!(pci_address = %address, vfs = count, "simulator: sriov_numvfs written");
        self.save(&state);
        drop(state);
        self.emit_all(events);
        Ok(())
    }

    fn vgpu_slots(&self, parent: &HostDevice) -> Result<Vec<crate::host::vgpu::Slot>, HostError> {
        Ok(self.state().slots_of(parent))
    }

    fn set_vgpu_type(&self, function: PciAddress, type_id: u32) -> Result<(), HostError> {
        self.write_vgpu_type(function, type_id)
    }

    fn current_vgpu_type(&self, function: PciAddress) -> Result<Option<u32>, HostError> {
        self.read_vgpu_type(function)
    }

    fn create_mdev(
        &self,
        function: PciAddress,
        type_id: &str,
        uuid: &str,
    ) -> Result<(), HostError> {
        self.make_mdev(function, type_id, uuid)
    }

    fn remove_mdev(&self, function: PciAddress, uuid: &str) -> Result<(), HostError> {
        self.unmake_mdev(function, uuid)
    }

    fn mdev_exists(&self, uuid: &str) -> Result<bool, HostError> {
        Ok(self.has_mdev(uuid))
    }

    fn vfio_nodes(
        &self,
        function: PciAddress,
        mdev: Option<&str>,
    ) -> Result<Vec<String>, HostError> {
        Ok(self.nodes(function, mdev))
    }

    fn vfio_holders(&self, nodes: &[String], _deadline: Instant) -> Result<Vec<String>, String> {
        let state = self.state();
        Ok(nodes
            .iter()
            .filter_map(|n| {
                let (pid, comm) = state.vfio_holders.get(n)?;
                Some(format!("{n} is open by process {pid} ({comm})"))
            })
            .collect())
    }
}
