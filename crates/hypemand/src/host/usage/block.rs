//! Block devices in use: mounted (by device number, btrfs members through
//! `/sys/fs/btrfs`) or active swap, their partitions and what is stacked on them.

use super::*;

impl HostRoot {
    /// Block devices under each function, with everything stacked on them
    /// (`holders/`, recursively), then which are mounted or swap. A mount is
    /// matched by the device number mountinfo gives it (field 3), never by
    /// its source text, which any FUSE mount can set; btrfs reports an
    /// anonymous device number, so a btrfs member is known mounted from the
    /// kernel's `/sys/fs/btrfs/<uuid>/devices/` instead. Every block device
    /// is also a node whose holders count ([`Self::open_nodes`]).
    pub(super) fn block(&self, walked: &mut Walked, nodes: &mut HashMap<(Kind, u64), Node>) {
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
    pub(super) fn btrfs_members(&self) -> HashMap<String, String> {
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
    pub(super) fn swaps(&self, affected: &[PciAddress], walked: &mut Walked) -> Vec<String> {
        Self::read_all(&self.proc.join("swaps"), affected, walked)
            .map(|t| {
                t.lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next().map(unescape))
                    .collect()
            })
            .unwrap_or_default()
    }
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
pub(super) fn unescape(s: &str) -> String {
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
