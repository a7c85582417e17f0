//! PCI addresses (`dddd:bb:dd.f`).
//!
//! Every string that will become part of a sysfs path passes through
//! [`PciAddress::parse`] first, so nothing a caller sends can name a file outside
//! `bus/pci/devices`: the parsed form holds only numbers, and the path is printed
//! from those numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A canonical PCI function address: domain, bus, device (slot) and function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// The PCI domain (segment), `0000`.
    pub domain: u16,
    /// The bus number.
    pub bus: u8,
    /// The device number on the bus (0-31).
    pub device: u8,
    /// The function number (0-7).
    pub function: u8,
}

/// Why a string is not a PCI address. The message says what the right form is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {shown:?}: {reason}; expected dddd:bb:dd.f or bb:dd.f in hex, e.g. 0000:a2:00.0")]
pub struct AddressError {
    shown: String,
    reason: &'static str,
}

impl AddressError {
    fn new(input: &str, reason: &'static str) -> Self {
        // Keep hostile input from flooding logs and error replies.
        let mut shown: String = input.chars().take(64).collect();
        if input.chars().count() > 64 {
            shown.push('…');
        }
        AddressError { shown, reason }
    }
}

fn hex_field(s: &str, width: usize) -> Option<u32> {
    if s.len() != width || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl PciAddress {
    /// Parses `dddd:bb:dd.f` or `bb:dd.f` (domain 0000), hex in either case.
    ///
    /// Strict on purpose: no surrounding whitespace, no trailing newline, device at
    /// most 0x1f, function 0-7. Anything else is refused before it can reach the
    /// file system.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        if input.is_empty() {
            return Err(AddressError::new(input, "it is empty"));
        }
        if input.contains('/') || input.contains("..") {
            return Err(AddressError::new(input, "it contains a path"));
        }
        if !input.is_ascii() {
            return Err(AddressError::new(input, "it has non-ASCII characters"));
        }
        let (head, function) = input
            .rsplit_once('.')
            .ok_or_else(|| AddressError::new(input, "there is no '.function' part"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, s] => (*d, *b, *s),
            [b, s] => ("0000", *b, *s),
            _ => {
                return Err(AddressError::new(
                    input,
                    "it needs two or three ':'-separated fields",
                ))
            }
        };
        let domain = hex_field(domain, 4)
            .ok_or_else(|| AddressError::new(input, "the domain is not 4 hex digits"))?;
        let bus = hex_field(bus, 2)
            .ok_or_else(|| AddressError::new(input, "the bus is not 2 hex digits"))?;
        let device = hex_field(device, 2)
            .ok_or_else(|| AddressError::new(input, "the device is not 2 hex digits"))?;
        if device > 0x1f {
            return Err(AddressError::new(input, "the device number is above 1f"));
        }
        let function = match function.as_bytes() {
            [f @ b'0'..=b'7'] => f - b'0',
            _ => {
                return Err(AddressError::new(
                    input,
                    "the function is not a digit from 0 to 7",
                ))
            }
        };
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function,
        })
    }

    /// The default device name: `pci-0000-a2-00-0`.
    pub fn default_name(&self) -> String {
        format!(
            "pci-{:04x}-{:02x}-{:02x}-{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PciAddress::parse(s)
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PciAddress::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let accepted = [
            ("0000:a2:00.0", "0000:a2:00.0"),
            ("0000:A2:00.0", "0000:a2:00.0"),
            ("a2:00.0", "0000:a2:00.0"),
            ("A2:00.0", "0000:a2:00.0"),
            ("0000:00:1f.7", "0000:00:1f.7"),
            ("ffff:ff:1f.7", "ffff:ff:1f.7"),
            ("0001:3b:00.1", "0001:3b:00.1"),
            ("00:02.0", "0000:00:02.0"),
            ("DEAD:Be:0F.3", "dead:be:0f.3"),
            ("0000:00:00.0", "0000:00:00.0"),
        ];
        for (input, want) in accepted {
            let got = PciAddress::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got.to_string(), want, "{input}");
        }
        let rejected = [
            "",
            "0000:a2:00.8",
            "0000:a2:00.9",
            "0000:a2:20.0",
            "0000:a2:00.0\n",
            " 0000:a2:00.0",
            "0000:a2:00.0 ",
            "0000:a2:00",
            "0000:a2:00.",
            "0000:a2:0.0",
            "000:a2:00.0",
            "00000:a2:00.0",
            "0000:a2:00.00",
            "0000:g2:00.0",
            "0000:a2:00.0/../..",
            "../../etc/passwd",
            "/sys/bus/pci/devices/0000:a2:00.0",
            "0000:a2:00.0/driver",
            "..:..:..",
            "0000:a2:..0",
            "0000:a2:00.0:1",
            "1:0000:a2:00.0",
            "a2-00-0",
            "pci-0000-a2-00-0",
            "0x00:a2:00.0",
            "0000:a2:00.-1",
            "0000:a2:00.0\0",
            "0000:ａ2:00.0",
            "+000:a2:00.0",
            ":a2:00.0",
        ];
        for input in rejected {
            assert!(PciAddress::parse(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn default_name_and_display() {
        let a = PciAddress::parse("0000:A2:00.0").unwrap();
        assert_eq!(a.default_name(), "pci-0000-a2-00-0");
        assert_eq!(a.to_string(), "0000:a2:00.0");
    }

    #[test]
    fn error_message_is_bounded_and_helpful() {
        let long = "x".repeat(1 << 20);
        let e = PciAddress::parse(&long).unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
        assert!(e.contains("dddd:bb:dd.f"));
    }
}
