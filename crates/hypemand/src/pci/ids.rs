//! Vendor and device names from the PCI ID database (pci.ids).
//!
//! The `pci-ids` crate embeds a copy of the database. Distributions update theirs
//! more often than we release, so a system copy that is newer wins; an older or
//! unreadable one is ignored.

use std::collections::HashMap;
use std::path::Path;

/// Version of the database embedded by the `pci-ids` crate we build with.
pub const EMBEDDED_VERSION: &str = "2025.07.11";

/// Where distributions install pci.ids, in order of preference.
pub const SYSTEM_PATHS: [&str; 2] = ["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// A loaded system database: vendor id -> (vendor name, device id -> device name).
type Table = HashMap<u16, (String, HashMap<u16, String>)>;

/// Answers already looked up: (vendor, device or None for the vendor) -> name.
type Memo = std::sync::Mutex<HashMap<(u16, Option<u16>), Option<std::sync::Arc<str>>>>;

/// Looks up names; built once at start-up. Answers are memoised: the embedded
/// database is searched linearly, and `List` asks for thousands of names.
#[derive(Debug, Default)]
pub struct PciIds {
    system: Option<(String, Table)>,
    memo: Memo,
}

impl PciIds {
    /// Uses the first system database that is newer than the embedded one.
    pub fn load() -> Self {
        for path in SYSTEM_PATHS {
            if let Some(ids) = Self::from_file_if_newer(Path::new(path)) {
                return ids;
            }
        }
        PciIds::default()
    }

    /// The system database at `path` when it parses and is newer than ours.
    pub fn from_file_if_newer(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let (version, table) = parse(&text)?;
        if version.as_str() <= EMBEDDED_VERSION {
            tracing::debug!(path = %path.display(), %version, "system pci.ids is not newer than the embedded one");
            return None;
        }
        tracing::info!(path = %path.display(), %version, "using the system pci.ids");
        Some(PciIds {
            system: Some((version, table)),
            memo: Default::default(),
        })
    }

    /// Which database answers: `embedded 2025.07.11` or `system 2026.01.02`.
    pub fn source(&self) -> String {
        match &self.system {
            Some((v, _)) => format!("system {v}"),
            None => format!("embedded {EMBEDDED_VERSION}"),
        }
    }

    fn memoised(
        &self,
        key: (u16, Option<u16>),
        look: impl FnOnce() -> Option<String>,
    ) -> Option<String> {
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        memo.entry(key)
            .or_insert_with(|| look().map(std::sync::Arc::from))
            .as_deref()
            .map(str::to_string)
    }

    pub fn vendor_name(&self, vendor: u16) -> Option<String> {
        self.memoised((vendor, None), || self.lookup_vendor(vendor))
    }

    pub fn device_name(&self, vendor: u16, device: u16) -> Option<String> {
        self.memoised((vendor, Some(device)), || {
            self.lookup_device(vendor, device)
        })
    }

    fn lookup_vendor(&self, vendor: u16) -> Option<String> {
        match &self.system {
            Some((_, t)) => t.get(&vendor).map(|(n, _)| n.clone()),
            None => pci_ids::Vendors::iter()
                .find(|v| v.id() == vendor)
                .map(|v| v.name().to_string()),
        }
    }

    fn lookup_device(&self, vendor: u16, device: u16) -> Option<String> {
        match &self.system {
            Some((_, t)) => t.get(&vendor).and_then(|(_, d)| d.get(&device)).cloned(),
            None => pci_ids::Device::from_vid_pid(vendor, device).map(|d| d.name().to_string()),
        }
    }
}

/// Parses the vendor/device part of pci.ids; `None` without a `Version:` header.
fn parse(text: &str) -> Option<(String, Table)> {
    let mut version = None;
    let mut table: Table = HashMap::new();
    let mut current: Option<u16> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            if let Some(v) = rest.trim().strip_prefix("Version:") {
                version = Some(v.trim().to_string());
            }
            continue;
        }
        if line.starts_with("C ") {
            break; // the device class section follows the vendors
        }
        if let Some(rest) = line.strip_prefix('\t') {
            if rest.starts_with('\t') {
                continue; // subsystem lines
            }
            let (Some(vendor), Some((id, name))) = (current, split_id(rest)) else {
                continue;
            };
            if let Some((_, devices)) = table.get_mut(&vendor) {
                devices.insert(id, name.to_string());
            }
        } else if let Some((id, name)) = split_id(line) {
            table.insert(id, (name.to_string(), HashMap::new()));
            current = Some(id);
        }
    }
    Some((version?, table))
}

fn split_id(line: &str) -> Option<(u16, &str)> {
    let (id, name) = line.split_once("  ")?;
    Some((u16::from_str_radix(id, 16).ok()?, name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_names() {
        let ids = PciIds::default();
        assert_eq!(
            ids.vendor_name(0x10de).as_deref(),
            Some("NVIDIA Corporation")
        );
        assert_eq!(
            ids.device_name(0x10de, 0x27b8).as_deref(),
            Some("AD104GL [L4]")
        );
        assert_eq!(ids.device_name(0xfffe, 0x0001), None);
    }

    #[test]
    fn newer_system_file_wins_older_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let newer = dir.path().join("new.ids");
        std::fs::write(
            &newer,
            "#\tVersion: 2099.01.01\n10de  NVIDIA Corp (test)\n\t27b8  L4 (test)\n\t\t10de 16ca  sub\nC 00  Unclassified\n",
        )
        .unwrap();
        let ids = PciIds::from_file_if_newer(&newer).expect("newer file used");
        assert_eq!(
            ids.vendor_name(0x10de).as_deref(),
            Some("NVIDIA Corp (test)")
        );
        assert_eq!(
            ids.device_name(0x10de, 0x27b8).as_deref(),
            Some("L4 (test)")
        );
        assert_eq!(ids.source(), "system 2099.01.01");

        let older = dir.path().join("old.ids");
        std::fs::write(&older, "#\tVersion: 2001.01.01\n10de  Old\n").unwrap();
        assert!(PciIds::from_file_if_newer(&older).is_none());
        assert!(PciIds::from_file_if_newer(&dir.path().join("missing")).is_none());
    }
}
