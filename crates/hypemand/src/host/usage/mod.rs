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

mod block;
mod net;
mod nodes;

pub use net::{parse_route, route_counts};

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
/// waited on), and at most `MAX_FILE` (64 MiB) bytes are read. The kernel's own
/// sysfs and procfs files are regular files, for which `O_NONBLOCK` changes
/// nothing.
pub fn read_text(path: &Path) -> Result<String, String> {
    read_file(path).map_err(|e| e.to_string())
}

/// Why `read_file` read nothing.
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
    read_limited(path, MAX_FILE)
}

/// [`read_text`] of at most `limit` bytes (a longer file is cut there), with
/// a missing file told apart.
pub fn read_limited(path: &Path, limit: u64) -> Result<String, ReadError> {
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
    f.take(limit).read_to_string(&mut text).map_err(io)?;
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

#[cfg(test)]
mod tests {
    use super::block::unescape;
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
