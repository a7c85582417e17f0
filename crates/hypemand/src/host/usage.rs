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

/// Limits on what one reading walks in sysfs, so a host with pathological
/// numbers of holders cannot make one ListAvailable unbounded. The walk of
/// /proc has no count limit (a cap would hide a use past it); its deadline
/// bounds it instead.
const MAX_HOLDERS: usize = 256;
/// The largest /proc or sysfs text file read (mountinfo of a host with
/// hundreds of thousands of mounts is still far below it).
const MAX_FILE: u64 = 64 << 20;
/// How many fds are read between two looks at the deadline.
const FDS_PER_CHECK: u64 = 4096;

/// A walk that ran out of time, with how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfinished {
    pub processes: u64,
    pub fds: u64,
    pub within: std::time::Duration,
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "could not finish: {} processes and {} fds read in {:?}",
            self.processes, self.fds, self.within
        )
    }
}

/// What one walk found: every function's uses, and the functions whose use
/// could not be established (the walk ran out of time before every fd was
/// read, or one of the function's own files could not be read), each with
/// the reason. A function in `unknown` may be in use: it is never passable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walked {
    pub usage: Usage,
    pub unknown: BTreeMap<PciAddress, String>,
    pub unfinished: Option<Unfinished>,
    /// Processes and fds read (all of them when the walk finished).
    pub processes: u64,
    pub fds: u64,
}

impl Walked {
    /// The part about `addresses`.
    pub fn only(&self, addresses: &[PciAddress]) -> Walked {
        Walked {
            usage: addresses
                .iter()
                .filter_map(|a| Some((*a, self.usage.get(a)?.clone())))
                .collect(),
            unknown: addresses
                .iter()
                .filter_map(|a| Some((*a, self.unknown.get(a)?.clone())))
                .collect(),
            unfinished: self.unfinished,
            processes: self.processes,
            fds: self.fds,
        }
    }
}

/// Block or character special: a device number means nothing without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Char,
    Block,
}

/// A device node of a function, as the kernel numbers it.
#[derive(Debug, Clone)]
struct Node {
    address: PciAddress,
    /// `/dev/...`, from the kernel's own name for it (sysfs), for messages.
    name: String,
}

/// `MAJOR:MINOR` as sysfs `dev` files and mountinfo write it.
fn parse_devnum(text: &str) -> Option<(u32, u32)> {
    let (a, b) = text.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn devnum(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

/// Reads a small text file from a host tree without ever blocking on it: the
/// file is opened `O_NONBLOCK` and must be a regular file (a FIFO, a device
/// or a socket planted in a root-built `--host-root` tree is refused, not
/// waited on), and at most [`MAX_FILE`] bytes are read. The kernel's own
/// sysfs and procfs files are regular files, for which `O_NONBLOCK` changes
/// nothing.
pub fn read_text(path: &Path) -> Result<String, String> {
    read_file(path).map_err(|e| e.to_string())
}

/// Why [`read_file`] read nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a regular file")]
    NotRegular(String),
}

/// [`read_text`], with a missing file told apart (one open, no stat first).
fn read_file(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ReadError::Io {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    if !f.metadata().map_err(io)?.is_file() {
        return Err(ReadError::NotRegular(path.display().to_string()));
    }
    let mut text = String::new();
    f.take(MAX_FILE).read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

/// The real host's view: sysfs at `sys`, procfs at `proc`.
pub struct HostRoot {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl HostRoot {
    /// The uses of every PCI function, walking /proc until `deadline`.
    pub fn read(&self, deadline: std::time::Instant) -> Walked {
        let started = std::time::Instant::now();
        let mut walked = Walked::default();
        let mut nodes: HashMap<(Kind, u64), Node> = HashMap::new();
        self.block(&mut walked, &mut nodes);
        self.net(&mut walked);
        self.char_nodes(&mut walked, &mut nodes);
        self.open_nodes(&nodes, deadline, started, &mut walked);
        for uses in walked.usage.values_mut() {
            uses.sort();
            uses.dedup();
        }
        walked
    }

    /// The function a sysfs path lies under: the last PCI address among its
    /// components once links are resolved (a disk under an NVMe drive under
    /// a root port belongs to the drive).
    fn owner(path: &Path) -> Option<PciAddress> {
        let real = std::fs::canonicalize(path).ok()?;
        real.components()
            .rev()
            .find_map(|c| PciAddress::parse(c.as_os_str().to_str()?).ok())
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

    /// A file's text; `None` when it does not exist (nothing of that kind).
    /// Any other failure is returned, so the caller can say which device it
    /// could not read instead of failing them all.
    fn read_opt(path: &Path) -> Result<Option<String>, String> {
        match read_file(path) {
            Ok(t) => Ok(Some(t.trim().to_string())),
            Err(ReadError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// A file the walk needs as a whole (mountinfo, swaps, routes): when it
    /// cannot be read, nothing can be said about what it would have shown,
    /// so every function in `affected` is unknown, with the reason.
    fn read_all(path: &Path, affected: &[PciAddress], walked: &mut Walked) -> Option<String> {
        match Self::read_opt(path) {
            Ok(t) => t,
            Err(e) => {
                for a in affected {
                    Self::mark_unknown(walked, *a, e.clone());
                }
                None
            }
        }
    }

    fn mark_unknown(walked: &mut Walked, a: PciAddress, why: String) {
        tracing::warn!(pci_address = %a, error = %why, "cannot tell whether the host uses a device");
        walked.unknown.entry(a).or_insert(why);
    }

    /// Block devices under each function, with everything stacked on them
    /// (`holders/`, recursively), then which are mounted or swap. A mount is
    /// matched by the device number mountinfo gives it (field 3), never by
    /// its source text, which any FUSE mount can set; btrfs reports an
    /// anonymous device number, so a btrfs member is known mounted from the
    /// kernel's `/sys/fs/btrfs/<uuid>/devices/` instead. Every block device
    /// is also a node whose holders count ([`Self::open_nodes`]).
    fn block(&self, walked: &mut Walked, nodes: &mut HashMap<(Kind, u64), Node>) {
        let class = self.sys.join("class/block");
        let mut per_fn: BTreeMap<PciAddress, BTreeSet<String>> = BTreeMap::new();
        for name in Self::entries(&class) {
            let Some(a) = Self::owner(&class.join(&name)) else {
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
        let affected: Vec<PciAddress> = per_fn.keys().copied().collect();
        let mounts: Vec<Mount> =
            Self::read_all(&self.proc.join("self/mountinfo"), &affected, walked)
                .map(|t| t.lines().filter_map(Mount::parse).collect())
                .unwrap_or_default();
        let swaps = self.swaps(&affected, walked);
        let btrfs = self.btrfs_members();
        for (a, names) in per_fn {
            for name in names {
                let dir = class.join(&name);
                let device = format!("/dev/{name}");
                let dev = match Self::read_opt(&dir.join("dev")) {
                    Ok(Some(t)) => parse_devnum(&t),
                    Ok(None) => None,
                    Err(e) => {
                        Self::mark_unknown(walked, a, e);
                        continue;
                    }
                };
                let Some((major, minor)) = dev else {
                    continue;
                };
                nodes.insert(
                    (Kind::Block, devnum(major, minor)),
                    Node {
                        address: a,
                        name: device.clone(),
                    },
                );
                let mut points: BTreeSet<String> = mounts
                    .iter()
                    .filter(|m| m.dev == (major, minor))
                    .map(|m| m.point.clone())
                    .collect();
                if let Some(uuid) = btrfs.get(&name) {
                    // The mount points, for the message only: the btrfs
                    // mounts whose source names this device, else the uuid.
                    let mut named: BTreeSet<String> = mounts
                        .iter()
                        .filter(|m| m.fstype == "btrfs" && m.source == device)
                        .map(|m| m.point.clone())
                        .collect();
                    if named.is_empty() {
                        named.insert(format!("(btrfs filesystem {uuid})"));
                    }
                    points.extend(named);
                }
                if !points.is_empty() {
                    walked.usage.entry(a).or_default().push(Use::Mounted {
                        device: device.clone(),
                        mount_points: points.into_iter().collect(),
                    });
                }
                let mut aliases = vec![device.clone()];
                if let Ok(Some(dm)) = Self::read_opt(&dir.join("dm/name")) {
                    if !dm.is_empty() {
                        aliases.push(format!("/dev/mapper/{dm}"));
                    }
                }
                if swaps.iter().any(|s| aliases.contains(s)) {
                    walked
                        .usage
                        .entry(a)
                        .or_default()
                        .push(Use::Swap { device });
                }
            }
        }
    }

    /// Block devices that belong to a mounted btrfs filesystem, by name, with
    /// its uuid: the kernel lists a filesystem under `/sys/fs/btrfs/` only
    /// while it is mounted, with a link per member device.
    fn btrfs_members(&self) -> HashMap<String, String> {
        let dir = self.sys.join("fs/btrfs");
        let mut out = HashMap::new();
        for uuid in Self::entries(&dir)
            .into_iter()
            .filter(|u| u != "features")
            .take(MAX_HOLDERS)
        {
            for dev in Self::entries(&dir.join(&uuid).join("devices"))
                .into_iter()
                .take(MAX_HOLDERS)
            {
                out.insert(dev, uuid.clone());
            }
        }
        out
    }

    /// Active swap, by the kernel's path for it. Only root can swapon, so
    /// the text is the kernel's own.
    fn swaps(&self, affected: &[PciAddress], walked: &mut Walked) -> Vec<String> {
        Self::read_all(&self.proc.join("swaps"), affected, walked)
            .map(|t| {
                t.lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next().map(unescape))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Interfaces under each function that are up and carry a route.
    fn net(&self, walked: &mut Walked) {
        let class = self.sys.join("class/net");
        let mut found = Vec::new();
        for name in Self::entries(&class) {
            let dir = class.join(&name);
            let owner = Self::owner(&dir.join("device")).or_else(|| Self::owner(&dir));
            if let Some(a) = owner {
                found.push((a, name, dir));
            }
        }
        if found.is_empty() {
            return;
        }
        let affected: Vec<PciAddress> = found.iter().map(|(a, _, _)| *a).collect();
        let routed = self.routed_interfaces(&affected, walked);
        for (a, name, dir) in found {
            let up = match Self::read_opt(&dir.join("flags")) {
                // IFF_UP, as `ip link` reads it.
                Ok(Some(f)) => {
                    crate::pci::sysfs::parse_hex(&f, u32::MAX).is_some_and(|f| f & 1 == 1)
                }
                Ok(None) => {
                    Self::read_opt(&dir.join("operstate"))
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some("up")
                }
                Err(e) => {
                    Self::mark_unknown(walked, a, e);
                    continue;
                }
            };
            if up && routed.contains(&name) {
                walked
                    .usage
                    .entry(a)
                    .or_default()
                    .push(Use::NetworkActive { interface: name });
            }
        }
    }

    /// Interfaces with at least one route that counts ([`route_counts`]),
    /// from `net/route` and `net/ipv6_route`.
    fn routed_interfaces(&self, affected: &[PciAddress], walked: &mut Walked) -> HashSet<String> {
        let mut out = HashSet::new();
        if let Some(t) = Self::read_all(&self.proc.join("net/route"), affected, walked) {
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
        if let Some(t) = Self::read_all(&self.proc.join("net/ipv6_route"), affected, walked) {
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

    /// The character nodes of each function, by device number: DRM cards and
    /// render nodes and NVMe controllers from their sysfs `dev` files, and
    /// NVIDIA's `/dev/nvidiaN` from the driver's major in `/proc/devices` and
    /// each GPU's `Device Minor` (the driver makes no sysfs device for them).
    fn char_nodes(&self, walked: &mut Walked, nodes: &mut HashMap<(Kind, u64), Node>) {
        let numbered = |n: &str, prefix: &str| {
            n.strip_prefix(prefix)
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        };
        let mut sources: Vec<(PathBuf, String)> = Vec::new();
        let drm = self.sys.join("class/drm");
        for name in Self::entries(&drm) {
            if numbered(&name, "card") || numbered(&name, "renderD") {
                sources.push((drm.join(&name), format!("/dev/dri/{name}")));
            }
        }
        let nvme = self.sys.join("class/nvme");
        for name in Self::entries(&nvme) {
            if numbered(&name, "nvme") {
                sources.push((nvme.join(&name), format!("/dev/{name}")));
            }
        }
        for (dir, node) in sources {
            let Some(a) = Self::owner(&dir.join("device")).or_else(|| Self::owner(&dir)) else {
                continue;
            };
            match Self::read_opt(&dir.join("dev")) {
                Ok(Some(t)) => {
                    if let Some((major, minor)) = parse_devnum(&t) {
                        nodes.insert(
                            (Kind::Char, devnum(major, minor)),
                            Node {
                                address: a,
                                name: node,
                            },
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => Self::mark_unknown(walked, a, e),
            }
        }
        let gpus = self.proc.join("driver/nvidia/gpus");
        let gpu_dirs = Self::entries(&gpus);
        if gpu_dirs.is_empty() {
            return;
        }
        let major = Self::read_opt(&self.proc.join("devices"))
            .ok()
            .flatten()
            .and_then(|t| {
                // "Character devices:" comes first; "195 nvidia-frontend" (or
                // "195 nvidia") is the per-GPU nodes' major.
                t.lines()
                    .take_while(|l| !l.starts_with("Block devices:"))
                    .find_map(|l| {
                        let (n, name) = l.trim().split_once(' ')?;
                        matches!(name, "nvidia" | "nvidia-frontend")
                            .then(|| n.parse::<u32>().ok())
                            .flatten()
                    })
            });
        let Some(major) = major else {
            return;
        };
        for addr in gpu_dirs {
            let Ok(a) = PciAddress::parse(&addr) else {
                continue;
            };
            let minor = match Self::read_opt(&gpus.join(&addr).join("information")) {
                Ok(Some(info)) => info
                    .lines()
                    .find_map(|l| l.strip_prefix("Device Minor:"))
                    .and_then(|m| m.trim().parse::<u32>().ok()),
                Ok(None) => None,
                Err(e) => {
                    Self::mark_unknown(walked, a, e);
                    None
                }
            };
            if let Some(minor) = minor {
                nodes.insert(
                    (Kind::Char, devnum(major, minor)),
                    Node {
                        address: a,
                        name: format!("/dev/nvidia{minor}"),
                    },
                );
            }
        }
    }

    /// Processes holding a node of a function open. Every fd of every
    /// process is read (no cap: a use at fd 70,000 is a use), and each is
    /// believed only through the kernel: `statx` of `/proc/PID/fd/N` must
    /// show a character or block special file whose device number is one of
    /// a function's nodes. The link's text is never read, so a regular file
    /// named `/dev/dri/renderD128` on a user's own tmpfs counts for nothing,
    /// and the real node opened through a bind mount of another name counts.
    /// `AT_STATX_DONT_SYNC` keeps a file on a dead NFS server from stalling
    /// the walk. Past `deadline` the walk stops and says how far it got; the
    /// functions with nodes are then `unknown`.
    fn open_nodes(
        &self,
        nodes: &HashMap<(Kind, u64), Node>,
        deadline: std::time::Instant,
        started: std::time::Instant,
        walked: &mut Walked,
    ) {
        if nodes.is_empty() {
            return;
        }
        let Ok(rd) = std::fs::read_dir(&self.proc) else {
            return;
        };
        let mut held: BTreeMap<(u32, PciAddress, String), ()> = BTreeMap::new();
        let mut out_of_time = false;
        let mut name = Vec::with_capacity(16);
        'procs: for e in rd.flatten() {
            let file_name = e.file_name();
            let Some(pid) = file_name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if std::time::Instant::now() >= deadline {
                out_of_time = true;
                break;
            }
            let fd_dir = e.path().join("fd");
            let (Ok(dir), Ok(list)) = (std::fs::File::open(&fd_dir), std::fs::read_dir(&fd_dir))
            else {
                continue;
            };
            walked.processes += 1;
            for fd in list.flatten() {
                walked.fds += 1;
                if walked.fds.is_multiple_of(FDS_PER_CHECK) && std::time::Instant::now() >= deadline
                {
                    out_of_time = true;
                    break 'procs;
                }
                use std::os::unix::ffi::OsStrExt;
                name.clear();
                name.extend_from_slice(fd.file_name().as_bytes());
                name.push(0);
                let Some(key) = stat_node(&dir, &name) else {
                    continue;
                };
                if let Some(n) = nodes.get(&key) {
                    held.insert((pid, n.address, n.name.clone()), ());
                }
            }
        }
        let mut comms: HashMap<u32, String> = HashMap::new();
        for (pid, a, node) in held.into_keys() {
            let comm = comms
                .entry(pid)
                .or_insert_with(|| {
                    Self::read_opt(&self.proc.join(pid.to_string()).join("comm"))
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                })
                .clone();
            walked
                .usage
                .entry(a)
                .or_default()
                .push(Use::OpenBy { pid, comm, node });
        }
        if out_of_time {
            let u = Unfinished {
                processes: walked.processes,
                fds: walked.fds,
                within: started.elapsed(),
            };
            walked.unfinished = Some(u);
            let why =
                format!("{u}; whether a process holds one of its device nodes open is not known");
            for n in nodes.values() {
                walked
                    .unknown
                    .entry(n.address)
                    .or_insert_with(|| why.clone());
            }
        }
    }
}

/// The kind and device number of what `name` (NUL-terminated) in the fd
/// directory `dir` refers to, if it is a device special file.
fn stat_node(dir: &std::fs::File, name: &[u8]) -> Option<(Kind, u64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: statx with a valid directory fd, a NUL-terminated name and a
    // zeroed buffer it fills.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr().cast(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            &mut st,
        )
    };
    if r != 0 {
        return None;
    }
    let kind = match u32::from(st.stx_mode) & libc::S_IFMT {
        libc::S_IFCHR => Kind::Char,
        libc::S_IFBLK => Kind::Block,
        _ => return None,
    };
    Some((kind, devnum(st.stx_rdev_major, st.stx_rdev_minor)))
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
    /// Field 3, the device number the kernel gives the mount: the evidence.
    dev: (u32, u32),
    point: String,
    fstype: String,
    /// The source text, which the mounter chooses: for messages only.
    source: String,
}

impl Mount {
    /// `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw`
    fn parse(line: &str) -> Option<Mount> {
        let (head, tail) = line.split_once(" - ")?;
        let h: Vec<&str> = head.split_whitespace().collect();
        let mut t = tail.split_whitespace();
        let fstype = t.next().unwrap_or_default();
        let source = t.next().unwrap_or_default();
        Some(Mount {
            dev: parse_devnum(h.get(2)?)?,
            point: unescape(h.get(4)?),
            fstype: fstype.to_string(),
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

    fn host(root: &Path) -> HostRoot {
        HostRoot {
            sys: root.join("sys"),
            proc: root.join("proc"),
        }
    }

    fn later() -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(3600)
    }

    /// *(issue 24)* Every use is proven by the kernel: a mount by its device
    /// number (a FUSE mount naming itself /dev/nvme0n1p3 is nothing), a btrfs
    /// member through /sys/fs/btrfs, an open node by the stat of the fd (pid
    /// 901's links that merely say /dev/dri/renderD128 and /dev/nvme0n1 are
    /// nothing; before, both were `open-by`).
    #[test]
    fn the_kernel_layout_gives_exact_uses() {
        let root = tempfile::tempdir().unwrap();
        lay_out(root.path());
        let walked = host(root.path()).read(later());
        let usage = &walked.usage;
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
        assert!(walked.unknown.is_empty(), "{walked:?}");
        assert_eq!(walked.unfinished, None);
        // Every process and every fd was read.
        assert_eq!((walked.processes, walked.fds), (3, 7), "{walked:?}");
    }

    /// *(issue 24)* Every fd is read: a holder whose node is its 66,001st fd
    /// (readdir lists it last: on tmpfs, newest first, and it was made first)
    /// is seen. Before, the first 65,536 entries per process were read.
    #[test]
    fn every_fd_is_read() {
        let root = tempfile::tempdir().unwrap();
        lay_out(root.path());
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let fd = shm.path().join("4242/fd");
        std::fs::create_dir_all(&fd).unwrap();
        std::fs::write(shm.path().join("4242/comm"), "holder\n").unwrap();
        std::os::unix::fs::symlink("/dev/full", fd.join("70000")).unwrap();
        for n in 0..66_000 {
            std::os::unix::fs::symlink("/dev/null", fd.join(n.to_string())).unwrap();
        }
        let host = HostRoot {
            sys: root.path().join("sys"),
            proc: shm.path().to_path_buf(),
        };
        let walked = host.read(later());
        assert_eq!(walked.fds, 66_001);
        assert_eq!(
            walked.usage.get(&addr("0000:01:00.0")).unwrap(),
            &vec![Use::OpenBy {
                pid: 4242,
                comm: "holder".into(),
                node: "/dev/dri/card1".into()
            }]
        );
    }

    /// *(issue 24)* A btrfs mount is matched through the kernel's member
    /// list, not its source text: without the member link, the same
    /// mountinfo line names the device and is nothing.
    #[test]
    fn btrfs_is_known_mounted_from_sys_fs_btrfs() {
        let root = tempfile::tempdir().unwrap();
        lay_out(root.path());
        std::fs::remove_dir_all(
            root.path()
                .join("sys/fs/btrfs/6f1d3b52-8e0e-4c5a-9a53-0b2c1d7e9f10"),
        )
        .unwrap();
        let walked = host(root.path()).read(later());
        let uses = walked.usage.get(&addr("0000:02:00.0")).unwrap();
        assert!(
            !uses
                .iter()
                .any(|u| matches!(u, Use::Mounted { device, .. } if device == "/dev/nvme0n1p1")),
            "{uses:?}"
        );
    }

    /// *(issue 24)* A walk past its deadline stops, says how far it got, and
    /// leaves the functions with nodes unknown; what sysfs and the small
    /// /proc files tell is still there.
    #[test]
    fn a_walk_out_of_time_says_how_far_it_got() {
        let root = tempfile::tempdir().unwrap();
        lay_out(root.path());
        let walked = host(root.path()).read(std::time::Instant::now());
        let u = walked.unfinished.expect("out of time");
        assert_eq!((u.processes, u.fds), (0, 0));
        assert!(
            u.to_string()
                .starts_with("could not finish: 0 processes and 0 fds read in "),
            "{u}"
        );
        for a in ["0000:01:00.0", "0000:07:00.0", "0000:02:00.0"] {
            let why = walked
                .unknown
                .get(&addr(a))
                .unwrap_or_else(|| panic!("{a}: {walked:?}"));
            assert!(why.contains("could not finish"), "{why}");
        }
        // NICs have no nodes: their answer is whole.
        assert!(!walked.unknown.contains_key(&addr("0000:05:00.0")));
        assert!(walked.usage.contains_key(&addr("0000:05:00.0")));
    }

    /// *(issue 24)* A FIFO planted in a root-built host tree is refused at
    /// once, not waited on, and only what depends on it is unknown.
    #[test]
    fn a_fifo_in_the_tree_is_refused_not_waited_on() {
        let root = tempfile::tempdir().unwrap();
        lay_out(root.path());
        let fifo = |p: &Path| {
            std::fs::remove_file(p).unwrap();
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        };
        fifo(&root.path().join("proc/swaps"));
        fifo(&root.path().join("sys/class/drm/card2/dev"));
        let walked = host(root.path()).read(later());
        let why = walked.unknown.get(&addr("0000:02:00.0")).unwrap();
        assert!(why.ends_with("swaps is not a regular file"), "{why}");
        let why = walked.unknown.get(&addr("0000:07:00.0")).unwrap();
        assert!(why.ends_with("card2/dev is not a regular file"), "{why}");
        assert_eq!(walked.unknown.len(), 2, "{walked:?}");
        // The rest is read as before.
        assert!(walked.usage.contains_key(&addr("0000:01:00.0")));
        assert!(walked.usage.contains_key(&addr("0000:05:00.0")));
        assert!(read_text(&root.path().join("proc/swaps")).is_err());
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
