//! Vendor and device names from the PCI ID database (pci.ids).
//!
//! A copy of the database is embedded (`data/pci.ids`, the text as the PCI
//! ID Project publishes it). Distributions update theirs more often than we
//! release, so a system copy that is newer wins; an older or unreadable one
//! is ignored.
//!
//! *(issue 30)* The embedded copy is one string, searched in place: the
//! `pci-ids` crate's tables it replaces were 40,000 name pointers that the
//! loader relocated at every start (1.2 MB of relocations and 1.4 MB of
//! copied tables, resident in every hypemand). The vendors are sorted, so a
//! lookup reads a few pages of the text, not all of it.

use std::collections::HashMap;
use std::path::Path;

/// The embedded database.
static EMBEDDED: &str = include_str!("../../data/pci.ids");

/// Version of the embedded database (its `# Version:` line; a test keeps
/// the two equal).
pub const EMBEDDED_VERSION: &str = "2025.07.11";

/// Where distributions install pci.ids, in order of preference.
pub const SYSTEM_PATHS: [&str; 2] = ["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// Answers already looked up: (vendor, device or None for the vendor) -> name.
type Memo = std::sync::Mutex<HashMap<(u16, Option<u16>), Option<std::sync::Arc<str>>>>;

/// Looks up names; built once at start-up. Answers are memoised: `List`
/// asks for thousands of names, of a few devices.
#[derive(Debug, Default)]
pub struct PciIds {
    /// A newer system database: its version and text. Searched line by
    /// line (nothing says a system file is sorted).
    system: Option<(String, String)>,
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

    /// The system database at `path` when it has a version newer than ours.
    pub fn from_file_if_newer(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let version = version(&text)?.to_string();
        if version.as_str() <= EMBEDDED_VERSION {
            tracing::debug!(path = %path.display(), %version, "system pci.ids is not newer than the embedded one");
            return None;
        }
        tracing::info!(path = %path.display(), %version, "using the system pci.ids");
        Some(PciIds {
            system: Some((version, text)),
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

    fn memoised(&self, key: (u16, Option<u16>)) -> Option<String> {
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        memo.entry(key)
            .or_insert_with(|| {
                let (vendor, device) = key;
                let found = match &self.system {
                    Some((_, text)) => vendor_line(text, vendor),
                    None => sorted_vendor_line(EMBEDDED, vendor),
                };
                found
                    .and_then(|(text, at)| match device {
                        None => named(text, at, vendor),
                        Some(device) => device_name(text, at, device),
                    })
                    .map(std::sync::Arc::from)
            })
            .as_deref()
            .map(str::to_string)
    }

    pub fn vendor_name(&self, vendor: u16) -> Option<String> {
        self.memoised((vendor, None))
    }

    pub fn device_name(&self, vendor: u16, device: u16) -> Option<String> {
        self.memoised((vendor, Some(device)))
    }
}

/// The `# Version:` of a pci.ids text (in its header comment).
fn version(text: &str) -> Option<&str> {
    text.lines()
        .take_while(|l| l.starts_with('#') || l.is_empty())
        .find_map(|l| l.strip_prefix('#')?.trim().strip_prefix("Version:"))
        .map(str::trim)
}

/// The id and name of a line `XXXX  name` (after any leading tabs).
fn split_id(line: &str) -> Option<(u16, &str)> {
    let (id, name) = line.split_once("  ")?;
    if id.len() != 4 {
        return None;
    }
    Some((u16::from_str_radix(id, 16).ok()?, name.trim()))
}

/// The line of `text` that starts at byte `at`.
fn line_at(text: &str, at: usize) -> &str {
    let rest = &text[at..];
    rest.split('\n').next().unwrap_or(rest)
}

/// Whether a line is a vendor's (or, past the vendors, a class's): not a
/// device or subsystem (a tab), a comment or empty.
fn top_level(line: &str) -> bool {
    !(line.is_empty() || line.starts_with('\t') || line.starts_with('#'))
}

/// A vendor line's id; past the vendors (the `C xx` class lines) and on
/// anything else, above every id.
fn top_key(line: &str) -> u32 {
    split_id(line).map_or(u32::MAX, |(id, _)| u32::from(id))
}

/// `vendor`'s line, searched line by line.
fn vendor_line(text: &str, vendor: u16) -> Option<(&str, usize)> {
    let mut at = 0;
    for line in text.split('\n') {
        if line.starts_with("C ") {
            return None;
        }
        if top_level(line) && top_key(line) == u32::from(vendor) {
            return Some((text, at));
        }
        at += line.len() + 1;
    }
    None
}

/// `vendor`'s line in a text whose vendors are sorted, by bisection over
/// byte offsets: each step reads from the middle to the next vendor line.
fn sorted_vendor_line(text: &str, vendor: u16) -> Option<(&str, usize)> {
    let bytes = text.as_bytes();
    let target = u32::from(vendor);
    // The next line start at or after `from`.
    let next_line = |mut from: usize| -> usize {
        if from == 0 || bytes[from - 1] == b'\n' {
            return from;
        }
        // `from` may fall inside a name's character; a line starts after a
        // newline, which is one byte.
        while !text.is_char_boundary(from) {
            from += 1;
        }
        text[from..]
            .find('\n')
            .map_or(bytes.len(), |i| from + i + 1)
    };
    // Invariant: a line of `vendor` starts in [lo, hi).
    let (mut lo, mut hi) = (0, bytes.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let mut at = next_line(mid);
        while at < hi && !top_level(line_at(text, at)) {
            at = next_line(at + 1);
        }
        if at >= hi {
            hi = mid;
            continue;
        }
        let line = line_at(text, at);
        match top_key(line).cmp(&target) {
            std::cmp::Ordering::Equal => return Some((text, at)),
            std::cmp::Ordering::Less => lo = at + line.len() + 1,
            // No vendor line starts in [mid, at).
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    None
}

/// The vendor's name, from its line at `at`.
fn named(text: &str, at: usize, vendor: u16) -> Option<String> {
    split_id(line_at(text, at))
        .filter(|(id, _)| *id == vendor)
        .map(|(_, name)| name.to_string())
}

/// `device`'s name among the device lines that follow the vendor line at `at`.
fn device_name(text: &str, at: usize, device: u16) -> Option<String> {
    text[at..]
        .split('\n')
        .skip(1)
        .take_while(|line| !top_level(line))
        .filter_map(|line| line.strip_prefix('\t'))
        .filter(|line| !line.starts_with('\t'))
        .find_map(|line| split_id(line).filter(|(id, _)| *id == device))
        .map(|(_, name)| name.to_string())
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

    /// Every vendor name of the `pci-ids` crate's tables (built from the
    /// same pci.ids) and every 13th device name is found in place, and ids
    /// between vendors, before the first or after the last are not (every
    /// device would take a minute in a debug build).
    #[test]
    fn the_text_answers_every_name_the_crate_has() {
        assert_eq!(version(EMBEDDED), Some(EMBEDDED_VERSION));
        let ids = PciIds::default();
        let mut vendors = 0;
        for v in pci_ids::Vendors::iter() {
            vendors += 1;
            assert_eq!(
                ids.vendor_name(v.id()).as_deref(),
                Some(v.name()),
                "{:04x}",
                v.id()
            );
            for d in v.devices().step_by(13) {
                assert_eq!(
                    ids.device_name(v.id(), d.id()).as_deref(),
                    Some(d.name()),
                    "{:04x}:{:04x}",
                    v.id(),
                    d.id()
                );
            }
        }
        assert!(vendors > 2000, "{vendors}");
        let known: std::collections::HashSet<u16> =
            pci_ids::Vendors::iter().map(|v| v.id()).collect();
        for id in (0..=u16::MAX).step_by(97).filter(|id| !known.contains(id)) {
            assert_eq!(ids.vendor_name(id), None, "{id:04x}");
        }
        // A device id under the wrong vendor, and a subsystem line's id.
        assert_eq!(ids.device_name(0x10de, 0xfffe), None);
    }

    /// `text` as a system pci.ids, loaded if newer than the embedded one.
    fn system_file(text: &str) -> Option<PciIds> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pci.ids");
        std::fs::write(&path, text).unwrap();
        PciIds::from_file_if_newer(&path)
    }

    /// A system file is searched line by line: unsorted, it still answers.
    #[test]
    fn an_unsorted_system_file_answers() {
        let ids = system_file(
            "# Version: 2099.01.01\n8086  Intel\n\t1234  Some NIC\n10de  NVIDIA\n# note\n\t27b8  L4\nC 03  Display\n\t00  VGA\n",
        )
        .expect("newer");
        assert_eq!(ids.vendor_name(0x10de).as_deref(), Some("NVIDIA"));
        assert_eq!(ids.device_name(0x10de, 0x27b8).as_deref(), Some("L4"));
        assert_eq!(ids.device_name(0x8086, 0x1234).as_deref(), Some("Some NIC"));
        assert_eq!(ids.device_name(0x8086, 0x27b8), None);
        assert_eq!(ids.vendor_name(0x0003), None);
    }

    #[test]
    fn newer_system_file_wins_older_is_ignored() {
        let ids = system_file(
            "#\tVersion: 2099.01.01\n10de  NVIDIA Corp (test)\n\t27b8  L4 (test)\n\t\t10de 16ca  sub\nC 00  Unclassified\n",
        )
        .expect("newer file used");
        assert_eq!(
            ids.vendor_name(0x10de).as_deref(),
            Some("NVIDIA Corp (test)")
        );
        assert_eq!(
            ids.device_name(0x10de, 0x27b8).as_deref(),
            Some("L4 (test)")
        );
        assert_eq!(ids.source(), "system 2099.01.01");

        assert!(system_file("#\tVersion: 2001.01.01\n10de  Old\n").is_none());
        assert!(PciIds::from_file_if_newer(Path::new("/nonexistent/pci.ids")).is_none());
    }
}
