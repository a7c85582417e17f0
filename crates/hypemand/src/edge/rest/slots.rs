//! The connection limits: places in all and per user (a user's subordinate
//! uids count as the user), some kept for root and group `hypeman`, and a
//! place given back as soon as its peer has hung up.

use super::*;

/// `SO_PEERGROUPS` (Linux 4.13): the supplementary groups the peer had when
/// it connected. The libc crate does not export it for every target.
pub(super) const SO_PEERGROUPS: libc::c_int = 59;

/// The groups a connected peer had when it connected, as the kernel recorded
/// them (not read from /proc later, where the pid may be another's).
pub(super) fn peer_groups(fd: &impl std::os::fd::AsRawFd) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt into a buffer of `len` bytes that it may fill.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: `len` says how much it needs (bounded: NGROUPS_MAX 65536).
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
            && n > groups.len()
            && n <= 65_536
        {
            groups.resize(n, 0);
            continue;
        }
        return Vec::new();
    }
}

/// One small system file, re-read only when it changes (device, inode, size
/// and modification time), and never past 4 MiB.
pub(super) struct Watched<T> {
    path: std::path::PathBuf,
    seen: Option<(u64, u64, u64, i64, i64)>,
    parsed: T,
}

impl<T: Default> Watched<T> {
    pub(super) fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Watched {
            path: path.into(),
            seen: None,
            parsed: T::default(),
        }
    }

    fn get(&mut self, parse: impl FnOnce(&str) -> T) -> &T {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
        if now != self.seen {
            self.seen = now;
            self.parsed = crate::host::usage::read_text(&self.path)
                .ok()
                .filter(|t| t.len() <= 4 << 20)
                .map(|t| parse(&t))
                .unwrap_or_default();
        }
        &self.parsed
    }
}

/// Who a connecting uid is, for the connection limits: `/etc/subuid` makes
/// a user's subordinate uids that user's (so `unshare -U --map-auto` gives
/// no one more slots), `/etc/passwd` names the owners, and `/etc/group` gives
/// [`RESERVED_GROUP`]'s gid. Files only (no NSS call can stall the accept
/// loop); each is re-read when it changes.
pub(super) struct Accounts {
    passwd: Watched<HashMap<String, u32>>,
    subuid: Watched<Vec<(String, u32, u32)>>,
    group: Watched<Option<u32>>,
}

impl Accounts {
    pub(super) fn new(etc: &std::path::Path) -> Self {
        Accounts {
            passwd: Watched::new(etc.join("passwd")),
            subuid: Watched::new(etc.join("subuid")),
            group: Watched::new(etc.join("group")),
        }
    }

    /// The uid a connection counts against: the owner of the subordinate
    /// range `uid` lies in, else `uid` itself.
    pub(super) fn owner(&mut self, uid: u32) -> u32 {
        let ranges = self.subuid.get(|t| {
            t.lines()
                .filter_map(|l| {
                    let mut f = l.trim().splitn(3, ':');
                    let (name, start, count) = (f.next()?, f.next()?, f.next()?);
                    Some((name.to_string(), start.parse().ok()?, count.parse().ok()?))
                })
                .collect()
        });
        let Some(name) = ranges
            .iter()
            .find(|(_, start, count)| uid >= *start && (uid - start) < *count)
            .map(|(n, _, _)| n.clone())
        else {
            return uid;
        };
        if let Ok(n) = name.parse::<u32>() {
            return n;
        }
        let users = self.passwd.get(|t| {
            t.lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    Some((name.to_string(), f.nth(1)?.parse().ok()?))
                })
                .collect()
        });
        // A range whose owner has no account: its uids share one bucket.
        users.get(&name).copied().unwrap_or(u32::MAX)
    }

    pub(super) fn reserved_gid(&mut self) -> Option<u32> {
        *self.group.get(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next()? == RESERVED_GROUP)
                    .then(|| f.nth(1)?.parse().ok())
                    .flatten()
            })
        })
    }
}

/// A connection's place.
pub(super) struct Slot {
    owner: u32,
    privileged: bool,
    reserved: bool,
    /// A duplicate of the connection's socket, to see whether the peer has
    /// hung up while its task has not noticed yet.
    fd: std::os::fd::OwnedFd,
}

/// The connections open, counted against the limits.
#[derive(Default)]
pub(super) struct Slots {
    open: HashMap<u64, Slot>,
    next: u64,
    general: usize,
    reserved: usize,
    per_owner: HashMap<u32, usize>,
}

/// Why a connection was refused, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    Owner,
    All,
}

impl Slots {
    /// Takes a place, if the limits allow, first giving back the places of
    /// peers that have already hung up.
    pub(super) fn take(
        &mut self,
        owner: u32,
        privileged: bool,
        fd: std::os::fd::OwnedFd,
    ) -> Result<u64, Refused> {
        let mut swept = false;
        loop {
            let mine = self.per_owner.get(&owner).copied().unwrap_or(0);
            let owner_ok = privileged || mine < MAX_CONNECTIONS_PER_UID;
            let place = if !owner_ok {
                Err(Refused::Owner)
            } else if self.general < MAX_CONNECTIONS - RESERVED_CONNECTIONS {
                Ok(false)
            } else if privileged && self.reserved < RESERVED_CONNECTIONS {
                Ok(true)
            } else {
                Err(Refused::All)
            };
            match place {
                Ok(reserved) => {
                    if reserved {
                        self.reserved += 1;
                    } else {
                        self.general += 1;
                    }
                    if !privileged {
                        *self.per_owner.entry(owner).or_default() += 1;
                    }
                    self.next += 1;
                    self.open.insert(
                        self.next,
                        Slot {
                            owner,
                            privileged,
                            reserved,
                            fd,
                        },
                    );
                    return Ok(self.next);
                }
                Err(why) if swept => return Err(why),
                Err(_) => {
                    self.sweep();
                    swept = true;
                }
            }
        }
    }

    /// Gives a place back (once: a swept place is already back).
    pub(super) fn give(&mut self, id: u64) {
        let Some(s) = self.open.remove(&id) else {
            return;
        };
        if s.reserved {
            self.reserved -= 1;
        } else {
            self.general -= 1;
        }
        if !s.privileged {
            if let Some(n) = self.per_owner.get_mut(&s.owner) {
                *n -= 1;
                if *n == 0 {
                    self.per_owner.remove(&s.owner);
                }
            }
        }
    }

    /// Gives back the places whose peer has closed its end: a client that
    /// opens a connection per request has reconnected before the old
    /// connection's task has read the end of it.
    fn sweep(&mut self) {
        use std::os::fd::AsRawFd;
        let mut polled: Vec<(u64, libc::pollfd)> = self
            .open
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    libc::pollfd {
                        fd: s.fd.as_raw_fd(),
                        events: 0,
                        revents: 0,
                    },
                )
            })
            .collect();
        let mut fds: Vec<libc::pollfd> = polled.iter().map(|(_, p)| *p).collect();
        // SAFETY: poll over descriptors this process owns, without waiting.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            return;
        }
        for ((id, _), p) in polled.drain(..).zip(fds) {
            // POLLHUP: the peer has closed (or shut down both ways); nothing
            // more can come from it or be sent to it.
            if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                self.give(id);
            }
        }
    }
}
