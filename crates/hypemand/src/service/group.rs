//! The IOMMU group is the unit of assignment *(issue 14)*: a VM that holds one
//! function of a group can reach every function in it, so a group goes to one
//! instance at a time. Attaching a function is refused while a sibling is
//! attached to another instance, and a sibling cannot be given back to the
//! host (Unbind, Delete) while one of its group is attached.

use hypeman_api::Error;

use super::error::{host_error, Result};
use super::Service;
use crate::host::HostDevice;
use crate::store::StoredDevice;

/// A registered sibling that holds the group for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    pub pci_address: String,
    pub instance: String,
}

impl Service {
    /// Takes the lock of `s`'s group (the caller holds `s`'s own lock, and
    /// read the device as `live`) and checks, under it, that no sibling is
    /// attached to another instance than `instance` (`None`: to any
    /// instance). The guard keeps the group's attachments still until the
    /// operation is done.
    pub(crate) async fn hold_group(
        &self,
        s: &StoredDevice,
        live: Option<&HostDevice>,
        instance: Option<&str>,
    ) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>> {
        let Some(group) = live.and_then(|d| d.iommu_group) else {
            return Ok(None);
        };
        let guard = self.group_lock(group).lock_owned().await;
        // Under the lock: who holds the group now.
        let holders = self.attached_siblings(s, group).await?;
        let conflict = match instance {
            Some(i) => attach_conflict(s, group, &holders, i),
            None => release_conflict(s, group, &holders),
        };
        match conflict {
            Some(e) => Err(e),
            None => Ok(Some(guard)),
        }
    }

    /// The registered members of IOMMU group `group` other than `s` that are
    /// attached, with their instances.
    async fn attached_siblings(&self, s: &StoredDevice, group: u32) -> Result<Vec<Holder>> {
        let members = self
            .door
            .group_members(group)
            .await
            .map_err(|e| host_error(format!("cannot read IOMMU group {group}"), e))?;
        let snapshot = self.snapshot();
        Ok(members
            .iter()
            .filter(|m| m.address != s.pci_address)
            .filter_map(|m| snapshot.by_address(m.address))
            .filter_map(|d| {
                d.attached_to.as_ref().map(|i| Holder {
                    name: d.name.clone(),
                    pci_address: d.pci_address.to_string(),
                    instance: i.clone(),
                })
            })
            .collect())
    }
}

/// Attaching `s` to `instance` while a sibling is held by another instance.
pub fn attach_conflict(
    s: &StoredDevice,
    group: u32,
    holders: &[Holder],
    instance: &str,
) -> Option<Error> {
    let h = holders.iter().find(|h| h.instance != instance)?;
    Some(Error::InUse(format!(
        "{} shares IOMMU group {group} with {} ({}), which is attached to instance {}: a group goes to one instance; detach {} first, or attach {} to {} as well",
        s.name, h.name, h.pci_address, h.instance, h.name, s.name, h.instance
    )))
}

/// Giving `s` back to the host while a sibling is attached.
pub fn release_conflict(s: &StoredDevice, group: u32, holders: &[Holder]) -> Option<Error> {
    let h = holders.first()?;
    Some(Error::InUse(format!(
        "{} shares IOMMU group {group} with {} ({}), which is attached to instance {}: detach {} first",
        s.name, h.name, h.pci_address, h.instance, h.name
    )))
}

#[cfg(test)]
mod tests {
    //! The group matrix on the desktop host: a GPU and its HDMI audio share
    //! IOMMU group 14.

    use crate::service::testing::{example, service_on};
    use hypeman_api::VFIO_DRIVER;
    use std::time::Duration;

    #[tokio::test]
    async fn a_group_goes_to_one_instance() {
        let f = service_on(&example("desktop.toml"), Duration::from_secs(5));
        let s = &f.service;
        s.register_at("0000:01:00.0", "gpu", Default::default())
            .await
            .unwrap();
        s.register_at("0000:01:00.1", "audio", Default::default())
            .await
            .unwrap();
        let (gpu, audio) = (s.resolve("gpu").unwrap(), s.resolve("audio").unwrap());
        s.bind(&audio).await.unwrap();
        s.attach(&gpu, "vm-1").await.unwrap();

        // Siblings to two instances: refused, naming the holder; nothing moves.
        let e = s.attach(&audio, "vm-2").await.unwrap_err();
        assert_eq!(e.short_name(), "InUse");
        let text = e.to_string();
        assert!(
            text.contains("gpu (0000:01:00.0)") && text.contains("vm-1"),
            "{text}"
        );
        let a = s.get("audio").await.unwrap();
        assert!(a.stored.attached_to.is_none());
        assert_eq!(a.driver(), Some(VFIO_DRIVER));

        // Unbind or Delete of a sibling while one is attached: refused.
        for e in [
            s.unbind(&audio).await.map(|_| ()).unwrap_err(),
            s.delete(&audio).await.map(|_| ()).unwrap_err(),
        ] {
            assert_eq!(e.short_name(), "InUse", "{e}");
            assert!(e.to_string().contains("detach gpu first"), "{e}");
        }
        assert_eq!(s.get("audio").await.unwrap().driver(), Some(VFIO_DRIVER));

        // Siblings to the same instance: fine.
        s.attach(&audio, "vm-1").await.unwrap();
        // Once the group is free again, the sibling goes back.
        s.detach(&gpu).await.unwrap();
        s.detach(&audio).await.unwrap();
        s.unbind(&audio).await.unwrap();
        assert_eq!(
            s.get("audio").await.unwrap().driver(),
            Some("snd_hda_intel")
        );
        s.delete(&audio).await.unwrap();
    }
}
