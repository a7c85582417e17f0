//! *(issue 26)* Changing how many SR-IOV virtual functions a physical
//! function has, through the [`Door`].
//!
//! The kernel takes a new count only from nothing: a non-zero count is
//! changed by writing 0 first (`sriov_numvfs_store` answers `EBUSY`
//! otherwise). It takes it only through the bound driver's
//! `sriov_configure`, which NVIDIA's `nvidia` driver does not have: NVIDIA's
//! `sriov-manage -e` moves the GPU to `pci-pf-stub` (a driver that is only
//! that callback), writes the count, and gives the GPU back to `nvidia`.
//! hypemand does the same, with its own moves (override, unbind, probe,
//! verify, DESIGN.md section 4; not `new_id`, which would take every GPU of
//! that model), each under the deadline and undone on failure.

use super::door::{Door, StepError};
use super::vfio::VfioError;
use super::{HostDevice, HostOp};
use crate::pci::PciAddress;

/// The driver NVIDIA's `sriov-manage` enables a GPU's virtual functions
/// through.
pub const PF_STUB: &str = "pci-pf-stub";

/// The physical function drivers that cannot take a count themselves, and
/// go through [`PF_STUB`] (NVIDIA's `sriov-manage`).
pub fn needs_stub(driver: Option<&str>) -> bool {
    driver == Some(crate::host::units::NVIDIA_DRIVER)
}

/// Why the count could not be changed. Each says what state the function
/// was left in.
#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error("pci-pf-stub is not available on this host, and {0}'s driver (nvidia) cannot change its virtual functions itself: load it with `modprobe pci-pf-stub` (NVIDIA's sriov-manage uses it the same way); nothing was changed")]
    StubUnavailable(PciAddress),
    /// Moving the function to `pci-pf-stub` or back failed.
    #[error(transparent)]
    Move(#[from] VfioError),
    /// A write of `sriov_numvfs` failed.
    #[error("setting the virtual functions of {address} to {count} failed at step {step}: {error}; {outcome}")]
    Write {
        address: PciAddress,
        count: u32,
        step: String,
        error: StepError,
        outcome: String,
    },
}

impl SriovError {
    pub fn is_timeout(&self) -> bool {
        match self {
            SriovError::Move(v) => v.is_timeout(),
            SriovError::Write { error, .. } => error.is_timeout(),
            SriovError::StubUnavailable(_) => false,
        }
    }
}

impl Door {
    /// Gives `pf` (as read now) `count` virtual functions; returns it after.
    /// On failure the previous count and driver are put back, and the error
    /// says whether that worked.
    pub async fn set_vfs(&self, pf: &HostDevice, count: u32) -> Result<HostDevice, SriovError> {
        let a = pf.address;
        let previous = pf.sriov.map_or(0, |s| s.num_vfs);
        if !needs_stub(pf.driver.as_deref()) {
            self.write_count(a, previous, count).await?;
            return self.reread(a, count).await;
        }
        if !self.load_driver(PF_STUB).await.unwrap_or(false) {
            return Err(SriovError::StubUnavailable(a));
        }
        let staged = self.take_to(pf, PF_STUB, "moving to pci-pf-stub").await?;
        let written = self.write_count(a, previous, count).await;
        // Back to its driver whatever happened: the count is the kernel's
        // now (or the previous one, restored), the GPU is nvidia's again.
        let back = self.give_back(&staged, pf.driver.as_deref()).await;
        written?;
        back?;
        self.reread(a, count).await
    }

    /// Writes `count`, 0 first when both counts are non-zero; on failure
    /// tries to put `previous` back.
    async fn write_count(
        &self,
        a: PciAddress,
        previous: u32,
        count: u32,
    ) -> Result<(), SriovError> {
        let failed = |step: String, error: StepError, outcome: String| SriovError::Write {
            address: a,
            count,
            step,
            error,
            outcome,
        };
        if previous != 0 && count != 0 && previous != count {
            if let Err(e) = self.write(a, HostOp::SetNumVfs(0)).await {
                return Err(failed(
                    "write 0 to sriov_numvfs".into(),
                    e,
                    format!("it still has its {previous} virtual functions"),
                ));
            }
        }
        let Err(e) = self.write(a, HostOp::SetNumVfs(count)).await else {
            return Ok(());
        };
        let step = format!("write {count} to sriov_numvfs");
        if previous == 0 || previous == count {
            return Err(failed(step, e, "it has no virtual functions".into()));
        }
        let outcome = match self.write(a, HostOp::SetNumVfs(previous)).await {
            Ok(()) => format!("its {previous} virtual functions were made again"),
            Err(back) => format!(
                "making its {previous} virtual functions again failed too ({back}); it has none now"
            ),
        };
        Err(failed(step, e, outcome))
    }

    async fn reread(&self, a: PciAddress, count: u32) -> Result<HostDevice, SriovError> {
        let failed = |error: StepError| SriovError::Write {
            address: a,
            count,
            step: "read back".into(),
            error,
            outcome: "the count was written".into(),
        };
        self.read(a)
            .await
            .map_err(failed)?
            .ok_or_else(|| failed(StepError::Host(super::HostError::NoDevice(a))))
    }
}
