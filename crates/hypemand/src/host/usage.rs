//! How the host is using a PCI function right now: mounted block devices,
//! active swap, network interfaces that carry routes, and processes holding
//! the function's device nodes open.
//!
//! Why here and not in sysfs alone: sysfs says what hangs under a function
//! (`class/block`, `class/net`, `class/drm`), but whether the host *uses* it is
//! in `/proc` (mountinfo, swaps, routes, open fds). The real backend reads
//! both under `--host-root`; the simulated one declares the same facts per
//! device. The service turns each [`Use`] into a blocker.
//!
//! Everything read here may be hostile or absent: a missing file means
//! "nothing of that kind" (a host without swap has no `/proc/swaps` lines), a
//! name is only ever a directory entry or a link target, never a path built
//! from a caller's input.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::pci::PciAddress;

/// One way the host uses a function.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Use {
    /// A block device under the function (a partition, or an md/dm/LVM
    /// device stacked on one) is mounted here.
    Mounted {
        device: String,
        mount_points: Vec<String>,
    },
    /// A block device under the function is active swap.
    Swap { device: String },
    /// A network interface under the function is up and carries a route.
    NetworkActive { interface: String },
    /// A process holds one of the function's device nodes open.
    OpenBy {
        pid: u32,
        comm: String,
        node: String,
    },
}

/// Uses per function; a function the host does not use has no entry.
pub type Usage = BTreeMap<PciAddress, Vec<Use>>;

/// Whether a route to `dest` counts as the host using the interface:
/// link-local and multicast routes exist on every interface that is up and
/// say nothing about traffic.
pub fn route_counts(dest: IpAddr) -> bool {
    match dest {
        IpAddr::V4(a) => !(a.is_link_local() || a.is_multicast()),
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            let link_local = first & 0xffc0 == 0xfe80;
            !(link_local || a.is_multicast())
        }
    }
}

/// Parses a route destination as fixtures write it: `default`, `10.0.0.0/8`,
/// `2001:db8::/32`. The prefix length is checked, then dropped.
pub fn parse_route(text: &str) -> Option<IpAddr> {
    if text == "default" {
        return Some(IpAddr::from([0u8, 0, 0, 0]));
    }
    let (addr, len) = text.split_once('/').unwrap_or((text, "128"));
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() && text.contains('/') {
        32
    } else {
        128
    };
    (len <= max).then_some(addr)
}

/// Limits on what one reading walks, so a host with pathological numbers of
/// processes or holders cannot make one ListAvailable unbounded.
const MAX_HOLDERS: usize = 256;
const MAX_FDS_PER_PROCESS: usize = 65_536;

/// The real host's view: sysfs at `sys`, procfs at `proc`.
pub struct HostRoot {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl HostRoot {
    /// The uses of each of `addresses`.
    pub fn read(&self, addresses: &[PciAddress]) -> Usage {
        let wanted: HashMap<String, PciAddress> =
            addresses.iter().map(|a| (a.to_string(), *a)).collect();
        let mut usage = Usage::new();
        self.block(&wanted, &mut usage);
        self.net(&wanted, &mut usage);
        self.open_nodes(&wanted, &mut usage);
        for uses in usage.values_mut() {
            uses.sort();
            uses.dedup();
        }
        usage
    }

    /// The function a sysfs path lies under: the last PCI address among its
    /// components once links are resolved (a disk under an NVMe drive under
    /// a root port belongs to the drive), if it is one of the wanted ones.
    fn owner(wanted: &HashMap<String, PciAddress>, path: &Path) -> Option<PciAddress> {
        let real = std::fs::canonicalize(path).ok()?;
        let last = real
            .components()
            .rev()
            .find_map(|c| PciAddress::parse(c.as_os_str().to_str()?).ok())?;
        wanted.get(&last.to_string()).copied()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    fn read_trim(path: &Path) -> Option<String> {
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// Block devices under each function, with everything stacked on them
    /// (`holders/`, recursively), then which are mounted or swap.
    fn block(&self, wanted: &HashMap<String, PciAddress>, usage: &mut Usage) {
        let class = self.sys.join("class/block");
        let mut per_fn: BTreeMap<PciAddress, BTreeSet<String>> = BTreeMap::new();
        for name in Self::entries(&class) {
            let Some(a) = Self::owner(wanted, &class.join(&name)) else {
                continue;
            };
            let set = per_fn.entry(a).or_default();
            let mut todo = vec![name];
            while let Some(n) = todo.pop() {
                if set.len() >= MAX_HOLDERS || !set.insert(n.clone()) {
                    continue;
                }
                todo.extend(Self::entries(&class.join(&n).join("holders")));
            }
        }
        if per_fn.is_empty() {
            return;
        }
        let mounts = self.mountinfo();
        let swaps = self.swaps();
        for (a, names) in per_fn {
            for name in names {
                let dir = class.join(&name);
                let mut aliases = vec![format!("/dev/{name}")];
                if let Some(dm) = Self::read_trim(&dir.join("dm/name")).filter(|n| !n.is_empty()) {
                    aliases.push(format!("/dev/mapper/{dm}"));
                }
                let dev = Self::read_trim(&dir.join("dev"));
                let points: Vec<String> = mounts
                    .iter()
                    .filter(|m| {
                        dev.as_deref() == Some(m.dev.as_str()) || aliases.contains(&m.source)
                    })
                    .map(|m| m.point.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let device = aliases[0].clone();
                if !points.is_empty() {
                    usage.entry(a).or_default().push(Use::Mounted {
                        device: device.clone(),
                        mount_points: points,
                    });
                }
                if swaps.iter().any(|s| aliases.contains(s)) {
                    usage.entry(a).or_default().push(Use::Swap { device });
                }
            }
        }
    }

    fn mountinfo(&self) -> Vec<Mount> {
        Self::read_trim(&self.proc.join("self/mountinfo"))
            .map(|t| t.lines().filter_map(Mount::parse).collect())
            .unwrap_or_default()
    }

    fn swaps(&self) -> Vec<String> {
        Self::read_trim(&self.proc.join("swaps"))
            .map(|t| {
                t.lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next().map(unescape))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Interfaces under each function that are up and carry a route.
    fn net(&self, wanted: &HashMap<String, PciAddress>, usage: &mut Usage) {
        let class = self.sys.join("class/net");
        let mut found = Vec::new();
        for name in Self::entries(&class) {
            let dir = class.join(&name);
            let owner =
                Self::owner(wanted, &dir.join("device")).or_else(|| Self::owner(wanted, &dir));
            if let Some(a) = owner {
                found.push((a, name, dir));
            }
        }
        if found.is_empty() {
            return;
        }
        let routed = self.routed_interfaces();
        for (a, name, dir) in found {
            let up = match Self::read_trim(&dir.join("flags")) {
                // IFF_UP, as `ip link` reads it.
                Some(f) => crate::pci::sysfs::parse_hex(&f, u32::MAX).is_some_and(|f| f & 1 == 1),
                None => Self::read_trim(&dir.join("operstate")).as_deref() == Some("up"),
            };
            if up && routed.contains(&name) {
                usage
                    .entry(a)
                    .or_default()
                    .push(Use::NetworkActive { interface: name });
            }
        }
    }

    /// Interfaces with at least one route that counts ([`route_counts`]),
    /// from `net/route` and `net/ipv6_route`.
    fn routed_interfaces(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        if let Some(t) = Self::read_trim(&self.proc.join("net/route")) {
            // Iface Destination Gateway Flags ...; Destination in host byte
            // order (little-endian on the machines we run on).
            for l in t.lines().skip(1) {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (Some(iface), Some(dest), Some(flags)) = (f.first(), f.get(1), f.get(3)) else {
                    continue;
                };
                let up = u32::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1);
                let Ok(d) = u32::from_str_radix(dest, 16) else {
                    continue;
                };
                let ip = IpAddr::from(d.to_le_bytes());
                if up && route_counts(ip) {
                    out.insert(iface.to_string());
                }
            }
        }
        if let Some(t) = Self::read_trim(&self.proc.join("net/ipv6_route")) {
            // dest plen src plen next-hop metric refcnt use flags iface
            for l in t.lines() {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (Some(dest), Some(iface)) = (f.first(), f.get(9)) else {
                    continue;
                };
                let Ok(d) = u128::from_str_radix(dest, 16) else {
                    continue;
                };
                if *iface != "lo" && route_counts(IpAddr::from(d.to_be_bytes())) {
                    out.insert(iface.to_string());
                }
            }
        }
        out
    }

    /// Processes holding a node of a wanted function open, from the fd link
    /// targets only (nothing is opened).
    fn open_nodes(&self, wanted: &HashMap<String, PciAddress>, usage: &mut Usage) {
        let mut node_owner: HashMap<String, Option<PciAddress>> = HashMap::new();
        for pid in Self::entries(&self.proc) {
            let Ok(pid_n) = pid.parse::<u32>() else {
                continue;
            };
            let fd_dir = self.proc.join(&pid).join("fd");
            let Ok(rd) = std::fs::read_dir(&fd_dir) else {
                continue;
            };
            let mut held: BTreeSet<(PciAddress, String)> = BTreeSet::new();
            for e in rd.take(MAX_FDS_PER_PROCESS).flatten() {
                let Ok(target) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let Some(node) = target.to_str().map(str::to_string) else {
                    continue;
                };
                if !is_node(&node) {
                    continue;
                }
                let owner = *node_owner
                    .entry(node.clone())
                    .or_insert_with(|| self.node_function(wanted, &node));
                if let Some(a) = owner {
                    held.insert((a, node));
                }
            }
            if held.is_empty() {
                continue;
            }
            let comm = Self::read_trim(&self.proc.join(&pid).join("comm")).unwrap_or_default();
            for (a, node) in held {
                usage.entry(a).or_default().push(Use::OpenBy {
                    pid: pid_n,
                    comm: comm.clone(),
                    node,
                });
            }
        }
    }

    /// The function behind a device node, through the kernel's class links.
    fn node_function(
        &self,
        wanted: &HashMap<String, PciAddress>,
        node: &str,
    ) -> Option<PciAddress> {
        let name = node.rsplit('/').next()?;
        if name.is_empty() || name == "." || name == ".." {
            return None;
        }
        if node.starts_with("/dev/dri/") {
            let dir = self.sys.join("class/drm").join(name);
            return Self::owner(wanted, &dir.join("device")).or_else(|| Self::owner(wanted, &dir));
        }
        if node.starts_with("/dev/nvme") {
            let block = self.sys.join("class/block").join(name);
            if block.exists() {
                return Self::owner(wanted, &block);
            }
            let dir = self.sys.join("class/nvme").join(name);
            return Self::owner(wanted, &dir.join("device")).or_else(|| Self::owner(wanted, &dir));
        }
        // /dev/nvidiaN: the driver lists each GPU's minor under its address.
        let minor = name.strip_prefix("nvidia")?;
        let gpus = self.proc.join("driver/nvidia/gpus");
        Self::entries(&gpus).into_iter().find_map(|addr| {
            let info = std::fs::read_to_string(gpus.join(&addr).join("information")).ok()?;
            let m = info
                .lines()
                .find_map(|l| l.strip_prefix("Device Minor:"))?
                .trim()
                .to_string();
            (m == minor).then(|| wanted.get(&addr).copied()).flatten()
        })
    }
}

/// The device nodes whose holders block a function: DRM cards and render
/// nodes, NVIDIA's per-GPU nodes, NVMe controllers and namespaces.
pub fn is_node(path: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(n) = path.strip_prefix("/dev/dri/") {
        return n.starts_with("card") || n.starts_with("renderD");
    }
    if let Some(n) = path.strip_prefix("/dev/nvidia") {
        return digits(n);
    }
    path.strip_prefix("/dev/nvme")
        .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
}

/// One line of `mountinfo`.
struct Mount {
    dev: String,
    point: String,
    source: String,
}

impl Mount {
    /// `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw`
    fn parse(line: &str) -> Option<Mount> {
        let (head, tail) = line.split_once(" - ")?;
        let h: Vec<&str> = head.split_whitespace().collect();
        let source = tail.split_whitespace().nth(1).unwrap_or_default();
        Some(Mount {
            dev: h.get(2)?.to_string(),
            point: unescape(h.get(4)?),
            source: unescape(source),
        })
    }
}

/// The kernel escapes space, tab, newline and backslash in paths as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lays out a host root as the kernel does, with the same script the
    /// end-to-end test uses (`tests/data/host-root.sh` says what is in it).
    fn lay_out(root: &Path) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/host-root.sh");
        let ok = std::process::Command::new("bash")
            .arg(script)
            .arg(root)
            .status()
            .unwrap()
            .success();
        assert!(ok, "host-root.sh failed");
    }

    fn addr(s: &str) -> PciAddress {
        PciAddress::parse(s).unwrap()
    }

    #[test]
    fn the_kernel_layout_gives_exact_uses() {
        let root = tempfile::tempdir().unwrap();
        lay_out(root.path());
        let host = HostRoot {
            sys: root.path().join("sys"),
            proc: root.path().join("proc"),
        };
        let all = [
            addr("0000:02:00.0"),
            addr("0000:05:00.0"),
            addr("0000:06:00.0"),
            addr("0000:01:00.0"),
            addr("0000:07:00.0"),
            addr("0000:00:1d.0"),
        ];
        let usage = host.read(&all);
        assert_eq!(
            usage.get(&addr("0000:02:00.0")).unwrap(),
            &vec![
                Use::Mounted {
                    device: "/dev/dm-0".into(),
                    mount_points: vec!["/home dir".into()],
                },
                Use::Mounted {
                    device: "/dev/nvme0n1p1".into(),
                    mount_points: vec!["/srv".into()],
                },
                Use::Mounted {
                    device: "/dev/nvme0n1p2".into(),
                    mount_points: vec!["/".into()],
                },
                Use::Swap {
                    device: "/dev/dm-1".into()
                },
            ]
        );
        assert_eq!(
            usage.get(&addr("0000:05:00.0")).unwrap(),
            &vec![Use::NetworkActive {
                interface: "enp5s0".into()
            }]
        );
        assert_eq!(
            usage.get(&addr("0000:01:00.0")).unwrap(),
            &vec![Use::OpenBy {
                pid: 812,
                comm: "Xorg".into(),
                node: "/dev/dri/card1".into()
            }]
        );
        // Link-local and multicast routes only: not in use. The root port
        // above the NVMe is not what the disk hangs under.
        assert!(!usage.contains_key(&addr("0000:06:00.0")), "{usage:?}");
        assert!(!usage.contains_key(&addr("0000:00:1d.0")), "{usage:?}");
        assert_eq!(usage.len(), 3, "{usage:?}");
    }

    #[test]
    fn routes_that_do_not_count() {
        for (r, counts) in [
            ("default", true),
            ("10.0.0.0/8", true),
            ("169.254.0.0/16", false),
            ("224.0.0.0/4", false),
            ("fe80::/64", false),
            ("ff00::/8", false),
            ("2001:db8::/32", true),
        ] {
            assert_eq!(route_counts(parse_route(r).unwrap()), counts, "{r}");
        }
        assert!(parse_route("10.0.0.0/33").is_none());
        assert!(parse_route("nonsense").is_none());
    }

    #[test]
    fn nodes_and_escapes() {
        for (p, yes) in [
            ("/dev/dri/card0", true),
            ("/dev/dri/renderD128", true),
            ("/dev/dri/by-path", false),
            ("/dev/nvidia0", true),
            ("/dev/nvidiactl", false),
            ("/dev/nvidia-uvm", false),
            ("/dev/nvme0n1p2", true),
            ("/dev/nvme-fabrics", false),
            ("/dev/null", false),
        ] {
            assert_eq!(is_node(p), yes, "{p}");
        }
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
