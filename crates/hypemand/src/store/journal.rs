//! The journal: `devices.journal` beside `devices.json`, one line per change.
//!
//! Rewriting the whole registry on every change cost time in proportion to
//! its size (about 800 KB at 4096 devices). A change is instead appended here
//! and synced; changes that arrive while a sync is in flight are written and
//! synced together (group commit, in `service::commit`). Once the journal is
//! as large as the snapshot, the snapshot is rewritten in the background and
//! the journal cut, so the cost of a rewrite is spread over as many changes
//! as it holds records.
//!
//! Each line is one JSON object: `{"seq":N,"add":{record}}`,
//! `{"seq":N,"replace":{record}}` or `{"seq":N,"remove":"id"}`, and *(issue
//! 26)* `add_vgpu`, `replace_vgpu`, `remove_vgpu` the same way for vGPU
//! records (a daemon of before refuses such a journal: nothing is dropped
//! silently), and *(issue 27)* `"format":3` on a line whose record (a
//! device's or a vGPU's) carries a lease, for the same reason. `seq` counts
//! changes since the registry began, one by one; `devices.json` says up to
//! which `seq` it holds, and replay skips what it already holds. The last
//! line of each write carries `"end":true`: everything up to such a line was
//! written whole. Bytes after the last `end` line belong to a write that never
//! finished, so was never acknowledged: they are dropped (and logged). Damage
//! before it is not a torn write, and the journal is refused like a
//! `devices.json` that does not parse.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::registry::{Change, StoredDevice, StoredVgpu};

pub const JOURNAL_NAME: &str = "devices.journal";

/// One change as read back.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    #[serde(default)]
    end: bool,
    #[serde(default)]
    add: Option<StoredDevice>,
    #[serde(default)]
    replace: Option<StoredDevice>,
    #[serde(default)]
    remove: Option<String>,
    /// *(issue 26)* vGPU records.
    #[serde(default)]
    add_vgpu: Option<StoredVgpu>,
    #[serde(default)]
    replace_vgpu: Option<StoredVgpu>,
    #[serde(default)]
    remove_vgpu: Option<String>,
    /// *(issue 27)* `3` on a line whose record carries a lease: a daemon of
    /// before (which refuses unknown keys here) refuses the journal instead
    /// of replaying the record without its lease.
    #[serde(default)]
    format: Option<u32>,
}

/// A journal entry, as replay sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub change: Change,
}

/// What reading a journal found.
#[derive(Debug, Default)]
pub struct Replay {
    pub entries: Vec<Entry>,
    /// Where the last whole write ends: the journal's length once the torn
    /// tail is cut.
    pub whole: u64,
    /// Bytes after it (a write that never finished).
    pub torn: u64,
}

/// Appends `seq`'s change to `out` as one line; `end` marks the last line of a
/// write.
pub fn encode(out: &mut Vec<u8>, seq: u64, change: &Change, end: bool) -> serde_json::Result<()> {
    out.extend_from_slice(format!("{{\"seq\":{seq},").as_bytes());
    if end {
        out.extend_from_slice(b"\"end\":true,");
    }
    let leased = match change {
        Change::Add(d) | Change::Replace(d) => d.lease.is_some(),
        Change::AddVgpu(v) | Change::ReplaceVgpu(v) => v.lease.is_some(),
        Change::Remove(_) | Change::RemoveVgpu(_) => false,
    };
    if leased {
        out.extend_from_slice(b"\"format\":3,");
    }
    let key = match change {
        Change::Add(_) => "add",
        Change::Replace(_) => "replace",
        Change::Remove(_) => "remove",
        Change::AddVgpu(_) => "add_vgpu",
        Change::ReplaceVgpu(_) => "replace_vgpu",
        Change::RemoveVgpu(_) => "remove_vgpu",
    };
    out.extend_from_slice(format!("\"{key}\":").as_bytes());
    match change {
        Change::Add(d) | Change::Replace(d) => serde_json::to_writer(&mut *out, d)?,
        Change::AddVgpu(v) | Change::ReplaceVgpu(v) => serde_json::to_writer(&mut *out, v)?,
        Change::Remove(id) | Change::RemoveVgpu(id) => serde_json::to_writer(&mut *out, id)?,
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// Why a journal's bytes cannot be replayed.
#[derive(Debug, PartialEq, Eq)]
pub struct Damaged(pub String);

/// Parses a journal's bytes: the whole writes' entries, in order, and how much
/// of a torn write follows them.
pub fn parse(bytes: &[u8]) -> Result<Replay, Damaged> {
    let mut pending = Vec::new();
    let mut out = Replay::default();
    let mut damage: Option<String> = None;
    let mut offset = 0usize;
    let mut line_no = 0usize;
    while offset < bytes.len() {
        line_no += 1;
        let rest = &bytes[offset..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            // No newline: the tail of a write that never finished.
            break;
        };
        let text = &rest[..nl];
        offset += nl + 1;
        match parse_line(text) {
            Ok((entry, end)) if damage.is_none() => {
                pending.push(entry);
                if end {
                    out.entries.append(&mut pending);
                    out.whole = offset as u64;
                }
            }
            Ok((_, end)) => {
                // A whole write after damage: the damage is not a torn tail.
                if end {
                    return Err(Damaged(damage.unwrap_or_default()));
                }
            }
            Err(why) => {
                if damage.is_none() {
                    damage = Some(format!("line {line_no}: {why}"));
                }
            }
        }
    }
    out.torn = bytes.len() as u64 - out.whole;
    Ok(out)
}

fn parse_line(text: &[u8]) -> Result<(Entry, bool), String> {
    let line: Line = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if let Some(f) = line.format {
        if f > super::file::VERSION {
            return Err(format!(
                "format {f} is newer than this hypemand understands ({})",
                super::file::VERSION
            ));
        }
    }
    let count = [
        line.add.is_some(),
        line.replace.is_some(),
        line.remove.is_some(),
        line.add_vgpu.is_some(),
        line.replace_vgpu.is_some(),
        line.remove_vgpu.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let one =
        "an entry holds exactly one of add, replace, remove, add_vgpu, replace_vgpu or remove_vgpu";
    if count != 1 {
        return Err(one.into());
    }
    let change = if let Some(d) = line.add {
        Change::Add(d)
    } else if let Some(d) = line.replace {
        Change::Replace(d)
    } else if let Some(id) = line.remove {
        Change::Remove(id)
    } else if let Some(v) = line.add_vgpu {
        Change::AddVgpu(v)
    } else if let Some(v) = line.replace_vgpu {
        Change::ReplaceVgpu(v)
    } else if let Some(id) = line.remove_vgpu {
        Change::RemoveVgpu(id)
    } else {
        return Err(one.into());
    };
    Ok((
        Entry {
            seq: line.seq,
            change,
        },
        line.end,
    ))
}

/// Why an append failed, and whether the journal is as it was before it.
#[derive(Debug)]
pub struct AppendFailed {
    pub error: std::io::Error,
    /// The journal was cut back to its length before the append.
    pub rolled_back: bool,
}

/// The journal, appended to by the store's writer thread only. It is opened
/// for each write and closed after it: no descriptor is held between writes
/// (so a file system can be remounted read-only under an idle daemon).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Whether the file exists (else the first append creates it).
    exists: bool,
    len: u64,
}

impl Journal {
    /// The journal of `dir`, `len` bytes long once its torn tail was cut
    /// (checked at load; `exists` false when there is none yet).
    pub fn new(dir: &Path, exists: bool, len: u64) -> Self {
        Journal {
            dir: dir.to_path_buf(),
            exists,
            len,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_NAME)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The journal opened for writing, never through a link, and only if
    /// it is still a regular file.
    fn open(&self) -> std::io::Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(self.path())?;
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::other("the journal is not a regular file"));
        }
        Ok(f)
    }

    /// Appends `bytes` (whole lines, the last marked `end`) and syncs them.
    /// On failure the journal is cut back to where it was, if it can be.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), AppendFailed> {
        let opened = if self.exists {
            self.open()
        } else {
            create_fresh(&self.path(), &[]).and_then(|f| sync_dir(&self.dir).map(|()| f))
        };
        let file = opened.map_err(|error| AppendFailed {
            error,
            rolled_back: true,
        })?;
        if !self.exists {
            self.exists = true;
            self.len = 0;
        }
        let before = self.len;
        let written = file
            .write_all_at(bytes, before)
            .and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                self.len = before + bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                let rolled_back = file.set_len(before).and_then(|()| file.sync_data()).is_ok();
                Err(AppendFailed { error, rolled_back })
            }
        }
    }

    /// Drops the first `offset` bytes (what a new snapshot now holds): the
    /// rest is written to a fresh file that replaces the journal atomically.
    pub fn drop_prefix(&mut self, offset: u64) -> std::io::Result<()> {
        let tail = if self.exists && offset < self.len {
            let mut tail = vec![0u8; (self.len - offset) as usize];
            self.open()?.read_exact_at(&mut tail, offset)?;
            tail
        } else {
            Vec::new()
        };
        let tmp = temp_path(&self.dir);
        let result = create_fresh(&tmp, &tail)
            .and_then(|_| std::fs::rename(&tmp, self.path()))
            .and_then(|()| sync_dir(&self.dir));
        match result {
            Ok(()) => {
                self.len = tail.len() as u64;
                self.exists = true;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Removes the journal once a snapshot holds everything (a clean stop).
    pub fn remove(&mut self) -> std::io::Result<()> {
        match std::fs::remove_file(self.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.exists = false;
        self.len = 0;
        sync_dir(&self.dir)
    }
}

pub(crate) fn temp_path(dir: &Path) -> PathBuf {
    dir.join(format!(".{JOURNAL_NAME}.tmp"))
}

/// Creates `path` afresh with `bytes`, synced: whatever is there is unlinked
/// first (a link is removed, not followed), and the file is created
/// exclusively, never through a symbolic link, mode 0600 whatever the umask.
pub(crate) fn create_fresh(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(f)
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::tests::sample;

    fn lines(changes: &[(u64, Change, bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, c, end) in changes {
            encode(&mut out, *seq, c, *end).unwrap();
        }
        out
    }

    #[test]
    fn every_change_reads_back() {
        let a = sample("a2:00.0", "gpu");
        let mut b = a.clone();
        b.attached_to = Some("vm-1".into());
        let changes = vec![
            (1, Change::Add(a.clone()), false),
            (2, Change::Replace(b.clone()), true),
            (3, Change::Remove(a.id.clone()), true),
        ];
        let bytes = lines(&changes);
        let read = parse(&bytes).unwrap();
        assert_eq!(read.torn, 0);
        assert_eq!(read.whole, bytes.len() as u64);
        let got: Vec<_> = read
            .entries
            .into_iter()
            .map(|e| (e.seq, e.change))
            .collect();
        let want: Vec<_> = changes.into_iter().map(|(s, c, _)| (s, c)).collect();
        assert_eq!(got, want);
    }

    /// A line is one JSON object, as serde_json writes it.
    #[test]
    fn a_line_is_one_json_object() {
        let a = sample("a2:00.0", "gpu");
        let mut x = Vec::new();
        encode(&mut x, 7, &Change::Add(a.clone()), true).unwrap();
        assert!(x.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&x).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"seq": 7, "end": true, "add": serde_json::to_value(&a).unwrap()})
        );
    }

    /// A write that never finished is cut at the last whole one, whatever
    /// it left: part of a line, whole lines without their end, zeros.
    #[test]
    fn a_torn_write_is_dropped() {
        let a = sample("a2:00.0", "gpu");
        let b = sample("3b:00.0", "nic");
        let whole = lines(&[(1, Change::Add(a.clone()), true)]);
        let unfinished = lines(&[
            (2, Change::Add(b.clone()), false),
            (3, Change::Remove(a.id.clone()), true),
        ]);
        let cuts = [
            unfinished[..10].to_vec(),
            unfinished[..unfinished.len() - 1].to_vec(),
            // The first line whole, the end line not.
            unfinished[..unfinished.iter().position(|&c| c == b'\n').unwrap() + 1].to_vec(),
            vec![0u8; 4096],
            [vec![0u8; 100], b"\n".to_vec(), unfinished[..30].to_vec()].concat(),
        ];
        for cut in cuts {
            let bytes = [whole.clone(), cut.clone()].concat();
            let read = parse(&bytes).unwrap();
            assert_eq!(read.entries.len(), 1, "{:?}", String::from_utf8_lossy(&cut));
            assert_eq!(read.whole, whole.len() as u64);
            assert_eq!(read.torn, cut.len() as u64);
        }
    }

    /// Damage followed by a whole write is not a torn tail: refused.
    #[test]
    fn damage_before_a_whole_write_is_refused() {
        let a = sample("a2:00.0", "gpu");
        let first = lines(&[(1, Change::Add(a.clone()), true)]);
        let last = lines(&[(3, Change::Remove(a.id.clone()), true)]);
        for junk in [&b"{oops\n"[..], b"{\"seq\":2,\"end\":true}\n", b"\0\0\0\n"] {
            let bytes = [first.clone(), junk.to_vec(), last.clone()].concat();
            let err = parse(&bytes).unwrap_err();
            assert!(err.0.starts_with("line 2"), "{err:?}");
        }
        let both = serde_json::json!({"seq": 1, "end": true, "remove": "x", "add": a})
            .to_string()
            .into_bytes();
        let err = parse(&[both, b"\n".to_vec(), last].concat()).unwrap_err();
        assert!(err.0.contains("exactly one"), "{err:?}");
    }

    #[test]
    fn append_creates_then_drop_prefix_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path(), false, 0);
        let a = sample("a2:00.0", "gpu");
        let first = lines(&[(1, Change::Add(a.clone()), true)]);
        let second = lines(&[(2, Change::Remove(a.id.clone()), true)]);
        j.append(&first).unwrap();
        j.append(&second).unwrap();
        assert_eq!(
            std::fs::read(j.path()).unwrap(),
            [&first[..], &second].concat()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(j.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        j.drop_prefix(first.len() as u64).unwrap();
        assert_eq!(std::fs::read(j.path()).unwrap(), second);
        assert_eq!(j.len(), second.len() as u64);
        j.append(&first).unwrap();
        assert_eq!(
            std::fs::read(j.path()).unwrap(),
            [&second[..], &first].concat()
        );
        j.remove().unwrap();
        assert!(!j.path().exists());
        assert!(!temp_path(dir.path()).exists());
    }

    /// A link planted at the journal's temp file is replaced, not followed.
    #[test]
    fn the_temp_file_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, temp_path(dir.path())).unwrap();
        let mut j = Journal::new(dir.path(), false, 0);
        j.append(b"{}\n").unwrap();
        j.drop_prefix(0).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
