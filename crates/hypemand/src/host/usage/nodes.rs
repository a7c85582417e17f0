//! Device nodes in use: a function's character and block nodes by device
//! number, and every fd of every process `statx`ed against them.

use super::*;

impl HostRoot {
    /// The character nodes of each function, by device number: DRM cards and
    /// render nodes and NVMe controllers from their sysfs `dev` files, and
    /// NVIDIA's `/dev/nvidiaN` from the driver's major in `/proc/devices` and
    /// each GPU's `Device Minor` (the driver makes no sysfs device for them).
    pub(super) fn char_nodes(&self, walked: &mut Walked, nodes: &mut HashMap<(Kind, u64), Node>) {
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
    pub(super) fn open_nodes(
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

impl HostRoot {
    /// *(issue 26)* Who holds these VFIO nodes open (`/dev/vfio/N`,
    /// `/dev/vfio/devices/vfioN`): each believed only by its device number,
    /// read from the kernel's `class/vfio/N/dev` or `class/vfio-dev/vfioN/dev`
    /// (never the node's name), then every fd of every process, under
    /// `deadline`. `Err` when that could not be finished; a node the kernel
    /// does not list is held by nobody.
    pub fn vfio_holders(
        &self,
        nodes: &[String],
        deadline: std::time::Instant,
    ) -> Result<Vec<String>, String> {
        let started = std::time::Instant::now();
        let placeholder = PciAddress {
            domain: 0,
            bus: 0,
            device: 0,
            function: 0,
        };
        let mut numbers: HashMap<(Kind, u64), Node> = HashMap::new();
        for node in nodes {
            let (class, name) = if let Some(c) = node.strip_prefix("/dev/vfio/devices/") {
                ("class/vfio-dev", c)
            } else if let Some(g) = node.strip_prefix("/dev/vfio/") {
                ("class/vfio", g)
            } else {
                continue;
            };
            // A name, never a path: no `/`, no `..`.
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
                continue;
            }
            let dir = self.sys.join(class).join(name);
            match Self::read_opt(&dir.join("dev")) {
                Ok(Some(t)) => {
                    if let Some((major, minor)) = parse_devnum(&t) {
                        numbers.insert(
                            (Kind::Char, devnum(major, minor)),
                            Node {
                                address: placeholder,
                                name: node.clone(),
                            },
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let mut walked = Walked::default();
        self.open_nodes(&numbers, deadline, started, &mut walked);
        if let Some(why) = walked.unknown.remove(&placeholder) {
            return Err(why);
        }
        Ok(walked
            .usage
            .remove(&placeholder)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|u| match u {
                Use::OpenBy { pid, comm, node } => Some(format!(
                    "{node} is open by process {pid} ({})",
                    comm.chars()
                        .take(64)
                        .map(|c| if c.is_control() { '?' } else { c })
                        .collect::<String>()
                )),
                _ => None,
            })
            .collect())
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

#[cfg(test)]
mod vfio_tests {
    use super::*;

    /// *(issue 26)* A VFIO node is held when a process has the kernel's
    /// device number open, whatever it is called: this test holds /dev/full
    /// (1:7) while a tree says group 41's node is 1:7. Names that are not
    /// a VFIO node's, or would leave the class directory, are not read.
    #[test]
    fn vfio_holders_are_found_by_device_number() {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("class/vfio/41")).unwrap();
        std::fs::write(sys.path().join("class/vfio/41/dev"), "1:7\n").unwrap();
        std::fs::create_dir_all(sys.path().join("class/x")).unwrap();
        std::fs::write(sys.path().join("class/x/dev"), "1:7\n").unwrap();
        let held_open = std::fs::File::open("/dev/full").unwrap();
        let root = HostRoot {
            sys: sys.path().to_path_buf(),
            proc: PathBuf::from("/proc"),
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let me = format!("/dev/vfio/41 is open by process {} ", std::process::id());
        let held = root
            .vfio_holders(
                &["/dev/vfio/41".into(), "/dev/vfio/devices/vfio0".into()],
                until,
            )
            .unwrap();
        assert!(held.iter().any(|h| h.starts_with(&me)), "{held:?}");
        let sneaky = root
            .vfio_holders(&["/dev/vfio/../x".into(), "/dev/null".into()], until)
            .unwrap();
        assert!(sneaky.is_empty(), "{sneaky:?}");
        drop(held_open);
    }
}
