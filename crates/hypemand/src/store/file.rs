//! The on-disk registry: `devices.json` in the state directory.
//!
//! Written whole and durably on every change (temp file, fsync, rename, fsync of
//! the directory), so after a crash or power loss the file is either the old
//! registry or the new one, never a mix. A file we cannot parse is moved aside,
//! never deleted: it may be the only record of which GPU belongs to which VM.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
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
    Newer { path: PathBuf, found: u64 },
    #[error("cannot move the unreadable registry {path} aside to {to}: {source}")]
    MoveAside {
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

#[derive(Deserialize)]
struct FileIn {
    version: u32,
    devices: Vec<StoredDevice>,
}

/// What loading found, besides the registry itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No file yet: a first start.
    Fresh,
    Existing,
    /// The file could not be used and now lives at this path.
    MovedAside(PathBuf),
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

    /// Reads the registry. A missing file is an empty registry; a newer format or
    /// an unreadable file is an error; a file that does not parse (or breaks the
    /// registry's invariants) is moved aside and the registry starts empty.
    pub fn load(&self) -> Result<(Registry, Loaded), StoreError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Registry::default(), Loaded::Fresh))
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        // Look at the version before the shape, so a newer file whose records we
        // would not understand is refused rather than moved aside.
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            if let Some(found) = value.get("version").and_then(|v| v.as_u64()) {
                if found > u64::from(VERSION) {
                    return Err(StoreError::Newer { path, found });
                }
            }
        }
        let reason = match serde_json::from_slice::<FileIn>(&bytes) {
            Ok(file) if file.version == VERSION => match Registry::from_devices(file.devices) {
                Ok(registry) => return Ok((registry, Loaded::Existing)),
                Err(c) => broken(c),
            },
            Ok(file) => format!("unsupported version {}", file.version),
            Err(e) => e.to_string(),
        };
        let to = self.dir.join(format!(
            "{FILE_NAME}.corrupt-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.fZ")
        ));
        std::fs::rename(&path, &to).map_err(|source| StoreError::MoveAside {
            path: path.clone(),
            to: to.clone(),
            source,
        })?;
        tracing::error!(
            path = %path.display(),
            moved_to = %to.display(),
            %reason,
            "the registry could not be parsed; it was moved aside and the daemon starts with an empty registry"
        );
        Ok((Registry::default(), Loaded::MovedAside(to)))
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
        let tmp = self.dir.join(format!(".{FILE_NAME}.tmp"));
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

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
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
        odd.attached_to = Some("vm \"quoted\" \u{e9}".into());
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
    fn corrupt_file_is_moved_aside_not_deleted() {
        for junk in ["{not json", "{\"version\":1,\"devices\":[{\"id\":1}]}", ""] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(dir.path());
            std::fs::write(store.path(), junk).unwrap();
            let (r, how) = store.load().unwrap();
            assert!(r.is_empty());
            let Loaded::MovedAside(to) = how else {
                panic!("{how:?}")
            };
            assert!(to
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("devices.json.corrupt-"));
            assert_eq!(std::fs::read_to_string(&to).unwrap(), junk);
            assert!(!store.path().exists());
        }
    }

    #[test]
    fn duplicate_records_count_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let a = sample("a2:00.0", "x1");
        let b = sample("a2:00.0", "x2");
        let text = serde_json::json!({"version": 1, "devices": [a, b]}).to_string();
        std::fs::write(store.path(), text).unwrap();
        assert!(matches!(store.load().unwrap().1, Loaded::MovedAside(_)));
    }

    #[test]
    fn newer_version_is_refused_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        std::fs::write(
            store.path(),
            r#"{"version": 2, "devices": [], "extra": true}"#,
        )
        .unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Newer { found: 2, .. }));
        assert!(err
            .to_string()
            .contains(&store.path().display().to_string()));
        assert!(store.path().exists());
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
