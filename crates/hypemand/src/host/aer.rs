//! *(issue 29)* A function's PCIe error counters, as the kernel's AER driver
//! keeps them (`Documentation/ABI/testing/sysfs-bus-pci-devices-aer_stats`).
//!
//! Each of `aer_dev_correctable`, `aer_dev_nonfatal` and `aer_dev_fatal`
//! holds lines of `NAME COUNT`, one per error kind, and a last line
//! `TOTAL_ERR_COR`, `TOTAL_ERR_NONFATAL` or `TOTAL_ERR_FATAL` with their sum.
//! Only the total is believed; a file without it, or with a total that is
//! not a number, is absent. The kernel shows the files only for functions
//! with the AER capability, and only when the AER driver runs.

use serde::{Deserialize, Serialize};

/// What the kernel's AER recovery says in a `change` uevent
/// (`pci_uevent_ers` in drivers/pci/pci-driver.c): `ERROR_EVENT` is
/// `BEGIN_RECOVERY`, `SUCCESSFUL_RECOVERY` or `FAILED_RECOVERY`, and
/// `DEVICE_ONLINE` 0 or 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// `ERROR_EVENT`, as sent if it is one of the kernel's three words,
    /// else `unknown`.
    pub error_event: &'static str,
    /// `DEVICE_ONLINE`; `None` when absent or not 0 or 1.
    pub device_online: Option<bool>,
}

impl Recovery {
    /// The kernel's three words.
    pub const EVENTS: [&'static str; 3] =
        ["BEGIN_RECOVERY", "SUCCESSFUL_RECOVERY", "FAILED_RECOVERY"];

    /// From a uevent's two properties; `None` when it has neither.
    pub fn from_uevent(error_event: Option<&str>, device_online: Option<&str>) -> Option<Recovery> {
        if error_event.is_none() && device_online.is_none() {
            return None;
        }
        Some(Recovery {
            error_event: error_event
                .and_then(|e| Self::EVENTS.into_iter().find(|k| *k == e))
                .unwrap_or("unknown"),
            device_online: match device_online {
                Some("1") => Some(true),
                Some("0") => Some(false),
                _ => None,
            },
        })
    }
}

/// The three totals of one function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AerCounts {
    pub correctable: u64,
    pub nonfatal: u64,
    pub fatal: u64,
}

/// The three files and the total line each ends with.
pub const FILES: [(&str, &str); 3] = [
    ("aer_dev_correctable", "TOTAL_ERR_COR"),
    ("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL"),
    ("aer_dev_fatal", "TOTAL_ERR_FATAL"),
];

/// The most bytes read of one file: the kernel's longest is under 1 KiB.
pub const MAX_FILE: u64 = 4096;

/// The `total` line's count in one file's text.
pub fn total(text: &str, total: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(total))
            .then(|| words.next()?.parse::<u64>().ok())
            .flatten()
            .filter(|_| words.next().is_none())
    })
}

impl AerCounts {
    /// The counts of the three files' texts (in [`FILES`]'s order); `None`
    /// when any of them lacks its total.
    pub fn parse(texts: [&str; 3]) -> Option<AerCounts> {
        Some(AerCounts {
            correctable: total(texts[0], FILES[0].1)?,
            nonfatal: total(texts[1], FILES[1].1)?,
            fatal: total(texts[2], FILES[2].1)?,
        })
    }

    /// The errors counted since `baseline`. A count below its baseline was
    /// reset (the device was re-enumerated, or the host rebooted): all of
    /// it is new.
    pub fn since(&self, baseline: &AerCounts) -> AerCounts {
        let new = |now: u64, then: u64| if now >= then { now - then } else { now };
        AerCounts {
            correctable: new(self.correctable, baseline.correctable),
            nonfatal: new(self.nonfatal, baseline.nonfatal),
            fatal: new(self.fatal, baseline.fatal),
        }
    }

    /// `(severity, count)`, as the metrics label them.
    pub fn by_severity(&self) -> [(&'static str, u64); 3] {
        [
            ("correctable", self.correctable),
            ("nonfatal", self.nonfatal),
            ("fatal", self.fatal),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's own format (drivers/pci/pcie/aer.c, `aer_stats_dev_attr`).
    #[test]
    fn the_totals_are_read_as_the_kernel_writes_them() {
        let cor = "RxErr 0\nBadTLP 3\nBadDLLP 1\nRollover 0\nTimeout 0\nNonFatalErr 0\nCorrIntErr 0\nHeaderOF 0\nTOTAL_ERR_COR 4\n";
        let nonfatal = "Undefined 0\nDLP 0\nSDES 0\nTLP 0\nFCP 0\nCmpltTO 2\nCmpltAbrt 0\nUnxCmplt 0\nRxOF 0\nMalfTLP 0\nECRC 0\nUnsupReq 0\nACSViol 0\nUncorrIntErr 0\nBlockedTLP 0\nAtomicOpBlocked 0\nTLPBlockedErr 0\nPoisonTLPBlocked 0\nTOTAL_ERR_NONFATAL 2\n";
        let fatal = "Undefined 0\nDLP 0\nTOTAL_ERR_FATAL 0\n";
        assert_eq!(
            AerCounts::parse([cor, nonfatal, fatal]),
            Some(AerCounts {
                correctable: 4,
                nonfatal: 2,
                fatal: 0
            })
        );
        // A total that is missing, negative, not a number or followed by
        // more words is not believed.
        for bad in [
            "RxErr 0\n",
            "TOTAL_ERR_FATAL -1\n",
            "TOTAL_ERR_FATAL x\n",
            "TOTAL_ERR_FATAL 1 2\n",
            "",
        ] {
            assert_eq!(AerCounts::parse([cor, nonfatal, bad]), None, "{bad:?}");
        }
        assert_eq!(
            total("TOTAL_ERR_COR 18446744073709551615", "TOTAL_ERR_COR"),
            Some(u64::MAX)
        );
    }

    #[test]
    fn errors_since_a_baseline_count_a_reset_counter_whole() {
        let base = AerCounts {
            correctable: 5,
            nonfatal: 1,
            fatal: 0,
        };
        let now = AerCounts {
            correctable: 7,
            nonfatal: 0,
            fatal: 2,
        };
        assert_eq!(
            now.since(&base),
            AerCounts {
                correctable: 2,
                nonfatal: 0,
                fatal: 2
            }
        );
    }
}
