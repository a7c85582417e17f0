//! Why a PCI function must not be taken from the host: decided from what the
//! host says of the function, of how it uses it ([`Use`]), and of its IOMMU
//! group. Hard blockers (`no-iommu`, `bridge`) can never be overridden; soft
//! ones (`boot-vga`, `mounted`, `network-active`, `open-by`, `group`) mean
//! the host is using it, and only the force authorization overrides them.
//! `usage-unknown` is soft too: whether the host uses the function could not
//! be established (the walk of /proc ran out of time, or one of its files
//! could not be read), so it is not passable, and Bind answers `Busy`.

use crate::host::usage::{Use, Walked};
use crate::host::HostDevice;
use crate::pci::class::{is_bridge, is_pci_bridge};
use crate::pci::PciAddress;

/// One reason, about `address` (the function itself or a group member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub code: &'static str,
    pub message: String,
    pub address: PciAddress,
    /// Not a known use, only that none could be ruled out (`usage-unknown`,
    /// or a `group` blocker made of one).
    pub unknown: bool,
}

impl Blocker {
    /// Never overridden: vfio-pci cannot take the function at all.
    pub fn hard(&self) -> bool {
        HARD.contains(&self.code)
    }

    pub fn record(&self) -> hypeman_api::Blocker {
        hypeman_api::Blocker {
            code: self.code.to_string(),
            message: self.message.clone(),
            pci_address: self.address.to_string(),
        }
    }
}

/// The codes that can never be overridden, forced or not.
pub const HARD: [&str; 2] = ["no-iommu", "bridge"];

/// A name the host reported (a process's `comm`, a mount point), made safe to
/// show: control characters become `?`, and it is cut at 256 characters.
fn shown(s: &str) -> String {
    s.chars()
        .take(256)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What one use of the host means, as a blocker code and message.
fn from_use(address: PciAddress, u: &Use) -> (&'static str, String) {
    match u {
        Use::Mounted {
            device,
            mount_points,
        } => (
            "mounted",
            format!(
                "{address}: {} is mounted on {}",
                shown(device),
                mount_points
                    .iter()
                    .map(|m| shown(m))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Use::Swap { device } => (
            "mounted",
            format!("{address}: {} is active swap", shown(device)),
        ),
        Use::NetworkActive { interface } => (
            "network-active",
            format!(
                "{address}: network interface {} is up and carries routes",
                shown(interface)
            ),
        ),
        Use::OpenBy { pid, comm, node } => (
            "open-by",
            format!(
                "{address}: {} is open by process {pid} ({})",
                shown(node),
                shown(comm)
            ),
        ),
    }
}

/// The code of a function whose use could not be established.
pub const UNKNOWN: &str = "usage-unknown";

/// The function's own blockers; `uses` is how the host uses it, `unknown`
/// why that could not be established, if it could not.
pub fn own(
    dev: &HostDevice,
    virtual_machine: bool,
    uses: &[Use],
    unknown: Option<&str>,
) -> Vec<Blocker> {
    let mut out = Vec::new();
    let mut add = |code, message: String| {
        out.push(Blocker {
            code,
            message,
            address: dev.address,
            unknown: code == UNKNOWN,
        })
    };
    if dev.iommu_group.is_none() {
        add(
            "no-iommu",
            if virtual_machine {
                format!("{} has no IOMMU group: this is a virtual machine without a virtual IOMMU; give the VM one (QEMU: -device intel-iommu or virtio-iommu) or pass the device through on the host that runs it", dev.address)
            } else {
                format!("{} has no IOMMU group: the IOMMU is off; enable VT-d (Intel) or AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on", dev.address)
            },
        );
    }
    if is_bridge(dev.class) {
        add(
            "bridge",
            format!(
                "{} is a {}: bridges stay with the host (vfio-pci refuses them)",
                dev.address,
                crate::pci::class::bridge_kind(dev.class)
            ),
        );
    }
    if dev.boot_vga {
        add(
            "boot-vga",
            format!(
                "{} is the boot display: the host's console is on it",
                dev.address
            ),
        );
    }
    for u in uses {
        let (code, message) = from_use(dev.address, u);
        add(code, message);
    }
    if let Some(why) = unknown {
        add(
            UNKNOWN,
            format!(
                "{}: cannot tell whether the host uses it: {}",
                dev.address,
                shown(why)
            ),
        );
    }
    out
}

/// The function's blockers, its group's included: a member (other than a
/// bridge, which stays with the host in any case) that the host uses blocks
/// the whole group.
pub fn of(
    dev: &HostDevice,
    members: &[HostDevice],
    virtual_machine: bool,
    walked: &Walked,
) -> Vec<Blocker> {
    let uses = |a: &PciAddress| walked.usage.get(a).map(Vec::as_slice).unwrap_or_default();
    let unknown = |a: &PciAddress| walked.unknown.get(a).map(String::as_str);
    let mut out = own(
        dev,
        virtual_machine,
        uses(&dev.address),
        unknown(&dev.address),
    );
    for m in members
        .iter()
        .filter(|m| m.address != dev.address && !is_pci_bridge(m.class))
    {
        for b in own(m, virtual_machine, uses(&m.address), unknown(&m.address))
            .into_iter()
            .filter(|b| !b.hard())
        {
            out.push(Blocker {
                unknown: b.unknown,
                code: "group",
                message: format!(
                    "{} shares IOMMU group {} with {}: {}",
                    dev.address,
                    dev.iommu_group.unwrap_or_default(),
                    m.address,
                    b.message
                ),
                address: m.address,
            });
        }
    }
    out
}

/// The refusal of a Bind or Attach the soft blockers stand in the way of:
/// `HostInUse` with every blocker when any is a known use; `Busy` when none
/// is, only that a use could not be ruled out (try again, or force).
pub fn refusal(blockers: &[Blocker]) -> hypeman_api::Error {
    if blockers.iter().all(|b| b.unknown) {
        hypeman_api::Error::Busy(format!(
            "cannot tell whether the host is using this device or its IOMMU group, nothing was changed: {}; try again, or force (--force, BindWithOptions/AttachWithOptions force) to take it anyway",
            list(blockers)
        ))
    } else {
        hypeman_api::Error::HostInUse(describe(blockers))
    }
}

fn list(blockers: &[Blocker]) -> String {
    blockers
        .iter()
        .map(|b| format!("[{}] {}", b.code, b.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The message of `HostInUse`: every blocker, one after another.
pub fn describe(blockers: &[Blocker]) -> String {
    format!(
        "the host is using this device or its IOMMU group, nothing was changed: {}",
        list(blockers)
    )
}

/// The typed refusal for a function's hard blockers (its own, not its
/// group's): `NoIommu` or `NotPassable`. Register, Bind and Attach answer it,
/// forced or not.
pub fn hard_refusal(dev: &HostDevice, virtual_machine: bool) -> Option<hypeman_api::Error> {
    let b = own(dev, virtual_machine, &[], None)
        .into_iter()
        .find(Blocker::hard)?;
    Some(match b.code {
        "no-iommu" => hypeman_api::Error::NoIommu(b.message),
        _ => hypeman_api::Error::NotPassable(b.message),
    })
}

/// The codes of some blockers, for a log line: `boot-vga, open-by`.
pub fn codes(blockers: &[Blocker]) -> String {
    let mut c: Vec<&str> = blockers.iter().map(|b| b.code).collect();
    c.dedup();
    c.join(", ")
}

impl super::Service {
    /// How the host uses these functions, read under the deadline. The
    /// holder service's own process is left out: the daemon stops that
    /// service around the unbind instead (see [`crate::host::units`]).
    pub(crate) async fn host_usage(
        &self,
        addresses: Vec<PciAddress>,
    ) -> super::error::Result<Walked> {
        let mut walked = self.door.usage(addresses).await;
        let usage = &mut walked.usage;
        let opens = usage
            .values()
            .flatten()
            .any(|u| matches!(u, Use::OpenBy { .. }));
        if opens {
            let holder = self
                .door
                .holder(crate::host::units::NVIDIA_DRIVER)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot ask systemd about nvidia-persistenced");
                    None
                });
            if let Some(pid) = holder.and_then(|h| h.main_pid) {
                for uses in usage.values_mut() {
                    uses.retain(|u| !matches!(u, Use::OpenBy { pid: p, .. } if *p == pid));
                }
                usage.retain(|_, uses| !uses.is_empty());
            }
        }
        Ok(walked)
    }

    /// A function's blockers, its IOMMU group's included, read now.
    pub async fn blockers_now(
        &self,
        dev: &HostDevice,
        members: &[HostDevice],
    ) -> super::error::Result<Vec<Blocker>> {
        let vm = self.door.virtual_machine().await.unwrap_or(false);
        let mut addresses: Vec<PciAddress> = members.iter().map(|m| m.address).collect();
        if !addresses.contains(&dev.address) {
            addresses.push(dev.address);
        }
        let walked = self.host_usage(addresses).await?;
        Ok(of(dev, members, vm, &walked))
    }
}
