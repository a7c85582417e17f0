//! The on-disk registry: `devices.json` in the state directory, the snapshot,
//! and the changes after it in `devices.journal` ([`super::journal`]).
//!
//! The snapshot is written whole and durably (temp file, fsync, rename, fsync
//! of the directory) when the journal is compacted and at a clean stop, so
//! after a crash or power loss it is either the old registry or the new one,
//! never a mix. It records the last change it holds (`seq`), and start-up
//! replays the journal's later changes over it.
//!
//! The directory and the file are trusted only when they are the daemon's own
//! (its uid, not writable by group or others), the file is a regular file, and
//! no symbolic link is followed: another user must not be able to redirect the
//! daemon's writes or plant records it would act on as root. *(issue 13)*
//!
//! A file that does not parse is refused and left untouched (it may be the only
//! record of which GPU belongs to which VM); records that parse but break the
//! API's rules are dropped one by one, each logged, with the original file
//! kept aside.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[cfg(test)]
use serde::Serialize;

use super::journal::{self, Journal, JOURNAL_NAME};
use super::registry::{Change, Conflict, Registry, StoredDevice, StoredVgpu};

/// The newest format this daemon reads and writes. *(issue 26)* A file
/// with vGPU records is version 2 (a daemon of before refuses it, as
/// newer, instead of dropping them); one without is still written as 1.
/// *(issue 27)* A file with a lease is version 3, for the same reason.
pub const VERSION: u32 = 3;

/// The format of a file without vGPU records or leases.
const VERSION_WITHOUT_VGPUS: u32 = 1;

/// The format of a file with vGPU records and no lease.
const VERSION_WITH_VGPUS: u32 = 2;

pub const FILE_NAME: &str = "devices.json";

/// Why the store cannot be read or written; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file cannot be read.
    #[error("cannot read the registry {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `devices.json` is of a newer format version.
    #[error("the registry {path} has format version {found}, newer than this hypemand understands ({VERSION}); upgrade hypemand or restore an older file")]
    Newer {
        /// The file.
        path: PathBuf,
        /// The version it has.
        found: String,
    },
    /// `devices.json` (or the journal) does not parse.
    #[error("the registry {path} does not parse ({why}); it was left untouched: repair it, or move it away to start with an empty registry")]
    Unparsable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file is a link, a FIFO, or another user's or writable by others.
    #[error("refusing to use {path}: {why}")]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The original could not be kept aside before its bad records were dropped.
    #[error("cannot keep the original registry {path} aside at {to}: {source}")]
    KeepAside {
        /// The file.
        path: PathBuf,
        /// Where it was to be kept.
        to: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be written.
    #[error("cannot write the registry {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The file's layout, as serde would write it; [`encode`] writes the same bytes.
#[cfg(test)]
#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    seq: u64,
    devices: Vec<&'a StoredDevice>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    vgpus: Vec<&'a StoredVgpu>,
}

/// What loading found, besides the registry itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No file yet: a first start.
    Fresh,
    /// A registry was there and every record loaded.
    Existing,
    /// Some records broke the rules and were dropped (each is logged); the
    /// original files are kept at `aside`, and the store now holds the rest.
    Dropped {
        /// How many records were dropped.
        dropped: usize,
        /// Where the originals are kept.
        aside: Vec<PathBuf>,
    },
}

/// Refuses what another user owns or could write.
fn check_owned(path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<(), StoreError> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let unsafe_because = |why: String| StoreError::Unsafe {
        path: path.to_path_buf(),
        why,
    };
    if meta.uid() != uid {
        return Err(unsafe_because(format!(
            "the {what} is owned by uid {}, not by hypemand's uid {uid}; chown it",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_because(format!(
            "the {what} is writable by group or others (mode {:o}); chmod go-w it",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// What the `version` key says, when it says a version newer than ours
/// (any number above it, however large, fractional or not).
fn newer_version(version: &serde_json::Value) -> Option<String> {
    let n = version.as_number()?;
    let newer = match n.as_u64() {
        Some(u) => u > u64::from(VERSION),
        None => n.as_f64().is_some_and(|f| f > f64::from(VERSION)),
    };
    newer.then(|| n.to_string())
}

/// The store: the state directory and the files in it.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The registry as start-up found it, with the journal open for appending.
#[derive(Debug)]
pub struct Opened {
    pub registry: Registry,
    pub loaded: Loaded,
    /// The last change the registry holds (the journal's next is one more).
    pub seq: u64,
    /// The last change `devices.json` holds (less than `seq` when journal
    /// entries were replayed over it).
    pub snapshot_seq: u64,
    pub journal: Journal,
    /// The size of `devices.json`, against which the journal is compacted.
    pub snapshot_bytes: u64,
    /// Journal entries applied over the snapshot.
    pub replayed: usize,
}

impl Opened {
    /// An empty registry with no files yet (the unit tests' services).
    #[cfg(test)]
    pub fn empty(dir: &Path) -> Self {
        Opened {
            registry: Registry::default(),
            loaded: Loaded::Fresh,
            seq: 0,
            snapshot_seq: 0,
            journal: Journal::new(dir, false, 0),
            snapshot_bytes: 0,
            replayed: 0,
        }
    }
}

impl Store {
    /// The store of state directory `dir` (nothing is read yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `devices.json`'s path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// `devices.journal`'s path.
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_NAME)
    }

    fn temp_path(&self) -> PathBuf {
        self.dir.join(format!(".{FILE_NAME}.tmp"))
    }

    /// Reads the registry: `devices.json`, then the journal's changes after
    /// it. Missing files are an empty registry. Refused (the daemon exits 3
    /// and the files stay as they are): an unsafe directory or file, anything
    /// but a regular file, a newer format, a file that does not parse, a
    /// journal damaged before its last whole write or that does not follow
    /// the snapshot. A torn last write of the journal is dropped (it was never
    /// acknowledged) and logged. Records or entries that break a rule are
    /// dropped, each logged, the original files are kept aside, and the
    /// registry is written afresh.
    pub fn open(&self) -> Result<Opened, StoreError> {
        let dir_meta = std::fs::metadata(&self.dir).map_err(|source| StoreError::Read {
            path: self.dir.clone(),
            source,
        })?;
        if !dir_meta.is_dir() {
            return Err(StoreError::Unsafe {
                path: self.dir.clone(),
                why: "the state directory is not a directory".into(),
            });
        }
        check_owned(&self.dir, &dir_meta, "state directory")?;
        // Temp files left by a crash: never trusted, never followed.
        for tmp in [self.temp_path(), journal::temp_path(&self.dir)] {
            if std::fs::symlink_metadata(&tmp).is_ok() {
                tracing::info!(path = %tmp.display(), "removing a temp file left by an interrupted write");
                std::fs::remove_file(&tmp).map_err(|source| StoreError::Write {
                    path: tmp.clone(),
                    source,
                })?;
            }
        }

        let path = self.path();
        let mut dropped = 0;
        let mut aside = Vec::new();
        let snapshot = open_checked(&path, "registry file")?;
        let fresh = snapshot.is_none();
        let (mut registry, snapshot_seq, snapshot_bytes) = match snapshot {
            None => (Registry::default(), 0, 0),
            Some(mut file) => {
                let bytes = read_whole(&mut file, &path)?;
                let (registry, seq, bad) = parse_snapshot(&path, &bytes)?;
                if bad > 0 {
                    dropped += bad;
                    aside.push(keep_aside(&self.dir, FILE_NAME, &path, &bytes)?);
                }
                (registry, seq, bytes.len() as u64)
            }
        };
        let mut seq = snapshot_seq;

        let jpath = self.journal_path();
        let mut replayed = 0;
        let journal = match open_checked(&jpath, "journal")? {
            None => Journal::new(&self.dir, false, 0),
            Some(mut file) => {
                let bytes = read_whole(&mut file, &jpath)?;
                let read = journal::parse(&bytes).map_err(|d| StoreError::Unparsable {
                    path: jpath.clone(),
                    why: format!("{}, before its last whole write", d.0),
                })?;
                let mut bad = 0;
                for entry in read.entries {
                    if entry.seq <= seq {
                        continue; // already in the snapshot
                    }
                    if entry.seq != seq + 1 {
                        return Err(StoreError::Unparsable {
                            path: jpath,
                            why: format!(
                                "it goes on from change {} but {FILE_NAME} holds changes up to {seq}, so the two do not belong together (one was restored or copied from elsewhere); move the journal away to start from {FILE_NAME} alone",
                                entry.seq - 1
                            ),
                        });
                    }
                    seq = entry.seq;
                    let applied = match &entry.change {
                        Change::Add(d) | Change::Replace(d) => d.validate(),
                        Change::AddVgpu(v) | Change::ReplaceVgpu(v) => v.validate(),
                        Change::Remove(_) | Change::RemoveVgpu(_) => Ok(()),
                    }
                    .and_then(|()| registry.apply(entry.change).map_err(|e| e.to_string()));
                    match applied {
                        Ok(()) => replayed += 1,
                        Err(reason) => {
                            bad += 1;
                            tracing::error!(
                                path = %jpath.display(),
                                seq = entry.seq,
                                %reason,
                                "dropped a journal entry that breaks the registry's rules"
                            );
                        }
                    }
                }
                if read.torn > 0 {
                    tracing::warn!(
                        path = %jpath.display(),
                        bytes = read.torn,
                        "dropped the journal's last write, which never finished (it was never acknowledged)"
                    );
                    OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&jpath)
                        .and_then(|f| f.set_len(read.whole).and_then(|()| f.sync_all()))
                        .map_err(|source| StoreError::Write {
                            path: jpath.clone(),
                            source,
                        })?;
                }
                if bad > 0 {
                    dropped += bad;
                    aside.push(keep_aside(&self.dir, JOURNAL_NAME, &jpath, &bytes)?);
                }
                Journal::new(&self.dir, true, read.whole)
            }
        };
        let mut opened = Opened {
            registry,
            loaded: if fresh && journal.is_empty() {
                Loaded::Fresh
            } else {
                Loaded::Existing
            },
            seq,
            snapshot_seq,
            journal,
            snapshot_bytes,
            replayed,
        };
        if dropped > 0 {
            // What was kept, written afresh: the snapshot, then no journal.
            opened.snapshot_bytes = self.save(&opened.registry, opened.seq)?;
            opened.snapshot_seq = opened.seq;
            opened
                .journal
                .remove()
                .map_err(|source| StoreError::Write {
                    path: self.journal_path(),
                    source,
                })?;
            let originals: Vec<String> = aside.iter().map(|p| p.display().to_string()).collect();
            tracing::error!(
                path = %path.display(),
                kept = opened.registry.len(),
                dropped,
                original = %originals.join(", "),
                "some records broke the registry's rules and were dropped; the original files are kept aside"
            );
            opened.loaded = Loaded::Dropped { dropped, aside };
        }
        Ok(opened)
    }

    /// Replaces `devices.json` with `registry`, which holds the changes up to
    /// `seq`, durably; returns the file's size.
    pub fn save(&self, registry: &Registry, seq: u64) -> Result<u64, StoreError> {
        let path = self.path();
        let err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let json = encode(
            seq,
            registry.iter().map(|d| &**d),
            registry.vgpus().map(|v| &**v),
        )
        .map_err(|e| err(e.into()))?;
        let tmp = self.temp_path();
        let result = journal::create_fresh(&tmp, &json)
            .map(|_| crate::pause::at(crate::pause::Point::SnapshotWritten))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| journal::sync_dir(&self.dir));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(err)?;
        Ok(json.len() as u64)
    }
}

/// `devices.json` as read: each record left as text until it is judged, so
/// no tree of the whole file is built (a third of start-up at 16,384 devices).
#[derive(serde::Deserialize)]
struct FileIn<'a> {
    #[serde(borrow, default)]
    version: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    seq: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    devices: Option<&'a serde_json::value::RawValue>,
    /// *(issue 26)* Version 2 only.
    #[serde(borrow, default)]
    vgpus: Option<&'a serde_json::value::RawValue>,
}

/// `devices.json`'s records (those that break a rule dropped, each logged),
/// the last change it holds, and how many were dropped.
fn parse_snapshot(path: &Path, bytes: &[u8]) -> Result<(Registry, u64, usize), StoreError> {
    let unparsable = |why: String| StoreError::Unparsable {
        path: path.to_path_buf(),
        why,
    };
    let file: FileIn = serde_json::from_slice(bytes).map_err(|e| unparsable(e.to_string()))?;
    // The version before the shape: a newer file whose records we would
    // not understand is refused, not judged by our rules.
    let version: Option<serde_json::Value> = file
        .version
        .map(|v| serde_json::from_str(v.get()))
        .transpose()
        .map_err(|e| unparsable(e.to_string()))?;
    if let Some(found) = version.as_ref().and_then(newer_version) {
        return Err(StoreError::Newer {
            path: path.to_path_buf(),
            found,
        });
    }
    let known = version
        .as_ref()
        .and_then(|v| v.as_u64())
        .filter(|v| (u64::from(VERSION_WITHOUT_VGPUS)..=u64::from(VERSION)).contains(v));
    if known.is_none() {
        return Err(unparsable(format!(
            "no \"version\": {VERSION_WITHOUT_VGPUS} to {VERSION} at the top level"
        )));
    }
    // Files written before the journal have no "seq": they hold change 0.
    let seq = match file.seq {
        None => 0,
        Some(v) => serde_json::from_str::<u64>(v.get())
            .map_err(|_| unparsable("\"seq\" is not a whole number".into()))?,
    };
    let records: Vec<&serde_json::value::RawValue> = file
        .devices
        .and_then(|d| serde_json::from_str(d.get()).ok())
        .ok_or_else(|| unparsable("no \"devices\" list at the top level".into()))?;
    let mut registry = Registry::default();
    let mut dropped = 0;
    for (i, record) in records.into_iter().enumerate() {
        let kept = serde_json::from_str::<StoredDevice>(record.get())
            .map_err(|e| e.to_string())
            .and_then(|d| d.validate().map(|()| d))
            .and_then(|d| registry.insert(d).map_err(broken));
        if let Err(reason) = kept {
            dropped += 1;
            let id = serde_json::from_str::<serde_json::Value>(record.get())
                .ok()
                .and_then(|v| {
                    v.get("id")
                        .and_then(|v| v.as_str())
                        .map(hypeman_api::validate::shorten)
                })
                .unwrap_or_default();
            tracing::error!(
                path = %path.display(),
                record = i,
                device_id = %id,
                %reason,
                "dropped a record that breaks the registry's rules"
            );
        }
    }
    let vgpus: Vec<&serde_json::value::RawValue> = match file.vgpus {
        None => Vec::new(),
        Some(v) => serde_json::from_str(v.get())
            .map_err(|_| unparsable("\"vgpus\" is not a list".into()))?,
    };
    for (i, record) in vgpus.into_iter().enumerate() {
        let kept = serde_json::from_str::<StoredVgpu>(record.get())
            .map_err(|e| e.to_string())
            .and_then(|v| v.validate().map(|()| v))
            .and_then(|v| registry.insert_vgpu(v).map_err(broken));
        if let Err(reason) = kept {
            dropped += 1;
            tracing::error!(
                path = %path.display(),
                vgpu_record = i,
                %reason,
                "dropped a vGPU record that breaks the registry's rules"
            );
        }
    }
    Ok((registry, seq, dropped))
}

/// Opens a state file for reading: `None` if it does not exist. No symlink
/// followed; a FIFO or device does not block the open; refused unless a
/// regular file of the daemon's own that others cannot write.
fn open_checked(path: &Path, what: &str) -> Result<Option<File>, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let unsafe_because = |why: String| StoreError::Unsafe {
        path: path.to_path_buf(),
        why,
    };
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(unsafe_because(format!(
                "it is a symbolic link; the {what} must be a regular file"
            )))
        }
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let meta = file.metadata().map_err(|source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(unsafe_because("it is not a regular file".into()));
    }
    check_owned(path, &meta, what)?;
    Ok(Some(file))
}

fn read_whole(file: &mut File, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(file, &mut bytes).map_err(|source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

/// Keeps a state file's original bytes beside it, as `NAME.corrupt-<time>`.
fn keep_aside(dir: &Path, name: &str, path: &Path, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let aside = dir.join(format!(
        "{name}.corrupt-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.fZ")
    ));
    let keep = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&aside)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    keep.map_err(|source| StoreError::KeepAside {
        path: path.to_path_buf(),
        to: aside.clone(),
        source,
    })?;
    Ok(aside)
}

/// The file's bytes: `{"version":1,"seq":S,"devices":[...]}` and a newline,
/// exactly what serde_json writes for [`FileOut`].
fn encode<'a>(
    seq: u64,
    records: impl Iterator<Item = &'a StoredDevice>,
    vgpus: impl Iterator<Item = &'a StoredVgpu>,
) -> serde_json::Result<Vec<u8>> {
    let vgpus: Vec<&StoredVgpu> = vgpus.collect();
    let mut leased = vgpus.iter().any(|v| v.lease.is_some());
    let mut body = Vec::with_capacity(64 * 1024);
    for (i, r) in records.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        leased |= r.lease.is_some();
        serde_json::to_writer(&mut body, r)?;
    }
    let version = if leased {
        VERSION
    } else if !vgpus.is_empty() {
        VERSION_WITH_VGPUS
    } else {
        VERSION_WITHOUT_VGPUS
    };
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(
        format!("{{\"version\":{version},\"seq\":{seq},\"devices\":[").as_bytes(),
    );
    out.append(&mut body);
    out.push(b']');
    if !vgpus.is_empty() {
        out.extend_from_slice(b",\"vgpus\":");
        serde_json::to_writer(&mut out, &vgpus)?;
    }
    out.extend_from_slice(b"}\n");
    Ok(out)
}

fn broken(c: Conflict) -> String {
    format!("the records break a registry rule: {c}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciAddress;
    use crate::store::registry::tests::sample;
    use std::os::unix::fs::PermissionsExt;

    impl Store {
        fn load(&self) -> Result<(Registry, Loaded), StoreError> {
            self.open().map(|o| (o.registry, o.loaded))
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let (empty, how) = store.load().unwrap();
        assert!(empty.is_empty());
        assert_eq!(how, Loaded::Fresh);

        let mut a = sample("a2:00.0", "l4-gpu");
        a.attached_to = Some("vm-1".into());
        a.original_driver = Some("nvidia".into());
        a.want_vfio = true;
        let r = Registry::from_devices(vec![a, sample("3b:00.0", "nic")]).unwrap();
        store.save(&r, 0).unwrap();
        let (back, how) = store.load().unwrap();
        assert_eq!(how, Loaded::Existing);
        assert_eq!(back, r);

        let text = std::fs::read_to_string(store.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["devices"][0]["type"], "gpu");
        assert!(!dir.path().join(".devices.json.tmp").exists());
    }

    /// The snapshot is exactly what serde_json writes for the whole file,
    /// after every kind of change.
    #[test]
    fn a_snapshot_is_exactly_the_file_serde_would_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut odd = sample("a2:00.0", "l4-gpu");
        // Escapes in what is stored (instance ids and names cannot hold these).
        odd.created_at = "2025 \"quoted\" \u{e9}".into();
        odd.attached_to = Some("vm-1".into());
        let mut r = Registry::from_devices(vec![odd, sample("3b:00.0", "nic")]).unwrap();
        let mut replaced = (**r.by_name("nic").unwrap()).clone();
        replaced.want_vfio = true;
        let first = r.iter().next().unwrap().id.clone();
        for (seq, change) in [
            Change::Add(sample("5e:00.0", "nvme")),
            Change::Replace(replaced),
            Change::Remove(first),
        ]
        .into_iter()
        .enumerate()
        {
            let seq = seq as u64 + 1;
            r.apply(change).unwrap();
            store.save(&r, seq).unwrap();
            let expected = FileOut {
                version: VERSION_WITHOUT_VGPUS,
                seq,
                devices: r.iter().map(|d| &**d).collect(),
                vgpus: Vec::new(),
            };
            let mut bytes = serde_json::to_vec(&expected).unwrap();
            bytes.push(b'\n');
            assert_eq!(std::fs::read(store.path()).unwrap(), bytes);
            let opened = store.open().unwrap();
            assert_eq!((opened.registry, opened.seq), (r.clone(), seq));
        }
    }

    /// *(issue 26)* A vGPU record, claimed.
    fn vgpu_sample(vf: &str) -> StoredVgpu {
        StoredVgpu {
            id: crate::store::registry::new_device_id(),
            profile: "NVIDIA L40S-4Q".into(),
            type_id: "1152".into(),
            framework: "vendor-vfio".into(),
            parent_pci_address: PciAddress::parse("0000:41:00.0").unwrap(),
            pci_address: PciAddress::parse(vf).unwrap(),
            mdev_uuid: None,
            instance_id: Some("vm-1".into()),
            created_at: "2026-12-04T05:00:00Z".into(),
            ready: false,
            lease: None,
        }
    }

    /// *(issue 27)* A vGPU's lease marks the file version 3 and its journal
    /// line format 3, as a device's does: a daemon of before refuses both
    /// instead of keeping the vGPU without its lease. Both come back whole.
    #[test]
    fn a_leased_vgpu_marks_the_file_and_the_journal_line_format_3() {
        use crate::store::registry::{Holder, Lease, OnRelease};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut r = Registry::from_devices(vec![sample("41:00.0", "l40s")]).unwrap();
        let mut leased = vgpu_sample("0000:41:00.4");
        leased.ready = true;
        leased.lease = Some(Lease {
            holder: Holder::Unit {
                name: "vm-1.service".into(),
                invocation_id: "a".repeat(32),
            },
            on_release: OnRelease::GiveBack,
        });
        r.apply(Change::AddVgpu(leased.clone())).unwrap();
        store.save(&r, 1).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(store.path()).unwrap()).unwrap();
        assert_eq!(v["version"], 3);
        assert_eq!(store.open().unwrap().registry, r);

        let line = journal_of(&[(2, Change::ReplaceVgpu(leased.clone()))]);
        let line: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(line["format"], 3);
        let mut plain = leased.clone();
        plain.lease = None;
        let line = journal_of(&[(2, Change::ReplaceVgpu(plain))]);
        let line: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(line.get("format").is_none());
        // A bad lease is refused at load.
        let mut bad = leased;
        bad.lease = Some(Lease {
            holder: Holder::Unit {
                name: "vm-1.service".into(),
                invocation_id: "not hex".into(),
            },
            on_release: OnRelease::Detach,
        });
        assert!(bad.validate().is_err());
    }

    /// *(issue 26)* vGPU records go to disk and come back, by snapshot and
    /// by journal; a file holding any is version 2, which a daemon of before
    /// refuses as newer instead of dropping them; one without stays 1.
    #[test]
    fn vgpu_records_survive_and_mark_the_file_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut r = Registry::from_devices(vec![sample("41:00.0", "l40s")]).unwrap();
        let claimed = vgpu_sample("0000:41:00.4");
        let mut ready = claimed.clone();
        ready.ready = true;
        let other = vgpu_sample("0000:41:00.5");
        for c in [
            Change::AddVgpu(claimed.clone()),
            Change::ReplaceVgpu(ready.clone()),
            Change::AddVgpu(other.clone()),
        ] {
            r.apply(c).unwrap();
        }
        store.save(&r, 3).unwrap();
        let text = std::fs::read_to_string(store.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 2);
        let expected = FileOut {
            version: VERSION_WITH_VGPUS,
            seq: 3,
            devices: r.iter().map(|d| &**d).collect(),
            vgpus: r.vgpus().map(|v| &**v).collect(),
        };
        assert_eq!(text, serde_json::to_string(&expected).unwrap() + "\n");
        let opened = store.open().unwrap();
        assert_eq!(opened.registry, r);
        assert!(opened.registry.vgpu(&ready.id).unwrap().ready);

        // By the journal: the claim, then its removal.
        let third = vgpu_sample("0000:41:00.6");
        std::fs::write(
            store.journal_path(),
            journal_of(&[
                (4, Change::AddVgpu(third.clone())),
                (5, Change::RemoveVgpu(other.id.clone())),
            ]),
        )
        .unwrap();
        let opened = store.open().unwrap();
        assert!(opened.registry.vgpu(&third.id).is_some());
        assert!(opened.registry.vgpu(&other.id).is_none());

        // Rules: one record per function, an mdev has a UUID, ids are ids.
        let mut same_vf = vgpu_sample("0000:41:00.4");
        same_vf.ready = true;
        assert!(r.apply(Change::AddVgpu(same_vf)).is_err());
        let mut no_uuid = vgpu_sample("0000:41:00.7");
        no_uuid.framework = "mdev".into();
        no_uuid.type_id = "nvidia-470".into();
        assert!(no_uuid.validate().unwrap_err().contains("UUID"));
        let mut bad = vgpu_sample("0000:41:00.7");
        bad.type_id = "../../x".into();
        assert!(bad.validate().is_err());

        // Once none is left, the file is version 1 again.
        let mut none = Registry::from_devices(vec![sample("41:00.0", "l40s")]).unwrap();
        none.apply(Change::AddVgpu(claimed.clone())).unwrap();
        none.apply(Change::RemoveVgpu(claimed.id.clone())).unwrap();
        store.save(&none, 9).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(store.path()).unwrap()).unwrap();
        assert_eq!(v["version"], 1);
        assert!(v.get("vgpus").is_none());
    }

    fn journal_of(changes: &[(u64, Change)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, c) in changes {
            journal::encode(&mut out, *seq, c, true).unwrap();
        }
        out
    }

    /// Start-up replays the journal's changes after the snapshot's `seq`,
    /// skips those it already holds, and cuts a torn last write.
    #[test]
    fn the_journal_is_replayed_over_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let a = sample("a2:00.0", "gpu");
        let b = sample("3b:00.0", "nic");
        let mut a2 = a.clone();
        a2.attached_to = Some("vm-1".into());
        // The snapshot holds changes 1 and 2; a crash left the journal uncut.
        let snap = Registry::from_devices(vec![a.clone()]).unwrap();
        store.save(&snap, 2).unwrap();
        let mut bytes = journal_of(&[
            (1, Change::Add(b.clone())),
            (2, Change::Remove(b.id.clone())),
            (3, Change::Replace(a2.clone())),
            (4, Change::Add(b.clone())),
        ]);
        let whole = bytes.len() as u64;
        bytes.extend_from_slice(b"{\"seq\":5,\"end\":true,\"remo");
        std::fs::write(store.journal_path(), &bytes).unwrap();
        let opened = store.open().unwrap();
        assert_eq!(opened.seq, 4);
        assert_eq!(opened.replayed, 2);
        assert_eq!(opened.loaded, Loaded::Existing);
        assert_eq!(
            opened.registry,
            Registry::from_devices(vec![a2, b]).unwrap()
        );
        assert_eq!(opened.journal.len(), whole);
        assert_eq!(
            std::fs::metadata(store.journal_path()).unwrap().len(),
            whole
        );
    }

    /// A journal that does not follow the snapshot, or is damaged before its
    /// last whole write, is refused and left as it is.
    #[test]
    fn a_journal_that_does_not_follow_is_refused() {
        let a = sample("a2:00.0", "gpu");
        let gap = journal_of(&[(5, Change::Add(a.clone()))]);
        let damaged = [
            b"{oops\n".to_vec(),
            journal_of(&[(1, Change::Add(a.clone()))]),
        ]
        .concat();
        for (bytes, says) in [(gap, "goes on from change 4"), (damaged, "line 1")] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(dir.path());
            store.save(&Registry::default(), 2).unwrap();
            std::fs::write(store.journal_path(), &bytes).unwrap();
            let err = store.open().unwrap_err();
            assert!(matches!(err, StoreError::Unparsable { .. }), "{err}");
            assert!(err.to_string().contains(says), "{err}");
            assert_eq!(std::fs::read(store.journal_path()).unwrap(), bytes);
        }
    }

    /// A journal entry that breaks a rule is dropped and logged like a
    /// record; the journal is kept aside and the registry written afresh.
    #[test]
    fn a_journal_entry_that_breaks_a_rule_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let a = sample("a2:00.0", "gpu");
        let mut same_address = sample("a2:00.0", "again");
        same_address.id = "zzzzzzzzzzzzzzzzzzzzzzzz".into();
        let mut bad_name = sample("3b:00.0", "nic");
        bad_name.name = "no/slashes".into();
        let bytes = journal_of(&[
            (1, Change::Add(a.clone())),
            (2, Change::Add(same_address)),
            (3, Change::Add(bad_name)),
            (4, Change::Remove("missingmissingmissing0000".into())),
        ]);
        std::fs::write(store.journal_path(), &bytes).unwrap();
        let opened = store.open().unwrap();
        let Loaded::Dropped { dropped, aside } = &opened.loaded else {
            panic!("{:?}", opened.loaded)
        };
        assert_eq!(*dropped, 3);
        assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes);
        assert_eq!(opened.registry, Registry::from_devices(vec![a]).unwrap());
        assert!(!store.journal_path().exists());
        let again = store.open().unwrap();
        assert_eq!((again.registry, again.seq), (opened.registry, 4));
    }

    /// The journal follows the state directory's rules: a link, a FIFO, or a
    /// file others may write is refused.
    #[test]
    fn an_unsafe_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "").unwrap();
        std::os::unix::fs::symlink(&elsewhere, store.journal_path()).unwrap();
        let err = store.open().unwrap_err();
        assert!(
            err.to_string().contains("symbolic link; the journal"),
            "{err}"
        );

        std::fs::remove_file(store.journal_path()).unwrap();
        let c = std::ffi::CString::new(store.journal_path().to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = store.open().unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        std::fs::remove_file(store.journal_path()).unwrap();
        std::fs::write(store.journal_path(), "").unwrap();
        std::fs::set_permissions(store.journal_path(), PermissionsExt::from_mode(0o620)).unwrap();
        let err = store.open().unwrap_err();
        assert!(
            err.to_string().contains("journal is writable by group"),
            "{err}"
        );
    }

    #[test]
    fn an_unparsable_file_is_refused_and_left_untouched() {
        for junk in ["{not json", ""] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(dir.path());
            std::fs::write(store.path(), junk).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Unparsable { .. }), "{err}");
            // serde's message says where parsing failed.
            assert!(err.to_string().contains("line 1"), "{err}");
            assert_eq!(std::fs::read_to_string(store.path()).unwrap(), junk);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }

    /// Records that break the API's rules are dropped one by one; the valid
    /// ones stay, and the original file is kept aside byte for byte.
    #[test]
    fn broken_records_are_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let good = sample("a2:00.0", "l4-gpu");
        let mut attached = sample("3b:00.0", "nic");
        attached.attached_to = Some("vm-1".into());
        let dup_address = sample("a2:00.0", "again");
        let mut as_id = sample("5e:00.0", "x");
        as_id.name = good.id.clone();
        let mut bad = Vec::new();
        for (id, name) in [
            ("x-y", "ok-name"),
            ("", "ok-name-2"),
            ("abcdefghijklmnopqrstuvwx", "a/b"),
            ("bbcdefghijklmnopqrstuvwx", "line\nbreak"),
            ("cbcdefghijklmnopqrstuvwx", "bell\u{7}"),
        ] {
            let mut d = sample("0000:00:00.0", "z");
            d.id = id.into();
            d.name = name.into();
            bad.push(serde_json::to_value(&d).unwrap());
        }
        let mut devices = vec![
            serde_json::to_value(&good).unwrap(),
            serde_json::to_value(&attached).unwrap(),
            serde_json::to_value(&dup_address).unwrap(),
            serde_json::to_value(&as_id).unwrap(),
            serde_json::json!({"id": 7}),
        ];
        devices.extend(bad);
        let text = serde_json::json!({"version": 1, "devices": devices}).to_string();
        std::fs::write(store.path(), &text).unwrap();
        let (r, how) = store.load().unwrap();
        let Loaded::Dropped { dropped, aside } = how else {
            panic!("{how:?}")
        };
        assert_eq!(dropped, 8);
        assert_eq!(r.len(), 2);
        assert_eq!(**r.by_name("l4-gpu").unwrap(), good);
        assert_eq!(**r.by_name("nic").unwrap(), attached);
        assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), text);
        // The file now holds what was kept, and loads cleanly.
        assert_eq!(store.load().unwrap(), (r, Loaded::Existing));
    }

    #[test]
    fn a_newer_version_however_large_is_refused_and_left_in_place() {
        for version in ["4", "18446744073709551616", "3.5", "1e300"] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(dir.path());
            let text = format!(r#"{{"version": {version}, "devices": [], "extra": true}}"#);
            std::fs::write(store.path(), &text).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Newer { .. }), "{version}: {err}");
            assert!(err
                .to_string()
                .contains(&store.path().display().to_string()));
            assert_eq!(std::fs::read_to_string(store.path()).unwrap(), text);
        }
    }

    #[test]
    fn anything_but_a_regular_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let c = std::ffi::CString::new(store.path().to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::write(&elsewhere, r#"{"version":1,"devices":[]}"#).unwrap();
        std::os::unix::fs::symlink(&elsewhere, store.path()).unwrap();
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_directory_or_file_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o777)).unwrap();
        let err = store.load().unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o700)).unwrap();
        std::fs::write(store.path(), r#"{"version":1,"devices":[]}"#).unwrap();
        std::fs::set_permissions(store.path(), PermissionsExt::from_mode(0o666)).unwrap();
        let err = store.load().unwrap_err();
        assert!(
            err.to_string().contains("registry file is writable"),
            "{err}"
        );
    }

    /// A link planted at the temp file is replaced, never followed, and the
    /// file is 0600 whatever the umask; a stale temp file goes at load.
    #[test]
    fn the_temp_file_is_never_followed_and_the_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, store.temp_path()).unwrap();
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let saved = store.save(
            &Registry::from_devices(vec![sample("a2:00.0", "g")]).unwrap(),
            0,
        );
        unsafe { libc::umask(old) };
        saved.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let mode = std::fs::metadata(store.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::os::unix::fs::symlink(&victim, store.temp_path()).unwrap();
        store.load().unwrap();
        assert!(std::fs::symlink_metadata(store.temp_path()).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn failed_write_reports_and_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let r = Registry::from_devices(vec![sample("a2:00.0", "gpu")]).unwrap();
        store.save(&r, 0).unwrap();
        let gone = Store::new(dir.path().join("missing-dir"));
        assert!(matches!(gone.save(&r, 0), Err(StoreError::Write { .. })));
        assert_eq!(store.load().unwrap().0, r);
    }
}
