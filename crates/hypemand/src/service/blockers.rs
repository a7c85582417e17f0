//! Why a PCI function must not be taken from the host: decided from what the
//! host says of the function, of how it uses it ([`Use`]), and of its IOMMU
//! group. Every kind is one [`Kind`], which says its code, its [`Strength`]
//! and the error it refuses with. Hard blockers (`no-iommu`, `bridge`) can
//! never be overridden; partitioned ones (`vfs-enabled`, issue 26) neither,
//! but they do not refuse Register (that is how the partitions are managed);
//! soft ones (`boot-vga`, `mounted`, `network-active`,
//! `open-by`, `group`) mean the host is using it, and only the force
//! authorization overrides them.
//! `usage-unknown` is soft too: whether the host uses the function could not
//! be established (the walk of /proc ran out of time, or one of its files
//! could not be read), so it is not passable, and Bind answers `Busy`.

use crate::host::usage::{Use, Walked};
use crate::host::HostDevice;
use crate::pci::class::{is_bridge, is_pci_bridge};
use crate::pci::PciAddress;

/// Every kind of blocker: its code, how strongly it blocks, and the error
/// it refuses with. A new kind is added here, and the compiler points at
/// every place that must say what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The function has no IOMMU group.
    NoIommu,
    /// A bridge of any kind (base class 0x06).
    Bridge,
    /// The boot display.
    BootVga,
    /// A block device of the function is mounted or is active swap.
    Mounted,
    /// A network interface of the function is up and carries routes.
    NetworkActive,
    /// A device node of the function is open.
    OpenBy,
    /// Whether the host uses the function could not be established.
    UsageUnknown,
    /// A member of the function's IOMMU group is blocked; `unknown` when
    /// that member's blocker is `UsageUnknown`.
    Group {
        /// The member's use is unknown, not known.
        unknown: bool,
    },
    /// *(issue 26)* A physical function with SR-IOV virtual functions
    /// enabled: its driver would tear them out from under their users.
    VfsEnabled,
    /// *(issue 26)* A GPU whose functions carry vGPUs.
    Vgpus,
    /// *(issue 28)* Another card than the one registered sits at the address.
    HardwareChanged,
}

/// How a blocker stands in the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strength {
    /// vfio-pci cannot take the function at all: Register, Bind and Attach
    /// refuse it, forced or not.
    Hard,
    /// The function is partitioned (virtual functions, vGPUs): Bind and
    /// Attach refuse it, forced or not, but it can be registered, since that
    /// is how its partitions are managed.
    Partitioned,
    /// The host is (or may be) using it: Bind and Attach refuse unless forced.
    Soft,
}

impl Kind {
    /// The code clients see (`Blocker.code`).
    pub const fn code(self) -> &'static str {
        match self {
            Kind::NoIommu => "no-iommu",
            Kind::Bridge => "bridge",
            Kind::BootVga => "boot-vga",
            Kind::Mounted => "mounted",
            Kind::NetworkActive => "network-active",
            Kind::OpenBy => "open-by",
            Kind::UsageUnknown => "usage-unknown",
            Kind::Group { .. } => "group",
            Kind::VfsEnabled => "vfs-enabled",
            Kind::Vgpus => "vgpus",
            Kind::HardwareChanged => "hardware-changed",
        }
    }

    /// How strongly it blocks.
    pub const fn strength(self) -> Strength {
        match self {
            Kind::NoIommu | Kind::Bridge | Kind::HardwareChanged => Strength::Hard,
            Kind::VfsEnabled | Kind::Vgpus => Strength::Partitioned,
            Kind::BootVga
            | Kind::Mounted
            | Kind::NetworkActive
            | Kind::OpenBy
            | Kind::UsageUnknown
            | Kind::Group { .. } => Strength::Soft,
        }
    }

    /// Not a known use, only that none could be ruled out.
    pub const fn unknown(self) -> bool {
        matches!(self, Kind::UsageUnknown | Kind::Group { unknown: true })
    }

    /// The error a change this blocker stops is refused with, by itself.
    pub fn refusal(self, message: String) -> hypeman_api::Error {
        use hypeman_api::Error;
        match self {
            Kind::NoIommu => Error::NoIommu(message),
            Kind::Bridge => Error::NotPassable(message),
            Kind::HardwareChanged => Error::HardwareChanged(message),
            Kind::UsageUnknown | Kind::Group { unknown: true } => Error::Busy(message),
            Kind::BootVga
            | Kind::Mounted
            | Kind::NetworkActive
            | Kind::OpenBy
            | Kind::VfsEnabled
            | Kind::Vgpus
            | Kind::Group { unknown: false } => Error::HostInUse(message),
        }
    }
}

/// One reason, about `address` (the function itself or a group member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    /// What kind of reason.
    pub kind: Kind,
    /// What it is, for a person.
    pub message: String,
    /// The function it concerns.
    pub address: PciAddress,
}

impl Blocker {
    /// Never overridden: vfio-pci cannot take the function at all.
    pub fn hard(&self) -> bool {
        self.kind.strength() == Strength::Hard
    }

    /// Overridden by the force authorization.
    pub fn soft(&self) -> bool {
        self.kind.strength() == Strength::Soft
    }

    /// The contract's form of it.
    pub fn record(&self) -> hypeman_api::Blocker {
        hypeman_api::Blocker {
            code: self.kind.code().to_string(),
            message: self.message.clone(),
            pci_address: self.address.to_string(),
        }
    }
}

/// A name the host reported (a process's `comm`, a mount point), made safe to
/// show: control characters become `?`, and it is cut at 256 characters.
fn shown(s: &str) -> String {
    s.chars()
        .take(256)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What one use of the host means, as a blocker code and message.
fn from_use(address: PciAddress, u: &Use) -> (Kind, String) {
    match u {
        Use::Mounted {
            device,
            mount_points,
        } => (
            Kind::Mounted,
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
            Kind::Mounted,
            format!("{address}: {} is active swap", shown(device)),
        ),
        Use::NetworkActive { interface } => (
            Kind::NetworkActive,
            format!(
                "{address}: network interface {} is up and carries routes",
                shown(interface)
            ),
        ),
        Use::OpenBy { pid, comm, node } => (
            Kind::OpenBy,
            format!(
                "{address}: {} is open by process {pid} ({})",
                shown(node),
                shown(comm)
            ),
        ),
    }
}

/// The function's own blockers; `uses` is how the host uses it, `unknown`
/// why that could not be established, if it could not.
pub fn own(
    dev: &HostDevice,
    virtual_machine: bool,
    uses: &[Use],
    unknown: Option<&str>,
) -> Vec<Blocker> {
    let mut out = Vec::new();
    let mut add = |kind, message: String| {
        out.push(Blocker {
            kind,
            message,
            address: dev.address,
        })
    };
    if dev.iommu_group.is_none() {
        add(
            Kind::NoIommu,
            if virtual_machine {
                format!("{} has no IOMMU group: this is a virtual machine without a virtual IOMMU; give the VM one (QEMU: -device intel-iommu or virtio-iommu) or pass the device through on the host that runs it", dev.address)
            } else {
                format!("{} has no IOMMU group: the IOMMU is off; enable VT-d (Intel) or AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on", dev.address)
            },
        );
    }
    if is_bridge(dev.class) {
        add(
            Kind::Bridge,
            format!(
                "{} is a {}: bridges stay with the host (vfio-pci refuses them)",
                dev.address,
                crate::pci::class::bridge_kind(dev.class)
            ),
        );
    }
    if let Some(sriov) = dev.sriov.filter(|s| s.num_vfs > 0) {
        let vfs = sriov.current_vfs(dev.address);
        add(
            Kind::VfsEnabled,
            format!(
                "{} has {} SR-IOV virtual functions enabled ({}): moving the physical function would tear them out from under their users; set its virtual functions to 0 first (`hypemanctl sriov {} 0`)",
                dev.address,
                sriov.num_vfs,
                if vfs.is_empty() { "their addresses are not known".to_string() } else { super::sriov::named(&vfs) },
                dev.address
            ),
        );
    }
    if dev.boot_vga {
        add(
            Kind::BootVga,
            format!(
                "{} is the boot display: the host's console is on it",
                dev.address
            ),
        );
    }
    for u in uses {
        let (kind, message) = from_use(dev.address, u);
        add(kind, message);
    }
    if let Some(why) = unknown {
        add(
            Kind::UsageUnknown,
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
            .filter(Blocker::soft)
        {
            out.push(Blocker {
                kind: Kind::Group {
                    unknown: b.kind.unknown(),
                },
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
    // A known use outweighs any number of unknown ones.
    if let Some(known) = blockers.iter().find(|b| !b.kind.unknown()) {
        return known.kind.refusal(describe(blockers));
    }
    Kind::UsageUnknown.refusal(format!(
            "cannot tell whether the host is using this device or its IOMMU group, nothing was changed: {}; try again, or force (--force, BindWithOptions/AttachWithOptions force) to take it anyway",
            list(blockers)
        ))
}

fn list(blockers: &[Blocker]) -> String {
    blockers
        .iter()
        .map(|b| format!("[{}] {}", b.kind.code(), b.message))
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
    Some(b.kind.refusal(b.message))
}

/// The refusal of a move (Bind, Attach) that no force overrides: a hard
/// blocker's, else a partitioned one's (`HostInUse`, naming the partitions).
pub fn move_refusal(dev: &HostDevice, virtual_machine: bool) -> Option<hypeman_api::Error> {
    hard_refusal(dev, virtual_machine).or_else(|| {
        let b = own(dev, virtual_machine, &[], None)
            .into_iter()
            .find(|b| b.kind.strength() == Strength::Partitioned)?;
        Some(b.kind.refusal(b.message))
    })
}

/// *(issue 26)* The `vgpus` blocker of `address` when `slots` (its
/// functions) carry vGPUs, naming them.
pub fn vgpus(address: PciAddress, slots: &[crate::host::vgpu::Slot]) -> Option<Blocker> {
    let used: Vec<String> = slots
        .iter()
        .filter(|s| s.used())
        .map(|s| match (&s.current, s.mdevs.first()) {
            (Some(t), _) => format!("{} (type {t})", s.address),
            (None, Some(m)) => format!("{} (mdev {})", s.address, m.uuid),
            (None, None) => s.address.to_string(),
        })
        .collect();
    if used.is_empty() {
        return None;
    }
    let shown: Vec<String> = used.iter().take(8).cloned().collect();
    let more = if used.len() > 8 {
        format!(" and {} more", used.len() - 8)
    } else {
        String::new()
    };
    Some(Blocker {
        kind: Kind::Vgpus,
        message: format!(
            "{address} carries {} vGPUs ({}{more}): it keeps its driver, its virtual functions and its registration while they exist; delete them first",
            used.len(),
            shown.join(", ")
        ),
        address,
    })
}

/// The codes of some blockers, for a log line: `boot-vga, open-by`.
pub fn codes(blockers: &[Blocker]) -> String {
    let mut c: Vec<&str> = blockers.iter().map(|b| b.kind.code()).collect();
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
        let mut out = of(dev, members, vm, &walked);
        out.extend(self.vgpus_blocker(dev).await?);
        Ok(out)
    }
}

/// *(issue 28)* The `hardware-changed` blocker of a registered device
/// whose address now holds another card.
pub fn hardware_changed(stored: &crate::store::StoredDevice, host: &HostDevice) -> Option<Blocker> {
    super::identity::changed(stored, host).map(|message| Blocker {
        kind: Kind::HardwareChanged,
        message,
        address: host.address,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Kind; 12] = [
        Kind::NoIommu,
        Kind::Bridge,
        Kind::BootVga,
        Kind::Mounted,
        Kind::NetworkActive,
        Kind::OpenBy,
        Kind::UsageUnknown,
        Kind::Group { unknown: false },
        Kind::Group { unknown: true },
        Kind::VfsEnabled,
        Kind::Vgpus,
        Kind::HardwareChanged,
    ];

    /// Each kind refuses with its own error: the hard ones with the typed
    /// refusals Register answers, a known use with HostInUse, an unknown one
    /// with Busy (retryable).
    #[test]
    fn every_kind_says_its_code_strength_and_refusal() {
        use hypeman_api::Error;
        for kind in ALL {
            let e = kind.refusal("m".into());
            let expected = match kind.code() {
                "no-iommu" => Error::NoIommu("m".into()),
                "bridge" => Error::NotPassable("m".into()),
                "hardware-changed" => Error::HardwareChanged("m".into()),
                _ if kind.unknown() => Error::Busy("m".into()),
                _ => Error::HostInUse("m".into()),
            };
            assert_eq!(e, expected, "{kind:?}");
            let hard = matches!(kind.code(), "no-iommu" | "bridge" | "hardware-changed");
            assert_eq!(kind.strength() == Strength::Hard, hard, "{kind:?}");
        }
        let mut codes: Vec<&str> = ALL.iter().map(|k| k.code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), 11, "one code per kind: {codes:?}");
        let partitioned: Vec<Kind> = ALL
            .into_iter()
            .filter(|k| k.strength() == Strength::Partitioned)
            .collect();
        assert_eq!(partitioned, [Kind::VfsEnabled, Kind::Vgpus]);
    }

    /// A known use among unknown ones is HostInUse; unknown ones alone, Busy.
    #[test]
    fn a_known_use_outweighs_unknown_ones() {
        let a = PciAddress::parse("0000:01:00.0").unwrap();
        let b = |kind| Blocker {
            kind,
            message: "m".into(),
            address: a,
        };
        let unknown = [b(Kind::UsageUnknown), b(Kind::Group { unknown: true })];
        assert!(matches!(refusal(&unknown), hypeman_api::Error::Busy(_)));
        let mixed = [b(Kind::UsageUnknown), b(Kind::OpenBy)];
        assert!(matches!(refusal(&mixed), hypeman_api::Error::HostInUse(_)));
    }
}
