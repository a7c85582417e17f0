//! The simulated host: a kernel's PCI bookkeeping in memory, described by a fixture.
//!
//! It exists so that everything above the [`Host`] trait can be run and tested on a
//! machine whose own PCI devices must never be touched. It keeps the same facts the
//! kernel keeps (DESIGN.md section 4): drivers with id tables, devices with their
//! bound driver, override and IOMMU group.
//!
//! - [`fixture`]: the TOML host description, parsed and checked;
//! - `kernel`: the [`Host`] trait's reads and writes, with the kernel's rules;
//! - [`faults`]: errors, stalls and grabs a test injects;
//! - `persist`: the state kept between daemon runs (`--simulate-state`);
//! - here: the host itself, and what outside actors do to it (unplug,
//!   plug, another driver binding, services stopping and starting).

pub mod faults;
pub mod fixture;
mod kernel;
mod persist;
mod sriov;
mod vgpu;

pub use faults::{Fault, FaultKind};
pub use fixture::*;

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use super::{EventKind, EventSink, Host, HostError, HostEvent};
use crate::pci::PciAddress;
use faults::ENODEV;

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
    /// *(issue 30)* While `Some`, events are lost (as when the kernel's
    /// uevent queue overflows), and how many were.
    dropping: Mutex<Option<u64>>,
    /// *(issue 30)* Told when events were lost (the monitor's ENOBUFS).
    lost: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Wakes an unbind waiting for a service to let go of its device.
    state_changed: Condvar,
    /// Every write attempted and every service stopped or started, in order,
    /// for tests (Simulator1.Journal); bounded.
    journal: Mutex<std::collections::VecDeque<String>>,
    /// How many times a device was read (`Host::device`), for tests that
    /// count what an operation costs.
    reads: std::sync::atomic::AtomicU64,
}

/// The most journal entries kept (the oldest go first).
const JOURNAL_LIMIT: usize = 4096;

impl SimHost {
    /// Boots a simulated host from a fixture file.
    #[cfg(test)]
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
            persist::restore(&mut state, file)?;
        }
        Ok(SimHost {
            source: fixture.to_path_buf(),
            state: Mutex::new(state),
            faults: Mutex::new(Vec::new()),
            faults_cleared: Condvar::new(),
            state_file: state_file.map(Path::to_path_buf),
            sink: Mutex::new(None),
            dropping: Mutex::new(None),
            lost: Mutex::new(None),
            state_changed: Condvar::new(),
            journal: Mutex::default(),
            reads: Default::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        // The state is plain data and every change to it is a single assignment,
        // so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, entry: String) {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        if j.len() >= JOURNAL_LIMIT {
            j.pop_front();
        }
        j.push_back(entry);
    }

    /// How many single-device reads were made so far.
    #[cfg(test)]
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
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

    /// Connects the event path; events before this are not delivered.
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    fn emit_all(&self, events: sriov::Events) {
        for (kind, address) in events {
            self.emit(kind, address);
        }
    }

    fn emit(&self, kind: EventKind, address: PciAddress) {
        self.deliver(HostEvent::new(kind, address));
    }

    /// Hands `ev` to the daemon's event path, unless events are being lost.
    fn deliver(&self, ev: HostEvent) {
        if let Some(n) = &mut *self.dropping.lock().unwrap_or_else(|p| p.into_inner()) {
            *n += 1;
            tracing::info!(pci_address = %ev.address, action = ev.kind.as_str(), "simulator: event lost");
            return;
        }
        if let Some(sink) = &*self.sink.lock().unwrap_or_else(|p| p.into_inner()) {
            sink(ev);
        }
    }

    /// *(issue 30)* Connects what is told when events were lost.
    pub fn set_lost_sink(&self, lost: Box<dyn Fn() + Send + Sync>) {
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(lost);
    }

    /// *(issue 30)* `true`: events are lost from now on, as when the
    /// kernel's uevent queue overflows. `false`: they flow again, and if
    /// any was lost the monitor says so (its ENOBUFS).
    pub fn lose_events(&self, lose: bool) {
        let lost = {
            let mut dropping = self.dropping.lock().unwrap_or_else(|p| p.into_inner());
            let was = if lose {
                dropping.get_or_insert(0);
                None
            } else {
                dropping.take()
            };
            was.unwrap_or(0)
        };
        if lost > 0 {
            tracing::info!(
                lost,
                "simulator: events were lost; the monitor reports ENOBUFS"
            );
            if let Some(f) = &*self.lost.lock().unwrap_or_else(|p| p.into_inner()) {
                f();
            }
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
            state.aer.remove(&address);
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

    /// *(issue 28)* Another card put into an unplugged device's slot: its
    /// vendor and device ids, and its subsystem vendor, become `vendor` and
    /// `device` (the next `plug` brings the new card).
    pub fn swap(&self, address: PciAddress, vendor: u16, device: u16) -> Result<(), String> {
        let mut state = self.state();
        let Some(dev) = state.unplugged.get_mut(&address) else {
            return Err(format!(
                "{address} is not unplugged (unplug it before swapping the card)"
            ));
        };
        dev.vendor = vendor;
        dev.device = device;
        dev.subsystem_vendor = vendor;
        self.save(&state);
        tracing::info!(pci_address = %address, vendor = %format!("{vendor:04x}"), device = %format!("{device:04x}"), "simulator: card swapped");
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

    /// *(issue 29)* The device's AER totals become `counts`, as the
    /// kernel's AER driver counts errors: silently (no uevent).
    pub fn set_aer(
        &self,
        address: PciAddress,
        counts: super::aer::AerCounts,
    ) -> Result<(), String> {
        let mut state = self.state();
        if !state.devices.contains_key(&address) {
            return Err(format!("{address} is not on the simulated host"));
        }
        state.aer.insert(address, counts);
        self.save(&state);
        tracing::info!(pci_address = %address, correctable = counts.correctable, nonfatal = counts.nonfatal, fatal = counts.fatal, "simulator: AER counters set");
        Ok(())
    }

    /// *(issue 29)* The kernel's AER recovery reports on the device: a
    /// `change` uevent with `ERROR_EVENT` and `DEVICE_ONLINE`.
    pub fn recovery_event(
        &self,
        address: PciAddress,
        recovery: super::aer::Recovery,
    ) -> Result<(), String> {
        if !self.state().devices.contains_key(&address) {
            return Err(format!("{address} is not on the simulated host"));
        }
        let mut ev = HostEvent::new(EventKind::Change, address);
        ev.aer = Some(recovery);
        self.deliver(ev);
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
            // The simulated kernel's unbind and bind send their own events.
            self.unbind(address, &c)?;
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hosts")
    }

    /// *(issue 30)* The simulated kernel announces every driver change as
    /// the real one does, the daemon's own writes included: an unbind, a
    /// bind, a probe that binds, and an outside actor's rebind, each event
    /// once.
    #[test]
    fn every_driver_change_sends_its_event_once() {
        let host = SimHost::from_file(&examples().join("l4.toml")).unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        host.set_event_sink(Box::new(move |e| {
            sink.lock().unwrap().push((e.kind, e.address));
        }));
        let gpu = PciAddress::parse("0000:a2:00.0").unwrap();
        let take = || std::mem::take(&mut *seen.lock().unwrap());
        host.unbind(gpu, "nvidia").unwrap();
        assert_eq!(take(), [(EventKind::Unbind, gpu)]);
        host.probe(gpu).unwrap();
        assert_eq!(take(), [(EventKind::Bind, gpu)]);
        host.set_override(gpu, Some("vfio-pci")).unwrap();
        assert_eq!(take(), [], "driver_override sends no uevent");
        host.unbind(gpu, "nvidia").unwrap();
        host.bind(gpu, "vfio-pci").unwrap();
        assert_eq!(take(), [(EventKind::Unbind, gpu), (EventKind::Bind, gpu)]);
        host.driver_bind(gpu, "nvidia").unwrap();
        assert_eq!(take(), [(EventKind::Unbind, gpu), (EventKind::Bind, gpu)]);
    }

    #[test]
    fn shipped_fixtures_load() {
        for name in [
            "l4.toml",
            "desktop.toml",
            "no-iommu.toml",
            "workstation.toml",
            "sriov-nic.toml",
            "l40s-vgpu.toml",
            "a100-mdev.toml",
            "grace-hopper.toml",
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

    /// *(issue 28)* A fixture's `reset_method` and `kernel_cmdline` are
    /// what the simulated kernel shows; a virtual function can always be
    /// reset by FLR, as SR-IOV requires.
    #[test]
    fn a_fixture_says_how_a_function_resets_and_what_the_kernel_was_booted_with() {
        let text = "kernel_cmdline = \"ro pcie_acs_override=downstream\"\n\
            [[driver]]\nname = \"vfio-pci\"\n\
            [[device]]\naddress = \"0000:a2:00.0\"\nvendor = \"10de\"\ndevice = \"27b8\"\n\
            class = \"030200\"\niommu_group = 82\nreset_method = \"flr  bus \\u001b\"\n\
            [[device]]\naddress = \"0000:a3:00.0\"\nvendor = \"10de\"\ndevice = \"27b8\"\n\
            class = \"030200\"\niommu_group = 83\nreset_method = \"\"\n\
            [[device]]\naddress = \"0000:a4:00.0\"\nvendor = \"10de\"\ndevice = \"27b8\"\n\
            class = \"030200\"\niommu_group = 84\n";
        let state = Fixture::parse(Path::new("t.toml"), text)
            .unwrap()
            .into_state(Path::new("t.toml"))
            .unwrap();
        let reset = |a: &str| {
            state.devices[&PciAddress::parse(a).unwrap()]
                .reset_method
                .clone()
        };
        assert_eq!(reset("0000:a2:00.0").as_deref(), Some("flr bus"));
        assert_eq!(reset("0000:a3:00.0").as_deref(), Some(""));
        assert_eq!(reset("0000:a4:00.0"), None);
        assert!(crate::host::acs_override(&state.kernel_cmdline));
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

    /// *(issue 26)* A daemon restart is not a reboot: the virtual functions
    /// written are there again, with their drivers.
    #[test]
    fn the_count_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("sim.json");
        let fixture = examples().join("sriov-nic.toml");
        let pf = PciAddress::parse("0000:3b:00.0").unwrap();
        let host = SimHost::open(&fixture, Some(&state)).unwrap();
        host.set_num_vfs(pf, 0).unwrap();
        let e = host.set_num_vfs(pf, 65).unwrap_err().to_string();
        assert!(e.contains("ERANGE"), "{e}");
        host.set_num_vfs(pf, 3).unwrap();
        let e = host.set_num_vfs(pf, 4).unwrap_err().to_string();
        assert!(e.contains("EBUSY"), "non-zero to non-zero: {e}");
        drop(host);
        let again = SimHost::open(&fixture, Some(&state)).unwrap();
        assert_eq!(again.device(pf).unwrap().unwrap().sriov.unwrap().num_vfs, 3);
        let vf = PciAddress::parse("0000:3b:02.2").unwrap();
        let d = again.device(vf).unwrap().unwrap();
        assert_eq!((d.driver.as_deref(), d.physfn), (Some("iavf"), Some(pf)));
        assert_ne!(
            d.iommu_group,
            again.device(pf).unwrap().unwrap().iommu_group
        );
        assert!(again
            .device(PciAddress::parse("0000:3b:02.3").unwrap())
            .unwrap()
            .is_none());
    }

    /// *(issue 26)* A fixture's virtual functions must agree with their
    /// physical function, as the kernel's always do.
    #[test]
    fn virtual_functions_agree_with_their_physical_function() {
        let text = std::fs::read_to_string(examples().join("sriov-nic.toml")).unwrap();
        let host = SimHost::from_file(&examples().join("sriov-nic.toml")).unwrap();
        let pf = host
            .device(PciAddress::parse("0000:3b:00.0").unwrap())
            .unwrap()
            .unwrap();
        let s = pf.sriov.unwrap();
        assert_eq!((s.total_vfs, s.num_vfs, s.vf_device), (64, 2, Some(0x154c)));
        let vf = host
            .device(PciAddress::parse("0000:3b:02.1").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(vf.physfn, pf.address.into());
        assert!(vf.sriov.is_none());
        let broken = [
            (
                text.replace("sriov_vfs = 2", "sriov_vfs = 3"),
                "2 functions name it",
            ),
            (
                text.replace("sriov_vfs = 2", "sriov_vfs = 65"),
                "sriov_total_vfs 64",
            ),
            (
                text.replacen("physfn = \"0000:3b:00.0\"", "physfn = \"0000:3b:02.0\"", 1),
                "is not a declared function with sriov_total_vfs",
            ),
        ];
        for (t, why) in broken {
            let e = Fixture::parse(Path::new("x.toml"), &t)
                .unwrap()
                .into_state(Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
