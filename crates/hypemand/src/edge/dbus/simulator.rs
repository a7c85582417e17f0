//! `org.hypeman.Simulator1` on `/org/hypeman/Simulator`, exported only under
//! `--simulate`: lets tests reach every error path of the simulated kernel.
//! The production bus policy does not open this interface; test buses add
//! `tests/data/simulator.conf`.
//!
//! *(issue 30)* A call that makes the simulated kernel send events answers
//! once the daemon has handled them (as `udevadm settle` waits for udev):
//! what it did is then in `Get` and has been signalled. A re-claim it set
//! off (a registered device coming back) runs in its own task and may
//! still be under way.

use std::sync::Arc;

use zbus::{fdo, interface};

use crate::host::sim::{Fault, FaultKind, SimHost};
use crate::host::Op;
use crate::pci::PciAddress;

pub struct Simulator {
    sim: Arc<SimHost>,
    /// The daemon's event path, to wait until it has handled what was sent.
    events: crate::edge::udev::Sender,
}

impl Simulator {
    pub fn new(sim: Arc<SimHost>, events: crate::edge::udev::Sender) -> Self {
        Simulator { sim, events }
    }

    /// `result`, once the daemon has handled every event sent so far.
    async fn settled<T>(&self, result: T) -> T {
        crate::edge::udev::sync(&self.events).await;
        result
    }
}

impl super::exported::AllProperties for Simulator {}

#[interface(name = "org.hypeman.Simulator1")]
impl Simulator {
    /// Makes `operation` (set_override, clear_override, unbind, bind, probe) on
    /// `pci_address` fail with `error`: an errno name (ENODEV, EBUSY, EIO, ...),
    /// `stall` (blocks until ClearFaults) or `grab` (unbind only: the native
    /// driver takes the device straight back).
    async fn inject_fault(
        &self,
        operation: &str,
        pci_address: &str,
        error: &str,
    ) -> fdo::Result<()> {
        let op = Op::parse(operation).ok_or_else(|| {
            fdo::Error::InvalidArgs(format!(
                "unknown operation {operation:?}; use one of set_override, clear_override, unbind, bind, probe, set_num_vfs"
            ))
        })?;
        let address =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        let kind = FaultKind::parse(error).ok_or_else(|| {
            fdo::Error::InvalidArgs(format!(
                "unknown error {error:?}; use an errno name such as EBUSY, or stall, grab (unbind) or lost (set_num_vfs)"
            ))
        })?;
        self.sim.inject(Fault { op, address, kind });
        Ok(())
    }

    /// Hot-removes a device (its driver unbinds, then it leaves the bus).
    async fn unplug(&self, pci_address: &str) -> fdo::Result<()> {
        let a =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        self.settled(self.sim.unplug(a).map_err(fdo::Error::InvalidArgs))
            .await
    }

    /// Brings an unplugged device back; its native driver binds first, as the
    /// kernel's would.
    async fn plug(&self, pci_address: &str) -> fdo::Result<()> {
        let a =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        self.settled(self.sim.plug(a).map_err(fdo::Error::InvalidArgs))
            .await
    }

    /// *(issue 28)* Puts another card (`vvvv:dddd`) into an unplugged
    /// device's slot.
    async fn swap(&self, pci_address: &str, ids: &str) -> fdo::Result<()> {
        let a =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        let hex = |s: &str| {
            (s.len() == 4)
                .then(|| u16::from_str_radix(s, 16).ok())
                .flatten()
        };
        let (v, d) = ids
            .split_once(':')
            .and_then(|(v, d)| Some((hex(v)?, hex(d)?)))
            .ok_or_else(|| fdo::Error::InvalidArgs(format!("{ids:?} is not vvvv:dddd")))?;
        self.sim.swap(a, v, d).map_err(fdo::Error::InvalidArgs)
    }

    /// *(issue 29)* Sets the device's AER totals (`aer_dev_correctable`,
    /// `aer_dev_nonfatal`, `aer_dev_fatal`); no uevent, as the kernel sends
    /// none for a counted error.
    async fn set_aer_counters(
        &self,
        pci_address: &str,
        correctable: u64,
        nonfatal: u64,
        fatal: u64,
    ) -> fdo::Result<()> {
        let a =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        let counts = crate::host::aer::AerCounts {
            correctable,
            nonfatal,
            fatal,
        };
        self.sim.set_aer(a, counts).map_err(fdo::Error::InvalidArgs)
    }

    /// *(issue 29)* Sends the kernel's AER recovery uevent for the device:
    /// `change` with `ERROR_EVENT` (BEGIN_RECOVERY, SUCCESSFUL_RECOVERY,
    /// FAILED_RECOVERY) and `DEVICE_ONLINE` (0 or 1).
    async fn recovery_event(
        &self,
        pci_address: &str,
        error_event: &str,
        device_online: bool,
    ) -> fdo::Result<()> {
        let a =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        if !crate::host::aer::Recovery::EVENTS.contains(&error_event) {
            return Err(fdo::Error::InvalidArgs(format!(
                "{error_event:?} is not BEGIN_RECOVERY, SUCCESSFUL_RECOVERY or FAILED_RECOVERY"
            )));
        }
        let online = if device_online { "1" } else { "0" };
        let recovery = crate::host::aer::Recovery::from_uevent(Some(error_event), Some(online))
            .ok_or_else(|| fdo::Error::InvalidArgs("no event".into()))?;
        let sent = self
            .sim
            .recovery_event(a, recovery)
            .map_err(fdo::Error::InvalidArgs);
        self.settled(sent).await
    }

    /// *(issue 30)* `true`: the simulated kernel's events are lost from now
    /// on, as when its uevent queue overflows; `false`: they flow again,
    /// and the monitor reports that some were lost (ENOBUFS), if any were.
    async fn lose_events(&self, lose: bool) {
        self.sim.lose_events(lose);
        self.settled(()).await
    }

    /// An outside actor binds `driver` to the device.
    async fn driver_bind(&self, pci_address: &str, driver: &str) -> fdo::Result<()> {
        let a =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        let bound = self
            .sim
            .driver_bind(a, driver)
            .map_err(|e| fdo::Error::Failed(e.to_string()));
        self.settled(bound).await
    }

    /// *(issue 26)* An outside tool makes a vGPU of `type_id` on a function
    /// (`""` removes what it carries).
    async fn set_vgpu(&self, pci_address: &str, type_id: &str) -> fdo::Result<()> {
        let a =
            PciAddress::parse(pci_address).map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        self.sim.set_vgpu(a, type_id).map_err(fdo::Error::Failed)
    }

    /// *(issue 26)* A VMM opens a VFIO node (`/dev/vfio/41`); pid 0 closes it.
    async fn hold_node(&self, node: &str, pid: u32, comm: &str) {
        self.sim.hold_node(node, pid, comm);
    }

    /// Every write attempted on the simulated kernel and every service
    /// stopped or started, oldest first (`unbind 0000:01:00.0 0000:01:00.0`,
    /// `stop nvidia-persistenced.service`).
    async fn journal(&self) -> Vec<String> {
        self.sim.journal()
    }

    /// Whether a declared service is active.
    async fn unit_active(&self, unit: &str) -> fdo::Result<bool> {
        self.sim
            .unit(unit)
            .map(|(active, _)| active)
            .ok_or_else(|| fdo::Error::InvalidArgs(format!("no service {unit:?} is declared")))
    }

    /// Removes every injected fault and releases stalled writes.
    async fn clear_faults(&self) {
        self.sim.clear_faults();
    }
}
