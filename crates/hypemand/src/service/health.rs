//! *(issue 29)* A verdict per registered device: `ok`, `degraded` or
//! `failed`, from the kernel's PCIe error counters and the device's presence.
//!
//! - `failed`: a fatal error since registration, or the device is gone
//!   while it should be on vfio or is attached (it vanished under a VM);
//! - `degraded`: more non-fatal and correctable errors since registration
//!   than the threshold (`--health-threshold`, [`DEFAULT_THRESHOLD`]);
//! - `ok` otherwise, and for a function whose kernel shows no counters.
//!
//! "Since registration" is against the totals the record took at Register
//! ([`StoredDevice::aer_baseline`]); a total below its baseline was reset
//! (the host rebooted, the device was re-enumerated), so all of it is new.
//! A record of before, without a baseline, counts from zero.
//!
//! The counters are read when asked (reading `Device1.Health`, which
//! `hypemanctl get` does), at every scrape of the metrics, and when the
//! kernel's AER recovery sends its `change` uevent; never on a timer. Every
//! read that moves a device's verdict is signalled (`PropertiesChanged` of
//! `Health`). `Get`, `List`, `GetAll` and `GetManagedObjects` show the
//! verdict of the last read without reading: reads stay at the bus's cost.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{DeviceView, Service};
use crate::host::aer::AerCounts;
use crate::host::HostDevice;
use crate::pci::PciAddress;
use crate::store::StoredDevice;

/// New non-fatal and correctable errors tolerated before `degraded`: a
/// healthy link may log a correctable error now and then.
pub const DEFAULT_THRESHOLD: u64 = 10;

/// A device's verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    #[default]
    Ok,
    Degraded,
    Failed,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Failed => "failed",
        }
    }

    /// `hypeman_device_health`: 0 ok, 1 degraded, 2 failed.
    pub fn gauge(self) -> i64 {
        self as i64
    }
}

/// The verdict of `stored`, present as `live` (or gone), whose counters
/// read `counts` (`None`: none read, or the kernel shows none).
pub fn verdict(
    stored: &StoredDevice,
    live: Option<&HostDevice>,
    counts: Option<&AerCounts>,
    threshold: u64,
) -> Health {
    if live.is_none() {
        let held = stored.want_vfio || stored.attached_to.is_some();
        return if held { Health::Failed } else { Health::Ok };
    }
    let Some(now) = counts else {
        return Health::Ok;
    };
    let new = now.since(&stored.aer_baseline.unwrap_or_default());
    if new.fatal > 0 {
        Health::Failed
    } else if new.nonfatal.saturating_add(new.correctable) > threshold {
        Health::Degraded
    } else {
        Health::Ok
    }
}

/// The counters last read of each function, and the threshold.
pub struct Counters {
    last: Mutex<HashMap<PciAddress, AerCounts>>,
    threshold: std::sync::atomic::AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            last: Mutex::default(),
            threshold: DEFAULT_THRESHOLD.into(),
        }
    }
}

impl Counters {
    fn last(&self) -> std::sync::MutexGuard<'_, HashMap<PciAddress, AerCounts>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters last read of `address`.
    pub fn get(&self, address: PciAddress) -> Option<AerCounts> {
        self.last().get(&address).copied()
    }

    /// Records a read (Register's, or one asked for); returns what was
    /// known before.
    pub fn set(&self, address: PciAddress, counts: Option<AerCounts>) -> Option<AerCounts> {
        match counts {
            Some(c) => self.last().insert(address, c),
            None => self.last().remove(&address),
        }
    }

    /// A function left or came: its counters start again.
    pub fn forget(&self, address: PciAddress) {
        self.last().remove(&address);
    }

    pub fn threshold(&self) -> u64 {
        self.threshold.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Service {
    /// Sets how many new non-fatal and correctable errors make a device
    /// `degraded`.
    pub fn set_health_threshold(&self, threshold: u64) {
        self.aer
            .threshold
            .store(threshold, std::sync::atomic::Ordering::Relaxed);
    }

    /// The verdict of `stored` as `live`, from the counters last read.
    pub(crate) fn health_of(&self, stored: &StoredDevice, live: Option<&HostDevice>) -> Health {
        let counts = self.aer.get(stored.pci_address);
        verdict(stored, live, counts.as_ref(), self.aer.threshold())
    }

    /// The counters last read of `address` (for the metrics).
    pub fn aer_counts(&self, address: PciAddress) -> Option<AerCounts> {
        self.aer.get(address)
    }

    /// Reads the counters of the registered devices at `addresses` (in one
    /// host call), and signals every verdict the read moved. The verdicts
    /// are compared with the host state clients were last told about.
    pub async fn read_health(&self, addresses: Vec<PciAddress>) {
        if addresses.is_empty() {
            return;
        }
        let read = match self.door.aer_many(addresses.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the PCIe error counters");
                return;
            }
        };
        let snapshot = self.snapshot();
        let threshold = self.aer.threshold();
        for (address, counts) in addresses.into_iter().zip(read) {
            let before = self.aer.set(address, counts);
            if before == counts {
                continue;
            }
            let Some(stored) = snapshot.by_address(address) else {
                continue;
            };
            let live = self.seen().get(address).flatten();
            let was = verdict(stored, live.as_ref(), before.as_ref(), threshold);
            let now = verdict(stored, live.as_ref(), counts.as_ref(), threshold);
            if was == now {
                continue;
            }
            tracing::warn!(
                pci_address = %address,
                device_id = %stored.id,
                device_name = %stored.name,
                health = %now.as_str(),
                was = %was.as_str(),
                correctable = counts.map_or(0, |c| c.correctable),
                nonfatal = counts.map_or(0, |c| c.nonfatal),
                fatal = counts.map_or(0, |c| c.fatal),
                "the device's health changed"
            );
            let after = self.view((**stored).clone(), live);
            let mut previous: DeviceView = after.clone();
            previous.health = was;
            self.publish_change(&previous, &after).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(baseline: Option<AerCounts>) -> StoredDevice {
        let mut s = crate::store::registry::tests::sample("0000:01:00.0", "gpu");
        s.aer_baseline = baseline;
        s
    }

    fn counts(correctable: u64, nonfatal: u64, fatal: u64) -> AerCounts {
        AerCounts {
            correctable,
            nonfatal,
            fatal,
        }
    }

    #[test]
    fn the_verdict_counts_from_registration() {
        let live = HostDevice::example();
        let base = Some(counts(100, 2, 0));
        let s = stored(base);
        let v = |c: AerCounts| verdict(&s, Some(&live), Some(&c), 10);
        assert_eq!(verdict(&s, Some(&live), None, 10), Health::Ok);
        assert_eq!(v(counts(100, 2, 0)), Health::Ok);
        assert_eq!(v(counts(105, 7, 0)), Health::Ok, "10 new: at the threshold");
        assert_eq!(v(counts(106, 7, 0)), Health::Degraded, "11 new");
        assert_eq!(v(counts(100, 2, 1)), Health::Failed);
        // Reset counters (a reboot): all of it is new.
        assert_eq!(v(counts(3, 0, 0)), Health::Ok);
        assert_eq!(v(counts(11, 0, 0)), Health::Degraded);
        // Without a baseline, from zero.
        let old = stored(None);
        assert_eq!(
            verdict(&old, Some(&live), Some(&counts(0, 11, 0)), 10),
            Health::Degraded
        );
    }

    #[test]
    fn a_device_gone_while_held_has_failed() {
        let mut s = stored(None);
        assert_eq!(verdict(&s, None, None, 10), Health::Ok);
        s.want_vfio = true;
        assert_eq!(verdict(&s, None, None, 10), Health::Failed);
        s.want_vfio = false;
        s.attached_to = Some("vm-1".into());
        assert_eq!(verdict(&s, None, None, 10), Health::Failed);
        assert_eq!(Health::Failed.gauge(), 2);
        assert_eq!(Health::Degraded.gauge(), 1);
        assert_eq!(Health::Ok.gauge(), 0);
    }
}
