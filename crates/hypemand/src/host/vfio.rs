//! Moving a device between its host driver and vfio-pci, through the [`Door`].
//!
//! The sequences are the ones libvirt, driverctl and dpdk-devbind converge on
//! (DESIGN.md section 4): take it with override, unbind, probe, verify; give it
//! back with clear override, unbind, probe, explicit bind if needed, verify. Every
//! step runs on a blocking thread under a deadline, and any failure half way puts
//! the device back exactly as it was (driver and override) before answering.

use super::door::{Door, StepError};
use super::{HostDevice, HostError, HostOp};
use crate::pci::class::is_pci_bridge;
use crate::pci::PciAddress;
use hypeman_api::VFIO_DRIVER;

/// Drivers that cede DMA ownership: a device bound to one does not stop its
/// IOMMU group from being assigned.
pub const CEDING_DRIVERS: [&str; 3] = [VFIO_DRIVER, "pci-stub", "pcieport"];

/// A member of an IOMMU group whose driver has not ceded DMA ownership: it
/// is in the way of assigning the group. (Not a blocker
/// of `service::blockers`, which says why the host must keep a function.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unceded {
    pub address: PciAddress,
    pub driver: Option<String>,
}

impl std::fmt::Display for Unceded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.driver {
            Some(d) => write!(f, "{} (driver {d})", self.address),
            None => write!(f, "{} (no driver)", self.address),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("{0} has no IOMMU group: the host runs without an IOMMU. Enable VT-d (Intel) or AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on (iommu=pt is fine)")]
    NoIommu(PciAddress),
    /// *(issue 28)* The vfio driver the function needs (vfio-pci or a
    /// variant of it) cannot be loaded.
    #[error("{0} is not available on this host: load it with `modprobe {0}` (the module is in the kernel package on most distributions)")]
    VfioUnavailable(String),
    #[error("IOMMU group {group} of {address} also holds {}: register each of them and bind it to vfio-pci (or unbind it from its driver) first", list(.unceded))]
    GroupConflict {
        address: PciAddress,
        group: u32,
        unceded: Vec<Unceded>,
    },
    /// A step failed; `outcome` says what state the device was left in.
    #[error("{action} {address} failed at step {step}: {error}; {outcome}")]
    Step {
        action: &'static str,
        address: PciAddress,
        step: String,
        error: StepError,
        outcome: String,
    },
}

impl VfioError {
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            VfioError::Step {
                error: StepError::Timeout(_) | StepError::Stuck(_),
                ..
            }
        )
    }
}

fn list(unceded: &[Unceded]) -> String {
    unceded
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn driver_text(d: Option<&str>) -> String {
    d.map_or_else(|| "no driver".to_string(), |d| format!("driver {d}"))
}

impl Door {
    /// The members of `dev`'s IOMMU group, read once for the checks before a
    /// take (the blockers and [`Door::check`]); none without a group.
    pub async fn read_group(&self, dev: &HostDevice) -> Result<Vec<HostDevice>, VfioError> {
        let Some(group) = dev.iommu_group else {
            return Ok(Vec::new());
        };
        self.group_members(group)
            .await
            .map_err(|error| VfioError::Step {
                action: "checking the IOMMU group of",
                address: dev.address,
                step: "read group".into(),
                error,
                outcome: "nothing was changed".into(),
            })
    }

    /// The checks before a device may be taken: an IOMMU, vfio-pci, and a group
    /// that can become assignable. `movable` says whether another member could be
    /// moved to vfio-pci by the daemon (it is registered): such a member is not in
    /// the way of a Bind, only of an Attach (`strict`).
    pub async fn check(
        &self,
        dev: &HostDevice,
        members: Vec<HostDevice>,
        strict: bool,
        movable: impl Fn(PciAddress) -> bool,
    ) -> Result<(), VfioError> {
        let group = dev.iommu_group.ok_or(VfioError::NoIommu(dev.address))?;
        // *(issue 28)* The driver Bind will use, modprobed first.
        let driver = super::variant::vfio_driver(dev);
        let loaded = self.load_driver(&driver).await.unwrap_or(false);
        if !loaded {
            return Err(VfioError::VfioUnavailable(driver));
        }
        let unceded: Vec<Unceded> = members
            .into_iter()
            .filter(|m| m.address != dev.address && !is_pci_bridge(m.class))
            // *(issue 28)* Every variant of vfio-pci cedes too.
            .filter(|m| {
                m.driver
                    .as_deref()
                    .is_some_and(|d| !CEDING_DRIVERS.contains(&d))
                    && !super::variant::on_vfio(m)
            })
            .filter(|m| strict || !movable(m.address))
            .map(|m| Unceded {
                address: m.address,
                driver: m.driver,
            })
            .collect();
        if unceded.is_empty() {
            Ok(())
        } else {
            Err(VfioError::GroupConflict {
                address: dev.address,
                group,
                unceded,
            })
        }
    }

    /// Moves `before` (the device as it is now) to its vfio driver
    /// *(issue 28: vfio-pci or the variant the kernel means for it)*;
    /// returns it after.
    pub async fn take(&self, before: &HostDevice) -> Result<HostDevice, VfioError> {
        let driver = super::variant::vfio_driver(before);
        self.take_to(before, &driver, "binding to vfio-pci").await
    }

    /// Moves `before` to `driver` the same way (override, unbind, probe,
    /// verify, and back as it was on failure); `action` names it in errors.
    pub async fn take_to(
        &self,
        before: &HostDevice,
        driver: &str,
        action: &'static str,
    ) -> Result<HostDevice, VfioError> {
        let a = before.address;
        let result = async {
            self.write(a, HostOp::SetOverride(driver.into()))
                .await
                .map_err(|e| (format!("write {driver} to driver_override"), e))?;
            if let Some(d) = &before.driver {
                self.write(a, HostOp::Unbind(d.clone()))
                    .await
                    .map_err(|e| (format!("unbind from {d}"), e))?;
            }
            self.write(a, HostOp::Probe)
                .await
                .map_err(|e| ("drivers_probe".to_string(), e))?;
            self.verify(a, Some(driver))
                .await
                .map_err(|e| ("verify".to_string(), e))
        }
        .await;
        self.finish(action, before, result).await
    }

    /// Gives `before` (on vfio-pci now) back to `original`, or to whatever the
    /// kernel's probe picks when the original is unknown.
    pub async fn give_back(
        &self,
        before: &HostDevice,
        original: Option<&str>,
    ) -> Result<HostDevice, VfioError> {
        let a = before.address;
        let original = original.map(str::to_string);
        let result = async {
            self.write(a, HostOp::ClearOverride)
                .await
                .map_err(|e| ("clear driver_override".to_string(), e))?;
            if let Some(d) = &before.driver {
                self.write(a, HostOp::Unbind(d.clone()))
                    .await
                    .map_err(|e| (format!("unbind from {d}"), e))?;
            }
            self.write(a, HostOp::Probe)
                .await
                .map_err(|e| ("drivers_probe".to_string(), e))?;
            let Some(orig) = &original else {
                let vfio = before.driver.as_deref().unwrap_or(VFIO_DRIVER);
                return self
                    .verify_not(a, vfio)
                    .await
                    .map_err(|e| ("verify".to_string(), e));
            };
            let now = self
                .read(a)
                .await
                .map_err(|e| ("read back".to_string(), e))?;
            let now_driver = now.as_ref().and_then(|d| d.driver.clone());
            if now_driver.as_deref() != Some(orig.as_str()) {
                if let Some(other) = now_driver {
                    self.write(a, HostOp::Unbind(other.clone()))
                        .await
                        .map_err(|e| (format!("unbind from {other}"), e))?;
                }
                self.write(a, HostOp::Bind(orig.clone()))
                    .await
                    .map_err(|e| (format!("bind to {orig}"), e))?;
            }
            self.verify(a, Some(orig))
                .await
                .map_err(|e| ("verify".to_string(), e))
        }
        .await;
        self.finish("giving back", before, result).await
    }

    /// On failure, restores `before` and builds the error that says how it went.
    async fn finish(
        &self,
        action: &'static str,
        before: &HostDevice,
        result: Result<HostDevice, (String, StepError)>,
    ) -> Result<HostDevice, VfioError> {
        let (step, error) = match result {
            Ok(after) => return Ok(after),
            Err(e) => e,
        };
        tracing::warn!(pci_address = %before.address, %step, %error, "{action} failed; restoring the device");
        let outcome = match self.restore(before).await {
            Ok(()) => format!(
                "the device was put back as it was ({})",
                driver_text(before.driver.as_deref())
            ),
            Err(e) => {
                tracing::error!(pci_address = %before.address, error = %e, "could not restore the device");
                format!("restoring it failed too ({e}); check it with `hypemanctl get`")
            }
        };
        Err(VfioError::Step {
            action,
            address: before.address,
            step,
            error,
            outcome,
        })
    }

    /// Brings the device's driver and override back to `target`'s.
    pub async fn restore(&self, target: &HostDevice) -> Result<(), StepError> {
        let a = target.address;
        let override_op = match &target.driver_override {
            Some(d) => HostOp::SetOverride(d.clone()),
            None => HostOp::ClearOverride,
        };
        self.write(a, override_op).await?;
        let now = self.read(a).await?.ok_or(HostError::NoDevice(a))?;
        if now.driver != target.driver {
            if let Some(d) = now.driver {
                self.write(a, HostOp::Unbind(d)).await?;
            }
            if let Some(t) = &target.driver {
                if self.write(a, HostOp::Bind(t.clone())).await.is_err() {
                    self.write(a, HostOp::Probe).await?;
                }
            }
        }
        let after = self.read(a).await?.ok_or(HostError::NoDevice(a))?;
        if after.driver == target.driver && after.driver_override == target.driver_override {
            Ok(())
        } else {
            Err(StepError::Verify(format!(
                "it is on {} with driver_override {:?}",
                driver_text(after.driver.as_deref()),
                after.driver_override
            )))
        }
    }

    async fn verify(&self, a: PciAddress, want: Option<&str>) -> Result<HostDevice, StepError> {
        let now = self.read(a).await?.ok_or(HostError::NoDevice(a))?;
        if now.driver.as_deref() == want {
            Ok(now)
        } else {
            Err(StepError::Verify(format!(
                "the device is on {}, not {}",
                driver_text(now.driver.as_deref()),
                driver_text(want)
            )))
        }
    }

    async fn verify_not(&self, a: PciAddress, not: &str) -> Result<HostDevice, StepError> {
        let now = self.read(a).await?.ok_or(HostError::NoDevice(a))?;
        if now.driver.as_deref() == Some(not) {
            Err(StepError::Verify(format!("the device is still on {not}")))
        } else {
            Ok(now)
        }
    }
}
