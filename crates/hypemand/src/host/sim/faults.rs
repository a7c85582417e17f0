//! Faults a test injects (`Simulator1.InjectFault`): an errno, a stall, or a
//! native driver grabbing the device back, on one operation of one device.

use std::time::{Duration, Instant};

use super::SimHost;
use crate::host::{errno_by_name, HostError, Op};
use crate::pci::PciAddress;

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
    /// *(issue 26)* For `set_num_vfs`: the write succeeds, but the last
    /// virtual function never appears; for `create_mdev`: the write
    /// succeeds, but the mdev never appears.
    Lost,
    /// *(issue 26)* For `set_vgpu_type`: the write succeeds, but the
    /// function reads back as free.
    Mismatch,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultKind::Errno(e) => f.write_str(crate::host::errno_name(*e).unwrap_or("errno")),
            FaultKind::Stall => f.write_str("stall"),
            FaultKind::Grab => f.write_str("grab"),
            FaultKind::Lost => f.write_str("lost"),
            FaultKind::Mismatch => f.write_str("mismatch"),
        }
    }
}

impl FaultKind {
    /// `ENODEV`, `EBUSY`, ... (see [`crate::host::ERRNOS`]), `stall`,
    /// `grab` or `lost`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stall" => Some(FaultKind::Stall),
            "grab" => Some(FaultKind::Grab),
            "lost" => Some(FaultKind::Lost),
            "mismatch" => Some(FaultKind::Mismatch),
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
pub(super) const STALL_LIMIT: Duration = Duration::from_secs(120);

pub(super) const ENOENT: i32 = 2;
pub(super) const EINTR: i32 = 4;
pub(super) const EBUSY: i32 = 16;
pub(super) const ENODEV: i32 = 19;
pub(super) const ERANGE: i32 = 34;
pub(super) const EEXIST: i32 = 17;
pub(super) const EINVAL: i32 = 22;

impl SimHost {
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
    pub(super) fn fault(&self, op: Op, address: PciAddress) -> Option<FaultKind> {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults
            .iter()
            .find(|f| f.op == op && f.address == address)
            .map(|f| f.kind.clone())
    }
    /// Applies an injected errno or stall before an operation. `Ok` means go on.
    pub(super) fn before(
        &self,
        op: Op,
        address: PciAddress,
        path: &str,
        value: &str,
    ) -> Result<Option<FaultKind>, HostError> {
        let fail = super::kernel::failing(path, value);
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
}
