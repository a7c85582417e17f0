//! Reading PCI attributes the way the kernel writes them.
//!
//! sysfs prints ids as `0x10de\n` and an unset `driver_override` as `(null)\n`.
//! These parsers are shared by the real backend and by anything that reads a
//! captured tree, so they accept exactly that and tolerate only whitespace.

use std::path::Path;

/// Why an attribute could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AttrError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {value:?} is not a hex number")]
    NotHex { path: String, value: String },
}

/// Parses `0x10de`, `10de`, with optional surrounding whitespace, into a number
/// no wider than `max`.
pub fn parse_hex(text: &str, max: u32) -> Option<u32> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let n = u32::from_str_radix(digits, 16).ok()?;
    (n <= max).then_some(n)
}

/// `driver_override` contents: `None` for `(null)` or empty.
pub fn parse_override(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty() && t != "(null)").then(|| t.to_string())
}

/// Reads a hex attribute file.
pub fn read_hex(path: &Path, max: u32) -> Result<u32, AttrError> {
    let text = std::fs::read_to_string(path).map_err(|source| AttrError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_hex(&text, max).ok_or_else(|| AttrError::NotHex {
        path: path.display().to_string(),
        value: text.chars().take(32).collect(),
    })
}

/// The last component of a symlink's target (`../../../bus/pci/drivers/nvidia` ->
/// `nvidia`), or `None` when there is no link.
pub fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_as_the_kernel_writes_it() {
        assert_eq!(parse_hex("0x10de\n", 0xffff), Some(0x10de));
        assert_eq!(parse_hex("0x030200\n", 0xff_ffff), Some(0x030200));
        assert_eq!(parse_hex("10DE", 0xffff), Some(0x10de));
        assert_eq!(parse_hex("0x1ffff", 0xffff), None);
        assert_eq!(parse_hex("", 0xffff), None);
        assert_eq!(parse_hex("0x", 0xffff), None);
        assert_eq!(parse_hex("0x10de garbage", 0xffff), None);
        assert_eq!(parse_hex("-1", 0xffff), None);
    }

    #[test]
    fn override_null_means_none() {
        assert_eq!(parse_override("(null)\n"), None);
        assert_eq!(parse_override("\n"), None);
        assert_eq!(parse_override("vfio-pci\n").as_deref(), Some("vfio-pci"));
    }
}
