//! The on-disk registry: `devices.json` in the state directory.
//!
//! Written whole and durably on every change (temp file, fsync, rename, fsync of
//! the directory), so after a crash or power loss the file is either the old
//! registry or the new one, never a mix.
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
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[cfg(test)]
use serde::Serialize;

use super::registry::{Change, Conflict, Registry, Stored, StoredDevice};

/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

pub const FILE_NAME: &str = "devices.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the registry {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the registry {path} has format version {found}, newer than this hypemand understands ({VERSION}); upgrade hypemand or restore an older file")]
    Newer { path: PathBuf, found: String },
    #[error("the registry {path} does not parse ({why}); it was left untouched: repair it, or move it away to start with an empty registry")]
    Unparsable { path: PathBuf, why: String },
    #[error("refusing to use {path}: {why}")]
    Unsafe { path: PathBuf, why: String },
    #[error("cannot keep the original registry {path} aside at {to}: {source}")]
    KeepAside {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the registry {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file's layout, as serde would write it; [`encode`] writes the same bytes.
#[cfg(test)]
#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    devices: Vec<&'a StoredDevice>,
}

/// What loading found, besides the registry itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No file yet: a first start.
    Fresh,
    Existing,
    /// Some records broke the rules and were dropped (each is logged); the
    /// original file is kept at `aside`, and the file now holds the rest.
    Dropped {
        dropped: usize,
        aside: PathBuf,
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
fn newer_version(value: &serde_json::Value) -> Option<String> {
    let v = value.get("version")?;
    let n = v.as_number()?;
    let newer = match n.as_u64() {
        Some(u) => u > u64::from(VERSION),
        None => n.as_f64().is_some_and(|f| f > f64::from(VERSION)),
    };
    newer.then(|| n.to_string())
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn temp_path(&self) -> PathBuf {
        self.dir.join(format!(".{FILE_NAME}.tmp"))
    }

    /// Reads the registry. A missing file is an empty registry. Refused (the
    /// daemon exits 3 and the file stays as it is): an unsafe directory or
    /// file, anything but a regular file, a newer format, a file that does
    /// not parse. Records that break a rule are dropped, each logged, and the
    /// original file is kept aside.
    pub fn load(&self) -> Result<(Registry, Loaded), StoreError> {
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
        // A temp file left by a crash: never trusted, never followed.
        let tmp = self.temp_path();
        if std::fs::symlink_metadata(&tmp).is_ok() {
            tracing::info!(path = %tmp.display(), "removing a temp file left by an interrupted write");
            std::fs::remove_file(&tmp).map_err(|source| StoreError::Write {
                path: tmp.clone(),
                source,
            })?;
        }

        let path = self.path();
        // No symlink followed; a FIFO or device does not block the open.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Registry::default(), Loaded::Fresh))
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(StoreError::Unsafe {
                    path,
                    why: "it is a symbolic link; the registry must be a regular file".into(),
                })
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let meta = file.metadata().map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(StoreError::Unsafe {
                path,
                why: "it is not a regular file".into(),
            });
        }
        check_owned(&path, &meta, "registry file")?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes)
            .map_err(|source| StoreError::Read {
                path: path.clone(),
                source,
            })?;

        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Unparsable {
                path: path.clone(),
                why: e.to_string(),
            })?;
        // The version before the shape: a newer file whose records we would
        // not understand is refused, not judged by our rules.
        if let Some(found) = newer_version(&value) {
            return Err(StoreError::Newer { path, found });
        }
        if value.get("version").and_then(|v| v.as_u64()) != Some(u64::from(VERSION)) {
            return Err(StoreError::Unparsable {
                path,
                why: format!("no \"version\": {VERSION} at the top level"),
            });
        }
        let Some(records) = value.get("devices").and_then(|d| d.as_array()) else {
            return Err(StoreError::Unparsable {
                path,
                why: "no \"devices\" list at the top level".into(),
            });
        };
        let mut registry = Registry::default();
        let mut dropped = 0;
        for (i, record) in records.iter().enumerate() {
            let id = record
                .get("id")
                .and_then(|v| v.as_str())
                .map(super::registry::shorten)
                .unwrap_or_default();
            let kept = serde_json::from_value::<StoredDevice>(record.clone())
                .map_err(|e| e.to_string())
                .and_then(|d| d.validate().map(|()| d))
                .and_then(|d| registry.insert(d).map_err(broken));
            if let Err(reason) = kept {
                dropped += 1;
                tracing::error!(
                    path = %path.display(),
                    record = i,
                    device_id = %id,
                    %reason,
                    "dropped a record that breaks the registry's rules"
                );
            }
        }
        if dropped == 0 {
            return Ok((registry, Loaded::Existing));
        }
        let aside = self.dir.join(format!(
            "{FILE_NAME}.corrupt-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.fZ")
        ));
        let keep = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&aside)
            .and_then(|mut f| {
                f.write_all(&bytes)?;
                f.sync_all()
            });
        keep.map_err(|source| StoreError::KeepAside {
            path: path.clone(),
            to: aside.clone(),
            source,
        })?;
        self.save(&registry)?;
        tracing::error!(
            path = %path.display(),
            kept = registry.len(),
            dropped,
            original = %aside.display(),
            "some records broke the registry's rules and were dropped; the original file is kept aside"
        );
        Ok((registry, Loaded::Dropped { dropped, aside }))
    }

    /// Replaces the file with `registry`, durably.
    pub fn save(&self, registry: &Registry) -> Result<(), StoreError> {
        self.write(registry.iter().map(|device| Stored { device, json: None }))
    }

    /// Writes the registry as it will be once `change` is applied, without
    /// building that registry first, reusing each kept record's JSON.
    pub fn save_with(&self, registry: &Registry, change: &Change) -> Result<(), StoreError> {
        self.write(registry.iter_after(change))
    }

    fn write<'a>(&self, records: impl Iterator<Item = Stored<'a>>) -> Result<(), StoreError> {
        let path = self.path();
        let err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let json = encode(records).map_err(|e| err(e.into()))?;
        let tmp = self.temp_path();
        let result = write_synced(&tmp, &json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| File::open(&self.dir)?.sync_all());
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(err)
    }
}

/// The file's bytes: `{"version":1,"devices":[...]}` and a newline, exactly
/// what serde_json writes for [`FileOut`], with already-encoded records copied.
fn encode<'a>(records: impl Iterator<Item = Stored<'a>>) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(format!("{{\"version\":{VERSION},\"devices\":[").as_bytes());
    for (i, r) in records.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match r.json {
            Some(j) => out.extend_from_slice(j.as_bytes()),
            None => serde_json::to_writer(&mut out, r.device)?,
        }
    }
    out.extend_from_slice(b"]}\n");
    Ok(out)
}

fn broken(c: Conflict) -> String {
    format!("the records break a registry rule: {c}")
}

/// Writes a fresh file: whatever is at `path` is unlinked first (a link is
/// removed, not followed), and the new file is created exclusively, never
/// through a symbolic link, with mode 0600 whatever the umask.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::tests::sample;

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
        store.save(&r).unwrap();
        let (back, how) = store.load().unwrap();
        assert_eq!(how, Loaded::Existing);
        assert_eq!(back, r);

        let text = std::fs::read_to_string(store.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["devices"][0]["type"], "gpu");
        assert!(!dir.path().join(".devices.json.tmp").exists());
    }

    /// Records copied from their cached JSON give the same bytes serde_json
    /// writes for the whole file, after every kind of change.
    #[test]
    fn a_change_writes_exactly_the_file_serde_would() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut odd = sample("a2:00.0", "l4-gpu");
        // Escapes in what is stored (instance ids and names cannot hold these).
        odd.created_at = "2025 \"quoted\" \u{e9}".into();
        odd.attached_to = Some("vm-1".into());
        let mut r = Registry::from_devices(vec![odd, sample("3b:00.0", "nic")]).unwrap();
        let mut replaced = r.by_name("nic").unwrap().clone();
        replaced.want_vfio = true;
        let first = r.iter().next().unwrap().id.clone();
        for change in [
            Change::Add(sample("5e:00.0", "nvme")),
            Change::Replace(replaced),
            Change::Remove(first),
        ] {
            store.save_with(&r, &change).unwrap();
            r.apply(change).unwrap();
            let expected = FileOut {
                version: VERSION,
                devices: r.iter().collect(),
            };
            let mut bytes = serde_json::to_vec(&expected).unwrap();
            bytes.push(b'\n');
            assert_eq!(std::fs::read(store.path()).unwrap(), bytes);
            assert_eq!(store.load().unwrap().0, r);
        }
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
        assert_eq!(r.by_name("l4-gpu").unwrap(), &good);
        assert_eq!(r.by_name("nic").unwrap(), &attached);
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), text);
        // The file now holds what was kept, and loads cleanly.
        assert_eq!(store.load().unwrap(), (r, Loaded::Existing));
    }

    #[test]
    fn a_newer_version_however_large_is_refused_and_left_in_place() {
        for version in ["2", "18446744073709551616", "1.5", "1e300"] {
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
        let saved = store.save(&Registry::from_devices(vec![sample("a2:00.0", "g")]).unwrap());
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
        store.save(&r).unwrap();
        let gone = Store::new(dir.path().join("missing-dir"));
        assert!(matches!(gone.save(&r), Err(StoreError::Write { .. })));
        assert_eq!(store.load().unwrap().0, r);
    }
}
