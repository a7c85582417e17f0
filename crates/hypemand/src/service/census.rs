//! *(issue 29)* What a metrics scrape shows of the registered devices: each
//! device as last seen, its PCIe error counters read now, and its verdict.
//!
//! One scrape costs one host call for the counters of every present
//! registered device (as a `List` costs one for their state); the rest comes
//! from the host state clients were last told about.

use super::health::Health;
use super::Service;
use crate::host::aer::AerCounts;

/// One registered device at a scrape.
#[derive(Debug, Clone)]
pub struct Sample {
    pub id: String,
    pub name: String,
    pub pci_address: String,
    pub vendor_id: String,
    pub device_id: String,
    pub kind: &'static str,
    /// The bound driver; "" when none or unplugged.
    pub driver: String,
    /// The NUMA node; "" when none or unplugged.
    pub numa_node: String,
    pub present: bool,
    pub on_vfio: bool,
    pub attached: bool,
    /// The counters read now; `None` when the kernel shows none.
    pub aer: Option<AerCounts>,
    pub health: Health,
}

impl Service {
    /// Every registered device, with its counters read now (and every
    /// verdict the read moved signalled).
    pub async fn census(&self) -> Vec<Sample> {
        let present: Vec<_> = self
            .snapshot()
            .iter()
            .filter(|s| self.seen().get(s.pci_address).flatten().is_some())
            .map(|s| s.pci_address)
            .collect();
        self.read_health(present).await;
        let snapshot = self.snapshot();
        snapshot
            .iter()
            .map(|s| {
                let live = self.seen().get(s.pci_address).flatten();
                let health = self.health_of(s, live.as_ref());
                let on_vfio = live.as_ref().is_some_and(crate::host::variant::on_vfio);
                Sample {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    pci_address: s.pci_address.to_string(),
                    vendor_id: s.vendor_id.clone(),
                    device_id: s.device_id.clone(),
                    kind: s.kind.as_str(),
                    driver: live
                        .as_ref()
                        .and_then(|l| l.driver.clone())
                        .unwrap_or_default(),
                    numa_node: live
                        .as_ref()
                        .and_then(|l| l.numa_node)
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                    present: live.is_some(),
                    on_vfio,
                    attached: s.attached_to.is_some(),
                    aer: live.as_ref().and(self.aer_counts(s.pci_address)),
                    health,
                }
            })
            .collect()
    }
}
