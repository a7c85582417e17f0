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
