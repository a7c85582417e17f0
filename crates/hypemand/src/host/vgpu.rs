//! *(issue 26)* vGPUs as the host's drivers show them: where one can be
//! made (a [`Slot`]), what it offers now, and what it carries.
//!
//! Two frameworks, read the way their drivers write them:
//! - *vendor-specific VFIO* (NVIDIA vGPU 17+ on Ada, Hopper, Blackwell):
//!   each virtual function of the GPU has `nvidia/creatable_vgpu_types`,
//!   lines `1428 : NVIDIA H200X-141C` (after a header line `ID : vGPU
//!   Name`), and `nvidia/current_vgpu_type`, `0` when free;
//! - *mediated devices* (the kernel's `vfio-mediated-device.rst`):
//!   `class/mdev_bus/<parent>/mdev_supported_types/<type>/` with `name`,
//!   `description`, `available_instances`, `device_api` and `devices/` (the
//!   mdevs of that type), the parent being a virtual function (Ampere) or
//!   the GPU itself.
//!
//! Every file is read bounded ([`LIST_LIMIT`], [`TYPES_LIMIT`]) and without
//! blocking (it must be a regular file); a malformed line is skipped, never
//! trusted.

use std::path::Path;

use super::usage::{read_limited, ReadError};
use super::{HostDevice, HostError};
use crate::pci::PciAddress;

/// The most bytes read of one list or attribute.
pub const LIST_LIMIT: u64 = 64 * 1024;
/// The most types read per slot, and mdevs per type.
pub const TYPES_LIMIT: usize = 512;
/// The longest type name kept (longer ones are cut).
const NAME_LIMIT: usize = 128;

/// How a vGPU is made on a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Framework {
    /// A type id written to the function's `nvidia/current_vgpu_type`.
    VendorVfio,
    /// A UUID written to a type's `create`.
    Mdev,
}

impl Framework {
    /// The contract's name: `vendor-vfio` or `mdev`.
    pub fn as_str(self) -> &'static str {
        match self {
            Framework::VendorVfio => hypeman_api::gpu::VENDOR_VFIO,
            Framework::Mdev => hypeman_api::gpu::MDEV,
        }
    }
}

/// One type a slot can make now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgpuType {
    /// The driver's id: `1428` (vendor-VFIO), `nvidia-556` (mdev).
    pub id: String,
    /// The profile name: `NVIDIA L40S-4Q`.
    pub name: String,
    /// Its framebuffer in MiB, when the driver says (mdev `description`) or
    /// the name does (NVIDIA's naming).
    pub framebuffer_mb: Option<u64>,
    /// How many more the driver says it can make on this slot now.
    pub available: u32,
    /// mdev `description`'s `max_instance`: how many of it the whole GPU holds.
    pub max_instances: Option<u32>,
}

/// A mediated device on a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mdev {
    /// Its UUID (`/sys/bus/mdev/devices/<uuid>`).
    pub uuid: String,
    /// The type it was made of.
    pub type_id: String,
}

/// A place a vGPU can be made: a virtual function, or a GPU that is an mdev
/// parent itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The function.
    pub address: PciAddress,
    /// How vGPUs are made on it.
    pub framework: Framework,
    /// vendor-VFIO: the type id set now; `None` when free (`0`).
    pub current: Option<u32>,
    /// mdev: the mediated devices on it.
    pub mdevs: Vec<Mdev>,
    /// What it can make now, as its driver says.
    pub creatable: Vec<VgpuType>,
}

impl Slot {
    /// It carries a vGPU.
    pub fn used(&self) -> bool {
        self.current.is_some() || !self.mdevs.is_empty()
    }
}

/// A type's framebuffer by NVIDIA's naming: the number before the series
/// letter (A, B, C or Q) of the name's last part is the framebuffer in GB
/// (`NVIDIA L40S-4Q` 4 GB, `NVIDIA H200X-1-18C` 18 GB, `GRID A100-1-5CME`
/// 5 GB); `None` when the name does not follow it.
pub fn framebuffer_from_name(name: &str) -> Option<u64> {
    let last = name.rsplit('-').next()?;
    let digits: String = last.chars().take_while(char::is_ascii_digit).collect();
    let series = last[digits.len()..].chars().next()?;
    if digits.is_empty() || digits.len() > 4 || !matches!(series, 'A' | 'B' | 'C' | 'Q') {
        return None;
    }
    digits.parse::<u64>().ok().map(|gb| gb * 1024)
}

/// A name from a driver, made safe to show: control characters become `?`,
/// cut at [`NAME_LIMIT`] characters.
fn shown(s: &str) -> String {
    s.trim()
        .chars()
        .take(NAME_LIMIT)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `creatable_vgpu_types`: one type per `ID : name` line; the header and any
/// line that is not a numeric id and a name are skipped. Each is offered
/// once by this function (`available` 1).
pub fn parse_creatable(text: &str) -> Vec<VgpuType> {
    text.lines()
        .filter_map(|line| {
            let (id, name) = line.split_once(':')?;
            let id = id.trim();
            let name = shown(name);
            let n: u32 = id.parse().ok().filter(|n| *n != 0)?;
            (!name.is_empty()).then(|| VgpuType {
                id: n.to_string(),
                framebuffer_mb: framebuffer_from_name(&name),
                name,
                available: 1,
                max_instances: None,
            })
        })
        .take(TYPES_LIMIT)
        .collect()
}

/// An mdev type's `description`, as NVIDIA's driver writes it
/// (`num_heads=4, frl_config=60, framebuffer=2048M, max_resolution=...,
/// max_instance=24`): its framebuffer in MiB and `max_instance`.
pub fn parse_description(text: &str) -> (Option<u64>, Option<u32>) {
    let mut fb = None;
    let mut max = None;
    for part in text.split([',', '\n']) {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "framebuffer" => {
                fb = v
                    .strip_suffix('M')
                    .and_then(|n| n.parse::<u64>().ok())
                    .or_else(|| {
                        v.strip_suffix('G')
                            .and_then(|n| n.parse::<u64>().ok())
                            .map(|g| g * 1024)
                    });
            }
            "max_instance" => max = v.parse().ok(),
            _ => {}
        }
    }
    (fb, max)
}

/// A type directory's name is a path component later (`create`): only
/// `[A-Za-z0-9_.-]`, at most 64, not `.` or `..`.
pub fn valid_type_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// An mdev's UUID as the kernel names its directory: 8-4-4-4-12 hex digits.
pub fn valid_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| {
            p.len() == n
                && p.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

fn read(path: &Path) -> Result<Option<String>, HostError> {
    match read_limited(path, LIST_LIMIT) {
        Ok(t) => Ok(Some(t)),
        Err(ReadError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(HostError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Up to `limit` names of the entries of `dir` that pass `keep`, sorted;
/// none when it does not exist.
fn entries(dir: &Path, keep: impl Fn(&str) -> bool, limit: usize) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| keep(n))
        .take(limit)
        .collect();
    names.sort();
    names
}

/// The slots of `parent` in the sysfs tree at `root`: the GPU itself (when
/// it is an mdev parent) and each of its virtual functions, in order.
pub fn read_slots(root: &Path, parent: &HostDevice) -> Result<Vec<Slot>, HostError> {
    let mut candidates = vec![parent.address];
    if let Some(s) = parent.sriov {
        candidates.extend(s.current_vfs(parent.address));
    }
    let mut slots = Vec::new();
    for a in candidates {
        let nvidia = root
            .join("bus/pci/devices")
            .join(a.to_string())
            .join("nvidia");
        if let Some(text) = read(&nvidia.join("creatable_vgpu_types"))? {
            let current = read(&nvidia.join("current_vgpu_type"))?
                .and_then(|t| t.trim().parse::<u32>().ok())
                .filter(|n| *n != 0);
            slots.push(Slot {
                address: a,
                framework: Framework::VendorVfio,
                current,
                mdevs: Vec::new(),
                creatable: parse_creatable(&text),
            });
            continue;
        }
        let types_dir = root
            .join("class/mdev_bus")
            .join(a.to_string())
            .join("mdev_supported_types");
        if !types_dir.is_dir() {
            continue;
        }
        let mut slot = Slot {
            address: a,
            framework: Framework::Mdev,
            current: None,
            mdevs: Vec::new(),
            creatable: Vec::new(),
        };
        for id in entries(&types_dir, valid_type_id, TYPES_LIMIT) {
            let dir = types_dir.join(&id);
            let name = read(&dir.join("name"))?
                .map(|n| shown(&n))
                .unwrap_or_default();
            let (fb, max) = read(&dir.join("description"))?
                .map(|d| parse_description(&d))
                .unwrap_or_default();
            let available = read(&dir.join("available_instances"))?
                .and_then(|t| t.trim().parse::<u32>().ok())
                .unwrap_or(0);
            for uuid in entries(&dir.join("devices"), valid_uuid, TYPES_LIMIT) {
                slot.mdevs.push(Mdev {
                    uuid,
                    type_id: id.clone(),
                });
            }
            slot.creatable.push(VgpuType {
                framebuffer_mb: fb.or_else(|| framebuffer_from_name(&name)),
                name,
                id,
                available,
                max_instances: max,
            });
        }
        slots.push(slot);
    }
    Ok(slots)
}

/// Why a vGPU could not be made or removed; says what the function was
/// left with.
#[derive(Debug, thiserror::Error)]
#[error("{action} {what} on {function} failed at step {step}: {error}; {outcome}")]
pub struct VgpuError {
    pub action: &'static str,
    pub what: String,
    pub function: PciAddress,
    pub step: String,
    pub error: super::door::StepError,
    pub outcome: String,
}

impl VgpuError {
    pub fn is_timeout(&self) -> bool {
        self.error.is_timeout()
    }
}

/// What a function carries now, as its driver shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    /// Nothing (vendor-VFIO `0`; no such mdev).
    Nothing,
    /// vendor-VFIO: this type id.
    Type(u32),
    /// mdev: it exists.
    Mdev,
}

impl super::door::Door {
    /// What `function` carries now (vendor-VFIO), or whether the mdev `uuid`
    /// exists.
    pub async fn carried(
        &self,
        function: PciAddress,
        uuid: Option<&str>,
    ) -> Result<Carried, super::door::StepError> {
        match uuid {
            Some(u) => {
                let u = u.to_string();
                let there = self.host_call(function, move |h| h.mdev_exists(&u)).await?;
                Ok(if there {
                    Carried::Mdev
                } else {
                    Carried::Nothing
                })
            }
            None => Ok(self
                .host_call(function, move |h| h.current_vgpu_type(function))
                .await?
                .map_or(Carried::Nothing, Carried::Type)),
        }
    }

    /// The nodes a VMM opens for the vGPU on `function` (its mdev's, if any).
    pub async fn vfio_nodes(
        &self,
        function: PciAddress,
        uuid: Option<&str>,
    ) -> Result<Vec<String>, super::door::StepError> {
        let u = uuid.map(str::to_string);
        self.host_call(function, move |h| h.vfio_nodes(function, u.as_deref()))
            .await
    }

    /// Makes a vGPU of `type_id` on `function`: vendor-VFIO writes the id
    /// and reads it back, writing `0` on any failure or mismatch; mdev
    /// (`uuid`) writes the UUID to the type's `create` and looks for the
    /// mdev (the kernel makes it before the write returns), removing what
    /// may have been made when it is not there. Never rebinds anything.
    pub async fn make_vgpu(
        &self,
        function: PciAddress,
        type_id: &str,
        uuid: Option<&str>,
    ) -> Result<(), VgpuError> {
        let fail = |step: &str, error, outcome: String| VgpuError {
            action: "making",
            what: format!("a vGPU of type {type_id}"),
            function,
            step: step.to_string(),
            error,
            outcome,
        };
        match uuid {
            None => {
                let id: u32 = type_id.parse().map_err(|_| {
                    fail(
                        "parse",
                        super::door::StepError::Verify(format!("{type_id:?} is not a type id")),
                        "nothing was written".into(),
                    )
                })?;
                let written = self.write(function, super::HostOp::SetVgpuType(id)).await;
                let checked = match written {
                    Err(e) => Err(("write the type id to current_vgpu_type", e)),
                    Ok(()) => match self.carried(function, None).await {
                        Ok(Carried::Type(t)) if t == id => Ok(()),
                        Ok(other) => Err((
                            "read back current_vgpu_type",
                            super::door::StepError::Verify(format!(
                                "it reads {}, not {id}",
                                match other {
                                    Carried::Type(t) => t.to_string(),
                                    _ => "0".into(),
                                }
                            )),
                        )),
                        Err(e) => Err(("read back current_vgpu_type", e)),
                    },
                };
                let Err((step, error)) = checked else {
                    return Ok(());
                };
                // 0 is written back unless the function shows another type:
                // that vGPU is not ours to remove.
                if let Ok(Carried::Type(t)) = self.carried(function, None).await {
                    if t != id {
                        let outcome = format!(
                            "the function carries type {t}, not ours: it was left as it is"
                        );
                        return Err(fail(step, error, outcome));
                    }
                }
                let outcome = match self.write(function, super::HostOp::SetVgpuType(0)).await {
                    Ok(()) => "0 was written back: the function is free".to_string(),
                    Err(e) => format!(
                        "writing 0 back failed too ({e}); check it with `hypemanctl vgpu list`"
                    ),
                };
                Err(fail(step, error, outcome))
            }
            Some(u) => {
                let op = super::HostOp::CreateMdev {
                    type_id: type_id.to_string(),
                    uuid: u.to_string(),
                };
                let written = self.write(function, op).await;
                let checked = match written {
                    Err(e) => Err(("write the UUID to create", e)),
                    Ok(()) => match self.carried(function, Some(u)).await {
                        Ok(Carried::Mdev) => Ok(()),
                        Ok(_) => Err((
                            "look for the mdev",
                            super::door::StepError::Verify(format!(
                                "bus/mdev/devices/{u} did not appear"
                            )),
                        )),
                        Err(e) => Err(("look for the mdev", e)),
                    },
                };
                let Err((step, error)) = checked else {
                    return Ok(());
                };
                // Whatever was made goes.
                let outcome = match self.carried(function, Some(u)).await {
                    Ok(Carried::Nothing) => "no mdev was left behind".to_string(),
                    _ => match self.unmake_vgpu(function, Some(u)).await {
                        Ok(()) => "the mdev was removed".to_string(),
                        Err(e) => format!("removing the mdev failed too ({e})"),
                    },
                };
                Err(fail(step, error, outcome))
            }
        }
    }

    /// Removes the vGPU on `function`: vendor-VFIO writes `0`, mdev writes
    /// `1` to the mdev's `remove`.
    pub async fn unmake_vgpu(
        &self,
        function: PciAddress,
        uuid: Option<&str>,
    ) -> Result<(), super::door::StepError> {
        match uuid {
            None => self.write(function, super::HostOp::SetVgpuType(0)).await,
            Some(u) => {
                self.write(function, super::HostOp::RemoveMdev(u.to_string()))
                    .await
            }
        }
    }
}

/// A function's `nvidia/current_vgpu_type` under its directory `dir`:
/// `None` for 0.
pub fn read_current(dir: &Path) -> Result<Option<u32>, HostError> {
    let path = dir.join("nvidia/current_vgpu_type");
    let text = read(&path)?.ok_or_else(|| HostError::Io {
        path: path.display().to_string(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let n: u32 = text.trim().parse().map_err(|_| HostError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(format!("{:?} is not a type id", text.trim())),
    })?;
    Ok((n != 0).then_some(n))
}

fn refused(what: &str) -> HostError {
    HostError::Io {
        path: what.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    }
}

/// `class/mdev_bus/<function>/mdev_supported_types/<type>/create`, for a
/// type id and a UUID that pass their checks.
pub fn mdev_create_path(
    root: &Path,
    function: PciAddress,
    type_id: &str,
    uuid: &str,
) -> Result<std::path::PathBuf, HostError> {
    if !valid_type_id(type_id) || !valid_uuid(uuid) {
        return Err(refused("an mdev type or UUID"));
    }
    Ok(root
        .join("class/mdev_bus")
        .join(function.to_string())
        .join("mdev_supported_types")
        .join(type_id)
        .join("create"))
}

/// `bus/mdev/devices/<uuid>`, for a UUID that passes its check.
pub fn mdev_dir(root: &Path, uuid: &str) -> Result<std::path::PathBuf, HostError> {
    if !valid_uuid(uuid) {
        return Err(refused("an mdev UUID"));
    }
    Ok(root.join("bus/mdev/devices").join(uuid))
}

/// The VFIO nodes of the device whose directory is `dir`: its cdev
/// (`vfio-dev/vfioN` -> `/dev/vfio/devices/vfioN`) where the kernel offers
/// one, else its group (`iommu_group` -> `/dev/vfio/<group>`); none if
/// neither is there.
pub fn vfio_nodes(dir: &Path) -> Vec<String> {
    let cdevs = entries(
        &dir.join("vfio-dev"),
        |n| {
            n.strip_prefix("vfio")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        },
        8,
    );
    if !cdevs.is_empty() {
        return cdevs
            .into_iter()
            .map(|c| format!("/dev/vfio/devices/{c}"))
            .collect();
    }
    crate::pci::sysfs::link_name(&dir.join("iommu_group"))
        .filter(|g| g.parse::<u32>().is_ok())
        .map(|g| vec![format!("/dev/vfio/{g}")])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creatable_lists_are_read_as_the_driver_writes_them() {
        let text = "ID    : vGPU Name\n1428 : NVIDIA H200X-141C\n1414 : NVIDIA H200X-1-18C\n\nbogus\n0 : zero\nx : NVIDIA X-1Q\n99999999999 : too big\n1155:NVIDIA L40S-4Q\n";
        let t = parse_creatable(text);
        let got: Vec<(&str, &str, Option<u64>)> = t
            .iter()
            .map(|t| (t.id.as_str(), t.name.as_str(), t.framebuffer_mb))
            .collect();
        assert_eq!(
            got,
            [
                ("1428", "NVIDIA H200X-141C", Some(141 * 1024)),
                ("1414", "NVIDIA H200X-1-18C", Some(18 * 1024)),
                ("1155", "NVIDIA L40S-4Q", Some(4096)),
            ]
        );
        let flood = "1 : NVIDIA L40S-1Q\n".repeat(10_000);
        assert_eq!(parse_creatable(&flood).len(), TYPES_LIMIT);
        let hostile = format!("7 : {}\u{1b}[2J\n", "x".repeat(500));
        let t = parse_creatable(&hostile);
        assert_eq!(t[0].name.chars().count(), NAME_LIMIT);
        assert!(!t[0].name.contains('\u{1b}'));
    }

    #[test]
    fn framebuffer_by_nvidias_naming() {
        for (name, fb) in [
            ("NVIDIA L40S-48Q", Some(48 * 1024)),
            ("GRID A100-4C", Some(4096)),
            ("GRID A100-1-5CME", Some(5 * 1024)),
            ("NVIDIA L40S-2B", Some(2048)),
            ("NVIDIA RTX", None),
            ("NVIDIA L40S-Q", None),
            ("L40S-4X", None),
            ("", None),
        ] {
            assert_eq!(framebuffer_from_name(name), fb, "{name}");
        }
    }

    #[test]
    fn descriptions_give_framebuffer_and_max_instance() {
        let d = "num_heads=1, frl_config=60, framebuffer=5120M, max_resolution=4096x2160, max_instance=8\n";
        assert_eq!(parse_description(d), (Some(5120), Some(8)));
        assert_eq!(parse_description("framebuffer=lots"), (None, None));
    }

    #[test]
    fn ids_and_uuids_that_become_paths_are_checked() {
        assert!(valid_type_id("nvidia-556"));
        for bad in ["", ".", "..", "a/b", "x y", &"a".repeat(65)] {
            assert!(!valid_type_id(bad), "{bad:?}");
        }
        assert!(valid_uuid("aa618089-8b16-4d01-a136-25a0f3c73123"));
        for bad in [
            "aa618089-8b16-4d01-a136",
            "AA618089-8b16-4d01-a136-25a0f3c73123",
            "../../../x",
        ] {
            assert!(!valid_uuid(bad), "{bad:?}");
        }
    }
}
